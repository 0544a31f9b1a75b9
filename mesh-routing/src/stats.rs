//! Per-route statistics for match blocks with a `statPrefix`, as Envoy keeps them for a
//! route with `stat_prefix`: rooted at `vhost.<virtual host>.route.<statPrefix>.`.
//!
//! # Behaviour
//!
//! - Counted per upstream request of a route whose matched block has a `statPrefix`:
//!   `upstream_rq_total`, `upstream_rq_<code>` and `upstream_rq_<class>xx` (from the
//!   response status; a request that failed without a response counts as Envoy's local
//!   reply: 504 after the route timeout, also counted in `upstream_rq_timeout`, else
//!   503), and `upstream_rq_time`, a histogram of the milliseconds until the response
//!   headers, with Envoy's default buckets.
//! - Requests answered before any upstream call (redirects, direct responses, injected
//!   aborts, CORS preflights) are not upstream requests and are not counted.
//! - Counters live in a process-wide registry keyed by (virtual host, prefix): blocks
//!   sharing a prefix share counters (as Envoy's stat names do), and a reload keeps the
//!   counts. Blocks without a `statPrefix` hold nothing and cost nothing per request.
//! - The virtual host is named as the table names it: `namespace/name` of the
//!   VirtualService.
//!
//! Exposition: [`render_text`] (admin `/stats`, `name: value` lines) and
//! [`render_prometheus`] (Envoy's tag extraction: `envoy_vhost_route_upstream_rq_total`
//! with `envoy_virtual_host` and `envoy_route`; per code and class as
//! `envoy_vhost_route_upstream_rq` with `envoy_response_code` or
//! `envoy_response_code_class`; `envoy_vhost_route_upstream_rq_time` histogram).
//!
//! The Prometheus text is written here rather than by `prometheus-client`, which the
//! Istio metrics use: that crate appends `_total` to every counter it encodes, and
//! Envoy's per-code counter is `envoy_vhost_route_upstream_rq`, the name dashboards
//! built on Envoy's statistics query. Label values are escaped as the text format 0.0.4
//! requires; `promtool check metrics` reads the whole `/stats/prometheus` page in the
//! `vs_stat_prefix` test.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Envoy's default histogram bucket bounds, in milliseconds.
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Status codes counted one by one: 100..=599.
const CODES: usize = 500;

/// The counters of one (virtual host, stat prefix).
#[derive(Debug)]
pub struct RouteStats {
    virtual_host: String,
    prefix: String,
    total: AtomicU64,
    timeout: AtomicU64,
    codes: Box<[AtomicU64]>,
    /// Requests per bucket (not cumulative: the export adds them up).
    buckets: [AtomicU64; BUCKETS.len()],
    time_count: AtomicU64,
    /// Sum of the recorded times, in microseconds.
    time_sum_us: AtomicU64,
}

impl RouteStats {
    fn new(virtual_host: &str, prefix: &str) -> Self {
        Self {
            virtual_host: virtual_host.to_owned(),
            prefix: prefix.to_owned(),
            total: AtomicU64::new(0),
            timeout: AtomicU64::new(0),
            codes: (0..CODES).map(|_| AtomicU64::new(0)).collect(),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            time_count: AtomicU64::new(0),
            time_sum_us: AtomicU64::new(0),
        }
    }

    /// The counters of `(virtual_host, prefix)`, shared with every block naming them.
    pub fn get(virtual_host: &str, prefix: &str) -> Arc<Self> {
        let mut map = registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            map.entry((virtual_host.to_owned(), prefix.to_owned()))
                .or_insert_with(|| Arc::new(Self::new(virtual_host, prefix))),
        )
    }

    /// Records one upstream request answered with `status` after `elapsed`.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = usize::from(status)
            .checked_sub(100)
            .and_then(|i| self.codes.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
        // One count in the first bucket that holds the time; the export sums them up.
        let ms = elapsed.as_secs_f64() * 1000.0;
        if let Some(bucket) = BUCKETS
            .iter()
            .position(|bound| ms <= *bound)
            .and_then(|i| self.buckets.get(i))
        {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.time_count.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.time_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Records one upstream request that failed without a response: 504 and
    /// `upstream_rq_timeout` when `timed_out`, else 503.
    pub fn record_failure(&self, timed_out: bool, elapsed: Duration) {
        if timed_out {
            self.timeout.fetch_add(1, Ordering::Relaxed);
            self.record(504, elapsed);
        } else {
            self.record(503, elapsed);
        }
    }

    /// `upstream_rq_total`.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// `upstream_rq_<status>`.
    pub fn code(&self, status: u16) -> u64 {
        usize::from(status)
            .checked_sub(100)
            .and_then(|i| self.codes.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The codes seen, with their counts, and the counts per class (1..=5).
    fn snapshot(&self) -> (Vec<(u16, u64)>, [u64; 5]) {
        let mut codes = Vec::new();
        let mut classes = [0; 5];
        for (i, c) in self.codes.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                classes[i / 100] += n;
                codes.push((100 + i as u16, n));
            }
        }
        (codes, classes)
    }
}

impl PartialEq for RouteStats {
    /// The same counters: the same virtual host and prefix.
    fn eq(&self, other: &Self) -> bool {
        self.virtual_host == other.virtual_host && self.prefix == other.prefix
    }
}

/// Counters by (virtual host, prefix).
type Registry = Mutex<BTreeMap<(String, String), Arc<RouteStats>>>;

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

fn all() -> Vec<Arc<RouteStats>> {
    registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .cloned()
        .collect()
}

/// Every route's counters as Envoy's `/stats` lines (`name: value`), sorted by name.
pub fn render_text() -> String {
    let mut lines = Vec::new();
    for s in all() {
        let root = format!("vhost.{}.route.{}", s.virtual_host, s.prefix);
        let (codes, classes) = s.snapshot();
        lines.push(format!("{root}.upstream_rq_total: {}", s.total()));
        lines.push(format!(
            "{root}.upstream_rq_timeout: {}",
            s.timeout.load(Ordering::Relaxed)
        ));
        for (class, n) in classes.iter().enumerate() {
            if *n > 0 {
                lines.push(format!("{root}.upstream_rq_{}xx: {n}", class + 1));
            }
        }
        for (code, n) in codes {
            lines.push(format!("{root}.upstream_rq_{code}: {n}"));
        }
        let count = s.time_count.load(Ordering::Relaxed);
        if count > 0 {
            let mean = s.time_sum_us.load(Ordering::Relaxed) as f64 / 1000.0 / count as f64;
            lines.push(format!(
                "{root}.upstream_rq_time: count={count} mean_ms={mean:.3}"
            ));
        }
    }
    lines.sort();
    let mut out = String::new();
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every route's counters in the Prometheus text format, named as Envoy's tag
/// extraction names them (see the module docs); empty when no route has a prefix.
pub fn render_prometheus() -> String {
    let stats = all();
    if stats.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    let tags = |s: &RouteStats| {
        format!(
            "envoy_virtual_host=\"{}\",envoy_route=\"{}\"",
            label(&s.virtual_host),
            label(&s.prefix)
        )
    };
    out.push_str("# TYPE envoy_vhost_route_upstream_rq_total counter\n");
    for s in &stats {
        let _ = writeln!(
            out,
            "envoy_vhost_route_upstream_rq_total{{{}}} {}",
            tags(s),
            s.total()
        );
    }
    out.push_str("# TYPE envoy_vhost_route_upstream_rq_timeout counter\n");
    for s in &stats {
        let _ = writeln!(
            out,
            "envoy_vhost_route_upstream_rq_timeout{{{}}} {}",
            tags(s),
            s.timeout.load(Ordering::Relaxed)
        );
    }
    out.push_str("# TYPE envoy_vhost_route_upstream_rq counter\n");
    for s in &stats {
        let (codes, classes) = s.snapshot();
        for (class, n) in classes.iter().enumerate() {
            if *n > 0 {
                let _ = writeln!(
                    out,
                    "envoy_vhost_route_upstream_rq{{envoy_response_code_class=\"{}\",{}}} {n}",
                    class + 1,
                    tags(s)
                );
            }
        }
        for (code, n) in codes {
            let _ = writeln!(
                out,
                "envoy_vhost_route_upstream_rq{{envoy_response_code=\"{code}\",{}}} {n}",
                tags(s)
            );
        }
    }
    out.push_str("# TYPE envoy_vhost_route_upstream_rq_time histogram\n");
    for s in &stats {
        let t = tags(s);
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&s.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "envoy_vhost_route_upstream_rq_time_bucket{{{t},le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = s.time_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "envoy_vhost_route_upstream_rq_time_bucket{{{t},le=\"+Inf\"}} {count}"
        );
        let sum = s.time_sum_us.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "envoy_vhost_route_upstream_rq_time_sum{{{t}}} {sum}");
        let _ = writeln!(
            out,
            "envoy_vhost_route_upstream_rq_time_count{{{t}}} {count}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_classes_and_times_are_counted() {
        let s = RouteStats::get("test/unit-vh", "unit");
        s.record(200, Duration::from_millis(3));
        s.record(200, Duration::from_millis(30));
        s.record(404, Duration::from_millis(1));
        s.record_failure(true, Duration::from_secs(2));
        assert_eq!(s.total(), 4);
        assert_eq!(s.code(200), 2);
        assert_eq!(s.code(504), 1);
        let text = render_text();
        assert!(text.contains("vhost.test/unit-vh.route.unit.upstream_rq_2xx: 2\n"));
        assert!(text.contains("vhost.test/unit-vh.route.unit.upstream_rq_timeout: 1\n"));
        let prom = render_prometheus();
        assert!(prom.contains(
            "envoy_vhost_route_upstream_rq{envoy_response_code=\"404\",envoy_virtual_host=\"test/unit-vh\",envoy_route=\"unit\"} 1\n"
        ));
        assert!(prom.contains(
            "envoy_vhost_route_upstream_rq_time_bucket{envoy_virtual_host=\"test/unit-vh\",envoy_route=\"unit\",le=\"5\"} 2\n"
        ));
        assert!(prom.contains(
            "envoy_vhost_route_upstream_rq_time_bucket{envoy_virtual_host=\"test/unit-vh\",envoy_route=\"unit\",le=\"50\"} 3\n"
        ));
        // The same key is the same counters.
        assert_eq!(RouteStats::get("test/unit-vh", "unit").total(), 4);
    }
}
