//! mesh-resilience: per-request overhead of deadline + retry on the success path,
//! outcome recording in the outlier detector, and a P2C pick among 100 endpoints.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::{BoxBody, Endpoint, Outcome};
use mesh_resilience::{
    Balance, DeadlineLayer, LbPolicy, OutlierConfig, OutlierDetector, RetryLayer, RetryPolicy,
};
use tower::{Layer, Service, service_fn};

/// Polls a future that must be ready at once (the services here never wait).
fn now<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("benchmarked future was not ready"),
    }
}

fn ok_service() -> impl Service<
    http::Request<BoxBody>,
    Response = http::Response<()>,
    Error = std::convert::Infallible,
    Future = std::future::Ready<Result<http::Response<()>, std::convert::Infallible>>,
> + Clone {
    service_fn(|_req: http::Request<BoxBody>| std::future::ready(Ok(http::Response::new(()))))
}

fn request() -> http::Request<BoxBody> {
    let mut req = http::Request::new(mesh_core::body::empty());
    *req.uri_mut() = http::Uri::from_static("http://payment.default.svc.cluster.local/charge");
    req.headers_mut().insert(
        "x-request-id",
        http::HeaderValue::from_static("4bf92f3577b34da6"),
    );
    req
}

/// Times one request through `svc`: readiness, then the call, polled to its answer.
fn bench_success<S>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut svc: S,
) where
    S: Service<http::Request<BoxBody>, Response = http::Response<()>>,
    S::Error: std::fmt::Debug,
{
    g.bench_function(name, |b| {
        b.iter(|| {
            now(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
            black_box(now(svc.call(request())).expect("ok"))
        })
    });
}

fn success_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut g = c.benchmark_group("resilience/success_path");
    let retry = |policy: RetryPolicy| RetryLayer::new(policy).with_rng_seed(1);
    let per_try = || RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(2)));
    let route_timeout = || DeadlineLayer::new(Some(Duration::from_secs(5)));

    bench_success(&mut g, "bare", ok_service());
    bench_success(&mut g, "deadline", route_timeout().layer(ok_service()));
    bench_success(
        &mut g,
        "retry",
        retry(RetryPolicy::istio_default()).layer(ok_service()),
    );
    bench_success(
        &mut g,
        "deadline+retry",
        route_timeout().layer(retry(per_try()).layer(ok_service())),
    );
    // The route stack as the proxy composes it: the retry layer applies the deadline.
    bench_success(
        &mut g,
        "retry with deadline",
        retry(per_try())
            .with_deadline(route_timeout())
            .layer(ok_service()),
    );
    bench_success(
        &mut g,
        "deadline+retry disabled",
        DeadlineLayer::new(None).layer(retry(RetryPolicy::disabled()).layer(ok_service())),
    );
    g.finish();
}

fn outlier(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let detector = OutlierDetector::new(OutlierConfig::default());
    let hosts: Vec<_> = (0..100).map(|_| detector.register()).collect();
    let ok = Outcome::Response {
        status: 200,
        grpc_status: None,
    };
    let err = Outcome::Response {
        status: 503,
        grpc_status: None,
    };
    let mut g = c.benchmark_group("resilience/outlier_record");
    g.bench_function("success", |b| {
        b.iter(|| detector.record(black_box(&hosts[7]), black_box(&ok)))
    });
    // Alternating error/success: the error path counts, the success resets.
    g.bench_function("error_then_success", |b| {
        b.iter(|| {
            detector.record(black_box(&hosts[8]), black_box(&err));
            detector.record(black_box(&hosts[8]), black_box(&ok))
        })
    });
    g.finish();
}

fn p2c(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let addr = |i: u32| std::net::SocketAddr::from(([10, 0, (i / 256) as u8, (i % 256) as u8], 80));
    let mut balance = Balance::new(
        LbPolicy::LeastRequest,
        Some(OutlierConfig::default()),
        move |ep: &Endpoint| {
            let failing = ep
                .address
                .ip()
                .to_string()
                .rsplit('.')
                .next()
                .and_then(|o| o.parse::<u32>().ok())
                .is_some_and(|o| o < 10);
            service_fn(move |_req: http::Request<()>| {
                let status = if failing { 503 } else { 200 };
                std::future::ready(Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .status(status)
                        .body(mesh_core::body::empty())
                        .expect("response"),
                ))
            })
        },
    )
    .with_rng_seed(3);
    balance.update((0..100).map(|i| Endpoint::new(addr(i))));
    // Drive traffic until the 10 failing endpoints (10 % of 100, the default cap) are ejected.
    let mut calls = 0;
    while balance.detector().map_or(0, |d| d.ejected_count()) < 10 {
        let res = now(balance.call(http::Request::new(()))).expect("ok");
        drop(res);
        calls += 1;
        assert!(calls < 1_000_000, "failing endpoints were never ejected");
    }
    let mut g = c.benchmark_group("resilience/balance_100_endpoints_10_ejected");
    g.bench_function("p2c_pick", |b| b.iter(|| black_box(balance.choose(None))));
    g.bench_function("clock_read", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    let mut plain = Balance::new(LbPolicy::LeastRequest, None, |_ep: &Endpoint| {
        service_fn(|_req: http::Request<()>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(())))
        })
    })
    .with_rng_seed(3);
    plain.update((0..100).map(|i| Endpoint::new(addr(i))));
    g.bench_function("p2c_pick_without_outlier_detection", |b| {
        b.iter(|| black_box(plain.choose(None)))
    });
    g.bench_function("p2c_call", |b| {
        b.iter(|| black_box(now(balance.call(http::Request::new(()))).expect("ok")))
    });
    g.finish();
}

criterion_group!(benches, success_path, outlier, p2c);
criterion_main!(benches);
