//! A retry budget: retries may add at most `ratio` × the requests of the last `ttl`, plus
//! a floor of `min_retries_per_second` (Linkerd's budget; Istio's `retryBudget` plays the
//! same role). It bounds amplification when a whole service fails: with the default 20 %
//! a failing service sees at most ~1.2× its normal load from this proxy, not `1 + attempts`×.
//!
//! [`ConcurrentRetryBudget`] is DestinationRule `trafficPolicy.retryBudget` (Envoy's
//! cluster `circuit_breakers.thresholds.retry_budget`): retries in flight to one
//! destination may not exceed `max(percent × active requests, minRetryConcurrency)`,
//! where the active requests are the destination's requests in flight and waiting
//! (ISTIO.md DR-71..DR-74). A retry over the budget is not attempted: the caller gets the last
//! response, flagged `UO`. It takes the place of the destination's `maxRetries` gate, as
//! Envoy's budget overrides the retry circuit breaker.
//!
//! Our choice: a retry holds its place from the decision to retry until the next
//! decision or the end of the request, as the `maxRetries` gate counts; Envoy counts a
//! retry from scheduling it to its back-off timer firing.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const SLOTS: usize = 10;

/// A shared retry budget; put it in an `Arc` and hand it to every retry layer that should
/// draw from it.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    ttl: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    slot_len: Duration,
    current: usize,
    current_start: Instant,
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
}

impl Window {
    /// Moves the window forward to `now`, clearing slots that fell out of it.
    fn advance(&mut self, now: Instant) {
        let mut steps = 0;
        while now.saturating_duration_since(self.current_start) >= self.slot_len {
            self.current = (self.current + 1) % SLOTS;
            self.requests[self.current] = 0;
            self.retries[self.current] = 0;
            self.current_start += self.slot_len;
            steps += 1;
            if steps >= SLOTS {
                // Everything is stale; jump straight to now.
                self.current_start = now;
                break;
            }
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(0.2, 10, Duration::from_secs(10))
    }
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request (e.g. `0.2`) over a window of `ttl`,
    /// plus `min_per_second` retries per second regardless of traffic.
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> Self {
        let ttl = ttl.max(Duration::from_millis(SLOTS as u64));
        Self {
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            min_per_second,
            ttl,
            window: Mutex::new(Window {
                slot_len: ttl / SLOTS as u32,
                current: 0,
                current_start: Instant::now(),
                requests: [0; SLOTS],
                retries: [0; SLOTS],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one original request (never call it for retries).
    pub fn deposit(&self) {
        let mut w = self.lock();
        w.advance(Instant::now());
        let c = w.current;
        w.requests[c] += 1;
    }

    /// Takes one retry from the budget; `false` when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        let mut w = self.lock();
        w.advance(Instant::now());
        let requests: u64 = w.requests.iter().sum();
        let retries: u64 = w.retries.iter().sum();
        let floor = f64::from(self.min_per_second) * self.ttl.as_secs_f64();
        let allowed = floor + self.ratio * requests as f64;
        if (retries + 1) as f64 <= allowed {
            let c = w.current;
            w.retries[c] += 1;
            true
        } else {
            false
        }
    }
}

/// DestinationRule `retryBudget`: concurrent retries bounded by a share of the
/// destination's active requests, with a floor. Cheap to clone; clones share the count.
#[derive(Clone)]
pub struct ConcurrentRetryBudget {
    /// Share of active requests, 0.0 to 1.0.
    ratio: f64,
    min_concurrency: usize,
    retries: Arc<AtomicUsize>,
    active: Arc<dyn Fn() -> usize + Send + Sync>,
}

impl std::fmt::Debug for ConcurrentRetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrentRetryBudget")
            .field("ratio", &self.ratio)
            .field("min_concurrency", &self.min_concurrency)
            .field("retries", &self.retries.load(Ordering::Relaxed))
            .finish()
    }
}

/// One retry in flight under a [`ConcurrentRetryBudget`]; released when dropped.
#[derive(Debug)]
pub struct BudgetPermit(Arc<AtomicUsize>);

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConcurrentRetryBudget {
    /// Istio's defaults: 20 % and a floor of 3 (Envoy's `budget_percent`,
    /// `min_retry_concurrency`).
    pub const DEFAULT_PERCENT: f64 = 20.0;
    /// The default floor.
    pub const DEFAULT_MIN_CONCURRENCY: u32 = 3;

    /// A budget of `percent` (0–100; out-of-range values are clamped) of the requests
    /// `active` reports, never below `min_concurrency`.
    pub fn new(
        percent: f64,
        min_concurrency: u32,
        active: impl Fn() -> usize + Send + Sync + 'static,
    ) -> Self {
        let percent = if percent.is_finite() {
            percent.clamp(0.0, 100.0)
        } else {
            Self::DEFAULT_PERCENT
        };
        Self {
            ratio: percent / 100.0,
            min_concurrency: min_concurrency as usize,
            retries: Arc::new(AtomicUsize::new(0)),
            active: Arc::new(active),
        }
    }

    /// The retries allowed in flight now.
    pub fn limit(&self) -> usize {
        let share = (self.ratio * (self.active)() as f64) as usize;
        share.max(self.min_concurrency)
    }

    /// Takes a place for one retry, or `None` when the budget is spent.
    pub fn try_acquire(&self) -> Option<BudgetPermit> {
        let before = self.retries.fetch_add(1, Ordering::AcqRel);
        let permit = BudgetPermit(self.retries.clone());
        (before < self.limit()).then_some(permit)
    }

    /// Retries in flight now.
    pub fn active_retries(&self) -> usize {
        self.retries.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_budget_is_a_share_of_active_requests_with_a_floor() {
        let active = Arc::new(AtomicUsize::new(0));
        let seen = active.clone();
        let b = ConcurrentRetryBudget::new(20.0, 3, move || seen.load(Ordering::Relaxed));
        // Few requests: the floor of 3 applies.
        let held: Vec<_> = (0..5).filter_map(|_| b.try_acquire()).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(b.active_retries(), 3);
        drop(held);
        assert_eq!(b.active_retries(), 0);
        // 100 active requests: 20 % of them.
        active.store(100, Ordering::Relaxed);
        let held: Vec<_> = (0..50).filter_map(|_| b.try_acquire()).collect();
        assert_eq!(held.len(), 20);
        // A released place is usable again.
        drop(held.into_iter().next());
        assert!(b.try_acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn budget_bounds_retries_to_ratio_plus_floor() {
        let b = RetryBudget::new(0.2, 1, Duration::from_secs(10));
        for _ in 0..100 {
            b.deposit();
        }
        // 20 % of 100 requests plus 1/s over 10 s.
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 30);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_refills_as_the_window_slides() {
        let b = RetryBudget::new(0.0, 1, Duration::from_secs(10));
        assert_eq!((0..20).filter(|_| b.try_withdraw()).count(), 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            !b.try_withdraw(),
            "the spent retries are still in the window"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!((0..20).filter(|_| b.try_withdraw()).count(), 10);
    }
}
