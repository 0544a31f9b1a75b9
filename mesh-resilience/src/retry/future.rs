//! The retry state machine: buffer the body, then attempt, classify, back off, repeat.

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
use super::head::ReplayHead;
use super::policy::RetryPolicy;
use super::replay::{Buffering, Prepared, Replay, Start};
use super::{ATTEMPT_COUNT, RetriesExhausted};
use crate::balance::{EndpointFailed, PreviousHosts};
use crate::deadline::{AttemptDeadline, CallDeadlines, RequestDeadline};
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

enum Body {
    /// Being read, with the caller's head that the first attempt waits for. Boxed: only
    /// requests whose body must be read pay for this state.
    Buffering(Box<Reading>),
    /// Buffered whole: every attempt gets a copy.
    Replay(Replay),
    /// Too large to keep: the first attempt took it, nothing can be replayed.
    Once,
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
/// and is never stored here; only the copy kept for retries is.
#[pin_project]
pub struct Attempts<S, F> {
    state: State<S>,
    #[pin]
    call: Option<F>,
    /// Created from `state.timer_at` only once something has to wait, so an attempt
    /// answered at once costs no timer; dropped whenever `timer_at` changes.
    #[pin]
    timer: Option<Sleep>,
}

/// Everything of [`Attempts`] but the pinned futures.
struct State<S> {
    service: S,
    service_ready: bool,
    policy: Arc<RetryPolicy>,
    budget: Option<Arc<RetryBudget>>,
    gate: Option<RetryLimit>,
    retry_permit: Option<RetryHold>,
    /// A copy of the caller's head for later attempts, made only when the body can be
    /// replayed.
    replay: Option<ReplayHead>,
    body: Body,
    phase: Phase,
    /// Attempts started so far.
    attempt: u32,
    deadline: Option<RequestDeadline>,
    per_try: Option<Duration>,
    tried: Vec<SocketAddr>,
    seed: u64,
    /// When the current timer fires.
    timer_at: Option<Instant>,
    timer_kind: Timer,
}

impl<S, F> Attempts<S, F> {
    /// Starts the attempts of `req` on `service`, which must be ready: the first attempt
    /// is called at once unless the body has to be read first.
    #[inline]
    pub(crate) fn new<RB, E>(
        service: S,
        req: http::Request<BoxBody>,
        policy: Arc<RetryPolicy>,
        budget: Option<Arc<RetryBudget>>,
        gate: Option<RetryLimit>,
        seed: u64,
        bounded: Option<(RequestDeadline, Instant)>,
    ) -> Self
    where
        S: Service<http::Request<BoxBody>, Response = http::Response<RB>, Future = F, Error = E>,
    {
        let (mut head, body) = req.into_parts();
        if policy.include_attempt_count {
            // Present before the head is copied, so later attempts replace it in place.
            head.headers
                .insert(ATTEMPT_COUNT, HeaderValue::from_static("1"));
        }
        // Applied by the layer (and then taken now), or set around this call by the
        // deadline layer, or carried by the request.
        let (deadline, now) = match bounded {
            Some((deadline, now)) => (Some(deadline), Some(now)),
            None => (CallDeadlines::of_parts(&head).request, None),
        };
        let per_try = policy.effective_per_try_timeout(deadline.map(|d| d.timeout));
        let start = Buffering::start(body, policy.replay_limit);
        let mut state = State {
            service,
            service_ready: true,
            policy,
            budget,
            gate,
            retry_permit: None,
            replay: None,
            body: Body::Once,
            phase: Phase::Dispatch,
            attempt: 0,
            deadline,
            per_try,
            tried: Vec::new(),
            seed,
            timer_at: None,
            timer_kind: Timer::PerTry,
        };
        let call = match start {
            Start::Done(prepared) => Some(state.first_attempt(head, prepared, now)),
            Start::Read(buffering) => {
                state.body = Body::Buffering(Box::new(Reading { buffering, head }));
                state.phase = Phase::Buffering;
                None
            }
        };
        Self {
            state,
            call,
            timer: None,
        }
    }
}

impl<S> State<S> {
    /// Calls the first attempt with the caller's `head` and its prepared body, keeping a
    /// copy of the head when the body can be replayed.
    /// `now`, when given, is the current instant (read by the caller).
    #[inline]
    fn first_attempt<RB, E>(
        &mut self,
        head: http::request::Parts,
        prepared: Prepared,
        now: Option<Instant>,
    ) -> S::Future
    where
        S: Service<http::Request<BoxBody>, Response = http::Response<RB>, Error = E>,
    {
        let body = match prepared {
            Prepared::Replayable(replay) => {
                self.replay = Some(ReplayHead::copy(&head));
                let body = replay.body();
                self.body = Body::Replay(replay);
                body
            }
            Prepared::Once(body) => {
                self.body = Body::Once;
                body
            }
        };
        self.call_attempt(http::Request::from_parts(head, body), now)
    }

    /// Calls the next attempt with `req` on the ready service: numbers it, names the
    /// hosts already tried, sets its timer (the per-try timeout clipped to the deadline)
    /// and makes its deadlines current for the layers inside. Whoever holds the `Sleep`
    /// must drop it, as `timer_at` changed.
    fn call_attempt<RB, E>(
        &mut self,
        mut req: http::Request<BoxBody>,
        now: Option<Instant>,
    ) -> S::Future
    where
        S: Service<http::Request<BoxBody>, Response = http::Response<RB>, Error = E>,
    {
        self.service_ready = false;
        self.attempt += 1;
        if self.policy.include_attempt_count && self.attempt > 1 {
            req.headers_mut()
                .insert(ATTEMPT_COUNT, attempt_header(self.attempt));
        }
        if self.policy.retry_ignore_previous_hosts && !self.tried.is_empty() {
            req.extensions_mut()
                .insert(PreviousHosts(self.tried.clone()));
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
        let deadlines = CallDeadlines {
            request: self.deadline,
            attempt: attempt_deadline,
        };
        let service = &mut self.service;
        deadlines.scope(|| service.call(req))
    }

    /// Sets the timer to fire at `at`.
    fn arm(&mut self, timer: Pin<&mut Option<Sleep>>, at: Instant, kind: Timer) {
        self.timer_at = Some(at);
        self.timer_kind = kind;
        drop_sleep(timer);
    }

    /// Removes the timer.
    fn disarm(&mut self, timer: Pin<&mut Option<Sleep>>) {
        self.timer_at = None;
        drop_sleep(timer);
    }
}

/// Drops the `Sleep`, if one was created: the timer changed.
fn drop_sleep(mut timer: Pin<&mut Option<Sleep>>) {
    if timer.is_some() {
        timer.set(None);
    }
}

/// Polls the timer, creating its `Sleep` on first use; `None` when no timer is set.
fn poll_timer(
    timer_at: Option<Instant>,
    mut timer: Pin<&mut Option<Sleep>>,
    cx: &mut Context<'_>,
) -> Option<Poll<()>> {
    let at = timer_at?;
    if timer.is_none() {
        timer.set(Some(sleep_until(at)));
    }
    timer.as_pin_mut().map(|t| t.poll(cx))
}

fn attempt_header(n: u32) -> HeaderValue {
    match n {
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
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
        let mut timer = this.timer;
        loop {
            match state.phase {
                Phase::Buffering => {
                    let Body::Buffering(reading) = &mut state.body else {
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
                                state.arm(timer.as_mut(), d.at, Timer::Deadline);
                            }
                            if let Some(t) = poll_timer(state.timer_at, timer.as_mut(), cx) {
                                ready!(t);
                                state.phase = Phase::Done;
                                return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                            }
                            return Poll::Pending;
                        }
                    };
                    state.disarm(timer.as_mut());
                    let Body::Buffering(reading) = std::mem::replace(&mut state.body, Body::Once)
                    else {
                        state.phase = Phase::Done;
                        return Poll::Ready(Err("retry future lost its request".into()));
                    };
                    match prepared {
                        Ok(prepared) => {
                            // The service was ready when the request came: first attempt.
                            let fut = state.first_attempt(reading.head, prepared, None);
                            call.set(Some(fut));
                            drop_sleep(timer.as_mut());
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
                                if let Some(t) = poll_timer(state.timer_at, timer.as_mut(), cx) {
                                    ready!(t);
                                    state.phase = Phase::Done;
                                    return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                                }
                                return Poll::Pending;
                            }
                        }
                        state.service_ready = true;
                    }
                    let (Body::Replay(replay), Some(head)) = (&state.body, &state.replay) else {
                        state.phase = Phase::Done;
                        return Poll::Ready(Err("retry without a replayable request".into()));
                    };
                    let body = replay.body();
                    let req = match head.request() {
                        Ok(head) => http::Request::from_parts(head, body),
                        Err(e) => {
                            state.phase = Phase::Done;
                            return Poll::Ready(Err(e));
                        }
                    };
                    let fut = state.call_attempt(req, None);
                    call.set(Some(fut));
                    drop_sleep(timer.as_mut());
                }
                Phase::Calling => {
                    let Some(fut) = call.as_mut().as_pin_mut() else {
                        state.phase = Phase::Done;
                        continue;
                    };
                    let result = match fut.poll(cx) {
                        // The attempt goes first: an answer ready at the deadline wins.
                        Poll::Ready(r) => r.map_err(Into::into),
                        Poll::Pending => match poll_timer(state.timer_at, timer.as_mut(), cx) {
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
                    state.disarm(timer.as_mut());
                    let decision = decide(
                        result,
                        &state.policy,
                        &state.body,
                        state.attempt,
                        state.budget.as_deref(),
                        state.gate.as_ref(),
                        &mut state.retry_permit,
                        &mut state.tried,
                    );
                    match decision {
                        Decision::Return(r) => {
                            state.phase = Phase::Done;
                            return Poll::Ready(r);
                        }
                        Decision::Retry => {
                            let mut rng =
                                SmallRng::seed_from_u64(state.seed ^ u64::from(state.attempt));
                            let wait = state.policy.backoff.delay(state.attempt, &mut rng);
                            if wait.is_zero() && state.deadline.is_none() {
                                // No wait drawn: retry at once.
                                state.phase = Phase::Dispatch;
                                continue;
                            }
                            let end = Instant::now() + wait;
                            let (at, kind) = match state.deadline {
                                Some(d) if d.at <= end => (d.at, Timer::Deadline),
                                _ => (end, Timer::Backoff),
                            };
                            state.arm(timer.as_mut(), at, kind);
                            state.phase = Phase::Backoff;
                        }
                    }
                }
                Phase::Backoff => {
                    if let Some(t) = poll_timer(state.timer_at, timer.as_mut(), cx) {
                        ready!(t);
                    }
                    state.disarm(timer.as_mut());
                    if state.timer_kind == Timer::Deadline {
                        state.phase = Phase::Done;
                        return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                    }
                    if let Some(d) = state.deadline {
                        // Keep the deadline armed while waiting for readiness.
                        state.arm(timer.as_mut(), d.at, Timer::Deadline);
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

/// Decides what to do with the result of attempt number `attempt`.
#[allow(clippy::too_many_arguments)]
fn decide<RB>(
    mut result: Result<http::Response<RB>, BoxError>,
    policy: &RetryPolicy,
    body: &Body,
    attempt: u32,
    budget: Option<&RetryBudget>,
    gate: Option<&RetryLimit>,
    retry_permit: &mut Option<RetryHold>,
    tried: &mut Vec<SocketAddr>,
) -> Decision<Result<http::Response<RB>, BoxError>> {
    let outcome = match &result {
        Ok(res) => Outcome::from_response(res),
        Err(e) => Outcome::from_error(e),
    };
    let headers = result.as_ref().ok().map(http::Response::headers);
    if !policy.should_retry(&outcome, headers) {
        return Decision::Return(result);
    }
    if !matches!(body, Body::Replay(_)) {
        // The body was too large to keep: the request cannot be replayed (VS-67).
        return Decision::Return(result);
    }
    if attempt > policy.attempts {
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
    if let Some(gate) = gate {
        match gate.try_acquire() {
            Some(permit) => *retry_permit = Some(permit),
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
    if budget.is_some_and(|b| !b.try_withdraw()) {
        *retry_permit = None;
        return Decision::Return(result);
    }
    let host = match &result {
        Ok(res) => res.extensions().get::<UpstreamHost>().map(|h| h.0),
        Err(e) => find_cause::<EndpointFailed>(e.as_ref()).map(EndpointFailed::address),
    };
    if let Some(host) = host
        && !tried.contains(&host)
    {
        tried.push(host);
    }
    Decision::Retry
}
