//! The route's outer deadline (VirtualService `timeout`, ISTIO.md VS-40, VS-41).
//!
//! [`DeadlineLayer`] turns the route timeout into an absolute [`RequestDeadline`] once per
//! request. It covers every attempt and every back-off sleep of the retry layer inside
//! it, which clips its own timers to it. When the deadline passes, the in-flight attempt
//! is dropped (the upstream stream is reset) and the caller gets [`DeadlineExceeded`];
//! the proxy answers 504 `upstream request timeout` with flag `UT`.
//!
//! No timeout configured (`None` or zero) means no deadline at all, as in Istio: there is
//! no hidden default. If the request is already bounded by an earlier deadline (an outer
//! deadline layer, or a [`RequestDeadline`] extension the embedder inserted), the earlier
//! one is kept. A gRPC request's `grpc-timeout` is a deadline as well, capped by the
//! route timeout when one is set (ISTIO.md VS-42).
//!
//! # How the inner layers learn the deadlines
//!
//! The deadlines are *call-scoped*: the deadline layer makes its [`RequestDeadline`] the
//! current one on its thread for exactly the synchronous duration of the inner
//! service's `call` ([`CallDeadlines::scope`]); the retry layer does the same around each
//! attempt's `call`, adding the attempt's [`AttemptDeadline`]. An inner layer reads them
//! in its own `call` with [`CallDeadlines::of`], which also honours deadlines the request
//! carries as extensions (the earlier of each wins). Leaving the scope restores what was
//! current before, so a deadline never leaks into another call on the same thread, even
//! when `call` panics.
//!
//! Why not request extensions: `http::Extensions` boxes every value and a request
//! without extensions gets a map and a table as well, three allocations per request
//! just to pass two instants one frame down the stack. The scope costs two thread-local
//! writes and allocates nothing.
//!
//! The limit: a layer that hands the request to another task before calling its inner
//! service (a buffer, a spawned worker) calls it outside the scope, so the layers past it
//! do not see the deadlines (the deadline layer's own timer still bounds the request).
//! To carry a deadline across such a boundary, insert a [`RequestDeadline`] (and, per
//! attempt, an [`AttemptDeadline`]) as a request extension: extensions travel with the
//! request, and every layer here honours them.
//!
//! # Layer placement
//!
//! Outside the retry layer, per route: `deadline -> retry -> balancer -> endpoint`, with
//! nothing between them that defers `call` to another task (see above).
//!
//! # Errors
//!
//! [`DeadlineExceeded`] when the deadline passes; errors of the inner service are passed
//! through as [`BoxError`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use mesh_resilience::deadline::{CallDeadlines, DeadlineLayer};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Some(Duration::from_secs(5))))
//!     .service(service_fn(|req: http::Request<()>| {
//!         // Every layer inside sees the absolute deadline in its `call`.
//!         let deadline = CallDeadlines::of(&req).request;
//!         async move { Ok::<_, std::convert::Infallible>(deadline.map(|d| d.timeout)) }
//!     }));
//! let seen = svc.oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!(seen, Some(Duration::from_secs(5)));
//! # }
//! ```

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use mesh_core::BoxError;
use mesh_core::error::DeadlineExceeded;
use pin_project::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower_layer::Layer;
use tower_service::Service;

/// The absolute deadline of a request: set around the inner calls by [`DeadlineLayer`]
/// (see [`CallDeadlines`]), or carried as a request extension by an embedder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestDeadline {
    /// When the request's time is up.
    pub at: Instant,
    /// The route timeout the deadline was derived from (a `perTryTimeout` at least this
    /// long is ignored, VS-58).
    pub timeout: Duration,
}

impl RequestDeadline {
    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            timeout,
        }
    }

    /// The deadline that bounds `req` in the call being made: the earlier of the current
    /// one ([`CallDeadlines::current`]) and the one `req` carries as an extension.
    pub fn of<B>(req: &http::Request<B>) -> Option<Self> {
        CallDeadlines::of(req).request
    }

    /// `t`, clipped so that it never lies after the deadline.
    #[inline]
    pub fn clip(&self, t: Instant) -> Instant {
        t.min(self.at)
    }

    /// Whether the deadline has passed at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.at
    }

    /// The earlier of two optional deadlines.
    fn earliest(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.at < a.at { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The deadline of one upstream attempt: `perTryTimeout` from the attempt's start,
/// already clipped to the [`RequestDeadline`]. The retry layer sets it around each
/// attempt's call (see [`CallDeadlines`]); the balancer enforces it so the endpoint that
/// timed out is charged (DR-31).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptDeadline(pub Instant);

impl AttemptDeadline {
    /// The attempt deadline that bounds `req` in the call being made: the earlier of the
    /// current one ([`CallDeadlines::current`]) and the one `req` carries as an extension.
    pub fn of<B>(req: &http::Request<B>) -> Option<Self> {
        CallDeadlines::of(req).attempt
    }

    fn earliest(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Self(a.0.min(b.0))),
            (a, b) => a.or(b),
        }
    }
}

thread_local! {
    /// The deadlines of the `call` in progress on this thread (module docs).
    static CURRENT: Cell<CallDeadlines> = const { Cell::new(CallDeadlines::NONE) };
}

/// The deadlines in force for a `call`: the request's and the current attempt's.
///
/// [`DeadlineLayer`] and the retry layer make them current for exactly the synchronous
/// duration of their inner service's `call` ([`scope`](Self::scope)); a layer inside
/// reads them in its own `call` ([`of`](Self::of)). See the module docs for the
/// contract and its limit (a layer that defers `call` to another task).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallDeadlines {
    /// The request's deadline (route timeout, `grpc-timeout`).
    pub request: Option<RequestDeadline>,
    /// The current attempt's deadline (`perTryTimeout`, clipped to `request`).
    pub attempt: Option<AttemptDeadline>,
}

impl CallDeadlines {
    /// No deadline.
    pub const NONE: Self = Self {
        request: None,
        attempt: None,
    };

    /// The deadlines made current on this thread by an enclosing [`scope`](Self::scope);
    /// [`NONE`](Self::NONE) outside any.
    #[inline]
    pub fn current() -> Self {
        CURRENT.try_with(Cell::get).unwrap_or(Self::NONE)
    }

    /// The deadlines that bound `req` in the call being made: the current ones and those
    /// `req` carries as [`RequestDeadline`] / [`AttemptDeadline`] extensions, the earlier
    /// of each.
    #[inline]
    pub fn of<B>(req: &http::Request<B>) -> Self {
        Self::with_extensions(req.extensions())
    }

    /// [`of`](Self::of) for a request taken apart.
    pub fn of_parts(head: &http::request::Parts) -> Self {
        Self::with_extensions(&head.extensions)
    }

    #[inline]
    fn with_extensions(ext: &http::Extensions) -> Self {
        let current = Self::current();
        if ext.is_empty() {
            return current;
        }
        Self {
            request: RequestDeadline::earliest(
                current.request,
                ext.get::<RequestDeadline>().copied(),
            ),
            attempt: AttemptDeadline::earliest(
                current.attempt,
                ext.get::<AttemptDeadline>().copied(),
            ),
        }
    }

    /// Runs `f` with these deadlines current on this thread, then restores the ones that
    /// were current before (also when `f` panics).
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        let _current = self.enter();
        f()
    }

    /// Makes these deadlines current on this thread until the guard is dropped, which
    /// restores the ones that were current before (also on a panic). [`scope`](Self::scope)
    /// without a closure, so the request need not be moved into one.
    #[inline]
    pub(crate) fn enter(self) -> Entered {
        Entered(CURRENT.try_with(|c| c.replace(self)).unwrap_or(Self::NONE))
    }
}

/// The deadlines current before [`CallDeadlines::enter`], put back when dropped.
pub(crate) struct Entered(CallDeadlines);

impl Drop for Entered {
    #[inline]
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|c| c.set(self.0));
    }
}

/// Applies the route timeout as an absolute deadline. Cheap to clone.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer {
    timeout: Option<Duration>,
}

impl DeadlineLayer {
    /// A layer with route timeout `timeout`; `None` or zero disables it (Istio's default).
    pub fn new(timeout: Option<Duration>) -> Self {
        Self {
            timeout: timeout.filter(|t| !t.is_zero()),
        }
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service produced by [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    timeout: Option<Duration>,
}

impl<S> Deadline<S> {
    /// Wraps `inner` with a route timeout (`None` or zero: no deadline).
    pub fn new(inner: S, timeout: Option<Duration>) -> Self {
        DeadlineLayer::new(timeout).layer(inner)
    }
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some((deadlines, at, _)) = deadlines_for(self.timeout, &req) else {
            return ResponseFuture::Passthrough {
                fut: self.inner.call(req),
            };
        };
        ResponseFuture::Timed {
            fut: deadlines.scope(|| self.inner.call(req)),
            at,
            sleep: None,
        }
    }
}

/// The deadlines a deadline layer with route timeout `timeout` sets around the inner
/// call of `req`, the instant its request deadline ends, and the instant it was taken
/// at; `None` when neither the route nor a `grpc-timeout` bounds the request.
pub(crate) fn deadlines_for<B>(
    timeout: Option<Duration>,
    req: &http::Request<B>,
) -> Option<(CallDeadlines, Instant, Instant)> {
    let timeout = effective_timeout(timeout, grpc_timeout(req))?;
    let mut deadlines = CallDeadlines::of(req);
    let (deadline, now) = request_deadline(timeout, deadlines.request);
    deadlines.request = Some(deadline);
    Some((deadlines, deadline.at, now))
}

/// The timeout of a request on a route with timeout `route`, when it has a
/// `grpc-timeout` of `grpc`.
#[inline]
pub(crate) fn effective_timeout(
    route: Option<Duration>,
    grpc: Option<Duration>,
) -> Option<Duration> {
    // A gRPC caller's `grpc-timeout` bounds the request too, capped by the route
    // timeout when there is one (Istio's `max_grpc_timeout`, VS-42).
    match (route, grpc) {
        (Some(route), Some(grpc)) => Some(route.min(grpc)),
        (route, grpc) => route.or(grpc),
    }
}

/// The deadline `timeout` from now of a request bounded so far by `outer`: the earlier
/// of the two. Also the instant now.
#[inline]
pub(crate) fn request_deadline(
    timeout: Duration,
    outer: Option<RequestDeadline>,
) -> (RequestDeadline, Instant) {
    let now = Instant::now();
    let deadline = match outer {
        // The request is already bounded more tightly: keep that deadline.
        Some(outer) if outer.at <= now + timeout => outer,
        _ => RequestDeadline {
            at: now + timeout,
            timeout,
        },
    };
    (deadline, now)
}

/// The `grpc-timeout` of a gRPC request (`content-type: application/grpc…`): an
/// integer of at most eight digits and a unit, `H`, `M`, `S`, `m`, `u` or `n` (gRPC over
/// HTTP/2). Absent or malformed: `None`, as Envoy ignores a malformed header.
pub fn grpc_timeout<B>(req: &http::Request<B>) -> Option<Duration> {
    let headers = req.headers();
    let content_type = headers.get(http::header::CONTENT_TYPE)?;
    if !is_grpc(content_type) {
        return None;
    }
    parse_grpc_timeout(headers.get(GRPC_TIMEOUT)?)
}

/// The name of gRPC's deadline header.
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Whether a `content-type` is gRPC's (`application/grpc`, `application/grpc+proto`, ...).
pub(crate) fn is_grpc(content_type: &http::HeaderValue) -> bool {
    content_type.as_bytes().starts_with(b"application/grpc")
}

/// The duration of a `grpc-timeout` value; `None` when malformed.
pub(crate) fn parse_grpc_timeout(value: &http::HeaderValue) -> Option<Duration> {
    let value = value.as_bytes();
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Response future of [`Deadline`].
#[pin_project(project = ResponseFutureProj)]
#[derive(Debug)]
pub enum ResponseFuture<F> {
    /// No timeout configured: the inner future as is.
    Passthrough {
        /// The inner future.
        #[pin]
        fut: F,
    },
    /// The inner future raced against the deadline.
    Timed {
        /// The inner future.
        #[pin]
        fut: F,
        /// The deadline.
        at: Instant,
        /// Fires at the deadline; armed only once the inner future has to wait, so an
        /// answer that is ready at once costs no timer.
        #[pin]
        sleep: Option<Sleep>,
    },
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Passthrough { fut } => fut.poll(cx).map_err(Into::into),
            ResponseFutureProj::Timed { fut, at, mut sleep } => {
                // The inner future goes first: an answer that is ready at the deadline wins.
                if let Poll::Ready(out) = fut.poll(cx) {
                    return Poll::Ready(out.map_err(Into::into));
                }
                if sleep.is_none() {
                    sleep.set(Some(sleep_until(*at)));
                }
                if let Some(sleep) = sleep.as_pin_mut() {
                    ready!(sleep.poll(cx));
                }
                Poll::Ready(Err(Box::new(DeadlineExceeded)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use mesh_core::is_caused_by;
    use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
    use tower_test::mock;

    type Req = http::Request<()>;

    /// Records the deadlines its inner service is called under, in `call`.
    #[derive(Clone)]
    struct Record<S> {
        inner: S,
        seen: Arc<Mutex<Vec<CallDeadlines>>>,
    }

    impl<S: Service<Req>> Service<Req> for Record<S> {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, req: Req) -> Self::Future {
            self.seen.lock().unwrap().push(CallDeadlines::of(&req));
            self.inner.call(req)
        }
    }

    /// `layer` around a recording mock: the service, the mock's handle and what the
    /// mock was called under.
    #[allow(clippy::type_complexity)]
    fn spawn_recorded(
        layer: DeadlineLayer,
    ) -> (
        mock::Spawn<Deadline<Record<mock::Mock<Req, &'static str>>>>,
        mock::Handle<Req, &'static str>,
        Arc<Mutex<Vec<CallDeadlines>>>,
    ) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let (svc, handle) = mock::spawn_with(move |inner| {
            layer.layer(Record {
                inner,
                seen: record.clone(),
            })
        });
        (svc, handle, seen)
    }

    fn last(seen: &Mutex<Vec<CallDeadlines>>) -> CallDeadlines {
        *seen.lock().unwrap().last().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_fires_at_the_route_timeout_and_drops_the_attempt() {
        use std::sync::atomic::{AtomicBool, Ordering};

        struct DropFlag(Arc<AtomicBool>);
        impl Drop for DropFlag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(None));
        let (flag, seen2) = (dropped.clone(), seen.clone());
        let inner = tower::service_fn(move |req: Req| {
            *seen2.lock().unwrap() = RequestDeadline::of(&req);
            let guard = DropFlag(flag.clone());
            async move {
                let _guard = guard;
                std::future::pending::<Result<&'static str, BoxError>>().await
            }
        });
        let mut svc = Deadline::new(inner, Some(Duration::from_secs(3)));
        let start = Instant::now();
        let mut fut = tokio_test::task::spawn(svc.call(http::Request::new(())));
        assert_pending!(fut.poll());
        assert_eq!(
            seen.lock().unwrap().unwrap().at,
            start + Duration::from_secs(3)
        );
        tokio::time::advance(Duration::from_millis(2999)).await;
        assert_pending!(fut.poll());
        tokio::time::advance(Duration::from_millis(1)).await;
        let err = assert_ready_err!(fut.poll());
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
        drop(fut);
        assert!(
            dropped.load(Ordering::SeqCst),
            "the in-flight attempt was dropped"
        );
    }

    fn grpc(timeout: &str) -> Req {
        http::Request::builder()
            .header("content-type", "application/grpc+proto")
            .header("grpc-timeout", timeout)
            .body(())
            .unwrap()
    }

    #[test]
    fn grpc_timeout_units_and_malformed_values() {
        for (v, want) in [
            ("2H", Some(Duration::from_secs(7200))),
            ("3M", Some(Duration::from_secs(180))),
            ("4S", Some(Duration::from_secs(4))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("123456789m", None),
            ("m", None),
            ("5", None),
            ("-5S", None),
            ("5s", None),
            ("1.5S", None),
        ] {
            assert_eq!(grpc_timeout(&grpc(v)), want, "{v}");
        }
        // Only gRPC requests carry a gRPC deadline.
        let mut plain = grpc("1S");
        plain.headers_mut().remove("content-type");
        assert_eq!(grpc_timeout(&plain), None);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_timeout_is_a_deadline_capped_by_the_route_timeout() {
        for (route, header, want) in [
            (None, "300m", Duration::from_millis(300)),
            (
                Some(Duration::from_secs(5)),
                "300m",
                Duration::from_millis(300),
            ),
            (Some(Duration::from_secs(1)), "10S", Duration::from_secs(1)),
        ] {
            let (mut svc, mut handle, seen) = spawn_recorded(DeadlineLayer::new(route));
            assert_ready_ok!(svc.poll_ready());
            let start = Instant::now();
            let mut fut = tokio_test::task::spawn(svc.call(grpc(header)));
            let (_req, _send) = handle.next_request().await.unwrap();
            assert_eq!(last(&seen).request.unwrap().at, start + want);
            tokio::time::advance(want).await;
            let err = assert_ready_err!(fut.poll());
            assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_means_no_deadline() {
        for layer in [
            DeadlineLayer::new(None),
            DeadlineLayer::new(Some(Duration::ZERO)),
        ] {
            let (mut svc, mut handle, seen) = spawn_recorded(layer);
            assert_ready_ok!(svc.poll_ready());
            let mut fut = tokio_test::task::spawn(svc.call(http::Request::new(())));
            let (_req, send) = handle.next_request().await.unwrap();
            assert_eq!(last(&seen), CallDeadlines::NONE);
            tokio::time::advance(Duration::from_secs(3600)).await;
            assert_pending!(fut.poll());
            send.send_response("late but fine");
            assert_eq!(assert_ready_ok!(fut.poll()), "late but fine");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_of_the_embedder_is_kept_and_enforced() {
        let (mut svc, mut handle, seen) =
            spawn_recorded(DeadlineLayer::new(Some(Duration::from_secs(10))));
        assert_ready_ok!(svc.poll_ready());
        let outer = RequestDeadline::after(Duration::from_secs(1));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(outer);
        let mut fut = tokio_test::task::spawn(svc.call(req));
        let (_req, _send) = handle.next_request().await.unwrap();
        assert_eq!(last(&seen).request, Some(outer));
        tokio::time::advance(Duration::from_secs(1)).await;
        let err = assert_ready_err!(fut.poll());
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_of_the_embedder_gives_way_to_the_route_timeout() {
        let (mut svc, mut handle, seen) =
            spawn_recorded(DeadlineLayer::new(Some(Duration::from_secs(1))));
        assert_ready_ok!(svc.poll_ready());
        let start = Instant::now();
        let mut req = http::Request::new(());
        req.extensions_mut()
            .insert(RequestDeadline::after(Duration::from_secs(10)));
        let _fut = svc.call(req);
        let (_req, _send) = handle.next_request().await.unwrap();
        assert_eq!(
            last(&seen).request,
            Some(RequestDeadline {
                at: start + Duration::from_secs(1),
                timeout: Duration::from_secs(1),
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nested_deadline_layers_keep_the_earlier_deadline() {
        let start = Instant::now();
        for (outer, inner, want) in [(1, 10, 1), (10, 1, 1)] {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let record = seen.clone();
            let (mut svc, mut handle) = mock::spawn_with(move |m: mock::Mock<Req, ()>| {
                DeadlineLayer::new(Some(Duration::from_secs(outer))).layer(
                    DeadlineLayer::new(Some(Duration::from_secs(inner))).layer(Record {
                        inner: m,
                        seen: record.clone(),
                    }),
                )
            });
            assert_ready_ok!(svc.poll_ready());
            let _fut = svc.call(http::Request::new(()));
            let (_req, _send) = handle.next_request().await.unwrap();
            let got = last(&seen).request.unwrap();
            assert_eq!(got.at, start + Duration::from_secs(want), "{outer} {inner}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_are_current_only_for_the_duration_of_the_inner_call() {
        let (mut svc, mut handle, seen) =
            spawn_recorded(DeadlineLayer::new(Some(Duration::from_secs(5))));
        assert_eq!(CallDeadlines::current(), CallDeadlines::NONE);
        assert_ready_ok!(svc.poll_ready());
        let _timed = svc.call(http::Request::new(()));
        assert!(last(&seen).request.is_some(), "set during the call");
        assert_eq!(
            CallDeadlines::current(),
            CallDeadlines::NONE,
            "gone after it"
        );
        let (_req, _send) = handle.next_request().await.unwrap();

        // The next call on the same thread, through a service without a deadline, sees none.
        let (mut plain, mut plain_handle, plain_seen) = spawn_recorded(DeadlineLayer::new(None));
        assert_ready_ok!(plain.poll_ready());
        let _fut = plain.call(http::Request::new(()));
        let (_req, _send) = plain_handle.next_request().await.unwrap();
        assert_eq!(last(&plain_seen), CallDeadlines::NONE);
    }

    #[test]
    fn scopes_nest_and_restore_even_when_the_call_panics() {
        let at = Instant::now();
        let outer = CallDeadlines {
            request: Some(RequestDeadline {
                at,
                timeout: Duration::from_secs(1),
            }),
            attempt: None,
        };
        let inner = CallDeadlines {
            attempt: Some(AttemptDeadline(at)),
            ..outer
        };
        outer.scope(|| {
            assert_eq!(CallDeadlines::current(), outer);
            inner.scope(|| assert_eq!(CallDeadlines::current(), inner));
            assert_eq!(CallDeadlines::current(), outer);
            let panicked = std::panic::catch_unwind(|| inner.scope(|| panic!("inner call")));
            assert!(panicked.is_err());
            assert_eq!(CallDeadlines::current(), outer);
        });
        assert_eq!(CallDeadlines::current(), CallDeadlines::NONE);
    }

    #[test]
    fn extensions_and_current_deadlines_combine_earliest_first() {
        let t0 = Instant::now();
        let d = |s: u64| RequestDeadline {
            at: t0 + Duration::from_secs(s),
            timeout: Duration::from_secs(s),
        };
        let a = |s: u64| AttemptDeadline(t0 + Duration::from_secs(s));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(d(2));
        req.extensions_mut().insert(a(3));
        assert_eq!(
            CallDeadlines::of(&req),
            CallDeadlines {
                request: Some(d(2)),
                attempt: Some(a(3)),
            }
        );
        let current = CallDeadlines {
            request: Some(d(1)),
            attempt: Some(a(4)),
        };
        current.scope(|| {
            assert_eq!(
                CallDeadlines::of(&req),
                CallDeadlines {
                    request: Some(d(1)),
                    attempt: Some(a(3)),
                }
            );
            assert_eq!(RequestDeadline::of(&req), Some(d(1)));
            assert_eq!(AttemptDeadline::of(&req), Some(a(3)));
            // A request without extensions gets the current ones as they are.
            assert_eq!(CallDeadlines::of(&http::Request::new(())), current);
        });
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_is_forwarded() {
        let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(DeadlineLayer::new(
            Some(Duration::from_secs(1)),
        ));
        handle.allow(0);
        assert_pending!(svc.poll_ready());
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn inner_errors_are_passed_through() {
        for layer in [
            DeadlineLayer::new(None),
            DeadlineLayer::new(Some(Duration::from_secs(1))),
        ] {
            let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);
            assert_ready_ok!(svc.poll_ready());
            let mut fut = tokio_test::task::spawn(svc.call(http::Request::new(())));
            let (_req, send) = handle.next_request().await.unwrap();
            send.send_error(mesh_core::error::Overflow);
            let err = assert_ready_err!(fut.poll());
            assert!(is_caused_by::<mesh_core::error::Overflow>(err.as_ref()));
        }
    }
}
