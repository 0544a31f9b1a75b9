//! Istio's standard metrics: exact names, types, label names and buckets (ISTIO.md §6.1).
//!
//! Labels that depend on the route or endpoint (workloads, services, principals known from
//! configuration) are resolved once into a [`MetricsHandle`] when the route or endpoint is
//! built. Per request only a handful of small values remain (status, flags, gRPC status,
//! connection security, the peer's SPIFFE identity); the handle maps them through a small
//! cache to pre-created series, so the hot path is one read-locked lookup plus atomic
//! increments.
//!
//! # Cardinality bound
//!
//! Values that come from requests can never grow the series without limit: each handle
//! creates at most [`IstioMetrics::series_limit`] series (default
//! [`DEFAULT_SERIES_LIMIT`]) and remembers at most as many peer identities. Past the limit,
//! the request-derived labels (`response_code`, `grpc_response_status`, `response_flags`,
//! `connection_security_policy` and the peer's principal and namespace) collapse to
//! `unknown` in one overflow series, which keeps counting. Paths never become labels.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use mesh_core::{ConnectionSecurity, Identity, ResponseFlags};
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::policy::{Metric, MetricsPolicy, TagAction};

/// Envoy's default histogram boundaries, used by every Istio histogram (TM-07).
pub const DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Default bound on the series one [`MetricsHandle`] may create.
pub const DEFAULT_SERIES_LIMIT: usize = 256;

const UNKNOWN: &str = "unknown";

/// A label value: a cheaply cloned shared string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Value(Arc<str>);

impl Value {
    fn new(s: &str) -> Self {
        Self(Arc::from(s))
    }

    fn or_unknown(s: &str) -> Self {
        Self::new(if s.is_empty() { UNKNOWN } else { s })
    }
}

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

/// Who reports a metric (TM-02).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The client side: the outbound sidecar or a gateway.
    Source,
    /// The server side: the inbound sidecar.
    Destination,
}

impl Reporter {
    /// The label value: `source` or `destination`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// What is known about one side of a request: the labels Istio reads from the workload's
/// metadata. Empty strings render as `unknown` (TM-03).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    /// Workload name (`reviews-v1`).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// `app` label.
    pub app: String,
    /// `version` label.
    pub version: String,
    /// `service.istio.io/canonical-name`.
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision`; `latest` when unset.
    pub canonical_revision: String,
    /// Cluster id.
    pub cluster: String,
    /// The workload's SPIFFE identity, rendered with its `spiffe://` scheme.
    pub principal: Option<Identity>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            name: String::new(),
            namespace: String::new(),
            app: String::new(),
            version: String::new(),
            canonical_service: String::new(),
            canonical_revision: "latest".into(),
            cluster: String::new(),
            principal: None,
        }
    }
}

impl Workload {
    /// A workload whose labels are all `unknown`.
    pub fn unknown() -> Self {
        Self::default()
    }

    /// A workload with a name and namespace; `app` and the canonical service default to
    /// the name, as Istio does for workloads without those labels.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            app: name.clone(),
            canonical_service: name.clone(),
            name,
            namespace: namespace.into(),
            ..Self::default()
        }
    }

    /// Sets `app` (and the canonical service, which follows it).
    #[must_use]
    pub fn with_app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self.canonical_service = self.app.clone();
        self
    }

    /// Sets `version` (and the canonical revision, which follows it).
    #[must_use]
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self.canonical_revision = self.version.clone();
        self
    }

    /// Sets the cluster id.
    #[must_use]
    pub fn with_cluster(mut self, cluster: impl Into<String>) -> Self {
        self.cluster = cluster.into();
        self
    }

    /// Sets the SPIFFE identity.
    #[must_use]
    pub fn with_principal(mut self, principal: Identity) -> Self {
        self.principal = Some(principal);
        self
    }
}

/// The destination service of a request (TM-06).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationService {
    /// FQDN (`reviews.default.svc.cluster.local`).
    pub host: String,
    /// Short name (`reviews`).
    pub name: String,
    /// Namespace of the service.
    pub namespace: String,
}

impl DestinationService {
    /// Derives the short name (first DNS label) and, for `<name>.<ns>.svc…` hosts, the
    /// namespace from a host name; a `:port` suffix is ignored.
    pub fn from_host(host: &str) -> Self {
        let bare = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let mut labels = bare.split('.');
        let name = labels.next().unwrap_or_default().to_owned();
        let ns = labels.next().unwrap_or_default();
        let namespace = if labels.next() == Some("svc") {
            ns.to_owned()
        } else {
            String::new()
        };
        Self {
            host: bare.to_owned(),
            name,
            namespace,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HttpLabels {
    reporter: Value,
    source_workload: Value,
    source_workload_namespace: Value,
    source_principal: Value,
    source_app: Value,
    source_version: Value,
    source_canonical_service: Value,
    source_canonical_revision: Value,
    source_cluster: Value,
    destination_workload: Value,
    destination_workload_namespace: Value,
    destination_principal: Value,
    destination_app: Value,
    destination_version: Value,
    destination_service: Value,
    destination_service_name: Value,
    destination_service_namespace: Value,
    destination_canonical_service: Value,
    destination_canonical_revision: Value,
    destination_cluster: Value,
    request_protocol: Value,
    response_code: Value,
    grpc_response_status: Value,
    response_flags: Value,
    connection_security_policy: Value,
    /// Telemetry API tag overrides (`None` on the default path).
    overrides: Option<Arc<LabelOverrides>>,
}

/// Label changes of a Telemetry metrics override: labels removed (bits in the order of
/// [`HTTP_LABEL_NAMES`]) and labels set, replacing a standard one or added after them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LabelOverrides {
    removed: u32,
    upserts: Vec<(Arc<str>, Arc<str>)>,
}

const HTTP_LABEL_NAMES: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

impl HttpLabels {
    fn values(&self) -> [&Value; 25] {
        [
            &self.reporter,
            &self.source_workload,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.source_app,
            &self.source_version,
            &self.source_canonical_service,
            &self.source_canonical_revision,
            &self.source_cluster,
            &self.destination_workload,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_app,
            &self.destination_version,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
            &self.destination_canonical_service,
            &self.destination_canonical_revision,
            &self.destination_cluster,
            &self.request_protocol,
            &self.response_code,
            &self.grpc_response_status,
            &self.response_flags,
            &self.connection_security_policy,
        ]
    }
}

impl EncodeLabelSet for HttpLabels {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        let o = self.overrides.as_deref();
        for (i, (name, value)) in HTTP_LABEL_NAMES.iter().zip(self.values()).enumerate() {
            if o.is_some_and(|o| o.removed & (1 << i) != 0) {
                continue;
            }
            let value = o
                .and_then(|o| o.upserts.iter().find(|(n, _)| &**n == *name))
                .map_or(&*value.0, |(_, v)| &**v);
            (*name, value).encode(encoder.encode_label())?;
        }
        for (name, value) in o.map_or(&[][..], |o| &o.upserts[..]) {
            if !HTTP_LABEL_NAMES.contains(&&**name) {
                (&**name, &**value).encode(encoder.encode_label())?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: Value,
    tag: Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TcpLabels {
    reporter: Value,
    source_workload: Value,
    source_workload_namespace: Value,
    source_principal: Value,
    source_app: Value,
    source_version: Value,
    source_canonical_service: Value,
    source_canonical_revision: Value,
    source_cluster: Value,
    destination_workload: Value,
    destination_workload_namespace: Value,
    destination_principal: Value,
    destination_app: Value,
    destination_version: Value,
    destination_service: Value,
    destination_service_name: Value,
    destination_service_namespace: Value,
    destination_canonical_service: Value,
    destination_canonical_revision: Value,
    destination_cluster: Value,
    request_protocol: Value,
    response_flags: Value,
    connection_security_policy: Value,
}

struct Side {
    workload: Value,
    namespace: Value,
    principal: Value,
    app: Value,
    version: Value,
    canonical_service: Value,
    canonical_revision: Value,
    cluster: Value,
}

impl Side {
    fn of(w: &Workload) -> Self {
        Self {
            workload: Value::or_unknown(&w.name),
            namespace: Value::or_unknown(&w.namespace),
            principal: w
                .principal
                .as_ref()
                .map_or_else(|| Value::new(UNKNOWN), |p| Value::new(p.as_str())),
            app: Value::or_unknown(&w.app),
            version: Value::or_unknown(&w.version),
            canonical_service: Value::or_unknown(&w.canonical_service),
            canonical_revision: Value::new(if w.canonical_revision.is_empty() {
                "latest"
            } else {
                &w.canonical_revision
            }),
            cluster: Value::or_unknown(&w.cluster),
        }
    }
}

/// A histogram with Envoy's default bounds ([`DEFAULT_BUCKETS`]) and lock-free recording:
/// one atomic increment for the bucket and one for the sum. Cheap to clone (shared).
///
/// prometheus-client's own histogram takes a mutex and scans its bounds linearly on every
/// observation; with three histograms per request that was most of the recording cost.
#[derive(Clone, Debug, Default)]
pub struct EnvoyHistogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug, Default)]
struct HistogramInner {
    // One counter per bound, plus +Inf.
    buckets: [AtomicU64; DEFAULT_BUCKETS.len() + 1],
    // f64 bits of the sum of observations.
    sum: AtomicU64,
}

impl EnvoyHistogram {
    /// Records one value.
    pub fn observe(&self, v: f64) {
        // The first bound >= v; NaN lands in the first bucket, +Inf and beyond in the last.
        let i = DEFAULT_BUCKETS.partition_point(|b| *b < v);
        self.inner.buckets[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.inner.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.inner.sum.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.inner.sum.load(Ordering::Relaxed))
    }
}

impl TypedMetric for EnvoyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for EnvoyHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0u64); DEFAULT_BUCKETS.len() + 1];
        for (i, slot) in buckets.iter_mut().enumerate() {
            let bound = DEFAULT_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            *slot = (bound, self.inner.buckets[i].load(Ordering::Relaxed));
        }
        // The count is the bucket total, so `_count` and `le="+Inf"` always agree.
        let count = buckets.iter().map(|b| b.1).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum(), count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

type HistogramFamily<L> = Family<L, EnvoyHistogram>;

/// The Istio metric families, registered once in a [`Registry`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct IstioMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: HistogramFamily<HttpLabels>,
    request_bytes: HistogramFamily<HttpLabels>,
    response_bytes: HistogramFamily<HttpLabels>,
    request_messages: Family<HttpLabels, Counter>,
    response_messages: Family<HttpLabels, Counter>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    series_limit: usize,
}

impl IstioMetrics {
    /// Registers the Istio families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            requests: Family::default(),
            duration: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            request_messages: Family::default(),
            response_messages: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            series_limit: DEFAULT_SERIES_LIMIT,
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "istio_requests",
            "Requests handled by the proxy, counted at stream end",
            this.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration from the first request byte to the end of the response",
            this.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size: header block and body bytes received from downstream",
            this.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size: header block and body bytes sent to downstream",
            this.response_bytes.clone(),
        );
        registry.register(
            "istio_request_messages",
            "gRPC messages received from downstream, per gRPC request, counted at stream end",
            this.request_messages.clone(),
        );
        registry.register(
            "istio_response_messages",
            "gRPC messages sent to downstream, per gRPC request, counted at stream end",
            this.response_messages.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            this.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            this.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to downstream on TCP connections",
            this.tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from downstream on TCP connections",
            this.tcp_received.clone(),
        );
        // Istio's proxies export `istio_build{component="proxy",tag=<version>} 1`; Kiali
        // reads it to tell which proxies run and at which version (TM-13).
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: Value::new("proxy"),
                tag: Value::new(env!("CARGO_PKG_VERSION")),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        this
    }

    /// Sets the bound on series per handle (at least 1).
    #[must_use]
    pub fn with_series_limit(mut self, limit: usize) -> Self {
        self.series_limit = limit.max(1);
        self
    }

    /// The bound on series per handle.
    pub fn series_limit(&self) -> usize {
        self.series_limit
    }

    /// Resolves the labels of one route or endpoint.
    ///
    /// `local` is this proxy's workload, `peer` the other side as far as configuration
    /// knows it, `service` the destination service. For [`Reporter::Source`] the local
    /// workload is the source; for [`Reporter::Destination`] it is the destination, and
    /// the source principal and namespace come from each request's verified peer identity.
    pub fn handle(
        &self,
        reporter: Reporter,
        local: &Workload,
        peer: &Workload,
        service: &DestinationService,
    ) -> MetricsHandle {
        let (src, dst) = match reporter {
            Reporter::Source => (Side::of(local), Side::of(peer)),
            Reporter::Destination => (Side::of(peer), Side::of(local)),
        };
        let base = HttpLabels {
            reporter: Value::new(reporter.as_str()),
            source_workload: src.workload,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            source_app: src.app,
            source_version: src.version,
            source_canonical_service: src.canonical_service,
            source_canonical_revision: src.canonical_revision,
            source_cluster: src.cluster,
            destination_workload: dst.workload,
            destination_workload_namespace: dst.namespace,
            destination_principal: dst.principal,
            destination_app: dst.app,
            destination_version: dst.version,
            destination_service: Value::or_unknown(&service.host),
            destination_service_name: Value::or_unknown(&service.name),
            destination_service_namespace: Value::or_unknown(&service.namespace),
            destination_canonical_service: dst.canonical_service,
            destination_canonical_revision: dst.canonical_revision,
            destination_cluster: dst.cluster,
            request_protocol: Value::new("http"),
            response_code: Value::new("0"),
            grpc_response_status: Value::new(""),
            response_flags: Value::new("-"),
            connection_security_policy: Value::new(UNKNOWN),
            overrides: None,
        };
        MetricsHandle {
            inner: Arc::new(HandleInner {
                metrics: self.clone(),
                reporter,
                base,
                cache: RwLock::default(),
                hot: OnceLock::new(),
                peers: RwLock::default(),
                peer_count: AtomicU64::new(0),
                hot_peer: OnceLock::new(),
                overflow: OnceLock::new(),
                overridden: RwLock::default(),
            }),
        }
    }

    /// Resolves the TCP metric handles of one connection target.
    pub fn tcp(
        &self,
        reporter: Reporter,
        local: &Workload,
        peer: &Workload,
        service: &DestinationService,
        security: ConnectionSecurity,
    ) -> TcpMetrics {
        let h = self.handle(reporter, local, peer, service);
        let b = &h.inner.base;
        let security = match reporter {
            Reporter::Source => ConnectionSecurity::Unknown,
            Reporter::Destination => security,
        };
        let labels = TcpLabels {
            reporter: b.reporter.clone(),
            source_workload: b.source_workload.clone(),
            source_workload_namespace: b.source_workload_namespace.clone(),
            source_principal: b.source_principal.clone(),
            source_app: b.source_app.clone(),
            source_version: b.source_version.clone(),
            source_canonical_service: b.source_canonical_service.clone(),
            source_canonical_revision: b.source_canonical_revision.clone(),
            source_cluster: b.source_cluster.clone(),
            destination_workload: b.destination_workload.clone(),
            destination_workload_namespace: b.destination_workload_namespace.clone(),
            destination_principal: b.destination_principal.clone(),
            destination_app: b.destination_app.clone(),
            destination_version: b.destination_version.clone(),
            destination_service: b.destination_service.clone(),
            destination_service_name: b.destination_service_name.clone(),
            destination_service_namespace: b.destination_service_namespace.clone(),
            destination_canonical_service: b.destination_canonical_service.clone(),
            destination_canonical_revision: b.destination_canonical_revision.clone(),
            destination_cluster: b.destination_cluster.clone(),
            request_protocol: Value::new("tcp"),
            response_flags: Value::new("-"),
            connection_security_policy: Value::new(security.as_str()),
        };
        TcpMetrics {
            opened: self.tcp_opened.get_or_create_owned(&labels),
            closed: self.tcp_closed.get_or_create_owned(&labels),
            sent: self.tcp_sent.get_or_create_owned(&labels),
            received: self.tcp_received.get_or_create_owned(&labels),
        }
    }
}

/// Pre-resolved TCP counters for one connection target.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl TcpMetrics {
    /// A connection opened.
    pub fn opened(&self) {
        self.opened.inc();
    }

    /// A connection closed.
    pub fn closed(&self) {
        self.closed.inc();
    }

    /// `n` bytes were sent to downstream.
    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }

    /// `n` bytes were received from downstream.
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }
}

/// The request-derived facts that select a series within a [`MetricsHandle`].
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    /// Final status sent downstream, `0` when no response was sent.
    pub response_code: u16,
    /// gRPC status, for gRPC requests.
    pub grpc_status: Option<u16>,
    /// Envoy response flags.
    pub flags: ResponseFlags,
    /// Security of the downstream connection (ignored for `reporter="source"`: TM-05).
    pub security: ConnectionSecurity,
    /// Whether the request is gRPC (`request_protocol="grpc"`).
    pub grpc: bool,
    /// The verified identity of the reporting proxy's peer: the source on the inbound side
    /// (`source_principal`), the upstream server on the outbound side
    /// (`destination_principal`).
    pub peer: Option<&'a Identity>,
    /// The peer's workload from the metadata exchange, believed only when it came from
    /// `peer` ([`crate::exchange::take`]): fills the peer side's workload, app, version,
    /// canonical service and revision, and cluster labels.
    pub peer_workload: Option<&'a Workload>,
}

impl Default for RequestFacts<'_> {
    fn default() -> Self {
        Self {
            response_code: 200,
            grpc_status: None,
            flags: ResponseFlags::NONE,
            security: ConnectionSecurity::Unknown,
            grpc: false,
            peer: None,
            peer_workload: None,
        }
    }
}

/// The request series of one label set: the four HTTP series, and for gRPC the two
/// message counters.
#[derive(Clone, Debug)]
pub struct Series {
    requests: Counter,
    duration: EnvoyHistogram,
    request_bytes: EnvoyHistogram,
    response_bytes: EnvoyHistogram,
    /// `istio_request_messages_total` and `istio_response_messages_total`: gRPC only.
    messages: Option<(Counter, Counter)>,
}

impl Series {
    /// Records one finished request.
    pub fn record(&self, duration_ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.inc();
        self.duration.observe(duration_ms);
        self.request_bytes.observe(request_bytes as f64);
        self.response_bytes.observe(response_bytes as f64);
    }

    /// Adds the gRPC messages of one stream (a series of a non-gRPC request has no
    /// message counters: nothing is recorded).
    pub fn record_messages(&self, request_messages: u64, response_messages: u64) {
        if let Some((req, res)) = &self.messages {
            req.inc_by(request_messages);
            res.inc_by(response_messages);
        }
    }
}

/// A multiply-rotate hasher for the small, bounded series cache: SipHash's flood
/// resistance buys nothing for at most `series_limit` keys and costs most of a lookup.
#[derive(Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Eight bytes per step: peer identities are SPIFFE IDs of 40 bytes and more.
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            // The length keeps "a" and "a\0" apart.
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }
    fn write_u8(&mut self, v: u8) {
        self.add(u64::from(v));
    }
    fn write_u16(&mut self, v: u16) {
        self.add(u64::from(v));
    }
    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
    fn write_isize(&mut self, v: isize) {
        self.add(v as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type KeyMap<V> = HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    code: u16,
    grpc_status: Option<u16>,
    flags: ResponseFlags,
    security: ConnectionSecurity,
    grpc: bool,
    // 0: no peer identity; otherwise 1 + index into the interned peers.
    peer: u32,
}

/// One interned peer workload of an identity, and its index.
type PeerEntry = (Option<Arc<Workload>>, u32);

struct HandleInner {
    metrics: IstioMetrics,
    reporter: Reporter,
    base: HttpLabels,
    cache: RwLock<KeyMap<Series>>,
    /// The first series created (in the usual case a handle's 200s): found without the
    /// cache's lock. The same `Series` as the cache holds for its key.
    hot: OnceLock<(Key, Series)>,
    /// Interned peers: per identity, the workloads its metadata named (or none).
    peers: RwLock<HashMap<Identity, Vec<PeerEntry>, std::hash::BuildHasherDefault<KeyHasher>>>,
    /// How many peers are interned.
    peer_count: AtomicU64,
    /// The first peer interned, found without the peers' lock.
    hot_peer: OnceLock<(Identity, Option<Arc<Workload>>, u32)>,
    overflow: OnceLock<Series>,
    /// Series under a Telemetry policy: its generation and, per key and evaluated tag
    /// values, the series of each metric.
    overridden: RwLock<(u64, OverriddenCache)>,
}

/// Overridden series by key and evaluated tag values.
type OverriddenCache = HashMap<(Key, Vec<Arc<str>>), Arc<OverriddenSeries>>;

/// The series of one request under metric overrides; a disabled metric has none.
#[derive(Debug)]
struct OverriddenSeries {
    requests: Option<Counter>,
    duration: Option<EnvoyHistogram>,
    request_bytes: Option<EnvoyHistogram>,
    response_bytes: Option<EnvoyHistogram>,
    request_messages: Option<Counter>,
    response_messages: Option<Counter>,
}

/// The pre-resolved metrics of one route or endpoint; cheap to clone.
#[derive(Clone)]
pub struct MetricsHandle {
    inner: Arc<HandleInner>,
}

impl std::fmt::Debug for MetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsHandle")
            .field("reporter", &self.inner.reporter)
            .field(
                "destination_service",
                &self.inner.base.destination_service.0,
            )
            .finish()
    }
}

impl MetricsHandle {
    /// The reporter of this handle.
    pub fn reporter(&self) -> Reporter {
        self.inner.reporter
    }

    /// The `destination_service` label of this handle.
    pub fn destination_service(&self) -> &str {
        &self.inner.base.destination_service.0
    }

    /// Records one finished request.
    pub fn record(
        &self,
        facts: &RequestFacts<'_>,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.with_series(facts, |s| {
            s.record(duration_ms, request_bytes, response_bytes)
        });
    }

    /// Records one finished gRPC request with the messages of its stream in each
    /// direction (the message counters exist only for `facts.grpc`).
    pub fn record_grpc(
        &self,
        facts: &RequestFacts<'_>,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
        messages: (u64, u64),
    ) {
        self.with_series(facts, |s| {
            s.record(duration_ms, request_bytes, response_bytes);
            s.record_messages(messages.0, messages.1);
        });
    }

    /// Runs `f` with the series selected by `facts`, creating it on first use.
    pub fn with_series<R>(&self, facts: &RequestFacts<'_>, f: impl FnOnce(&Series) -> R) -> R {
        let key = self.key(facts);
        if let Some((hot, series)) = self.inner.hot.get()
            && *hot == key
        {
            return f(series);
        }
        {
            let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = cache.get(&key) {
                return f(s);
            }
        }
        let series = self.create(key, facts);
        f(&series)
    }

    fn key(&self, facts: &RequestFacts<'_>) -> Key {
        let inbound = self.inner.reporter == Reporter::Destination;
        let peer = match facts.peer {
            Some(id) => self.peer_index(id, facts.peer_workload),
            None => 0,
        };
        Key {
            code: facts.response_code,
            grpc_status: facts.grpc_status,
            flags: facts.flags,
            security: if inbound {
                facts.security
            } else {
                ConnectionSecurity::Unknown
            },
            grpc: facts.grpc,
            peer,
        }
    }

    fn peer_index(&self, id: &Identity, workload: Option<&Workload>) -> u32 {
        let same = |have: &Option<Arc<Workload>>| have.as_deref() == workload;
        if let Some((hot, w, i)) = self.inner.hot_peer.get()
            && hot == id
            && same(w)
        {
            return *i;
        }
        {
            let peers = self.inner.peers.read().unwrap_or_else(|e| e.into_inner());
            if let Some((_, i)) = peers.get(id).and_then(|v| v.iter().find(|(w, _)| same(w))) {
                return *i;
            }
        }
        let mut peers = self.inner.peers.write().unwrap_or_else(|e| e.into_inner());
        if let Some((_, i)) = peers.get(id).and_then(|v| v.iter().find(|(w, _)| same(w))) {
            return *i;
        }
        let count = self.inner.peer_count.load(Ordering::Relaxed) as usize;
        if count >= self.inner.metrics.series_limit {
            // Past the bound, further peers are not remembered: `unknown`.
            return u32::MAX;
        }
        let i = u32::try_from(count + 1).unwrap_or(u32::MAX);
        self.inner
            .peer_count
            .store(count as u64 + 1, Ordering::Relaxed);
        let w = workload.map(|w| Arc::new(w.clone()));
        peers.entry(id.clone()).or_default().push((w.clone(), i));
        let _ = self.inner.hot_peer.set((id.clone(), w, i));
        i
    }

    fn create(&self, key: Key, facts: &RequestFacts<'_>) -> Series {
        let mut cache = self.inner.cache.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.get(&key) {
            return s.clone();
        }
        if cache.len() >= self.inner.metrics.series_limit {
            return self
                .inner
                .overflow
                .get_or_init(|| self.resolve(&self.overflow_labels(), false))
                .clone();
        }
        let labels = self.labels_for(key, facts);
        let series = self.resolve(&labels, key.grpc);
        cache.insert(key, series.clone());
        let _ = self.inner.hot.set((key, series.clone()));
        series
    }

    /// The labels of the series `key` selects.
    fn labels_for(&self, key: Key, facts: &RequestFacts<'_>) -> HttpLabels {
        let mut labels = self.inner.base.clone();
        let mut code = String::with_capacity(3);
        let _ = write!(code, "{}", key.code);
        labels.response_code = Value::new(&code);
        labels.grpc_response_status = match key.grpc_status {
            Some(s) => Value::new(&s.to_string()),
            None => Value::new(""),
        };
        labels.response_flags = Value::new(&key.flags.to_string());
        labels.connection_security_policy = Value::new(key.security.as_str());
        if key.grpc {
            labels.request_protocol = Value::new("grpc");
        }
        let inbound = self.inner.reporter == Reporter::Destination;
        if key.peer == u32::MAX {
            if inbound {
                labels.source_principal = Value::new(UNKNOWN);
                labels.source_workload_namespace = Value::new(UNKNOWN);
            } else {
                labels.destination_principal = Value::new(UNKNOWN);
            }
        } else if let Some(id) = facts.peer.filter(|_| key.peer != 0) {
            if inbound {
                labels.source_principal = Value::new(id.as_str());
                labels.source_workload_namespace = Value::or_unknown(id.namespace().unwrap_or(""));
            } else {
                labels.destination_principal = Value::new(id.as_str());
            }
            if let Some(w) = facts.peer_workload {
                let side = Side::of(w);
                if inbound {
                    labels.source_workload = side.workload;
                    labels.source_workload_namespace = side.namespace;
                    labels.source_app = side.app;
                    labels.source_version = side.version;
                    labels.source_canonical_service = side.canonical_service;
                    labels.source_canonical_revision = side.canonical_revision;
                    labels.source_cluster = side.cluster;
                } else {
                    labels.destination_workload = side.workload;
                    labels.destination_workload_namespace = side.namespace;
                    labels.destination_app = side.app;
                    labels.destination_version = side.version;
                    labels.destination_canonical_service = side.canonical_service;
                    labels.destination_canonical_revision = side.canonical_revision;
                    labels.destination_cluster = side.cluster;
                }
            }
        }
        labels
    }

    /// Records one finished request under the Telemetry metric overrides `policy` of
    /// generation `generation`, with `values` the evaluated UPSERT expressions
    /// (`policy.exprs` order). `messages` for gRPC requests.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_overridden(
        &self,
        facts: &RequestFacts<'_>,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
        messages: Option<(u64, u64)>,
        policy: &MetricsPolicy,
        generation: u64,
        values: Vec<Arc<str>>,
    ) {
        let key = self.key(facts);
        let series = self.overridden(key, facts, policy, generation, values);
        if let Some(c) = &series.requests {
            c.inc();
        }
        if let Some(h) = &series.duration {
            h.observe(duration_ms);
        }
        if let Some(h) = &series.request_bytes {
            h.observe(request_bytes as f64);
        }
        if let Some(h) = &series.response_bytes {
            h.observe(response_bytes as f64);
        }
        if let Some((req, res)) = messages.filter(|_| facts.grpc) {
            if let Some(c) = &series.request_messages {
                c.inc_by(req);
            }
            if let Some(c) = &series.response_messages {
                c.inc_by(res);
            }
        }
    }

    fn overridden(
        &self,
        key: Key,
        facts: &RequestFacts<'_>,
        policy: &MetricsPolicy,
        generation: u64,
        mut values: Vec<Arc<str>>,
    ) -> Arc<OverriddenSeries> {
        {
            let cache = self
                .inner
                .overridden
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if cache.0 == generation
                && let Some(s) = cache.1.get(&(key, values.clone()))
            {
                return s.clone();
            }
        }
        let mut cache = self
            .inner
            .overridden
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if cache.0 != generation {
            // A new policy: series of the old one are not looked up again.
            *cache = (generation, HashMap::new());
        }
        let mut key = key;
        let mut base = if cache.1.len() >= self.inner.metrics.series_limit {
            // Past the bound, request-derived values collapse into one overflow series.
            for v in &mut values {
                *v = Arc::from(UNKNOWN);
            }
            key = Key {
                code: 0,
                grpc_status: None,
                flags: ResponseFlags::NONE,
                security: ConnectionSecurity::Unknown,
                grpc: key.grpc,
                peer: u32::MAX,
            };
            self.overflow_labels()
        } else {
            self.labels_for(key, facts)
        };
        if let Some(s) = cache.1.get(&(key, values.clone())) {
            return s.clone();
        }
        base.overrides = None;
        let m = &self.inner.metrics;
        let labels = |metric: Metric| {
            let tags = &policy.tags[metric as usize];
            let mut l = base.clone();
            if !tags.is_empty() {
                let mut o = LabelOverrides {
                    removed: 0,
                    upserts: Vec::new(),
                };
                for (name, action) in tags {
                    match action {
                        TagAction::Remove => {
                            if let Some(i) = HTTP_LABEL_NAMES.iter().position(|n| **n == **name) {
                                o.removed |= 1 << i;
                            }
                            o.upserts.retain(|(n, _)| n != name);
                        }
                        TagAction::Upsert(i) => {
                            if let Some(j) = HTTP_LABEL_NAMES.iter().position(|n| **n == **name) {
                                o.removed &= !(1 << j);
                            }
                            let v = values
                                .get(*i)
                                .cloned()
                                .unwrap_or_else(|| Arc::from(UNKNOWN));
                            o.upserts.push((name.clone(), v));
                        }
                    }
                }
                l.overrides = Some(Arc::new(o));
            }
            l
        };
        let on = |metric: Metric| policy.enabled(metric);
        let series = Arc::new(OverriddenSeries {
            requests: on(Metric::Requests)
                .then(|| m.requests.get_or_create_owned(&labels(Metric::Requests))),
            duration: on(Metric::Duration)
                .then(|| m.duration.get_or_create_owned(&labels(Metric::Duration))),
            request_bytes: on(Metric::RequestBytes).then(|| {
                m.request_bytes
                    .get_or_create_owned(&labels(Metric::RequestBytes))
            }),
            response_bytes: on(Metric::ResponseBytes).then(|| {
                m.response_bytes
                    .get_or_create_owned(&labels(Metric::ResponseBytes))
            }),
            request_messages: (key.grpc && on(Metric::RequestMessages)).then(|| {
                m.request_messages
                    .get_or_create_owned(&labels(Metric::RequestMessages))
            }),
            response_messages: (key.grpc && on(Metric::ResponseMessages)).then(|| {
                m.response_messages
                    .get_or_create_owned(&labels(Metric::ResponseMessages))
            }),
        });
        cache.1.insert((key, values), series.clone());
        series
    }

    fn overflow_labels(&self) -> HttpLabels {
        let mut labels = self.inner.base.clone();
        labels.response_code = Value::new(UNKNOWN);
        labels.grpc_response_status = Value::new(UNKNOWN);
        labels.response_flags = Value::new(UNKNOWN);
        labels.connection_security_policy = Value::new(UNKNOWN);
        if self.inner.reporter == Reporter::Destination {
            labels.source_principal = Value::new(UNKNOWN);
            labels.source_workload_namespace = Value::new(UNKNOWN);
        }
        labels
    }

    fn resolve(&self, labels: &HttpLabels, grpc: bool) -> Series {
        let m = &self.inner.metrics;
        Series {
            requests: m.requests.get_or_create_owned(labels),
            duration: m.duration.get_or_create_owned(labels),
            request_bytes: m.request_bytes.get_or_create_owned(labels),
            response_bytes: m.response_bytes.get_or_create_owned(labels),
            messages: grpc.then(|| {
                (
                    m.request_messages.get_or_create_owned(labels),
                    m.response_messages.get_or_create_owned(labels),
                )
            }),
        }
    }

    /// How many series this handle has created (the overflow series excluded).
    pub fn series_count(&self) -> usize {
        self.inner
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hasher_word_steps_tell_every_byte_and_length_apart() {
        use std::hash::Hasher;
        let hash = |b: &[u8]| {
            let mut h = KeyHasher::default();
            h.write(b);
            h.finish()
        };
        let id = b"spiffe://cluster.local/ns/frontend/sa/web".to_vec();
        let mut seen = std::collections::HashSet::new();
        // Every single-byte change, in full words and in the tail, changes the hash.
        for i in 0..id.len() {
            let mut v = id.clone();
            v[i] ^= 1;
            assert!(seen.insert(hash(&v)), "byte {i}");
        }
        assert!(seen.insert(hash(&id)));
        // Trailing zero bytes are not lost, in whole words or in the tail word.
        for n in 0..24 {
            let mut v = b"x".to_vec();
            v.resize(1 + n, 0);
            assert!(seen.insert(hash(&v)), "{n} zero bytes");
        }
    }

    #[test]
    fn envoy_histogram_buckets_by_upper_bound() {
        let h = EnvoyHistogram::default();
        for v in [0.0, 0.5, 0.6, 1.0, 3_600_000.0, 3_600_000.5, f64::INFINITY] {
            h.observe(v);
        }
        let counts: Vec<u64> = h
            .inner
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        // le=0.5: 0.0 and 0.5; le=1: 0.6 and 1.0; le=3600000: 3600000; +Inf: the rest.
        assert_eq!(counts[0], 2);
        assert_eq!(counts[1], 2);
        assert_eq!(counts[18], 1);
        assert_eq!(counts[19], 2);
        assert_eq!(h.count(), 7);
        let h = EnvoyHistogram::default();
        h.observe(1.5);
        h.observe(2.25);
        assert_eq!(h.sum(), 3.75);
    }

    #[test]
    fn destination_service_from_host() {
        let s = DestinationService::from_host("reviews.default.svc.cluster.local:9080");
        assert_eq!(s.host, "reviews.default.svc.cluster.local");
        assert_eq!(s.name, "reviews");
        assert_eq!(s.namespace, "default");
        let s = DestinationService::from_host("example.com");
        assert_eq!((s.name.as_str(), s.namespace.as_str()), ("example", ""));
    }

    #[test]
    fn tcp_series_have_tcp_labels_and_unknown_defaults() {
        let mut reg = Registry::default();
        let m = IstioMetrics::register(&mut reg);
        let tcp = m.tcp(
            Reporter::Destination,
            &Workload::new("db", "data"),
            &Workload::unknown(),
            &DestinationService::from_host("db.data.svc.cluster.local"),
            ConnectionSecurity::MutualTls,
        );
        tcp.opened();
        tcp.sent(100);
        tcp.received(40);
        tcp.closed();
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).unwrap();
        let line = out
            .lines()
            .find(|l| l.starts_with("istio_tcp_sent_bytes_total{"))
            .unwrap();
        assert!(line.ends_with("} 100"), "{line}");
        for label in [
            "reporter=\"destination\"",
            "request_protocol=\"tcp\"",
            "connection_security_policy=\"mutual_tls\"",
            "source_workload=\"unknown\"",
            "source_canonical_revision=\"latest\"",
            "destination_canonical_revision=\"latest\"",
            "destination_workload=\"db\"",
            "destination_service_namespace=\"data\"",
            "response_flags=\"-\"",
        ] {
            assert!(line.contains(label), "{label} in {line}");
        }
        assert!(!line.contains("response_code"));
        for l in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_connections_closed_total",
            "istio_tcp_received_bytes_total",
        ] {
            assert!(out.lines().any(|x| x.starts_with(l)), "{l}");
        }
    }

    #[test]
    fn series_are_bounded_per_handle() {
        let mut reg = Registry::default();
        let m = IstioMetrics::register(&mut reg).with_series_limit(3);
        let h = m.handle(
            Reporter::Source,
            &Workload::new("a", "ns"),
            &Workload::unknown(),
            &DestinationService::from_host("b.ns.svc.cluster.local"),
        );
        for code in 200..300u16 {
            let facts = RequestFacts {
                response_code: code,
                ..RequestFacts::default()
            };
            h.record(&facts, 1.0, 0, 0);
        }
        assert_eq!(h.series_count(), 3);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).unwrap();
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect();
        assert_eq!(lines.len(), 4, "{out}");
        let overflow = lines
            .iter()
            .find(|l| l.contains("response_code=\"unknown\""))
            .expect("overflow series");
        assert!(overflow.ends_with(" 97"), "{overflow}");
    }

    /// The lock-free first series and the cache's lookup count into the same series,
    /// whichever key came first and in any order.
    #[test]
    fn first_series_fast_path_and_cache_share_counts() {
        let mut reg = Registry::default();
        let m = IstioMetrics::register(&mut reg);
        let h = m.handle(
            Reporter::Source,
            &Workload::new("a", "ns"),
            &Workload::unknown(),
            &DestinationService::from_host("b.ns.svc.cluster.local"),
        );
        let ok = RequestFacts::default();
        let unavailable = RequestFacts {
            response_code: 503,
            flags: ResponseFlags::UPSTREAM_OVERFLOW,
            ..RequestFacts::default()
        };
        for facts in [&unavailable, &ok, &unavailable, &ok, &ok, &unavailable, &ok] {
            h.record(facts, 1.0, 0, 0);
        }
        assert_eq!(h.series_count(), 2);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).unwrap();
        let count = |code: &str| {
            out.lines()
                .find(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains(&format!("response_code=\"{code}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(count("503").as_deref(), Some("3"), "{out}");
        assert_eq!(count("200").as_deref(), Some("4"), "{out}");
    }

    /// The lock-free first peer and the peers' map give every caller its own series.
    #[test]
    fn first_peer_fast_path_and_peer_map_keep_callers_apart() {
        let mut reg = Registry::default();
        let m = IstioMetrics::register(&mut reg);
        let h = m.handle(
            Reporter::Destination,
            &Workload::new("reviews-v2", "default"),
            &Workload::unknown(),
            &DestinationService::from_host("reviews.default.svc.cluster.local"),
        );
        let web = Identity::parse("spiffe://cluster.local/ns/frontend/sa/web").unwrap();
        let batch = Identity::parse("spiffe://cluster.local/ns/jobs/sa/batch").unwrap();
        for peer in [&web, &batch, &web, &web, &batch] {
            let facts = RequestFacts {
                security: ConnectionSecurity::MutualTls,
                peer: Some(peer),
                ..RequestFacts::default()
            };
            h.record(&facts, 1.0, 0, 0);
        }
        assert_eq!(h.series_count(), 2);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg).unwrap();
        let count = |principal: &str, namespace: &str| {
            out.lines()
                .find(|l| {
                    l.starts_with("istio_requests_total{")
                        && l.contains(&format!("source_principal=\"{principal}\""))
                        && l.contains(&format!("source_workload_namespace=\"{namespace}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            count(web.as_str(), "frontend").as_deref(),
            Some("3"),
            "{out}"
        );
        assert_eq!(count(batch.as_str(), "jobs").as_deref(), Some("2"), "{out}");
    }
}
