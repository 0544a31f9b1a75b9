//! mesh-resilience: a fixed-iteration driver for instruction counts under callgrind and
//! allocation counts per request (criterion's timings are noisy on a shared machine).
//!
//! ```sh
//! cargo bench -p benches --bench resilience_instructions --no-run
//! # instructions per request = (Ir(N) - Ir(0)) / N
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null <binary> deadline+retry 100000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null <binary> deadline+retry 0
//! <binary> allocations   # allocations per request of every scenario
//! ```

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mesh_core::{BoxBody, Endpoint};
use mesh_resilience::{Balance, DeadlineLayer, LbPolicy, OutlierConfig, RetryLayer, RetryPolicy};
use tower::{Layer, Service, service_fn};

const SCENARIOS: [&str; 9] = [
    "bare",
    "deadline",
    "retry",
    "deadline+retry",
    "retry with deadline",
    "deadline+retry disabled",
    "retry with deadline, disabled",
    "p2c_pick",
    "clock_read",
];

/// Polls a future that must be ready at once (the services here never wait).
fn now<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("driven future was not ready"),
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

/// Builds the scenario's service and returns one request's worth of work.
fn scenario(name: &str) -> Box<dyn FnMut()> {
    fn drive<S>(mut svc: S) -> Box<dyn FnMut()>
    where
        S: Service<http::Request<BoxBody>, Response = http::Response<()>> + 'static,
        S::Error: std::fmt::Debug,
    {
        Box::new(move || {
            now(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
            black_box(now(svc.call(request())).expect("ok"));
        })
    }
    let retry = || RetryLayer::new(RetryPolicy::istio_default()).with_rng_seed(1);
    match name {
        "bare" => drive(ok_service()),
        "deadline" => drive(DeadlineLayer::new(Some(Duration::from_secs(5))).layer(ok_service())),
        "retry" => drive(retry().layer(ok_service())),
        "deadline+retry" => drive(
            DeadlineLayer::new(Some(Duration::from_secs(5))).layer(
                RetryLayer::new(
                    RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(2))),
                )
                .with_rng_seed(1)
                .layer(ok_service()),
            ),
        ),
        // The route stack as the proxy builds it: the retry layer applies the deadline.
        "retry with deadline" => drive(
            RetryLayer::new(
                RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(2))),
            )
            .with_rng_seed(1)
            .with_deadline(DeadlineLayer::new(Some(Duration::from_secs(5))))
            .layer(ok_service()),
        ),
        "retry with deadline, disabled" => drive(
            RetryLayer::new(RetryPolicy::disabled())
                .with_rng_seed(1)
                .with_deadline(DeadlineLayer::new(None))
                .layer(ok_service()),
        ),
        "deadline+retry disabled" => drive(
            DeadlineLayer::new(None).layer(
                RetryLayer::new(RetryPolicy::disabled())
                    .with_rng_seed(1)
                    .layer(ok_service()),
            ),
        ),
        "p2c_pick" => {
            let mut balance = ejected_balance();
            Box::new(move || {
                black_box(balance.choose(None));
            })
        }
        "clock_read" => Box::new(|| {
            black_box(tokio::time::Instant::now());
        }),
        other => panic!("unknown scenario {other:?}; one of {SCENARIOS:?}"),
    }
}

/// 100 endpoints, the 10 failing ones ejected by real traffic.
fn ejected_balance() -> Balance<impl Service<http::Request<()>> + Clone> {
    let addr = |i: u32| std::net::SocketAddr::from(([10, 0, 0, i as u8], 80));
    let mut balance = Balance::new(
        LbPolicy::LeastRequest,
        Some(OutlierConfig::default()),
        move |ep: &Endpoint| {
            let failing =
                matches!(ep.address.ip(), std::net::IpAddr::V4(v4) if v4.octets()[3] < 10);
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
    let mut calls = 0;
    while balance.detector().map_or(0, |d| d.ejected_count()) < 10 {
        drop(now(balance.call(http::Request::new(()))).expect("ok"));
        calls += 1;
        assert!(calls < 1_000_000, "failing endpoints were never ejected");
    }
    balance
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    // `cargo bench` adds `--bench`; only the positional arguments matter here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.first().map(String::as_str) {
        Some(name) if SCENARIOS.contains(&name) => {
            let n: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(100_000);
            let mut work = scenario(name);
            for _ in 0..n {
                work();
            }
        }
        // `allocations`, or plain `cargo bench`: allocations per request of each scenario.
        _ => {
            for name in SCENARIOS {
                let mut work = scenario(name);
                work(); // warm: lazily initialised state is not per request
                let info = allocation_counter::measure(|| {
                    for _ in 0..1000 {
                        work();
                    }
                });
                println!(
                    "{name:<26} {:>6.2} allocations/request",
                    info.count_total as f64 / 1000.0
                );
            }
        }
    }
}
