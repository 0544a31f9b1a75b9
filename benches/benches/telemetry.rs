//! mesh-telemetry: per-request metric recording with pre-resolved handles, histogram
//! records, trace-context extraction + injection, and the whole layer around a no-op service.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request, Response};
use mesh_core::body::{self, BoxBody};
use mesh_core::{ConnectionSecurity, Identity, ResponseFlags};
use mesh_telemetry::trace::{Formats, Propagator};
use mesh_telemetry::{
    DestinationService, LatencyStats, MetricsRegistry, Reporter, RequestBody, RequestFacts,
    Telemetry, TelemetryLayer, Workload,
};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tower::{Layer, ServiceExt};

fn workloads() -> (Workload, Workload, DestinationService) {
    let id = |s: &str| Identity::parse(s).expect("valid id");
    (
        Workload::new("productpage-v1", "default")
            .with_version("v1")
            .with_principal(id(
                "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            )),
        Workload::new("reviews-v2", "default")
            .with_version("v2")
            .with_principal(id("spiffe://cluster.local/ns/default/sa/bookinfo-reviews")),
        DestinationService::from_host("reviews.default.svc.cluster.local"),
    )
}

fn metrics(c: &mut Criterion) {
    let reg = MetricsRegistry::new();
    let (local, peer, svc) = workloads();
    let out = reg.istio().handle(Reporter::Source, &local, &peer, &svc);
    let facts = RequestFacts::default();
    out.record(&facts, 1.0, 1, 1);
    c.bench_function("telemetry/metrics/record_outbound_pre_resolved", |b| {
        b.iter(|| {
            out.record(
                black_box(&facts),
                black_box(12.5),
                black_box(310),
                black_box(820),
            )
        })
    });

    let inbound = reg
        .istio()
        .handle(Reporter::Destination, &local, &peer, &svc);
    let caller = Identity::parse("spiffe://cluster.local/ns/frontend/sa/web").expect("id");
    let facts = RequestFacts {
        response_code: 503,
        flags: ResponseFlags::UPSTREAM_OVERFLOW,
        security: ConnectionSecurity::MutualTls,
        peer: Some(&caller),
        ..RequestFacts::default()
    };
    inbound.record(&facts, 1.0, 1, 1);
    c.bench_function("telemetry/metrics/record_inbound_with_peer_identity", |b| {
        b.iter(|| {
            inbound.record(
                black_box(&facts),
                black_box(12.5),
                black_box(310),
                black_box(820),
            )
        })
    });

    for _ in 0..64 {
        out.record(&RequestFacts::default(), 3.0, 300, 800);
    }
    c.bench_function("telemetry/metrics/encode_exposition_2_series", |b| {
        b.iter(|| black_box(reg.encode()).len())
    });
}

fn histograms(c: &mut Criterion) {
    let stats = LatencyStats::new();
    let h = stats.handle("reviews.default.svc.cluster.local");
    c.bench_function("telemetry/latency/hdr_record", |b| {
        b.iter(|| h.record(black_box(Duration::from_micros(12_345))))
    });
    let reg = MetricsRegistry::new();
    let (local, peer, svc) = workloads();
    let handle = reg.istio().handle(Reporter::Source, &local, &peer, &svc);
    handle.with_series(&RequestFacts::default(), |series| {
        let series = series.clone();
        c.bench_function(
            "telemetry/metrics/series_record_counter_and_3_histograms",
            |b| b.iter(|| series.record(black_box(12.5), black_box(310), black_box(820))),
        );
    });
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_static(v));
    }
    h
}

fn propagation(c: &mut Criterion) {
    let p = Propagator::default();
    let mut rng = SmallRng::seed_from_u64(1);
    let cases = [
        (
            "b3_multi",
            headers(&[
                ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-parentspanid", "0020000000000001"),
                ("x-b3-sampled", "1"),
                ("host", "reviews:9080"),
                ("user-agent", "curl/8.5.0"),
            ]),
        ),
        (
            "b3_single",
            headers(&[
                (
                    "b3",
                    "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
                ),
                ("host", "reviews:9080"),
                ("user-agent", "curl/8.5.0"),
            ]),
        ),
        (
            "w3c",
            headers(&[
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("host", "reviews:9080"),
                ("user-agent", "curl/8.5.0"),
            ]),
        ),
        (
            "none",
            headers(&[("host", "reviews:9080"), ("user-agent", "curl/8.5.0")]),
        ),
    ];
    for (name, incoming) in cases {
        c.bench_function(&format!("telemetry/trace/extract_and_inject_{name}"), |b| {
            b.iter_batched_ref(
                || incoming.clone(),
                |h| black_box(p.propagate(h, &mut rng)),
                BatchSize::SmallInput,
            )
        });
    }
    // Istio's Zipkin setup: B3 multi-header only.
    let b3_only = Propagator {
        formats: Formats {
            b3_multi: true,
            b3_single: false,
            w3c: false,
        },
        ..Propagator::default()
    };
    let incoming = headers(&[
        ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
        ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ("x-b3-sampled", "1"),
        ("host", "reviews:9080"),
        ("user-agent", "curl/8.5.0"),
    ]);
    c.bench_function(
        "telemetry/trace/extract_and_inject_b3_multi_only_b3_out",
        |b| {
            b.iter_batched_ref(
                || incoming.clone(),
                |h| black_box(b3_only.propagate(h, &mut rng)),
                BatchSize::SmallInput,
            )
        },
    );
    c.bench_function("telemetry/trace/extract_only_b3_multi", |b| {
        b.iter(|| black_box(mesh_telemetry::trace::extract(black_box(&incoming))))
    });
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (local, peer, svc) = workloads();
    let t = Telemetry::builder(local).sampling(1.0).build();
    let inner = tower::service_fn(|_req: Request<RequestBody<BoxBody>>| async {
        Ok::<_, Infallible>(Response::new(body::full("ok")))
    });
    let with = TelemetryLayer::outbound(&t, svc, peer)
        .with_seed(1)
        .layer(inner);
    c.bench_function("telemetry/layer/request_through_layer", |b| {
        b.to_async(&rt).iter(|| {
            let svc = with.clone();
            async move {
                let req = Request::get("/reviews/0")
                    .header("host", "reviews:9080")
                    .body(body::empty())
                    .expect("request");
                let res = svc.oneshot(req).await.expect("response");
                http_body_util::BodyExt::collect(res.into_body())
                    .await
                    .expect("body");
            }
        })
    });
    c.bench_function("telemetry/layer/request_without_layer", |b| {
        b.to_async(&rt).iter(|| async move {
            let inner = tower::service_fn(|_req: Request<BoxBody>| async {
                Ok::<_, Infallible>(Response::new(body::full("ok")))
            });
            let req = Request::get("/reviews/0")
                .header("host", "reviews:9080")
                .body(body::empty())
                .expect("request");
            let res = inner.oneshot(req).await.expect("response");
            http_body_util::BodyExt::collect(res.into_body())
                .await
                .expect("body");
        })
    });
}

criterion_group!(benches, metrics, histograms, propagation, layer);
criterion_main!(benches);
