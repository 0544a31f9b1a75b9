//! Span export to in-test collectors (OTLP/HTTP protobuf and Zipkin JSON v2), and a dead
//! collector that must not slow requests.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use mesh_core::body::{self, BoxBody};
use mesh_telemetry::trace::export::{
    ExportConfig, ExportFuture, ExportSpans, OtlpExporter, SpanQueue, SpanRecord, ZipkinExporter,
};
use mesh_telemetry::{MetricsRegistry, RequestBody, Telemetry, TelemetryLayer};
use prost::Message;
use support::*;
use tokio::sync::mpsc;
use tower::{Layer, ServiceExt};

type Req = Request<RequestBody<BoxBody>>;

#[derive(Debug)]
struct Received {
    method: http::Method,
    path: String,
    content_type: String,
    body: Bytes,
}

/// A collector on 127.0.0.1:0 that hands every request to the test and answers `status`.
async fn collector(status: u16) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve(move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let _ = tx.send(Received {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                body,
            });
            let mut res = Response::new(Full::new(Bytes::new()));
            *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
            res
        }
    })
    .await;
    (addr, rx)
}

fn config() -> ExportConfig {
    ExportConfig {
        queue_capacity: 64,
        max_batch: 16,
        interval: Duration::from_millis(50),
        export_timeout: Duration::from_secs(5),
    }
}

/// An app behind the layer that reports the span id it was given.
fn app()
-> impl tower::Service<Req, Response = Response<BoxBody>, Error = Infallible, Future: Send> + Clone
{
    tower::service_fn(|req: Req| async move {
        let span = req.headers()["x-b3-spanid"].to_str().unwrap().to_owned();
        Ok::<_, Infallible>(
            Response::builder()
                .header("seen-span", span)
                .body(body::full("ok"))
                .unwrap(),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_receiver_decodes_the_span_of_a_hop() {
    let (addr, mut rx) = collector(200).await;
    let metrics = MetricsRegistry::new();
    let exporter = OtlpExporter::new(
        &format!("http://{addr}/v1/traces"),
        "productpage",
        Duration::from_secs(5),
    )
    .unwrap();
    let queue = SpanQueue::spawn(exporter, config(), Telemetry::export_counters(&metrics));
    let t = Telemetry::builder(productpage())
        .metrics(metrics)
        .spans(queue.clone())
        .sampling(0.0)
        .build();
    let svc = TelemetryLayer::outbound(&t, reviews_service(), reviews()).layer(app());
    let req = Request::get("/reviews/0")
        .header("host", "reviews:9080")
        .header("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124")
        .header("x-b3-spanid", "a2fb4a1d1a96d312")
        .header("x-b3-sampled", "1")
        .body(body::empty())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let seen_span = res.headers()["seen-span"].to_str().unwrap().to_owned();
    body_bytes(res.into_body()).await;
    queue.flush().await;

    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.method, http::Method::POST);
    assert_eq!(got.path, "/v1/traces");
    assert_eq!(got.content_type, "application/x-protobuf");
    let decoded =
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
            got.body,
        )
        .unwrap();
    let rs = &decoded.resource_spans[0];
    let service_name = rs
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name");
    assert_eq!(
        format!("{:?}", service_name.unwrap().value.as_ref().unwrap().value),
        "Some(StringValue(\"productpage\"))"
    );
    let spans: Vec<_> = rs.scope_spans.iter().flat_map(|s| &s.spans).collect();
    assert_eq!(spans.len(), 1);
    let span = spans[0];
    assert_eq!(hex(&span.trace_id), "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(hex(&span.parent_span_id), "a2fb4a1d1a96d312");
    assert_eq!(
        hex(&span.span_id),
        seen_span,
        "the exported span is the one sent downstream"
    );
    assert_eq!(span.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(span.name, "reviews:9080/*");
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    let attr = |k: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == k)
            .map(|kv| format!("{:?}", kv.value.as_ref().unwrap().value))
    };
    assert_eq!(
        attr("http.status_code").as_deref(),
        Some("Some(StringValue(\"200\"))")
    );
    assert_eq!(
        attr("http.method").as_deref(),
        Some("Some(StringValue(\"GET\"))")
    );
    assert_eq!(
        attr("upstream_cluster").as_deref(),
        Some("Some(StringValue(\"reviews.default.svc.cluster.local\"))")
    );
    let samples = parse(&t.encode_metrics());
    assert_eq!(one(&samples, "mesh_trace_spans_exported_total", &[]), 1.0);
    assert_eq!(one(&samples, "mesh_trace_spans_dropped_total", &[]), 0.0);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipkin_receiver_decodes_json_v2_spans() {
    let (addr, mut rx) = collector(202).await;
    let metrics = MetricsRegistry::new();
    let queue = SpanQueue::spawn(
        ZipkinExporter::new(&addr.to_string(), "reviews").unwrap(),
        config(),
        Telemetry::export_counters(&metrics),
    );
    let t = Telemetry::builder(reviews())
        .metrics(metrics)
        .spans(queue.clone())
        .sampling(100.0)
        .build();
    let svc = TelemetryLayer::inbound(&t, reviews_service()).layer(app());
    // A 64-bit B3 trace id (kept 64-bit) and a second request starting a new trace.
    for req in [
        Request::get("/reviews/1")
            .header("host", "reviews:9080")
            .header("b3", "48485a3953bb6124-a2fb4a1d1a96d312-1")
            .body(body::empty())
            .unwrap(),
        Request::get("/health")
            .header("host", "reviews:9080")
            .body(body::empty())
            .unwrap(),
    ] {
        let res = svc.clone().oneshot(req).await.unwrap();
        body_bytes(res.into_body()).await;
    }
    queue.flush().await;
    let mut spans = Vec::new();
    while spans.len() < 2 {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.path, "/api/v2/spans");
        assert_eq!(got.content_type, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        spans.extend(v.as_array().unwrap().iter().cloned());
    }
    assert_eq!(spans.len(), 2);
    let child = spans
        .iter()
        .find(|s| s["traceId"] == "48485a3953bb6124")
        .expect("64-bit trace kept");
    assert_eq!(child["parentId"], "a2fb4a1d1a96d312");
    assert_eq!(child["kind"], "SERVER");
    assert_eq!(child["name"], "reviews:9080/*");
    assert_eq!(child["localEndpoint"]["serviceName"], "reviews");
    assert_eq!(child["tags"]["http.url"], "http://reviews:9080/reviews/1");
    assert_eq!(child["tags"]["response_flags"], "-");
    assert!(child["id"].as_str().unwrap().len() == 16);
    assert!(
        child["timestamp"].as_u64().unwrap() > 1_600_000_000_000_000,
        "microseconds since epoch"
    );
    let root = spans
        .iter()
        .find(|s| s["traceId"] != "48485a3953bb6124")
        .unwrap();
    assert_eq!(
        root["traceId"].as_str().unwrap().len(),
        32,
        "new traces are 128-bit"
    );
    assert!(root.get("parentId").is_none());
    let samples = parse(&t.encode_metrics());
    assert_eq!(one(&samples, "mesh_trace_spans_exported_total", &[]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_collector_counts_dropped_spans_and_requests_succeed() {
    let addr = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let metrics = MetricsRegistry::new();
    let queue = SpanQueue::spawn(
        ZipkinExporter::new(&addr.to_string(), "productpage").unwrap(),
        config(),
        Telemetry::export_counters(&metrics),
    );
    let t = Telemetry::builder(productpage())
        .metrics(metrics)
        .spans(queue.clone())
        .sampling(100.0)
        .build();
    let svc = TelemetryLayer::outbound(&t, reviews_service(), reviews()).layer(app());
    for _ in 0..5 {
        let res = svc
            .clone()
            .oneshot(Request::get("/").body(body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(body_bytes(res.into_body()).await, "ok");
    }
    queue.flush().await;
    let samples = parse(&t.encode_metrics());
    assert_eq!(one(&samples, "mesh_trace_spans_dropped_total", &[]), 5.0);
    assert_eq!(one(&samples, "mesh_trace_spans_exported_total", &[]), 0.0);
    assert_eq!(
        one(
            &samples,
            "istio_requests_total",
            &[("response_code", "200")]
        ),
        5.0
    );
}

/// A collector that accepts the connection and never answers.
struct Hanging;

impl ExportSpans for Hanging {
    fn export(&self, _batch: Vec<SpanRecord>) -> ExportFuture<'_> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn hanging_collector_never_delays_requests_and_sheds_spans() {
    let metrics = MetricsRegistry::new();
    let cfg = ExportConfig {
        queue_capacity: 4,
        max_batch: 2,
        interval: Duration::from_secs(1),
        export_timeout: Duration::from_secs(10),
    };
    let queue = SpanQueue::spawn(Hanging, cfg, Telemetry::export_counters(&metrics));
    let t = Telemetry::builder(productpage())
        .metrics(metrics)
        .spans(queue.clone())
        .sampling(100.0)
        .build();
    let svc = TelemetryLayer::outbound(&t, reviews_service(), reviews()).layer(app());
    let start = tokio::time::Instant::now();
    for _ in 0..20 {
        let res = svc
            .clone()
            .oneshot(Request::get("/").body(body::empty()).unwrap())
            .await
            .unwrap();
        body_bytes(res.into_body()).await;
        // Let the export task run: it takes a batch and hangs in the collector.
        tokio::task::yield_now().await;
        assert_eq!(
            tokio::time::Instant::now(),
            start,
            "the paused clock would have advanced to the export timeout had a request waited"
        );
    }
    let samples = parse(&t.encode_metrics());
    let dropped = one(&samples, "mesh_trace_spans_dropped_total", &[]);
    // At most one batch in the collector plus a full queue are held; the rest is shed.
    assert!(dropped >= 20.0 - 2.0 - 4.0, "dropped {dropped}");
    assert_eq!(one(&samples, "istio_requests_total", &[]), 20.0);
    // Every held batch ends by the export timeout: nothing is exported, all 20 dropped.
    queue.flush().await;
    let samples = parse(&t.encode_metrics());
    assert_eq!(one(&samples, "mesh_trace_spans_dropped_total", &[]), 20.0);
    assert_eq!(one(&samples, "mesh_trace_spans_exported_total", &[]), 0.0);
    assert!(tokio::time::Instant::now() - start >= Duration::from_secs(10));
}
