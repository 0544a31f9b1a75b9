//! Connection-pool limits (DestinationRule `connectionPool`, ISTIO.md §2.3, DR-20..DR-23).
//!
//! [`PoolLimitLayer`] bounds the requests in flight to one destination and the requests
//! waiting for capacity. A request that finds both full is answered at once with
//! [`Overflow`](mesh_core::error::Overflow); the proxy turns it into 503 with
//! `x-envoy-overloaded: true`, body `… reset reason: overflow` and flag `UO`, and the
//! retry layer never retries it. A request's permit is released when its response BODY
//! ends (or is dropped), not when the headers arrive.
//!
//! Counting is per proxy per destination (DR-21, our pinned choice 3): build one layer per
//! destination; every service it makes and every clone shares the counters.
//!
//! Over HTTP/1.1 a request in flight occupies one connection, so the in-flight bound is
//! `min(maxConnections, http2MaxRequests)` and `http1MaxPendingRequests` bounds the wait
//! for a connection. Over HTTP/2 ([`PoolLimits::multiplexed`]) the bound is
//! `http2MaxRequests`. `maxConnections` for multiplexed pools, `maxRequestsPerConnection`
//! and `idleTimeout` are connection settings: the connector applies them
//! ([`PoolLimits`] carries them). `maxRetries` is enforced by the retry layer through the
//! destination's [`RetryGate`].
//!
//! # Layer placement
//!
//! Per destination, above the balancer (or on each endpoint service, made from the same
//! layer): `retry -> pool limit -> balancer -> endpoint`.
//!
//! # Errors
//!
//! [`Overflow`](mesh_core::error::Overflow) when full; inner errors pass through as
//! [`BoxError`](mesh_core::BoxError).
//!
//! # Example
//!
//! ```
//! use mesh_resilience::limit::{PoolLimitLayer, PoolLimits};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let limits = PoolLimits { max_connections: 1, http1_max_pending_requests: 1, ..PoolLimits::default() };
//! let svc = ServiceBuilder::new()
//!     .layer(PoolLimitLayer::new(limits))
//!     .service(service_fn(|_req: http::Request<()>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(mesh_core::body::empty()))
//!     }));
//! let res = svc.oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```

pub mod pool;

pub use pool::{PoolLimit, PoolLimitLayer, PoolLimits, RetryGate, RetryPermit};
