//! Allocations per request on the success path, counted by a counting global allocator
//! (this test binary only): what the deadline and retry layers add over the bare service.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mesh_core::BoxBody;
use mesh_resilience::{DeadlineLayer, RetryLayer, RetryPolicy};
use tower::{Layer, Service, service_fn};

type Ok200 = std::future::Ready<Result<http::Response<()>, std::convert::Infallible>>;

fn ok_service() -> impl Service<
    http::Request<BoxBody>,
    Response = http::Response<()>,
    Error = std::convert::Infallible,
    Future = Ok200,
> + Clone {
    service_fn(|_req: http::Request<BoxBody>| std::future::ready(Ok(http::Response::new(()))))
}

/// A bodiless request; its header names are shared already (as `from_static` ones are),
/// so copying them costs no allocation of their own.
fn request() -> http::Request<BoxBody> {
    let mut req = http::Request::new(mesh_core::body::empty());
    *req.uri_mut() = http::Uri::from_static("http://payment.default.svc.cluster.local/charge");
    req.headers_mut().insert(
        http::HeaderName::from_static("x-request-id"),
        http::HeaderValue::from_static("4bf92f3577b34da6"),
    );
    req.headers_mut()
        .insert(http::header::ACCEPT, http::HeaderValue::from_static("*/*"));
    req
}

fn now<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the service answers at once"),
    }
}

/// Allocations of 100 requests through `svc`, per request (requests built outside).
fn per_request<S>(mut svc: S) -> f64
where
    S: Service<http::Request<BoxBody>, Response = http::Response<()>>,
    S::Error: std::fmt::Debug,
{
    // One warm-up request: per-thread pools are filled once, not per request.
    now(svc.call(request())).expect("ok");
    let mut requests: Vec<_> = (0..100).map(|_| request()).collect();
    let info = allocation_counter::measure(|| {
        for req in requests.drain(..) {
            now(std::future::poll_fn(|cx| svc.poll_ready(cx))).expect("ready");
            drop(now(svc.call(req)).expect("ok"));
        }
    });
    info.count_total as f64 / 100.0
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

#[test]
fn the_bare_service_allocates_nothing_for_a_prebuilt_request() {
    assert_eq!(per_request(ok_service()), 0.0);
}

#[test]
fn retries_add_no_allocation_to_a_bodiless_request_answered_at_once() {
    let rt = runtime();
    let _guard = rt.enter();
    let retry = RetryLayer::new(RetryPolicy::istio_default()).with_rng_seed(1);
    assert_eq!(per_request(retry.layer(ok_service())), 0.0);
    let disabled = RetryLayer::new(RetryPolicy::disabled()).with_rng_seed(1);
    assert_eq!(per_request(disabled.layer(ok_service())), 0.0);
}

#[test]
fn under_a_deadline_only_the_deadline_extensions_allocate() {
    let rt = runtime();
    let _guard = rt.enter();
    let deadline = || DeadlineLayer::new(Some(Duration::from_secs(5)));
    // The request extension map (map and table) and the boxed `RequestDeadline`.
    let alone = per_request(deadline().layer(ok_service()));
    assert_eq!(alone, 3.0);
    // The retry layer keeps the deadline aside rather than copying the extensions.
    let retry = RetryLayer::new(RetryPolicy::istio_default()).with_rng_seed(1);
    assert_eq!(
        per_request(deadline().layer(retry.layer(ok_service()))),
        alone
    );
    // A per-try timeout adds the boxed `AttemptDeadline` the balancer enforces.
    let per_try =
        RetryLayer::new(RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(2))))
            .with_rng_seed(1);
    assert_eq!(
        per_request(deadline().layer(per_try.layer(ok_service()))),
        alone + 1.0
    );
}
