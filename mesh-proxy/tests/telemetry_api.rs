//! Istio's Telemetry API through the real binary: order-service's sidecar calls
//! payment-service's sidecar over mTLS, under mesh, namespace and workload Telemetry
//! resources (ISTIO.md TA-01..TA-10).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

/// Mesh level: a tag everyone gets. Namespace level: REQUEST_COUNT off on the server
/// side, the tag replaced, `request_protocol` removed and `method` added on the client
/// side, access logging off. Workload level (payment-service): the tag replaced again,
/// access logging on for responses of 400 and above.
const TELEMETRY: &str = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics:
  - overrides:
    - tagOverrides:
        level: {value: "'mesh'"}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: namespace-default, namespace: production}
spec:
  accessLogging:
  - disabled: true
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT, mode: SERVER}
      disabled: true
    - tagOverrides:
        level: {value: "'namespace'"}
    - match: {mode: CLIENT}
      tagOverrides:
        request_protocol: {operation: REMOVE}
        method: {value: request.method}
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata: {name: payment, namespace: production}
spec:
  selector:
    matchLabels: {app: payment-service}
  accessLogging:
  - filter:
      expression: response.code >= 400
  metrics:
  - overrides:
    - tagOverrides:
        level: {value: "'workload'"}
"#;

struct Mesh {
    world: World,
    payment: Proxy,
    order: Proxy,
}

async fn mesh(payment_app: &App, telemetry: &str) -> Mesh {
    mesh_with(payment_app, telemetry, "").await
}

async fn mesh_with(payment_app: &App, telemetry: &str, extra: &str) -> Mesh {
    let world = World::new();
    let payment_ports = Ports::new();
    let order_ports = Ports::new();
    let se = service_entry(
        "payment-service",
        80,
        &[(payment_ports.inbound, "v1", "payment-service")],
    );
    let config = world.write_config("istio", "mesh.yaml", &format!("{se}---\n{telemetry}"));
    let settings = |sa: &str, ports: Ports, app| {
        sidecar_settings(
            &world,
            sa,
            &labels(&[("app", sa), ("version", "v1")]),
            &config,
            ports,
            app,
            extra,
        )
    };
    let payment_settings = settings("payment-service", payment_ports, payment_app.addr);
    let order_settings = settings("order-service", order_ports, "127.0.0.1:9".parse().unwrap());
    let payment = Proxy::start(
        &world,
        "sidecar",
        "payment-service",
        &payment_settings,
        payment_ports,
    )
    .await;
    let order = Proxy::start(
        &world,
        "sidecar",
        "order-service",
        &order_settings,
        order_ports,
    )
    .await;
    Mesh {
        world,
        payment,
        order,
    }
}

async fn call(m: &Mesh, method: &str, path: &str) -> String {
    let proxy = format!("http://{}", m.order.outbound());
    let url = format!("http://payment-service{path}");
    let (code, out, err) = curl(&[
        "-s",
        "-x",
        &proxy,
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        &url,
    ])
    .await;
    assert_eq!(
        code,
        0,
        "{err}\n{}\n{}",
        m.order.output(),
        m.payment.output()
    );
    out
}

fn series<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_overrides_apply_per_direction_with_workload_over_namespace_over_mesh() {
    let app = App::start(Behaviour::Ok("paid")).await;
    let m = mesh(&app, TELEMETRY).await;
    assert_eq!(call(&m, "POST", "/api/v1/payments").await, "paid\n200");

    // Server side: REQUEST_COUNT disabled, the other metrics recorded, with the
    // workload's tag value.
    let inbound = m
        .payment
        .metrics_when(|t| t.contains("istio_request_duration_milliseconds_count{"))
        .await;
    assert!(
        series(&inbound, "istio_requests_total").is_empty(),
        "{inbound}"
    );
    let duration = series(&inbound, "istio_request_duration_milliseconds_count");
    assert_eq!(duration.len(), 1, "{inbound}");
    assert!(
        duration[0].contains("reporter=\"destination\""),
        "{}",
        duration[0]
    );
    assert!(
        duration[0].contains("level=\"workload\""),
        "{}",
        duration[0]
    );
    assert!(
        duration[0].contains("request_protocol=\"http\""),
        "{}",
        duration[0]
    );

    // Client side: counted, namespace's tag value, `request_protocol` removed and
    // `method` upserted from the request.
    let outbound = m
        .order
        .metrics_when(|t| t.contains("istio_requests_total{"))
        .await;
    let requests = series(&outbound, "istio_requests_total");
    assert_eq!(requests.len(), 1, "{outbound}");
    let line = requests[0];
    assert!(line.contains("reporter=\"source\""), "{line}");
    assert!(line.contains("level=\"namespace\""), "{line}");
    assert!(line.contains("method=\"POST\""), "{line}");
    assert!(!line.contains("request_protocol="), "{line}");
    assert!(line.ends_with(" 1"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_filter_logs_only_error_responses_and_namespace_disables_the_rest() {
    let app = App::start(Behaviour::Status(404, "nope")).await;
    let ok_app = App::start(Behaviour::Ok("paid")).await;
    // Two worlds would need two configs; one payment app answers 404 on every path, so
    // compare with the same mesh whose app answers 200.
    let m = mesh(&app, TELEMETRY).await;
    assert_eq!(call(&m, "GET", "/missing").await, "nope\n404");
    let log = access_log(&m.world, "payment-service", "/missing").await;
    assert!(
        log.contains("\"GET /missing HTTP/") && log.contains("\" 404 "),
        "{log}"
    );

    let ok = mesh(&ok_app, TELEMETRY).await;
    assert_eq!(call(&ok, "GET", "/fine").await, "paid\n200");
    // The request is recorded (metrics) before the log would be written.
    ok.payment
        .metrics_when(|t| t.contains("istio_request_duration_milliseconds_count{"))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let path = ok.world.path("payment-service-access.log");
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(!written.contains("/fine"), "a 200 was logged:\n{written}");
    // order-service gets only the namespace's rule: logging disabled.
    let order_log =
        std::fs::read_to_string(ok.world.path("order-service-access.log")).unwrap_or_default();
    assert!(!order_log.contains("/fine"), "{order_log}");
}

async fn access_log(world: &World, sa: &str, path: &str) -> String {
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(world.path(&format!("{sa}-access.log"))).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains(path)) {
            return line.to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no access-log line for {path} in {sa}'s log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expression_that_cannot_be_evaluated_is_a_located_load_error() {
    let world = World::new();
    let ports = Ports::new();
    let config = world.write_config(
        "istio",
        "telemetry.yaml",
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: bad, namespace: production}\n\
         spec:\n  accessLogging:\n  - filter:\n      expression: request.nope >= 400\n",
    );
    let settings = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        ports,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let file = world.path("order-service.yaml");
    std::fs::write(&file, settings).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["sidecar", "--settings"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("telemetry.yaml:7"), "{text}");
    assert!(
        text.contains("spec.accessLogging[0].filter.expression"),
        "{text}"
    );
    assert!(text.contains("unknown attribute `request.nope`"), "{text}");

    // `mesh-proxy validate` reports it the same way.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .arg("validate")
        .arg(&config)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("telemetry.yaml:7")
            && text.contains("spec.accessLogging[0].filter.expression")
            && text.contains("unknown attribute `request.nope`"),
        "{text}"
    );
}

/// A Zipkin v2 collector on 127.0.0.1:0 keeping the spans it receives.
async fn zipkin_collector() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/v2/spans", listener.local_addr().unwrap());
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = spans.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let keep = keep.clone();
                        async move {
                            let bytes = req.into_body().collect().await?.to_bytes();
                            if let Ok(serde_json::Value::Array(batch)) =
                                serde_json::from_slice(&bytes)
                            {
                                keep.lock().unwrap().extend(batch);
                            }
                            let mut res =
                                http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                            *res.status_mut() = http::StatusCode::ACCEPTED;
                            Ok::<_, hyper::Error>(res)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (url, spans)
}

/// The settings sample every trace (100 %); the namespace's Telemetry samples none, and
/// payment-service's own samples all of its inbound traffic with custom tags.
const TRACING: &str = r#"apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: namespace-default, namespace: production}
spec:
  tracing:
  - randomSamplingPercentage: 0
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: payment, namespace: production}
spec:
  selector:
    matchLabels: {app: payment-service}
  tracing:
  - match: {mode: SERVER}
    randomSamplingPercentage: 100
    customTags:
      tenant: {header: {name: x-tenant, defaultValue: none}}
      team: {literal: {value: payments}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_percentage_and_custom_tags_follow_the_workload_telemetry() {
    let (zipkin, spans) = zipkin_collector().await;
    let app = App::start(Behaviour::Ok("paid")).await;
    let m = mesh_with(
        &app,
        TRACING,
        &format!("tracing:\n  sampling: 100\n  zipkin: {zipkin}\n"),
    )
    .await;

    // Through order-service: its client side samples 0 %, and payment-service respects
    // the decision that travels with the request (TA-04): no span anywhere.
    let proxy = format!("http://{}", m.order.outbound());
    let (code, out, _) = curl(&[
        "-s",
        "-x",
        &proxy,
        "-H",
        "x-tenant: acme",
        "http://payment-service/through-order",
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "paid"));
    // Straight to payment-service's inbound listener (plaintext, PERMISSIVE): a new
    // trace, sampled at 100 % by the workload's resource, with its custom tags.
    let inbound = format!("http://127.0.0.1:{}/direct", m.payment.ports.inbound);
    let (code, out, _) = curl(&[
        "-s",
        "-H",
        "x-tenant: acme",
        "-H",
        "host: payment-service",
        &inbound,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "paid"));
    let (code, out, _) = curl(&["-s", "-H", "host: payment-service", &inbound]).await;
    assert_eq!((code, out.as_str()), (0, "paid"));

    // Stopping the proxies flushes their span queues.
    m.order.terminate();
    m.payment.terminate();
    let (mut order, mut payment) = (m.order, m.payment);
    let _ = order.child.wait().await;
    let _ = payment.child.wait().await;
    let spans = spans.lock().unwrap().clone();
    let urls: Vec<&str> = spans
        .iter()
        .filter_map(|s| s["tags"]["http.url"].as_str())
        .collect();
    assert_eq!(urls.len(), 2, "{spans:#?}");
    assert!(
        urls.iter().all(|u| !u.contains("through-order")),
        "{urls:?}"
    );
    let tenants: Vec<&str> = spans
        .iter()
        .filter_map(|s| s["tags"]["tenant"].as_str())
        .collect();
    assert_eq!(tenants, ["acme", "none"], "{spans:#?}");
    assert!(
        spans
            .iter()
            .all(|s| s["tags"]["team"] == "payments" && s["kind"] == "SERVER"),
        "{spans:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telemetry_added_on_sighup_applies_to_new_requests() {
    let app = App::start(Behaviour::Ok("paid")).await;
    let m = mesh(&app, "").await;
    assert_eq!(call(&m, "GET", "/before").await, "paid\n200");
    let before = m
        .order
        .metrics_when(|t| t.contains("istio_requests_total{"))
        .await;
    assert!(!before.contains("level="), "{before}");

    let reload = |telemetry: &'static str| {
        let se = service_entry(
            "payment-service",
            80,
            &[(m.payment.ports.inbound, "v1", "payment-service")],
        );
        m.world
            .write_config("istio", "mesh.yaml", &format!("{se}---\n{telemetry}"));
        let pid = m.order.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let tagged = |text: &str| {
        series(text, "istio_requests_total")
            .iter()
            .any(|l| l.contains("level=\"reloaded\""))
    };
    reload(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh-default, namespace: istio-system}\n\
         spec:\n  metrics:\n  - overrides:\n    - tagOverrides:\n        level: {value: \"'reloaded'\"}\n",
    );
    let mut text = String::new();
    for _ in 0..100 {
        call(&m, "GET", "/after").await;
        text = m.order.admin("/stats/prometheus").await;
        if tagged(&text) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(tagged(&text), "{text}\n{}", m.order.output());
}
