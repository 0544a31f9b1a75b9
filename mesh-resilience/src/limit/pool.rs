//! Connection-pool limits of one destination (DestinationRule `connectionPool`, ISTIO.md §2.3).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use mesh_core::BoxError;
use mesh_core::error::Overflow;
use pin_project::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{GuardBody, guard_response};

/// Istio's "unlimited" for the pool's integer fields (2^32 − 1).
pub const UNLIMITED: u32 = u32::MAX;

/// The `connectionPool` settings, field for field, with Istio's defaults.
///
/// A zero in Istio's YAML means "not set" for these fields (DR-20): a converter maps 0 to
/// the default, so `max_retries: 0` never disables retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// `tcp.maxConnections` (default 2^32 − 1).
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection (default 2^32 − 1).
    pub http1_max_pending_requests: u32,
    /// `http.http2MaxRequests`: requests in flight, all protocols (default 2^32 − 1).
    pub http2_max_requests: u32,
    /// `http.maxRequestsPerConnection` (default 0: unlimited). Applied by the connector.
    pub max_requests_per_connection: u32,
    /// `http.maxRetries`: retries in flight at once (default 2^32 − 1), see [`RetryGate`].
    pub max_retries: u32,
    /// `http.idleTimeout` of upstream connections (default 1 h). Applied by the connector.
    pub idle_timeout: Duration,
    /// Whether upstream connections multiplex requests (HTTP/2). Over HTTP/1.1 every
    /// request in flight occupies a connection, so `maxConnections` bounds requests too.
    pub multiplexed: bool,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_connections: UNLIMITED,
            http1_max_pending_requests: UNLIMITED,
            http2_max_requests: UNLIMITED,
            max_requests_per_connection: 0,
            max_retries: UNLIMITED,
            idle_timeout: Duration::from_secs(3600),
            multiplexed: false,
        }
    }
}

impl PoolLimits {
    /// Requests that may be in flight at once.
    pub fn max_in_flight(&self) -> u32 {
        if self.multiplexed {
            self.http2_max_requests
        } else {
            self.http2_max_requests.min(self.max_connections)
        }
    }

    /// Whether no request-level limit applies (the layer then passes requests through).
    pub fn is_unlimited(&self) -> bool {
        self.max_in_flight() == UNLIMITED
    }
}

#[derive(Debug)]
struct PoolState {
    limits: PoolLimits,
    semaphore: Arc<Semaphore>,
    pending: AtomicUsize,
}

/// Enforces [`PoolLimits`] for one destination. All services made from one layer (and
/// their clones) share the counters: the limits are per proxy per destination (DR-21).
#[derive(Clone, Debug)]
pub struct PoolLimitLayer {
    state: Arc<PoolState>,
    retries: RetryGate,
}

impl PoolLimitLayer {
    /// A layer enforcing `limits`.
    pub fn new(limits: PoolLimits) -> Self {
        let permits = (limits.max_in_flight() as usize).min(Semaphore::MAX_PERMITS);
        Self {
            state: Arc::new(PoolState {
                limits,
                semaphore: Arc::new(Semaphore::new(permits)),
                pending: AtomicUsize::new(0),
            }),
            retries: RetryGate::new(limits.max_retries),
        }
    }

    /// The limits.
    pub fn limits(&self) -> &PoolLimits {
        &self.state.limits
    }

    /// The `maxRetries` gate of this destination, for the retry layer.
    pub fn retry_gate(&self) -> RetryGate {
        self.retries.clone()
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.limits.max_in_flight() as usize - self.state.semaphore.available_permits()
    }

    /// Requests waiting for capacity now.
    pub fn pending(&self) -> usize {
        self.state.pending.load(Ordering::Acquire)
    }
}

impl<S> Layer<S> for PoolLimitLayer {
    type Service = PoolLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PoolLimit {
            inner,
            state: self.state.clone(),
            semaphore: PollSemaphore::new(self.state.semaphore.clone()),
            slot: Slot::Empty,
        }
    }
}

/// The service produced by [`PoolLimitLayer`].
#[derive(Debug)]
pub struct PoolLimit<S> {
    inner: S,
    state: Arc<PoolState>,
    semaphore: PollSemaphore,
    slot: Slot,
}

/// What this service instance reserved in `poll_ready`.
#[derive(Debug)]
enum Slot {
    Empty,
    /// Waiting for capacity, holding one of the pending places.
    Pending(#[allow(dead_code, reason = "held for its Drop")] PendingPlace),
    Permit(OwnedSemaphorePermit),
    /// No capacity and no pending place: the next call overflows.
    Overflow,
}

#[derive(Debug)]
struct PendingPlace(Arc<PoolState>);

impl Drop for PendingPlace {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S: Clone> Clone for PoolLimit<S> {
    /// A clone starts without a reservation.
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            state: self.state.clone(),
            semaphore: self.semaphore.clone(),
            slot: Slot::Empty,
        }
    }
}

impl<S, Req, B> Service<Req> for PoolLimit<S>
where
    S: Service<Req, Response = http::Response<B>>,
    S::Error: Into<BoxError>,
    B: http_body::Body,
{
    type Response = http::Response<GuardBody<B, OwnedSemaphorePermit>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.state.limits.is_unlimited() {
            return self.inner.poll_ready(cx).map_err(Into::into);
        }
        loop {
            match &self.slot {
                Slot::Empty => {
                    self.slot = match self.state.semaphore.clone().try_acquire_owned() {
                        Ok(permit) => Slot::Permit(permit),
                        Err(_) => {
                            let max = self.state.limits.http1_max_pending_requests as usize;
                            let before = self.state.pending.fetch_add(1, Ordering::AcqRel);
                            let place = PendingPlace(self.state.clone());
                            if before < max {
                                Slot::Pending(place)
                            } else {
                                drop(place);
                                Slot::Overflow
                            }
                        }
                    };
                }
                Slot::Pending(_) => match ready!(self.semaphore.poll_acquire(cx)) {
                    Some(permit) => self.slot = Slot::Permit(permit),
                    None => return Poll::Ready(Err("connection pool closed".into())),
                },
                // Overflow is answered by `call` so the caller's service stays usable.
                Slot::Overflow => return Poll::Ready(Ok(())),
                Slot::Permit(_) => return self.inner.poll_ready(cx).map_err(Into::into),
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        if self.state.limits.is_unlimited() {
            return ResponseFuture::Passthrough {
                fut: self.inner.call(req),
            };
        }
        match std::mem::replace(&mut self.slot, Slot::Empty) {
            Slot::Permit(permit) => ResponseFuture::Limited {
                fut: self.inner.call(req),
                permit: Some(permit),
            },
            Slot::Overflow => ResponseFuture::Overflow,
            Slot::Empty | Slot::Pending(_) => ResponseFuture::NotReady,
        }
    }
}

/// Response future of [`PoolLimit`].
#[pin_project(project = ResponseFutureProj)]
#[derive(Debug)]
pub enum ResponseFuture<F> {
    /// No limits configured.
    Passthrough {
        /// The inner future.
        #[pin]
        fut: F,
    },
    /// A request holding a permit; the permit moves into the response body.
    Limited {
        /// The inner future.
        #[pin]
        fut: F,
        /// The permit.
        permit: Option<OwnedSemaphorePermit>,
    },
    /// Rejected: the pool is full.
    Overflow,
    /// `call` without a successful `poll_ready`.
    NotReady,
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body,
{
    type Output = Result<http::Response<GuardBody<B, OwnedSemaphorePermit>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Passthrough { fut } => fut
                .poll(cx)
                .map(|r| r.map(|res| guard_response(res, None)).map_err(Into::into)),
            ResponseFutureProj::Limited { fut, permit } => {
                let res = ready!(fut.poll(cx)).map_err(Into::into)?;
                Poll::Ready(Ok(guard_response(res, permit.take())))
            }
            ResponseFutureProj::Overflow => Poll::Ready(Err(Box::new(Overflow))),
            ResponseFutureProj::NotReady => {
                Poll::Ready(Err("poll_ready must succeed before call".into()))
            }
        }
    }
}

/// The `maxRetries` circuit breaker of a destination: at most this many retries in
/// flight at once (VS-64). A retry that finds it full is skipped and the response is
/// flagged `UO`.
#[derive(Clone, Debug)]
pub struct RetryGate {
    max: usize,
    active: Arc<AtomicUsize>,
}

/// One retry in flight; releases its place in the [`RetryGate`] when dropped.
#[derive(Debug)]
pub struct RetryPermit(Arc<AtomicUsize>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryGate {
    /// A gate allowing `max_retries` concurrent retries.
    pub fn new(max_retries: u32) -> Self {
        Self {
            max: max_retries as usize,
            active: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Takes a place for one retry, or `None` when the gate is full.
    pub fn try_acquire(&self) -> Option<RetryPermit> {
        let before = self.active.fetch_add(1, Ordering::AcqRel);
        let permit = RetryPermit(self.active.clone());
        (before < self.max).then_some(permit)
    }

    /// Retries in flight now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use mesh_core::{BoxBody, is_caused_by};
    use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
    use tower_test::mock;

    type Req = http::Request<()>;
    type Res = http::Response<BoxBody>;

    fn limits(max_connections: u32, pending: u32) -> PoolLimits {
        PoolLimits {
            max_connections,
            http1_max_pending_requests: pending,
            ..PoolLimits::default()
        }
    }

    fn streaming() -> (Res, tokio::sync::mpsc::Sender<()>) {
        // A body that ends when the sender is dropped.
        let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await;
            None::<(Result<http_body::Frame<bytes::Bytes>, BoxError>, _)>
        });
        let body = mesh_core::body::boxed(http_body_util::StreamBody::new(stream));
        (http::Response::new(body), tx)
    }

    #[tokio::test(start_paused = true)]
    async fn third_concurrent_request_overflows_at_once() {
        let layer = PoolLimitLayer::new(limits(1, 1));
        let (inner, mut handle) = mock::pair::<Req, Res>();
        let mut a = mock::Spawn::new(layer.layer(inner.clone()));
        let mut b = mock::Spawn::new(layer.layer(inner.clone()));
        let mut c = mock::Spawn::new(layer.layer(inner));

        assert_ready_ok!(a.poll_ready());
        let fut_a = a.call(http::Request::new(()));
        assert_pending!(
            b.poll_ready(),
            "the second request waits for the connection"
        );
        assert_eq!(layer.pending(), 1);
        assert_ready_ok!(c.poll_ready(), "the third is answered at once");
        let err = c.call(http::Request::new(())).await.unwrap_err();
        assert!(is_caused_by::<Overflow>(err.as_ref()));
        assert_eq!(
            err.to_string(),
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );

        // The first response's headers arrive: b still waits until the BODY ends.
        let (_req, send) = handle.next_request().await.unwrap();
        let (res, body_end) = streaming();
        send.send_response(res);
        let res_a = fut_a.await.unwrap();
        assert!(res_a.body().is_guarded());
        assert_pending!(b.poll_ready());
        drop(body_end);
        let collected = res_a.into_body().collect().await;
        assert!(collected.is_ok());
        assert!(b.is_woken());
        assert_ready_ok!(b.poll_ready());
        assert_eq!(layer.pending(), 0);
        assert_eq!(layer.in_flight(), 1);
    }

    #[tokio::test]
    async fn capacity_is_reserved_once_and_clones_start_empty() {
        let layer = PoolLimitLayer::new(limits(2, 0));
        let (inner, _handle) = mock::pair::<Req, Res>();
        let mut a = mock::Spawn::new(layer.layer(inner));
        assert_ready_ok!(a.poll_ready());
        assert_ready_ok!(a.poll_ready());
        assert_eq!(layer.in_flight(), 1, "polling twice reserves one permit");
        let mut b = mock::Spawn::new(a.get_ref().clone());
        assert_eq!(layer.in_flight(), 1, "a clone holds nothing");
        assert_ready_ok!(b.poll_ready());
        assert_eq!(layer.in_flight(), 2);
        drop(a);
        assert_eq!(
            layer.in_flight(),
            1,
            "dropping an unused reservation frees it"
        );
    }

    #[tokio::test]
    async fn readiness_is_forwarded_once_a_permit_is_held() {
        let layer = PoolLimitLayer::new(limits(1, 1));
        let (inner, mut handle) = mock::pair::<Req, Res>();
        let mut svc = mock::Spawn::new(layer.layer(inner));
        handle.allow(0);
        assert_pending!(svc.poll_ready());
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
    }

    #[tokio::test]
    async fn unlimited_pool_passes_through_and_maps_errors() {
        let layer = PoolLimitLayer::new(PoolLimits::default());
        let (inner, mut handle) = mock::pair::<Req, Res>();
        let mut svc = mock::Spawn::new(layer.layer(inner));
        assert_ready_ok!(svc.poll_ready());
        let mut fut = tokio_test::task::spawn(svc.call(http::Request::new(())));
        let (_req, send) = handle.next_request().await.unwrap();
        send.send_error(mesh_core::error::ConnectFailure::bare());
        let err = assert_ready_err!(fut.poll());
        assert!(is_caused_by::<mesh_core::error::ConnectFailure>(
            err.as_ref()
        ));
        assert_eq!(layer.in_flight(), 0);
    }

    #[test]
    fn http2_pools_count_requests_not_connections() {
        let l = PoolLimits {
            max_connections: 1,
            http2_max_requests: 100,
            multiplexed: true,
            ..PoolLimits::default()
        };
        assert_eq!(l.max_in_flight(), 100);
        assert_eq!(
            PoolLimits {
                multiplexed: false,
                ..l
            }
            .max_in_flight(),
            1
        );
    }

    #[test]
    fn retry_gate_bounds_concurrent_retries() {
        let g = RetryGate::new(2);
        let a = g.try_acquire();
        let b = g.try_acquire();
        assert!(a.is_some() && b.is_some());
        assert!(g.try_acquire().is_none());
        drop(a);
        assert!(g.try_acquire().is_some());
        assert_eq!(g.active(), 1);
    }
}
