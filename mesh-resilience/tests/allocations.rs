//! Allocations per request on the success path, counted by a counting global allocator
//! (this test binary only): what the deadline and retry layers add over the bare service.
//! They add none: the deadlines reach the inner layers in a call-scoped context, not as
//! request extensions, and the retry layer's copy of the head is raw bytes in pooled
//! storage.

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

/// A bodiless request, with a header name built at run time as one parsed off the wire is
/// (copying such a name with `clone` would allocate: the `bytes` crate shares its bytes
/// on the first copy), a standard one, and one from `from_static`.
fn request() -> http::Request<BoxBody> {
    let mut req = http::Request::new(mesh_core::body::empty());
    *req.uri_mut() = http::Uri::from_static("http://payment.default.svc.cluster.local/charge");
    req.headers_mut().insert(
        http::HeaderName::from_bytes(b"x-request-id").expect("name"),
        http::HeaderValue::from_bytes(b"4bf92f3577b34da6").expect("value"),
    );
    req.headers_mut().insert(
        http::HeaderName::from_static("x-b3-sampled"),
        http::HeaderValue::from_static("1"),
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
fn deadline_and_retry_add_no_allocation_with_or_without_a_per_try_timeout() {
    let rt = runtime();
    let _guard = rt.enter();
    let deadline = || DeadlineLayer::new(Some(Duration::from_secs(5)));
    assert_eq!(per_request(deadline().layer(ok_service())), 0.0);
    let retry = RetryLayer::new(RetryPolicy::istio_default()).with_rng_seed(1);
    assert_eq!(
        per_request(deadline().layer(retry.layer(ok_service()))),
        0.0
    );
    let per_try =
        RetryLayer::new(RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(2))))
            .with_rng_seed(1);
    assert_eq!(
        per_request(deadline().layer(per_try.clone().layer(ok_service()))),
        0.0
    );
    // The retry layer applying the deadline itself (the proxy's route stack).
    assert_eq!(
        per_request(per_try.with_deadline(deadline()).layer(ok_service())),
        0.0
    );
    let disabled = RetryLayer::new(RetryPolicy::disabled()).with_deadline(deadline());
    assert_eq!(per_request(disabled.layer(ok_service())), 0.0);
}
