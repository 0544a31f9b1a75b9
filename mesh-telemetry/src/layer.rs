//! [`TelemetryLayer`]: records metrics, latency, a span and an access-log entry for every
//! request, at stream end.
//!
//! # Behaviour
//!
//! On the way in, the layer keeps or generates `x-request-id`, extracts the trace context,
//! starts this hop's span (a child of the incoming span), decides sampling and rewrites
//! the trace headers for the next hop. The request body is wrapped to count its bytes.
//! When the response head arrives, its status, `grpc-status`, the [`ResponseFlags`] that
//! inner layers left in the response extensions and the [`UpstreamHost`] are noted, and
//! the response body is wrapped. When that body ends (or trailers arrive, or it errors,
//! or the client goes away: flag `DC`, and `response_code="0"` when that happens before the
//! response head), one record is written: Istio metrics through the target's pre-resolved
//! [`MetricsHandle`], the HdrHistogram of the destination, the access log and, if sampled,
//! a span to the export queue. None of these waits.
//!
//! An error from the inner service is classified once ([`crate::classify_error`] over
//! mesh-core's [`mesh_core::Outcome`]): the record carries the status the proxy will answer
//! with (503 `UO`, 504 `UT`, 503 `UH`, 404 `NR`, …) and the error is passed on unchanged.
//!
//! Sizes follow Envoy's wire accounting (ISTIO.md §8 item 4): `istio_request_bytes` and
//! `istio_response_bytes` are the header block as HTTP/1.1 would frame it plus body bytes;
//! the access log's `BYTES_RECEIVED`/`BYTES_SENT` are body bytes, as in Envoy.
//!
//! # Layer placement
//!
//! Outbound (`reporter="source"`): outermost, before routing, so it sees every local
//! reply (no route, fault aborts, overflow, timeouts). Inbound (`reporter="destination"`):
//! after the TLS accept path put [`PeerIdentity`] and [`ConnectionInfo`] in the request
//! extensions, before authorization.
//!
//! # Errors
//!
//! The inner error is converted into a [`BoxError`] and returned as is.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use mesh_core::body::{self, BoxBody};
//! use mesh_telemetry::{DestinationService, Telemetry, TelemetryLayer, Workload};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let telemetry = Telemetry::builder(Workload::new("productpage-v1", "default")).build();
//! let svc = ServiceBuilder::new()
//!     .layer(TelemetryLayer::outbound(
//!         &telemetry,
//!         DestinationService::from_host("reviews.default.svc.cluster.local"),
//!         Workload::unknown(),
//!     ))
//!     .service_fn(|_req: Request<_>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(body::full("ok")))
//!     });
//! let res = svc.oneshot(Request::new(body::empty())).await.unwrap();
//! http_body_util::BodyExt::collect(res.into_body()).await.unwrap();
//! assert!(telemetry.encode_metrics().contains("istio_requests_total{reporter=\"source\""));
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use bytes::Buf;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use mesh_core::extensions::{
    ConnectionInfo, PeerIdentity, RoutedService, UpstreamHost, UpstreamPeerIdentity, response_flags,
};
use mesh_core::{BoxError, ConnectionSecurity, Identity, ResponseFlags};
use pin_project::{pin_project, pinned_drop};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::access_log::{AccessEntry, AccessLog};
use crate::exchange::{self, LocalMetadata, PeerWorkload};
use crate::grpc::MessageCounter;
use crate::latency::{LatencyHandle, LatencyStats};
use crate::metrics::{
    DestinationService, MetricsHandle, MetricsRegistry, Reporter, RequestFacts, Workload,
    classify_error,
};
use crate::policy::{Attributes, TagSource, TelemetryPolicy};
use crate::trace::export::{ExportCounters, SpanKind, SpanQueue, SpanRecord};
use crate::trace::{self, Formats, HopContext, Propagator, Sampler};
use arc_swap::ArcSwapOption;

/// `x-envoy-upstream-service-time`, looked up by a constant name (a `&str` is parsed
/// first).
static UPSTREAM_SERVICE_TIME: http::HeaderName =
    http::HeaderName::from_static("x-envoy-upstream-service-time");

struct Shared {
    workload: Workload,
    exchange: Option<LocalMetadata>,
    metrics: MetricsRegistry,
    latency: LatencyStats,
    propagator: Propagator,
    spans: Option<SpanQueue>,
    access_log: Option<AccessLog>,
    /// Where a Telemetry resource that turns access logging on writes when `access_log`
    /// is not set (Istio's `envoy` provider: standard output).
    standby_log: Option<AccessLog>,
    /// The Telemetry API policy in force; `None`: the settings alone.
    policy: ArcSwapOption<ActivePolicy>,
    generation: AtomicU64,
}

/// A policy and its generation (series caches keyed by it start over when it changes).
struct ActivePolicy {
    generation: u64,
    policy: TelemetryPolicy,
}

/// The telemetry of one proxy (or one embedding application): metric registry, latency
/// histograms, trace settings, span export queue and access log. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("workload", &self.shared.workload.name)
            .field("sampling", &self.shared.propagator.sampler.as_percent())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Telemetry`].
#[derive(Debug)]
pub struct TelemetryBuilder {
    workload: Workload,
    exchange: Option<LocalMetadata>,
    metrics: Option<MetricsRegistry>,
    propagator: Propagator,
    spans: Option<SpanQueue>,
    access_log: Option<AccessLog>,
    standby_log: Option<AccessLog>,
}

impl TelemetryBuilder {
    /// Uses this registry (to share it with other code or set a series bound).
    #[must_use]
    pub fn metrics(mut self, metrics: MetricsRegistry) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Samples `percent` % of new traces (Istio `traceSampling`; default 1).
    #[must_use]
    pub fn sampling(mut self, percent: f64) -> Self {
        self.propagator.sampler = Sampler::percent(percent);
        self
    }

    /// Trace header formats to write downstream.
    #[must_use]
    pub fn formats(mut self, formats: Formats) -> Self {
        self.propagator.formats = formats;
        self
    }

    /// Exports sampled spans through `queue`.
    #[must_use]
    pub fn spans(mut self, queue: SpanQueue) -> Self {
        self.spans = Some(queue);
        self
    }

    /// Takes part in Istio's metadata exchange ([`crate::exchange`]) with this proxy's
    /// metadata: outbound layers to mesh services send it with requests, inbound layers
    /// answer with it.
    #[must_use]
    pub fn metadata_exchange(mut self, local: LocalMetadata) -> Self {
        self.exchange = Some(local);
        self
    }

    /// Writes an access log.
    #[must_use]
    pub fn access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Some(log);
        self
    }

    /// The access log a Telemetry resource that turns access logging on writes to when
    /// no [`access_log`](Self::access_log) is set.
    #[must_use]
    pub fn standby_access_log(mut self, log: AccessLog) -> Self {
        self.standby_log = Some(log);
        self
    }

    /// Finishes.
    pub fn build(self) -> Telemetry {
        Telemetry {
            shared: Arc::new(Shared {
                workload: self.workload,
                exchange: self.exchange,
                metrics: self.metrics.unwrap_or_default(),
                latency: LatencyStats::new(),
                propagator: self.propagator,
                spans: self.spans,
                access_log: self.access_log,
                standby_log: self.standby_log,
                policy: ArcSwapOption::empty(),
                generation: AtomicU64::new(0),
            }),
        }
    }
}

impl Telemetry {
    /// A builder for the proxy whose workload is `workload`.
    pub fn builder(workload: Workload) -> TelemetryBuilder {
        TelemetryBuilder {
            workload,
            exchange: None,
            metrics: None,
            propagator: Propagator::default(),
            spans: None,
            access_log: None,
            standby_log: None,
        }
    }

    /// Puts the effective Telemetry API policy of this workload in force (`None`: none,
    /// the settings alone), for requests that start from now on.
    pub fn set_policy(&self, policy: Option<TelemetryPolicy>) {
        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared
            .policy
            .store(policy.map(|policy| Arc::new(ActivePolicy { generation, policy })));
    }

    /// This proxy's metadata for the exchange with peers, when it sends any.
    pub fn metadata_exchange(&self) -> Option<&LocalMetadata> {
        self.shared.exchange.as_ref()
    }

    /// The local workload.
    pub fn workload(&self) -> &Workload {
        &self.shared.workload
    }

    /// The metric registry (Istio and proxy families).
    pub fn metrics(&self) -> &MetricsRegistry {
        &self.shared.metrics
    }

    /// The latency histograms.
    pub fn latency(&self) -> &LatencyStats {
        &self.shared.latency
    }

    /// The `/metrics` body (Prometheus text 0.0.4; content type
    /// [`MetricsRegistry::CONTENT_TYPE`]).
    pub fn encode_metrics(&self) -> String {
        self.shared.metrics.encode()
    }

    /// Counters for a [`SpanQueue`] wired to `mesh_trace_spans_*_total`.
    pub fn export_counters(metrics: &MetricsRegistry) -> ExportCounters {
        ExportCounters {
            exported: metrics.proxy().spans_exported.clone(),
            dropped: metrics.proxy().spans_dropped.clone(),
        }
    }

    /// Resolves the target of an outbound route to `service` (`reporter="source"`);
    /// `peer` is what configuration knows about the destination workload.
    pub fn outbound_target(&self, service: &DestinationService, peer: &Workload) -> Target {
        Target {
            metrics: self.shared.metrics.istio().handle(
                Reporter::Source,
                &self.shared.workload,
                peer,
                service,
            ),
            latency: self.shared.latency.handle(&service.host),
        }
    }

    /// Resolves the target of the inbound listener for the local `service`
    /// (`reporter="destination"`).
    pub fn inbound_target(&self, service: &DestinationService) -> Target {
        Target {
            metrics: self.shared.metrics.istio().handle(
                Reporter::Destination,
                &self.shared.workload,
                &Workload::unknown(),
                service,
            ),
            latency: self
                .shared
                .latency
                .handle(&format!("inbound|{}", service.host)),
        }
    }
}

/// The pre-resolved metrics and latency histogram of one route, endpoint or listener.
#[derive(Clone, Debug)]
pub struct Target {
    /// Istio metric handle.
    pub metrics: MetricsHandle,
    /// Latency histogram.
    pub latency: LatencyHandle,
}

/// Outbound targets resolved from the request authority, bounded: past `limit` distinct
/// hosts, requests are recorded under `destination_service="unknown"`.
struct ByAuthority {
    telemetry: Telemetry,
    cache: RwLock<HashMap<String, Target>>,
    limit: usize,
    unknown: Target,
    /// Whether the service the router chose ([`RoutedService`]) replaces the authority.
    routed: bool,
}

impl ByAuthority {
    fn resolve<B>(&self, req: &Request<B>) -> Target {
        self.resolve_host(authority(req).unwrap_or_default())
    }

    fn resolve_host(&self, host: &str) -> Target {
        if host.is_empty() {
            return self.unknown.clone();
        }
        if let Some(t) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
        {
            return t.clone();
        }
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(host) {
            return t.clone();
        }
        if cache.len() >= self.limit {
            return self.unknown.clone();
        }
        let t = self
            .telemetry
            .outbound_target(&DestinationService::from_host(host), &Workload::unknown());
        cache.insert(host.to_owned(), t.clone());
        t
    }
}

enum Targets {
    Fixed(Target),
    ByAuthority(ByAuthority),
}

impl Targets {
    fn clone_targets(&self) -> Self {
        match self {
            Targets::Fixed(t) => Targets::Fixed(t.clone()),
            Targets::ByAuthority(b) => Targets::ByAuthority(ByAuthority {
                telemetry: b.telemetry.clone(),
                cache: RwLock::new(b.cache.read().unwrap_or_else(|e| e.into_inner()).clone()),
                limit: b.limit,
                unknown: b.unknown.clone(),
                routed: b.routed,
            }),
        }
    }
}

struct LayerShared {
    telemetry: Telemetry,
    targets: Targets,
    /// Whether requests (outbound) or responses (inbound) carry this proxy's metadata.
    exchange: bool,
    kind: SpanKind,
    seed: u64,
    clones: AtomicU64,
}

/// Records Istio metrics, latency, traces and access logs for the wrapped service.
#[derive(Clone)]
pub struct TelemetryLayer {
    // `None`: disabled, requests pass through untouched.
    shared: Option<Arc<LayerShared>>,
}

impl std::fmt::Debug for TelemetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryLayer")
            .field("kind", &self.shared.as_ref().map(|s| s.kind))
            .finish_non_exhaustive()
    }
}

/// Default bound on distinct authorities for [`TelemetryLayer::outbound_by_authority`].
pub const DEFAULT_AUTHORITY_LIMIT: usize = 1024;

impl TelemetryLayer {
    fn with(telemetry: &Telemetry, targets: Targets, kind: SpanKind, exchange: bool) -> Self {
        Self {
            shared: Some(Arc::new(LayerShared {
                telemetry: telemetry.clone(),
                targets,
                exchange,
                kind,
                seed: rand::rng().random(),
                clones: AtomicU64::new(0),
            })),
        }
    }

    /// A layer that records nothing and leaves requests untouched (telemetry turned off):
    /// no headers are added and nothing is allocated per request.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Outbound side of one route to `service` (`reporter="source"`), a mesh service:
    /// requests carry this proxy's metadata when the telemetry has some.
    pub fn outbound(telemetry: &Telemetry, service: DestinationService, peer: Workload) -> Self {
        let target = telemetry.outbound_target(&service, &peer);
        Self::with(telemetry, Targets::Fixed(target), SpanKind::Client, true)
    }

    /// Outbound side for any destination, resolved from the request authority with at
    /// most `limit` distinct destinations (further ones are `unknown`).
    pub fn outbound_by_authority(telemetry: &Telemetry, limit: usize) -> Self {
        Self::by_authority(telemetry, limit, false)
    }

    /// Targets by authority, and by the routed service when `routed`.
    fn by_authority(telemetry: &Telemetry, limit: usize, routed: bool) -> Self {
        let unknown =
            telemetry.outbound_target(&DestinationService::default(), &Workload::unknown());
        Self::with(
            telemetry,
            Targets::ByAuthority(ByAuthority {
                telemetry: telemetry.clone(),
                cache: RwLock::default(),
                limit,
                unknown,
                routed,
            }),
            SpanKind::Client,
            false,
        )
    }

    /// Outbound side of a router whose routes lead to several services (a gateway):
    /// requests are recorded under the service the router chose for them
    /// (`destination_service` is the routed service's host, as Envoy labels by the
    /// upstream cluster), else under their authority; at most `limit` distinct
    /// destinations. The router's per-route service fills the [`RoutedService`] slot this
    /// layer puts in the request extensions.
    pub fn outbound_by_route(telemetry: &Telemetry, limit: usize) -> Self {
        Self::by_authority(telemetry, limit, true)
    }

    /// Inbound side for the local `service` (`reporter="destination"`).
    pub fn inbound(telemetry: &Telemetry, service: DestinationService) -> Self {
        let target = telemetry.inbound_target(&service);
        Self::with(telemetry, Targets::Fixed(target), SpanKind::Server, true)
    }

    /// A layer for an already resolved target.
    pub fn for_target(telemetry: &Telemetry, target: Target, kind: SpanKind) -> Self {
        Self::with(telemetry, Targets::Fixed(target), kind, true)
    }

    /// Whether this proxy's metadata is sent (outbound: on requests; inbound: on the
    /// responses to peers that sent theirs). On by default except for
    /// [`outbound_by_authority`](Self::outbound_by_authority), whose hosts may lie
    /// outside the mesh. Peer metadata headers are read and removed whatever this says.
    #[must_use]
    pub fn with_metadata_exchange(self, on: bool) -> Self {
        self.rebuilt(|s| s.exchange = on)
    }

    /// Fixes the seed of the services' random number generators (ids, sampling).
    #[must_use]
    pub fn with_seed(self, seed: u64) -> Self {
        self.rebuilt(|s| s.seed = seed)
    }

    /// A copy of this layer's shared state changed by `change` (a disabled layer stays
    /// disabled); services made from it start their clone count over.
    fn rebuilt(self, change: impl FnOnce(&mut LayerShared)) -> Self {
        let Some(s) = &self.shared else {
            return self;
        };
        let mut shared = LayerShared {
            telemetry: s.telemetry.clone(),
            targets: s.targets.clone_targets(),
            exchange: s.exchange,
            kind: s.kind,
            seed: s.seed,
            clones: AtomicU64::new(0),
        };
        change(&mut shared);
        Self {
            shared: Some(Arc::new(shared)),
        }
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = TelemetryService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TelemetryService::new(inner, self.shared.clone())
    }
}

/// The service of [`TelemetryLayer`].
pub struct TelemetryService<S> {
    inner: S,
    shared: Option<Arc<LayerShared>>,
    rng: SmallRng,
}

impl<S> TelemetryService<S> {
    fn new(inner: S, shared: Option<Arc<LayerShared>>) -> Self {
        // Each service gets its own stream: the layer's seed mixed with a clone counter.
        let seed = shared.as_ref().map_or(0, |s| {
            let n = s.clones.fetch_add(1, Ordering::Relaxed);
            s.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        let rng = SmallRng::seed_from_u64(seed);
        Self { inner, shared, rng }
    }
}

impl<S: Clone> Clone for TelemetryService<S> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.shared.clone())
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for TelemetryService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// Header lines (`name: value\r\n`) plus the blank line, as HTTP/1.1 frames them.
fn header_block_len(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum::<u64>()
        + 2
}

/// What the access log and the span need from the request (captured only when used).
struct Captured {
    start_wall: SystemTime,
    method: http::Method,
    path: String,
    version: http::Version,
    authority: Option<String>,
    user_agent: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    /// The request headers, when a Telemetry policy reads them.
    headers: Option<HeaderMap>,
}

struct Pending {
    layer: Arc<LayerShared>,
    target: Target,
    start: Instant,
    hop: HopContext,
    request_id: HeaderValue,
    grpc: bool,
    security: ConnectionSecurity,
    peer: Option<Identity>,
    /// The peer's workload from verified metadata: the caller inbound, the server
    /// outbound.
    peer_workload: Option<Arc<Workload>>,
    request_header_bytes: u64,
    request_body: Arc<BodyCounts>,
    /// gRPC messages sent downstream so far (gRPC requests only).
    response_messages: Option<MessageCounter>,
    /// Where the router sent the request, when the target follows the route.
    routed: Option<RoutedService>,
    captured: Option<Box<Captured>>,
    /// The Telemetry policy in force when the request started.
    policy: Option<Arc<ActivePolicy>>,
    // Set when the response head arrives.
    status: u16,
    grpc_status: Option<u16>,
    flags: ResponseFlags,
    response_header_bytes: u64,
    upstream_host: Option<SocketAddr>,
    upstream_peer: Option<Identity>,
    upstream_service_time: Option<HeaderValue>,
}

impl Pending {
    /// Records the request's metrics without a Telemetry policy (the default path).
    fn record_metrics(
        &self,
        facts: &RequestFacts<'_>,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        match &self.response_messages {
            Some(sent) if self.grpc => self.target.metrics.record_grpc(
                facts,
                duration_ms,
                request_bytes,
                response_bytes,
                (
                    self.request_body.messages.load(Ordering::Relaxed),
                    sent.count(),
                ),
            ),
            _ => self
                .target
                .metrics
                .record(facts, duration_ms, request_bytes, response_bytes),
        }
    }

    fn finish(mut self, response_body_bytes: u64) {
        let elapsed = self.start.elapsed();
        if let Some(host) = self.routed.as_ref().and_then(RoutedService::get)
            && let Targets::ByAuthority(b) = &self.layer.targets
        {
            self.target = b.resolve_host(host);
        }
        let request_body = self.request_body.bytes.load(Ordering::Relaxed);
        let facts = RequestFacts {
            response_code: self.status,
            grpc_status: self.grpc_status,
            flags: self.flags,
            security: self.security,
            grpc: self.grpc,
            // The reporting proxy's peer: the caller inbound, the verified server outbound.
            peer: match self.target.metrics.reporter() {
                Reporter::Destination => self.peer.as_ref(),
                _ => self.upstream_peer.as_ref(),
            },
            peer_workload: self.peer_workload.as_deref(),
        };
        let response_bytes = if self.status == 0 {
            0
        } else {
            self.response_header_bytes + response_body_bytes
        };
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let request_bytes = self.request_header_bytes + request_body;
        let telemetry = &self.layer.telemetry.shared;
        let client = self.layer.kind == SpanKind::Client;
        let dir = self.policy.as_deref().map(|p| p.policy.direction(client));
        // The request's attributes, for the policy's expressions (policy path only).
        let cel = match (dir, self.captured.as_deref()) {
            (Some(d), Some(c)) if d.needs_attributes() => {
                let port = self
                    .upstream_host
                    .map(|a| a.port())
                    .or_else(|| {
                        c.authority
                            .as_deref()
                            .and_then(|a| a.rsplit_once(':'))
                            .and_then(|(_, p)| p.parse().ok())
                    })
                    .unwrap_or(0);
                let protocol = format!("{:?}", c.version);
                let attributes = Attributes {
                    method: c.method.as_str(),
                    path: &c.path,
                    host: c.authority.as_deref().unwrap_or_default(),
                    scheme: "http",
                    headers: c.headers.as_ref(),
                    protocol: &protocol,
                    code: self.status,
                    flags: self.flags.to_string(),
                    grpc_status: self.grpc_status,
                    mtls: self.security == ConnectionSecurity::MutualTls,
                    principal: facts.peer.map_or("", |p| p.as_str()),
                    port,
                };
                Some(attributes.context())
            }
            _ => None,
        };
        if let (Some(d), Some(active)) = (dir, self.policy.as_deref())
            && !d.metrics.is_empty()
        {
            let values = match &cel {
                Some(ctx) => d.metrics.exprs.iter().map(|e| e.value(ctx)).collect(),
                None => Vec::new(),
            };
            let messages = self.response_messages.as_ref().map(|sent| {
                (
                    self.request_body.messages.load(Ordering::Relaxed),
                    sent.count(),
                )
            });
            self.target.metrics.record_overridden(
                &facts,
                duration_ms,
                request_bytes,
                response_bytes,
                messages,
                &d.metrics,
                active.generation,
                values,
            );
        } else {
            self.record_metrics(&facts, duration_ms, request_bytes, response_bytes);
        }
        self.target.latency.record(elapsed);
        let Some(c) = self.captured.as_deref() else {
            return;
        };
        let log = match dir.and_then(|d| d.access_log.enabled) {
            None => telemetry.access_log.as_ref(),
            Some(false) => None,
            Some(true) => telemetry
                .access_log
                .as_ref()
                .or(telemetry.standby_log.as_ref()),
        };
        let filtered_out = match (dir.and_then(|d| d.access_log.filter.as_ref()), &cel) {
            (Some(filter), Some(ctx)) => !filter.matches(ctx),
            _ => false,
        };
        if let Some(log) = log.filter(|_| !filtered_out) {
            log.log(&AccessEntry {
                start: c.start_wall,
                method: c.method.clone(),
                path: c.path.clone(),
                protocol: c.version,
                response_code: self.status,
                flags: self.flags,
                bytes_received: request_body,
                bytes_sent: response_body_bytes,
                duration: elapsed,
                upstream_service_time: self.upstream_service_time.clone(),
                forwarded_for: c.forwarded_for.clone(),
                user_agent: c.user_agent.clone(),
                request_id: Some(self.request_id.clone()),
                authority: c.authority.clone(),
                upstream_host: self.upstream_host,
                downstream_peer_uri_san: self.peer.clone(),
                upstream_peer_uri_san: self.upstream_peer.clone(),
            });
        }
        let spans = telemetry
            .spans
            .as_ref()
            .filter(|_| !dir.is_some_and(|d| d.tracing.disable_span_reporting));
        if let (true, Some(spans)) = (self.hop.sampled, spans) {
            let host = c.authority.as_deref().unwrap_or("unknown");
            let w = &telemetry.workload;
            let mut attributes = vec![
                ("component", "proxy".to_owned()),
                ("http.method", c.method.as_str().to_owned()),
                ("http.url", format!("http://{host}{}", c.path)),
                ("http.protocol", format!("{:?}", c.version)),
                ("http.status_code", self.status.to_string()),
                ("response_flags", self.flags.to_string()),
                ("request_size", request_body.to_string()),
                ("response_size", response_body_bytes.to_string()),
                (
                    "upstream_cluster",
                    self.target.metrics.destination_service().to_owned(),
                ),
                ("istio.canonical_service", w.canonical_service.clone()),
                ("istio.namespace", w.namespace.clone()),
                (
                    "guid:x-request-id",
                    String::from_utf8_lossy(self.request_id.as_bytes()).into_owned(),
                ),
            ];
            if let Some(ua) = &c.user_agent {
                attributes.push((
                    "user_agent",
                    String::from_utf8_lossy(ua.as_bytes()).into_owned(),
                ));
            }
            if let Some(up) = self.upstream_host {
                attributes.push(("upstream_host", up.to_string()));
            }
            if let Some(g) = self.grpc_status {
                attributes.push(("grpc.status_code", g.to_string()));
            }
            let mut custom = Vec::new();
            for (name, source) in dir.map_or(&[][..], |d| &d.tracing.custom_tags[..]) {
                let value = match source {
                    TagSource::Literal(v) => Some(v.clone()),
                    TagSource::Header { name, default } => c
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .or_else(|| default.clone()),
                };
                if let Some(v) = value {
                    custom.push((name.clone(), v));
                }
            }
            spans.submit(SpanRecord {
                trace_id: self.hop.trace_id,
                trace_id_64: self.hop.trace_id_64,
                span_id: self.hop.span_id,
                parent_span_id: self.hop.parent_span_id,
                name: format!("{host}/*"),
                kind: self.layer.kind,
                start: c.start_wall,
                duration: elapsed,
                attributes,
                custom_tags: custom,
                error: self.status >= 500 || self.status == 0,
                debug: self.hop.debug,
            });
        }
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for TelemetryService<S>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let Some(shared) = &self.shared else {
            // Disabled: pass through, nothing recorded, nothing allocated.
            return ResponseFuture {
                inner: self.inner.call(req.map(|inner| RequestBody {
                    inner,
                    counts: None,
                    messages: None,
                })),
                pending: None,
            };
        };
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        let telemetry = &shared.telemetry.shared;
        // Wire size of what the downstream sent, before we add any header.
        let request_header_bytes = (parts.method.as_str().len()
            + parts.uri.path_and_query().map_or(1, |p| p.as_str().len())
            + 12) as u64
            + header_block_len(&parts.headers);
        let request_id = trace::ensure_request_id(&mut parts.headers, &mut self.rng);
        let policy = telemetry.policy.load_full();
        let dir = policy
            .as_deref()
            .map(|p| p.policy.direction(shared.kind == SpanKind::Client));
        let hop = match dir.and_then(|d| d.tracing.sampler) {
            Some(sampler) => Propagator {
                sampler,
                ..telemetry.propagator
            }
            .propagate(&mut parts.headers, &mut self.rng),
            None => telemetry
                .propagator
                .propagate(&mut parts.headers, &mut self.rng),
        };
        let probe = Request::from_parts(parts, ());
        let target = match &shared.targets {
            Targets::Fixed(t) => t.clone(),
            Targets::ByAuthority(b) => b.resolve(&probe),
        };
        let (mut parts, ()) = probe.into_parts();
        let routed = match &shared.targets {
            Targets::ByAuthority(b) if b.routed => {
                let slot = RoutedService::new();
                parts.extensions.insert(slot.clone());
                Some(slot)
            }
            _ => None,
        };
        let inbound = target.metrics.reporter() == Reporter::Destination;
        let peer = parts.extensions.get::<PeerIdentity>().map(|p| p.0.clone());
        let peer_workload = if inbound {
            // Metadata headers never reach the application; believed only from `peer`.
            let taken = exchange::take(&mut parts.headers, peer.as_ref());
            taken.or_else(|| parts.extensions.get::<PeerWorkload>().map(|w| w.0.clone()))
        } else {
            if shared.exchange
                && let Some(local) = &telemetry.exchange
            {
                local.insert(&mut parts.headers);
            }
            None
        };
        let security = match parts.extensions.get::<ConnectionInfo>() {
            Some(info) => info.security,
            None if peer.is_some() => ConnectionSecurity::MutualTls,
            None => ConnectionSecurity::Unknown,
        };
        let grpc = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let needs_headers = dir.is_some_and(|d| d.needs_attributes());
        let logs = match dir.and_then(|d| d.access_log.enabled) {
            None => telemetry.access_log.is_some(),
            Some(on) => on,
        };
        let spans =
            telemetry.spans.is_some() && !dir.is_some_and(|d| d.tracing.disable_span_reporting);
        let captured = (logs || (hop.sampled && spans) || needs_headers).then(|| {
            let get = |n: &str| parts.headers.get(n).cloned();
            Box::new(Captured {
                // Wall time only for the log line and the span; durations use `start`.
                start_wall: SystemTime::now(),
                method: parts.method.clone(),
                path: path.to_owned(),
                version: parts.version,
                authority: parts
                    .uri
                    .authority()
                    .map(|a| a.as_str().to_owned())
                    .or_else(|| {
                        parts
                            .headers
                            .get(http::header::HOST)
                            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                    }),
                user_agent: get("user-agent"),
                forwarded_for: get("x-forwarded-for"),
                headers: needs_headers.then(|| parts.headers.clone()),
            })
        });
        let counter = Arc::new(BodyCounts::default());
        let req = Request::from_parts(
            parts,
            RequestBody {
                inner: body,
                counts: Some(counter.clone()),
                messages: grpc.then(MessageCounter::default),
            },
        );
        let pending = Pending {
            layer: shared.clone(),
            target,
            start,
            hop,
            request_id,
            grpc,
            security,
            peer,
            peer_workload,
            request_header_bytes,
            request_body: counter,
            response_messages: grpc.then(MessageCounter::default),
            routed,
            captured,
            policy,
            status: 0,
            grpc_status: None,
            flags: ResponseFlags::NONE,
            response_header_bytes: 0,
            upstream_host: None,
            upstream_peer: None,
            upstream_service_time: None,
        };
        ResponseFuture {
            inner: self.inner.call(req),
            pending: Some(Box::new(pending)),
        }
    }
}

/// What the request body counted, read when the request is recorded.
#[derive(Debug, Default)]
struct BodyCounts {
    bytes: AtomicU64,
    /// gRPC messages begun (gRPC requests only).
    messages: AtomicU64,
}

/// The request body, counting bytes (and for gRPC, messages) received.
#[pin_project]
#[derive(Debug)]
pub struct RequestBody<B> {
    #[pin]
    inner: B,
    counts: Option<Arc<BodyCounts>>,
    messages: Option<MessageCounter>,
}

impl<B> RequestBody<B> {
    /// The wrapped body.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for RequestBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
            && let Some(counts) = this.counts
        {
            counts
                .bytes
                .fetch_add(d.remaining() as u64, Ordering::Relaxed);
            if let Some(m) = this.messages {
                m.observe(d);
                counts.messages.store(m.count(), Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The future of [`TelemetryService`].
#[pin_project(PinnedDrop)]
pub struct ResponseFuture<F> {
    #[pin]
    inner: F,
    pending: Option<Box<Pending>>,
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
    B: Body,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some(mut pending) = this.pending.take() else {
            // Disabled layer: the response passes through.
            return Poll::Ready(
                result
                    .map(|r| r.map(ResponseBody::detached))
                    .map_err(Into::into),
            );
        };
        match result {
            Ok(mut res) => {
                let layer = &pending.layer;
                if pending.target.metrics.reporter() == Reporter::Destination {
                    // Answer a peer whose metadata we believed with ours.
                    if layer.exchange
                        && pending.peer_workload.is_some()
                        && let Some(local) = &layer.telemetry.shared.exchange
                    {
                        local.insert(res.headers_mut());
                    }
                } else {
                    let upstream = res
                        .extensions()
                        .get::<UpstreamPeerIdentity>()
                        .map(|p| p.0.clone());
                    // The server's metadata never reaches the caller.
                    pending.peer_workload = exchange::take(res.headers_mut(), upstream.as_ref());
                }
                let status = res.status();
                pending.status = status.as_u16();
                pending.grpc_status = mesh_core::outcome::grpc_status(res.headers());
                pending.flags |= response_flags(res.extensions());
                pending.upstream_host = res.extensions().get::<UpstreamHost>().map(|u| u.0);
                pending.upstream_peer = res
                    .extensions()
                    .get::<UpstreamPeerIdentity>()
                    .map(|p| p.0.clone());
                pending.upstream_service_time = res.headers().get(&UPSTREAM_SERVICE_TIME).cloned();
                // `HTTP/1.1 200 OK\r\n`
                pending.response_header_bytes = (15 + status.canonical_reason().map_or(0, str::len))
                    as u64
                    + header_block_len(res.headers());
                Poll::Ready(Ok(res.map(|body| ResponseBody {
                    empty: body.is_end_stream(),
                    inner: body,
                    pending: Some(pending),
                    bytes: 0,
                })))
            }
            Err(e) => {
                let e: BoxError = e.into();
                let (status, flags) = classify_error(&e);
                pending.status = status;
                pending.flags |= flags;
                pending.finish(0);
                Poll::Ready(Err(e))
            }
        }
    }
}

#[pinned_drop]
impl<F> PinnedDrop for ResponseFuture<F> {
    fn drop(self: Pin<&mut Self>) {
        // Dropped before the response head: the downstream went away while we waited.
        // Envoy records such requests with `response_code="0"` and `DC` (TM-04).
        if let Some(mut p) = self.project().pending.take() {
            p.status = 0;
            p.flags |= ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
            p.finish(0);
        }
    }
}

/// The response body: counts bytes sent and records the request when it ends.
#[pin_project(PinnedDrop)]
pub struct ResponseBody<B> {
    #[pin]
    inner: B,
    pending: Option<Box<Pending>>,
    bytes: u64,
    empty: bool,
}

impl<B> ResponseBody<B> {
    fn detached(inner: B) -> Self {
        Self {
            inner,
            pending: None,
            bytes: 0,
            empty: false,
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.remaining() as u64;
                    if let Some(m) = this
                        .pending
                        .as_mut()
                        .and_then(|p| p.response_messages.as_mut())
                    {
                        m.observe(d);
                    }
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(p) = this.pending.as_mut()
                    && let Some(g) = mesh_core::outcome::grpc_status(trailers)
                {
                    p.grpc_status = Some(g);
                }
                // hyper stops polling once the body reports its end: record now.
                if this.inner.is_end_stream()
                    && let Some(p) = this.pending.take()
                {
                    p.finish(*this.bytes);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e: BoxError = e.into();
                if let Some(mut p) = this.pending.take() {
                    let (_, flags) = classify_error(&e);
                    p.flags |= if flags.is_empty() {
                        ResponseFlags::UPSTREAM_CONNECTION_TERMINATION
                    } else {
                        flags
                    };
                    p.finish(*this.bytes);
                }
                Poll::Ready(Some(Err(e)))
            }
            None => {
                if let Some(p) = this.pending.take() {
                    p.finish(*this.bytes);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[pinned_drop]
impl<B> PinnedDrop for ResponseBody<B> {
    fn drop(self: Pin<&mut Self>) {
        let this = self.project();
        if let Some(mut p) = this.pending.take() {
            // Dropped before its end: the downstream went away (Envoy's `DC`). A body that
            // was empty from the start is never polled by hyper and ends normally here.
            if !*this.empty {
                p.flags |= ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
            }
            p.finish(*this.bytes);
        }
    }
}
