//! Fault injection (VS-70..VS-74): delay a request, abort it locally, or both.
//!
//! Each fault applies to a percentage of requests with 0.0001 % precision; an omitted
//! percentage means 0 % (our pinned choice 5, the behaviour Istio always had). A delayed
//! request is marked `DI`, an aborted one `FI` with the body `fault filter abort`. An
//! abort is a local reply made before any upstream attempt, so nothing retries it.
//!
//! # Layer placement
//!
//! Faults are per route, so the [`Router`](crate::Router) applies them after the route is
//! chosen and before the destination service (with its retries) is called.
//!
//! # Errors
//!
//! None: an abort is a response ([`abort_response`]), not an error.
//!
//! # Example
//!
//! ```
//! use http::StatusCode;
//! use mesh_routing::{AbortStatus, FaultPolicy, Percent};
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! let fault = FaultPolicy {
//!     delay: None,
//!     abort: Some((AbortStatus::Http(StatusCode::SERVICE_UNAVAILABLE), Percent::from_percent(100.0))),
//! };
//! let decision = fault.decide(&mut SmallRng::seed_from_u64(1));
//! assert_eq!(decision.abort, Some(AbortStatus::Http(StatusCode::SERVICE_UNAVAILABLE)));
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use mesh_core::body::{self, BoxBody};
use mesh_core::extensions::add_response_flags;
use mesh_core::flags::ResponseFlags;
use rand::Rng;

/// A share of requests, in millionths (`percentage.value` of Istio times 10 000).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Percent(u32);

impl Percent {
    /// No request.
    pub const NONE: Self = Self(0);
    /// Every request.
    pub const ALL: Self = Self(1_000_000);

    /// From Istio's `percentage.value` (0–100, clamped), rounded to the nearest millionth.
    pub fn from_percent(value: f64) -> Self {
        let clamped = if value.is_nan() {
            0.0
        } else {
            value.clamp(0.0, 100.0)
        };
        Self((clamped * 10_000.0).round() as u32)
    }

    /// The share in millionths.
    pub fn per_million(self) -> u32 {
        self.0
    }

    /// Decides whether one request falls into the share.
    pub fn roll<R: Rng + ?Sized>(self, rng: &mut R) -> bool {
        match self.0 {
            0 => false,
            1_000_000.. => true,
            n => rng.random_range(0..1_000_000) < n,
        }
    }
}

/// What an abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortStatus {
    /// `httpStatus` (200–599).
    Http(StatusCode),
    /// `grpcStatus`, as its numeric code (`UNAVAILABLE` = 14).
    Grpc(u32),
}

/// A route's `fault` block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPolicy {
    /// `delay.fixedDelay` and its percentage.
    pub delay: Option<(Duration, Percent)>,
    /// `abort` and its percentage.
    pub abort: Option<(AbortStatus, Percent)>,
}

/// What happens to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    /// Wait this long before continuing.
    pub delay: Option<Duration>,
    /// Then answer locally with this status.
    pub abort: Option<AbortStatus>,
}

impl FaultPolicy {
    /// Whether the policy can ever act.
    pub fn is_active(&self) -> bool {
        self.delay.is_some_and(|(_, p)| p != Percent::NONE)
            || self.abort.is_some_and(|(_, p)| p != Percent::NONE)
    }

    /// Rolls the delay and the abort independently (a request may get both).
    pub fn decide<R: Rng + ?Sized>(&self, rng: &mut R) -> FaultDecision {
        FaultDecision {
            delay: self.delay.and_then(|(d, p)| p.roll(rng).then_some(d)),
            abort: self.abort.and_then(|(a, p)| p.roll(rng).then_some(a)),
        }
    }
}

/// The body Envoy's fault filter answers an abort with.
pub const ABORT_BODY: &str = "fault filter abort";

/// The local reply for an abort, flagged `FI`.
pub fn abort_response(status: AbortStatus) -> Response<BoxBody> {
    let mut res = match status {
        AbortStatus::Http(code) => {
            let mut res = Response::new(body::full(Bytes::from_static(ABORT_BODY.as_bytes())));
            *res.status_mut() = code;
            res.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            res
        }
        AbortStatus::Grpc(code) => {
            // A gRPC abort is a trailers-only response: HTTP 200 with the status in headers.
            let mut res = Response::new(body::empty());
            let headers = res.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert("grpc-message", HeaderValue::from_static(ABORT_BODY));
            res
        }
    };
    add_response_flags(res.extensions_mut(), ResponseFlags::FAULT_INJECTED);
    res
}

/// The numeric code of a gRPC status name (`UNAVAILABLE` → 14).
pub use mesh_core::grpc::status_code as grpc_code;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use mesh_core::extensions::response_flags;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn omitted_percentage_never_fires() {
        let policy = FaultPolicy {
            delay: Some((Duration::from_secs(7), Percent::NONE)),
            abort: Some((
                AbortStatus::Http(StatusCode::INTERNAL_SERVER_ERROR),
                Percent::NONE,
            )),
        };
        assert!(!policy.is_active());
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..1000 {
            assert_eq!(policy.decide(&mut rng), FaultDecision::default());
        }
    }

    #[test]
    fn hundred_percent_always_fires_both_faults() {
        let policy = FaultPolicy {
            delay: Some((Duration::from_secs(7), Percent::from_percent(100.0))),
            abort: Some((
                AbortStatus::Http(StatusCode::INTERNAL_SERVER_ERROR),
                Percent::ALL,
            )),
        };
        let mut rng = SmallRng::seed_from_u64(1);
        let d = policy.decide(&mut rng);
        assert_eq!(d.delay, Some(Duration::from_secs(7)));
        assert_eq!(
            d.abort,
            Some(AbortStatus::Http(StatusCode::INTERNAL_SERVER_ERROR))
        );
    }

    #[test]
    fn percentage_has_millionth_precision_and_is_clamped() {
        assert_eq!(Percent::from_percent(0.0001).per_million(), 1);
        assert_eq!(Percent::from_percent(12.5).per_million(), 125_000);
        assert_eq!(Percent::from_percent(150.0), Percent::ALL);
        assert_eq!(Percent::from_percent(-1.0), Percent::NONE);
        assert_eq!(Percent::from_percent(f64::NAN), Percent::NONE);
    }

    #[test]
    fn ten_percent_abort_fires_about_ten_percent_of_the_time() {
        let p = Percent::from_percent(10.0);
        let mut rng = SmallRng::seed_from_u64(99);
        let n = 20_000;
        let hits = (0..n).filter(|_| p.roll(&mut rng)).count() as f64;
        let e1 = n as f64 * 0.1;
        let e0 = n as f64 * 0.9;
        let chi = (hits - e1).powi(2) / e1 + ((n as f64 - hits) - e0).powi(2) / e0;
        assert!(chi < 10.83, "hits {hits}");
    }

    #[tokio::test]
    async fn http_abort_answers_with_status_body_and_fi_flag() {
        let res = abort_response(AbortStatus::Http(StatusCode::from_u16(555).unwrap()));
        assert_eq!(res.status().as_u16(), 555);
        assert_eq!(response_flags(res.extensions()).to_string(), "FI");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "fault filter abort");
    }

    #[test]
    fn grpc_abort_is_trailers_only_with_the_numeric_status() {
        let res = abort_response(AbortStatus::Grpc(grpc_code("UNAVAILABLE").unwrap()));
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(response_flags(res.extensions()).to_string(), "FI");
        assert_eq!(grpc_code("NOPE"), None);
    }
}
