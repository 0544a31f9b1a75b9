//! One classification of each upstream outcome, read by retry, outlier detection and
//! telemetry alike, so the three never disagree about what happened.
//!
//! Semantics (ISTIO.md DR-31, VS-55): a response 500–599 is a 5xx error; 502, 503 and
//! 504 are also gateway errors; locally originated failures (connect failure, reset,
//! timeout) count as both. Overflow is a local decision about our own capacity and
//! counts as neither (the endpoint did nothing wrong).

use crate::error::{
    BoxError, ConnectFailure, DeadlineExceeded, NoHealthyUpstream, Overflow, PerTryTimeout,
    ResetReason, UpstreamReset, find_cause, is_caused_by,
};
use crate::flags::ResponseFlags;

/// What one upstream attempt (or the whole request) came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived with this status; `grpc_status` is read from the headers
    /// (trailers-only gRPC responses), `None` when absent.
    Response {
        /// HTTP status code.
        status: u16,
        /// `grpc-status` header value, if any.
        grpc_status: Option<u16>,
    },
    /// The connection could not be established (refused, connect timeout, TLS failure).
    ConnectFailure,
    /// The stream was reset or the connection closed before a complete response.
    Reset {
        /// Why.
        reason: ResetReason,
        /// Whether request bytes had reached the upstream.
        request_sent: bool,
    },
    /// The attempt exceeded `perTryTimeout`.
    PerTryTimeout,
    /// The route's outer deadline passed.
    DeadlineExceeded,
    /// A connection-pool limit refused the request locally.
    Overflow,
    /// No endpoint could be picked.
    NoHealthyUpstream,
    /// Any other local error.
    LocalError,
}

/// The `grpc-status` of a response's headers or trailers, when present and numeric.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<u16> {
    // A `HeaderName` key is hashed as it is; a `&str` would be parsed first. A `static`,
    // as a `const` would build and drop a temporary name at each use.
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    if headers.is_empty() {
        // `get` hashes the name before it finds the map empty.
        return None;
    }
    headers
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

impl Outcome {
    /// Classifies a response by its head.
    pub fn from_response<B>(res: &http::Response<B>) -> Self {
        Self::from_parts(res.status(), res.headers())
    }

    /// Classifies a status and headers.
    pub fn from_parts(status: http::StatusCode, headers: &http::HeaderMap) -> Self {
        Self::Response {
            status: status.as_u16(),
            grpc_status: grpc_status(headers),
        }
    }

    /// Classifies an error by the leaf error types of [`crate::error`] in its chain.
    pub fn from_error(err: &BoxError) -> Self {
        let err: &(dyn std::error::Error + 'static) = err.as_ref();
        if is_caused_by::<Overflow>(err) {
            Self::Overflow
        } else if is_caused_by::<DeadlineExceeded>(err) {
            Self::DeadlineExceeded
        } else if is_caused_by::<PerTryTimeout>(err) {
            Self::PerTryTimeout
        } else if is_caused_by::<NoHealthyUpstream>(err) {
            Self::NoHealthyUpstream
        } else if is_caused_by::<ConnectFailure>(err) {
            Self::ConnectFailure
        } else if let Some(reset) = find_cause::<UpstreamReset>(err) {
            Self::Reset {
                reason: reset.reason,
                request_sent: reset.request_sent,
            }
        } else {
            Self::LocalError
        }
    }

    /// The HTTP status of a response outcome.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Response { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A failure that originated at the upstream's connection rather than in its response:
    /// connect failure, reset, per-try timeout.
    pub fn is_local_origin_failure(&self) -> bool {
        matches!(
            self,
            Self::ConnectFailure | Self::Reset { .. } | Self::PerTryTimeout
        )
    }

    /// Counts towards outlier detection's `consecutive5xxErrors` (DR-31).
    pub fn is_5xx(&self) -> bool {
        match self {
            Self::Response { status, .. } => (500..600).contains(status),
            other => other.is_local_origin_failure(),
        }
    }

    /// Counts towards `consecutiveGatewayErrors`: 502, 503, 504 or a local-origin failure.
    pub fn is_gateway_error(&self) -> bool {
        match self {
            Self::Response { status, .. } => matches!(status, 502..=504),
            other => other.is_local_origin_failure(),
        }
    }

    /// An outcome that says nothing about the endpoint's health (overflow, deadline,
    /// no endpoint, other local errors): outlier detection ignores it.
    pub fn is_local_decision(&self) -> bool {
        matches!(
            self,
            Self::Overflow | Self::DeadlineExceeded | Self::NoHealthyUpstream | Self::LocalError
        )
    }

    /// The response flag this outcome implies on its own (before retry adds `URX`).
    pub fn response_flags(&self) -> ResponseFlags {
        match self {
            Self::Response { .. } | Self::LocalError => ResponseFlags::NONE,
            Self::ConnectFailure => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            Self::Reset { reason, .. } => match reason {
                ResetReason::RemoteReset | ResetReason::RefusedStream => {
                    ResponseFlags::UPSTREAM_REMOTE_RESET
                }
                ResetReason::ConnectionTermination => {
                    ResponseFlags::UPSTREAM_CONNECTION_TERMINATION
                }
                ResetReason::LocalReset => ResponseFlags::LOCAL_RESET,
                ResetReason::ProtocolError => ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
            },
            Self::PerTryTimeout | Self::DeadlineExceeded => ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
            Self::Overflow => ResponseFlags::UPSTREAM_OVERFLOW,
            Self::NoHealthyUpstream => ResponseFlags::NO_HEALTHY_UPSTREAM,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Outcome {
        Outcome::Response {
            status: code,
            grpc_status: None,
        }
    }

    #[test]
    fn classifies_like_envoy_outlier_detection() {
        assert!(status(500).is_5xx() && !status(500).is_gateway_error());
        for code in [502, 503, 504] {
            assert!(status(code).is_5xx() && status(code).is_gateway_error());
        }
        assert!(!status(404).is_5xx() && !status(200).is_gateway_error());
        assert!(Outcome::ConnectFailure.is_5xx() && Outcome::ConnectFailure.is_gateway_error());
        assert!(Outcome::PerTryTimeout.is_gateway_error());
        assert!(!Outcome::Overflow.is_5xx() && Outcome::Overflow.is_local_decision());
    }

    #[test]
    fn reads_errors_and_grpc_status() {
        let e: BoxError = Box::new(Overflow);
        assert_eq!(Outcome::from_error(&e), Outcome::Overflow);
        assert_eq!(Outcome::from_error(&e).response_flags().to_string(), "UO");
        let e: BoxError = Box::new(UpstreamReset::new(ResetReason::RefusedStream, false, None));
        assert_eq!(
            Outcome::from_error(&e),
            Outcome::Reset {
                reason: ResetReason::RefusedStream,
                request_sent: false
            }
        );
        let res = http::Response::builder()
            .status(200)
            .header("grpc-status", "14")
            .body(())
            .unwrap();
        assert_eq!(
            Outcome::from_response(&res),
            Outcome::Response {
                status: 200,
                grpc_status: Some(14)
            }
        );
    }
}
