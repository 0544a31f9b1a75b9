//! Retry policy: `attempts`, `perTryTimeout`, `retryOn` and back-off (ISTIO.md VS-50..VS-67).

use std::fmt;
use std::time::Duration;

use http::HeaderName;
use mesh_core::Outcome;
use mesh_core::error::ResetReason;

use super::backoff::Backoff;

/// Default cap on the request body kept for replay (Linkerd's and our default: 64 KiB).
pub const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

/// Envoy's header marking a response rate-limited by an Envoy (a static, so looking it
/// up makes no temporary name).
static RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");

/// Istio's default `retryOn` (VS-51): no HTTP status is retried.
pub const ISTIO_DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

macro_rules! conditions {
    ($( $(#[$doc:meta])* $name:ident = $bit:expr, $token:literal; )*) => {
        impl RetryOn {
            $( $(#[$doc])* pub const $name: u32 = 1 << $bit; )*
            const TOKENS: &'static [(u32, &'static str)] = &[ $( (Self::$name, $token), )* ];
        }
    };
}

/// The parsed `retryOn` of a route: Envoy HTTP and gRPC conditions plus retriable status codes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    conditions: u32,
    status_codes: Vec<u16>,
}

conditions! {
    /// `5xx`: a 5xx response or any upstream reset, connect failure or per-try timeout.
    FIVE_XX = 0, "5xx";
    /// `gateway-error`: 502, 503, 504 or any upstream reset.
    GATEWAY_ERROR = 1, "gateway-error";
    /// `reset`: the upstream reset or disconnected, including a per-try timeout.
    RESET = 2, "reset";
    /// `reset-before-request`: a reset before any request byte was sent.
    RESET_BEFORE_REQUEST = 3, "reset-before-request";
    /// `connect-failure`: the connection could not be established.
    CONNECT_FAILURE = 4, "connect-failure";
    /// `envoy-ratelimited`: the response carries `x-envoy-ratelimited`.
    ENVOY_RATELIMITED = 5, "envoy-ratelimited";
    /// `retriable-4xx`: a 409 response.
    RETRIABLE_4XX = 6, "retriable-4xx";
    /// `refused-stream`: the HTTP/2 upstream refused the stream.
    REFUSED_STREAM = 7, "refused-stream";
    /// `retriable-status-codes`: a status among the configured codes.
    RETRIABLE_STATUS_CODES = 8, "retriable-status-codes";
    /// `retriable-headers`: the response carries one of the configured headers.
    RETRIABLE_HEADERS = 9, "retriable-headers";
    /// `http3-post-connect-failure`: accepted for compatibility; we never speak HTTP/3 upstream.
    HTTP3_POST_CONNECT_FAILURE = 10, "http3-post-connect-failure";
    /// gRPC `cancelled` (status 1 in the response headers).
    GRPC_CANCELLED = 11, "cancelled";
    /// gRPC `deadline-exceeded` (status 4).
    GRPC_DEADLINE_EXCEEDED = 12, "deadline-exceeded";
    /// gRPC `resource-exhausted` (status 8).
    GRPC_RESOURCE_EXHAUSTED = 13, "resource-exhausted";
    /// gRPC `internal` (status 13).
    GRPC_INTERNAL = 14, "internal";
    /// gRPC `unavailable` (status 14).
    GRPC_UNAVAILABLE = 15, "unavailable";
}

/// A `retryOn` token that is neither a known condition nor a known HTTP status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid retryOn policy")]
pub struct RetryOnError(pub String);

/// Whether Go's `net/http` knows `code` (Istio moves only such numbers into the
/// retriable status codes, VS-54).
fn is_known_status(code: u16) -> bool {
    matches!(code,
        100..=103 | 200..=208 | 226 | 300..=305 | 307 | 308 | 400..=418 | 421..=426
        | 428 | 429 | 431 | 451 | 500..=508 | 510 | 511)
}

impl RetryOn {
    /// Parses Istio's `retryOn` string (VS-54): comma-separated conditions and numeric
    /// status codes, tokens trimmed, empty tokens skipped. A known status code becomes a
    /// retriable status code and turns on `retriable-status-codes`.
    pub fn parse(s: &str) -> Result<Self, RetryOnError> {
        let mut out = Self::default();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if let Some((bit, _)) = Self::TOKENS.iter().find(|(_, name)| *name == token) {
                out.conditions |= bit;
            } else if let Some(code) = token.parse::<u16>().ok().filter(|c| is_known_status(*c)) {
                if !out.status_codes.contains(&code) {
                    out.status_codes.push(code);
                }
                out.conditions |= Self::RETRIABLE_STATUS_CODES;
            } else {
                return Err(RetryOnError(token.to_owned()));
            }
        }
        Ok(out)
    }

    /// Istio's default (VS-51): `connect-failure,refused-stream,unavailable,cancelled,
    /// retriable-status-codes` with no status codes.
    pub fn istio_default() -> Self {
        Self {
            conditions: Self::CONNECT_FAILURE
                | Self::REFUSED_STREAM
                | Self::GRPC_UNAVAILABLE
                | Self::GRPC_CANCELLED
                | Self::RETRIABLE_STATUS_CODES,
            status_codes: Vec::new(),
        }
    }

    /// Whether every bit of `conditions` is set.
    pub fn contains(&self, conditions: u32) -> bool {
        self.conditions & conditions == conditions
    }

    /// The retriable status codes.
    pub fn status_codes(&self) -> &[u16] {
        &self.status_codes
    }

    /// Adds a retriable status code (and the `retriable-status-codes` condition).
    #[must_use]
    pub fn with_status_code(mut self, code: u16) -> Self {
        if !self.status_codes.contains(&code) {
            self.status_codes.push(code);
        }
        self.conditions |= Self::RETRIABLE_STATUS_CODES;
        self
    }

    #[inline]
    fn any(&self, conditions: u32) -> bool {
        self.conditions & conditions != 0
    }

    /// Whether an attempt that ended in `outcome` (with response `headers` when it is a
    /// response) should be retried under these conditions (VS-55, VS-56, VS-57).
    /// `retriable_headers` are the header names of `retriable-headers`.
    pub fn matches(
        &self,
        outcome: &Outcome,
        headers: Option<&http::HeaderMap>,
        retriable_headers: &[HeaderName],
    ) -> bool {
        match *outcome {
            Outcome::Response {
                status,
                grpc_status,
            } => self.matches_response(status, grpc_status, headers, retriable_headers),
            // A per-try timeout is a local reset: only `5xx`, `gateway-error` and `reset`
            // retry it (VS-57).
            Outcome::PerTryTimeout => self.any(Self::FIVE_XX | Self::GATEWAY_ERROR | Self::RESET),
            Outcome::ConnectFailure => self.any(
                Self::FIVE_XX
                    | Self::GATEWAY_ERROR
                    | Self::RESET
                    | Self::RESET_BEFORE_REQUEST
                    | Self::CONNECT_FAILURE,
            ),
            Outcome::Reset {
                reason,
                request_sent,
            } => {
                self.any(Self::FIVE_XX | Self::GATEWAY_ERROR | Self::RESET)
                    || (self.any(Self::RESET_BEFORE_REQUEST) && !request_sent)
                    || (self.any(Self::REFUSED_STREAM) && reason == ResetReason::RefusedStream)
            }
            // Overflow is never retried (VS-56); the others are local decisions.
            Outcome::Overflow
            | Outcome::DeadlineExceeded
            | Outcome::NoHealthyUpstream
            | Outcome::LocalError => false,
        }
    }

    /// [`matches`](Self::matches) for a response.
    #[inline]
    pub(crate) fn matches_response(
        &self,
        status: u16,
        grpc_status: Option<u16>,
        headers: Option<&http::HeaderMap>,
        retriable_headers: &[HeaderName],
    ) -> bool {
        let has = |name: &HeaderName| headers.is_some_and(|h| h.contains_key(name));
        let matched = self.matches_status(status)
            || (self.any(Self::RETRIABLE_HEADERS) && retriable_headers.iter().any(has))
            || grpc_status.is_some_and(|g| self.matches_grpc(g));
        // A rate-limited response is retried under `envoy-ratelimited`, and under no
        // other condition; the header is looked up only when it can change the answer.
        if !matched && !self.any(Self::ENVOY_RATELIMITED) {
            return false;
        }
        if has(&RATELIMITED) {
            self.any(Self::ENVOY_RATELIMITED)
        } else {
            matched
        }
    }

    /// Whether a response status alone matches (`5xx`, `gateway-error`, `retriable-4xx`,
    /// `retriable-status-codes`).
    #[inline]
    fn matches_status(&self, status: u16) -> bool {
        let listed = || {
            self.any(Self::RETRIABLE_STATUS_CODES)
                && !self.status_codes.is_empty()
                && self.status_codes.contains(&status)
        };
        if status < 409 {
            // Only a listed code can match (the usual answer: a 2xx).
            return listed();
        }
        (self.any(Self::FIVE_XX) && (500..600).contains(&status))
            || (self.any(Self::GATEWAY_ERROR) && matches!(status, 502..=504))
            || (self.any(Self::RETRIABLE_4XX) && status == 409)
            || listed()
    }

    fn matches_grpc(&self, grpc_status: u16) -> bool {
        let bit = match grpc_status {
            1 => Self::GRPC_CANCELLED,
            4 => Self::GRPC_DEADLINE_EXCEEDED,
            8 => Self::GRPC_RESOURCE_EXHAUSTED,
            13 => Self::GRPC_INTERNAL,
            14 => Self::GRPC_UNAVAILABLE,
            _ => return false,
        };
        self.any(bit)
    }
}

impl std::str::FromStr for RetryOn {
    type Err = RetryOnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for RetryOn {
    /// Envoy's form: the conditions, then the codes, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (bit, name) in Self::TOKENS {
            if self.conditions & bit != 0 {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        for code in &self.status_codes {
            if !first {
                f.write_str(",")?;
            }
            write!(f, "{code}")?;
            first = false;
        }
        Ok(())
    }
}

/// A route's retry policy, field for field Istio's `HTTPRetry` plus the knobs Envoy adds.
///
/// Built in code with Istio's defaults: [`RetryPolicy::istio_default`] is what a route
/// without `retries` gets (VS-51), [`RetryPolicy::disabled`] is `attempts: 0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `attempts`: the number of RETRIES; at most `1 + attempts` upstream attempts (VS-50).
    pub attempts: u32,
    /// `perTryTimeout`: `None` means no per-try timeout (VS-53). Ignored when at least the
    /// route timeout (VS-58).
    pub per_try_timeout: Option<Duration>,
    /// `retryOn`.
    pub retry_on: RetryOn,
    /// `backoff` (the base interval; the cap is 10 × base).
    pub backoff: Backoff,
    /// `retryIgnorePreviousHosts` (default true): a retry avoids the endpoints already
    /// tried when another endpoint is available (VS-63).
    pub retry_ignore_previous_hosts: bool,
    /// Header names for the `retriable-headers` condition (Envoy `retriable_headers`).
    pub retriable_headers: Vec<HeaderName>,
    /// Send `x-envoy-attempt-count` on every attempt (Istio default: on, VS-61).
    pub include_attempt_count: bool,
    /// Request bodies up to this many bytes are kept for replay; larger ones go once,
    /// unretried (VS-67).
    pub replay_limit: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::istio_default()
    }
}

impl RetryPolicy {
    /// The policy of a route without `retries` (VS-51): 2 retries of
    /// [`ISTIO_DEFAULT_RETRY_ON`], previous hosts avoided, no per-try timeout.
    pub fn istio_default() -> Self {
        Self::with_attempts(2)
    }

    /// Istio's default with the historical retry of HTTP 503 (VS-52; the compatibility
    /// flag `EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY=false`).
    pub fn istio_default_with_503() -> Self {
        let mut p = Self::istio_default();
        p.retry_on = p.retry_on.with_status_code(503);
        p
    }

    /// `retries` with `attempts` and everything else at its default (VS-53).
    pub fn with_attempts(attempts: u32) -> Self {
        Self {
            attempts,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
            backoff: Backoff::default(),
            retry_ignore_previous_hosts: true,
            retriable_headers: Vec::new(),
            include_attempt_count: true,
            replay_limit: DEFAULT_REPLAY_LIMIT,
        }
    }

    /// `attempts: 0`: no retry at all (the default policy is off too).
    pub fn disabled() -> Self {
        Self::with_attempts(0)
    }

    /// Sets `perTryTimeout` (`None` or zero: none).
    #[must_use]
    pub fn per_try_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.per_try_timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// Sets `retryOn`.
    #[must_use]
    pub fn retry_on(mut self, retry_on: RetryOn) -> Self {
        self.retry_on = retry_on;
        self
    }

    /// Sets the back-off base interval (`retries.backoff`).
    #[must_use]
    pub fn backoff_base(mut self, base: Duration) -> Self {
        self.backoff = Backoff::new(base);
        self
    }

    /// Sets the replay cap for request bodies.
    #[must_use]
    pub fn replay_limit(mut self, bytes: usize) -> Self {
        self.replay_limit = bytes;
        self
    }

    /// Whether any retry can happen.
    pub fn is_enabled(&self) -> bool {
        self.attempts > 0
    }

    /// The per-try timeout that applies under a route timeout of `route_timeout`:
    /// none when it is at least the route timeout (VS-58).
    pub fn effective_per_try_timeout(&self, route_timeout: Option<Duration>) -> Option<Duration> {
        match (self.per_try_timeout, route_timeout) {
            (Some(per_try), Some(route)) if per_try >= route => None,
            (per_try, _) => per_try,
        }
    }

    /// Whether a response should be retried (attempts left aside): `should_retry` of its
    /// outcome, `grpc_status` read from its headers.
    #[inline]
    pub(crate) fn should_retry_response(
        &self,
        status: u16,
        grpc_status: Option<u16>,
        headers: &http::HeaderMap,
    ) -> bool {
        self.retry_on
            .matches_response(status, grpc_status, Some(headers), &self.retriable_headers)
    }

    /// Whether an attempt ending in `outcome` should be retried (attempts left aside).
    #[inline]
    pub fn should_retry(&self, outcome: &Outcome, headers: Option<&http::HeaderMap>) -> bool {
        self.retry_on
            .matches(outcome, headers, &self.retriable_headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16) -> Outcome {
        Outcome::Response {
            status,
            grpc_status: None,
        }
    }

    fn grpc(code: u16) -> Outcome {
        Outcome::Response {
            status: 200,
            grpc_status: Some(code),
        }
    }

    fn reset(reason: ResetReason, request_sent: bool) -> Outcome {
        Outcome::Reset {
            reason,
            request_sent,
        }
    }

    fn on(s: &str) -> RetryOn {
        RetryOn::parse(s).unwrap()
    }

    fn m(r: &RetryOn, o: Outcome) -> bool {
        r.matches(&o, None, &[])
    }

    #[test]
    fn parse_moves_known_codes_into_retriable_status_codes() {
        let r = on(" 503 , reset,,");
        assert_eq!(r.to_string(), "reset,retriable-status-codes,503");
        assert_eq!(r.status_codes(), &[503]);
        let r = on("gateway-error,connect-failure,retriable-4xx,503");
        assert!(r.contains(RetryOn::GATEWAY_ERROR | RetryOn::CONNECT_FAILURE));
        assert!(r.contains(RetryOn::RETRIABLE_4XX | RetryOn::RETRIABLE_STATUS_CODES));
        assert_eq!(on("").to_string(), "");
    }

    #[test]
    fn parse_rejects_unknown_tokens_and_unknown_codes() {
        assert_eq!(
            RetryOn::parse("5xx,bogus"),
            Err(RetryOnError("bogus".into()))
        );
        assert_eq!(RetryOn::parse("599"), Err(RetryOnError("599".into())));
        assert_eq!(RetryOn::parse("306"), Err(RetryOnError("306".into())));
        assert!(
            RetryOn::parse("5XX").is_err(),
            "conditions are case-sensitive"
        );
    }

    #[test]
    fn every_condition_round_trips() {
        for (_, token) in RetryOn::TOKENS {
            assert_eq!(on(token).to_string(), *token);
        }
    }

    #[test]
    fn five_xx_retries_any_5xx_and_every_upstream_failure() {
        let r = on("5xx");
        assert!(m(&r, resp(500)) && m(&r, resp(503)) && m(&r, resp(599)));
        assert!(!m(&r, resp(404)) && !m(&r, resp(200)) && !m(&r, resp(409)));
        assert!(m(&r, Outcome::ConnectFailure) && m(&r, Outcome::PerTryTimeout));
        assert!(m(&r, reset(ResetReason::RemoteReset, true)));
        assert!(m(&r, reset(ResetReason::RefusedStream, false)));
        assert!(!m(&r, Outcome::Overflow));
    }

    #[test]
    fn gateway_error_retries_502_503_504_and_resets() {
        let r = on("gateway-error");
        assert!(m(&r, resp(502)) && m(&r, resp(503)) && m(&r, resp(504)));
        assert!(!m(&r, resp(500)) && !m(&r, resp(501)));
        assert!(m(&r, reset(ResetReason::ConnectionTermination, true)));
        assert!(m(&r, Outcome::PerTryTimeout) && m(&r, Outcome::ConnectFailure));
    }

    #[test]
    fn reset_retries_resets_and_per_try_timeouts_but_no_status() {
        let r = on("reset");
        assert!(m(&r, reset(ResetReason::RemoteReset, true)));
        assert!(m(&r, Outcome::PerTryTimeout) && m(&r, Outcome::ConnectFailure));
        assert!(!m(&r, resp(503)));
    }

    #[test]
    fn reset_before_request_retries_only_unsent_requests() {
        let r = on("reset-before-request");
        assert!(m(&r, reset(ResetReason::RemoteReset, false)));
        assert!(!m(&r, reset(ResetReason::RemoteReset, true)));
        assert!(m(&r, Outcome::ConnectFailure));
        assert!(!m(&r, Outcome::PerTryTimeout));
        assert!(!m(&r, resp(503)));
    }

    #[test]
    fn connect_failure_retries_only_connect_failures() {
        let r = on("connect-failure");
        assert!(m(&r, Outcome::ConnectFailure));
        assert!(!m(&r, reset(ResetReason::RemoteReset, false)));
        assert!(!m(&r, Outcome::PerTryTimeout) && !m(&r, resp(503)));
    }

    #[test]
    fn refused_stream_retries_only_refused_streams() {
        let r = on("refused-stream");
        assert!(m(&r, reset(ResetReason::RefusedStream, true)));
        assert!(!m(&r, reset(ResetReason::RemoteReset, false)));
        assert!(!m(&r, Outcome::ConnectFailure));
    }

    #[test]
    fn retriable_4xx_is_409_only() {
        let r = on("retriable-4xx");
        assert!(m(&r, resp(409)));
        assert!(!m(&r, resp(400)) && !m(&r, resp(429)) && !m(&r, resp(503)));
    }

    #[test]
    fn retriable_status_codes_use_the_configured_list() {
        let r = on("retriable-status-codes");
        assert!(!m(&r, resp(503)), "empty list retries nothing");
        let r = on("429,503");
        assert!(m(&r, resp(429)) && m(&r, resp(503)) && !m(&r, resp(502)));
    }

    #[test]
    fn retriable_headers_match_configured_names() {
        let r = on("retriable-headers");
        let names = [HeaderName::from_static("x-retry-me")];
        let mut h = http::HeaderMap::new();
        assert!(!r.matches(&resp(200), Some(&h), &names));
        h.insert("x-retry-me", "1".parse().unwrap());
        assert!(r.matches(&resp(200), Some(&h), &names));
    }

    #[test]
    fn rate_limited_responses_need_envoy_ratelimited() {
        let mut h = http::HeaderMap::new();
        h.insert("x-envoy-ratelimited", "true".parse().unwrap());
        assert!(!on("5xx").matches(&resp(503), Some(&h), &[]));
        assert!(on("envoy-ratelimited").matches(&resp(429), Some(&h), &[]));
        assert!(!on("envoy-ratelimited").matches(&resp(429), None, &[]));
    }

    /// Envoy's rule for a response, written plainly: rate-limited responses are retried
    /// under `envoy-ratelimited` and under nothing else; others under any matching
    /// condition.
    fn reference(
        r: &RetryOn,
        o: &Outcome,
        h: Option<&http::HeaderMap>,
        names: &[HeaderName],
    ) -> bool {
        let Outcome::Response {
            status,
            grpc_status,
        } = *o
        else {
            unreachable!("responses only");
        };
        let has = |n: &HeaderName| h.is_some_and(|h| h.contains_key(n));
        if has(&RATELIMITED) {
            return r.contains(RetryOn::ENVOY_RATELIMITED);
        }
        (r.contains(RetryOn::FIVE_XX) && (500..600).contains(&status))
            || (r.contains(RetryOn::GATEWAY_ERROR) && (502..=504).contains(&status))
            || (r.contains(RetryOn::RETRIABLE_4XX) && status == 409)
            || (r.contains(RetryOn::RETRIABLE_STATUS_CODES) && r.status_codes().contains(&status))
            || (r.contains(RetryOn::RETRIABLE_HEADERS) && names.iter().any(has))
            || grpc_status.is_some_and(|g| r.matches_grpc(g))
    }

    #[test]
    fn responses_match_exactly_as_envoys_rule_for_every_combination() {
        let names = [HeaderName::from_static("x-retry-me")];
        let mut limited = http::HeaderMap::new();
        limited.insert("x-envoy-ratelimited", "true".parse().unwrap());
        let mut flagged = http::HeaderMap::new();
        flagged.insert("x-retry-me", "1".parse().unwrap());
        let mut both = limited.clone();
        both.insert("x-retry-me", "1".parse().unwrap());
        let heads = [
            None,
            Some(http::HeaderMap::new()),
            Some(limited),
            Some(flagged),
            Some(both),
        ];
        let statuses = [200, 204, 409, 429, 500, 502, 503, 504, 599];
        let grpc = [None, Some(0), Some(1), Some(4), Some(8), Some(13), Some(14)];
        // The conditions a response can meet (the others concern errors only).
        let relevant = [
            RetryOn::FIVE_XX,
            RetryOn::GATEWAY_ERROR,
            RetryOn::RETRIABLE_4XX,
            RetryOn::RETRIABLE_STATUS_CODES,
            RetryOn::RETRIABLE_HEADERS,
            RetryOn::ENVOY_RATELIMITED,
            RetryOn::GRPC_CANCELLED,
            RetryOn::GRPC_UNAVAILABLE,
            RetryOn::GRPC_INTERNAL,
        ];
        let mut compared = 0;
        // Every subset of them, with and without retriable codes.
        for subset in 0u32..(1 << relevant.len()) {
            let conditions = (0..relevant.len())
                .filter(|i| subset & (1 << i) != 0)
                .fold(RetryOn::RESET, |c, i| c | relevant[i]);
            for codes in [&[][..], &[200, 503][..]] {
                let r = RetryOn {
                    conditions,
                    status_codes: codes.to_vec(),
                };
                for h in &heads {
                    for status in statuses {
                        for grpc_status in grpc {
                            let o = Outcome::Response {
                                status,
                                grpc_status,
                            };
                            assert_eq!(
                                r.matches(&o, h.as_ref(), &names),
                                reference(&r, &o, h.as_ref(), &names),
                                "{r} {status} {grpc_status:?} {h:?}"
                            );
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert!(compared > 100_000);
    }

    #[test]
    fn grpc_conditions_read_the_header_status() {
        for (token, code) in [
            ("cancelled", 1),
            ("deadline-exceeded", 4),
            ("resource-exhausted", 8),
            ("internal", 13),
            ("unavailable", 14),
        ] {
            let r = on(token);
            assert!(m(&r, grpc(code)), "{token}");
            assert!(!m(&r, grpc(2)), "{token} vs UNKNOWN");
            assert!(!m(&r, resp(200)), "{token} without grpc-status");
        }
    }

    #[test]
    fn istio_default_retries_no_status_and_not_per_try_timeouts() {
        let p = RetryPolicy::istio_default();
        assert_eq!(p.attempts, 2);
        assert_eq!(
            p.retry_on.to_string(),
            "connect-failure,refused-stream,retriable-status-codes,cancelled,unavailable"
        );
        assert!(!p.should_retry(&resp(503), None));
        assert!(!p.should_retry(&Outcome::PerTryTimeout, None));
        assert!(p.should_retry(&Outcome::ConnectFailure, None));
        assert!(p.should_retry(&grpc(14), None));
        assert!(RetryPolicy::istio_default_with_503().should_retry(&resp(503), None));
        assert!(!RetryPolicy::disabled().is_enabled());
    }

    #[test]
    fn per_try_timeout_at_least_the_route_timeout_is_ignored() {
        let p = RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(2)));
        let s = Duration::from_secs;
        assert_eq!(p.effective_per_try_timeout(Some(s(5))), Some(s(2)));
        assert_eq!(p.effective_per_try_timeout(Some(s(2))), None);
        assert_eq!(p.effective_per_try_timeout(None), Some(s(2)));
    }
}
