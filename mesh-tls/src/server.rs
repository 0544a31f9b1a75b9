//! The inbound side: accept a connection per its PeerAuthentication mode, verify the
//! client's SVID during the handshake, and hand the peer identity to every request on
//! the connection.
//!
//! [`ServerTls`] owns the rustls server config: client certificates are mandatory and
//! checked by [`SpiffeClientVerifier`] against the store's current trust bundle, the
//! server certificate comes from the [`CertStore`] on each handshake, ALPN is `h2` and
//! `http/1.1`, TLS 1.3 and 1.2 with the ring provider, and resumption is off (no
//! session cache, no tickets; see [`verify`](crate::verify)).
//!
//! [`InboundAcceptor::accept`] applies the mode:
//!
//! - `STRICT`: the first byte must start a TLS handshake record (`0x16`); anything
//!   else is refused with [`AcceptError::PlaintextRefused`] and the connection closed.
//! - `PERMISSIVE`: the first bytes are peeked (not consumed); a TLS handshake record
//!   goes through mTLS, anything else is served as plaintext with no identity.
//! - `DISABLE`: plaintext only; nothing is peeked.
//!
//! A TLS client without a valid SVID fails the handshake in STRICT and PERMISSIVE
//! alike. The peer certificate is parsed exactly once, inside the verifier during the
//! handshake; the result is the connection's [`ConnectionContext`]. The
//! [`ConnectionExtensionsLayer`] copies it into every request's extensions as
//! [`PeerIdentity`] (mTLS only), [`ConnectionSecurity`] (`mutual_tls` or `none`) and
//! [`ConnectionInfo`]: a reference-count increment per request, no parsing.
//!
//! # Layer placement
//!
//! Outermost on the inbound path, per connection:
//! `TcpListener -> InboundAcceptor::accept -> serve_connection(ConnectionExtensionsLayer
//! -> telemetry -> authorization -> application)`.
//!
//! # Errors
//!
//! [`AcceptError`] says whether plaintext was refused, the handshake failed (with the
//! rustls error and, for SVID problems, the [`SvidError`](crate::svid::SvidError)
//! reachable through [`svid_error`](crate::verify::svid_error)), or timed out.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<mesh_tls::CertStore>) -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_tls::{InboundAcceptor, PeerAuthMode, serve_connection};
//! use mesh_core::{ConnectionSecurity, PeerIdentity};
//! use tower::{ServiceBuilder, service_fn};
//!
//! let acceptor = InboundAcceptor::new(store);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:15006").await?;
//! loop {
//!     let (tcp, _) = listener.accept().await?;
//!     let acceptor = acceptor.clone();
//!     tokio::spawn(async move {
//!         let Ok(conn) = acceptor.accept(tcp, PeerAuthMode::Strict).await else { return };
//!         let app = ServiceBuilder::new().service(service_fn(|req: http::Request<_>| async move {
//!             let who = req.extensions().get::<PeerIdentity>().map(|p| p.0.to_string());
//!             Ok::<_, std::convert::Infallible>(http::Response::new(
//!                 http_body_util::Full::new(bytes::Bytes::from(who.unwrap_or_default())),
//!             ))
//!         }));
//!         let _ = serve_connection(conn, app).await;
//!     });
//! }
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use mesh_core::{BoxError, ConnectionInfo, ConnectionSecurity, PeerIdentity};
use rustls::ServerConfig;
use rustls::server::NoServerSessionStorage;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tower_layer::Layer;
use tower_service::Service;

use crate::peer_auth::PeerAuthMode;
use crate::store::CertStore;
use crate::svid::{Serial, SvidLeaf};
use crate::verify::{PeerSlot, SpiffeClientVerifier};

/// Default bound on protocol detection plus the TLS handshake (Envoy's listener filter
/// timeout is 15 s; a handshake that has not finished in 10 s is a slowloris).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds rustls server configs for inbound mTLS from a [`CertStore`].
#[derive(Clone, Debug)]
pub struct ServerTls {
    store: Arc<CertStore>,
    verifier: SpiffeClientVerifier,
}

impl ServerTls {
    /// Server configs serving `store`'s SVID and verifying clients against its bundle.
    pub fn new(store: Arc<CertStore>) -> Self {
        let verifier = SpiffeClientVerifier::new(store.bundle_handle(), store.provider().clone());
        Self { store, verifier }
    }

    /// The store.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// The same server, accepting clients without a certificate too (see
    /// [`SpiffeClientVerifier::optional`]); [`accept_any`](Self::accept_any) reads
    /// whether one was presented.
    #[must_use]
    pub fn client_certificate_optional(mut self) -> Self {
        self.verifier = self.verifier.optional();
        self
    }

    /// A server config; if `slot` is given, the verified client is recorded in it.
    ///
    /// [`accept`](Self::accept) builds one per connection with a fresh slot, which is
    /// how the peer identity is read without a second parse.
    pub fn config(&self, slot: Option<PeerSlot>) -> Arc<ServerConfig> {
        let verifier = match slot {
            Some(slot) => self.verifier.recording(slot),
            None => self.verifier.clone(),
        };
        let mut config = ServerConfig::builder_with_provider(self.store.provider().clone())
            .with_protocol_versions(crate::PROTOCOL_VERSIONS)
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(self.store.clone());
        config.alpn_protocols = crate::server_alpn();
        // No resumption: a resumed session would skip the verifier (see `verify`).
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }

    /// Performs the server side of the mTLS handshake and returns the stream with the
    /// client's verified SVID.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<(TlsStream<IO>, SvidLeaf)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let (stream, leaf) = self.accept_any(io).await?;
        let leaf = leaf
            .ok_or_else(|| io::Error::other("handshake completed without a client certificate"))?;
        Ok((stream, leaf))
    }

    /// Like [`accept`](Self::accept), for a server whose client certificate is
    /// [optional](Self::client_certificate_optional): the client's verified SVID, if it
    /// presented one.
    pub async fn accept_any<IO>(&self, io: IO) -> io::Result<(TlsStream<IO>, Option<SvidLeaf>)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let slot = PeerSlot::new();
        let stream = TlsAcceptor::from(self.config(Some(slot.clone())))
            .accept(io)
            .await?;
        Ok((stream, slot.get().cloned()))
    }
}

/// Why a connection was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// STRICT mode and the client did not start a TLS handshake.
    #[error("plaintext connection refused: PeerAuthentication mode is STRICT")]
    PlaintextRefused,
    /// The TLS handshake failed (no, invalid or untrusted client certificate, ...).
    #[error("TLS handshake failed: {}", crate::verify::describe(.0))]
    Handshake(#[source] io::Error),
    /// Detection or handshake took longer than the handshake timeout.
    #[error("TLS handshake timed out")]
    Timeout,
    /// The client closed before sending anything.
    #[error("connection closed before any data")]
    Closed,
    /// Reading the socket failed.
    #[error("socket error: {0}")]
    Io(#[source] io::Error),
}

/// Accepts inbound connections per PeerAuthentication mode.
#[derive(Clone, Debug)]
pub struct InboundAcceptor {
    tls: ServerTls,
    handshake_timeout: Duration,
}

impl InboundAcceptor {
    /// An acceptor serving `store`'s SVID.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self {
            tls: ServerTls::new(store),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Sets the bound on protocol detection plus handshake.
    #[must_use]
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The TLS side.
    pub fn tls(&self) -> &ServerTls {
        &self.tls
    }

    /// Accepts `tcp` under `mode`.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        mode: PeerAuthMode,
    ) -> Result<AcceptedConnection, AcceptError> {
        let remote = tcp.peer_addr().map_err(AcceptError::Io)?;
        let local = tcp.local_addr().map_err(AcceptError::Io)?;
        tokio::time::timeout(
            self.handshake_timeout,
            self.accept_inner(tcp, mode, remote, local),
        )
        .await
        .map_err(|_| AcceptError::Timeout)?
    }

    async fn accept_inner(
        &self,
        tcp: TcpStream,
        mode: PeerAuthMode,
        remote: SocketAddr,
        local: SocketAddr,
    ) -> Result<AcceptedConnection, AcceptError> {
        let tls = match mode {
            PeerAuthMode::Disable => false,
            PeerAuthMode::Strict | PeerAuthMode::Permissive => {
                let tls = starts_with_tls_handshake(&tcp).await?;
                if !tls && mode == PeerAuthMode::Strict {
                    return Err(AcceptError::PlaintextRefused);
                }
                tls
            }
        };
        if !tls {
            return Ok(AcceptedConnection {
                io: MeshStream::Plain(tcp),
                context: ConnectionContext::plaintext(remote, local),
            });
        }
        let (stream, leaf) = self.tls.accept(tcp).await.map_err(AcceptError::Handshake)?;
        let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let peer_cert_hash = PeerCertificateHash::of_connection(stream.get_ref().1);
        Ok(AcceptedConnection {
            io: MeshStream::Tls(Box::new(stream)),
            context: ConnectionContext {
                peer: Some(PeerIdentity(leaf.identity)),
                peer_serial: Some(leaf.serial),
                peer_cert_hash,
                info: ConnectionInfo {
                    remote,
                    local,
                    security: ConnectionSecurity::MutualTls,
                },
                alpn,
            },
        })
    }
}

/// Peeks (without consuming) whether the client opens with a TLS handshake record:
/// content type 22 and, when already available, protocol major version 3.
async fn starts_with_tls_handshake(tcp: &TcpStream) -> Result<bool, AcceptError> {
    let mut buf = [0u8; 2];
    let n = tcp.peek(&mut buf).await.map_err(AcceptError::Io)?;
    match n {
        0 => Err(AcceptError::Closed),
        1 => Ok(buf[0] == 0x16),
        _ => Ok(buf[0] == 0x16 && buf[1] == 0x03),
    }
}

/// The SHA-256 digest of the DER of the client's leaf certificate (Envoy's XFCC
/// `Hash`), for connections whose client presented one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerCertificateHash(pub [u8; 32]);

impl PeerCertificateHash {
    /// The digest of `der`.
    pub fn of(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// The digest of the leaf certificate the client of `conn` presented, if any.
    pub fn of_connection(conn: &rustls::ServerConnection) -> Option<Self> {
        conn.peer_certificates()
            .and_then(|c| c.first())
            .map(|der| Self::of(der.as_ref()))
    }

    /// Appends the digest in lower-case hex (64 characters) to `out`.
    pub fn write_hex(&self, out: &mut String) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        // Into a buffer first, then one append: a `push` per digit costs a capacity check
        // and a UTF-8 encoding each, ten times the work (this runs on every mTLS request
        // whose `X-Forwarded-Client-Cert` the sidecar writes).
        let mut hex = [0u8; 64];
        for (pair, b) in hex.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    }

    /// Lower-case hex, as Envoy writes it.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        self.write_hex(&mut s);
        s
    }
}

/// What the accept path learned about a connection, once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionContext {
    /// The verified client identity (mTLS only).
    pub peer: Option<PeerIdentity>,
    /// The client certificate's serial (mTLS only).
    pub peer_serial: Option<Serial>,
    /// The SHA-256 of the client's leaf certificate (mTLS only).
    pub peer_cert_hash: Option<PeerCertificateHash>,
    /// Addresses and security of the connection.
    pub info: ConnectionInfo,
    /// The negotiated ALPN protocol (TLS only).
    pub alpn: Option<Vec<u8>>,
}

impl ConnectionContext {
    /// The context of a plaintext connection: no identity, security `none`.
    pub fn plaintext(remote: SocketAddr, local: SocketAddr) -> Self {
        Self {
            peer: None,
            peer_serial: None,
            peer_cert_hash: None,
            info: ConnectionInfo {
                remote,
                local,
                security: ConnectionSecurity::None,
            },
            alpn: None,
        }
    }
}

/// An accepted connection: the stream and what is known about its peer.
#[derive(Debug)]
pub struct AcceptedConnection {
    /// The byte stream (TLS or plaintext).
    pub io: MeshStream,
    /// The connection's facts.
    pub context: ConnectionContext,
}

/// A server-side stream that is either mTLS or plaintext.
#[derive(Debug)]
pub enum MeshStream {
    /// Mutual TLS.
    Tls(Box<TlsStream<TcpStream>>),
    /// Plaintext (PERMISSIVE without TLS, or DISABLE).
    Plain(TcpStream),
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tls(s) => s.is_write_vectored(),
            Self::Plain(s) => s.is_write_vectored(),
        }
    }
}

/// Inserts a connection's [`PeerIdentity`], [`ConnectionSecurity`] and
/// [`ConnectionInfo`] into every request on it.
#[derive(Clone, Debug)]
pub struct ConnectionExtensionsLayer {
    context: Arc<ConnectionContext>,
}

impl ConnectionExtensionsLayer {
    /// The layer for one connection.
    pub fn new(context: ConnectionContext) -> Self {
        Self {
            context: Arc::new(context),
        }
    }
}

impl<S> Layer<S> for ConnectionExtensionsLayer {
    type Service = ConnectionExtensions<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectionExtensions {
            inner,
            context: self.context.clone(),
        }
    }
}

/// The service of [`ConnectionExtensionsLayer`].
#[derive(Clone, Debug)]
pub struct ConnectionExtensions<S> {
    inner: S,
    context: Arc<ConnectionContext>,
}

impl<S, B> Service<http::Request<B>> for ConnectionExtensions<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let ext = req.extensions_mut();
        // Overwrite anything already there: identity only ever comes from the handshake.
        match &self.context.peer {
            Some(peer) => {
                ext.insert(peer.clone());
            }
            None => {
                ext.remove::<PeerIdentity>();
            }
        }
        match self.context.peer_cert_hash {
            Some(hash) => {
                ext.insert(hash);
            }
            None => {
                ext.remove::<PeerCertificateHash>();
            }
        }
        ext.insert(self.context.info.security);
        ext.insert(self.context.info);
        self.inner.call(req)
    }
}

/// Serves HTTP/1.1 and HTTP/2 (hyper-util's auto builder) on an accepted connection,
/// with the connection's facts inserted into every request.
pub async fn serve_connection<S, B>(conn: AcceptedConnection, service: S) -> Result<(), BoxError>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let service = ConnectionExtensionsLayer::new(conn.context).layer(service);
    auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(conn.io), TowerToHyperService::new(service))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    #[test]
    fn certificate_hash_is_lower_case_hex_of_sha256() {
        // FIPS 180-2's example: SHA-256("abc").
        let hash = PeerCertificateHash::of(b"abc");
        assert_eq!(
            hash.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut out = String::from("Hash=");
        hash.write_hex(&mut out);
        assert_eq!(out.len(), 5 + 64);
        assert!(out.ends_with("f20015ad"));
    }

    #[tokio::test]
    async fn extensions_overwrite_client_supplied_identity() {
        let remote: SocketAddr = "10.0.0.1:1234".parse().unwrap();
        let local: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut svc = ConnectionExtensionsLayer::new(ConnectionContext::plaintext(remote, local))
            .layer(tower_service_fn(|req: http::Request<()>| {
                (
                    req.extensions().get::<PeerIdentity>().cloned(),
                    req.extensions().get::<ConnectionSecurity>().copied(),
                    req.extensions().get::<ConnectionInfo>().map(|i| i.remote),
                )
            }));
        let mut req = http::Request::new(());
        let forged = mesh_core::Identity::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        req.extensions_mut().insert(PeerIdentity(forged));
        let (peer, security, remote_seen) = svc.call(req).await.unwrap();
        assert_eq!(peer, None);
        assert_eq!(security, Some(ConnectionSecurity::None));
        assert_eq!(remote_seen, Some(remote));
    }

    fn mtls_context() -> ConnectionContext {
        let id = mesh_core::Identity::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        ConnectionContext {
            peer: Some(PeerIdentity(id)),
            peer_serial: None,
            peer_cert_hash: None,
            info: ConnectionInfo {
                remote: "10.0.0.1:1234".parse().unwrap(),
                local: "10.0.0.2:80".parse().unwrap(),
                security: ConnectionSecurity::MutualTls,
            },
            alpn: Some(b"h2".to_vec()),
        }
    }

    #[tokio::test]
    async fn readiness_is_forwarded_and_every_request_gets_the_identity() {
        let (mock, mut handle) = tower_test::mock::pair::<http::Request<()>, ()>();
        let mut svc = tower_test::mock::Spawn::new(
            ConnectionExtensionsLayer::new(mtls_context()).layer(mock),
        );
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(2);
        for _ in 0..2 {
            assert!(svc.poll_ready().is_ready());
            let fut = svc.call(http::Request::new(()));
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                req.extensions()
                    .get::<PeerIdentity>()
                    .map(|p| p.0.principal()),
                Some("cluster.local/ns/a/sa/b")
            );
            assert_eq!(
                req.extensions().get::<ConnectionSecurity>(),
                Some(&ConnectionSecurity::MutualTls)
            );
            send.send_response(());
            fut.await.unwrap();
        }
    }

    #[tokio::test]
    async fn inner_errors_pass_through_unchanged() {
        let (mock, mut handle) = tower_test::mock::pair::<http::Request<()>, ()>();
        let mut svc = ConnectionExtensionsLayer::new(mtls_context()).layer(mock);
        handle.allow(1);
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        let fut = svc.call(http::Request::new(()));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(std::io::Error::other("app failed"));
        let err = fut.await.unwrap_err();
        assert_eq!(err.to_string(), "app failed");
    }

    // A tiny service_fn so the unit test needs no extra dependency.
    fn tower_service_fn<F, R>(f: F) -> FnSvc<F>
    where
        F: FnMut(http::Request<()>) -> R,
    {
        FnSvc(f)
    }

    struct FnSvc<F>(F);

    impl<F, R> Service<http::Request<()>> for FnSvc<F>
    where
        F: FnMut(http::Request<()>) -> R,
    {
        type Response = R;
        type Error = Infallible;
        type Future = std::future::Ready<Result<R, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            std::future::ready(Ok((self.0)(req)))
        }
    }
}
