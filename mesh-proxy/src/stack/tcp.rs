//! The TCP stacks: connections a workload opens to a service's TCP port, and mesh
//! connections it receives for its application, proxied as opaque bytes.
//!
//! # Outbound ([`TcpOutbound`])
//!
//! ```text
//! connection to host:port -> the host's TCP rule (VirtualService `tcp` route matching
//!   the port, `destinationSubnets` (the original destination under capture, else the
//!   listener's address) and `sourceSubnet` (the client's address), weighted; else the
//!   service's own TCP port) -> an endpoint (the
//!   destination's load balancer, skipping ejected endpoints)
//!   -> connect as the DestinationRule `tls` and auto-mTLS decide (Istio mTLS offers
//!      ALPN `istio-peer-exchange`, `istio`) -> metadata exchange when the server chose
//!      `istio-peer-exchange` -> bytes both ways, counted
//! ```
//!
//! # Inbound ([`TcpInbound`])
//!
//! ```text
//! mTLS connection that negotiated `istio-peer-exchange` or `istio` (PeerAuthentication
//!   applied at accept) -> metadata exchange (the peer's frame, then ours) ->
//!   AuthorizationPolicy on connection attributes (HTTP-only fields make ALLOW rules
//!   inert and DENY rules wider, ISTIO.md AP-30) -> the application's address -> bytes
//!   both ways, counted
//! ```
//!
//! # Passthrough ([`passthrough`])
//!
//! A captured connection to an address no service owns, under `ALLOW_ANY` (Istio's
//! `PassthroughCluster`): connected in plaintext to the original destination, bytes
//! both ways, recorded with `destination_service_name="PassthroughCluster"` and the
//! address as `destination_service`.
//!
//! Both sides record `istio_tcp_connections_opened_total`/`closed_total` and
//! `istio_tcp_sent_bytes_total`/`received_bytes_total` (bytes to and from the
//! downstream, counted as they pass) with the peer's workload labels from the exchange,
//! believed only from an mTLS peer of the namespace it claims.
//!
//! # Where we differ from Istio
//!
//! - One connection attempt per connection (Envoy's `tcp_proxy` default); a failed
//!   connect closes the downstream connection and counts against the endpoint in the
//!   destination's outlier detection, which the endpoint picks respect.
//! - Plaintext TCP into a PERMISSIVE or DISABLE port is not proxied (the inbound
//!   listener speaks HTTP to plaintext clients); TCP between sidecars is mTLS.
//! - Connections are not drained: they end when the process exits, as upgraded HTTP
//!   connections do.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_core::{ConnectionSecurity, Identity};
use mesh_routing::{L4Addresses, Router};
use mesh_telemetry::exchange::{self, TCP_EXCHANGE_ALPN};
use mesh_telemetry::{DestinationService, Reporter, TcpMetrics, Telemetry, Workload};
use mesh_tls::authz::{PolicyHandle, ServerName};
use mesh_tls::{Alpn, ConnectionContext};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tower::Service;

use super::destination::RouteService;

/// How long a peer has to send its metadata exchange frame.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The workload a peer's identity alone tells: its namespace and principal.
fn identified(peer: Option<&Identity>) -> Workload {
    let mut w = Workload::unknown();
    if let Some(id) = peer {
        w.namespace = id.namespace().unwrap_or_default().to_owned();
        w = w.with_principal(id.clone());
    }
    w
}

/// This proxy's exchange frame: its metadata, or an empty node when it has none (the
/// peer waits for a frame either way).
fn local_frame(telemetry: &Telemetry) -> bytes::Bytes {
    static EMPTY: std::sync::LazyLock<bytes::Bytes> = std::sync::LazyLock::new(|| {
        exchange::LocalMetadata::new(&exchange::NodeMetadata::default(), "unknown")
            .tcp_frame()
            .clone()
    });
    match telemetry.metadata_exchange() {
        Some(local) => local.tcp_frame().clone(),
        None => EMPTY.clone(),
    }
}

/// Reads the peer's frame; the peer's workload when the frame vouches for it.
async fn read_peer<R: AsyncRead + Unpin>(
    io: &mut R,
    peer: Option<&Identity>,
) -> Result<Option<Workload>, io::Error> {
    let node = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange::read_tcp_frame(io))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no metadata exchange frame"))?
        .map_err(io::Error::other)?;
    Ok(node.and_then(|node| exchange::verify(node, peer?)))
}

/// Connections a workload opens to one service `host:port`, routed and proxied (see the
/// module docs). Cheap to clone.
#[derive(Clone)]
pub struct TcpOutbound {
    router: Router<RouteService>,
    telemetry: Telemetry,
    host: Arc<str>,
    port: u16,
}

impl std::fmt::Debug for TcpOutbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpOutbound")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl TcpOutbound {
    /// Connections to `host` (as routes name it) on `port`.
    pub(crate) fn new(
        router: Router<RouteService>,
        telemetry: Telemetry,
        host: &str,
        port: u16,
    ) -> Self {
        Self {
            router,
            telemetry,
            host: Arc::from(host),
            port,
        }
    }

    /// Proxies `downstream` to the destination its route chooses, until either side
    /// closes. Errors are logged; the downstream connection is closed.
    pub async fn proxy(&self, downstream: TcpStream) {
        if let Err(e) = self.try_proxy(downstream, None).await {
            tracing::debug!(host = %self.host, port = self.port, error = %e, "TCP connection ended");
        }
    }

    /// Proxies `downstream`, a TLS connection whose ClientHello names `sni` (not
    /// terminated: its bytes go through unread), to the destination of the first
    /// VirtualService `tls` route that takes it on this port.
    pub async fn proxy_tls(&self, downstream: TcpStream, sni: &str) {
        if let Err(e) = self.try_proxy(downstream, Some(sni)).await {
            tracing::debug!(%sni, port = self.port, error = %e, "TLS connection ended");
        }
    }

    async fn try_proxy(&self, mut downstream: TcpStream, sni: Option<&str>) -> io::Result<()> {
        let snapshot = self.router.snapshot();
        let table = snapshot.table();
        let rule = match sni {
            Some(sni) => table.tls_rule(sni, self.port),
            None => table.tcp_rule_for(&self.host, self.port, &addresses(&downstream)),
        }
        .ok_or_else(|| io::Error::other("no TCP or TLS route"))?;
        let index = *rule.destinations.pick(&mut rand::rng());
        let (Some(target), Some(service)) = (snapshot.target(index), snapshot.service(index))
        else {
            return Err(io::Error::other("no such destination"));
        };
        // The destination's balancer picks (its policy, skipping endpoints outlier
        // detection ejected); connect failures are charged to the endpoint.
        let mut balance = service.balance().clone();
        let endpoints = target.endpoints();
        let endpoint = balance
            .choose(None)
            .and_then(|a| endpoints.iter().find(|e| e.address == a))
            .ok_or_else(|| io::Error::other(format!("no healthy endpoint for {}", target.key)))?;
        // The client and the address it connected to (the original destination when
        // captured), for DestinationRule `proxyProtocol`.
        #[cfg(feature = "proxy")]
        let original = crate::capture::original_destination(&downstream);
        #[cfg(not(feature = "proxy"))]
        let original = None;
        let to = original.or_else(|| downstream.local_addr().ok());
        let addresses = downstream.peer_addr().ok().zip(to);
        let mut connector = service.connector(endpoint, addresses).alpn(Alpn::Tcp);
        let conn = match connector.call(http::Uri::default()).await {
            Ok(conn) => conn,
            Err(e) => {
                balance.record(endpoint.address, &mesh_core::Outcome::ConnectFailure);
                return Err(io::Error::other(e));
            }
        };
        // Connected: the endpoint's local-origin streak ends (Envoy's
        // LocalOriginConnectSuccess).
        balance.record(
            endpoint.address,
            &mesh_core::Outcome::Response {
                status: 200,
                grpc_status: None,
            },
        );
        let exchanging = conn.alpn() == Some(TCP_EXCHANGE_ALPN);
        let server = conn.peer().cloned();
        let mut upstream = TokioIo::new(conn);
        let mut peer = identified(server.as_ref());
        if exchanging {
            upstream.write_all(&local_frame(&self.telemetry)).await?;
            if let Some(w) = read_peer(&mut upstream, server.as_ref()).await? {
                peer = w;
            }
        }
        let metrics = self.telemetry.metrics().istio().tcp(
            Reporter::Source,
            self.telemetry.workload(),
            &peer,
            &DestinationService::from_host(&target.key.host),
            ConnectionSecurity::Unknown,
        );
        splice(
            &mut downstream,
            &mut upstream,
            metrics,
            service.max_connection_duration(),
        )
        .await
    }
}

/// The addresses a `tcp` route's `destinationSubnets` and `sourceSubnet` see for
/// `downstream`: the original destination of a captured connection (else the address
/// the listener accepted it on) and the client's address.
fn addresses(downstream: &TcpStream) -> L4Addresses {
    #[cfg(feature = "proxy")]
    let original = crate::capture::original_destination(downstream);
    #[cfg(not(feature = "proxy"))]
    let original: Option<SocketAddr> = None;
    L4Addresses {
        destination: original
            .or_else(|| downstream.local_addr().ok())
            .map(|a| a.ip()),
        source: downstream.peer_addr().ok().map(|a| a.ip()),
    }
}

/// Proxies `downstream`, a captured connection to `destination` that no service owns,
/// to `destination` itself (see the module docs), connecting within `connect_timeout`.
pub async fn passthrough(
    mut downstream: TcpStream,
    destination: SocketAddr,
    telemetry: &Telemetry,
    connect_timeout: Duration,
) {
    let connected = tokio::time::timeout(connect_timeout, TcpStream::connect(destination)).await;
    let mut upstream = match connected {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            tracing::debug!(%destination, error = %e, "passthrough connect failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%destination, "passthrough connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let service = DestinationService {
        host: destination.ip().to_canonical().to_string(),
        name: "PassthroughCluster".to_owned(),
        namespace: String::new(),
    };
    let metrics = telemetry.metrics().istio().tcp(
        Reporter::Source,
        telemetry.workload(),
        &Workload::unknown(),
        &service,
        ConnectionSecurity::Unknown,
    );
    if let Err(e) = splice(&mut downstream, &mut upstream, metrics, None).await {
        tracing::debug!(%destination, error = %e, "passthrough connection ended");
    }
}

/// Mesh TCP connections to the application at one address (see the module docs).
#[derive(Clone)]
pub struct TcpInbound {
    app: SocketAddr,
    telemetry: Telemetry,
    authz: PolicyHandle,
    service: DestinationService,
}

impl std::fmt::Debug for TcpInbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpInbound")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

/// Whether a connection's ALPN protocol makes it TCP ([`mesh_tls::TCP_ALPN`]).
pub fn is_tcp(context: &ConnectionContext) -> bool {
    context
        .alpn
        .as_deref()
        .is_some_and(|p| mesh_tls::TCP_ALPN.contains(&p))
}

impl TcpInbound {
    /// Connections for the application at `app`, the local `service`.
    pub(crate) fn new(
        app: SocketAddr,
        telemetry: Telemetry,
        authz: PolicyHandle,
        service: DestinationService,
    ) -> Self {
        Self {
            app,
            telemetry,
            authz,
            service,
        }
    }

    /// Proxies an accepted mesh connection to the application, until either side
    /// closes; a denied connection is closed.
    pub async fn proxy<IO>(&self, io: IO, context: ConnectionContext)
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        if let Err(e) = self.try_proxy(io, &context).await {
            tracing::debug!(remote = %context.info.remote, error = %e, "inbound TCP connection ended");
        }
    }

    async fn try_proxy<IO>(&self, mut io: IO, context: &ConnectionContext) -> io::Result<()>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let caller = context.peer.as_ref().map(|p| &p.0);
        let mut peer = identified(caller);
        if context.alpn.as_deref() == Some(TCP_EXCHANGE_ALPN) {
            if let Some(w) = read_peer(&mut io, caller).await? {
                peer = w;
            }
            io.write_all(&local_frame(&self.telemetry)).await?;
        }
        let decision =
            self.authz
                .load()
                .evaluate_connection(caller, &context.info, ServerName::Unknown);
        if !decision.allowed {
            tracing::debug!(
                remote = %context.info.remote,
                policy = ?decision.policy,
                "TCP connection denied by AuthorizationPolicy"
            );
            return Ok(());
        }
        let metrics = self.telemetry.metrics().istio().tcp(
            Reporter::Destination,
            self.telemetry.workload(),
            &peer,
            &self.service,
            context.info.security,
        );
        let mut app = TcpStream::connect(self.app).await?;
        let _ = app.set_nodelay(true);
        splice(&mut io, &mut app, metrics, None).await
    }
}

/// Copies bytes both ways until both directions end, or until `max` has passed
/// (`maxConnectionDuration`: both sides are then closed), counting what `downstream`
/// sends and receives as it passes; the connection is counted opened and closed.
async fn splice<D, U>(
    downstream: &mut D,
    upstream: &mut U,
    metrics: TcpMetrics,
    max: Option<Duration>,
) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    metrics.opened();
    let mut counted = Counted {
        inner: downstream,
        metrics: &metrics,
    };
    let copy = tokio::io::copy_bidirectional(&mut counted, upstream);
    let result = match max {
        Some(max) => tokio::time::timeout(max, copy)
            .await
            .unwrap_or_else(|_| Err(io::Error::other("maxConnectionDuration reached"))),
        None => copy.await,
    };
    metrics.closed();
    result.map(|_| ())
}

/// The downstream side of a spliced connection: bytes read are received, bytes written
/// are sent.
struct Counted<'a, IO> {
    inner: &'a mut IO,
    metrics: &'a TcpMetrics,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<'_, IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.metrics.received(n as u64);
        }
        poll
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<'_, IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.metrics.sent(*n as u64);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
