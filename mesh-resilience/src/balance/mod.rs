//! Load balancing over a destination's endpoints, skipping ejected ones (ISTIO.md §2.2,
//! DR-10..DR-12, DR-39, DR-40, ECOSYSTEM.md §5.3).
//!
//! [`Balance`] owns the endpoint set of one destination (host + subset), a per-endpoint
//! service made by a factory (`Fn(&Endpoint) -> S`, so the proxy plugs in its mTLS
//! connector), the in-flight count of each endpoint, and optionally an
//! [`OutlierDetector`]. Per request it:
//!
//! 1. runs the outlier sweeps that fell due;
//! 2. with locality balancing ([`LocalityLb`], from where the proxy runs, [`Origin`]),
//!    draws a priority (failover, only with outlier detection) or a locality
//!    (`distribute`) by the healthy shares, as Envoy does (see the `locality` module);
//!    then picks an endpoint with the [`LbPolicy`] (`LEAST_REQUEST` = power of two choices,
//!    the default; `ROUND_ROBIN`; `RANDOM`; `consistentHash` = ring hash or Maglev over
//!    a request key, [`ConsistentHash`]) among the endpoints that are not ejected (all
//!    of them in panic mode) and, for a retry, not already tried ([`PreviousHosts`])
//!    when another is available; while an endpoint is in its slow-start window
//!    ([`SlowStart`]), `ROUND_ROBIN` and `LEAST_REQUEST` weigh the endpoints by it, and
//!    endpoint weights (`Endpoint::weight`) weigh `ROUND_ROBIN`, `LEAST_REQUEST` and
//!    `RANDOM` (only when some weight is not 1: the unweighted picks stay as they are);
//! 3. waits for that endpoint's service to be ready, calls it, and races the call
//!    against the attempt's deadline ([`AttemptDeadline`](crate::AttemptDeadline),
//!    [`RequestDeadline`](crate::RequestDeadline)), read in `call` from the deadline
//!    and retry layers around it or from the request's extensions ([`CallDeadlines`]);
//! 4. classifies the result once ([`Outcome`]) and records it for outlier detection;
//! 5. tags the response with [`UpstreamHost`] (and a generated hash cookie's
//!    `Set-Cookie`) and errors with [`EndpointFailed`], and keeps the endpoint's
//!    in-flight count until the response body ends.
//!
//! Endpoints of another network than the proxy's are left out at update (no east-west
//! gateway). Ejection only makes an endpoint ineligible; it never removes it (a `poll_ready` error
//! would, ECOSYSTEM.md §5.3). Endpoints are replaced at runtime with
//! [`Balance::update`]; endpoints that stay keep their service, in-flight count, outlier
//! state and slow-start start. The balancer picks per request in `call` (it must see the
//! request for its hash key and to avoid previous hosts), so its own `poll_ready` is
//! always ready and the chosen endpoint's readiness is awaited in the response future.
//!
//! # Consistent hashing
//!
//! The key (header, cookie, source IP or query parameter) is hashed with XXH64 and the
//! ring or Maglev table is built exactly as Envoy builds them (see [`ConsistentHash`]),
//! so with the same endpoints a key goes where Envoy would send it. Key extraction
//! allocates nothing, except the `Set-Cookie` value of a generated cookie. A request
//! without a key gets a random hash, so it lands on an endpoint with the probability of
//! that endpoint's share of the table ([`Balance::hash_shares`]), as in Envoy.
//!
//! # Slow start
//!
//! An endpoint's slow start begins when the balancer first sees it; the endpoints of a
//! new balancer start together, so they share traffic evenly while they ramp (Envoy
//! gives a new cluster's hosts one start as well). Outlier un-ejection does not restart
//! it: Envoy restarts it only after an active health check, which Istio does not
//! configure. Weights apply to `ROUND_ROBIN` and `LEAST_REQUEST` only (Istio sets no
//! slow start for the others), and only while some endpoint is in its window; after
//! that no clock is read.
//!
//! # Where we choose
//!
//! - Previous-host avoidance filters the tried endpoints out of the candidates
//!   (deterministic), where Envoy re-picks up to 5 times at random (and, for a hash
//!   table, offsets the ring position by the attempt number or flips the hash's bits
//!   for Maglev).
//! - An ejected endpoint stays in the hash table and is walked past: its keys go to the
//!   next point on the ring, or the next Maglev slot, of an eligible endpoint, and no
//!   other key moves. Envoy rebuilds the table over the healthy hosts instead, which
//!   sends the ejected host's keys to about the same places but also moves a few keys of
//!   the others (the rebuilt ring gives each host more points). A retry that avoids an
//!   endpoint walks the same way, so it picks what ejecting that endpoint would.
//! - A change of the endpoint set rebuilds the table as Envoy does. Envoy's ring gives
//!   every endpoint `ceil(minimumRingSize / N)` points, so when `N` shrinks the others
//!   gain points and also take some keys from each other (about 10 % of all keys going
//!   from 4 endpoints to 3 with the default 1024; none when the count stays the same,
//!   as from 33 to 32). Maglev moves a handful of other keys (its minimal disruption).
//! - The hash key is read by the destination's balancer from the destination's own
//!   DestinationRule, so each destination of a weighted route hashes by its own policy.
//! - Slow-start weights are applied by a deterministic golden-ratio sequence over the
//!   round-robin cursor and by a weighted random draw over `weight / (in flight + 1)`
//!   for least request, where Envoy runs an EDF schedule; the shares are the same.
//!
//! # Layer placement
//!
//! Per destination, inside retry and pool limits: `retry -> pool limit -> Balance -> endpoint`.
//!
//! # Errors
//!
//! [`NoHealthyUpstream`] when there is no endpoint or every endpoint is ejected without
//! panic mode (503 `UH`); [`PerTryTimeout`] / [`DeadlineExceeded`] when the attempt's
//! deadline passes; endpoint errors wrapped in [`EndpointFailed`].
//!
//! # Example
//!
//! ```
//! use mesh_core::Endpoint;
//! use mesh_resilience::balance::{Balance, LbPolicy};
//! use mesh_resilience::outlier::OutlierConfig;
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let balance = Balance::new(LbPolicy::LeastRequest, Some(OutlierConfig::default()), |ep: &Endpoint| {
//!     let addr = ep.address;
//!     service_fn(move |_req: http::Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(addr.to_string()))
//!     })
//! });
//! balance.update([Endpoint::new("10.0.0.1:8080".parse().unwrap())]);
//! let res = balance.clone().oneshot(http::Request::new(())).await.unwrap();
//! assert_eq!(res.into_body().into_inner(), "10.0.0.1:8080");
//! # }
//! ```
//!
//! Session affinity on a header, looked up in a Maglev table:
//!
//! ```
//! use mesh_core::Endpoint;
//! use mesh_resilience::balance::{Balance, ConsistentHash, HashAlgorithm, HashKey, LbPolicy};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let key = HashKey::Header(http::HeaderName::from_static("x-user"));
//! let policy = ConsistentHash::new(key).with_algorithm(HashAlgorithm::maglev(65_537).unwrap());
//! let balance = Balance::new(LbPolicy::ConsistentHash(policy), None, |ep: &Endpoint| {
//!     let addr = ep.address;
//!     service_fn(move |_req: http::Request<()>| async move {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(addr.to_string()))
//!     })
//! });
//! balance.update((1..=3).map(|i| Endpoint::new(([10, 0, 0, i], 8080).into())));
//! let svc = ServiceBuilder::new().service(balance);
//! let ask = |user: &str| {
//!     let req = http::Request::builder().header("x-user", user).body(()).unwrap();
//!     svc.clone().oneshot(req)
//! };
//! let first = ask("alice").await.unwrap().into_body().into_inner();
//! for _ in 0..10 {
//!     assert_eq!(ask("alice").await.unwrap().into_body().into_inner(), first);
//! }
//! # }
//! ```

mod hash;
mod locality;
mod p2c;
mod round_robin;
mod slow_start;
mod table;
mod xxhash;

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use mesh_core::error::{DeadlineExceeded, NoHealthyUpstream, PerTryTimeout};
use mesh_core::{BoxError, Endpoint, Outcome, UpstreamHost};
use pin_project::pin_project;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::time::{Instant, Sleep, sleep_until};
use tower_service::Service;

use crate::body::{GuardBody, guard_response};
use crate::deadline::CallDeadlines;
use crate::outlier::{HostHealth, OutlierConfig, OutlierDetector};

pub use hash::{ConsistentHash, HashAlgorithm, HashCookie, HashKey, InvalidHashTable};
use locality::Placement;
pub use locality::{Distribute, Failover, LocalityLb, Origin};
pub use slow_start::SlowStart;
use table::Table;

/// The load-balancing algorithm (DestinationRule `loadBalancer.simple` or
/// `loadBalancer.consistentHash`, DR-10, DR-11).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum LbPolicy {
    /// `LEAST_REQUEST` (and its deprecated alias `LEAST_CONN`): power of two choices on
    /// requests in flight. Istio's default.
    #[default]
    LeastRequest,
    /// `ROUND_ROBIN`.
    RoundRobin,
    /// `RANDOM`.
    Random,
    /// `consistentHash`: ring hash or Maglev over a request key.
    ConsistentHash(ConsistentHash),
}

/// Everything the balancer takes from `loadBalancer`: the policy, slow start and
/// locality balancing, with where the proxy runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LbConfig {
    /// The algorithm.
    pub policy: LbPolicy,
    /// Slow start (`warmup`); applies to `ROUND_ROBIN` and `LEAST_REQUEST` only, and is
    /// ignored for the others, as in Istio.
    pub slow_start: Option<SlowStart>,
    /// `localityLbSetting` (Istio's mesh default when the rule has none).
    pub locality: LocalityLb,
    /// Where the proxy runs.
    pub origin: Origin,
}

impl From<LbPolicy> for LbConfig {
    fn from(policy: LbPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }
}

impl LbConfig {
    /// `policy` with slow start.
    #[must_use]
    pub fn with_slow_start(mut self, slow_start: SlowStart) -> Self {
        self.slow_start = Some(slow_start);
        self
    }

    /// `self` for a proxy at `origin`.
    #[must_use]
    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }

    /// `self` with `localityLbSetting`.
    #[must_use]
    pub fn with_locality(mut self, locality: LocalityLb) -> Self {
        self.locality = locality;
        self
    }
}

/// Marks a retried request whose route sets `retryRemoteLocalities`: the balancer then
/// treats the priorities its earlier attempts went to as down (Envoy's
/// `previous_priorities` retry predicate), so the retry goes to the next locality.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryRemoteLocalities;

/// The endpoints earlier attempts of this request went to; the retry layer sets it and
/// the balancer avoids them when another endpoint is available (VS-63).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PreviousHosts(pub Vec<SocketAddr>);

/// An error of the endpoint at `address`; the cause is the [`source`](std::error::Error::source).
///
/// It displays as its cause, so the text the caller sees does not change.
pub struct EndpointFailed {
    address: SocketAddr,
    source: BoxError,
}

impl EndpointFailed {
    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl fmt::Debug for EndpointFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointFailed")
            .field("address", &self.address)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for EndpointFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for EndpointFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Keeps an endpoint's in-flight count until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Entry<S> {
    endpoint: Endpoint,
    service: S,
    in_flight: Arc<AtomicUsize>,
    health: Option<HostHealth>,
    /// When the balancer first saw the endpoint (slow start).
    added: Instant,
}

impl<S> Entry<S> {
    fn is_ejected(&self) -> bool {
        self.health.as_ref().is_some_and(HostHealth::is_ejected)
    }
}

/// The endpoints of one update, with what is derived from them.
struct Set<S> {
    entries: Vec<Arc<Entry<S>>>,
    /// The consistent-hash table over `entries`.
    table: Option<Table>,
    /// When the last endpoint of this set ends its slow start; `None`: none is in it.
    warm_at: Option<Instant>,
    /// Set once `warm_at` has passed, so later picks read no clock.
    warm: AtomicBool,
    /// Priorities or locality weights of `entries`.
    placement: Placement,
    /// Whether some endpoint's weight is not 1.
    weighted: bool,
}

impl<S> Set<S> {
    fn empty() -> Self {
        Self {
            entries: Vec::new(),
            table: None,
            warm_at: None,
            warm: AtomicBool::new(true),
            placement: Placement::Flat,
            weighted: false,
        }
    }

    /// Whether a pick at this moment weighs endpoints by slow start: `Some(now)` while
    /// an endpoint is still in its window.
    fn ramping(&self) -> Option<Instant> {
        let warm_at = self.warm_at?;
        if self.warm.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        if now < warm_at {
            return Some(now);
        }
        self.warm.store(true, Ordering::Relaxed);
        None
    }
}

impl<S> std::ops::Deref for Set<S> {
    type Target = [Arc<Entry<S>>];

    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

type MakeEndpoint<S> = Box<dyn Fn(&Endpoint) -> S + Send + Sync>;

struct Shared<S> {
    lb: LbPolicy,
    /// Slow start, kept only for the policies it applies to.
    slow_start: Option<SlowStart>,
    /// The fixed end of a generated cookie's `Set-Cookie` value.
    cookie_tail: Option<Box<str>>,
    make: MakeEndpoint<S>,
    set: ArcSwap<Set<S>>,
    update: Mutex<()>,
    detector: Option<Arc<OutlierDetector>>,
    /// `localityLbSetting`, where the proxy runs, and whether failover applies.
    locality: LocalityLb,
    origin: Origin,
    cursor: AtomicUsize,
    /// Seeds the random generator of each clone, so clones never share a sequence.
    clones: AtomicU64,
}

/// A load balancer over the endpoints of one destination. Clones share the endpoints,
/// their state and the outlier detector; each clone has its own random generator.
pub struct Balance<S> {
    shared: Arc<Shared<S>>,
    seed: u64,
    rng: SmallRng,
}

impl<S> fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("lb", &self.shared.lb)
            .field("endpoints", &self.shared.set.load().len())
            .field("detector", &self.shared.detector)
            .finish()
    }
}

impl<S> Clone for Balance<S> {
    /// The clone shares everything but the random generator, which is reseeded.
    fn clone(&self) -> Self {
        let n = self.shared.clones.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
            seed: self.seed,
            rng: SmallRng::seed_from_u64(crate::mix_seed(self.seed, n)),
        }
    }
}

impl<S> Balance<S> {
    /// A balancer with no endpoints yet. `outlier: None` disables outlier detection
    /// (Istio without `outlierDetection`). `make` builds the service of each endpoint.
    ///
    /// `lb` is an [`LbPolicy`] or an [`LbConfig`] (policy and slow start).
    pub fn new(
        lb: impl Into<LbConfig>,
        outlier: Option<OutlierConfig>,
        make: impl Fn(&Endpoint) -> S + Send + Sync + 'static,
    ) -> Self {
        let LbConfig {
            policy,
            slow_start,
            locality,
            origin,
        } = lb.into();
        let slow_start = slow_start.filter(|s| {
            s.is_enabled() && matches!(policy, LbPolicy::LeastRequest | LbPolicy::RoundRobin)
        });
        let cookie_tail = match &policy {
            LbPolicy::ConsistentHash(ConsistentHash {
                key: HashKey::Cookie(cookie),
                ..
            }) => cookie.set_cookie_tail(),
            _ => None,
        };
        let seed = rand::rng().next_u64();
        Self {
            shared: Arc::new(Shared {
                lb: policy,
                slow_start,
                cookie_tail,
                make: Box::new(make),
                set: ArcSwap::from_pointee(Set::empty()),
                update: Mutex::new(()),
                detector: outlier.map(|c| Arc::new(OutlierDetector::new(c))),
                locality,
                origin,
                cursor: AtomicUsize::new(0),
                clones: AtomicU64::new(1),
            }),
            seed,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Fixes the random generator (tests, benches); clones derive theirs from it.
    #[must_use]
    pub fn with_rng_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self.rng = SmallRng::seed_from_u64(seed);
        self
    }

    /// The outlier detector, when enabled.
    pub fn detector(&self) -> Option<&Arc<OutlierDetector>> {
        self.shared.detector.as_ref()
    }

    /// The load-balancing policy.
    pub fn lb_policy(&self) -> &LbPolicy {
        &self.shared.lb
    }

    /// Slow start, when it applies to this balancer's policy.
    pub fn slow_start(&self) -> Option<SlowStart> {
        self.shared.slow_start
    }

    /// With a consistent-hash policy, each endpoint's share of the hash space: the share
    /// of requests it gets when keys are spread evenly. Empty for the other policies.
    pub fn hash_shares(&self) -> Vec<(SocketAddr, f64)> {
        let set = self.shared.set.load();
        let Some(table) = &set.table else {
            return Vec::new();
        };
        set.iter()
            .zip(table.shares(set.len()))
            .map(|(e, share)| (e.endpoint.address, share))
            .collect()
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.shared
            .set
            .load()
            .iter()
            .map(|e| e.endpoint.clone())
            .collect()
    }

    /// Whether the endpoint at `address` is ejected now.
    pub fn is_ejected(&self, address: SocketAddr) -> bool {
        if let Some(d) = &self.shared.detector
            && d.is_active()
        {
            d.sweep_if_due(Instant::now());
        }
        self.shared
            .set
            .load()
            .iter()
            .any(|e| e.endpoint.address == address && e.is_ejected())
    }

    /// Requests in flight to the endpoint at `address` (until their bodies end).
    pub fn in_flight(&self, address: SocketAddr) -> usize {
        self.shared
            .set
            .load()
            .iter()
            .find(|e| e.endpoint.address == address)
            .map_or(0, |e| e.in_flight.load(Ordering::Acquire))
    }

    /// Replaces the endpoint set. Endpoints that stay (same address and metadata) keep
    /// their service, in-flight count and outlier state; an endpoint whose labels or
    /// identity changed gets a new service but keeps its outlier state; removed endpoints
    /// leave the outlier detector's total. Duplicate addresses are ignored.
    pub fn update(&self, endpoints: impl IntoIterator<Item = Endpoint>) {
        let _serialized = self.shared.update.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.shared.set.load_full();
        let mut by_addr: HashMap<SocketAddr, &Arc<Entry<S>>> =
            old.iter().map(|e| (e.endpoint.address, e)).collect();
        let now = Instant::now();
        let mut next: Vec<Arc<Entry<S>>> = Vec::new();
        for ep in endpoints {
            // Another network is reached only through its east-west gateway, which is
            // not configured here: such endpoints are left out (as Istio leaves out
            // endpoints of networks without a gateway).
            if !self.shared.origin.reaches(&ep) {
                continue;
            }
            if next.iter().any(|e| e.endpoint.address == ep.address) {
                continue;
            }
            let entry = match by_addr.remove(&ep.address) {
                Some(kept) if kept.endpoint == ep => kept.clone(),
                Some(changed) => Arc::new(Entry {
                    service: (self.shared.make)(&ep),
                    endpoint: ep,
                    in_flight: changed.in_flight.clone(),
                    health: changed.health.clone(),
                    added: changed.added,
                }),
                None => Arc::new(Entry {
                    service: (self.shared.make)(&ep),
                    endpoint: ep,
                    in_flight: Arc::new(AtomicUsize::new(0)),
                    health: self.shared.detector.as_ref().map(|d| d.register()),
                    added: now,
                }),
            };
            next.push(entry);
        }
        if let Some(d) = &self.shared.detector {
            for gone in by_addr.values() {
                if let Some(h) = &gone.health {
                    d.deregister(h);
                }
            }
        }
        let table = match &self.shared.lb {
            LbPolicy::ConsistentHash(ch) => {
                let addrs: Vec<SocketAddr> = next.iter().map(|e| e.endpoint.address).collect();
                Some(Table::build(ch.algorithm, &addrs))
            }
            _ => None,
        };
        let warm_at = self.shared.slow_start.and_then(|s| {
            next.iter()
                .map(|e| e.added + s.window)
                .max()
                .filter(|at| *at > now)
        });
        let placement = {
            let eps: Vec<&Endpoint> = next.iter().map(|e| &e.endpoint).collect();
            Placement::new(
                &self.shared.locality,
                &self.shared.origin,
                self.shared.detector.is_some(),
                &eps,
            )
        };
        let weighted = next.iter().any(|e| e.endpoint.weight > 1);
        self.shared.set.store(Arc::new(Set {
            entries: next,
            table,
            warm_at,
            warm: AtomicBool::new(warm_at.is_none()),
            placement,
            weighted,
        }));
    }

    /// The endpoint the next request would go to: runs due outlier sweeps and picks as
    /// [`call`](Service::call) does, without sending anything (diagnostics, benches).
    /// `None` means the request would get [`NoHealthyUpstream`].
    ///
    /// A consistent-hash balancer picks as for a request without a key (at random); see
    /// [`choose_for`](Self::choose_for).
    pub fn choose(&mut self, previous: Option<&PreviousHosts>) -> Option<SocketAddr> {
        let set = self.shared.set.load();
        self.pick(&set, previous, None, false)
            .map(|i| set[i].endpoint.address)
    }

    /// Charges `outcome` to the endpoint at `address` in outlier detection, as a request
    /// through this balancer would be (for traffic that picks with
    /// [`choose`](Self::choose) and connects by itself, such as TCP proxying). Returns
    /// whether it ejected the endpoint.
    pub fn record(&self, address: SocketAddr, outcome: &Outcome) -> bool {
        let (Some(detector), set) = (self.shared.detector.as_deref(), self.shared.set.load())
        else {
            return false;
        };
        set.iter()
            .find(|e| e.endpoint.address == address)
            .and_then(|e| e.health.as_ref())
            .is_some_and(|health| detector.record(health, outcome))
    }

    /// The endpoint `req` would go to, with its hash key and [`PreviousHosts`], without
    /// sending anything.
    pub fn choose_for<B>(&mut self, req: &http::Request<B>) -> Option<SocketAddr> {
        let hash = self.request_hash(req).hash;
        let set = self.shared.set.load();
        let remote = req.extensions().get::<RetryRemoteLocalities>().is_some();
        self.pick(&set, req.extensions().get::<PreviousHosts>(), hash, remote)
            .map(|i| set[i].endpoint.address)
    }

    /// The consistent hash of `req` (none for the other policies).
    fn request_hash<B>(&self, req: &http::Request<B>) -> hash::RequestHash {
        match &self.shared.lb {
            LbPolicy::ConsistentHash(ch) => {
                hash::hash_request(&ch.key, self.shared.cookie_tail.as_deref(), req)
            }
            _ => hash::RequestHash::default(),
        }
    }

    /// Picks an endpoint for a request that already went to `previous`.
    ///
    /// Outlier sweeps that fell due are replayed only when the pick looks at an ejected
    /// endpoint (or in panic mode): a sweep only un-ejects endpoints (and decays
    /// multipliers, which no pick reads), so with the same random draws a pick that
    /// meets no ejected endpoint is the one it would be after the sweep. Most picks thus
    /// read no clock, and every pick is still the one a timer-driven sweep would give.
    ///
    /// `hash` is the request's consistent hash; a consistent-hash pick without one draws
    /// a random hash (Envoy). `remote`: the priorities of `previous` count as down.
    fn pick(
        &mut self,
        set: &Set<S>,
        previous: Option<&PreviousHosts>,
        hash: Option<u64>,
        remote: bool,
    ) -> Option<usize> {
        let Self { shared, rng, .. } = self;
        let how = match &shared.lb {
            LbPolicy::ConsistentHash(_) => How::Hash(hash.unwrap_or_else(|| rng.next_u64())),
            _ if shared.slow_start.is_some() => match set.ramping() {
                Some(now) => How::Weighted(Some(now)),
                None if set.weighted => How::Weighted(None),
                None => How::Plain,
            },
            _ if set.weighted => How::Weighted(None),
            _ => How::Plain,
        };
        let detector = shared.detector.as_deref();
        let caught_up = Cell::new(detector.is_none());
        let catch_up = || {
            if !caught_up.replace(true)
                && let Some(d) = detector
            {
                d.sweep_if_due(Instant::now());
            }
        };
        let mut panic = detector.is_some_and(OutlierDetector::in_panic);
        if panic {
            // A due sweep may end panic mode: catch up before relying on it.
            catch_up();
            panic = detector.is_some_and(OutlierDetector::in_panic);
        }
        let healthy = |i: usize| {
            panic
                || !set[i].is_ejected()
                || (!caught_up.get() && {
                    catch_up();
                    !set[i].is_ejected()
                })
        };
        let previous = previous.map(|p| p.0.as_slice()).unwrap_or_default();
        if !set.placement.is_flat() {
            return pick_placed(shared, rng, set, how, &healthy, previous, remote);
        }
        if !previous.is_empty() {
            let fresh = |i: usize| healthy(i) && !previous.contains(&set[i].endpoint.address);
            if let Some(i) = pick_among(shared, rng, set, how, &fresh) {
                return Some(i);
            }
        }
        pick_among(shared, rng, set, how, &healthy)
    }
}

/// Picks in a priority or locality drawn by the healthy shares, then with the policy
/// among its endpoints (avoiding `previous` when another is available there).
fn pick_placed<S>(
    shared: &Shared<S>,
    rng: &mut SmallRng,
    set: &Set<S>,
    how: How,
    healthy: &impl Fn(usize) -> bool,
    previous: &[SocketAddr],
    remote: bool,
) -> Option<usize> {
    let placement = &set.placement;
    let tried = |level: u16| {
        remote
            && previous.iter().any(|a| {
                set.iter()
                    .position(|e| e.endpoint.address == *a)
                    .is_some_and(|i| placement.level(i) == level)
            })
    };
    let scope = placement.scope(rng, healthy, &tried)?;
    let in_scope = |i: usize| placement.contains(scope, i) && healthy(i);
    if !previous.is_empty() {
        let fresh = |i: usize| in_scope(i) && !previous.contains(&set[i].endpoint.address);
        if let Some(i) = pick_among(shared, rng, set, how, &fresh) {
            return Some(i);
        }
    }
    pick_among(shared, rng, set, how, &in_scope)
}

/// How one pick goes, decided once per request.
#[derive(Clone, Copy)]
enum How {
    /// The policy's own pick.
    Plain,
    /// Weighted by the endpoints' weights, and by slow start at this moment if given.
    Weighted(Option<Instant>),
    /// Consistent hashing with this hash.
    Hash(u64),
}

/// Picks among the `eligible` endpoints of `set` with the balancer's policy.
fn pick_among<S>(
    shared: &Shared<S>,
    rng: &mut SmallRng,
    set: &Set<S>,
    how: How,
    eligible: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = set.len();
    let in_flight = |i: usize| set[i].in_flight.load(Ordering::Relaxed);
    match (how, &shared.lb) {
        (How::Hash(h), _) => set.table.as_ref()?.pick(h, n, eligible),
        (How::Weighted(now), policy) => {
            let factor = |i: usize| {
                let weight = f64::from(set[i].endpoint.weight);
                match (now, shared.slow_start) {
                    (Some(now), Some(ramp)) => {
                        weight * ramp.weight_at(now.saturating_duration_since(set[i].added))
                    }
                    _ => weight,
                }
            };
            match policy {
                LbPolicy::RoundRobin => {
                    let u = slow_start::next_fraction(&shared.cursor);
                    slow_start::pick_weighted(n, u, eligible, &factor)
                }
                LbPolicy::LeastRequest => {
                    // Envoy's least-request weight: the endpoint's weight over its
                    // requests in flight plus one.
                    let u = rng.random::<f64>();
                    slow_start::pick_weighted(n, u, eligible, &|i| {
                        factor(i) / (in_flight(i) as f64 + 1.0)
                    })
                }
                _ => slow_start::pick_weighted(n, rng.random::<f64>(), eligible, &factor),
            }
        }
        (How::Plain, LbPolicy::LeastRequest) => p2c::pick(n, rng, eligible, &in_flight),
        (How::Plain, LbPolicy::RoundRobin) => round_robin::pick(n, &shared.cursor, eligible),
        (How::Plain, LbPolicy::Random | LbPolicy::ConsistentHash(_)) => {
            round_robin::pick_random(n, rng, eligible)
        }
    }
}

impl<S, B, RB> Service<http::Request<B>> for Balance<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    RB: http_body::Body,
{
    type Response = http::Response<GuardBody<RB, InFlight>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, http::Request<B>, S::Future>;

    /// Always ready: the endpoint is chosen per request and its readiness is awaited in
    /// the response future.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let detector = self.shared.detector.clone();
        let key = self.request_hash(&req);
        let set = self.shared.set.load();
        let remote = req.extensions().get::<RetryRemoteLocalities>().is_some();
        let previous = req.extensions().get::<PreviousHosts>();
        let Some(i) = self.pick(&set, previous, key.hash, remote) else {
            return ResponseFuture::failed(Box::new(NoHealthyUpstream));
        };
        let entry = &set[i];
        // Set around this call by the deadline and retry layers, or carried by the request.
        let deadlines = CallDeadlines::of(&req);
        let request_deadline = deadlines.request.map(|d| d.at);
        let attempt_deadline = deadlines.attempt.map(|d| d.0);
        let (timer, timer_is_request_deadline) = match (attempt_deadline, request_deadline) {
            (Some(a), Some(r)) => (Some(a.min(r)), r <= a),
            (Some(a), None) => (Some(a), false),
            (None, Some(r)) => (Some(r), true),
            (None, None) => (None, false),
        };
        ResponseFuture {
            state: State::Ready {
                service: entry.service.clone(),
                request: Some(req),
            },
            address: entry.endpoint.address,
            in_flight: Some(InFlight::new(&entry.in_flight)),
            health: entry.health.clone().zip(detector),
            timer: timer.map(sleep_until),
            timer_is_request_deadline,
            set_cookie: key.set_cookie,
        }
    }
}

/// Response future of [`Balance`].
#[pin_project]
pub struct ResponseFuture<S, Req, F> {
    #[pin]
    state: State<S, Req, F>,
    address: SocketAddr,
    in_flight: Option<InFlight>,
    health: Option<(HostHealth, Arc<OutlierDetector>)>,
    #[pin]
    timer: Option<Sleep>,
    timer_is_request_deadline: bool,
    /// A generated hash cookie for the response.
    set_cookie: Option<http::HeaderValue>,
}

#[pin_project(project = StateProj)]
enum State<S, Req, F> {
    Failed(Option<BoxError>),
    Ready {
        service: S,
        request: Option<Req>,
    },
    Calling {
        #[pin]
        fut: F,
    },
}

impl<S, Req, F> ResponseFuture<S, Req, F> {
    fn failed(err: BoxError) -> Self {
        Self {
            state: State::Failed(Some(err)),
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            in_flight: None,
            health: None,
            timer: None,
            timer_is_request_deadline: false,
            set_cookie: None,
        }
    }
}

impl<S, Req, F> fmt::Debug for ResponseFuture<S, Req, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl<S, Req, RB> Future for ResponseFuture<S, Req, S::Future>
where
    S: Service<Req, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body,
{
    type Output = Result<http::Response<GuardBody<RB, InFlight>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let address = *this.address;
        let mut timed_out = false;
        loop {
            let result = match this.state.as_mut().project() {
                StateProj::Failed(err) => {
                    return Poll::Ready(Err(err
                        .take()
                        .unwrap_or_else(|| "balancer future polled after completion".into())));
                }
                StateProj::Ready { service, request } => {
                    let ready = match service.poll_ready(cx) {
                        Poll::Ready(r) => r.map_err(Into::into),
                        Poll::Pending => match this.timer.as_mut().as_pin_mut() {
                            Some(t) => {
                                ready!(t.poll(cx));
                                timed_out = true;
                                Err(timeout_error(*this.timer_is_request_deadline))
                            }
                            None => return Poll::Pending,
                        },
                    };
                    match ready {
                        Ok(()) => {
                            let Some(req) = request.take() else {
                                return Poll::Ready(Err(
                                    "balancer future polled after completion".into()
                                ));
                            };
                            let fut = service.call(req);
                            this.state.set(State::Calling { fut });
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                StateProj::Calling { fut } => match fut.poll(cx) {
                    Poll::Ready(r) => r.map_err(Into::into),
                    Poll::Pending => match this.timer.as_mut().as_pin_mut() {
                        Some(t) => {
                            ready!(t.poll(cx));
                            // The attempt is dropped below: the upstream stream is reset.
                            timed_out = true;
                            Err(timeout_error(*this.timer_is_request_deadline))
                        }
                        None => return Poll::Pending,
                    },
                },
            };
            this.state.set(State::Failed(None));
            let outcome = match &result {
                Ok(res) => Outcome::from_response(res),
                Err(e) => Outcome::from_error(e),
            };
            if let Some((health, detector)) = this.health.take() {
                // A route-deadline expiry is charged to the endpoint like a per-try timeout
                // (Envoy records a local-origin timeout for both).
                let recorded = if timed_out {
                    Outcome::PerTryTimeout
                } else {
                    outcome
                };
                detector.record(&health, &recorded);
            }
            return Poll::Ready(match result {
                Ok(mut res) => {
                    // An endpoint client that tagged the response already (the proxy's
                    // does) is not tagged again: inserting boxes the value anew.
                    if res.extensions().get::<UpstreamHost>().map(|h| h.0) != Some(address) {
                        res.extensions_mut().insert(UpstreamHost(address));
                    }
                    if let Some(cookie) = this.set_cookie.take() {
                        res.headers_mut().append(http::header::SET_COOKIE, cookie);
                    }
                    Ok(guard_response(res, this.in_flight.take()))
                }
                Err(source) => Err(Box::new(EndpointFailed { address, source })),
            });
        }
    }
}

fn timeout_error(request_deadline: bool) -> BoxError {
    if request_deadline {
        Box::new(DeadlineExceeded)
    } else {
        Box::new(PerTryTimeout)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod locality_tests;
