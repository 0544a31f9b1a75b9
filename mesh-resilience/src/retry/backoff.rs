//! Fully jittered exponential back-off between retries (ISTIO.md VS-59).
//!
//! Retry `n` (1-based) waits a uniformly random whole number of milliseconds in
//! `[0, min((2^n - 1) × base, max))`, with `max = 10 × base`. With Istio's 25 ms base:
//! 1st retry 0–24 ms, 2nd 0–74 ms, 3rd 0–174 ms, 4th and later 0–249 ms.

use std::time::Duration;

use rand::Rng;

/// Envoy's default back-off base interval.
pub const DEFAULT_BASE: Duration = Duration::from_millis(25);

/// Back-off parameters: the base interval and the cap (10 × base).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_BASE)
    }
}

impl Backoff {
    /// Back-off with base interval `base` (Istio's `retries.backoff`) and cap `10 × base`.
    /// Envoy counts in whole milliseconds; a base below 1 ms is raised to 1 ms.
    pub fn new(base: Duration) -> Self {
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(1);
        Self {
            base_ms,
            max_ms: base_ms.saturating_mul(10),
        }
    }

    /// The base interval.
    pub fn base(&self) -> Duration {
        Duration::from_millis(self.base_ms)
    }

    /// The cap of the back-off (10 × base).
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_ms)
    }

    /// The exclusive upper bound of the wait before retry `retry` (1-based):
    /// `min((2^retry - 1) × base, max)`.
    pub fn bound(&self, retry: u32) -> Duration {
        let multiplier = 1u64.checked_shl(retry.min(63)).map_or(u64::MAX, |m| m - 1);
        let ms = if multiplier > self.max_ms / self.base_ms {
            self.max_ms
        } else {
            self.base_ms * multiplier
        };
        Duration::from_millis(ms)
    }

    /// A random wait before retry `retry` (1-based), uniform over whole milliseconds
    /// in `[0, bound(retry))`.
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let bound = u64::try_from(self.bound(retry).as_millis()).unwrap_or(u64::MAX);
        if bound == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(rng.random_range(0..bound))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn istio_default_bounds_match_envoy() {
        let b = Backoff::default();
        let ms = |n| b.bound(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(40)],
            [25, 75, 175, 250, 250, 250]
        );
        assert_eq!(b.max(), Duration::from_millis(250));
    }

    #[test]
    fn delays_cover_the_whole_range_and_stay_below_the_bound() {
        let b = Backoff::default();
        let mut rng = SmallRng::seed_from_u64(7);
        let delays: Vec<u128> = (0..5000)
            .map(|_| b.delay(1, &mut rng).as_millis())
            .collect();
        assert_eq!(delays.iter().max(), Some(&24));
        assert_eq!(delays.iter().min(), Some(&0));
    }

    #[test]
    fn configurable_base_scales_the_cap() {
        let b = Backoff::new(Duration::from_millis(100));
        assert_eq!(b.bound(1), Duration::from_millis(100));
        assert_eq!(b.bound(3), Duration::from_millis(700));
        assert_eq!(b.bound(4), Duration::from_millis(1000));
    }

    proptest! {
        #[test]
        fn backoff_stays_within_envoys_bounds(base_ms in 1u64..10_000, retry in 1u32..100, seed: u64) {
            let b = Backoff::new(Duration::from_millis(base_ms));
            let mut rng = SmallRng::seed_from_u64(seed);
            let d = b.delay(retry, &mut rng);
            let exp = (1u128 << retry.min(100)) - 1;
            let bound = (exp * u128::from(base_ms)).min(u128::from(base_ms) * 10);
            prop_assert!(d.as_millis() < bound);
            prop_assert!(d <= b.max());
            prop_assert_eq!(b.bound(retry).as_millis(), bound);
        }
    }
}
