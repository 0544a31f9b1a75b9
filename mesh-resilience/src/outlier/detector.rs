//! The outlier detector: per-host consecutive-error counters, inline ejection, interval
//! sweeps for un-ejection and multiplier decay, the max-ejection cap and panic mode.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mesh_core::Outcome;
use tokio::time::Instant;

use super::config::OutlierConfig;

/// Detects and ejects outlier hosts of one destination. Share it in an `Arc`.
///
/// Recording an outcome is lock-free unless it crosses a threshold. Sweeps run lazily:
/// whoever picks hosts (the balancer, when a pick meets an ejected host) calls
/// [`sweep_if_due`](Self::sweep_if_due), which replays every sweep that fell due since
/// the last one, and an ejection does the same first; so the result is the same as with
/// a timer firing every `interval`, without a background task. Until then,
/// [`HostHealth::is_ejected`] and [`ejected_count`](Self::ejected_count) may still show
/// an ejection whose sweep is due.
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierConfig,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the next sweep (a lock-free "is a sweep due?").
    next_sweep_ns: AtomicU64,
    total: AtomicUsize,
    ejected: AtomicUsize,
    ejections: AtomicU64,
    overflows: AtomicU64,
    /// Hosts whose ejection multiplier is above 0 (ejected or still decaying). While it
    /// is 0 a sweep would change nothing, so none runs and no clock is read.
    active: AtomicUsize,
    registry: Mutex<Registry>,
}

#[derive(Debug)]
struct Registry {
    hosts: Vec<Arc<HostState>>,
    next_sweep: Instant,
}

/// The health record of one host, handed out by [`OutlierDetector::register`].
#[derive(Clone, Debug)]
pub struct HostHealth(Arc<HostState>);

#[derive(Debug, Default)]
struct HostState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    ejected: AtomicBool,
    /// Only touched with the registry lock held.
    ejection: Mutex<Ejection>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Ejection {
    multiplier: u32,
    ejected_at: Option<Instant>,
    unejected_at: Option<Instant>,
}

impl HostHealth {
    /// Whether the host is ejected now.
    pub fn is_ejected(&self) -> bool {
        self.0.ejected.load(Ordering::Acquire)
    }

    /// The host's ejection multiplier `k` (DR-34).
    pub fn ejection_multiplier(&self) -> u32 {
        lock(&self.0.ejection).multiplier
    }

    fn reset_counters(&self) {
        self.0.consecutive_5xx.store(0, Ordering::Relaxed);
        self.0.consecutive_gateway.store(0, Ordering::Relaxed);
        self.0.consecutive_local.store(0, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds one to `counter`; true when that makes it reach `threshold` (then it restarts).
fn bump(counter: &AtomicU32, threshold: u32) -> bool {
    if threshold == 0 {
        return false;
    }
    if counter.fetch_add(1, Ordering::Relaxed) + 1 == threshold {
        counter.store(0, Ordering::Relaxed);
        return true;
    }
    false
}

fn clear(counter: &AtomicU32) {
    if counter.load(Ordering::Relaxed) != 0 {
        counter.store(0, Ordering::Relaxed);
    }
}

/// Nanoseconds as u64 (no division, unlike milliseconds: this is on the pick path).
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

impl OutlierDetector {
    /// A detector with `config`; the first sweep is one `interval` from now.
    pub fn new(config: OutlierConfig) -> Self {
        let epoch = Instant::now();
        let interval = config.interval.max(Duration::from_nanos(1));
        Self {
            next_sweep_ns: AtomicU64::new(nanos(interval)),
            registry: Mutex::new(Registry {
                hosts: Vec::new(),
                next_sweep: epoch + interval,
            }),
            config: OutlierConfig { interval, ..config },
            epoch,
            total: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            ejections: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        }
    }

    /// The settings.
    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// Adds a host; it counts towards the total of the max-ejection cap.
    pub fn register(&self) -> HostHealth {
        let host = Arc::new(HostState::default());
        let mut reg = lock(&self.registry);
        reg.hosts.push(host.clone());
        self.total.fetch_add(1, Ordering::AcqRel);
        HostHealth(host)
    }

    /// Removes a host (it left the destination).
    pub fn deregister(&self, host: &HostHealth) {
        let mut reg = lock(&self.registry);
        let before = reg.hosts.len();
        reg.hosts.retain(|h| !Arc::ptr_eq(h, &host.0));
        if reg.hosts.len() < before {
            self.total.fetch_sub(1, Ordering::AcqRel);
            if host.0.ejected.swap(false, Ordering::AcqRel) {
                self.ejected.fetch_sub(1, Ordering::AcqRel);
            }
            if lock(&host.0.ejection).multiplier > 0 {
                self.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Number of registered hosts.
    pub fn host_count(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Number of hosts ejected now.
    pub fn ejected_count(&self) -> usize {
        self.ejected.load(Ordering::Acquire)
    }

    /// Ejections performed so far.
    pub fn ejections_total(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Ejections the max-ejection cap prevented (Envoy's `ejections_overflow`).
    pub fn ejections_overflow(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Whether panic mode applies now: fewer than `minHealthPercent` of the hosts are
    /// healthy, so the balancer uses all of them, ejected or not (DR-39).
    pub fn in_panic(&self) -> bool {
        let total = self.host_count();
        let ejected = self.ejected_count().min(total);
        self.config.in_panic(total - ejected, total)
    }

    /// Records the outcome of one request to `host` (DR-31). Returns true when this
    /// outcome ejected the host.
    pub fn record(&self, host: &HostHealth, outcome: &Outcome) -> bool {
        if outcome.is_local_decision() {
            // Overflow, deadline and similar say nothing about the host.
            return false;
        }
        let h = &host.0;
        let c = &self.config;
        let trip = if c.split_external_local_origin_errors && outcome.is_local_origin_failure() {
            bump(&h.consecutive_local, c.consecutive_local_origin_failures)
        } else if outcome.is_5xx() {
            let gateway = if outcome.is_gateway_error() {
                bump(&h.consecutive_gateway, c.consecutive_gateway_errors)
            } else {
                // A 5xx that is not a gateway error breaks the gateway-error streak.
                clear(&h.consecutive_gateway);
                false
            };
            let five_xx = bump(&h.consecutive_5xx, c.consecutive_5xx_errors);
            if outcome.status().is_some() {
                // The host answered: its connection works.
                clear(&h.consecutive_local);
            }
            gateway | five_xx
        } else {
            clear(&h.consecutive_5xx);
            clear(&h.consecutive_gateway);
            clear(&h.consecutive_local);
            false
        };
        trip && self.eject(host, Instant::now())
    }

    /// Ejects `host` at `now` unless it is ejected already or the cap forbids it (DR-36).
    fn eject(&self, host: &HostHealth, now: Instant) -> bool {
        let mut reg = lock(&self.registry);
        if reg.next_sweep <= now {
            // Sweeps run lazily: replay those that fell due before this ejection, so the
            // host's state, the cap and the multiplier are those a timer would give.
            self.sweep_locked(&mut reg, now);
        }
        let h = &host.0;
        if h.ejected.load(Ordering::Acquire) {
            return false;
        }
        let total = self.host_count();
        if !self.config.may_eject(self.ejected_count(), total) {
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut e = lock(&h.ejection);
        if e.multiplier == 0 {
            self.active.fetch_add(1, Ordering::AcqRel);
        }
        // The multiplier grows while k × base < max + base (DR-34), so the ejection time
        // goes base, 2 × base, … and stays at the cap.
        let base = self.config.base_ejection_time;
        if base.saturating_mul(e.multiplier) < self.config.max_ejection_time().saturating_add(base)
        {
            e.multiplier += 1;
        }
        e.ejected_at = Some(now);
        h.ejected.store(true, Ordering::Release);
        self.ejected.fetch_add(1, Ordering::AcqRel);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(multiplier = e.multiplier, "outlier ejected");
        true
    }

    /// Whether any host is ejected or has a decaying multiplier, i.e. whether a sweep
    /// could change anything. Callers skip reading the clock when it is false.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Runs every interval sweep that fell due up to `now` (DR-34, DR-35). Cheap when none is due.
    pub fn sweep_if_due(&self, now: Instant) {
        let now_ns = nanos(now.saturating_duration_since(self.epoch));
        if now_ns < self.next_sweep_ns.load(Ordering::Acquire) {
            return;
        }
        self.sweep_locked(&mut lock(&self.registry), now);
    }

    /// Runs every sweep due up to `now` with the registry locked.
    fn sweep_locked(&self, reg: &mut Registry, now: Instant) {
        let interval = self.config.interval;
        let mut at = reg.next_sweep;
        while at <= now {
            let quiet = self.sweep_at(reg, at);
            at += interval;
            if quiet && at <= now {
                // Nothing is ejected and every multiplier is 0: later sweeps change nothing.
                let behind =
                    now.saturating_duration_since(at).as_nanos() / interval.as_nanos().max(1);
                at += interval.saturating_mul(u32::try_from(behind).unwrap_or(u32::MAX));
            }
        }
        reg.next_sweep = at;
        self.next_sweep_ns.store(
            nanos(at.saturating_duration_since(self.epoch)),
            Ordering::Release,
        );
    }

    /// One sweep at time `at`; returns whether there was nothing left to do.
    fn sweep_at(&self, reg: &Registry, at: Instant) -> bool {
        let mut quiet = true;
        for h in &reg.hosts {
            let mut e = lock(&h.ejection);
            if h.ejected.load(Ordering::Acquire) {
                quiet = false;
                let ejected_at = e.ejected_at.unwrap_or(at);
                // Un-eject at the first sweep after the ejection time elapsed (DR-35).
                if at >= ejected_at + self.config.ejection_time(e.multiplier) {
                    h.ejected.store(false, Ordering::Release);
                    self.ejected.fetch_sub(1, Ordering::AcqRel);
                    e.unejected_at = Some(at);
                    HostHealth(h.clone()).reset_counters();
                    tracing::debug!("outlier un-ejected");
                }
            } else if e.multiplier > 0 {
                quiet = false;
                // Healthy for a full interval since un-ejection: the multiplier decays.
                if e.unejected_at
                    .is_none_or(|u| at >= u + self.config.interval)
                {
                    e.multiplier -= 1;
                    if e.multiplier == 0 {
                        self.active.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
        }
        quiet
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::error::ResetReason;
    use proptest::prelude::*;

    fn resp(status: u16) -> Outcome {
        Outcome::Response {
            status,
            grpc_status: None,
        }
    }

    fn detector(config: OutlierConfig, n: usize) -> (OutlierDetector, Vec<HostHealth>) {
        let d = OutlierDetector::new(config);
        let hosts = (0..n).map(|_| d.register()).collect();
        (d, hosts)
    }

    fn all_ejectable() -> OutlierConfig {
        OutlierConfig {
            max_ejection_percent: 100,
            ..OutlierConfig::default()
        }
    }

    fn fail(d: &OutlierDetector, h: &HostHealth, n: u32) {
        for _ in 0..n {
            d.record(h, &resp(500));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_inline_at_the_nth_consecutive_5xx() {
        let (d, hosts) = detector(all_ejectable(), 2);
        fail(&d, &hosts[0], 4);
        assert!(!hosts[0].is_ejected());
        assert!(d.record(&hosts[0], &resp(503)));
        assert!(hosts[0].is_ejected() && !hosts[1].is_ejected());
        assert_eq!(d.ejected_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_streak() {
        let (d, hosts) = detector(all_ejectable(), 1);
        fail(&d, &hosts[0], 4);
        d.record(&hosts[0], &resp(404));
        fail(&d, &hosts[0], 4);
        assert!(!hosts[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn local_decisions_are_ignored() {
        let (d, hosts) = detector(all_ejectable(), 1);
        for _ in 0..10 {
            d.record(&hosts[0], &Outcome::Overflow);
            d.record(&hosts[0], &Outcome::DeadlineExceeded);
        }
        assert!(!hosts[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn local_origin_failures_count_as_5xx_and_gateway_errors() {
        let cfg = OutlierConfig {
            consecutive_5xx_errors: 0,
            consecutive_gateway_errors: 3,
            ..all_ejectable()
        };
        let (d, hosts) = detector(cfg, 1);
        d.record(&hosts[0], &Outcome::ConnectFailure);
        d.record(&hosts[0], &Outcome::PerTryTimeout);
        assert!(d.record(
            &hosts[0],
            &Outcome::Reset {
                reason: ResetReason::RemoteReset,
                request_sent: true
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_500_breaks_the_gateway_error_streak() {
        let cfg = OutlierConfig {
            consecutive_5xx_errors: 0,
            consecutive_gateway_errors: 2,
            ..all_ejectable()
        };
        let (d, hosts) = detector(cfg, 1);
        d.record(&hosts[0], &resp(502));
        d.record(&hosts[0], &resp(500));
        d.record(&hosts[0], &resp(503));
        assert!(!hosts[0].is_ejected());
        d.record(&hosts[0], &resp(504));
        assert!(hosts[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn split_mode_counts_local_origin_failures_separately() {
        let cfg = OutlierConfig {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failures: 2,
            consecutive_5xx_errors: 2,
            ..all_ejectable()
        };
        let (d, hosts) = detector(cfg, 2);
        d.record(&hosts[0], &Outcome::ConnectFailure);
        d.record(&hosts[0], &resp(500));
        d.record(&hosts[0], &Outcome::ConnectFailure);
        assert!(
            !hosts[0].is_ejected(),
            "the response reset the local-origin streak"
        );
        d.record(&hosts[1], &Outcome::ConnectFailure);
        d.record(&hosts[1], &Outcome::ConnectFailure);
        assert!(hosts[1].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_each_ejection_and_is_capped() {
        let (d, hosts) = detector(all_ejectable(), 1);
        let h = &hosts[0];
        let start = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..13 {
            fail(&d, h, 5);
            assert!(h.is_ejected());
            let ejected_at = Instant::now();
            // Step sweep by sweep until the host is back.
            while h.is_ejected() {
                tokio::time::advance(Duration::from_secs(10)).await;
                d.sweep_if_due(Instant::now());
            }
            seen.push((Instant::now() - ejected_at).as_secs());
        }
        // Ejected at sweep boundaries, so each ejection lasts exactly k × 30 s up to 300 s.
        assert_eq!(
            seen,
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300, 300]
        );
        assert!(Instant::now() > start);
        assert_eq!(h.ejection_multiplier(), 11);
    }

    #[tokio::test(start_paused = true)]
    async fn unejection_happens_at_the_first_sweep_after_the_ejection_time() {
        let (d, hosts) = detector(all_ejectable(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        fail(&d, &hosts[0], 5);
        // Ejected at t=5 for 30 s; sweeps at 10, 20, 30, 40: back at t=40.
        tokio::time::advance(Duration::from_secs(34)).await;
        d.sweep_if_due(Instant::now());
        assert!(hosts[0].is_ejected());
        tokio::time::advance(Duration::from_secs(1)).await;
        d.sweep_if_due(Instant::now());
        assert!(!hosts[0].is_ejected());
        // Counters were reset on un-ejection: four more errors do not eject.
        fail(&d, &hosts[0], 4);
        assert!(!hosts[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn sweeps_skipped_while_idle_keep_the_interval_grid() {
        let (d, hosts) = detector(all_ejectable(), 2);
        assert!(!d.is_active());
        // Nothing happens for a long time: no sweep needs to run.
        tokio::time::advance(Duration::from_secs(100_005)).await;
        fail(&d, &hosts[0], 5);
        assert!(d.is_active());
        // Ejected at 100 005 s for 30 s: back at the sweep of 100 040 s, not earlier.
        tokio::time::advance(Duration::from_secs(34)).await;
        d.sweep_if_due(Instant::now());
        assert!(hosts[0].is_ejected());
        tokio::time::advance(Duration::from_secs(1)).await;
        d.sweep_if_due(Instant::now());
        assert!(!hosts[0].is_ejected());
        // The multiplier decays one interval later and the detector goes idle again.
        tokio::time::advance(Duration::from_secs(10)).await;
        d.sweep_if_due(Instant::now());
        assert_eq!(hosts[0].ejection_multiplier(), 0);
        assert!(!d.is_active());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_first_replays_the_sweeps_that_fell_due() {
        let (d, hosts) = detector(all_ejectable(), 2);
        fail(&d, &hosts[0], 5);
        assert_eq!(hosts[0].ejection_multiplier(), 1);
        // No sweep runs for 100 s: with a timer, the host came back at t=30 and its
        // multiplier decayed at t=40, so these errors eject it anew for the base time.
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(hosts[0].is_ejected(), "nothing swept yet");
        fail(&d, &hosts[0], 4);
        assert!(d.record(&hosts[0], &Outcome::ConnectFailure));
        assert_eq!(hosts[0].ejection_multiplier(), 1);
        assert_eq!((d.ejected_count(), d.ejections_total()), (1, 2));
        // Ejected at t=100 for 30 s: back at the sweep of t=130.
        tokio::time::advance(Duration::from_secs(29)).await;
        d.sweep_if_due(Instant::now());
        assert!(hosts[0].is_ejected());
        tokio::time::advance(Duration::from_secs(1)).await;
        d.sweep_if_due(Instant::now());
        assert!(!hosts[0].is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_host_recovers_its_base_ejection_time() {
        let (d, hosts) = detector(all_ejectable(), 1);
        let h = &hosts[0];
        for _ in 0..3 {
            fail(&d, h, 5);
            while h.is_ejected() {
                tokio::time::advance(Duration::from_secs(10)).await;
                d.sweep_if_due(Instant::now());
            }
        }
        assert_eq!(h.ejection_multiplier(), 3);
        // Three healthy intervals later (caught up lazily in one call) it is back to 0.
        tokio::time::advance(Duration::from_secs(30)).await;
        d.sweep_if_due(Instant::now());
        assert_eq!(h.ejection_multiplier(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cap_allows_one_of_three_hosts_at_50_percent() {
        let cfg = OutlierConfig {
            max_ejection_percent: 50,
            ..OutlierConfig::default()
        };
        let (d, hosts) = detector(cfg, 3);
        for h in &hosts {
            fail(&d, h, 5);
        }
        assert_eq!(d.ejected_count(), 1);
        assert_eq!(d.ejections_overflow(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn default_cap_ejects_one_of_ten_and_none_of_nine() {
        for (n, want) in [(10, 1), (9, 0), (20, 2)] {
            let (d, hosts) = detector(OutlierConfig::default(), n);
            for h in &hosts {
                fail(&d, h, 5);
            }
            assert_eq!(d.ejected_count(), want, "{n} hosts");
        }
        let one = OutlierConfig {
            always_eject_one_host: true,
            ..OutlierConfig::default()
        };
        let (d, hosts) = detector(one, 3);
        for h in &hosts {
            fail(&d, h, 5);
        }
        assert_eq!(d.ejected_count(), 1, "always_eject_one_host");
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_below_min_health_percent() {
        let cfg = OutlierConfig {
            min_health_percent: 50,
            ..all_ejectable()
        };
        let (d, hosts) = detector(cfg, 4);
        fail(&d, &hosts[0], 5);
        fail(&d, &hosts[1], 5);
        assert!(!d.in_panic(), "2 of 4 healthy is exactly 50 %");
        fail(&d, &hosts[2], 5);
        assert!(d.in_panic());
    }

    #[tokio::test(start_paused = true)]
    async fn deregistering_an_ejected_host_frees_the_cap() {
        let (d, hosts) = detector(all_ejectable(), 2);
        fail(&d, &hosts[0], 5);
        d.deregister(&hosts[0]);
        assert_eq!((d.host_count(), d.ejected_count()), (1, 0));
    }

    proptest! {
        #[test]
        fn ejected_hosts_never_exceed_the_cap(
            n in 1usize..40,
            pct in 0u32..=100,
            failures in proptest::collection::vec((0usize..40, any::<bool>()), 0..400),
        ) {
            let cfg = OutlierConfig {
                consecutive_5xx_errors: 2,
                max_ejection_percent: pct,
                ..OutlierConfig::default()
            };
            let (d, hosts) = detector(cfg, n);
            let cap = n * pct as usize / 100;
            for (i, fails) in failures {
                let h = &hosts[i % n];
                d.record(h, &if fails { resp(503) } else { resp(200) });
                prop_assert!(d.ejected_count() <= cap);
                let flagged = hosts.iter().filter(|h| h.is_ejected()).count();
                prop_assert_eq!(flagged, d.ejected_count());
            }
        }

        #[test]
        fn bookkeeping_stays_consistent_through_ejections_and_sweeps(
            ops in proptest::collection::vec((0usize..6, 0u8..3, 0u64..40), 0..300),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let cfg = OutlierConfig {
                    consecutive_5xx_errors: 2,
                    max_ejection_percent: 50,
                    ..OutlierConfig::default()
                };
                let (d, hosts) = detector(cfg, 6);
                for (i, op, secs) in ops {
                    match op {
                        0 => { d.record(&hosts[i], &resp(503)); }
                        1 => { d.record(&hosts[i], &resp(200)); }
                        _ => {
                            tokio::time::advance(Duration::from_secs(secs)).await;
                            d.sweep_if_due(Instant::now());
                        }
                    }
                    let ejected = hosts.iter().filter(|h| h.is_ejected()).count();
                    prop_assert_eq!(ejected, d.ejected_count());
                    prop_assert!(ejected <= 3);
                    let decaying = hosts.iter().any(|h| h.ejection_multiplier() > 0);
                    prop_assert_eq!(d.is_active(), decaying);
                }
                Ok(())
            })?;
        }
    }
}
