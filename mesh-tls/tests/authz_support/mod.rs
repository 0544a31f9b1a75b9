//! A real inbound server for the authorization tests: TCP on 127.0.0.1:0, the crate's
//! PeerAuthentication accept path (mTLS or plaintext), hyper, the [`AuthzLayer`], and an
//! application that records what it received.

#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_core::{AuthzDecision, Identity, PeerIdentity};
use mesh_tls::authz::{AuthzLayer, PolicyHandle};
use mesh_tls::{
    CertStore, CertificateAuthority, ClientTls, InboundAcceptor, PeerAuthMode, SecureNaming,
    serve_connection,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

/// What the application behind the layer saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query as received.
    pub target: String,
    pub peer: Option<Identity>,
    pub decision: Option<AuthzDecision>,
}

pub struct Server {
    pub addr: SocketAddr,
    pub ca: Arc<CertificateAuthority>,
    pub identity: Identity,
    pub handle: PolicyHandle,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    /// Starts `production/payment-service` with `layer`, PERMISSIVE.
    pub async fn start(layer: AuthzLayer) -> Server {
        let ca = Arc::new(CertificateAuthority::new("cluster.local").unwrap());
        let store =
            CertStore::from_issued(&ca.issue("production", "payment-service").unwrap()).unwrap();
        let identity = store.identity();
        let acceptor = Arc::new(InboundAcceptor::new(store));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handle = layer.handle();
        let app_seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let seen = app_seen.clone();
                let layer = layer.clone();
                tokio::spawn(async move {
                    let Ok(conn) = acceptor.accept(tcp, PeerAuthMode::Permissive).await else {
                        return;
                    };
                    let app = tower::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            seen.lock().unwrap().push(Seen {
                                method: req.method().to_string(),
                                target: req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.as_str().to_owned())
                                    .unwrap_or_default(),
                                peer: req.extensions().get::<PeerIdentity>().map(|p| p.0.clone()),
                                decision: req.extensions().get::<AuthzDecision>().cloned(),
                            });
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let svc = ServiceBuilder::new().layer(layer).service(app);
                    let _ = serve_connection(conn, svc).await;
                });
            }
        });
        Server {
            addr,
            ca,
            identity,
            handle,
            seen,
        }
    }

    /// Everything the application received so far, and forgets it.
    pub fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// An mTLS HTTP/1.1 connection as `ns/sa`.
    pub async fn connect_mtls(&self, ns: &str, sa: &str) -> Client {
        let store = CertStore::from_issued(&self.ca.issue(ns, sa).unwrap()).unwrap();
        let client = ClientTls::new(store);
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let (tls, leaf) = client
            .connect(
                tcp,
                "payment-service",
                &SecureNaming::only(self.identity.clone()),
            )
            .await
            .unwrap();
        assert_eq!(leaf.identity, self.identity);
        Client::handshake(TokioIo::new(tls)).await
    }

    /// A plaintext HTTP/1.1 connection.
    pub async fn connect_plain(&self) -> Client {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        Client::handshake(TokioIo::new(tcp)).await
    }

    /// Sends raw bytes on a plaintext connection and returns (status, body) of the reply.
    pub async fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut tcp = TcpStream::connect(self.addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    /// `GET <target>` on a fresh plaintext connection, written byte for byte.
    pub async fn raw_get(&self, target: &str) -> (u16, String) {
        self.raw(
            format!("GET {target} HTTP/1.1\r\nHost: payment\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
    }
}

pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    async fn handshake<IO>(io: TokioIo<IO>) -> Client
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    pub async fn send(&mut self, method: &str, target: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(target)
            .header("host", "payment-service.production.svc")
            .body(Empty::new())
            .unwrap();
        self.sender.ready().await.unwrap();
        let res = self.sender.send_request(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }
}
