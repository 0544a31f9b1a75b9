//! The route's outer deadline (VirtualService `timeout`, ISTIO.md VS-40, VS-41).
//!
//! [`DeadlineLayer`] turns the route timeout into an absolute [`RequestDeadline`] set once
//! per request as a request extension. It covers every attempt and every back-off sleep
//! of the retry layer inside it, which clips its own timers to it. When the deadline
//! passes, the in-flight attempt is dropped (the upstream stream is reset) and the caller
//! gets [`DeadlineExceeded`]; the proxy answers 504 `upstream request timeout` with flag `UT`.
//!
//! No timeout configured (`None` or zero) means no deadline at all, as in Istio: there is
//! no hidden default. If the request already carries an earlier deadline (set by an
//! outer layer), the earlier one is kept. A gRPC request's `grpc-timeout` is a deadline
//! as well, capped by the route timeout when one is set (ISTIO.md VS-42).
//!
//! # Layer placement
//!
//! Outside the retry layer, per route: `deadline -> retry -> balancer -> endpoint`.
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
//! use mesh_resilience::deadline::{DeadlineLayer, RequestDeadline};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(DeadlineLayer::new(Some(Duration::from_secs(5))))
//!     .service(service_fn(|req: http::Request<()>| async move {
//!         // Every layer inside sees the absolute deadline.
//!         let deadline = req.extensions().get::<RequestDeadline>().copied();
//!         Ok::<_, std::convert::Infallible>(deadline.map(|d| d.timeout))
//!     }));
//! let seen = svc.oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!(seen, Some(Duration::from_secs(5)));
//! # }
//! ```

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

/// The absolute deadline of a request, carried as a request extension.
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

    /// The deadline carried by `req`, if any.
    pub fn of<B>(req: &http::Request<B>) -> Option<Self> {
        req.extensions().get::<Self>().copied()
    }

    /// `t`, clipped so that it never lies after the deadline.
    pub fn clip(&self, t: Instant) -> Instant {
        t.min(self.at)
    }

    /// Whether the deadline has passed at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.at
    }
}

/// The deadline of one upstream attempt: `perTryTimeout` from the attempt's start,
/// already clipped to the [`RequestDeadline`]. The retry layer sets it on each attempt;
/// the balancer enforces it so the endpoint that timed out is charged (DR-31).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptDeadline(pub Instant);

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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // A gRPC caller's `grpc-timeout` bounds the request too, capped by the route
        // timeout when there is one (Istio's `max_grpc_timeout`, VS-42).
        let timeout = match (self.timeout, grpc_timeout(&req)) {
            (Some(route), Some(grpc)) => Some(route.min(grpc)),
            (route, grpc) => route.or(grpc),
        };
        let Some(timeout) = timeout else {
            return ResponseFuture::Passthrough {
                fut: self.inner.call(req),
            };
        };
        let mut deadline = RequestDeadline::after(timeout);
        if let Some(outer) = RequestDeadline::of(&req) {
            // An outer layer already bounded the request more tightly: keep its deadline.
            if outer.at <= deadline.at {
                deadline = outer;
            }
        }
        req.extensions_mut().insert(deadline);
        ResponseFuture::Timed {
            fut: self.inner.call(req),
            at: deadline.at,
            sleep: None,
        }
    }
}

/// The `grpc-timeout` of a gRPC request (`content-type: application/grpc…`): an
/// integer of at most eight digits and a unit, `H`, `M`, `S`, `m`, `u` or `n` (gRPC over
/// HTTP/2). Absent or malformed: `None`, as Envoy ignores a malformed header.
pub fn grpc_timeout<B>(req: &http::Request<B>) -> Option<Duration> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return None;
    }
    let value = req.headers().get("grpc-timeout")?.as_bytes();
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
    use super::*;
    use mesh_core::is_caused_by;
    use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
    use tower_test::mock;

    type Req = http::Request<()>;

    #[tokio::test(start_paused = true)]
    async fn deadline_fires_at_the_route_timeout_and_drops_the_attempt() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        struct DropFlag(Arc<AtomicBool>);
        impl Drop for DropFlag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(None));
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
            let (mut svc, mut handle) =
                mock::spawn_layer::<Req, &'static str, _>(DeadlineLayer::new(route));
            assert_ready_ok!(svc.poll_ready());
            let start = Instant::now();
            let mut fut = tokio_test::task::spawn(svc.call(grpc(header)));
            let (req, _send) = handle.next_request().await.unwrap();
            assert_eq!(RequestDeadline::of(&req).unwrap().at, start + want);
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
            let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(layer);
            assert_ready_ok!(svc.poll_ready());
            let mut fut = tokio_test::task::spawn(svc.call(http::Request::new(())));
            let (req, send) = handle.next_request().await.unwrap();
            assert!(RequestDeadline::of(&req).is_none());
            tokio::time::advance(Duration::from_secs(3600)).await;
            assert_pending!(fut.poll());
            send.send_response("late but fine");
            assert_eq!(assert_ready_ok!(fut.poll()), "late but fine");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_outer_deadline_is_kept() {
        let (mut svc, mut handle) = mock::spawn_layer::<Req, &'static str, _>(DeadlineLayer::new(
            Some(Duration::from_secs(10)),
        ));
        assert_ready_ok!(svc.poll_ready());
        let outer = RequestDeadline::after(Duration::from_secs(1));
        let mut req = http::Request::new(());
        req.extensions_mut().insert(outer);
        let _fut = svc.call(req);
        let (seen, _send) = handle.next_request().await.unwrap();
        assert_eq!(RequestDeadline::of(&seen), Some(outer));
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
