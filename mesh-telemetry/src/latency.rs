//! Latency percentiles per destination with HdrHistogram: what Kiali's "P99 latency"
//! shows, available without Prometheus (the admin server's `/stats` view, benches).
//!
//! Each destination gets one histogram of microseconds (1 µs to 1 h, 3 significant
//! digits) behind a mutex held only for the record. [`LatencyStats::handle`] resolves a
//! destination once, so recording is a lock plus an array increment. Values past one hour
//! are clamped to the maximum rather than dropped.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use mesh_telemetry::LatencyStats;
//!
//! let stats = LatencyStats::new();
//! let reviews = stats.handle("reviews.default.svc.cluster.local");
//! for ms in 1..=100 {
//!     reviews.record(Duration::from_millis(ms));
//! }
//! let summary = &stats.snapshot()[0];
//! assert_eq!(summary.count, 100);
//! assert!((summary.p99 - 99.0).abs() < 0.1);
//! print!("{}", stats.render_text()); // the `/stats` view
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hdrhistogram::Histogram;

const MAX_MICROS: u64 = 3_600_000_000;

/// Percentile summary of one destination, in milliseconds.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    /// Destination name.
    pub destination: String,
    /// Recorded requests.
    pub count: u64,
    /// 50th percentile.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
}

type Shared = Arc<Mutex<Histogram<u64>>>;

/// Per-destination latency histograms; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct LatencyStats {
    by_destination: Arc<RwLock<BTreeMap<String, Shared>>>,
}

/// The pre-resolved histogram of one destination.
#[derive(Clone, Debug)]
pub struct LatencyHandle {
    hist: Shared,
}

impl LatencyHandle {
    /// Records one request's duration.
    pub fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(MAX_MICROS)
            .clamp(1, MAX_MICROS);
        let mut h = self.hist.lock().unwrap_or_else(|e| e.into_inner());
        // In range by construction (clamped above).
        let _ = h.record(micros);
    }
}

fn new_histogram() -> Histogram<u64> {
    // Bounds and precision are constants in range; `new_with_bounds` cannot fail here.
    Histogram::new_with_bounds(1, MAX_MICROS, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
    })
}

impl LatencyStats {
    /// No destinations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The histogram of `destination`, created on first use.
    pub fn handle(&self, destination: &str) -> LatencyHandle {
        if let Some(h) = self
            .by_destination
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(destination)
        {
            return LatencyHandle { hist: h.clone() };
        }
        let mut map = self
            .by_destination
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let hist = map
            .entry(destination.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(new_histogram())))
            .clone();
        LatencyHandle { hist }
    }

    /// Percentiles of every destination, sorted by name.
    pub fn snapshot(&self) -> Vec<LatencySummary> {
        let map = self
            .by_destination
            .read()
            .unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(name, h)| {
                let h = h.lock().unwrap_or_else(|e| e.into_inner());
                let ms = |v: u64| v as f64 / 1000.0;
                LatencySummary {
                    destination: name.clone(),
                    count: h.len(),
                    p50: ms(h.value_at_quantile(0.50)),
                    p90: ms(h.value_at_quantile(0.90)),
                    p99: ms(h.value_at_quantile(0.99)),
                    p999: ms(h.value_at_quantile(0.999)),
                    max: ms(h.max()),
                }
            })
            .collect()
    }

    /// The `/stats` text view: one line per destination.
    ///
    /// `<destination> count=<n> p50=<ms> p90=<ms> p99=<ms> p99.9=<ms> max=<ms>`
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for s in self.snapshot() {
            let _ = writeln!(
                out,
                "{} count={} p50={:.3} p90={:.3} p99={:.3} p99.9={:.3} max={:.3}",
                s.destination, s.count, s.p50, s.p90, s.p99, s.p999, s.max
            );
        }
        out
    }

    /// The `/stats?format=json` view.
    pub fn render_json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_else(|_| "[]".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_per_destination_within_hdr_precision() {
        let stats = LatencyStats::new();
        let a = stats.handle("a");
        for ms in 1..=1000u64 {
            a.record(Duration::from_millis(ms));
        }
        stats.handle("b").record(Duration::from_micros(250));
        let snap = stats.snapshot();
        assert_eq!(snap.len(), 2);
        let a = &snap[0];
        assert_eq!((a.destination.as_str(), a.count), ("a", 1000));
        // 3 significant digits: within 0.1 % of the exact order statistic.
        for (got, want) in [
            (a.p50, 500.0),
            (a.p90, 900.0),
            (a.p99, 990.0),
            (a.p999, 999.0),
            (a.max, 1000.0),
        ] {
            assert!((got - want).abs() <= want * 0.001, "{got} vs {want}");
        }
        assert_eq!(snap[1].max, 0.25);
        let text = stats.render_text();
        assert!(text.starts_with("a count=1000 p50=500."), "{text}");
        let json: serde_json::Value = serde_json::from_str(&stats.render_json()).unwrap();
        assert_eq!(json[1]["destination"], "b");
    }

    #[test]
    fn huge_durations_are_clamped_not_dropped() {
        let stats = LatencyStats::new();
        stats.handle("x").record(Duration::from_secs(10 * 3600));
        let s = &stats.snapshot()[0];
        assert_eq!(s.count, 1);
        assert!(s.max >= 3_600_000.0 * 0.999);
    }
}
