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
    /// Retries disabled: the inner future as is.
    Passthrough {
        /// The inner future.
        #[pin]
        fut: F,
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
                .field("attempt", &inner.attempt)
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
            ResponseFutureProj::Passthrough { fut } => fut.poll(cx).map_err(Into::into),
            ResponseFutureProj::Retrying { inner } => inner.poll(cx),
        }
    }
}

enum Body {
    /// Boxed: only bodies that must be read pay for the buffering state.
    Buffering(Box<Buffering>),
    Replay(Replay),
    Once(Option<BoxBody>),
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
#[pin_project]
pub struct Attempts<S, F> {
    service: S,
    service_ready: bool,
    policy: Arc<RetryPolicy>,
    budget: Option<Arc<RetryBudget>>,
    gate: Option<RetryLimit>,
    retry_permit: Option<RetryHold>,
    /// The caller's head, sent with the first attempt.
    first: Option<http::request::Parts>,
    /// A copy of it for later attempts, made only when the body can be replayed.
    replay: Option<ReplayHead>,
    body: Body,
    phase: Phase,
    /// Attempts started so far.
    attempt: u32,
    deadline: Option<RequestDeadline>,
    per_try: Option<Duration>,
    tried: Vec<SocketAddr>,
    seed: u64,
    #[pin]
    call: Option<F>,
    /// When the current timer fires; the `Sleep` itself is armed only once something
    /// has to wait, so an attempt answered at once costs no timer.
    timer_at: Option<Instant>,
    #[pin]
    timer: Option<Sleep>,
    timer_kind: Timer,
}

impl<S, F> Attempts<S, F> {
    pub(crate) fn new(
        service: S,
        req: http::Request<BoxBody>,
        policy: Arc<RetryPolicy>,
        budget: Option<Arc<RetryBudget>>,
        gate: Option<RetryLimit>,
        seed: u64,
    ) -> Self {
        let (mut head, body) = req.into_parts();
        if policy.include_attempt_count {
            // Present before the head is copied, so later attempts replace it in place.
            head.headers
                .insert(ATTEMPT_COUNT, HeaderValue::from_static("1"));
        }
        // Set around this call by the deadline layer, or carried by the request.
        let deadline = CallDeadlines::of_parts(&head).request;
        let per_try = policy.effective_per_try_timeout(deadline.map(|d| d.timeout));
        let (body, phase) = match Buffering::start(body, policy.replay_limit) {
            Start::Done(Prepared::Replayable(r)) => (Body::Replay(r), Phase::Dispatch),
            Start::Done(Prepared::Once(b)) => (Body::Once(Some(b)), Phase::Dispatch),
            Start::Read(buffering) => (Body::Buffering(Box::new(buffering)), Phase::Buffering),
        };
        Self {
            service,
            service_ready: true,
            policy,
            budget,
            gate,
            retry_permit: None,
            first: Some(head),
            replay: None,
            body,
            phase,
            attempt: 0,
            deadline,
            per_try,
            tried: Vec::new(),
            seed,
            call: None,
            timer_at: None,
            timer: None,
            timer_kind: Timer::PerTry,
        }
    }
}

/// Sets the timer to fire at `at` (the `Sleep` is created when first polled).
fn arm(timer_at: &mut Option<Instant>, mut timer: Pin<&mut Option<Sleep>>, at: Instant) {
    *timer_at = Some(at);
    if timer.is_some() {
        timer.set(None);
    }
}

/// Removes the timer.
fn disarm(timer_at: &mut Option<Instant>, mut timer: Pin<&mut Option<Sleep>>) {
    *timer_at = None;
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
        let mut this = self.project();
        loop {
            match *this.phase {
                Phase::Buffering => {
                    let Body::Buffering(b) = this.body else {
                        *this.phase = Phase::Dispatch;
                        continue;
                    };
                    let prepared = match b.poll_prepare(cx) {
                        Poll::Ready(r) => r,
                        Poll::Pending => {
                            // Reading the request body counts against the deadline too.
                            if let Some(d) = this.deadline
                                && this.timer_at.is_none()
                            {
                                arm(this.timer_at, this.timer.as_mut(), d.at);
                                *this.timer_kind = Timer::Deadline;
                            }
                            if let Some(t) = poll_timer(*this.timer_at, this.timer.as_mut(), cx) {
                                ready!(t);
                                *this.phase = Phase::Done;
                                return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                            }
                            return Poll::Pending;
                        }
                    };
                    disarm(this.timer_at, this.timer.as_mut());
                    *this.body = match prepared {
                        Ok(Prepared::Replayable(r)) => Body::Replay(r),
                        Ok(Prepared::Once(b)) => Body::Once(Some(b)),
                        Err(e) => {
                            *this.phase = Phase::Done;
                            return Poll::Ready(Err(e));
                        }
                    };
                    *this.phase = Phase::Dispatch;
                }
                Phase::Dispatch => {
                    if !*this.service_ready {
                        // Waiting for readiness is bounded by the deadline.
                        match this.service.poll_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => {
                                *this.phase = Phase::Done;
                                return Poll::Ready(Err(e.into()));
                            }
                            Poll::Pending => {
                                if let Some(t) = poll_timer(*this.timer_at, this.timer.as_mut(), cx)
                                {
                                    ready!(t);
                                    *this.phase = Phase::Done;
                                    return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                                }
                                return Poll::Pending;
                            }
                        }
                    }
                    *this.service_ready = false;
                    *this.attempt += 1;
                    let body = match this.body {
                        Body::Replay(r) => r.body(),
                        Body::Once(b) => b.take().unwrap_or_else(mesh_core::body::empty),
                        Body::Buffering(_) => mesh_core::body::empty(),
                    };
                    let mut req = match this.first.take() {
                        Some(head) => {
                            if matches!(this.body, Body::Replay(_)) {
                                // Kept only when a retry could send it again.
                                *this.replay = Some(ReplayHead::copy(&head));
                            }
                            http::Request::from_parts(head, body)
                        }
                        None => match this.replay.as_ref().map(ReplayHead::request) {
                            Some(Ok(head)) => http::Request::from_parts(head, body),
                            Some(Err(e)) => {
                                *this.phase = Phase::Done;
                                return Poll::Ready(Err(e));
                            }
                            None => {
                                *this.phase = Phase::Done;
                                return Poll::Ready(Err(
                                    "retry without a replayable request".into()
                                ));
                            }
                        },
                    };
                    if this.policy.include_attempt_count && *this.attempt > 1 {
                        req.headers_mut()
                            .insert(ATTEMPT_COUNT, attempt_header(*this.attempt));
                    }
                    if this.policy.retry_ignore_previous_hosts && !this.tried.is_empty() {
                        req.extensions_mut()
                            .insert(PreviousHosts(this.tried.clone()));
                    }
                    // The clock is read only when a per-try timeout applies.
                    let per_try_end = this.per_try.map(|p| Instant::now() + p);
                    let attempt_deadline = per_try_end
                        .map(|end| AttemptDeadline(this.deadline.map_or(end, |d| d.clip(end))));
                    // The attempt's timer: per-try timeout clipped to the deadline.
                    let timer = match (per_try_end, *this.deadline) {
                        (Some(p), Some(d)) if d.at <= p => Some((d.at, Timer::Deadline)),
                        (Some(p), _) => Some((p, Timer::PerTry)),
                        (None, Some(d)) => Some((d.at, Timer::Deadline)),
                        (None, None) => None,
                    };
                    match timer {
                        Some((at, kind)) => {
                            arm(this.timer_at, this.timer.as_mut(), at);
                            *this.timer_kind = kind;
                        }
                        None => disarm(this.timer_at, this.timer.as_mut()),
                    }
                    // The layers inside (the balancer) read both deadlines in their `call`.
                    let deadlines = CallDeadlines {
                        request: *this.deadline,
                        attempt: attempt_deadline,
                    };
                    let service = &mut *this.service;
                    let fut = deadlines.scope(|| service.call(req));
                    this.call.set(Some(fut));
                    *this.phase = Phase::Calling;
                }
                Phase::Calling => {
                    let Some(fut) = this.call.as_mut().as_pin_mut() else {
                        *this.phase = Phase::Done;
                        continue;
                    };
                    let result = match fut.poll(cx) {
                        // The attempt goes first: an answer ready at the deadline wins.
                        Poll::Ready(r) => r.map_err(Into::into),
                        Poll::Pending => {
                            match poll_timer(*this.timer_at, this.timer.as_mut(), cx) {
                                Some(t) => {
                                    ready!(t);
                                    // Dropping the attempt resets the upstream stream.
                                    this.call.set(None);
                                    if *this.timer_kind == Timer::Deadline {
                                        *this.phase = Phase::Done;
                                        return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                                    }
                                    Err(Box::new(PerTryTimeout) as BoxError)
                                }
                                None => return Poll::Pending,
                            }
                        }
                    };
                    this.call.set(None);
                    disarm(this.timer_at, this.timer.as_mut());
                    let decision = decide(
                        result,
                        this.policy,
                        this.body,
                        *this.attempt,
                        this.budget.as_deref(),
                        this.gate.as_ref(),
                        this.retry_permit,
                        this.tried,
                    );
                    match decision {
                        Decision::Return(r) => {
                            *this.phase = Phase::Done;
                            return Poll::Ready(r);
                        }
                        Decision::Retry => {
                            let mut rng =
                                SmallRng::seed_from_u64(*this.seed ^ u64::from(*this.attempt));
                            let wait = this.policy.backoff.delay(*this.attempt, &mut rng);
                            if wait.is_zero() && this.deadline.is_none() {
                                // No wait drawn: retry at once.
                                *this.phase = Phase::Dispatch;
                                continue;
                            }
                            let end = Instant::now() + wait;
                            let (at, kind) = match this.deadline {
                                Some(d) if d.at <= end => (d.at, Timer::Deadline),
                                _ => (end, Timer::Backoff),
                            };
                            arm(this.timer_at, this.timer.as_mut(), at);
                            *this.timer_kind = kind;
                            *this.phase = Phase::Backoff;
                        }
                    }
                }
                Phase::Backoff => {
                    if let Some(t) = poll_timer(*this.timer_at, this.timer.as_mut(), cx) {
                        ready!(t);
                    }
                    disarm(this.timer_at, this.timer.as_mut());
                    if *this.timer_kind == Timer::Deadline {
                        *this.phase = Phase::Done;
                        return Poll::Ready(Err(Box::new(DeadlineExceeded)));
                    }
                    if let Some(d) = this.deadline {
                        // Keep the deadline armed while waiting for readiness.
                        arm(this.timer_at, this.timer.as_mut(), d.at);
                        *this.timer_kind = Timer::Deadline;
                    }
                    *this.phase = Phase::Dispatch;
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
