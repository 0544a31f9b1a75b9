//! Helpers shared by the integration tests: a tiny hyper app behind the accept path,
//! an mTLS HTTP client, and raw rustls clients for certificates the store would refuse.

#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::{ConnectionSecurity, PeerIdentity};
use mesh_tls::verify::{SpiffeServerVerifier, TrustBundle};
use mesh_tls::{
    AcceptError, CertStore, CertificateAuthority, ClientTls, InboundAcceptor, IssuedSvid,
    PeerAuthMode, SecureNaming, SvidLeaf, WorkloadPeerAuthentication, serve_connection,
};
use rustls::ClientConfig;
use rustls::client::Resumption;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

pub const TD: &str = "cluster.local";

/// A listener on 127.0.0.1:0 running the inbound accept path with a fixed mode.
pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Arc<CertStore>,
    /// Every refused connection, with the reason.
    pub errors: mpsc::UnboundedReceiver<AcceptError>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// The next accept error (the reason a connection was refused).
    pub async fn next_error(&mut self) -> AcceptError {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.errors.recv())
            .await
            .expect("the server reports an accept error")
            .expect("server running")
    }
}

/// The app: answers `peer=<SPIFFE ID or ->;security=<mutual_tls|none>` from the
/// request extensions the accept path inserted.
async fn app(req: http::Request<Incoming>) -> Result<http::Response<Full<Bytes>>, Infallible> {
    let peer = req
        .extensions()
        .get::<PeerIdentity>()
        .map_or_else(|| "-".to_owned(), |p| p.0.to_string());
    let security = req
        .extensions()
        .get::<ConnectionSecurity>()
        .map_or("missing", |s| s.as_str());
    Ok(http::Response::new(Full::new(Bytes::from(format!(
        "peer={peer};security={security}"
    )))))
}

pub async fn start_server(store: Arc<CertStore>, mode: PeerAuthMode) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let policy = Arc::new(WorkloadPeerAuthentication::uniform(mode));
    start_server_on(listener, store, policy)
}

/// Serves `listener`, looking up each connection's mode in `policy` by the local port,
/// as the inbound listener does.
pub fn start_server_on(
    listener: TcpListener,
    store: Arc<CertStore>,
    policy: Arc<WorkloadPeerAuthentication>,
) -> TestServer {
    let addr = listener.local_addr().unwrap();
    let acceptor = InboundAcceptor::new(store.clone());
    let (tx, errors) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let mode = policy.mode(tcp.local_addr().unwrap().port());
            tokio::spawn(async move {
                match acceptor.accept(tcp, mode).await {
                    Ok(conn) => {
                        let _ = serve_connection(conn, tower::service_fn(app)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(e);
                    }
                }
            });
        }
    });
    TestServer {
        addr,
        store,
        errors,
        task,
    }
}

/// An HTTP/2 connection over mTLS made with our client config.
pub struct MtlsConn {
    pub sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    /// The server's verified SVID.
    pub server: SvidLeaf,
    pub alpn: Option<Vec<u8>>,
}

impl MtlsConn {
    pub async fn get(&mut self) -> Result<String, hyper::Error> {
        self.sender.ready().await?;
        let req = http::Request::get("/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = self.sender.send_request(req).await?;
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(body.to_vec()).unwrap())
    }
}

pub async fn connect(
    client: &ClientTls,
    addr: SocketAddr,
    expected: &SecureNaming,
) -> std::io::Result<MtlsConn> {
    let tcp = TcpStream::connect(addr).await?;
    let (tls, server) = client.connect(tcp, "mesh.test", expected).await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(MtlsConn {
        sender,
        server,
        alpn,
    })
}

/// A workload store issued by `ca`.
pub fn store(ca: &CertificateAuthority, ns: &str, sa: &str) -> Arc<CertStore> {
    CertStore::from_issued(&ca.issue(ns, sa).unwrap()).unwrap()
}

/// A rustls client that trusts `ca` for the server (any identity) and presents `svid`
/// as is, valid or not: the store would refuse to serve a bad certificate, a client
/// under test must still be able to send one.
pub fn raw_client(ca: &CertificateAuthority, svid: Option<&IssuedSvid>) -> TlsConnector {
    let provider = mesh_tls::provider();
    let bundle = TrustBundle::new(vec![ca.root_der().clone()], vec![TD.into()]).unwrap();
    let verifier = SpiffeServerVerifier::new(
        Arc::new(ArcSwap::from_pointee(bundle)),
        provider.clone(),
        SecureNaming::AnyTrusted,
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match svid {
        Some(svid) => builder
            .with_client_auth_cert(svid.chain_der().to_vec(), svid.key_der())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// Connects with a raw client and tries one HTTP/1.1 request; returns whether it got a
/// response. With TLS 1.3 the client finishes its side of the handshake before the
/// server has checked the client certificate, so the failure may show only on read.
pub async fn raw_request(connector: &TlsConnector, addr: SocketAddr) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("mesh.test").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "mesh.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}
