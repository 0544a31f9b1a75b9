//! Istio's standard metrics and the proxy's own metrics, exposed in Prometheus text format.
//!
//! - [`istio`]: `istio_requests_total`, `istio_request_duration_milliseconds`,
//!   `istio_request_bytes`, `istio_response_bytes` and the TCP families, with Istio's exact
//!   names, types, label names and Envoy's default histogram buckets (ISTIO.md TM-01..TM-07).
//!   Labels are resolved once per route or endpoint into a [`MetricsHandle`]; a request only
//!   increments.
//! - [`prometheus`]: the [`MetricsRegistry`] that renders everything in the Prometheus text
//!   format (0.0.4, what `promtool check metrics` and a Prometheus server read), and
//!   [`ProxyMetrics`], the proxy's own families (config reloads, certificate expiry,
//!   ejections, pool overflows, retries, active connections, span export).
//!
//! Errors from inner layers carry no status; [`status_for`] maps the shared
//! [`Outcome`] classification to the status the proxy answers with, which is the
//! `response_code` label Istio records for locally generated replies.
//!
//! # Example
//!
//! ```
//! use mesh_core::ResponseFlags;
//! use mesh_telemetry::{DestinationService, MetricsRegistry, Reporter, RequestFacts, Workload};
//!
//! let registry = MetricsRegistry::new();
//! // When the route is built: resolve its labels once.
//! let handle = registry.istio().handle(
//!     Reporter::Source,
//!     &Workload::new("productpage-v1", "default"),
//!     &Workload::unknown(),
//!     &DestinationService::from_host("reviews.default.svc.cluster.local"),
//! );
//! // Per request: only increments.
//! let facts = RequestFacts {
//!     response_code: 503,
//!     flags: ResponseFlags::UPSTREAM_OVERFLOW,
//!     ..RequestFacts::default()
//! };
//! handle.record(&facts, 0.8, 120, 91);
//! let text = registry.encode();
//! assert!(text.contains("response_code=\"503\""));
//! assert!(text.contains("response_flags=\"UO\""));
//! assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
//! ```

pub mod istio;
pub mod prometheus;

pub use istio::{
    DEFAULT_BUCKETS, DestinationService, EnvoyHistogram, IstioMetrics, MetricsHandle, Reporter,
    RequestFacts, Series, TcpMetrics, Workload,
};
pub use prometheus::{DestinationMetrics, MetricsRegistry, ProxyMetrics};

use mesh_core::error::{ClusterNotFound, NoRoute};
use mesh_core::{BoxError, Outcome, ResponseFlags, is_caused_by};

/// The status Istio's proxy answers with for an outcome (the `response_code` label).
///
/// Responses keep their status; overflow, no healthy upstream, connect failures and resets
/// are 503; timeouts are 504; any other local error is 500.
pub fn status_for(outcome: &Outcome) -> u16 {
    match outcome {
        Outcome::Response { status, .. } => *status,
        Outcome::DeadlineExceeded | Outcome::PerTryTimeout => 504,
        Outcome::Overflow
        | Outcome::NoHealthyUpstream
        | Outcome::ConnectFailure
        | Outcome::Reset { .. } => 503,
        Outcome::LocalError => 500,
    }
}

/// Classifies an error from an inner layer: the status the proxy answers with and the
/// response flags the error implies (`UO`, `UT`, `UH`, `NR`, `NC`, …).
pub fn classify_error(err: &BoxError) -> (u16, ResponseFlags) {
    let e: &(dyn std::error::Error + 'static) = err.as_ref();
    if is_caused_by::<NoRoute>(e) {
        return (404, ResponseFlags::NO_ROUTE_FOUND);
    }
    if is_caused_by::<ClusterNotFound>(e) {
        return (503, ResponseFlags::NO_CLUSTER_FOUND);
    }
    let outcome = Outcome::from_error(err);
    (status_for(&outcome), outcome.response_flags())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::error::{DeadlineExceeded, NoHealthyUpstream, Overflow};

    #[test]
    fn errors_map_to_istio_status_and_flags() {
        let cases: Vec<(BoxError, u16, &str)> = vec![
            (Box::new(Overflow), 503, "UO"),
            (Box::new(DeadlineExceeded), 504, "UT"),
            (Box::new(NoHealthyUpstream), 503, "UH"),
            (Box::new(NoRoute), 404, "NR"),
            (Box::new(ClusterNotFound("x".into())), 503, "NC"),
            (Box::new(std::io::Error::other("boom")), 500, "-"),
        ];
        for (err, status, flags) in cases {
            let (s, f) = classify_error(&err);
            assert_eq!((s, f.to_string().as_str()), (status, flags), "{err}");
        }
    }
}
