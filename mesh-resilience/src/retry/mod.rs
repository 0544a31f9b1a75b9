//! Retries (VirtualService `retries`, ISTIO.md VS-50..VS-67).
//!
//! [`RetryLayer`] makes up to `1 + attempts` upstream attempts of a request:
//!
//! - Each attempt carries `x-envoy-attempt-count: n` (VS-61) and, for a retry, the
//!   endpoints already tried ([`PreviousHosts`](crate::balance::PreviousHosts)) so the
//!   balancer avoids them when another endpoint is available (VS-63).
//! - An attempt is retried when its [`Outcome`](mesh_core::Outcome) matches `retryOn`
//!   ([`RetryOn`], VS-55): an overflow never is (VS-56), a per-try timeout only under
//!   `5xx`, `gateway-error` or `reset` (VS-57). The decision is made on the response
//!   head; once a response is handed to the caller nothing is retried.
//! - `perTryTimeout` bounds each attempt up to its response head; it is clipped to the
//!   request's [`RequestDeadline`](crate::deadline::RequestDeadline) and ignored when at
//!   least the route timeout (VS-58). The deadline also bounds every back-off sleep.
//! - The request's deadline is the one current during this layer's `call` (set by a
//!   [`DeadlineLayer`](crate::deadline::DeadlineLayer) outside), or carried by the
//!   request as an extension, or, with [`RetryLayer::with_deadline`], the route timeout
//!   this layer applies itself (the same semantics, including `grpc-timeout`, in one
//!   future with one timer). Around each attempt's `call` the layer makes the request's
//!   and the attempt's deadlines current ([`CallDeadlines`](crate::deadline::CallDeadlines)),
//!   so the balancer inside enforces them and charges the endpoint that timed out; the
//!   contract and its limit (a layer that defers `call` to another task) are in
//!   [`deadline`](crate::deadline).
//! - Back-off is fully jittered exponential ([`Backoff`], VS-59). A request's jitter is
//!   drawn from the service's seed (reseeded per clone) and the request's number there,
//!   mixed only when a retry actually waits.
//! - When retries are exhausted the caller gets the last upstream response with flag
//!   `URX` (VS-62), or the last error wrapped in [`RetriesExhausted`].
//! - The first attempt is called from this layer's `call` (the inner service is ready
//!   then) with the caller's own request, unless the body must be read first. A copy of
//!   the head is kept for later attempts only when the body is replayable: the header
//!   names and values as raw bytes, with method, URI and extensions; names and values
//!   are rebuilt only when a retry is sent. Copying bytes rather than cloning matters:
//!   the first clone of a name or value parsed off the wire makes the `bytes` crate
//!   share its bytes, one allocation each. The walk over the headers that copies them
//!   also notes `content-type` and `grpc-timeout`, so the deadline of a bodiless
//!   request needs no lookup of its own (VS-42). The copy, the body kept for replay,
//!   the timer, the hosts tried and a retry's place under its limit, all of which
//!   matter only once an attempt waits or is retried, live in storage taken from a
//!   per-thread pool and given back when the request ends: the future itself holds the
//!   attempt in flight and a few words, and is cheap to move. A bodiless request
//!   answered at once thus costs no allocation in this layer, with or without a
//!   deadline; only a request's own extensions, when it has any, are cloned.
//! - Request bodies are buffered eagerly up to
//!   [`replay_limit`](RetryPolicy::replay_limit) (64 KiB); larger bodies go once,
//!   unretried (VS-67).
//! - A shared [`RetryBudget`] and the destination's `maxRetries`
//!   [`RetryGate`](crate::limit::RetryGate) bound retry amplification (VS-64); a
//!   DestinationRule `retryBudget` ([`ConcurrentRetryBudget`]) takes the gate's place.
//!
//! Our choices: request headers `x-envoy-retry-on`, `x-envoy-max-retries`,
//! `x-envoy-retriable-status-codes` and friends are not honoured (VS-66; the edge must
//! strip them). `retriable-headers` uses [`RetryPolicy::retriable_headers`]. No hedging.
//!
//! # Layer placement
//!
//! Per route, inside the deadline: `deadline -> retry -> pool limit -> balancer -> endpoint`,
//! or `retry (with_deadline) -> pool limit -> balancer -> endpoint`. Nothing between the
//! deadline and the balancer may defer `call` to another task (see
//! [`deadline`](crate::deadline)). The inner service must be `Clone` (a ready clone is
//! used per request).
//!
//! # Errors
//!
//! [`DeadlineExceeded`](mesh_core::error::DeadlineExceeded) when the request's deadline
//! passes; [`PerTryTimeout`](mesh_core::error::PerTryTimeout) when the last attempt
//! timed out; [`RetriesExhausted`] around the last error when retries ran out; other
//! inner errors as they are.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::BoxBody;
//! use mesh_resilience::deadline::DeadlineLayer;
//! use mesh_resilience::retry::{RetryLayer, RetryOn, RetryPolicy};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let policy = RetryPolicy::with_attempts(3)
//!     .per_try_timeout(Some(Duration::from_secs(2)))
//!     .retry_on(RetryOn::parse("gateway-error,connect-failure,503").unwrap());
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Some(Duration::from_secs(5))))
//!     .layer(RetryLayer::new(policy))
//!     .service(service_fn(|req: http::Request<BoxBody>| async move {
//!         let n = req.headers()["x-envoy-attempt-count"].to_str().unwrap().to_owned();
//!         let status = if n == "3" { 200 } else { 503 };
//!         let res = http::Response::builder().status(status).body(n).unwrap();
//!         Ok::<_, std::convert::Infallible>(res)
//!     }));
//! let res = svc.oneshot(http::Request::new(mesh_core::body::empty())).await.unwrap();
//! assert_eq!((res.status().as_u16(), res.body().as_str()), (200, "3"));
//! # }
//! ```
//!
//! The same route with the retry layer applying the route timeout itself:
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::BoxBody;
//! use mesh_resilience::deadline::{CallDeadlines, DeadlineLayer};
//! use mesh_resilience::retry::{RetryLayer, RetryPolicy};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = RetryLayer::new(RetryPolicy::istio_default())
//!     .with_deadline(DeadlineLayer::new(Some(Duration::from_secs(5))))
//!     .layer(service_fn(|req: http::Request<BoxBody>| {
//!         // The layers inside see the route's deadline in their `call`.
//!         let timeout = CallDeadlines::of(&req).request.map(|d| d.timeout);
//!         async move { Ok::<_, std::convert::Infallible>(http::Response::new(timeout)) }
//!     }));
//! let res = svc.oneshot(http::Request::new(mesh_core::body::empty())).await.unwrap();
//! assert_eq!(*res.body(), Some(Duration::from_secs(5)));
//! # }
//! ```

pub mod backoff;
pub mod budget;
mod future;
mod head;
mod layer;
pub mod policy;
mod replay;

use std::fmt;

use mesh_core::BoxError;

pub use backoff::Backoff;
pub use budget::{ConcurrentRetryBudget, RetryBudget};
pub use future::{Attempts, ResponseFuture};
pub use layer::{Retry, RetryLayer};
pub use policy::{RetryOn, RetryOnError, RetryPolicy};

/// The request header carrying the attempt number (VS-61).
pub const ATTEMPT_COUNT: http::HeaderName = http::HeaderName::from_static("x-envoy-attempt-count");

/// The last attempt's error after retries ran out (the proxy adds flag `URX`).
///
/// It displays as its cause, so the body the caller sees is the cause's (`… reset reason:
/// connection failure`), and the cause stays findable with
/// [`is_caused_by`](mesh_core::is_caused_by).
pub struct RetriesExhausted {
    attempts: u32,
    source: BoxError,
}

impl RetriesExhausted {
    /// How many attempts were made.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

impl fmt::Debug for RetriesExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetriesExhausted")
            .field("attempts", &self.attempts)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for RetriesExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for RetriesExhausted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

#[cfg(test)]
mod tests;
