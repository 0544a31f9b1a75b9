//! Requests through `TelemetryLayer`, asserting the exact series it produces.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::{DeadlineExceeded, Overflow};
use mesh_core::extensions::{
    ConnectionInfo, PeerIdentity, UpstreamHost, UpstreamPeerIdentity, add_response_flags,
};
use mesh_core::{BoxError, ConnectionSecurity, Identity, ResponseFlags};
use mesh_telemetry::metrics::DEFAULT_BUCKETS;
use mesh_telemetry::{RequestBody, Telemetry, TelemetryLayer};
use support::*;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_test::mock;

type Req = Request<RequestBody<BoxBody>>;

fn telemetry() -> Telemetry {
    Telemetry::builder(productpage()).sampling(0.0).build()
}

fn outbound(t: &Telemetry) -> TelemetryLayer {
    TelemetryLayer::outbound(t, reviews_service(), reviews()).with_seed(7)
}

fn get(path: &str) -> Request<BoxBody> {
    Request::get(path)
        .header("host", "reviews:9080")
        .body(body::full("hello"))
        .unwrap()
}

fn expected_outbound(code: &str, flags: &str) -> BTreeMap<String, String> {
    [
        ("reporter", "source"),
        ("source_workload", "productpage-v1"),
        ("source_workload_namespace", "default"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        ),
        ("source_app", "productpage"),
        ("source_version", "v1"),
        ("source_canonical_service", "productpage"),
        ("source_canonical_revision", "v1"),
        ("source_cluster", "unknown"),
        ("destination_workload", "reviews-v2"),
        ("destination_workload_namespace", "default"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        ),
        ("destination_app", "reviews"),
        ("destination_version", "v2"),
        ("destination_service", "reviews.default.svc.cluster.local"),
        ("destination_service_name", "reviews"),
        ("destination_service_namespace", "default"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v2"),
        ("destination_cluster", "unknown"),
        ("request_protocol", "http"),
        ("response_code", code),
        ("grpc_response_status", ""),
        ("response_flags", flags),
        ("connection_security_policy", "unknown"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn bounds_of(b: &[(f64, f64)]) -> Vec<f64> {
    b.iter().map(|x| x.0).collect()
}

fn default_bounds() -> Vec<f64> {
    let mut v = DEFAULT_BUCKETS.to_vec();
    v.push(f64::INFINITY);
    v
}

/// Cumulative count expected for one observation of `value` at each default bound.
fn one_observation(value: f64) -> Vec<f64> {
    default_bounds()
        .into_iter()
        .map(|le| f64::from(u8::from(value <= le)))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn success_records_every_istio_label_and_exact_buckets() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|req: Req| async move {
        let got = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello");
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, Infallible>(Response::new(body::full("hello world")))
    }));
    let res = svc.oneshot(get("/reviews/0")).await.unwrap();
    assert_eq!(body_bytes(res.into_body()).await, "hello world");

    let samples = parse(&t.encode_metrics());
    let req_series = select(&samples, "istio_requests_total", &[]);
    assert_eq!(req_series.len(), 1);
    assert_eq!(req_series[0].labels, expected_outbound("200", "-"));
    assert_eq!(req_series[0].value, 1.0);

    let want = [("response_code", "200")];
    let d = buckets(&samples, "istio_request_duration_milliseconds", &want);
    assert_eq!(bounds_of(&d), default_bounds(), "Envoy's default bounds");
    let counts: Vec<f64> = d.iter().map(|x| x.1).collect();
    assert_eq!(
        counts,
        one_observation(30.0),
        "30 ms lands in le=50, not le=25"
    );
    assert_eq!(
        one(&samples, "istio_request_duration_milliseconds_sum", &want),
        30.0
    );
    assert_eq!(
        one(&samples, "istio_request_duration_milliseconds_count", &want),
        1.0
    );

    // Request: "GET /reviews/0 HTTP/1.1\r\n" (25) + "host: reviews:9080\r\n" (20) + "\r\n" (2)
    // + 5 body bytes = 52. Response: "HTTP/1.1 200 OK\r\n" (17) + "\r\n" (2) + 11 = 30.
    assert_eq!(one(&samples, "istio_request_bytes_sum", &want), 52.0);
    assert_eq!(one(&samples, "istio_response_bytes_sum", &want), 30.0);
    let rb = buckets(&samples, "istio_request_bytes", &want);
    assert_eq!(bounds_of(&rb), default_bounds());
    assert_eq!(
        rb.iter().map(|x| x.1).collect::<Vec<_>>(),
        one_observation(52.0)
    );
    let sb = buckets(&samples, "istio_response_bytes", &want);
    assert_eq!(
        sb.iter().map(|x| x.1).collect::<Vec<_>>(),
        one_observation(30.0)
    );

    let stats = t.latency().snapshot();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].destination, "reviews.default.svc.cluster.local");
    assert_eq!(stats[0].count, 1);
    // HdrHistogram with 3 significant digits reports the bucket's highest equivalent value.
    assert!((30.0..=30.03).contains(&stats[0].max), "{}", stats[0].max);
}

#[tokio::test(start_paused = true)]
async fn overflow_is_recorded_as_503_uo_and_the_error_passes_through() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        Err::<Response<BoxBody>, BoxError>(Box::new(Overflow))
    }));
    let err = svc.oneshot(get("/")).await.unwrap_err();
    assert!(
        err.downcast_ref::<Overflow>().is_some(),
        "error unchanged: {err}"
    );
    let samples = parse(&t.encode_metrics());
    let s = select(&samples, "istio_requests_total", &[]);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].labels, expected_outbound("503", "UO"));
    assert_eq!(s[0].value, 1.0);
    // No response was sent by the service: only the request side has bytes.
    assert_eq!(
        one(
            &samples,
            "istio_response_bytes_sum",
            &[("response_code", "503")]
        ),
        0.0
    );
}

#[tokio::test(start_paused = true)]
async fn deadline_is_recorded_as_504_ut_with_its_duration() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        Err::<Response<BoxBody>, BoxError>(Box::new(DeadlineExceeded))
    }));
    svc.oneshot(get("/")).await.unwrap_err();
    let samples = parse(&t.encode_metrics());
    assert_eq!(
        select(&samples, "istio_requests_total", &[])[0].labels,
        expected_outbound("504", "UT")
    );
    let d = buckets(
        &samples,
        "istio_request_duration_milliseconds",
        &[("response_code", "504")],
    );
    assert_eq!(
        d.iter().map(|x| x.1).collect::<Vec<_>>(),
        one_observation(2000.0)
    );
    assert_eq!(
        one(
            &samples,
            "istio_request_duration_milliseconds_sum",
            &[("response_flags", "UT")]
        ),
        2000.0
    );
}

#[tokio::test(start_paused = true)]
async fn fault_abort_418_carries_the_fi_flag_from_response_extensions() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        let mut res = Response::new(body::full("fault filter abort"));
        *res.status_mut() = StatusCode::IM_A_TEAPOT;
        add_response_flags(res.extensions_mut(), ResponseFlags::FAULT_INJECTED);
        Ok::<_, Infallible>(res)
    }));
    let svc = ServiceBuilder::new().service(svc);
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(res.status(), 418);
    body_bytes(res.into_body()).await;
    let res = svc.oneshot(get("/")).await.unwrap();
    body_bytes(res.into_body()).await;
    let samples = parse(&t.encode_metrics());
    let s = select(&samples, "istio_requests_total", &[]);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].labels, expected_outbound("418", "FI"));
    assert_eq!(s[0].value, 2.0);
}

#[tokio::test]
async fn outbound_destination_principal_is_the_verified_upstream_identity() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        let mut res = Response::new(body::full("ok"));
        let server = Identity::parse("spiffe://cluster.local/ns/default/sa/reviews-canary");
        res.extensions_mut()
            .insert(UpstreamPeerIdentity(server.unwrap()));
        Ok::<_, Infallible>(res)
    }));
    let res = svc.oneshot(get("/")).await.unwrap();
    body_bytes(res.into_body()).await;
    let samples = parse(&t.encode_metrics());
    let s = select(&samples, "istio_requests_total", &[]);
    assert_eq!(s.len(), 1);
    let mut want = expected_outbound("200", "-");
    want.insert(
        "destination_principal".into(),
        "spiffe://cluster.local/ns/default/sa/reviews-canary".into(),
    );
    assert_eq!(s[0].labels, want, "the certificate wins over configuration");
}

#[tokio::test(start_paused = true)]
async fn retried_timeout_flags_join_like_envoy() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        let mut res = Response::new(body::empty());
        *res.status_mut() = StatusCode::GATEWAY_TIMEOUT;
        add_response_flags(
            res.extensions_mut(),
            ResponseFlags::UPSTREAM_REQUEST_TIMEOUT | ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
        );
        res.extensions_mut()
            .insert(UpstreamHost("10.0.0.7:9080".parse().unwrap()));
        Ok::<_, Infallible>(res)
    }));
    let res = svc.oneshot(get("/")).await.unwrap();
    // An empty body is never polled by hyper; dropping it still records a normal end.
    drop(res);
    let samples = parse(&t.encode_metrics());
    assert_eq!(
        select(&samples, "istio_requests_total", &[])[0].labels,
        expected_outbound("504", "UT,URX")
    );
}

#[tokio::test(start_paused = true)]
async fn inbound_reads_the_peer_identity_and_mutual_tls() {
    let t = Telemetry::builder(reviews()).sampling(0.0).build();
    let svc = TelemetryLayer::inbound(&t, reviews_service()).layer(tower::service_fn(
        |_req: Req| async move { Ok::<_, Infallible>(Response::new(body::full("ok"))) },
    ));
    let peer =
        Identity::parse("spiffe://cluster.local/ns/frontend/sa/bookinfo-productpage").unwrap();
    let mut req = get("/");
    req.extensions_mut().insert(PeerIdentity(peer));
    req.extensions_mut().insert(ConnectionInfo {
        remote: "10.0.0.1:40000".parse().unwrap(),
        local: "10.0.0.2:9080".parse().unwrap(),
        security: ConnectionSecurity::MutualTls,
    });
    let res = svc.clone().oneshot(req).await.unwrap();
    body_bytes(res.into_body()).await;
    // A plaintext request (no identity) is a separate series.
    let mut req = get("/");
    req.extensions_mut().insert(ConnectionInfo {
        remote: "10.0.0.1:40001".parse().unwrap(),
        local: "10.0.0.2:9080".parse().unwrap(),
        security: ConnectionSecurity::None,
    });
    let res = svc.oneshot(req).await.unwrap();
    body_bytes(res.into_body()).await;

    let samples = parse(&t.encode_metrics());
    let mtls = select(
        &samples,
        "istio_requests_total",
        &[("connection_security_policy", "mutual_tls")],
    );
    assert_eq!(mtls.len(), 1);
    let l = &mtls[0].labels;
    assert_eq!(l["reporter"], "destination");
    assert_eq!(
        l["source_principal"],
        "spiffe://cluster.local/ns/frontend/sa/bookinfo-productpage"
    );
    assert_eq!(l["source_workload_namespace"], "frontend");
    assert_eq!(l["source_workload"], "unknown");
    assert_eq!(l["destination_workload"], "reviews-v2");
    assert_eq!(
        l["destination_principal"],
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    );
    assert_eq!(
        l["destination_service"],
        "reviews.default.svc.cluster.local"
    );
    let plain = select(
        &samples,
        "istio_requests_total",
        &[("connection_security_policy", "none")],
    );
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].labels["source_principal"], "unknown");
}

#[tokio::test(start_paused = true)]
async fn grpc_status_from_trailers_sets_protocol_and_status() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        let frames = vec![
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_stream(frames));
        let res = Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
        Ok::<_, Infallible>(res)
    }));
    let req = Request::post("/reviews.Reviews/Get")
        .header("content-type", "application/grpc")
        .body(body::full("x"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let collected = res.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
    let samples = parse(&t.encode_metrics());
    let s = select(&samples, "istio_requests_total", &[]);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].labels["request_protocol"], "grpc");
    assert_eq!(s[0].labels["grpc_response_status"], "14");
    assert_eq!(s[0].labels["response_code"], "200");
}

/// A gRPC message: flag byte, big-endian length, payload.
fn grpc_message(payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8];
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m
}

#[tokio::test(start_paused = true)]
async fn grpc_streams_count_messages_each_way_however_frames_split_them() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|req: Req| async move {
        // The server reads the client's stream to its end, then streams three messages
        // back, the second split across two data frames, and an OK status in trailers.
        req.into_body().collect().await.unwrap();
        let second = grpc_message(b"second reply");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = vec![
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(grpc_message(b"one")))),
            Ok(http_body::Frame::data(Bytes::copy_from_slice(&second[..3]))),
            Ok(http_body::Frame::data(Bytes::copy_from_slice(&second[3..]))),
            Ok(http_body::Frame::data(Bytes::from(grpc_message(b"")))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let res = Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures_stream(frames)))
            .unwrap();
        Ok::<_, Infallible>(res)
    }));
    // Two client messages in one data frame, a third in its own.
    let mut first = grpc_message(b"a");
    first.extend(grpc_message(&[9; 100]));
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(first))),
        Ok(http_body::Frame::data(Bytes::from(grpc_message(b"c")))),
    ];
    let req = Request::post("/orders.Orders/Stream")
        .header("content-type", "application/grpc")
        .body(body::boxed(StreamBody::new(futures_stream(frames))))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    let samples = parse(&t.encode_metrics());
    let grpc = [("request_protocol", "grpc"), ("grpc_response_status", "0")];
    assert_eq!(one(&samples, "istio_request_messages_total", &grpc), 3.0);
    assert_eq!(one(&samples, "istio_response_messages_total", &grpc), 3.0);

    // Plain HTTP requests have no message series.
    let res = svc.oneshot(get("/")).await.unwrap();
    res.into_body().collect().await.unwrap();
    let samples = parse(&t.encode_metrics());
    assert_eq!(select(&samples, "istio_requests_total", &[]).len(), 2);
    assert_eq!(
        select(&samples, "istio_request_messages_total", &[]).len(),
        1
    );
    assert_eq!(
        select(&samples, "istio_response_messages_total", &[]).len(),
        1
    );
}

fn futures_stream<T: Send + 'static>(items: Vec<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::iter(items)
}

#[tokio::test(start_paused = true)]
async fn body_dropped_before_its_end_is_recorded_with_dc() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        let frames = vec![
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"part one"))),
            Ok(http_body::Frame::data(Bytes::from_static(b"part two"))),
        ];
        Ok::<_, Infallible>(Response::new(StreamBody::new(futures_stream(frames))))
    }));
    let res = svc.oneshot(get("/")).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "part one");
    drop(body);
    let samples = parse(&t.encode_metrics());
    assert_eq!(
        select(&samples, "istio_requests_total", &[])[0].labels,
        expected_outbound("200", "DC")
    );
    // 17 + 2 header bytes + the 8 body bytes that were sent.
    assert_eq!(one(&samples, "istio_response_bytes_sum", &[]), 27.0);
}

#[tokio::test]
async fn next_hop_sees_a_child_span_and_a_request_id() {
    let t = Telemetry::builder(productpage()).sampling(0.0).build();
    let (mock, mut handle) = mock::pair::<Req, Response<BoxBody>>();
    let mut svc = outbound(&t).layer(mock);
    handle.allow(1);
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    let req = Request::get("/")
        .header("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124")
        .header("x-b3-spanid", "a2fb4a1d1a96d312")
        .header("x-b3-sampled", "1")
        .body(body::empty())
        .unwrap();
    let fut = tokio::spawn(svc.call(req));
    let (seen, respond) = handle.next_request().await.unwrap();
    let h = seen.headers();
    assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
    assert_ne!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
    assert_eq!(h["x-b3-sampled"], "1");
    let tp = h["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with("00-463ac35c9f6413ad48485a3953bb6124-") && tp.ends_with("-01"),
        "{tp}"
    );
    let id = uuid::Uuid::parse_str(h["x-request-id"].to_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 4);
    respond.send_response(Response::new(body::empty()));
    fut.await.unwrap().unwrap();
}

#[tokio::test]
async fn readiness_is_forwarded_and_errors_are_boxed() {
    let t = telemetry();
    let (mock, mut handle) = mock::pair::<Req, Response<BoxBody>>();
    let mut svc = outbound(&t).layer(mock);
    handle.allow(0);
    let mut task = tokio_test::task::spawn(());
    task.enter(|cx, _| assert!(svc.poll_ready(cx).is_pending()));
    handle.allow(1);
    assert!(task.is_woken());
    task.enter(|cx, _| assert!(svc.poll_ready(cx).is_ready()));
    let fut = tokio::spawn(svc.call(get("/")));
    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_error(Overflow);
    let err = fut.await.unwrap().unwrap_err();
    assert!(mesh_core::is_caused_by::<Overflow>(err.as_ref()));
    let samples = parse(&t.encode_metrics());
    assert_eq!(
        one(
            &samples,
            "istio_requests_total",
            &[("response_flags", "UO")]
        ),
        1.0
    );
}

#[tokio::test]
async fn authority_targets_are_bounded() {
    let t = telemetry();
    let layer = TelemetryLayer::outbound_by_authority(&t, 2).with_seed(1);
    let svc = layer.layer(tower::service_fn(|_req: Req| async move {
        Ok::<_, Infallible>(Response::new(body::empty()))
    }));
    for host in [
        "a.ns.svc.cluster.local",
        "b.ns.svc.cluster.local",
        "c.example",
        "d.example",
    ] {
        let req = Request::get(format!("http://{host}/x"))
            .body(body::empty())
            .unwrap();
        drop(svc.clone().oneshot(req).await.unwrap());
    }
    let samples = parse(&t.encode_metrics());
    let services: Vec<(&str, f64)> = select(&samples, "istio_requests_total", &[])
        .iter()
        .map(|s| (s.labels["destination_service"].as_str(), s.value))
        .collect();
    assert_eq!(services.len(), 3, "{services:?}");
    assert!(services.contains(&("a.ns.svc.cluster.local", 1.0)));
    assert!(services.contains(&("b.ns.svc.cluster.local", 1.0)));
    assert!(services.contains(&("unknown", 2.0)));
    let a = select(
        &samples,
        "istio_requests_total",
        &[("destination_service", "a.ns.svc.cluster.local")],
    );
    assert_eq!(a[0].labels["destination_service_name"], "a");
    assert_eq!(a[0].labels["destination_service_namespace"], "ns");
}

#[tokio::test]
async fn destination_service_from_authority_cannot_inject_into_the_exposition() {
    let t = telemetry();
    let layer = TelemetryLayer::outbound_by_authority(&t, 8);
    let svc = layer.layer(tower::service_fn(|_req: Req| async move {
        Ok::<_, Infallible>(Response::new(body::empty()))
    }));
    let req = Request::get("/")
        .header("host", "evil\"} 1\nistio_requests_total{x=\"")
        .body(body::empty());
    // `http` refuses the newline; a quote still reaches the label and must be escaped.
    assert!(req.is_err());
    let req = Request::get("/")
        .header("host", "ev\"il\\")
        .body(body::empty())
        .unwrap();
    drop(svc.oneshot(req).await.unwrap());
    let text = t.encode_metrics();
    let samples = parse(&text);
    assert_eq!(
        select(
            &samples,
            "istio_requests_total",
            &[("destination_service", "ev\"il\\")]
        )
        .len(),
        1,
        "{text}"
    );
}

#[tokio::test]
async fn disabled_layer_passes_through_untouched() {
    let svc = TelemetryLayer::disabled()
        .with_seed(3)
        .layer(tower::service_fn(|req: Req| async move {
            assert!(req.headers().get("x-request-id").is_none());
            assert!(req.headers().get("x-b3-traceid").is_none());
            assert!(req.headers().get("traceparent").is_none());
            let got = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(Response::new(body::full(got)))
        }));
    let res = svc.oneshot(get("/")).await.unwrap();
    assert_eq!(body_bytes(res.into_body()).await, "hello");
}

#[tokio::test(start_paused = true)]
async fn request_abandoned_before_the_response_is_recorded_as_0_dc() {
    let t = telemetry();
    let svc = outbound(&t).layer(tower::service_fn(|_req: Req| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok::<_, Infallible>(Response::new(body::empty()))
    }));
    let abandoned = tokio::time::timeout(Duration::from_millis(250), svc.oneshot(get("/"))).await;
    assert!(abandoned.is_err(), "the client gave up first");
    let samples = parse(&t.encode_metrics());
    assert_eq!(
        select(&samples, "istio_requests_total", &[])[0].labels,
        expected_outbound("0", "DC")
    );
    assert_eq!(
        one(&samples, "istio_request_duration_milliseconds_sum", &[]),
        250.0
    );
    assert_eq!(one(&samples, "istio_response_bytes_sum", &[]), 0.0);
}
