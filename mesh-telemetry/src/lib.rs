//! Observability with zero application changes.
//!
//! This crate owns: Istio's standard metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, …) with Prometheus exposition, HdrHistogram
//! latency percentiles, B3 and W3C trace-context propagation with sampling,
//! OpenTelemetry span export and the access log.
