//! Errors shared by every layer.
//!
//! Errors travel between layers as [`BoxError`] and are recognised by type with
//! [`is_caused_by`], never by their text. The leaf errors below are the ones more
//! than one crate must recognise (a retry layer must not retry an [`Overflow`], the
//! proxy turns a [`DeadlineExceeded`] into Istio's 504 `UT`, telemetry sets flags).
//! Exactly one place in the proxy turns errors into HTTP responses.

use std::error::Error as StdError;

/// The boxed error type layers exchange (the same as tower's).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Whether `err` or any error in its `source()` chain is an `E`.
pub fn is_caused_by<E: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    find_cause::<E>(err).is_some()
}

/// The first error of type `E` in `err`'s `source()` chain, `err` included.
pub fn find_cause<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut current: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The route's outer deadline (VirtualService `timeout`) passed: Istio answers 504 `UT`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, thiserror::Error)]
#[error("upstream request timeout")]
pub struct DeadlineExceeded;

/// One attempt exceeded `perTryTimeout`; the attempt was reset locally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, thiserror::Error)]
#[error("upstream per-try timeout")]
pub struct PerTryTimeout;

/// A connection-pool limit refused the request: 503 `UO`, never retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, thiserror::Error)]
#[error("upstream connect error or disconnect/reset before headers. reset reason: overflow")]
pub struct Overflow;

/// Every endpoint of the destination is ejected or none exists: 503 `UH`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, thiserror::Error)]
#[error("no healthy upstream")]
pub struct NoHealthyUpstream;

/// Connecting to the upstream failed (refused, timed out, TLS handshake failed): 503 `UF`.
/// Envoy's reset reason is `connection timeout` when the connect timeout passed (a full
/// listen backlog, an address that drops SYNs), `connection failure` otherwise.
#[derive(Debug, thiserror::Error)]
#[error(
    "upstream connect error or disconnect/reset before headers. reset reason: {}",
    if *.timed_out { "connection timeout" } else { "connection failure" }
)]
pub struct ConnectFailure {
    #[source]
    source: Option<BoxError>,
    timed_out: bool,
}

impl ConnectFailure {
    /// A connect failure caused by `source`.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: Some(source.into()),
            timed_out: false,
        }
    }

    /// A connect timeout (connect plus any handshake) caused by `source`.
    pub fn timed_out(source: impl Into<BoxError>) -> Self {
        Self {
            source: Some(source.into()),
            timed_out: true,
        }
    }

    /// A connect failure with no further detail.
    pub fn bare() -> Self {
        Self {
            source: None,
            timed_out: false,
        }
    }

    /// Whether the connect timeout passed.
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }
}

/// The upstream reset the stream or closed the connection before a complete response.
#[derive(Debug, thiserror::Error)]
#[error("upstream connect error or disconnect/reset before headers. reset reason: {reason}")]
pub struct UpstreamReset {
    /// Envoy's reset reason text (`remote reset`, `connection termination`, `refused stream`, …).
    pub reason: ResetReason,
    /// Whether any request bytes had been sent when the reset happened.
    pub request_sent: bool,
    #[source]
    source: Option<BoxError>,
}

/// Why an upstream stream was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The upstream sent RST_STREAM or reset the TCP connection (`UR`).
    RemoteReset,
    /// The upstream HTTP/2 peer refused the stream (`REFUSED_STREAM`, `UR`).
    RefusedStream,
    /// The connection closed before the response completed (`UC`).
    ConnectionTermination,
    /// The proxy reset the stream itself (`LR`).
    LocalReset,
    /// The upstream's response was malformed (bad status line, conflicting framing,
    /// invalid header bytes, too many headers): 502 `UPE`, as Envoy answers a codec
    /// protocol error.
    ProtocolError,
}

impl std::fmt::Display for ResetReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RemoteReset => "remote reset",
            Self::RefusedStream => "remote refused stream reset",
            Self::ConnectionTermination => "connection termination",
            Self::LocalReset => "local reset",
            Self::ProtocolError => "protocol error",
        })
    }
}

impl UpstreamReset {
    /// A reset for `reason`, with the underlying error if there is one.
    pub fn new(reason: ResetReason, request_sent: bool, source: Option<BoxError>) -> Self {
        Self {
            reason,
            request_sent,
            source,
        }
    }
}

/// No route of the host's route table matched: 404 `NR`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, thiserror::Error)]
#[error("no route")]
pub struct NoRoute;

/// The route names a destination (host and subset) that no configuration defines: 503 `NC`.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
#[error("cluster not found: {0}")]
pub struct ClusterNotFound(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] BoxError);

    #[test]
    fn finds_causes_through_the_chain() {
        let err: BoxError = Box::new(Wrapper(Box::new(Wrapper(Box::new(DeadlineExceeded)))));
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
        assert!(!is_caused_by::<Overflow>(err.as_ref()));
        let cf: BoxError = Box::new(ConnectFailure::new(std::io::Error::other("refused")));
        assert!(is_caused_by::<std::io::Error>(cf.as_ref()));
        assert!(find_cause::<ConnectFailure>(cf.as_ref()).is_some());
    }

    #[test]
    fn overflow_text_is_envoys() {
        assert_eq!(
            Overflow.to_string(),
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
    }
}
