//! Observability with zero application changes.
//!
//! This crate owns: Istio's standard metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, …) with Prometheus exposition, HdrHistogram
//! latency percentiles, B3 and W3C trace-context propagation with sampling,
//! OpenTelemetry span export and the access log.

pub mod access_log;
pub mod latency;
pub mod layer;
pub mod metrics;
pub mod trace;

pub use latency::{LatencyHandle, LatencyStats, LatencySummary};
pub use metrics::{
    DestinationMetrics, DestinationService, IstioMetrics, MetricsHandle, MetricsRegistry,
    ProxyMetrics, Reporter, RequestFacts, Series, TcpMetrics, Workload, classify_error,
    status_for,
};
pub use layer::{
    RequestBody, ResponseBody, ResponseFuture, Target, Telemetry, TelemetryBuilder,
    TelemetryLayer, TelemetryService,
};
