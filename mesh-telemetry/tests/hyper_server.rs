//! The layer behind a real hyper server on 127.0.0.1:0, called by a real HTTP client:
//! metrics, `/stats` percentiles and the access log as an operator sees them.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use mesh_core::body::{self, BoxBody};
use mesh_core::extensions::{ConnectionInfo, UpstreamHost, add_response_flags};
use mesh_core::{ConnectionSecurity, ResponseFlags};
use mesh_telemetry::access_log::{AccessLog, Format};
use mesh_telemetry::{MetricsRegistry, RequestBody, Telemetry, TelemetryLayer};
use support::*;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};

type Req = Request<RequestBody<hyper::body::Incoming>>;

/// The local application: echoes the request body length; `/fault` is a 418 abort.
async fn app(req: Req) -> Result<Response<BoxBody>, Infallible> {
    let fault = req.uri().path() == "/fault";
    let n = req.into_body().collect().await.unwrap().to_bytes().len();
    let mut res = Response::new(body::full(format!("got {n} bytes")));
    res.extensions_mut()
        .insert(UpstreamHost("127.0.0.1:9080".parse().unwrap()));
    if fault {
        *res.status_mut() = StatusCode::IM_A_TEAPOT;
        add_response_flags(res.extensions_mut(), ResponseFlags::FAULT_INJECTED);
    }
    Ok(res)
}

async fn serve_inbound(t: &Telemetry) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = TelemetryLayer::inbound(t, reviews_service());
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = listener.accept().await.unwrap();
            let info = ConnectionInfo {
                remote,
                local: addr,
                security: ConnectionSecurity::None,
            };
            let svc = layer.layer(tower::service_fn(app));
            // The accept path leaves connection facts in every request's extensions.
            let svc = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(info);
                svc.clone().oneshot(req)
            });
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(svc))
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_requests_are_counted_logged_and_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let metrics = MetricsRegistry::new();
    let log = AccessLog::file(
        &path,
        Format::Text,
        metrics.proxy().access_log_dropped.clone(),
    )
    .await
    .unwrap();
    let t = Telemetry::builder(reviews())
        .metrics(metrics)
        .access_log(log.clone())
        .build();
    let addr = serve_inbound(&t).await;

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for i in 0..3 {
        let req = Request::post(format!("http://{addr}/reviews/{i}"))
            .header("user-agent", "curl/8.5.0")
            .header("x-request-id", format!("req-{i}"))
            .body(Full::new(Bytes::from_static(b"0123456789")))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "got 10 bytes"
        );
    }
    let req = Request::get(format!("http://{addr}/fault"))
        .header("user-agent", "evil\" 200 \"\tx")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 418);
    res.into_body().collect().await.unwrap();

    // The record is written at stream end, which the server side reaches just after the
    // client has the last byte: wait (bounded) for it to show.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let samples = parse(&t.encode_metrics());
        if select(&samples, "istio_requests_total", &[])
            .iter()
            .map(|s| s.value)
            .sum::<f64>()
            >= 4.0
        {
            break samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "records did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ok = [
        ("response_code", "200"),
        ("reporter", "destination"),
        ("connection_security_policy", "none"),
    ];
    assert_eq!(one(&samples, "istio_requests_total", &ok), 3.0);
    assert_eq!(
        one(&samples, "istio_request_duration_milliseconds_count", &ok),
        3.0
    );
    assert_eq!(
        one(
            &samples,
            "istio_requests_total",
            &[("response_code", "418"), ("response_flags", "FI")]
        ),
        1.0
    );
    // The request counter saw every body byte hyper delivered (3 × 10).
    let req_sum = one(&samples, "istio_request_bytes_sum", &ok);
    assert!(req_sum > 30.0, "{req_sum}");

    let stats = t.latency().snapshot();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        stats[0].destination,
        "inbound|reviews.default.svc.cluster.local"
    );
    assert_eq!(stats[0].count, 4);
    assert!(stats[0].p50 <= stats[0].p99 && stats[0].p99 <= stats[0].max);
    assert!(
        t.latency()
            .render_text()
            .starts_with("inbound|reviews.default.svc.cluster.local count=4 p50=")
    );

    log.flush().await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let first = lines.iter().find(|l| l.contains("\"req-0\"")).unwrap();
    let rest = first.split_once("] ").unwrap().1;
    assert_eq!(
        rest,
        format!(
            "\"POST /reviews/0 HTTP/1.1\" 200 - 10 12 {} - \"-\" \"curl/8.5.0\" \"req-0\" \"{addr}\" \"127.0.0.1:9080\" \"-\" \"-\"",
            rest.split(' ').nth(7).unwrap()
        )
    );
    let fault = lines.iter().find(|l| l.contains(" 418 FI ")).unwrap();
    assert!(fault.contains("\"evil\\\" 200 \\\"\\x09x\""), "{fault}");
    let generated = fault
        .split("\\x09x\" \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert!(
        uuid::Uuid::parse_str(generated).is_ok(),
        "x-request-id generated: {fault}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_forwards_the_hop_context_to_its_downstream_call() {
    use mesh_telemetry::trace::forward::{CaptureTraceHeadersLayer, ForwardTraceHeadersLayer};

    // The downstream service reports the trace headers it received.
    let downstream = serve(|req: Request<hyper::body::Incoming>| async move {
        let h = req.headers();
        let get = |n: &str| {
            h.get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        let report = format!(
            "{} {} {} {}",
            get("x-b3-traceid"),
            get("x-b3-spanid"),
            get("x-b3-sampled"),
            get("x-request-id")
        );
        Response::new(Full::new(Bytes::from(report)))
    })
    .await;

    // The application behind the sidecar's inbound layer: it calls `downstream` with an
    // HTTP client wrapped in the forwarding layer, and returns what downstream saw plus the
    // span id the sidecar gave the application.
    let t = Telemetry::builder(reviews()).sampling(0.0).build();
    let client = ForwardTraceHeadersLayer
        .layer(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
    let app = tower::ServiceBuilder::new()
        .layer(TelemetryLayer::inbound(&t, reviews_service()))
        .layer(CaptureTraceHeadersLayer)
        .service_fn(move |req: Req| {
            let client = client.clone();
            async move {
                let my_span = req.headers()["x-b3-spanid"].to_str().unwrap().to_owned();
                let out = Request::get(format!("http://{downstream}/ratings"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let res = client.oneshot(out).await.unwrap();
                let seen = res.into_body().collect().await.unwrap().to_bytes();
                let text = format!("{my_span} | {}", String::from_utf8_lossy(&seen));
                Ok::<_, Infallible>(Response::new(body::full(text)))
            }
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let app = app.clone();
            let conn = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app))
                .into_owned();
            // Coerced to `dyn Future + Send` here, where the types are concrete: rustc's
            // generic `Send` check inside `tokio::spawn` gives up on `BoxError` bounds.
            let conn: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
                Box::pin(conn);
            tokio::spawn(conn);
        }
    });

    let caller: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{addr}/reviews/1"))
        .header("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124")
        .header("x-b3-spanid", "a2fb4a1d1a96d312")
        .header("x-b3-sampled", "1")
        .header("x-request-id", "req-77")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = caller.request(req).await.unwrap();
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let (app_span, seen) = text.split_once(" | ").unwrap();
    assert_ne!(
        app_span, "a2fb4a1d1a96d312",
        "the sidecar started a new span"
    );
    assert_eq!(
        seen,
        format!("463ac35c9f6413ad48485a3953bb6124 {app_span} 1 req-77"),
        "downstream is called inside the same trace, under the hop's span"
    );
}
