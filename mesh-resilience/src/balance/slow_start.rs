//! Slow start (`warmup`, `warmupDurationSecs`): a new endpoint's weight ramps up over a
//! window, as Envoy's `slow_start_config` does for ROUND_ROBIN and LEAST_REQUEST.
//!
//! An endpoint's weight `age` after it joined is
//! `max(minimumPercent / 100, (max(age, 1 ms) / window) ^ (1 / aggression))` while `age`
//! is below the window (both in whole milliseconds, as Envoy counts them), and 1 after.
//! While any endpoint is in its window the balancer picks by weight: round robin by a
//! deterministic low-discrepancy sequence over the shared cursor (Envoy: an EDF
//! schedule), least request at random in proportion to `weight / (in flight + 1)`
//! (Envoy: the same weights on an EDF schedule). Both give each endpoint its weight's
//! share of the picks. Once every window has passed, the unweighted picks return and no
//! clock is read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Envoy's slow-start settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    /// How long a new endpoint ramps up; zero disables slow start.
    pub window: Duration,
    /// The weight at the start of the window, in percent (Envoy's default 10).
    pub minimum_percent: f64,
    /// How fast the weight rises: 1.0 is linear, above 1 rises faster at first (Envoy's
    /// default 1.0; a value that is not positive counts as 1.0, as in Envoy).
    pub aggression: f64,
}

impl SlowStart {
    /// A window with Envoy's defaults: 10 % minimum weight, aggression 1.0.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            minimum_percent: 10.0,
            aggression: 1.0,
        }
    }

    /// Whether slow start is on (a non-zero window).
    pub fn is_enabled(&self) -> bool {
        self.window.as_millis() > 0
    }

    /// The weight, between the minimum and 1, of an endpoint that joined `age` ago.
    pub fn weight_at(&self, age: Duration) -> f64 {
        let window = self.window.as_millis();
        let age = age.as_millis();
        if age >= window {
            return 1.0;
        }
        let aggression = if self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let time = age.max(1) as f64 / window as f64;
        let ramp = if aggression == 1.0 {
            time
        } else {
            time.powf(1.0 / aggression)
        };
        ramp.max((self.minimum_percent / 100.0).clamp(0.0, 1.0))
    }
}

/// The eligible endpoint at fraction `u` (in `[0, 1)`) of the eligible endpoints' total
/// weight. Falls back to the first eligible one if no weight is positive.
pub(crate) fn pick_weighted(
    n: usize,
    u: f64,
    eligible: &impl Fn(usize) -> bool,
    weight: &impl Fn(usize) -> f64,
) -> Option<usize> {
    let total: f64 = (0..n).filter(|&i| eligible(i)).map(weight).sum();
    if !(total > 0.0 && total.is_finite()) {
        return (0..n).find(|&i| eligible(i));
    }
    let mut left = u * total;
    let mut last = None;
    for i in (0..n).filter(|&i| eligible(i)) {
        let w = weight(i);
        if left < w {
            return Some(i);
        }
        left -= w;
        last = Some(i);
    }
    // Rounding at the very top of the range.
    last
}

/// The next point of the golden-ratio sequence `k * 0.618… mod 1` for the cursor's
/// value: consecutive picks spread over `[0, 1)` so evenly that every endpoint's count
/// stays within a few picks of its weighted share, without a lock.
pub(crate) fn next_fraction(cursor: &AtomicUsize) -> f64 {
    let k = cursor.fetch_add(1, Ordering::Relaxed) as u64;
    let x = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_ramps_from_the_minimum_to_one_over_the_window() {
        let s = SlowStart::new(Duration::from_secs(100));
        assert_eq!(s.weight_at(Duration::ZERO), 0.1);
        assert_eq!(s.weight_at(Duration::from_secs(5)), 0.1);
        assert!((s.weight_at(Duration::from_secs(50)) - 0.5).abs() < 1e-12);
        assert!((s.weight_at(Duration::from_millis(99_999)) - 0.99999).abs() < 1e-12);
        assert_eq!(s.weight_at(Duration::from_secs(100)), 1.0);
        let fast = SlowStart {
            aggression: 2.0,
            minimum_percent: 0.0,
            ..s
        };
        assert!((fast.weight_at(Duration::from_secs(25)) - 0.5).abs() < 1e-12);
        assert!((fast.weight_at(Duration::ZERO) - (1e-5f64).sqrt()).abs() < 1e-12);
        let bad = SlowStart {
            aggression: -3.0,
            ..s
        };
        assert!((bad.weight_at(Duration::from_secs(50)) - 0.5).abs() < 1e-12);
        assert!(!SlowStart::new(Duration::ZERO).is_enabled());
    }

    #[test]
    fn weighted_picks_follow_the_weights_and_skip_ineligible() {
        let weights = [1.0, 3.0, 0.0, 4.0];
        let w = |i: usize| weights[i];
        assert_eq!(pick_weighted(4, 0.0, &|_| true, &w), Some(0));
        assert_eq!(pick_weighted(4, 0.2, &|_| true, &w), Some(1));
        assert_eq!(pick_weighted(4, 0.6, &|_| true, &w), Some(3));
        assert_eq!(pick_weighted(4, 0.99, &|i| i != 3, &w), Some(1));
        assert_eq!(pick_weighted(4, 0.5, &|i| i == 2, &w), Some(2));
        assert_eq!(pick_weighted(4, 0.5, &|_| false, &w), None);
    }

    #[test]
    fn the_sequence_gives_each_weight_its_share_within_a_few_picks() {
        let cursor = AtomicUsize::new(0);
        let weights = [0.1, 1.0, 1.0, 0.55];
        let total: f64 = weights.iter().sum();
        let mut counts = [0usize; 4];
        for _ in 0..10_000 {
            let u = next_fraction(&cursor);
            counts[pick_weighted(4, u, &|_| true, &|i| weights[i]).unwrap()] += 1;
        }
        for (c, w) in counts.iter().zip(weights) {
            let want = 10_000.0 * w / total;
            assert!((*c as f64 - want).abs() < 5.0, "{counts:?}");
        }
    }
}
