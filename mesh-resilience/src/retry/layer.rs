//! [`RetryLayer`] and the [`Retry`] service.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::HeaderValue;
use mesh_core::{BoxBody, BoxError};
use rand::RngCore;
use tower_layer::Layer;
use tower_service::Service;

use super::ATTEMPT_COUNT;
use super::budget::{ConcurrentRetryBudget, RetryBudget};
use super::future::{Attempts, ResponseFuture, RetryLimit, Shared};
use super::policy::RetryPolicy;
use crate::deadline::{self, DeadlineLayer};
use crate::limit::RetryGate;

/// Retries requests per a [`RetryPolicy`]. Cheap to clone (the policy is in an `Arc`).
#[derive(Clone, Debug)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
    budget: Option<Arc<RetryBudget>>,
    gate: Option<RetryLimit>,
    seed: Option<u64>,
    deadline: Option<DeadlineLayer>,
}

impl RetryLayer {
    /// A layer applying `policy`.
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
            budget: None,
            gate: None,
            seed: None,
            deadline: None,
        }
    }

    /// Applies the route timeout (and a gRPC caller's `grpc-timeout`) itself, exactly as
    /// `deadline` would right outside this layer: the deadline covers every attempt and
    /// back-off, per-try timeouts are clipped to it (or ignored when at least the route
    /// timeout), the layers inside see it, and a request that reaches it ends in
    /// [`DeadlineExceeded`](mesh_core::error::DeadlineExceeded). One future and one timer
    /// per request instead of two; with retries disabled the layer is a plain deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: DeadlineLayer) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Draws retries from a shared budget.
    #[must_use]
    pub fn with_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Bounds concurrent retries with the destination's `maxRetries` gate.
    #[must_use]
    pub fn with_retry_gate(mut self, gate: RetryGate) -> Self {
        self.gate = Some(RetryLimit::Gate(gate));
        self
    }

    /// Bounds concurrent retries with the destination's DestinationRule `retryBudget`
    /// instead of its `maxRetries` gate.
    #[must_use]
    pub fn with_concurrent_budget(mut self, budget: ConcurrentRetryBudget) -> Self {
        self.gate = Some(RetryLimit::Budget(budget));
        self
    }

    /// Fixes the seed of the back-off jitter (tests, benches): the waits of the n-th
    /// request through the service are then always the same.
    #[must_use]
    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let seed = self.seed.unwrap_or_else(|| rand::rng().next_u64());
        Retry {
            inner,
            shared: Arc::new(Shared {
                policy: (*self.policy).clone(),
                budget: self.budget.clone(),
                gate: self.gate.clone(),
            }),
            seed,
            clones: Arc::new(AtomicU64::new(1)),
            stream: seed,
            requests: 0,
            deadline: self.deadline.map(|d| d.timeout()),
        }
    }
}

/// The service produced by [`RetryLayer`].
#[derive(Debug)]
pub struct Retry<S> {
    inner: S,
    /// The policy and the limits, shared with every request's future.
    shared: Arc<Shared>,
    seed: u64,
    /// Numbers the clones, so clones never share a jitter sequence.
    clones: Arc<AtomicU64>,
    /// This clone's jitter seed: each request's is drawn from it and the request's
    /// number, only when the request is retried.
    stream: u64,
    requests: u64,
    /// The route timeout applied here (`Some(None)`: only a `grpc-timeout`), when the
    /// layer was given one with [`RetryLayer::with_deadline`].
    deadline: Option<Option<std::time::Duration>>,
}

impl<S: Clone> Clone for Retry<S> {
    /// The clone gets its own jitter seed.
    fn clone(&self) -> Self {
        let n = self.clones.fetch_add(1, Ordering::Relaxed);
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            seed: self.seed,
            clones: self.clones.clone(),
            stream: crate::mix_seed(self.seed, n),
            requests: 0,
            deadline: self.deadline,
        }
    }
}

impl<S, RB> Service<http::Request<BoxBody>> for Retry<S>
where
    S: Service<http::Request<BoxBody>, Response = http::Response<RB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: http::Request<BoxBody>) -> Self::Future {
        let policy = &self.shared.policy;
        if !policy.is_enabled() {
            // The route's deadline, when this layer applies it.
            let bounded = self
                .deadline
                .and_then(|timeout| deadline::deadlines_for(timeout, &req));
            if policy.include_attempt_count {
                req.headers_mut()
                    .insert(ATTEMPT_COUNT, HeaderValue::from_static("1"));
            }
            let fut = match bounded {
                None => deadline::ResponseFuture::Passthrough {
                    fut: self.inner.call(req),
                },
                Some((deadlines, at, _)) => deadline::ResponseFuture::Timed {
                    fut: deadlines.scope(|| self.inner.call(req)),
                    at,
                    sleep: None,
                },
            };
            return ResponseFuture::Passthrough { fut };
        }
        if let Some(budget) = &self.shared.budget {
            budget.deposit();
        }
        // The ready service goes into the future; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        self.requests = self.requests.wrapping_add(1);
        let seed = (self.stream, self.requests);
        let mut attempts = Attempts::new(service, self.shared.clone(), seed);
        match attempts.start(&mut req, self.deadline) {
            // Called here, so the request goes to the inner service without a move.
            Some(deadlines) => {
                let call = {
                    let _current = deadlines.enter();
                    attempts.service().call(req)
                };
                attempts.set_call(call);
            }
            None => attempts.read_first(req),
        }
        ResponseFuture::Retrying { inner: attempts }
    }
}
