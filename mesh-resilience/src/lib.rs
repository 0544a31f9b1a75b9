//! Reliability as Tower layers: the route's deadline, retries, outlier detection with the
//! max-ejection cap, load balancing that skips ejected endpoints, and connection-pool
//! limits, with Istio's semantics (see each module).
//!
//! A typical outbound stack, outermost first:
//!
//! ```text
//! DeadlineLayer (route timeout)            the request's deadline, current during the inner calls
//!   -> RetryLayer (route retries)          attempts, perTryTimeout, retryOn, back-off, budget
//!     -> PoolLimitLayer (destination)      maxConnections / pending / maxRequests -> Overflow
//!       -> Balance (destination)           LEAST_REQUEST / ROUND_ROBIN / RANDOM / consistent hash,
//!                                          slow start, outlier detection
//!         -> endpoint service              made per mesh_core::Endpoint by the caller
//! ```
//!
//! [`RetryLayer::with_deadline`] folds the first two into one layer (one future and one
//! timer per request, the same behaviour); the proxy's route stack uses it.
//!
//! The deadlines travel *call-scoped* (see [`deadline`]): the deadline layer and the retry
//! layer make the request's deadline ([`deadline::RequestDeadline`]) and the attempt's
//! ([`deadline::AttemptDeadline`]) current on their thread for exactly the synchronous
//! duration of their inner service's `call`, and the balancer reads them in its `call`
//! ([`deadline::CallDeadlines`]). Request extensions box every value (three allocations
//! on a request without any), which the success path of these layers cannot afford; a
//! deadline an embedder inserts as an extension is still honoured (the earlier wins), and
//! is the way to carry one past a layer that defers `call` to another task (a buffer),
//! which the call-scoped deadlines do not cross. The other contracts between the layers
//! are request and response extensions: the hosts already tried
//! ([`balance::PreviousHosts`]), the host that answered ([`mesh_core::UpstreamHost`]) and
//! the response flags (`URX`, `UO`). Every layer classifies outcomes with the one
//! [`mesh_core::Outcome`] and returns the leaf errors of [`mesh_core::error`]
//! (`DeadlineExceeded`, `PerTryTimeout`, `Overflow`, `NoHealthyUpstream`); turning them
//! into HTTP responses is the proxy's job.
//!
//! Where we choose differently from Istio/Envoy:
//!
//! - Retries are decided on the response head; Envoy does the same, but we also never
//!   honour the `x-envoy-retry-*` request headers (VS-66).
//! - Previous-host avoidance filters tried endpoints out deterministically instead of
//!   re-picking at random up to 5 times.
//! - A consistent-hash table keeps an ejected endpoint and walks past it to the next
//!   eligible entry, so only its keys move; Envoy rebuilds the table over the healthy
//!   hosts. Tables for a changed endpoint set are built exactly as Envoy builds them.
//! - Slow-start weights are applied by a golden-ratio sequence (round robin) and a
//!   weighted draw (least request) instead of Envoy's EDF schedule, with the same shares.
//! - Outlier sweeps run lazily instead of on a background timer: a pick that meets an
//!   ejected endpoint (or runs in panic mode), an ejection, or
//!   [`Balance::is_ejected`] replays every sweep that fell due, at its own time on the
//!   interval grid. Sweeps only un-eject and decay, so every pick and every ejection is
//!   the one a timer would give, and most picks read no clock.
//! - The retry layer sends the first attempt with the caller's own request head, from its
//!   `call`, and keeps a copy for replay as raw bytes in pooled storage (see [`retry`]).
//! - Deadlines reach the inner layers call-scoped rather than as request extensions (see
//!   above and [`deadline`]).
//! - Pool limits are counted per proxy per destination (DR-21); connection-level settings
//!   (`maxRequestsPerConnection`, `idleTimeout`, `maxConnections` over HTTP/2) are carried
//!   in [`limit::PoolLimits`] for the connector to apply.
//! - The retry budget is Linkerd's (ratio of requests plus a floor per second over a
//!   window), not Envoy's concurrency-based budget.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::{BoxBody, Endpoint};
//! use mesh_resilience::{Balance, DeadlineLayer, LbPolicy, OutlierConfig, PoolLimitLayer,
//!     PoolLimits, RetryLayer, RetryPolicy};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let balance = Balance::new(LbPolicy::LeastRequest, Some(OutlierConfig::default()), |_ep: &Endpoint| {
//!     service_fn(|_req: http::Request<BoxBody>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(mesh_core::body::empty()))
//!     })
//! });
//! balance.update([Endpoint::new("10.0.0.1:8080".parse().unwrap())]);
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Some(Duration::from_secs(5))))
//!     .layer(RetryLayer::new(RetryPolicy::istio_default()))
//!     .layer(PoolLimitLayer::new(PoolLimits::default()))
//!     .service(balance);
//! let res = svc.oneshot(http::Request::new(mesh_core::body::empty())).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```

pub mod balance;
pub mod body;
pub mod deadline;
pub mod istio;
pub mod limit;
pub mod outlier;
pub mod retry;

pub use balance::{
    Balance, ConsistentHash, HashAlgorithm, HashCookie, HashKey, LbConfig, LbPolicy, LocalityLb,
    Origin, PreviousHosts, RetryRemoteLocalities, SlowStart,
};
pub use deadline::{AttemptDeadline, CallDeadlines, DeadlineLayer, RequestDeadline};
pub use istio::UnsupportedLb;
pub use limit::{PoolLimitLayer, PoolLimits, RetryGate};
pub use outlier::{OutlierConfig, OutlierDetector};
pub use retry::{Backoff, RetriesExhausted, RetryBudget, RetryLayer, RetryOn, RetryPolicy};

/// Derives the seed of the `n`-th clone from a base seed (splitmix64), so that clones of
/// a seeded service get distinct, reproducible random sequences.
pub(crate) fn mix_seed(base: u64, n: u64) -> u64 {
    let mut z = base ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
