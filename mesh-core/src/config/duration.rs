//! Istio durations: `5s`, `100ms`, `1.5s`, `1h`, `1m30s`.
//!
//! Istio's YAML spells `google.protobuf.Duration` the way Kubernetes and Go do: a sequence
//! of decimal numbers, each with a unit (`h`, `m`, `s`, `ms`, `us`/`µs`, `ns`), such as
//! `1m30s` or `2.5s`. A bare number (`5`) is rejected: the unit is never guessed.
//! Negative durations are rejected too. Whether a duration is acceptable for a given
//! field (for example "at least 1 ms") is decided by validation, not here.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde::{Serialize, Serializer};

/// A non-negative duration written with units, as in Istio YAML.
///
/// ```
/// use mesh_core::config::Duration;
///
/// let d: Duration = "1m30s".parse().unwrap();
/// assert_eq!(d.as_std(), std::time::Duration::from_secs(90));
/// assert_eq!(d.to_string(), "1m30s");
/// assert_eq!("1.5s".parse::<Duration>().unwrap().as_std().as_millis(), 1500);
/// assert!("5".parse::<Duration>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(std::time::Duration);

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason}; expected a number with a unit, e.g. 100ms, 5s, 1.5s, 1m30s, 1h"
)]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    /// The zero duration.
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    /// Wraps a standard duration.
    pub const fn from_std(d: std::time::Duration) -> Self {
        Duration(d)
    }

    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    /// A duration of `s` seconds.
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }

    /// The standard duration.
    pub const fn as_std(&self) -> std::time::Duration {
        self.0
    }

    /// True for `0s`.
    pub const fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

const NANOS_PER: [(&str, u128); 7] = [
    ("h", 3_600_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("µs", 1_000),
    ("ns", 1),
    ("m", 60_000_000_000),
    ("s", 1_000_000_000),
];

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationError {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.starts_with('-') {
            return Err(err("negative durations are not allowed"));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        let mut rest = s;
        let mut total: u128 = 0;
        while !rest.is_empty() {
            let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let (int_part, after_int) = rest.split_at(int_len);
            let (frac_part, after_num) = match after_int.strip_prefix('.') {
                Some(f) => {
                    let n = f.bytes().take_while(u8::is_ascii_digit).count();
                    f.split_at(n)
                }
                None => ("", after_int),
            };
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(err("a number is missing"));
            }
            let Some((unit, scale)) = NANOS_PER
                .iter()
                .find(|(u, _)| after_num.starts_with(u))
                .copied()
            else {
                return Err(if after_num.is_empty() {
                    err("the unit is missing")
                } else {
                    err("unknown unit")
                });
            };
            let whole: u128 = if int_part.is_empty() {
                0
            } else {
                int_part.parse().map_err(|_| err("number too large"))?
            };
            let mut nanos = whole.checked_mul(scale).ok_or_else(|| err("too large"))?;
            // Fractions are exact to the nanosecond; digits below that are dropped.
            let mut place = scale;
            for digit in frac_part.bytes() {
                place /= 10;
                if place == 0 {
                    break;
                }
                nanos += u128::from(digit - b'0') * place;
            }
            total = total.checked_add(nanos).ok_or_else(|| err("too large"))?;
            rest = &after_num[unit.len()..];
        }
        let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("too large"))?;
        let sub = u32::try_from(total % 1_000_000_000).map_err(|_| err("too large"))?;
        Ok(Duration(std::time::Duration::new(secs, sub)))
    }
}

impl fmt::Display for Duration {
    /// Canonical form: `1h2m3.5s`, `100ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.0.as_nanos();
        if total == 0 {
            return f.write_str("0s");
        }
        if total < 1_000_000_000 {
            return if total.is_multiple_of(1_000_000) {
                write!(f, "{}ms", total / 1_000_000)
            } else if total.is_multiple_of(1_000) {
                write!(f, "{}us", total / 1_000)
            } else {
                write!(f, "{total}ns")
            };
        }
        let hours = total / 3_600_000_000_000;
        let minutes = (total / 60_000_000_000) % 60;
        let secs = (total / 1_000_000_000) % 60;
        let nanos = total % 1_000_000_000;
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        if secs > 0 || nanos > 0 {
            if nanos == 0 {
                write!(f, "{secs}s")?;
            } else {
                let frac = format!("{nanos:09}");
                write!(f, "{secs}.{}s", frac.trim_end_matches('0'))?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string with a unit, e.g. 100ms, 5s, 1.5s, 1m30s, 1h")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(s: &str) -> u128 {
        s.parse::<Duration>().unwrap().as_std().as_millis()
    }

    #[test]
    fn parses_istio_duration_forms() {
        assert_eq!(ms("5s"), 5_000);
        assert_eq!(ms("100ms"), 100);
        assert_eq!(ms("1.5s"), 1_500);
        assert_eq!(ms("1h"), 3_600_000);
        assert_eq!(ms("1m30s"), 90_000);
        assert_eq!(ms("0.25s"), 250);
        assert_eq!(ms(".5s"), 500);
        assert_eq!(ms("0"), 0);
        assert_eq!(ms("2h45m"), 9_900_000);
        assert_eq!(
            "1500us".parse::<Duration>().unwrap().as_std().as_micros(),
            1500
        );
        assert_eq!("7ns".parse::<Duration>().unwrap().as_std().as_nanos(), 7);
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "", "5", "s", "5x", "-5s", "1.s5", "5 s", "1m30", "ms", "1e3s", "abc",
        ] {
            assert!(bad.parse::<Duration>().is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn error_says_what_is_allowed() {
        let e = "5".parse::<Duration>().unwrap_err().to_string();
        assert!(e.contains("\"5\""), "{e}");
        assert!(e.contains("the unit is missing"), "{e}");
        assert!(e.contains("e.g. 100ms, 5s"), "{e}");
    }

    #[test]
    fn displays_canonical_form() {
        for (input, shown) in [
            ("90s", "1m30s"),
            ("100ms", "100ms"),
            ("1.5s", "1.5s"),
            ("1h", "1h"),
            ("0s", "0s"),
            ("3601s", "1h1s"),
        ] {
            assert_eq!(input.parse::<Duration>().unwrap().to_string(), shown);
        }
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(nanos in 0u64..10_000_000_000_000) {
            let d = Duration::from_std(std::time::Duration::from_nanos(nanos));
            prop_assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<Duration>();
        }
    }
}
