//! Outlier detection: passive health checking per endpoint (DestinationRule
//! `outlierDetection`, ISTIO.md DR-30..DR-41).
//!
//! Every outcome of a request to an endpoint is classified once ([`mesh_core::Outcome`])
//! and recorded in the [`OutlierDetector`]:
//!
//! - A 5xx response counts towards `consecutive5xxErrors`; 502/503/504 also towards
//!   `consecutiveGatewayErrors`; connect failures, resets and timeouts (local-origin
//!   failures) count towards both, or only towards `consecutiveLocalOriginFailures` when
//!   `splitExternalLocalOriginErrors` is set. Any other response resets the streaks;
//!   overflow and deadline expiry say nothing about the endpoint and are ignored (DR-31).
//! - The N-th consecutive error ejects the endpoint at once (DR-33), for
//!   `min(baseEjectionTime × k, max(300 s, baseEjectionTime))` where the multiplier `k`
//!   grows on each ejection and decays by one per healthy interval (DR-34).
//! - Un-ejection happens at the first interval sweep after the ejection time (DR-35).
//! - The max-ejection cap uses current Envoy's rounding: a new ejection needs
//!   `100 × (ejected + 1) / total ≤ maxEjectionPercent`, so 50 % of 3 hosts is 1 and the
//!   default 10 % ejects nothing below 10 hosts (DR-36, our pinned choice 2), with
//!   Envoy's optional `always_eject_one_host` ([`OutlierConfig::always_eject_one_host`]).
//! - Below `minHealthPercent` healthy hosts the balancer enters panic mode and uses every
//!   host (DR-39); with every host ejected and no panic the answer is `NoHealthyUpstream`
//!   (503 `UH`, DR-40).
//!
//! Ejection only makes an endpoint ineligible for picking; it is never removed.
//! Success-rate ejection is not implemented (Istio always disables it, DR-30).
//!
//! # Layer placement
//!
//! Owned by the [`Balance`](crate::balance::Balance) of a destination, which records
//! outcomes and skips ejected endpoints. The detector can also be driven directly.
//!
//! # Errors
//!
//! None: the detector only changes which endpoints are eligible.
//!
//! # Example
//!
//! ```
//! use mesh_core::Outcome;
//! use mesh_resilience::outlier::{OutlierConfig, OutlierDetector};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let detector = OutlierDetector::new(OutlierConfig { max_ejection_percent: 50, ..OutlierConfig::default() });
//! let hosts: Vec<_> = (0..3).map(|_| detector.register()).collect();
//! let error = Outcome::Response { status: 503, grpc_status: None };
//! for host in &hosts {
//!     for _ in 0..5 {
//!         detector.record(host, &error);
//!     }
//! }
//! // 50 % of 3 hosts is 1 host.
//! assert_eq!(detector.ejected_count(), 1);
//! # }
//! ```

pub mod config;
pub mod detector;

pub use config::OutlierConfig;
pub use detector::{HostHealth, OutlierDetector};
