//! Envoy response flags: the short codes (`UH`, `UO`, `UT`, …) that access logs and
//! Istio's `response_flags` metric label carry.
//!
//! [`ResponseFlags`] is a small bit set; it renders as Envoy does: `-` when empty,
//! otherwise the codes joined by `,` in Envoy's order (for example `UT,URX`).

use std::fmt;

macro_rules! flags {
    ($( $(#[$doc:meta])* $name:ident = $bit:expr, $code:literal; )*) => {
        impl ResponseFlags {
            $( $(#[$doc])* pub const $name: Self = Self(1 << $bit); )*
            const ALL: &'static [(Self, &'static str)] = &[ $( (Self::$name, $code), )* ];
        }
    };
}

/// A set of Envoy response flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

flags! {
    /// `LH`: local service failed health check.
    FAILED_LOCAL_HEALTH_CHECK = 0, "LH";
    /// `UH`: no healthy upstream host (503).
    NO_HEALTHY_UPSTREAM = 1, "UH";
    /// `UT`: upstream request timeout (504).
    UPSTREAM_REQUEST_TIMEOUT = 2, "UT";
    /// `LR`: connection local reset.
    LOCAL_RESET = 3, "LR";
    /// `UR`: upstream remote reset.
    UPSTREAM_REMOTE_RESET = 4, "UR";
    /// `UF`: upstream connection failure (503).
    UPSTREAM_CONNECTION_FAILURE = 5, "UF";
    /// `UC`: upstream connection termination.
    UPSTREAM_CONNECTION_TERMINATION = 6, "UC";
    /// `UO`: upstream overflow, circuit breaking (503).
    UPSTREAM_OVERFLOW = 7, "UO";
    /// `NR`: no route configured (404).
    NO_ROUTE_FOUND = 8, "NR";
    /// `DI`: request delayed by fault injection.
    DELAY_INJECTED = 9, "DI";
    /// `FI`: request aborted by fault injection.
    FAULT_INJECTED = 10, "FI";
    /// `RL`: rate limited locally (429).
    RATE_LIMITED = 11, "RL";
    /// `UAEX`: denied by the external authorization service.
    UNAUTHORIZED_EXTERNAL_SERVICE = 12, "UAEX";
    /// `RLSE`: rate-limit service error.
    RATE_LIMIT_SERVICE_ERROR = 13, "RLSE";
    /// `DC`: downstream connection termination.
    DOWNSTREAM_CONNECTION_TERMINATION = 14, "DC";
    /// `URX`: upstream retry limit exceeded.
    UPSTREAM_RETRY_LIMIT_EXCEEDED = 15, "URX";
    /// `SI`: stream idle timeout.
    STREAM_IDLE_TIMEOUT = 16, "SI";
    /// `IH`: invalid `x-envoy-*` header value.
    INVALID_ENVOY_REQUEST_HEADERS = 17, "IH";
    /// `DPE`: downstream protocol error.
    DOWNSTREAM_PROTOCOL_ERROR = 18, "DPE";
    /// `UMSDR`: upstream max stream duration reached.
    UPSTREAM_MAX_STREAM_DURATION_REACHED = 19, "UMSDR";
    /// `OM`: overload manager terminated the request.
    OVERLOAD_MANAGER = 20, "OM";
    /// `DF`: DNS resolution failure.
    DNS_RESOLUTION_FAILURE = 21, "DF";
    /// `DT`: max downstream connection duration reached.
    DURATION_TIMEOUT = 22, "DT";
    /// `UPE`: upstream protocol error.
    UPSTREAM_PROTOCOL_ERROR = 23, "UPE";
    /// `NC`: upstream cluster not found.
    NO_CLUSTER_FOUND = 24, "NC";
}

impl ResponseFlags {
    /// No flags.
    pub const NONE: Self = Self(0);

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the flags of `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// The union of two sets.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Parses one short code (`"UO"`), `None` for an unknown code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, c)| *c == code).map(|(f, _)| *f)
    }

    /// The short codes of the set flags, in Envoy's order.
    pub fn codes(self) -> impl Iterator<Item = &'static str> {
        Self::ALL
            .iter()
            .filter(move |(f, _)| self.contains(*f))
            .map(|(_, c)| *c)
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl std::ops::BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.insert(rhs);
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, code) in self.codes().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(code)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_envoy() {
        assert_eq!(ResponseFlags::NONE.to_string(), "-");
        assert_eq!(ResponseFlags::UPSTREAM_OVERFLOW.to_string(), "UO");
        let both =
            ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED | ResponseFlags::UPSTREAM_REQUEST_TIMEOUT;
        assert_eq!(both.to_string(), "UT,URX");
    }

    #[test]
    fn every_code_round_trips() {
        for (flag, code) in ResponseFlags::ALL {
            assert_eq!(ResponseFlags::from_code(code), Some(*flag));
            assert_eq!(flag.to_string(), *code);
        }
        assert_eq!(ResponseFlags::from_code("XX"), None);
    }
}
