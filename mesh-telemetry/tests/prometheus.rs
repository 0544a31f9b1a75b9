//! The exposition as Prometheus tooling sees it: `promtool check metrics` and a real
//! Prometheus server scraping a metrics endpoint served with hyper.
//!
//! Both need Debian's `prometheus` package (`promtool` and `prometheus`). When a binary is
//! absent the test says so and returns; nothing else makes them skip.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use mesh_core::body::{self, BoxBody};
use mesh_core::error::Overflow;
use mesh_core::extensions::add_response_flags;
use mesh_core::{BoxError, ConnectionSecurity, ResponseFlags};
use mesh_telemetry::metrics::Reporter;
use mesh_telemetry::{MetricsRegistry, RequestBody, Telemetry, TelemetryLayer, Workload};
use support::*;
use tokio::io::AsyncWriteExt;
use tower::{Layer, ServiceExt};

type Req = Request<RequestBody<BoxBody>>;

/// The tool `name` from `PATH`. When it is missing the test fails under CI (env `CI`
/// set) and otherwise says that it skipped.
fn binary(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required under CI (Debian's `prometheus` package) but is not on PATH"
        );
        eprintln!("SKIPPED: {name} not found on PATH (install Debian's `prometheus` package)");
    }
    found
}

/// Sends a mix of outcomes (200, 418 FI, 503 UO) through an outbound layer and fills
/// every other family.
async fn traffic(t: &Telemetry, ok: usize) {
    let svc = TelemetryLayer::outbound(t, reviews_service(), reviews()).layer(tower::service_fn(
        |req: Req| async move {
            match req.uri().path() {
                "/fault" => {
                    let mut res = Response::new(body::full("fault filter abort"));
                    *res.status_mut() = StatusCode::IM_A_TEAPOT;
                    add_response_flags(res.extensions_mut(), ResponseFlags::FAULT_INJECTED);
                    Ok(res)
                }
                "/overflow" => Err::<Response<BoxBody>, BoxError>(Box::new(Overflow)),
                _ => Ok(Response::new(body::full("ok"))),
            }
        },
    ));
    for path in std::iter::repeat_n("/ok", ok).chain(["/fault", "/overflow"]) {
        let req = Request::get(path)
            .header("host", "reviews:9080")
            .body(body::full("x"))
            .unwrap();
        if let Ok(res) = svc.clone().oneshot(req).await {
            body_bytes(res.into_body()).await;
        }
    }
    let m = t.metrics();
    let tcp = m.istio().tcp(
        Reporter::Destination,
        t.workload(),
        &Workload::unknown(),
        &reviews_service(),
        ConnectionSecurity::MutualTls,
    );
    tcp.opened();
    tcp.sent(1024);
    tcp.received(512);
    tcp.closed();
    let p = m.proxy();
    p.config_reloaded();
    p.config_reload_failed();
    p.set_certificate_expiry(
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        1_900_000_000,
    );
    let d = p.destination("outbound|9080|v2|reviews.default.svc.cluster.local");
    d.ejections.inc();
    d.ejection_overflows.inc();
    d.ejected.set(1);
    d.pool_overflows.inc();
    d.retries.inc_by(2);
    p.active_connections("outbound").set(3);
    p.spans_dropped.inc();
    p.spans_exported.inc();
    p.access_log_dropped.inc();
}

#[tokio::test]
async fn promtool_accepts_the_exposition() {
    let Some(promtool) = binary("promtool") else {
        return;
    };
    let t = Telemetry::builder(productpage()).build();
    traffic(&t, 3).await;
    let text = t.encode_metrics();
    for family in [
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "mesh_config_reloads_total",
        "mesh_certificate_expiry_timestamp_seconds",
        "mesh_outlier_ejections_overflow_total",
        "mesh_pool_overflows_total",
        "mesh_retries_total",
        "mesh_active_connections",
        "mesh_trace_spans_dropped_total",
    ] {
        assert!(
            text.contains(&format!("\n{family}{{")) || text.contains(&format!("\n{family} ")),
            "{family} missing"
        );
    }
    let mut child = tokio::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("promtool finished")
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits non-zero on lint findings too. Istio's own metric name keeps its
    // unit (`..._milliseconds`), which the naming lint flags; that one finding is expected
    // (a real Istio sidecar's exposition gets it as well). Anything else fails.
    const ISTIO_NAME_LINT: &str =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    let findings: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        findings.iter().all(|l| *l == ISTIO_NAME_LINT),
        "promtool check metrics reported:\n{report}\n---\n{text}"
    );
    assert!(
        out.status.success() || findings == [ISTIO_NAME_LINT],
        "{report}"
    );
}

#[tokio::test]
async fn promtool_rejects_a_broken_exposition() {
    // Guards the test above: promtool really reads what we feed it.
    let Some(promtool) = binary("promtool") else {
        return;
    };
    let mut child = tokio::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"# TYPE istio_requests_total counter\nistio_requests_total{reporter=\"source} 1\n",
        )
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("promtool finished")
        .unwrap();
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("error while linting"), "{report}");
}

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_server_scrapes_istio_requests_total() {
    let Some(prometheus) = binary("prometheus") else {
        return;
    };
    let t = Telemetry::builder(productpage())
        .metrics(MetricsRegistry::new())
        .build();
    traffic(&t, 7).await;

    // The metrics endpoint, as the admin server would serve it.
    let served = t.clone();
    let metrics_addr = serve(move |req| {
        let t = served.clone();
        async move {
            if req.uri().path() != "/metrics" {
                let mut res = Response::new(Full::new(Bytes::new()));
                *res.status_mut() = StatusCode::NOT_FOUND;
                return res;
            }
            Response::builder()
                .header("content-type", MetricsRegistry::CONTENT_TYPE)
                .body(Full::new(Bytes::from(t.encode_metrics())))
                .unwrap()
        }
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: mesh\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: ['{metrics_addr}']\n"
        ),
    )
    .unwrap();
    let port = free_port().await;
    let mut child = tokio::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=istio_requests_total%7Bresponse_code%3D%22200%22%7D"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let result = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Prometheus did not report istio_requests_total within 90 s"
        );
        if let Ok(Some(status)) = child.try_wait() {
            panic!("prometheus exited early: {status}");
        }
        if let Ok(res) = client.get(query.parse().unwrap()).await {
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                break v;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let series = &result["data"]["result"][0];
    assert_eq!(series["metric"]["__name__"], "istio_requests_total");
    assert_eq!(series["metric"]["reporter"], "source");
    assert_eq!(
        series["metric"]["destination_service"],
        "reviews.default.svc.cluster.local"
    );
    assert_eq!(
        series["metric"]["source_principal"],
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    );
    assert_eq!(series["value"][1], "7");

    // The other outcomes were scraped as their own series.
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=sum%20by%20(response_code%2Cresponse_flags)%20(istio_requests_total)"
    );
    let res = client.get(query.parse().unwrap()).await.unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let mut got: Vec<(String, String, String)> = v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metric"]["response_code"].as_str().unwrap().to_owned(),
                r["metric"]["response_flags"].as_str().unwrap().to_owned(),
                r["value"][1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("200".into(), "-".into(), "7".into()),
            ("418".into(), "FI".into(), "1".into()),
            ("503".into(), "UO".into(), "1".into()),
        ]
    );
    child.kill().await.ok();
}
