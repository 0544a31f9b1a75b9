//! The service graph as Kiali draws it from Istio's metrics.
//!
//! Kiali builds a namespace's graph from `istio_requests_total` in three queries
//! ([`kiali_queries`]): requests from outside the mesh (destination-reported, source
//! `unknown`), requests from workloads of other namespaces, and requests from the
//! namespace's own workloads (both source-reported). It then drops series it treats as
//! bad telemetry ([`Row::dropped_because`]): a source whose namespace is known but
//! whose workload and app are not, a known namespace with an `unknown` cluster on either
//! side, and an IP-address destination without a workload. Each kept series adds its
//! rate to the edge between a source node and a destination node; a node is a workload
//! with its canonical service and revision, or the destination service when no workload
//! is known.
//!
//! The same rules run on Prometheus' answers to those queries (the `kiali` test) and on
//! the proxies' own counters (the demo's step 5, [`rows_from_exposition`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

/// The labels Kiali groups its traffic queries by.
pub const GROUP_BY: &[&str] = &[
    "source_cluster",
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_cluster",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
];

/// Kiali's three HTTP traffic queries for `namespace`, as rates over `window_secs`.
pub fn kiali_queries(namespace: &str, window_secs: u64) -> [String; 3] {
    let by = GROUP_BY.join(",");
    let rate = |selector: String| {
        format!("sum(rate(istio_requests_total{{{selector}}}[{window_secs}s])) by ({by})")
    };
    [
        rate(format!(
            "reporter=\"destination\",source_workload=\"unknown\",destination_workload_namespace=\"{namespace}\""
        )),
        rate(format!(
            "reporter=\"source\",source_workload_namespace!=\"{namespace}\",source_workload!=\"unknown\",destination_service_namespace=\"{namespace}\""
        )),
        rate(format!(
            "reporter=\"source\",source_workload_namespace=\"{namespace}\""
        )),
    ]
}

/// Whether a series with `labels` answers one of [`kiali_queries`] for `namespace`.
pub fn kiali_selects(labels: &BTreeMap<String, String>, namespace: &str) -> bool {
    let get = |k: &str| labels.get(k).map_or("", String::as_str);
    match get("reporter") {
        "destination" => {
            get("source_workload") == "unknown"
                && get("destination_workload_namespace") == namespace
        }
        "source" => {
            get("source_workload_namespace") == namespace
                || (get("source_workload") != "unknown"
                    && get("destination_service_namespace") == namespace)
        }
        _ => false,
    }
}

/// One series: its labels and its value (a rate, or a count over a known time).
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// Label names and values.
    pub labels: BTreeMap<String, String>,
    /// Requests per second (or a count, when the caller divides later).
    pub value: f64,
    /// Cumulative duration histogram of the same series, `(upper bound ms, count)`, when
    /// known (from a proxy's exposition; Kiali asks Prometheus separately).
    pub duration_buckets: Vec<(f64, f64)>,
}

fn ok(v: &str) -> bool {
    !v.is_empty() && v != "unknown"
}

/// `a.b.c.d` or `a.b.c.d:port`: what a destination looks like when only an IP was known.
fn is_ip_service(v: &str) -> bool {
    let host = v.rsplit_once(':').map_or(v, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            v
        }
    });
    host.parse::<std::net::Ipv4Addr>().is_ok()
}

impl Row {
    /// The value of label `k`, empty when absent.
    pub fn get(&self, k: &str) -> &str {
        self.labels.get(k).map_or("", String::as_str)
    }

    /// Why Kiali drops this series as bad telemetry, if it does.
    pub fn dropped_because(&self) -> Option<&'static str> {
        let (ns, wl, app) = (
            self.get("source_workload_namespace"),
            self.get("source_workload"),
            self.get("source_canonical_service"),
        );
        if ok(ns) && !ok(wl) && !ok(app) {
            return Some("source namespace known, workload and app unknown");
        }
        let src_cluster = self.labels.get("source_cluster");
        if ok(ns) && src_cluster.is_some_and(|c| !ok(c)) {
            return Some("source namespace known, source cluster unknown");
        }
        let (svc, svc_name, dest_wl) = (
            self.get("destination_service"),
            self.get("destination_service_name"),
            self.get("destination_workload"),
        );
        if !ok(dest_wl) && ok(svc) && svc == svc_name && is_ip_service(svc_name) {
            return Some("destination is an IP address without a workload");
        }
        // An unknown destination cluster is taken to be the source's (Kiali's workaround
        // for an old Istio bug); only when neither is known is the series dropped.
        let dest_cluster = self.labels.get("destination_cluster");
        if ok(self.get("destination_service_namespace"))
            && dest_cluster.is_some_and(|c| !ok(c))
            && !src_cluster.is_some_and(|c| ok(c))
        {
            return Some("destination namespace known, destination cluster unknown");
        }
        None
    }

    fn source(&self) -> Node {
        Node {
            namespace: self.get("source_workload_namespace").to_owned(),
            workload: self.get("source_workload").to_owned(),
            app: self.get("source_canonical_service").to_owned(),
            version: self.get("source_canonical_revision").to_owned(),
        }
    }

    fn destination(&self) -> Node {
        let workload = self.get("destination_workload");
        if ok(workload) {
            Node {
                namespace: self.get("destination_workload_namespace").to_owned(),
                workload: workload.to_owned(),
                app: self.get("destination_canonical_service").to_owned(),
                version: self.get("destination_canonical_revision").to_owned(),
            }
        } else {
            // No workload known: the request ends at a service node.
            Node {
                namespace: self.get("destination_service_namespace").to_owned(),
                workload: String::new(),
                app: self.get("destination_service_name").to_owned(),
                version: String::new(),
            }
        }
    }

    /// Whether the request failed as Kiali counts errors: no response, or a 4xx/5xx.
    fn failed(&self) -> bool {
        let code = self.get("response_code");
        code == "0" || code.starts_with('4') || code.starts_with('5')
    }
}

/// A node of the graph: a workload (with its canonical service and revision), or a
/// service when no workload is known (`workload` empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    /// Namespace.
    pub namespace: String,
    /// Workload name; empty for a service node.
    pub workload: String,
    /// Canonical service (the app), or the service name of a service node.
    pub app: String,
    /// Canonical revision (the version).
    pub version: String,
}

impl Node {
    /// Whether the node is an `unknown` workload (traffic from outside the mesh).
    pub fn is_unknown(&self) -> bool {
        !ok(&self.workload) && !ok(&self.app)
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unknown() {
            f.write_str("unknown")
        } else if self.workload.is_empty() {
            write!(f, "{} (service)", self.app)
        } else {
            write!(f, "{} ({})", self.workload, self.version)
        }
    }
}

/// The traffic on one edge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Requests per second (or the count, for counts).
    pub rate: f64,
    /// The part of `rate` that failed (no response, 4xx, 5xx).
    pub errors: f64,
    /// Merged cumulative duration histogram, `(upper bound ms, count)`.
    buckets: BTreeMap<u64, f64>,
}

impl Traffic {
    /// Failed share of the requests, in percent.
    pub fn error_percent(&self) -> f64 {
        if self.rate > 0.0 {
            100.0 * (self.errors / self.rate)
        } else {
            0.0
        }
    }

    /// The 99th percentile duration in ms, interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does; `None` without a histogram.
    pub fn p99_ms(&self) -> Option<f64> {
        let total = self.buckets.values().copied().fold(0.0, f64::max);
        if total <= 0.0 {
            return None;
        }
        let rank = 0.99 * total;
        let mut lower = (0.0, 0.0);
        for (&bound, &count) in &self.buckets {
            let upper = f64::from_bits(bound);
            if count >= rank {
                if upper.is_infinite() {
                    return Some(lower.0);
                }
                let share = if count > lower.1 {
                    (rank - lower.1) / (count - lower.1)
                } else {
                    1.0
                };
                return Some(lower.0 + (upper - lower.0) * share);
            }
            lower = (upper, count);
        }
        Some(lower.0)
    }
}

/// The graph: traffic per (source, destination) edge, and what was dropped.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    /// Traffic per edge.
    pub edges: BTreeMap<(Node, Node), Traffic>,
    /// Series dropped as bad telemetry, with the reason.
    pub dropped: Vec<(String, &'static str)>,
}

impl Graph {
    /// The graph of `rows` under Kiali's rules.
    pub fn from_rows(rows: &[Row]) -> Self {
        let mut graph = Self::default();
        for row in rows {
            if let Some(reason) = row.dropped_because() {
                graph.dropped.push((
                    format!(
                        "{} -> {}",
                        row.get("source_workload"),
                        row.get("destination_service")
                    ),
                    reason,
                ));
                continue;
            }
            let t = graph
                .edges
                .entry((row.source(), row.destination()))
                .or_default();
            t.rate += row.value;
            if row.failed() {
                t.errors += row.value;
            }
            for &(bound, count) in &row.duration_buckets {
                *t.buckets.entry(bound.to_bits()).or_default() += count;
            }
        }
        graph
    }

    /// The traffic from the workload named `from` to the workload named `to`.
    pub fn edge(&self, from: &str, to: &str) -> Option<&Traffic> {
        self.edges
            .iter()
            .find(|((s, d), _)| s.workload == from && d.workload == to)
            .map(|(_, t)| t)
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = |side: fn(&(Node, Node)) -> &Node| {
            self.edges
                .keys()
                .map(|k| side(k).to_string().len())
                .max()
                .unwrap_or(0)
        };
        let (from, to) = (width(|k| &k.0), width(|k| &k.1));
        for ((s, d), t) in &self.edges {
            let p99 = t
                .p99_ms()
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.1} ms"));
            writeln!(
                f,
                "{:<from$} -> {:<to$} {:>8.2} req/s {:>5.1} % err  p99 {p99}",
                s.to_string(),
                d.to_string(),
                t.rate,
                t.error_percent()
            )?;
        }
        for (what, why) in &self.dropped {
            writeln!(f, "dropped: {what} ({why})")?;
        }
        Ok(())
    }
}

fn parse(text: &str) -> Vec<prometheus_parse::Sample> {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .map(|s| s.samples)
        .unwrap_or_default()
}

fn labels_of(s: &prometheus_parse::Sample) -> BTreeMap<String, String> {
    s.labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn scalar(v: &prometheus_parse::Value) -> Option<f64> {
    match *v {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Untyped(v)
        | prometheus_parse::Value::Gauge(v) => Some(v),
        _ => None,
    }
}

/// Every series of the counter or gauge `metric` in a Prometheus text exposition.
pub fn series(text: &str, metric: &str) -> Vec<Row> {
    parse(text)
        .iter()
        .filter(|s| s.metric == metric)
        .filter_map(|s| {
            Some(Row {
                labels: labels_of(s),
                value: scalar(&s.value)?,
                duration_buckets: Vec::new(),
            })
        })
        .collect()
}

/// The rows [`kiali_queries`] would select for `namespace` from one proxy's metrics
/// (Prometheus text exposition), with counts as values and each series' duration
/// histogram.
pub fn rows_from_exposition(text: &str, namespace: &str) -> Vec<Row> {
    let samples = parse(text);
    let mut histograms: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &samples {
        if s.metric == "istio_request_duration_milliseconds"
            && let prometheus_parse::Value::Histogram(buckets) = &s.value
        {
            histograms.insert(
                labels_of(s),
                buckets.iter().map(|b| (b.less_than, b.count)).collect(),
            );
        }
    }
    samples
        .iter()
        .filter(|s| s.metric == "istio_requests_total")
        .filter_map(|s| {
            let labels = labels_of(s);
            if !kiali_selects(&labels, namespace) {
                return None;
            }
            Some(Row {
                value: scalar(&s.value)?,
                duration_buckets: histograms.remove(&labels).unwrap_or_default(),
                labels,
            })
        })
        .collect()
}

/// A Prometheus configuration scraping the proxies' metrics every `interval_secs`:
/// one target per proxy, labelled with its name.
pub fn scrape_config(proxies: &[(String, SocketAddr)], interval_secs: u64) -> String {
    let mut out = format!(
        "global:\n  scrape_interval: {interval_secs}s\n  evaluation_interval: {interval_secs}s\nscrape_configs:\n- job_name: mesh-proxies\n  metrics_path: /stats/prometheus\n  static_configs:\n"
    );
    for (name, addr) in proxies {
        out.push_str(&format!(
            "  - targets: ['{addr}']\n    labels: {{proxy: '{name}'}}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pairs: &[(&str, &str)], value: f64) -> Row {
        Row {
            labels: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
            duration_buckets: Vec::new(),
        }
    }

    #[test]
    fn kiali_drops_sources_without_workload_and_unknown_clusters() {
        let good = [
            ("source_workload_namespace", "production"),
            ("source_workload", "order-service-v1"),
            ("source_canonical_service", "order-service"),
            ("source_cluster", "Kubernetes"),
            ("destination_cluster", "Kubernetes"),
            ("destination_service_namespace", "production"),
            (
                "destination_service",
                "payment-service.production.svc.cluster.local",
            ),
            ("destination_service_name", "payment-service"),
            ("destination_workload", "payment-service-v1"),
        ];
        assert_eq!(row(&good, 1.0).dropped_because(), None);
        let with = |k: &str, v: &str| {
            let mut r = row(&good, 1.0);
            r.labels.insert(k.to_owned(), v.to_owned());
            r
        };
        let mut no_wl = with("source_workload", "unknown");
        no_wl
            .labels
            .insert("source_canonical_service".into(), "unknown".into());
        assert!(no_wl.dropped_because().is_some());
        assert!(
            with("source_cluster", "unknown")
                .dropped_because()
                .is_some()
        );
        // An unknown destination cluster is taken to be the source's.
        assert_eq!(
            with("destination_cluster", "unknown").dropped_because(),
            None
        );
        let mut ip = with("destination_workload", "unknown");
        ip.labels
            .insert("destination_service".into(), "10.0.0.7:8080".into());
        ip.labels
            .insert("destination_service_name".into(), "10.0.0.7:8080".into());
        assert!(ip.dropped_because().is_some());
    }

    #[test]
    fn edges_sum_rates_and_errors_and_interpolate_p99() {
        let base = [
            ("source_workload_namespace", "production"),
            ("source_workload", "a"),
            ("source_canonical_service", "a"),
            ("destination_workload", "b"),
            ("destination_canonical_service", "b"),
        ];
        let mut ok_row = row(&base, 9.0);
        ok_row.labels.insert("response_code".into(), "200".into());
        ok_row.duration_buckets = vec![
            (1.0, 50.0),
            (5.0, 99.0),
            (10.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let mut err = row(&base, 1.0);
        err.labels.insert("response_code".into(), "503".into());
        let g = Graph::from_rows(&[ok_row, err]);
        let t = g.edge("a", "b").unwrap();
        assert_eq!((t.rate, t.error_percent()), (10.0, 10.0));
        // Rank 99 of 100 is the last of the (1, 5] bucket.
        assert_eq!(t.p99_ms(), Some(5.0));
    }

    #[test]
    fn exposition_rows_follow_the_queries() {
        let text = "# TYPE istio_requests counter\n\
            istio_requests_total{reporter=\"source\",source_workload_namespace=\"production\",source_workload=\"a\"} 3\n\
            istio_requests_total{reporter=\"source\",source_workload_namespace=\"other\",source_workload=\"unknown\",destination_service_namespace=\"production\"} 5\n\
            istio_requests_total{reporter=\"destination\",source_workload=\"unknown\",destination_workload_namespace=\"production\"} 7\n\
            istio_requests_total{reporter=\"destination\",source_workload=\"a\",destination_workload_namespace=\"production\"} 11\n";
        let rows = rows_from_exposition(text, "production");
        let values: Vec<f64> = rows.iter().map(|r| r.value).collect();
        assert_eq!(values, [3.0, 7.0]);
    }
}
