//! The upstream connector: a hyper client connector that dials one endpoint, whatever
//! the URI says, in plaintext, with TLS origination or with the mesh's mTLS.
//!
//! # Behaviour
//!
//! [`UpstreamConnector`] is a `tower::Service<Uri>` (hyper-util's `Connect`): every call
//! opens a TCP connection to the endpoint's address (`TCP_NODELAY` on) and secures it as
//! its [`UpstreamSecurity`] says, all within the connect timeout:
//!
//! - Istio mTLS ([`UpstreamConnector::istio`]): sends the destination host as SNI,
//!   presents the workload SVID and accepts only a server whose SPIFFE ID
//!   [`SecureNaming`] allows; the identity the server proved rides every response of
//!   the connection as [`UpstreamPeerIdentity`];
//! - TLS origination ([`Origination`]) or plaintext, chosen per endpoint from the
//!   DestinationRule `tls` and auto-mTLS (DR-50, SR-23..SR-25).
//!
//! A connection may first carry a PROXY protocol header and open an HTTP tunnel
//! ([`preface`](crate::preface); DestinationRule `proxyProtocol` and `tunnel`): both
//! happen on the TCP connection, before the TLS handshake, within the connect timeout.
//!
//! Every variant yields one connection type, [`UpstreamConn`], which tells hyper whether
//! `h2` was negotiated. [`Alpn::Http1`] offers only `http/1.1`: the connection for an
//! HTTP Upgrade, which h2 cannot carry. The choice is made once, when the connector is
//! built.
//!
//! # Layer placement
//!
//! Below the connection pool of one endpoint: `balancer -> endpoint HTTP client ->
//! UpstreamConnector -> TCP`.
//!
//! # Errors
//!
//! I/O errors: a refused or timed-out connection, or a handshake error naming why the
//! server was refused (see [`svid_error`](crate::svid_error)). The HTTP client that
//! drives the connector reports them as connect failures.
//!
//! # Example
//!
//! ```no_run
//! # fn demo(store: std::sync::Arc<mesh_tls::CertStore>) {
//! use std::time::Duration;
//! use mesh_tls::{Alpn, ClientTls, SecureNaming, UpstreamConnector};
//!
//! let connector = UpstreamConnector::istio(
//!     "10.0.0.7:8080".parse().unwrap(),
//!     "payment-service.production.svc.cluster.local",
//!     ClientTls::new(store),
//!     SecureNaming::AnyTrusted,
//! )
//! .unwrap()
//! .connect_timeout(Duration::from_secs(10))
//! .alpn(Alpn::Negotiate);
//! let client = hyper_util::client::legacy::Client::builder(
//!     hyper_util::rt::TokioExecutor::new(),
//! )
//! .build::<_, http_body_util::Empty<bytes::Bytes>>(connector);
//! # drop(client); }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use mesh_core::error::BoxError;
use mesh_core::extensions::UpstreamPeerIdentity;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::client::ClientTls;
use crate::origin::Origination;
use crate::preface::{ProxyHeader, Tunnel};
use crate::verify::{HandshakeError, SecureNaming};

/// The ALPN protocols a connector offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` and `http/1.1`; the server chooses.
    #[default]
    Negotiate,
    /// Only `http/1.1` (connections that carry an HTTP Upgrade).
    Http1,
    /// TCP: `istio-peer-exchange` and `istio` to a sidecar ([`crate::TCP_ALPN`]); none
    /// with TLS origination (the TCP stream is the application's own protocol).
    Tcp,
}

impl Alpn {
    pub(crate) fn protocols(self) -> &'static [&'static [u8]] {
        match self {
            Alpn::Negotiate => crate::ALPN,
            Alpn::Http1 => &[b"http/1.1"],
            Alpn::Tcp => crate::TCP_ALPN,
        }
    }
}

/// TCP keep-alive of upstream connections (DestinationRule `connectionPool.tcp.tcpKeepalive`):
/// each setting left `None` keeps the operating system's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`time`).
    pub time: Option<Duration>,
    /// Time between probes (`interval`).
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped (`probes`).
    pub probes: Option<u32>,
}

impl Keepalive {
    fn apply(&self, tcp: &TcpStream) -> std::io::Result<()> {
        let mut ka = socket2::TcpKeepalive::new();
        if let Some(t) = self.time {
            ka = ka.with_time(t);
        }
        if let Some(i) = self.interval {
            ka = ka.with_interval(i);
        }
        if let Some(p) = self.probes {
            ka = ka.with_retries(p);
        }
        socket2::SockRef::from(tcp).set_tcp_keepalive(&ka)
    }
}

/// When an upstream connection was opened, carried by the responses it answers (so that
/// a client can retire connections by age: `maxConnectionDuration`).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionOpened(pub tokio::time::Instant);

/// Default connect-plus-handshake timeout (Envoy's cluster `connect_timeout` in Istio).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server name that is neither a DNS name nor an IP address.
#[derive(Debug, thiserror::Error)]
#[error("invalid TLS server name {0:?}")]
pub struct InvalidServerName(String);

/// How an [`UpstreamConnector`] secures its connections.
#[derive(Clone, Debug)]
pub enum UpstreamSecurity {
    /// Plaintext: DestinationRule `tls.mode: DISABLE`, or auto-mTLS to an endpoint
    /// without a sidecar (DR-50, SR-23).
    Plaintext,
    /// TLS origination (`SIMPLE`, `MUTUAL`) sending `server_name` as SNI.
    Originate {
        /// The client configs.
        origination: Arc<Origination>,
        /// The SNI.
        server_name: ServerName<'static>,
    },
    /// Istio mTLS: the workload SVID, secure naming by `naming`, `server_name` as SNI
    /// (`ISTIO_MUTUAL`, or auto-mTLS to a sidecar).
    Istio {
        /// The workload's client TLS.
        tls: ClientTls,
        /// The identities the server may prove.
        naming: SecureNaming,
        /// The SNI.
        server_name: ServerName<'static>,
    },
    /// Every connection attempt fails with this reason: TLS settings that cannot be
    /// used (a missing file, no roots). The caller sees a connect failure (503 `UF`).
    Refuse(Arc<str>),
}

impl UpstreamSecurity {
    /// Whether connections are Istio mTLS, TLS or plaintext, as a short word for logs:
    /// `istio_mutual`, `tls`, `plaintext` or `refused`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Originate { .. } => "tls",
            Self::Istio { .. } => "istio_mutual",
            Self::Refuse(_) => "refused",
        }
    }
}

/// Connects to one endpoint in plaintext, with TLS origination or with Istio mTLS, as
/// the destination's DestinationRule `tls` and the endpoint's `tlsMode` decide; every
/// variant yields the same connection type, [`UpstreamConn`], so one HTTP client type
/// serves all endpoints.
///
/// It dials a fixed address whatever the URI says, sets `TCP_NODELAY`, bounds connect
/// plus handshake by the connect timeout, and chooses the ALPN protocols once, at
/// construction. Each connection carries a
/// [`ConnectionRequests`] counter (in hyper's connection extras) so that the client can
/// retire it after `maxRequestsPerConnection` requests.
#[derive(Clone, Debug)]
pub struct UpstreamConnector {
    address: SocketAddr,
    security: UpstreamSecurity,
    connect_timeout: Duration,
    alpn: Alpn,
    keepalive: Option<Keepalive>,
    /// Written first on every connection (DestinationRule `proxyProtocol`).
    proxy_header: Option<ProxyHeader>,
    /// Opened on every connection before TLS (DestinationRule `tunnel`).
    tunnel: Option<Arc<Tunnel>>,
}

impl UpstreamConnector {
    /// A connector to `address` secured by `security`.
    pub fn new(address: SocketAddr, security: UpstreamSecurity) -> Self {
        Self {
            address,
            security,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            alpn: Alpn::Negotiate,
            keepalive: None,
            proxy_header: None,
            tunnel: None,
        }
    }

    /// An Istio mTLS connector to `address`, sending `server_name` as SNI, presenting
    /// the SVID of `tls` and accepting the servers `naming` allows.
    pub fn istio(
        address: SocketAddr,
        server_name: &str,
        tls: ClientTls,
        naming: SecureNaming,
    ) -> Result<Self, InvalidServerName> {
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| InvalidServerName(server_name.to_owned()))?;
        Ok(Self::new(
            address,
            UpstreamSecurity::Istio {
                tls,
                naming,
                server_name,
            },
        ))
    }

    /// Sets the connect-plus-handshake timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Turns on TCP keep-alive with `keepalive` on every connection.
    pub fn keepalive(mut self, keepalive: Option<Keepalive>) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// Starts every connection with `header` (PROXY protocol), before anything else.
    #[must_use]
    pub fn proxy_header(mut self, header: Option<ProxyHeader>) -> Self {
        self.proxy_header = header;
        self
    }

    /// The PROXY protocol header every connection starts with.
    pub fn proxy_header_of(&self) -> Option<&ProxyHeader> {
        self.proxy_header.as_ref()
    }

    /// Opens `tunnel` on every connection (after the PROXY header, before TLS): the
    /// endpoint is an HTTP proxy and the connection's protocol runs inside the tunnel.
    #[must_use]
    pub fn tunnel(mut self, tunnel: Option<Arc<Tunnel>>) -> Self {
        self.tunnel = tunnel;
        self
    }

    /// Sets the ALPN protocols offered (TLS variants only).
    #[must_use]
    pub fn alpn(mut self, alpn: Alpn) -> Self {
        self.alpn = alpn;
        self
    }

    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// How connections are secured.
    pub fn security(&self) -> &UpstreamSecurity {
        &self.security
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamConn;
    type Error = BoxError;
    type Future = UpstreamConnecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> UpstreamConnecting {
        let inner = self.clone();
        UpstreamConnecting(Box::pin(async move {
            if let UpstreamSecurity::Refuse(reason) = &inner.security {
                return Err(std::io::Error::other(reason.to_string()).into());
            }
            let connect = async {
                let mut tcp = TcpStream::connect(inner.address).await?;
                let _ = tcp.set_nodelay(true);
                if let Some(keepalive) = &inner.keepalive {
                    keepalive.apply(&tcp)?;
                }
                if let Some(header) = &inner.proxy_header {
                    tcp.write_all(&header.encode()).await?;
                }
                if let Some(tunnel) = &inner.tunnel {
                    tunnel.open(&mut tcp).await?;
                }
                let (io, peer) = match &inner.security {
                    UpstreamSecurity::Plaintext | UpstreamSecurity::Refuse(_) => {
                        (UpstreamIo::Plain(TokioIo::new(tcp)), None)
                    }
                    UpstreamSecurity::Originate {
                        origination,
                        server_name,
                    } => {
                        let stream = TlsConnector::from(origination.config(inner.alpn))
                            .connect(server_name.clone(), tcp)
                            .await
                            .map_err(|e| std::io::Error::new(e.kind(), HandshakeError(e)))?;
                        (UpstreamIo::Tls(Box::new(TokioIo::new(stream))), None)
                    }
                    UpstreamSecurity::Istio {
                        tls,
                        naming,
                        server_name,
                    } => {
                        let (stream, leaf) = tls
                            .connect_to(tcp, server_name.clone(), naming, inner.alpn.protocols())
                            .await?;
                        (
                            UpstreamIo::Tls(Box::new(TokioIo::new(stream))),
                            Some(UpstreamPeerIdentity(leaf.identity)),
                        )
                    }
                };
                Ok::<_, std::io::Error>((io, peer))
            };
            let (io, peer) = tokio::time::timeout(inner.connect_timeout, connect)
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                })??;
            let h2 = match &io {
                UpstreamIo::Plain(_) => false,
                UpstreamIo::Tls(s) => s.inner().get_ref().1.alpn_protocol() == Some(b"h2"),
            };
            Ok(UpstreamConn {
                io,
                h2,
                peer,
                requests: ConnectionRequests::default(),
                opened: ConnectionOpened(tokio::time::Instant::now()),
            })
        }))
    }
}

/// The future of one connection attempt of an [`UpstreamConnector`] (one allocation per
/// connection, none per request).
pub struct UpstreamConnecting(Pin<Box<dyn Future<Output = Result<UpstreamConn, BoxError>> + Send>>);

impl std::fmt::Debug for UpstreamConnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnecting").finish_non_exhaustive()
    }
}

impl Future for UpstreamConnecting {
    type Output = Result<UpstreamConn, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// The number of requests a connection has answered, shared by every response of the
/// connection (hyper copies connection extras into each response's extensions).
#[derive(Clone, Debug, Default)]
pub struct ConnectionRequests(Arc<AtomicU32>);

impl ConnectionRequests {
    /// Counts one more answered request and returns the count so far.
    pub fn answered(&self) -> u32 {
        self.0.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }
}

#[derive(Debug)]
enum UpstreamIo {
    Plain(TokioIo<TcpStream>),
    // Boxed: a TLS session is much larger than a socket (one allocation per connection).
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

/// A connection made by an [`UpstreamConnector`]: plaintext or TLS, telling hyper
/// whether h2 was negotiated, which identity an Istio mTLS server proved, and carrying
/// the connection's [`ConnectionRequests`].
#[derive(Debug)]
pub struct UpstreamConn {
    io: UpstreamIo,
    h2: bool,
    peer: Option<UpstreamPeerIdentity>,
    requests: ConnectionRequests,
    opened: ConnectionOpened,
}

impl UpstreamConn {
    /// The ALPN protocol the server chose (TLS only).
    pub fn alpn(&self) -> Option<&[u8]> {
        match &self.io {
            UpstreamIo::Plain(_) => None,
            UpstreamIo::Tls(s) => s.inner().get_ref().1.alpn_protocol(),
        }
    }

    /// The identity an Istio mTLS server proved.
    pub fn peer(&self) -> Option<&mesh_core::Identity> {
        self.peer.as_ref().map(|p| &p.0)
    }

    /// Whether the connection is Istio mTLS.
    pub fn is_mutual(&self) -> bool {
        self.peer.is_some()
    }

    /// Whether the server chose `h2`.
    pub fn is_h2(&self) -> bool {
        self.h2
    }

    /// The TCP connection underneath (under TLS, if any): for socket options such as a
    /// reset on close when a client abandons the connection mid-request.
    pub fn tcp(&self) -> &TcpStream {
        match &self.io {
            UpstreamIo::Plain(io) => io.inner(),
            UpstreamIo::Tls(io) => io.inner().get_ref().0,
        }
    }
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        let mut connected = Connected::new()
            .extra(self.requests.clone())
            .extra(self.opened);
        if let Some(peer) = &self.peer {
            connected = connected.extra(peer.clone());
        }
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl hyper::rt::Read for UpstreamConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for UpstreamConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}
