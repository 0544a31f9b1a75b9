//! Outlier detection settings, field for field Istio's `OutlierDetection` (ISTIO.md §2.4).

use std::time::Duration;

/// Envoy's floor for the maximum ejection time.
pub const MAX_EJECTION_TIME_FLOOR: Duration = Duration::from_secs(300);

/// Outlier detection settings with Istio's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// `consecutive5xxErrors` (default 5; 0 disables this detection).
    pub consecutive_5xx_errors: u32,
    /// `consecutiveGatewayErrors` (default 0: disabled).
    pub consecutive_gateway_errors: u32,
    /// `splitExternalLocalOriginErrors` (default false): when true, local-origin failures
    /// (connect failure, reset, timeout) count only towards
    /// [`consecutive_local_origin_failures`](Self::consecutive_local_origin_failures).
    pub split_external_local_origin_errors: bool,
    /// `consecutiveLocalOriginFailures` (default 5; used only in split mode; 0 disables).
    pub consecutive_local_origin_failures: u32,
    /// `interval` between ejection sweeps (default 10 s).
    pub interval: Duration,
    /// `baseEjectionTime` (default 30 s).
    pub base_ejection_time: Duration,
    /// `maxEjectionPercent` (default 10). Istio leaves Envoy's default of 10 in place when
    /// the field is 0; a converter from Istio's config must map 0 to 10.
    pub max_ejection_percent: u32,
    /// `minHealthPercent` (default 0: panic mode disabled).
    pub min_health_percent: u32,
    /// Envoy's `always_eject_one_host` (default false; Istio does not expose it): allows
    /// the first ejection even when the percentage cap would forbid it.
    pub always_eject_one_host: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            always_eject_one_host: false,
        }
    }
}

impl OutlierConfig {
    /// Envoy's `max_ejection_time` as Istio leaves it: max(300 s, base ejection time).
    pub fn max_ejection_time(&self) -> Duration {
        MAX_EJECTION_TIME_FLOOR.max(self.base_ejection_time)
    }

    /// How many of `total` hosts the cap lets be ejected at once (DR-36, current Envoy:
    /// a new ejection needs `100 × (ejected + 1) / total ≤ maxEjectionPercent`).
    pub fn max_ejected(&self, total: usize) -> usize {
        let by_percent = total.saturating_mul(self.max_ejection_percent.min(100) as usize) / 100;
        if self.always_eject_one_host && total > 0 {
            by_percent.max(1)
        } else {
            by_percent
        }
    }

    /// Whether one more host may be ejected when `ejected` of `total` already are.
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        if total == 0 {
            return false;
        }
        let pct = self.max_ejection_percent.min(100) as u128;
        100 * (ejected as u128 + 1) <= pct * total as u128
            || (self.always_eject_one_host && ejected == 0)
    }

    /// The ejection time for a host ejected with multiplier `k`: min(base × k, max).
    pub fn ejection_time(&self, multiplier: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(multiplier)
            .min(self.max_ejection_time())
    }

    /// Whether panic mode applies with `healthy` of `total` hosts not ejected (DR-39).
    pub fn in_panic(&self, healthy: usize, total: usize) -> bool {
        self.min_health_percent > 0
            && total > 0
            && (healthy as u128) * 100 < u128::from(self.min_health_percent) * total as u128
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cap_rounding_is_current_envoys() {
        let c = |pct| OutlierConfig {
            max_ejection_percent: pct,
            ..OutlierConfig::default()
        };
        assert_eq!(c(50).max_ejected(3), 1, "50 % of 3 hosts is 1");
        assert_eq!(
            c(10).max_ejected(9),
            0,
            "the default never ejects below 10 hosts"
        );
        assert_eq!(c(10).max_ejected(10), 1);
        assert_eq!(c(100).max_ejected(3), 3);
        let one = OutlierConfig {
            always_eject_one_host: true,
            ..c(10)
        };
        assert_eq!(one.max_ejected(3), 1);
        assert!(one.may_eject(0, 3) && !one.may_eject(1, 3));
    }

    #[test]
    fn max_ejection_time_is_at_least_300s() {
        let mut c = OutlierConfig::default();
        assert_eq!(c.max_ejection_time(), Duration::from_secs(300));
        assert_eq!(c.ejection_time(3), Duration::from_secs(90));
        assert_eq!(c.ejection_time(11), Duration::from_secs(300));
        c.base_ejection_time = Duration::from_secs(400);
        assert_eq!(c.max_ejection_time(), Duration::from_secs(400));
    }

    proptest! {
        #[test]
        fn may_eject_agrees_with_the_floor_formula(pct in 0u32..=100, total in 1usize..500, ejected in 0usize..500) {
            let c = OutlierConfig { max_ejection_percent: pct, ..OutlierConfig::default() };
            prop_assert_eq!(c.may_eject(ejected, total), ejected < total * pct as usize / 100);
        }
    }
}
