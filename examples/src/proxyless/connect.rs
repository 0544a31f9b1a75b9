//! The endpoint end of the outbound path: one pooled HTTP client per endpoint, connecting
//! with mTLS when the endpoint has identities (secure naming against them) and in
//! plaintext when it has none.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::body::BoxBody;
use mesh_core::error::{BoxError, ConnectFailure, ResetReason, UpstreamReset};
use mesh_core::{Endpoint, UpstreamHost};
use mesh_tls::{ClientTls, SecureNaming};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A connection to an endpoint: mTLS or plaintext.
#[derive(Debug)]
pub enum MeshConn {
    /// Mutual TLS.
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
    /// Plaintext (an endpoint without identity).
    Plain(TokioIo<TcpStream>),
}

impl Connection for MeshConn {
    fn connected(&self) -> Connected {
        match self {
            MeshConn::Tls(io) => {
                let h2 = io.inner().get_ref().1.alpn_protocol() == Some(b"h2");
                let c = Connected::new();
                if h2 { c.negotiated_h2() } else { c }
            }
            MeshConn::Plain(_) => Connected::new(),
        }
    }
}

impl hyper::rt::Read for MeshConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshConn::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
            MeshConn::Plain(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MeshConn::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
            MeshConn::Plain(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshConn::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
            MeshConn::Plain(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MeshConn::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
            MeshConn::Plain(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// Connects to one endpoint, whatever URI the client asks for.
#[derive(Clone, Debug)]
pub struct EndpointConnector {
    endpoint: Endpoint,
    tls: ClientTls,
    server_name: Arc<str>,
}

impl EndpointConnector {
    /// A connector to `endpoint` presenting the workload certificate of `tls`; `server_name`
    /// is sent as SNI.
    pub fn new(endpoint: Endpoint, tls: ClientTls, server_name: &str) -> Self {
        Self {
            endpoint,
            tls,
            server_name: Arc::from(server_name),
        }
    }
}

impl tower::Service<Uri> for EndpointConnector {
    type Response = MeshConn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = async {
                let tcp = TcpStream::connect(this.endpoint.address).await?;
                tcp.set_nodelay(true)?;
                if this.endpoint.identities.is_empty() {
                    return Ok(MeshConn::Plain(TokioIo::new(tcp)));
                }
                let naming = SecureNaming::OneOf(this.endpoint.identities.clone());
                let (tls, _server) = this.tls.connect(tcp, &this.server_name, &naming).await?;
                Ok::<_, io::Error>(MeshConn::Tls(Box::new(TokioIo::new(tls))))
            };
            match tokio::time::timeout(Duration::from_secs(10), connect).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(ConnectFailure::new(e).into()),
                Err(elapsed) => Err(ConnectFailure::new(elapsed).into()),
            }
        })
    }
}

/// The service of one endpoint: a pooled HTTP/1.1 or HTTP/2 client (by ALPN) that sends
/// every request to that endpoint, keeping the request's authority in `Host`.
#[derive(Clone, Debug)]
pub struct EndpointService {
    client: Client<EndpointConnector, BoxBody>,
    endpoint: Endpoint,
}

impl EndpointService {
    /// A client for `endpoint`.
    pub fn new(endpoint: &Endpoint, tls: ClientTls, server_name: &str) -> Self {
        let connector = EndpointConnector::new(endpoint.clone(), tls, server_name);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            client,
            endpoint: endpoint.clone(),
        }
    }
}

impl tower::Service<Request<BoxBody>> for EndpointService {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let address = self.endpoint.address;
        // The connector always dials this endpoint; the URI keeps the logical authority
        // (HTTP/2 sends it as `:authority`, HTTP/1.1 as `Host`).
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| address.to_string());
        if !req.headers().contains_key(http::header::HOST)
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build();
        let client = self.client.clone();
        // The pool picks HTTP/2 or HTTP/1.1 by ALPN; an HTTP/2 request from downstream
        // must still be sendable on an HTTP/1.1 connection.
        *req.version_mut() = http::Version::HTTP_11;
        Box::pin(async move {
            *req.uri_mut() = uri?;
            match client.request(req).await {
                Ok(res) => {
                    let mut res = res.map(|b| b.map_err(BoxError::from).boxed());
                    res.extensions_mut().insert(UpstreamHost(address));
                    Ok(res)
                }
                Err(e) if e.is_connect() => Err(ConnectFailure::new(e).into()),
                Err(e) => Err(UpstreamReset::new(
                    ResetReason::ConnectionTermination,
                    true,
                    Some(e.into()),
                )
                .into()),
            }
        })
    }
}
