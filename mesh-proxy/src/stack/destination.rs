//! The per-destination and per-route stacks of the outbound path, built when a route
//! table is compiled and kept by the router across reloads.
//!
//! # Layer placement
//!
//! ```text
//! router -> per (route, destination) [RouteService]: retry (route retries, gated by
//!   the destination's maxRetries, and the route timeout as the deadline over them all)
//!     -> per destination [DestService]: pool limits (DestinationRule connectionPool)
//!       -> balancer (loadBalancer, outlierDetection) -> per endpoint: HttpClient over
//!          Istio mTLS, TLS or plaintext (DestinationRule tls, auto-mTLS: [`super::upstream`])
//! ```
//!
//! Nothing here is built per request: the route part is built by
//! [`MakeDestination::route`] for every (route policy, destination) pair when the table
//! is compiled (and again on every reload), the destination part by
//! [`MakeDestination::make`] once per destination, and rebuilt only when its
//! DestinationRule policy changes ([`MakeDestination::policy_changed`]: balancer and pool
//! state start over). Endpoint changes (reloads, DNS refreshes) reach the balancer with
//! a lock-free pointer check per request; the balancer keeps the state of the endpoints
//! that remain.
//!
//! Readiness is forwarded: the pool limit reserves its permit in `poll_ready`, which the
//! router's response future drives before calling, so a full pool makes requests wait
//! (up to `http1MaxPendingRequests`) or overflow with 503 `UO`.
//!
//! Each endpoint's connector is chosen by [`UpstreamTls`]: with no DestinationRule
//! `tls`, Istio mTLS to endpoints with a sidecar and plaintext to the others (auto-mTLS);
//! otherwise as the rule says. Over Istio mTLS the peer's identity is verified against
//! the endpoint's identities (ServiceEntry `serviceAccount`); an endpoint without any
//! accepts any identity of a trusted domain. `connectionPool.http.maxRequestsPerConnection`
//! retires a connection after that many requests (see [`super::client`]).
//!
//! The rule's `trafficPolicy.retryBudget` replaces the destination's `maxRetries` gate in
//! every route's retry layer: retries in flight stay under the budget's share of the
//! destination's active (in-flight plus waiting) requests, with its floor.
//! `proxyProtocol` starts every connection with a PROXY header naming the downstream
//! connection (HTTP clients are then kept per downstream connection, see
//! [`HttpClient::per_downstream`]); `tunnel` opens an HTTP CONNECT tunnel through each
//! endpoint to the target before the connection's own protocol (mesh-tls `preface`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use mesh_core::Endpoint;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::ProxyProtocolVersion as ProxyVersion_;
use mesh_core::error::BoxError;
use mesh_core::extensions::{RoutePolicy, RoutedService};
use mesh_resilience::deadline::DeadlineLayer;
use mesh_resilience::limit::PoolLimit;
use mesh_resilience::retry::{ConcurrentRetryBudget, Retry};
use mesh_resilience::{
    Balance, LbConfig, OutlierConfig, PoolLimitLayer, PoolLimits, RetryGate, RetryLayer,
    RetryPolicy,
};
use mesh_routing::{DestinationKey, MakeDestination, Target};
use mesh_tls::{ClientTls, ProxyHeader, ProxyVersion, Tunnel, TunnelMethod, UpstreamConnector};
use tower::{Layer, Service};

use super::client::HttpClient;
use super::upstream::{TcpPool, UpstreamTls};

/// The service of one endpoint.
pub type Upstream = HttpClient<UpstreamConnector>;

/// What `/clusters` shows of one destination.
#[derive(Clone)]
pub struct DestinationState {
    /// The destination.
    pub key: DestinationKey,
    /// Its balancer (endpoints, ejection, in-flight counts).
    pub balance: Balance<Upstream>,
    /// Its pool limits.
    pub pool: PoolLimitLayer,
    target: Weak<Target>,
}

/// The live destinations, for an admin view.
#[derive(Clone, Default)]
pub struct Destinations(Arc<Mutex<HashMap<DestinationKey, DestinationState>>>);

impl Destinations {
    /// The destinations still in use, sorted by name.
    pub fn list(&self) -> Vec<DestinationState> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, d| d.target.strong_count() > 0);
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by_key(|d| d.key.to_string());
        v
    }
}

/// Builds the per-destination and per-route stacks for the router.
#[derive(Clone)]
pub struct MakeDest {
    /// Client TLS (the workload's SVID), for Istio mTLS.
    pub tls: ClientTls,
    /// Upstream connect plus handshake timeout.
    pub connect_timeout: Duration,
    /// Replay limit for retried request bodies.
    pub replay_limit: usize,
    /// Idle timeout of pooled upstream connections when no DestinationRule sets one.
    pub idle_timeout: Duration,
    /// Body sizes and stream timers of every request (settings `limits`).
    pub stream_limits: super::client::StreamLimits,
    /// Where the destinations are listed for the admin view.
    pub destinations: Destinations,
    /// The credentials directory DestinationRule `tls.credentialName` is read from
    /// (gateways); `None`: not read.
    pub credentials: Option<Arc<std::path::Path>>,
    /// Where the proxy runs (locality-aware balancing, networks).
    pub origin: mesh_resilience::Origin,
}

/// One destination: pool limits around the balancer.
///
/// Cheap to clone (the balancer, pool state and target are shared); a clone starts
/// without a pool reservation.
#[derive(Clone)]
pub struct DestService {
    inner: PoolLimit<Balance<Upstream>>,
    gate: RetryGate,
    /// DestinationRule `retryBudget`, which replaces `gate` when set.
    budget: Option<ConcurrentRetryBudget>,
    target: Arc<Target>,
    balance: Balance<Upstream>,
    synced: Arc<ArcSwap<Vec<Endpoint>>>,
    connecting: Arc<Connecting>,
}

/// How a destination's connections are made, decided once per destination from its
/// DestinationRule (`tls`, `connectionPool.tcp`): HTTP and TCP traffic share it.
struct Connecting {
    tls: UpstreamTls,
    connect_timeout: Duration,
    tcp: TcpPool,
    /// `proxyProtocol.version`: each connection starts with a PROXY header.
    proxy_protocol: Option<ProxyVersion>,
    /// `tunnel`: each connection is an HTTP tunnel through the endpoint.
    tunnel: Option<Arc<Tunnel>>,
}

impl Connecting {
    /// A connector to `ep` with its transport, connect timeout, keep-alive and tunnel.
    fn connector(&self, ep: &Endpoint) -> UpstreamConnector {
        UpstreamConnector::new(ep.address, self.tls.security(ep))
            .connect_timeout(self.connect_timeout)
            .keepalive(self.tcp.keepalive)
            .tunnel(self.tunnel.clone())
    }

    /// The PROXY header of connections made for a downstream connection from `client`
    /// to `local`, when the rule asks for one.
    fn proxy_header(&self, downstream: Option<(SocketAddr, SocketAddr)>) -> Option<ProxyHeader> {
        let version = self.proxy_protocol?;
        let (source, destination) = downstream?;
        Some(ProxyHeader {
            version,
            source,
            destination,
        })
    }
}

/// DestinationRule `tunnel` as the connector's [`Tunnel`] (validation refuses a rule
/// without `targetHost` or with a bad port or protocol).
fn tunnel_of(t: &mesh_core::config::TunnelSettings) -> Option<Arc<Tunnel>> {
    let method = match t.protocol.as_deref() {
        None | Some("CONNECT") => TunnelMethod::Connect,
        Some("POST") => {
            tracing::warn!(
                target_host = %t.target_host,
                "tunnel protocol POST is not supported; connections through it fail (use CONNECT)"
            );
            TunnelMethod::Post
        }
        Some(_) => return None,
    };
    let port = u16::try_from(t.target_port).ok().filter(|p| *p != 0)?;
    (!t.target_host.is_empty()).then(|| {
        Arc::new(Tunnel {
            method,
            host: t.target_host.clone(),
            port,
        })
    })
}

impl DestService {
    /// Hands the target's endpoints to the balancer when they changed since the last
    /// request (a pointer comparison; no lock).
    fn sync(&self) {
        let now = self.target.endpoints();
        if !Arc::ptr_eq(&now, &self.synced.load()) {
            self.balance.update(now.iter().cloned());
            self.synced.store(Arc::clone(&now));
        }
    }
}

impl Service<Request<BoxBody>> for DestService {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = futures_util::future::MapOk<
        <PoolLimit<Balance<Upstream>> as Service<Request<BoxBody>>>::Future,
        fn(
            <PoolLimit<Balance<Upstream>> as Service<Request<BoxBody>>>::Response,
        ) -> Response<BoxBody>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        use futures_util::TryFutureExt;
        self.sync();
        self.inner
            .call(req)
            .map_ok(|res: Response<_>| res.map(body::boxed))
    }
}

/// What the router holds per (route, destination): the route's deadline and retries
/// around the destination's service, built when the table is compiled.
#[derive(Clone)]
pub struct RouteService {
    destination: DestService,
    /// The retry layer applies the route's deadline itself: one future and one timer
    /// per request instead of a deadline layer's around it.
    stack: Retry<DestService>,
    /// The route's `retries.retryRemoteLocalities`.
    remote_retries: bool,
}

impl RouteService {
    /// The destination's balancer (endpoints, outlier detection), with the target's
    /// current endpoints.
    pub(crate) fn balance(&self) -> &Balance<Upstream> {
        self.destination.sync();
        &self.destination.balance
    }

    /// A connector to `ep` as the destination's rule says (transport, connect timeout,
    /// keep-alive), for traffic that connects by itself (TCP).
    /// `downstream` is the (client, local) address pair of the connection carried, for
    /// the PROXY header of DestinationRule `proxyProtocol`.
    pub(crate) fn connector(
        &self,
        ep: &Endpoint,
        downstream: Option<(SocketAddr, SocketAddr)>,
    ) -> UpstreamConnector {
        let connecting = &self.destination.connecting;
        connecting
            .connector(ep)
            .proxy_header(connecting.proxy_header(downstream))
    }

    /// The destination's `maxConnectionDuration`.
    pub(crate) fn max_connection_duration(&self) -> Option<Duration> {
        self.destination.connecting.tcp.max_connection_duration
    }

    /// `policy` around `destination`.
    fn new(policy: Option<&RoutePolicy>, destination: DestService, replay_limit: usize) -> Self {
        let retry = match policy {
            // A destination outside any route (a mirror): sent once.
            None => RetryPolicy::disabled(),
            Some(p) => RetryPolicy::from_route(p.retries.as_deref(), p.timeout)
                .unwrap_or_else(|e| {
                    tracing::warn!("{e}; using the default retry policy");
                    RetryPolicy::istio_default()
                })
                .replay_limit(replay_limit),
        };
        let retry = RetryLayer::new(retry);
        let retry = match &destination.budget {
            Some(budget) => retry.with_concurrent_budget(budget.clone()),
            None => retry.with_retry_gate(destination.gate.clone()),
        };
        let remote_retries = policy
            .and_then(|p| p.retries.as_deref())
            .is_some_and(|r| r.retry_remote_localities == Some(true));
        let deadline = DeadlineLayer::new(policy.and_then(|p| p.timeout));
        Self {
            stack: retry.with_deadline(deadline).layer(destination.clone()),
            destination,
            remote_retries,
        }
    }
}

impl Service<Request<BoxBody>> for RouteService {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = <Retry<DestService> as Service<Request<BoxBody>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        if let Some(slot) = req.extensions().get::<RoutedService>() {
            slot.set(&self.destination.target.key.host);
        }
        if self.remote_retries {
            // Every attempt carries it; the balancer reads it on retries only.
            req.extensions_mut()
                .insert(mesh_resilience::RetryRemoteLocalities);
        }
        self.stack.call(req)
    }
}

impl MakeDest {
    /// Balancer and pool limits for `target` under its current policy.
    fn build(&self, target: &Arc<Target>) -> DestService {
        let policy = target.policy();
        let lb = policy
            .load_balancer
            .as_ref()
            .and_then(|lb| match LbConfig::try_from(lb) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(destination = %target.key, "{e}");
                    None
                }
            })
            .unwrap_or_default()
            .with_origin(self.origin.clone());
        let outlier = policy.outlier_detection.as_ref().map(OutlierConfig::from);
        let limits = policy
            .connection_pool
            .as_ref()
            .map(PoolLimits::from)
            .unwrap_or_default();
        let dr_idle = policy.connection_pool.as_ref().is_some_and(|cp| {
            cp.tcp.as_ref().is_some_and(|t| t.idle_timeout.is_some())
                || cp.http.as_ref().is_some_and(|h| h.idle_timeout.is_some())
        });
        let idle = if dr_idle {
            limits.idle_timeout
        } else {
            self.idle_timeout
        };
        let tcp = TcpPool::of(&policy);
        let connecting = Arc::new(Connecting {
            tls: UpstreamTls::new(policy.tls.as_ref(), &target.key.host, self.tls.clone())
                .credentials(policy.tls.as_ref(), self.credentials.as_deref()),
            connect_timeout: tcp.connect_timeout.unwrap_or(self.connect_timeout),
            tcp,
            proxy_protocol: policy.proxy_protocol.as_ref().map(|pp| match pp.version {
                Some(ProxyVersion_::V2) => ProxyVersion::V2,
                Some(ProxyVersion_::V1) | None => ProxyVersion::V1,
            }),
            tunnel: policy.tunnel.as_ref().and_then(tunnel_of),
        });
        let per_connection = limits.max_requests_per_connection;
        let http = policy
            .connection_pool
            .as_ref()
            .and_then(|cp| cp.http.as_ref());
        let protocol = super::client::upstream_protocol(target.protocol(), http);
        // Zero (or negative, refused by validation) is unset (DR-20).
        let streams = http
            .and_then(|h| h.max_concurrent_streams)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        let for_endpoints = Arc::clone(&connecting);
        let stream_limits = self.stream_limits;
        let balance = Balance::new(lb, outlier, move |ep: &Endpoint| {
            let connecting = Arc::clone(&for_endpoints);
            let client = move |connector: UpstreamConnector| {
                HttpClient::upstream(connector, idle, protocol)
                    .stream_limits(stream_limits)
                    .max_requests_per_connection(per_connection)
                    .max_connection_duration(connecting.tcp.max_connection_duration)
                    .max_concurrent_streams(streams)
            };
            let connector = for_endpoints.connector(ep);
            match for_endpoints.proxy_protocol {
                // Pools per downstream connection, each connection with its header.
                Some(version) => {
                    let base = connector.clone();
                    client(connector).per_downstream(idle, move |source, destination| {
                        client(base.clone().proxy_header(Some(ProxyHeader {
                            version,
                            source,
                            destination,
                        })))
                    })
                }
                None => client(connector),
            }
        });
        let endpoints = target.endpoints();
        balance.update(endpoints.iter().cloned());
        let pool = PoolLimitLayer::new(limits);
        let budget = policy.retry_budget.as_ref().map(|rb| {
            let active = pool.clone();
            ConcurrentRetryBudget::new(
                rb.percent.unwrap_or(ConcurrentRetryBudget::DEFAULT_PERCENT),
                rb.min_retry_concurrency
                    .unwrap_or(ConcurrentRetryBudget::DEFAULT_MIN_CONCURRENCY),
                move || active.in_flight() + active.pending(),
            )
        });
        self.destinations
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                target.key.clone(),
                DestinationState {
                    key: target.key.clone(),
                    balance: balance.clone(),
                    pool: pool.clone(),
                    target: Arc::downgrade(target),
                },
            );
        DestService {
            inner: pool.layer(balance.clone()),
            gate: pool.retry_gate(),
            budget,
            target: Arc::clone(target),
            balance,
            synced: Arc::new(ArcSwap::new(endpoints)),
            connecting,
        }
    }
}

impl MakeDestination for MakeDest {
    type Service = RouteService;

    fn make(&self, target: &Arc<Target>) -> RouteService {
        RouteService::new(None, self.build(target), self.replay_limit)
    }

    fn route(
        &self,
        policy: &Arc<RoutePolicy>,
        destination: &RouteService,
        _target: &Arc<Target>,
    ) -> RouteService {
        RouteService::new(
            Some(policy),
            destination.destination.clone(),
            self.replay_limit,
        )
    }

    fn routes_apply_policy(&self) -> bool {
        true
    }

    fn policy_changed(
        &self,
        _service: &RouteService,
        target: &Arc<Target>,
    ) -> Option<RouteService> {
        tracing::info!(destination = %target.key, "traffic policy changed");
        Some(self.make(target))
    }
}
