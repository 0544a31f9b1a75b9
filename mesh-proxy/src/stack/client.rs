//! The one HTTP client every upstream path uses: to a mesh endpoint over mTLS, to a
//! host outside the mesh (ALLOW_ANY passthrough), and to the local application.
//!
//! # Behaviour
//!
//! [`HttpClient`] sends each request on a pooled connection made by its connector
//! (hyper-util's client: h2 when the connection negotiated it, HTTP/1.1 otherwise):
//!
//! - the target is made absolute (`http://<authority><path>`) from the URI, else the
//!   `Host` header, else the client's fixed authority ([`HttpClient::to_authority`]
//!   for the local application, whose requests keep their `Host`);
//! - hop-by-hop headers are removed from the request and the response;
//! - the response carries [`UpstreamHost`] (the address the client dialled);
//! - the workload's exchanged metadata (Istio's `x-envoy-peer-metadata` headers) goes
//!   only to Istio mTLS peers, never to a plaintext or TLS-originated upstream;
//! - a WebSocket upgrade goes on a dedicated HTTP/1.1 connection and, when (and only
//!   when) the answer is `101`, the two connections are spliced together;
//! - errors become mesh-core's leaf errors: a failed connect is [`ConnectFailure`]
//!   (503 `UF`), anything else after it [`UpstreamReset`] (503 `UC`);
//! - with a per-connection request limit (DestinationRule
//!   `connectionPool.http.maxRequestsPerConnection`, [`HttpClient::max_requests_per_connection`]),
//!   a connection is retired once it has answered that many requests;
//! - with a stream limit (`connectionPool.http.maxConcurrentStreams`,
//!   [`HttpClient::max_concurrent_streams`]), an HTTP/2 connection carries at most that
//!   many requests at once and a request that finds every connection full opens another
//!   (Envoy's `max_concurrent_streams` of the upstream HTTP/2 options).
//!
//! - with a PROXY protocol header (DestinationRule `proxyProtocol`,
//!   [`HttpClient::per_downstream`]), each downstream connection gets clients of its
//!   own, whose connections start with its header: a pooled connection never carries
//!   another client's requests under a header naming someone else.
//!
//! # Retiring connections after N requests
//!
//! hyper-util's pool has no such limit. Each connection of an [`UpstreamConnector`]
//! carries a [`ConnectionRequests`] counter in its connection extras, which hyper copies
//! into every response of the connection. When a response head arrives and the count
//! reaches the limit, the client poisons the connection through
//! [`capture_connection`]: hyper's pool then never hands it out again (`is_open` is
//! false) and drops it when the response finishes, which closes it. An HTTP/1.1
//! connection serves one request at a time, so exactly N requests use it; on an h2
//! connection, streams opened before the N-th response head may also finish on it
//! (Envoy counts at stream start). Counting at the response, not in a wrapper around
//! the I/O, keeps the count exact for HTTP/1.1 without parsing bytes.
//!
//! # Capping streams per HTTP/2 connection
//!
//! hyper-util's pool multiplexes every request for one authority on one HTTP/2
//! connection. Under a stream limit the client keeps shards: pools of their own, each
//! with its own connection, and a count of the streams open on it. A request takes the
//! first shard with room (a new shard, hence a new connection, when all are full) and
//! holds its place until the response body ends or is dropped. Shards stay once made;
//! their idle connections close after the idle timeout like any other.
//!
//! # Layer placement
//!
//! The innermost service: per endpoint under the balancer (outbound, gateway), after
//! authorization (inbound), or straight after routing for unknown hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector, capture_connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::{BoxError, ConnectFailure, ResetReason, UpstreamReset};
use mesh_core::extensions::{ConnectionInfo, UpstreamHost};
use mesh_tls::{Alpn, ConnectionOpened, ConnectionRequests, UpstreamConnector, UpstreamSecurity};
use tokio::time::Instant;

use super::headers::strip_hop_by_hop;

/// How the client's requests are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// As the connection negotiated (h2 by ALPN, else HTTP/1.1); the request's own
    /// version is translated.
    #[default]
    Negotiated,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c to a plaintext application).
    Http2,
    /// The request's own: HTTP/2 requests go as HTTP/2 (prior knowledge on plaintext),
    /// others as HTTP/1.1 (Envoy's `use_downstream_protocol`).
    Downstream,
}

/// Pooled connections from one connector, with an HTTP/1.1-only pool for upgrades.
#[derive(Clone, Debug)]
pub struct HttpClient<C> {
    client: Client<C, BoxBody>,
    upgrades: Client<C, BoxBody>,
    /// HTTP/2 connections for HTTP/2 requests under [`Protocol::Downstream`].
    h2: Option<Client<C, BoxBody>>,
    /// The address the connector dials (for [`UpstreamHost`]); `None` when it depends
    /// on the request (passthrough).
    address: Option<SocketAddr>,
    /// Every request goes to this authority (the local application), keeping its Host.
    authority: Option<Authority>,
    protocol: Protocol,
    /// Requests per connection; 0 is unlimited.
    max_requests_per_connection: u32,
    /// Age after which a connection takes no more requests.
    max_connection_duration: Option<Duration>,
    /// Whether the upstream is a mesh peer (Istio mTLS): only then does the workload's
    /// exchanged metadata go with the request.
    mesh_peer: bool,
    /// What new pools are made of: the connector and the idle timeout.
    connector: C,
    idle_timeout: Duration,
    /// Streams per HTTP/2 connection, for `client` (when it may speak HTTP/2).
    streams: Option<Arc<StreamLimit<C>>>,
    /// Streams per HTTP/2 connection, for `h2`.
    h2_streams: Option<Arc<StreamLimit<C>>>,
    /// Pools per downstream connection (DestinationRule `proxyProtocol`).
    by_downstream: Option<Arc<ByDownstream<C>>>,
}

/// The (client, local) addresses of a downstream connection.
type DownstreamKey = (SocketAddr, SocketAddr);

/// Clients per downstream connection: each connection of one carries that downstream
/// connection's PROXY header, so connections are never shared between clients (Envoy
/// keys its upstream pools by the downstream addresses when the header is on).
struct ByDownstream<C> {
    clients: Mutex<HashMap<DownstreamKey, (HttpClient<C>, Instant)>>,
    /// A client unused this long is forgotten (its pooled connections have closed).
    idle: Duration,
    make: Box<dyn Fn(SocketAddr, SocketAddr) -> HttpClient<C> + Send + Sync>,
}

impl<C: Clone> ByDownstream<C> {
    /// The client of the downstream connection `key`, made on first use.
    fn client(&self, key: DownstreamKey) -> HttpClient<C> {
        let now = Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((client, used)) = clients.get_mut(&key) {
            *used = now;
            return client.clone();
        }
        // Forget clients left idle: requests in flight keep their own clone.
        let idle = self.idle;
        clients.retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
        let client = (self.make)(key.0, key.1);
        clients.insert(key, (client.clone(), now));
        client
    }
}

impl<C> std::fmt::Debug for ByDownstream<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.clients.lock().map(|c| c.len()).unwrap_or_default();
        f.debug_struct("ByDownstream").field("clients", &n).finish()
    }
}

/// Pools of one client whose HTTP/2 connections carry at most `max` streams at once.
struct StreamLimit<C> {
    max: u32,
    /// The first is the client's own pool; more are made when all are full.
    shards: Mutex<Vec<Shard<C>>>,
    /// Makes the pool of a new shard.
    make: Box<dyn Fn() -> Client<C, BoxBody> + Send + Sync>,
}

struct Shard<C> {
    client: Client<C, BoxBody>,
    open: Arc<AtomicU32>,
}

/// One stream's place in a shard, given back when dropped.
#[derive(Debug)]
struct OpenStream(Arc<AtomicU32>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<C> std::fmt::Debug for StreamLimit<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards = self.shards.lock().map(|s| s.len()).unwrap_or_default();
        f.debug_struct("StreamLimit")
            .field("max", &self.max)
            .field("shards", &shards)
            .finish()
    }
}

impl<C: Clone> StreamLimit<C> {
    fn new(
        max: u32,
        first: Client<C, BoxBody>,
        make: impl Fn() -> Client<C, BoxBody> + Send + Sync + 'static,
    ) -> Self {
        Self {
            max,
            shards: Mutex::new(vec![Shard {
                client: first,
                open: Arc::new(AtomicU32::new(0)),
            }]),
            make: Box::new(make),
        }
    }

    /// The pool of the first shard with room, and the place taken in it.
    fn take(&self) -> (Client<C, BoxBody>, OpenStream) {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let room = shards
            .iter()
            .find(|s| s.open.load(Ordering::Acquire) < self.max);
        let shard = match room {
            Some(shard) => shard,
            None => {
                shards.push(Shard {
                    client: (self.make)(),
                    open: Arc::new(AtomicU32::new(0)),
                });
                let last = shards.len() - 1;
                &shards[last]
            }
        };
        // Counted under the lock: two requests never both take a shard's last place.
        shard.open.fetch_add(1, Ordering::AcqRel);
        (shard.client.clone(), OpenStream(shard.open.clone()))
    }
}

/// A pool of `connector`'s connections.
fn pool<C>(connector: C, idle_timeout: Duration, http2_only: bool) -> Client<C, BoxBody>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(http2_only)
        .build(connector)
}

impl<C> HttpClient<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// A client over `connector` (and `upgrade_connector` for WebSocket upgrades);
    /// idle pooled connections close after `idle_timeout`.
    pub fn new(
        connector: C,
        upgrade_connector: C,
        idle_timeout: Duration,
        protocol: Protocol,
    ) -> Self {
        let client = pool(connector.clone(), idle_timeout, protocol == Protocol::Http2);
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(upgrade_connector);
        let h2 =
            (protocol == Protocol::Downstream).then(|| pool(connector.clone(), idle_timeout, true));
        Self {
            client,
            upgrades,
            h2,
            address: None,
            authority: None,
            protocol,
            max_requests_per_connection: 0,
            max_connection_duration: None,
            mesh_peer: false,
            connector,
            idle_timeout,
            streams: None,
            h2_streams: None,
            by_downstream: None,
        }
    }

    /// Sends each request through a client of its own downstream connection (by the
    /// request's [`ConnectionInfo`]), made by `make(client address, local address)` and
    /// forgotten after `idle` unused; a request without one uses this client.
    #[must_use]
    pub fn per_downstream(
        mut self,
        idle: Duration,
        make: impl Fn(SocketAddr, SocketAddr) -> HttpClient<C> + Send + Sync + 'static,
    ) -> Self {
        self.by_downstream = Some(Arc::new(ByDownstream {
            clients: Mutex::new(HashMap::new()),
            idle,
            make: Box::new(make),
        }));
        self
    }

    /// Caps the streams of each HTTP/2 connection at `n` (0: no cap), opening another
    /// connection when every one is full. Requests sent as HTTP/1.1 are not affected.
    #[must_use]
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        if n == 0 {
            self.streams = None;
            self.h2_streams = None;
            return self;
        }
        let limit = |first: &Client<C, BoxBody>, http2_only: bool| {
            let (connector, idle) = (self.connector.clone(), self.idle_timeout);
            Arc::new(StreamLimit::new(n, first.clone(), move || {
                pool(connector.clone(), idle, http2_only)
            }))
        };
        // An HTTP/1.1-only pool has no streams to cap.
        self.streams = match self.protocol {
            Protocol::Http1 | Protocol::Downstream => None,
            Protocol::Http2 => Some(limit(&self.client, true)),
            Protocol::Negotiated => Some(limit(&self.client, false)),
        };
        self.h2_streams = self.h2.as_ref().map(|h2| limit(h2, true));
        self
    }

    /// Retires a connection once it has answered `n` requests (0: never). Needs a
    /// connector whose connections carry [`ConnectionRequests`] ([`UpstreamConnector`]);
    /// with others it has no effect.
    #[must_use]
    pub fn max_requests_per_connection(mut self, n: u32) -> Self {
        self.max_requests_per_connection = n;
        self
    }

    /// Retires a connection once a response completes after it has been open for `max`
    /// (`maxConnectionDuration`; with a connector whose connections carry
    /// [`ConnectionOpened`], as [`UpstreamConnector`]'s do).
    #[must_use]
    pub fn max_connection_duration(mut self, max: Option<Duration>) -> Self {
        self.max_connection_duration = max;
        self
    }

    /// Records `address` as the upstream host of every response.
    #[must_use]
    pub fn at(mut self, address: SocketAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// Sends every request to `address` whatever its authority (the request keeps its
    /// `Host`).
    #[must_use]
    pub fn to_authority(mut self, address: SocketAddr) -> Self {
        self.authority = Authority::try_from(address.to_string()).ok();
        self.address = Some(address);
        self
    }
}

impl HttpClient<UpstreamConnector> {
    /// The client of one endpoint over `connector`: Istio mTLS (h2 or HTTP/1.1 by ALPN),
    /// TLS origination or plaintext. To a TLS-originated or plaintext upstream, requests
    /// go as `protocol` says ([`upstream_protocol`]): HTTP/1.1 (TLS offering only
    /// `http/1.1`), HTTP/2 (h2c; TLS offering `h2` and `http/1.1`), or the request's own
    /// (TLS: HTTP/1.1). Upgrades go on HTTP/1.1-only connections.
    pub fn upstream(
        connector: UpstreamConnector,
        idle_timeout: Duration,
        protocol: Protocol,
    ) -> Self {
        let address = connector.address();
        let mesh_peer = matches!(connector.security(), UpstreamSecurity::Istio { .. });
        let tls = matches!(connector.security(), UpstreamSecurity::Originate { .. });
        let (connector, protocol) = match protocol {
            _ if mesh_peer => (connector, Protocol::Negotiated),
            Protocol::Http2 if tls => (connector.alpn(Alpn::Negotiate), Protocol::Negotiated),
            Protocol::Http2 => (connector, Protocol::Http2),
            Protocol::Downstream if !tls => (connector, Protocol::Downstream),
            _ => (connector.alpn(Alpn::Http1), Protocol::Http1),
        };
        let upgrades = connector.clone().alpn(Alpn::Http1);
        let mut client = Self::new(connector, upgrades, idle_timeout, protocol).at(address);
        client.mesh_peer = mesh_peer;
        client
    }
}

impl HttpClient<HttpConnector> {
    /// A plaintext client (`TCP_NODELAY`, `connect_timeout`).
    pub fn plaintext(
        connect_timeout: Duration,
        idle_timeout: Duration,
        protocol: Protocol,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        Self::new(http.clone(), http, idle_timeout, protocol)
    }

    /// The client of a local application at `app` (h2 with prior knowledge when `h2`).
    pub fn application(app: SocketAddr, h2: bool) -> Self {
        let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
        // Envoy's default idle timeout of upstream connections.
        Self::plaintext(Duration::from_secs(10), Duration::from_secs(3600), protocol)
            .to_authority(app)
    }
}

/// The HTTP version of requests to a non-mesh endpoint of a destination whose service
/// port is of class `port` under the DestinationRule's `connectionPool.http` (ISTIO.md
/// PS-20, first match wins): an `http2`/`grpc` port is HTTP/2; `useClientProtocol` keeps
/// the request's version; `h2UpgradePolicy: UPGRADE` is HTTP/2 and `DO_NOT_UPGRADE`
/// HTTP/1.1; a port of no declared protocol keeps the request's version; else HTTP/1.1
/// (the mesh default `DO_NOT_UPGRADE`). Endpoints with a sidecar negotiate by ALPN.
pub fn upstream_protocol(
    port: mesh_routing::PortProtocol,
    http: Option<&mesh_core::config::HttpSettings>,
) -> Protocol {
    use mesh_core::config::H2UpgradePolicy;
    use mesh_routing::PortProtocol;
    if port == PortProtocol::Http2 {
        return Protocol::Http2;
    }
    if http.and_then(|h| h.use_client_protocol) == Some(true) {
        return Protocol::Downstream;
    }
    match http.and_then(|h| h.h2_upgrade_policy) {
        Some(H2UpgradePolicy::Upgrade) => Protocol::Http2,
        Some(H2UpgradePolicy::DoNotUpgrade) => Protocol::Http1,
        _ if port == PortProtocol::Auto => Protocol::Downstream,
        _ => Protocol::Http1,
    }
}

/// Whether `req` asks for a WebSocket upgrade (the only Upgrade that is forwarded).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req
            .headers()
            .get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Maps a hyper client error to mesh-core's leaf errors.
pub(crate) fn upstream_error(e: hyper_util::client::legacy::Error) -> BoxError {
    if e.is_connect() {
        Box::new(ConnectFailure::new(e))
    } else {
        Box::new(UpstreamReset::new(
            ResetReason::ConnectionTermination,
            true,
            Some(Box::new(e)),
        ))
    }
}

/// Rewrites the request URI to `http://<authority><path>`: `fixed` when given, else the
/// URI's authority, else the Host header.
fn absolute(req: &mut Request<BoxBody>, fixed: Option<&Authority>) {
    let authority = fixed
        .cloned()
        .or_else(|| req.uri().authority().cloned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<Authority>().ok())
        });
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The response future of [`HttpClient`]: one allocation per request, beside the
/// request and connection state hyper allocates anyway.
pub type ResponseFuture =
    futures_util::future::BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

impl<C> tower::Service<Request<BoxBody>> for HttpClient<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: hyper's pool waits for or opens a connection per request.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> ResponseFuture {
        if let Some(by) = &self.by_downstream
            && let Some(info) = req.extensions().get::<ConnectionInfo>()
        {
            return by.client((info.remote, info.local)).call(req);
        }
        strip_hop_by_hop(req.headers_mut());
        if !self.mesh_peer {
            // A plaintext or TLS-originated upstream has no sidecar to read the
            // workload's metadata: it does not leave the mesh.
            req.headers_mut()
                .remove(mesh_telemetry::exchange::PEER_METADATA);
            req.headers_mut()
                .remove(mesh_telemetry::exchange::PEER_METADATA_ID);
        }
        absolute(&mut req, self.authority.as_ref());
        let address = self.address;
        let upgrade = is_upgrade(&req);
        if upgrade {
            *req.version_mut() = Version::HTTP_11;
        } else {
            match self.protocol {
                Protocol::Negotiated => {}
                Protocol::Http1 => *req.version_mut() = Version::HTTP_11,
                Protocol::Http2 => *req.version_mut() = Version::HTTP_2,
                Protocol::Downstream if req.version() == Version::HTTP_2 => {}
                Protocol::Downstream => *req.version_mut() = Version::HTTP_11,
            }
        }
        let downstream = if upgrade {
            req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let limit = self.max_requests_per_connection;
        let max_age = self.max_connection_duration;
        let captured =
            ((limit > 0 || max_age.is_some()) && !upgrade).then(|| capture_connection(&mut req));
        let h2 = self.h2.is_some() && req.version() == Version::HTTP_2;
        let (fut, stream) = match (&self.streams, &self.h2_streams) {
            _ if upgrade => (self.upgrades.request(req), None),
            (_, Some(limit)) if h2 => {
                let (client, stream) = limit.take();
                (client.request(req), Some(stream))
            }
            (Some(limit), _) if !h2 => {
                let (client, stream) = limit.take();
                (client.request(req), Some(stream))
            }
            _ => match &self.h2 {
                Some(h2_client) if h2 => (h2_client.request(req), None),
                _ => (self.client.request(req), None),
            },
        };
        Box::pin(async move {
            let mut res = fut.await.map_err(upstream_error)?;
            let requests = res.extensions_mut().remove::<ConnectionRequests>();
            let opened = res.extensions_mut().remove::<ConnectionOpened>();
            let spent = requests.is_some_and(|r| limit > 0 && r.answered() >= limit);
            let aged = max_age
                .zip(opened)
                .is_some_and(|(max, o)| o.0.elapsed() >= max);
            if let Some(captured) = captured
                && (spent || aged)
                && let Some(connection) = captured.connection_metadata().as_ref()
            {
                // Not reused after this response; hyper's pool closes it once idle.
                connection.poison();
            }
            match downstream {
                Some(downstream) if res.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                    splice(downstream, hyper::upgrade::on(&mut res));
                }
                _ => strip_hop_by_hop(res.headers_mut()),
            }
            if let Some(address) = address {
                res.extensions_mut().insert(UpstreamHost(address));
            }
            // The stream stays open, and its place taken, until the body ends.
            Ok(match stream {
                Some(stream) => {
                    res.map(|b| body::boxed(mesh_resilience::body::GuardBody::new(b, Some(stream))))
                }
                None => res.map(body::boxed),
            })
        })
    }
}

/// Copies bytes both ways between an upgraded downstream and upstream connection.
fn splice(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
            return;
        };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::stack::test_request as req;
    use mesh_core::config::{H2UpgradePolicy, HttpSettings};
    use mesh_routing::PortProtocol;

    #[test]
    fn upstream_http_version_follows_istios_order() {
        let http = |use_client: Option<bool>, upgrade: Option<H2UpgradePolicy>| HttpSettings {
            use_client_protocol: use_client,
            h2_upgrade_policy: upgrade,
            ..HttpSettings::default()
        };
        let up = Some(H2UpgradePolicy::Upgrade);
        let no = Some(H2UpgradePolicy::DoNotUpgrade);
        let default = Some(H2UpgradePolicy::Default);
        for (port, settings, want) in [
            // An http2/grpc port is HTTP/2 whatever the rule says.
            (
                PortProtocol::Http2,
                Some(http(Some(true), no)),
                Protocol::Http2,
            ),
            (
                PortProtocol::Http,
                Some(http(Some(true), up)),
                Protocol::Downstream,
            ),
            (PortProtocol::Http, Some(http(None, up)), Protocol::Http2),
            (PortProtocol::Auto, Some(http(None, no)), Protocol::Http1),
            (PortProtocol::Auto, None, Protocol::Downstream),
            (PortProtocol::Http, None, Protocol::Http1),
            (
                PortProtocol::Http,
                Some(http(None, default)),
                Protocol::Http1,
            ),
        ] {
            assert_eq!(
                upstream_protocol(port, settings.as_ref()),
                want,
                "{port:?} {settings:?}"
            );
        }
    }

    #[test]
    fn absolute_uri_takes_the_host_header_and_keeps_the_path() {
        let mut r = req("/pay?x=1", Some("payment-service"));
        absolute(&mut r, None);
        assert_eq!(r.uri(), "http://payment-service/pay?x=1");
    }

    #[test]
    fn a_fixed_authority_wins_and_host_is_kept() {
        let fixed = Authority::from_static("127.0.0.1:1");
        let mut r = req("http://payment-service/pay", Some("payment-service"));
        absolute(&mut r, Some(&fixed));
        assert_eq!(r.uri(), "http://127.0.0.1:1/pay");
        assert_eq!(r.headers()[http::header::HOST], "payment-service");
        let mut r = req("/", None);
        absolute(&mut r, Some(&fixed));
        assert_eq!(r.uri(), "http://127.0.0.1:1/");
    }
}
