//! Observability with zero application changes: Istio's standard metrics, latency
//! percentiles, trace propagation and export, and access logs, as one Tower layer.
//!
//! # Behaviour
//!
//! [`TelemetryLayer`] wraps a service on the outbound (`reporter="source"`) or inbound
//! (`reporter="destination"`) side. For every request it
//!
//! - keeps or generates `x-request-id` (UUID v4), extracts the B3 (multi or single) or W3C
//!   trace context, starts a new span per hop under the incoming span, honours an incoming
//!   sampling decision or samples a percentage (default 1 %), and rewrites the trace
//!   headers for the next hop ([`trace`]);
//! - at stream end (the last body frame, trailers, an error, or the client going away)
//!   records Istio's `istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_request_bytes` and `istio_response_bytes` with Istio's exact label names and
//!   Envoy's default buckets through labels resolved when the route or listener was built
//!   ([`metrics`]), an HdrHistogram per destination for p50/p90/p99/p99.9/max
//!   ([`latency`]), an access-log line in Envoy's default format or JSON ([`access_log`]),
//!   and, if sampled, a span to a bounded export queue (OTLP/HTTP or Zipkin v2,
//!   [`trace::export`]).
//!
//! Response flags come from mesh-core's shared vocabulary: flags inner layers add to the
//! response extensions (`FI`, `DI`, `URX`, …) and the classification of errors with
//! [`mesh_core::Outcome`] (503 `UO`, 504 `UT`, 503 `UH`, 404 `NR`, …: [`classify_error`]).
//! [`MetricsRegistry`] renders everything, including the proxy's own [`ProxyMetrics`], in
//! the Prometheus text format for `/metrics`; [`LatencyStats`] renders `/stats`.
//! [`trace::forward_trace_headers`] is the helper applications use to carry the trace
//! headers from an incoming request onto their outgoing calls.
//!
//! Istio's `Telemetry` API ([`policy`]) changes this per direction once a policy is set
//! with [`Telemetry::set_policy`]: sampling, span reporting and custom tags, access-log
//! enablement and CEL filters, metrics disabled and labels removed or upserted. Without
//! a policy nothing of it runs per request.
//!
//! # Layer placement
//!
//! Outbound: outermost, before routing, so local replies (no route, fault aborts,
//! overflow, timeouts) are recorded. Inbound: after the TLS accept path has put
//! `PeerIdentity` and `ConnectionInfo` into the request extensions, before authorization.
//!
//! # Errors
//!
//! The layer never fails a request: an inner error is recorded and returned unchanged (as
//! a `BoxError`). Export and access-log back-pressure drop entries and count them
//! (`mesh_trace_spans_dropped_total`, `mesh_access_log_dropped_total`).
//!
//! # Where we differ from Istio
//!
//! - Sizes: `istio_request_bytes`/`istio_response_bytes` are the header block as HTTP/1.1
//!   frames it plus body bytes (Envoy records wire bytes, ISTIO.md §8 item 4; for HTTP/2 its
//!   compressed header size differs from ours).
//! - Cardinality bound: each route handle creates at most [`metrics::istio::DEFAULT_SERIES_LIMIT`]
//!   series and remembers as many peer identities; past it the request-derived labels read
//!   `unknown`. Authority-derived destinations are bounded the same way. Istio has no bound.
//! - Peer labels: Istio's metadata exchange ([`exchange`]; TM-09 and TM-10 of
//!   `mesh-telemetry/ISTIO.md`) fills the peer's workload, app, version, canonical
//!   service/revision and cluster, but only from an mTLS peer whose SPIFFE namespace is
//!   the one it claims (TM-14); otherwise `source_principal` and
//!   `source_workload_namespace` come from the verified SPIFFE ID and the other peer
//!   labels are `unknown`. The `baggage` form of newer Istio (TM-11) is not read.
//!   `istio_build` is exported (TM-13). TCP connections exchange the same metadata in
//!   Istio's TCP form (a frame at the start of a connection that negotiated
//!   `istio-peer-exchange`: [`exchange::read_tcp_frame`]).
//! - A layer made with [`TelemetryLayer::outbound_by_route`] (the gateway's) labels each
//!   request with the service its route chose (TM-16), read from the
//!   [`RoutedService`](mesh_core::extensions::RoutedService) slot the router fills.
//! - Sampling uses the injected random generator rather than Envoy's decision derived from
//!   the `x-request-id` UUID (`useRequestIdForTraceSampling`); the decision travels in the
//!   trace headers either way.
//! - Extraction reads `b3`, then `x-b3-*`, then `traceparent`; a malformed header is skipped
//!   and the next format is tried. Injection writes B3 multi-header and W3C by default, plus
//!   the format the request arrived with.
//! - The proxy's own metrics are named `mesh_*` (Envoy's cluster stats have no direct
//!   Istio-standard equivalent). TCP metrics are an API ([`TcpMetrics`]) for the proxy's
//!   TCP path.
//! - gRPC message counters (`istio_request_messages_total`, `istio_response_messages_total`,
//!   TM-15) are counted by following gRPC's length-prefixed framing in each direction and
//!   added when the stream ends, with the other request metrics.
//! - `promtool check metrics` flags Istio's `istio_request_duration_milliseconds` name
//!   (base unit lint); we keep Istio's name so dashboards and Kiali work.
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
//! let telemetry = Telemetry::builder(Workload::new("reviews-v1", "default"))
//!     .sampling(10.0)
//!     .build();
//! let app = ServiceBuilder::new()
//!     .layer(TelemetryLayer::inbound(
//!         &telemetry,
//!         DestinationService::from_host("reviews.default.svc.cluster.local"),
//!     ))
//!     .service_fn(|req: Request<_>| async move {
//!         // The application sees this hop's span as its parent context.
//!         assert!(req.headers().contains_key("x-b3-spanid"));
//!         Ok::<_, std::convert::Infallible>(Response::new(body::full("ok")))
//!     });
//! let res = app.oneshot(Request::new(body::empty())).await.unwrap();
//! http_body_util::BodyExt::collect(res.into_body()).await.unwrap();
//! let text = telemetry.encode_metrics();
//! assert!(text.contains("reporter=\"destination\""));
//! assert!(text.contains("istio_request_duration_milliseconds_bucket"));
//! # }
//! ```

pub mod access_log;
pub mod exchange;
pub mod grpc;
pub mod latency;
pub mod layer;
pub mod metrics;
pub mod policy;
pub mod trace;

pub use latency::{LatencyHandle, LatencyStats, LatencySummary};
pub use layer::{
    RequestBody, ResponseBody, ResponseFuture, Target, Telemetry, TelemetryBuilder, TelemetryLayer,
    TelemetryService,
};
pub use metrics::{
    DestinationMetrics, DestinationService, IstioMetrics, MetricsHandle, MetricsRegistry,
    ProxyMetrics, Reporter, RequestFacts, Series, TcpMetrics, Workload, classify_error, status_for,
};
