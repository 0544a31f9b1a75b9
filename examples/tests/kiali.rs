//! Kiali's graph and Istio's Grafana dashboards over the demo's mesh: Debian's
//! Prometheus scrapes every proxy while orders flow through the gateway, then the
//! queries Kiali's graph runs, and the main queries of Istio's mesh, service and
//! workload dashboards, are asked of it through its HTTP API.
//!
//! Expected: the edges istio-ingressgateway -> order-service (v1, v2) ->
//! payment-service (v1), with their request rates; the AuthorizationPolicy's denials
//! as an edge with 100 % errors; no series dropped by Kiali's rules and no `unknown`
//! node; one dashboard series per real workload.
//!
//! Needs `prometheus` on PATH (Debian's `prometheus` package): without it the test
//! fails when `CI` is set and says it skipped elsewhere.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use examples::demo::Running;
use examples::graph::{self, Graph, Row};
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

const NS: &str = "production";
const PAYMENT: &str = "payment-service.production.svc.cluster.local";

fn binary(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

struct Prometheus {
    port: u16,
    client: Client<HttpConnector, Empty<Bytes>>,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(binary: &std::path::Path, config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = std::process::Command::new(binary)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            port,
            client: Client::builder(TokioExecutor::new()).build_http(),
            child,
            _dir: dir,
        }
    }

    /// An instant query's result vector; empty while Prometheus is not up.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let uri = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            utf8_percent_encode(promql, NON_ALPHANUMERIC)
        );
        let Ok(res) = self.client.get(uri.parse().unwrap()).await else {
            return Vec::new();
        };
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The rows of an instant query: labels and value.
    async fn rows(&self, promql: &str) -> Vec<Row> {
        self.query(promql)
            .await
            .into_iter()
            .map(|r| Row {
                labels: r["metric"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                    .collect(),
                value: r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0),
                duration_buckets: Vec::new(),
            })
            .collect()
    }

    /// The values of `label` over the series of `promql`.
    async fn label_values(&self, promql: &str, label: &str) -> BTreeSet<String> {
        self.rows(promql)
            .await
            .iter()
            .map(|r| r.get(label).to_owned())
            .collect()
    }

    /// The values of `label` over the series of `promql` once they are `want`, traffic
    /// flowing meanwhile (a rate needs two scrapes of every reporting proxy), or what
    /// they are after 60 s.
    async fn once(
        &self,
        mesh: &Running,
        promql: &str,
        label: &str,
        want: &BTreeSet<String>,
    ) -> BTreeSet<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.label_values(promql, label).await;
            if got == *want || tokio::time::Instant::now() > deadline {
                return got;
            }
            mesh.orders(8, 4).await;
            let _ = mesh.denied_payment().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The graph Kiali builds for `namespace` from this Prometheus.
    async fn kiali_graph(&self, namespace: &str) -> Graph {
        let mut rows = Vec::new();
        for q in graph::kiali_queries(namespace, 60) {
            rows.extend(self.rows(&q).await);
        }
        Graph::from_rows(&rows)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|v| (*v).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiali_graph_and_istio_dashboards_over_prometheus() {
    let Some(binary) = binary("prometheus") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus not found on PATH (Debian's `prometheus` package)"
        );
        eprintln!("SKIPPED: prometheus not found on PATH (install Debian's `prometheus` package)");
        return;
    };
    let mesh = Running::start().await.unwrap();
    let prometheus = Prometheus::start(&binary, &graph::scrape_config(&mesh.proxies(), 1)).await;

    let expected = [
        ("istio-ingressgateway", "order-service-v1"),
        ("istio-ingressgateway", "order-service-v2"),
        ("order-service-v1", "payment-service-v1"),
        ("order-service-v2", "payment-service-v1"),
        ("istio-ingressgateway", "payment-service-v1"),
    ];
    // Orders flow (every fourth is a canary, so both versions take traffic) and, now
    // and then, the gateway tries to pay itself, which the AuthorizationPolicy denies;
    // rates need two scrapes of every proxy after the traffic began.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let graph = loop {
        let statuses = mesh.orders(20, 4).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::OK),
            "{statuses:?}"
        );
        assert_eq!(mesh.denied_payment().await.unwrap(), StatusCode::FORBIDDEN);
        let graph = prometheus.kiali_graph(NS).await;
        if expected
            .iter()
            .all(|(from, to)| graph.edge(from, to).is_some_and(|t| t.rate > 0.0))
        {
            break graph;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Kiali's graph did not show every edge within 90 s:\n{graph}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    println!("{graph}");
    assert!(graph.dropped.is_empty(), "series dropped:\n{graph}");
    for (s, d) in graph.edges.keys() {
        assert!(!s.is_unknown() && !d.is_unknown(), "unknown node:\n{graph}");
        assert!(
            !s.workload.is_empty() && !d.workload.is_empty(),
            "a node without its workload: {s} -> {d}\n{graph}"
        );
    }
    let edges: BTreeSet<(String, String)> = graph
        .edges
        .keys()
        .map(|(s, d)| (s.workload.clone(), d.workload.clone()))
        .collect();
    let want: BTreeSet<(String, String)> = expected
        .iter()
        .map(|(s, d)| ((*s).to_owned(), (*d).to_owned()))
        .collect();
    assert_eq!(edges, want, "{graph}");
    for (from, to) in &expected[..4] {
        let t = graph.edge(from, to).unwrap();
        assert_eq!(t.error_percent(), 0.0, "{from} -> {to}\n{graph}");
    }
    let denied = graph
        .edge("istio-ingressgateway", "payment-service-v1")
        .unwrap();
    assert_eq!(denied.error_percent(), 100.0, "{graph}");
    // Nodes by workload and version.
    let versions: BTreeSet<(String, String)> = graph
        .edges
        .keys()
        .flat_map(|(s, d)| [s, d])
        .map(|n| (n.workload.clone(), n.version.clone()))
        .collect();
    for (wl, v) in [
        ("order-service-v1", "v1"),
        ("order-service-v2", "v2"),
        ("payment-service-v1", "v1"),
    ] {
        assert!(
            versions.contains(&(wl.to_owned(), v.to_owned())),
            "{wl} {v}: {versions:?}"
        );
    }

    // Istio's mesh dashboard: the workload table, one row per destination workload.
    let q = "sum(rate(istio_requests_total{reporter=~\"source|waypoint\"}[1m])) \
             by (destination_workload, destination_workload_namespace, destination_service)";
    let want = set(&["order-service-v1", "order-service-v2", "payment-service-v1"]);
    assert_eq!(
        prometheus
            .once(&mesh, q, "destination_workload", &want)
            .await,
        want
    );
    // The service dashboard: payment-service's clients by source, both reporters.
    for reporter in ["source", "destination"] {
        let q = format!(
            "sum(rate(istio_requests_total{{reporter=\"{reporter}\",destination_service=~\"{PAYMENT}\"}}[1m])) \
             by (source_workload, source_workload_namespace, response_code)"
        );
        let want = set(&[
            "istio-ingressgateway",
            "order-service-v1",
            "order-service-v2",
        ]);
        assert_eq!(
            prometheus.once(&mesh, &q, "source_workload", &want).await,
            want,
            "reporter {reporter}"
        );
    }
    // The workload dashboard: order-service-v2's inbound by source (both reporters) and
    // outbound by destination.
    for reporter in ["source", "destination"] {
        let q = format!(
            "sum(rate(istio_requests_total{{reporter=\"{reporter}\",destination_workload=\"order-service-v2\",destination_workload_namespace=\"{NS}\"}}[1m])) \
             by (source_workload, source_workload_namespace, source_app, source_version)"
        );
        let want = set(&["istio-ingressgateway"]);
        assert_eq!(
            prometheus.once(&mesh, &q, "source_workload", &want).await,
            want,
            "reporter {reporter}"
        );
    }
    let q = format!(
        "sum(rate(istio_requests_total{{reporter=\"source\",source_workload=\"order-service-v2\",source_workload_namespace=\"{NS}\"}}[1m])) \
         by (destination_workload, destination_service, destination_version)"
    );
    let want = set(&["payment-service-v1"]);
    prometheus
        .once(&mesh, &q, "destination_workload", &want)
        .await;
    let rows = prometheus.rows(&q).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].get("destination_workload"), "payment-service-v1");
    assert_eq!(rows[0].get("destination_service"), PAYMENT);
    assert_eq!(rows[0].get("destination_version"), "v1");
    // Cluster labels on both sides, and the component versions panel.
    let clusters = "count(istio_requests_total) by (source_cluster, destination_cluster)";
    for r in prometheus.rows(clusters).await {
        assert_eq!(
            (r.get("source_cluster"), r.get("destination_cluster")),
            ("Kubernetes", "Kubernetes"),
            "{r:?}"
        );
    }
    let builds = prometheus
        .rows("sum(istio_build{component=\"proxy\"}) by (tag)")
        .await;
    assert_eq!(builds.len(), 1);
    assert_eq!(builds[0].value, mesh.proxies().len() as f64);
}
