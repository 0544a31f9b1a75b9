//! The retry state machine: buffer the body, then attempt, classify, back off, repeat.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::HeaderValue;
use mesh_core::error::{DeadlineExceeded, PerTryTimeout};
use mesh_core::extensions::add_response_flags;
use mesh_core::{BoxBody, BoxError, Outcome, ResponseFlags, UpstreamHost, find_cause};
use pin_project::pin_project;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::time::{Instant, Sleep, sleep_until};
use tower_service::Service;

use super::budget::{BudgetPermit, ConcurrentRetryBudget, RetryBudget};
use super::head::HeadCopy;
use super::policy::RetryPolicy;
use super::replay::{Buffering, Prepared, Replay, Start};
use super::{ATTEMPT_COUNT, RetriesExhausted};
use crate::balance::{EndpointFailed, PreviousHosts};
use crate::deadline::{self, AttemptDeadline, CallDeadlines, RequestDeadline};
use crate::limit::{RetryGate, RetryPermit};

/// Response future of [`Retry`](super::Retry).
#[pin_project(project = ResponseFutureProj)]
#[allow(
    clippy::large_enum_variant,
    reason = "the attempts live inline so a request costs no extra allocation"
)]
pub enum ResponseFuture<S, F> {
    /// Retries disabled: the inner future as is, or raced against the route deadline
    /// when the layer applies it.
    Passthrough {
        /// The inner future.
        #[pin]
        fut: crate::deadline::ResponseFuture<F>,
    },
    /// Attempts under the retry policy.
    Retrying {
        /// The state machine.
        #[pin]
        inner: Attempts<S, F>,
    },
}

impl<S, F> fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Passthrough { .. } => f.write_str("ResponseFuture::Passthrough"),
            Self::Retrying { inner } => f
                .debug_struct("ResponseFuture::Retrying")
                .field("attempt", &inner.state.attempt)
                .finish_non_exhaustive(),
        }
    }
}

impl<S, F, RB, E> Future for ResponseFuture<S, F>
where
    S: Service<http::Request<BoxBody>, Response = http::Response<RB>, Future = F, Error = E>,
    F: Future<Output = Result<http::Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Passthrough { fut } => fut.poll(cx),
            ResponseFutureProj::Retrying { inner } => inner.poll(cx),
        }
    }
}

#[derive(Default)]
enum Body {
    /// Being read, with the caller's head that the first attempt waits for. Boxed: only
    /// requests whose body must be read pay for this state.
    Buffering(Box<Reading>),
    /// Known to be empty (a request without a body): every attempt gets an empty one.
    Empty,
    /// Buffered whole: every attempt gets a copy.
    Replay(Replay),
    /// Too large to keep: the first attempt took it, nothing can be replayed. Also what
    /// pooled storage holds between requests.
    #[default]
    Once,
}

impl Body {
    /// Makes this an [`Empty`](Self::Empty) body.
    #[inline]
    fn set_empty(&mut self) {
        if matches!(self, Self::Once | Self::Empty) {
            // Nothing to drop: skip the drop code of the other variants.
            std::mem::forget(std::mem::replace(self, Self::Empty));
        } else {
            *self = Self::Empty;
        }
    }
}

/// A body being buffered, and the head of the request it belongs to.
struct Reading {
    buffering: Buffering,
    head: http::request::Parts,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Buffering,
    Dispatch,
    Calling,
    Backoff,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// The per-try timeout ends the attempt.
    PerTry,
    /// The request's deadline ends the attempt or the back-off.
    Deadline,
    /// The back-off ends.
    Backoff,
}

/// The attempts of one request.
///
/// The first attempt is made in the retry service's `call` when the body needs no
/// reading (the inner service is ready then), so the caller's head goes straight to it
/// and is never stored here; only the copy kept for retries is. What only matters once
/// an attempt has to wait or be retried (the copy, the replayable body, the timer, the
/// hosts tried) lives in pooled storage ([`Kept`]), so the future itself is small and
/// cheap to move.
#[pin_project]
pub struct Attempts<S, F> {
    state: State<S>,
    #[pin]
    call: Option<F>,
}

/// Everything of [`Attempts`] but the attempt in flight.
struct State<S> {
    service: S,
    service_ready: bool,
    shared: Arc<Shared>,
    /// Taken from the per-thread pool for the request, given back when it ends; `None`
    /// only once given back.
    kept: Option<Pin<Box<Kept>>>,
    phase: Phase,
    /// Attempts started so far.
    attempt: u32,
    deadline: Option<RequestDeadline>,
    per_try: Option<Duration>,
    /// When the current timer fires.
    timer_at: Option<Instant>,
    timer_kind: Timer,
}

/// What a retry layer's futures share: the policy and the limits on retries.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) policy: RetryPolicy,
    pub(crate) budget: Option<Arc<RetryBudget>>,
    pub(crate) gate: Option<RetryLimit>,
}

/// The part of a request's attempts that the first attempt does not need, in storage
/// reused through a per-thread pool.
#[pin_project(project = KeptProj)]
#[derive(Default)]
struct Kept {
    /// Created from `State::timer_at` only once something has to wait, so an attempt
    /// answered at once costs no timer; dropped whenever `timer_at` changes.
    #[pin]
    timer: Option<Sleep>,
    /// A copy of the caller's head for later attempts, kept only when the body can be
    /// replayed.
    head: HeadCopy,
    body: Body,
    tried: Vec<SocketAddr>,
    retry_permit: Option<RetryHold>,
    /// Seeds the back-off jitter of this request: the service's seed and the request's
    /// number there, mixed only when a retry waits.
    seed: (u64, u64),
}

/// Storage kept per thread for reuse, besides the spare.
const POOLED: usize = 32;
/// Hosts-tried lists longer than this are not pooled.
const POOLED_TRIED: usize = 16;

thread_local! {
    /// The storage given back last, taken first (no pool bookkeeping for a thread that
    /// serves one request at a time). Boxed and pinned: the timer inside must not move,
    /// and the future holds a pointer.
    static SPARE: Cell<Option<Pin<Box<Kept>>>> = const { Cell::new(None) };
    /// More storage, for the requests in flight at the same time on this thread.
    static POOL: RefCell<Vec<Pin<Box<Kept>>>> = const { RefCell::new(Vec::new()) };
}

impl Kept {
    /// Storage from the pool, or new.
    #[inline]
    fn take() -> Pin<Box<Self>> {
        if let Ok(Some(kept)) = SPARE.try_with(Cell::take) {
            return kept;
        }
        POOL.try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Box::pin(Self::default()))
    }

    /// Empties `kept` (ending its timer, releasing its retry permit, dropping what it
    /// kept of the request) and gives it back to the pool.
    #[inline]
    fn recycle(mut kept: Pin<Box<Self>>) {
        let mut k = kept.as_mut().project();
        if !k.head.poolable() || k.tried.capacity() > POOLED_TRIED {
            return;
        }
        if k.timer.is_some() {
            k.timer.set(None);
        }
        k.head.clear();
        if !matches!(k.body, Body::Once | Body::Empty) {
            *k.body = Body::Once;
        }
        k.tried.clear();
        if k.retry_permit.is_some() {
            *k.retry_permit = None;
        }
        // During thread teardown the pool may be gone: the storage is simply freed.
        let Ok(Some(older)) = SPARE.try_with(|s| s.replace(Some(kept))) else {
            return;
        };
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOLED {
                p.push(older);
            }
        });
    }
}

impl<S> Drop for State<S> {
    fn drop(&mut self) {
        if let Some(kept) = self.kept.take() {
            Kept::recycle(kept);
        }
    }
}

impl<S, F> Attempts<S, F> {
    /// The attempts of one request on `service`, which must be ready; nothing is sent
    /// until [`start`](Self::start).
    #[inline]
    pub(crate) fn new(service: S, shared: Arc<Shared>, seed: (u64, u64)) -> Self {
        let mut kept = Kept::take();
        *kept.as_mut().project().seed = seed;
        Self {
            state: State {
                service,
                service_ready: true,
                shared,
                kept: Some(kept),
                phase: Phase::Dispatch,
                attempt: 0,
                deadline: None,
                per_try: None,
                timer_at: None,
                timer_kind: Timer::PerTry,
            },
            call: None,
        }
    }

    /// Prepares the first attempt of `req`, and tells whether it can be called at once
    /// (with the deadlines to make current around the call) or its body must be read
    /// first ([`read_first`](Self::read_first)). `route` is the route timeout when the
    /// retry layer applies the deadline itself (`Some(None)`: only a `grpc-timeout`),
    /// `None` when the deadline is set outside.
    ///
    /// The caller calls the service itself, so the request is not moved on the way.
    #[inline]
    pub(crate) fn start(
        &mut self,
        req: &mut http::Request<BoxBody>,
        route: Option<Option<Duration>>,
    ) -> Option<CallDeadlines> {
        let state = &mut self.state;
        // A body that has ended (a request without one) is replayable as it is: the head
        // is copied now, and its walk over the headers notes the gRPC deadline.
        let replayable = http_body::Body::is_end_stream(req.body());
        let grpc = match state.kept() {
            Some(k) if replayable => {
                let noticed = k.head.copy(
                    req.method(),
                    req.uri(),
                    req.version(),
                    req.headers(),
                    req.extensions(),
                );
                k.body.set_empty();
                route.and_then(|_| noticed.grpc_timeout())
            }
            _ => route.and_then(|_| deadline::grpc_timeout(req)),
        };
        // Applied by this layer (and then taken now), or set around this call by the
        // deadline layer, or carried by the request.
        let outer = CallDeadlines::of(req).request;
        let mut now = None;
        state.deadline = match route.and_then(|route| deadline::effective_timeout(route, grpc)) {
            Some(timeout) => {
                let (bound, at) = deadline::request_deadline(timeout, outer);
                now = Some(at);
                Some(bound)
            }
            None => outer,
        };
        state.per_try = state
            .shared
            .policy
            .effective_per_try_timeout(state.deadline.map(|d| d.timeout));
        if !replayable {
            return None;
        }
        // The first attempt gets the caller's body, which has ended (every retry gets an
        // empty one).
        Some(state.prepare_attempt(req, now))
    }

    /// Starts the first attempt of a `req` whose body is not known to be empty, once
    /// [`start`](Self::start) has prepared it: at once when the body need not be read
    /// (too large to keep), else once it has been.
    pub(crate) fn read_first<RB, E>(&mut self, req: http::Request<BoxBody>)
    where
        S: Service<http::Request<BoxBody>, Response = http::Response<RB>, Future = F, Error = E>,
    {
        let state = &mut self.state;
        let (head, body) = req.into_parts();
        match Buffering::start(body, state.shared.policy.replay_limit) {
            Start::Done(prepared) => {
                self.call = Some(state.first_attempt(head, prepared));
            }
            Start::Read(buffering) => {
                if let Some(k) = state.kept() {
                    *k.body = Body::Buffering(Box::new(Reading { buffering, head }));
                }
                state.phase = Phase::Buffering;
            }
        }
    }

    /// Sets the attempt in flight.
    #[inline]
    pub(crate) fn set_call(&mut self, call: F) {
        self.call = Some(call);
    }

    /// The service of the attempts, ready for the attempt [`start`](Self::start) prepared.
    #[inline]
    pub(crate) fn service(&mut self) -> &mut S {
        &mut self.state.service
    }
}

impl<S> State<S> {
    /// The pooled part.
    #[inline]
    fn kept(&mut self) -> Option<KeptProj<'_>> {
        self.kept.as_mut().map(|k| k.as_mut().project())
    }

    /// Calls the first attempt with the caller's `head` and its prepared body, keeping a
    /// copy of the head when the body can be replayed.
    fn first_attempt<RB, E>(&mut self, head: http::request::Parts, prepared: Prepared) -> S::Future
    where
        S: Service<http::Request<BoxBody>, Response = http::Response<RB>, Error = E>,
    {
        let body = match prepared {
            Prepared::Replayable(replay) => {
                let body = replay.body();
                if let Some(k) = self.kept() {
                    k.head.copy(
                        &head.method,
                        &head.uri,
                        head.version,
                        &head.headers,
                        &head.extensions,
                    );
                    *k.body = Body::Replay(replay);
                }
                body
            }
            Prepared::Once(body) => {
                if let Some(k) = self.kept() {
                    *k.body = Body::Once;
                }
                body
            }
        };
        let mut req = http::Request::from_parts(head, body);
        let deadlines = self.prepare_attempt(&mut req, None);
        let _current = deadlines.enter();
        self.service.call(req)
    }

    /// Prepares the next attempt, `req`, to be called on the ready service: numbers it,
    /// names the hosts already tried, sets its timer (the per-try timeout clipped to the
    /// deadline), and returns the deadlines to make current around the call for the
    /// layers inside. Whoever holds the `Sleep` must drop it, as `timer_at` changed.
    /// `now`, when given, is the current instant (read by the caller).
    #[inline]
    fn prepare_attempt(
        &mut self,
        req: &mut http::Request<BoxBody>,
        now: Option<Instant>,
    ) -> CallDeadlines {
        self.service_ready = false;
        self.attempt += 1;
        let policy = &self.shared.policy;
        if policy.include_attempt_count {
            // The copy kept for retries has the caller's own count, if any, where the
            // caller put it: every attempt's count replaces it there.
            req.headers_mut()
                .insert(ATTEMPT_COUNT, attempt_header(self.attempt));
        }
        if self.attempt > 1
            && policy.retry_ignore_previous_hosts
            && let Some(k) = self.kept.as_mut()
            && !k.tried.is_empty()
        {
            let tried = k.tried.clone();
            req.extensions_mut().insert(PreviousHosts(tried));
        }
        // The clock is read only when a per-try timeout applies.
        let per_try_end = self.per_try.map(|p| now.unwrap_or_else(Instant::now) + p);
        let attempt_deadline =
            per_try_end.map(|end| AttemptDeadline(self.deadline.map_or(end, |d| d.clip(end))));
        (self.timer_at, self.timer_kind) = match (per_try_end, self.deadline) {
            (Some(p), Some(d)) if d.at <= p => (Some(d.at), Timer::Deadline),
            (Some(p), _) => (Some(p), Timer::PerTry),
            (None, Some(d)) => (Some(d.at), Timer::Deadline),
            (None, None) => (None, Timer::PerTry),
        };
        self.phase = Phase::Calling;
        // The layers inside (the balancer) read both deadlines in their `call`.
        CallDeadlines {
            request: self.deadline,
            attempt: attempt_deadline,
        }
    }

    /// Sets the timer to fire at `at`.
    fn arm(&mut self, at: Instant, kind: Timer) {
        self.timer_at = Some(at);
        self.timer_kind = kind;
        self.drop_sleep();
    }

    /// Removes the timer.
    #[inline]
    fn disarm(&mut self) {
        self.timer_at = None;
        self.drop_sleep();
    }

    /// Drops the `Sleep`, if one was created: the timer changed.
    #[inline]
    fn drop_sleep(&mut self) {
        if let Some(mut k) = self.kept()
            && k.timer.is_some()
        {
            k.timer.set(None);
        }
    }

    /// Polls the timer, creating its `Sleep` on first use; `None` when no timer is set.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        let at = self.timer_at?;
        let mut timer = self.kept()?.timer;
        if timer.is_none() {
            timer.set(Some(sleep_until(at)));
        }
        timer.as_pin_mut().map(|t| t.poll(cx))
    }
}

/// The value of `x-envoy-attempt-count` on attempt `n`.
#[inline]
fn attempt_header(n: u32) -> HeaderValue {
    // Constants: `from_static` outside a constant checks its bytes at run time.
    const ONE: HeaderValue = HeaderValue::from_static("1");
    const TWO: HeaderValue = HeaderValue::from_static("2");
    const THREE: HeaderValue = HeaderValue::from_static("3");
    match n {
        1 => ONE,
        2 => TWO,
        3 => THREE,
        n => HeaderValue::from(n),
    }
}

enum Decision<T> {
    Return(T),
    Retry,
}

impl<S, F, RB, E> Attempts<S, F>
where
    S: Service<http::Request<BoxBody>, Response = http::Response<RB>, Future = F, Error = E>,
    F: Future<Output = Result<http::Response<RB>, E>>,
    E: Into<BoxError>,
{
    pub(crate) fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<http::Response<RB>, BoxError>> {
        let this = self.project();
        let state = this.state;
        let mut call = this.call;
        loop {
            match state.phase {
                Phase::Calling => {
                    let Some(fut) = call.as_mut().as_pin_mut() else {
                        state.phase = Phase::Done;
                        continue;
                    };
                    let result = match fut.poll(cx) {
                        // The attempt goes first: an answer ready at the deadline wins.
                        Poll::Ready(r) => r.map_err(Into::into),
                        Poll::Pending => match state.poll_timer(cx) {
                            Some(t) => {
                                ready!(t);
                                // Dropping the attempt resets the upstream stream.
                                call.set(None);
                                if state.timer_kind == Timer::Deadline {
                                    state.phase = Phase::Done;
                                    return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                                }
                                Err(Box::new(PerTryTimeout) as BoxError)
                            }
                            None => return Poll::Pending,
                        },
                    };
                    call.set(None);
                    state.disarm();
                    if !wants_retry(&state.shared.policy, &result) {
                        state.phase = Phase::Done;
                        return Poll::Ready(result);
                    }
                    match state.decide(result) {
                        Decision::Return(r) => {
                            state.phase = Phase::Done;
                            return Poll::Ready(r);
                        }
                        Decision::Retry => state.back_off(),
                    }
                }
                Phase::Buffering => {
                    let Some(k) = state.kept() else {
                        state.phase = Phase::Done;
                        return Poll::Ready(Err("retry future lost its request".into()));
                    };
                    let Body::Buffering(reading) = k.body else {
                        state.phase = Phase::Done;
                        return Poll::Ready(Err("retry future lost its request".into()));
                    };
                    let prepared = match reading.buffering.poll_prepare(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            // Reading the request body counts against the deadline too.
                            if let Some(d) = state.deadline
                                && state.timer_at.is_none()
                            {
                                state.arm(d.at, Timer::Deadline);
                            }
                            if let Some(t) = state.poll_timer(cx) {
                                ready!(t);
                                state.phase = Phase::Done;
                                return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                            }
                            return Poll::Pending;
                        }
                    };
                    state.disarm();
                    let Some(Body::Buffering(reading)) =
                        state.kept().map(|k| std::mem::replace(k.body, Body::Once))
                    else {
                        state.phase = Phase::Done;
                        return Poll::Ready(Err("retry future lost its request".into()));
                    };
                    match prepared {
                        Ok(prepared) => {
                            // The service was ready when the request came: first attempt.
                            let fut = state.first_attempt(reading.head, prepared);
                            call.set(Some(fut));
                            state.drop_sleep();
                        }
                        Err(e) => {
                            state.phase = Phase::Done;
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                Phase::Dispatch => {
                    if !state.service_ready {
                        // Waiting for readiness is bounded by the deadline.
                        match state.service.poll_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => {
                                state.phase = Phase::Done;
                                return Poll::Ready(Err(e.into()));
                            }
                            Poll::Pending => {
                                if let Some(t) = state.poll_timer(cx) {
                                    ready!(t);
                                    state.phase = Phase::Done;
                                    return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                                }
                                return Poll::Pending;
                            }
                        }
                        state.service_ready = true;
                    }
                    let req = match state.kept() {
                        Some(k) => match (&*k.body, k.head.is_kept()) {
                            (Body::Replay(replay), true) => k
                                .head
                                .request()
                                .map(|head| http::Request::from_parts(head, replay.body())),
                            (Body::Empty, true) => k.head.request().map(|head| {
                                http::Request::from_parts(head, mesh_core::body::empty())
                            }),
                            _ => Err("retry without a replayable request".into()),
                        },
                        None => Err("retry without a replayable request".into()),
                    };
                    let mut req = match req {
                        Ok(req) => req,
                        Err(e) => {
                            state.phase = Phase::Done;
                            return Poll::Ready(Err(e));
                        }
                    };
                    let deadlines = state.prepare_attempt(&mut req, None);
                    let fut = {
                        let _current = deadlines.enter();
                        state.service.call(req)
                    };
                    call.set(Some(fut));
                    state.drop_sleep();
                }
                Phase::Backoff => {
                    if let Some(t) = state.poll_timer(cx) {
                        ready!(t);
                    }
                    state.disarm();
                    if state.timer_kind == Timer::Deadline {
                        state.phase = Phase::Done;
                        return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                    }
                    if let Some(d) = state.deadline {
                        // Keep the deadline armed while waiting for readiness.
                        state.arm(d.at, Timer::Deadline);
                    }
                    state.phase = Phase::Dispatch;
                }
                Phase::Done => {
                    return Poll::Ready(Err("retry future polled after completion".into()));
                }
            }
        }
    }
}

/// Whether retryOn asks for a retry of `result` (attempts, body and limits aside).
#[inline]
fn wants_retry<RB>(policy: &RetryPolicy, result: &Result<http::Response<RB>, BoxError>) -> bool {
    match result {
        Ok(res) => {
            let headers = res.headers();
            let grpc_status = mesh_core::outcome::grpc_status(headers);
            policy.should_retry_response(res.status().as_u16(), grpc_status, headers)
        }
        Err(e) => policy.should_retry(&Outcome::from_error(e), None),
    }
}

impl<S> State<S> {
    /// Decides what to do with the result of the attempt just made, which retryOn would
    /// retry: whether the body, the attempts left and the limits allow it.
    fn decide<RB>(
        &mut self,
        mut result: Result<http::Response<RB>, BoxError>,
    ) -> Decision<Result<http::Response<RB>, BoxError>> {
        let attempt = self.attempt;
        let shared = &*self.shared;
        let Some(k) = self.kept.as_mut().map(|k| k.as_mut().project()) else {
            return Decision::Return(result);
        };
        if !matches!(k.body, Body::Replay(_) | Body::Empty) {
            // The body was too large to keep: the request cannot be replayed (VS-67).
            return Decision::Return(result);
        }
        if attempt > shared.policy.attempts {
            // Retries exhausted: the caller gets the last upstream answer, flagged URX (VS-62).
            return Decision::Return(match result {
                Ok(mut res) => {
                    add_response_flags(
                        res.extensions_mut(),
                        ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED,
                    );
                    Ok(res)
                }
                Err(source) => Err(Box::new(RetriesExhausted {
                    attempts: attempt,
                    source,
                })),
            });
        }
        if let Some(gate) = &shared.gate {
            match gate.try_acquire() {
                Some(permit) => *k.retry_permit = Some(permit),
                None => {
                    // maxRetries or the retry budget reached: the retry is skipped and
                    // flagged UO (VS-64, DR-74).
                    if let Ok(res) = &mut result {
                        add_response_flags(res.extensions_mut(), ResponseFlags::UPSTREAM_OVERFLOW);
                    }
                    return Decision::Return(result);
                }
            }
        }
        if shared.budget.as_ref().is_some_and(|b| !b.try_withdraw()) {
            *k.retry_permit = None;
            return Decision::Return(result);
        }
        let host = match &result {
            Ok(res) => res.extensions().get::<UpstreamHost>().map(|h| h.0),
            Err(e) => find_cause::<EndpointFailed>(e.as_ref()).map(EndpointFailed::address),
        };
        if let Some(host) = host
            && !k.tried.contains(&host)
        {
            k.tried.push(host);
        }
        Decision::Retry
    }

    /// Schedules the retry just decided: at once, or after a back-off (clipped to the
    /// deadline, which then ends the request).
    fn back_off(&mut self) {
        let (stream, request) = self.kept().map_or((0, 0), |k| *k.seed);
        let seed = crate::mix_seed(stream, request);
        let mut rng = SmallRng::seed_from_u64(seed ^ u64::from(self.attempt));
        let wait = self.shared.policy.backoff.delay(self.attempt, &mut rng);
        if wait.is_zero() && self.deadline.is_none() {
            // No wait drawn: retry at once.
            self.phase = Phase::Dispatch;
            return;
        }
        let end = Instant::now() + wait;
        let (at, kind) = match self.deadline {
            Some(d) if d.at <= end => (d.at, Timer::Deadline),
            _ => (end, Timer::Backoff),
        };
        self.arm(at, kind);
        self.phase = Phase::Backoff;
    }
}

/// What bounds the retries in flight to a destination: its `maxRetries` gate or, when
/// the DestinationRule sets one, its `retryBudget`, which replaces the gate.
#[derive(Clone, Debug)]
pub(crate) enum RetryLimit {
    Gate(RetryGate),
    Budget(ConcurrentRetryBudget),
}

/// A retry's place under its [`RetryLimit`], released when dropped.
#[derive(Debug)]
#[allow(dead_code)] // Held for its `Drop`.
pub(crate) enum RetryHold {
    Gate(RetryPermit),
    Budget(BudgetPermit),
}

impl RetryLimit {
    fn try_acquire(&self) -> Option<RetryHold> {
        match self {
            Self::Gate(g) => g.try_acquire().map(RetryHold::Gate),
            Self::Budget(b) => b.try_acquire().map(RetryHold::Budget),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled() -> usize {
        POOL.with_borrow(Vec::len)
    }

    fn spare_is_set() -> bool {
        let spare = SPARE.take();
        let set = spare.is_some();
        SPARE.set(spare);
        set
    }

    /// Storage holding a bit of everything a request leaves in it.
    fn used(gate: &RetryGate) -> Pin<Box<Kept>> {
        let mut kept = Kept::take();
        let k = kept.as_mut().project();
        let mut req = http::Request::new(());
        req.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("abc"));
        k.head.copy(
            req.method(),
            req.uri(),
            req.version(),
            req.headers(),
            req.extensions(),
        );
        *k.body = Body::Replay(Replay::default());
        k.tried.push(SocketAddr::from(([10, 0, 0, 1], 80)));
        *k.retry_permit = gate.try_acquire().map(RetryHold::Gate);
        *k.seed = (1, 2);
        kept
    }

    fn is_empty(kept: &mut Pin<Box<Kept>>) -> bool {
        let k = kept.as_mut().project();
        k.timer.is_none()
            && !k.head.is_kept()
            && matches!(k.body, Body::Once | Body::Empty)
            && k.tried.is_empty()
            && k.retry_permit.is_none()
    }

    #[tokio::test(start_paused = true)]
    async fn storage_comes_back_empty_and_is_taken_again() {
        let gate = RetryGate::new(5);
        let mut kept = used(&gate);
        kept.as_mut()
            .project()
            .timer
            .set(Some(sleep_until(Instant::now() + Duration::from_secs(1))));
        assert_eq!(gate.active(), 1);
        let at = std::ptr::from_ref::<Kept>(&kept);
        Kept::recycle(kept);
        assert_eq!(gate.active(), 0, "the retry's place is released");
        assert!(spare_is_set());
        let mut again = Kept::take();
        assert_eq!(std::ptr::from_ref::<Kept>(&again), at, "the same storage");
        assert!(is_empty(&mut again), "nothing of the last request is kept");
        assert!(!spare_is_set());
    }

    #[test]
    fn storage_of_requests_in_flight_together_is_pooled_up_to_a_bound() {
        let gate = RetryGate::new(100);
        let many: Vec<_> = (0..POOLED + 5).map(|_| used(&gate)).collect();
        assert_eq!(pooled(), 0);
        for kept in many {
            Kept::recycle(kept);
        }
        assert!(spare_is_set());
        assert_eq!(pooled(), POOLED, "one spare, then the pool up to its bound");
        assert_eq!(gate.active(), 0);
        let mut taken: Vec<_> = (0..POOLED + 1).map(|_| Kept::take()).collect();
        assert_eq!(pooled(), 0);
        assert!(taken.iter_mut().all(is_empty));
    }

    #[test]
    fn storage_grown_large_is_freed_not_pooled() {
        let mut big = Kept::take();
        let mut req = http::Request::new(());
        let value = HeaderValue::from_bytes(&vec![b'v'; 64 * 1024]).unwrap();
        req.headers_mut().insert("x-big", value);
        big.as_mut().project().head.copy(
            req.method(),
            req.uri(),
            req.version(),
            req.headers(),
            req.extensions(),
        );
        let mut long = Kept::take();
        long.as_mut()
            .project()
            .tried
            .extend((0..=POOLED_TRIED as u8).map(|i| SocketAddr::from(([10, 0, 0, i], 80))));
        for kept in [big, long] {
            Kept::recycle(kept);
            assert!(!spare_is_set());
            assert_eq!(pooled(), 0);
        }
    }
}
