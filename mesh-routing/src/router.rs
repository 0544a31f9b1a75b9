//! The router: the service that picks a route and a destination for each request and
//! dispatches it to that destination's service.
//!
//! # Behaviour
//!
//! For each request the [`Router`] loads the current [`Snapshot`] once and keeps it for the
//! whole request (in-flight requests finish on the snapshot they started with), selects
//! the route (first match wins), then:
//!
//! - `redirect` / `directResponse`: answers locally;
//! - otherwise rolls the route's faults (delay, then abort; flags `DI`/`FI`), picks a
//!   weighted destination, applies header operations and rewrites, starts the mirrors,
//!   and calls the route's service for that destination.
//!
//! The route's service is built when a table is compiled, not per request: for every
//! (route policy, destination) pair of the table ([`RouteStack`](crate::RouteStack)) the
//! [`MakeDestination::route`] wraps the destination's service in the route's policy
//! (deadline, retries). A maker that leaves it to the default gets the destination's
//! service itself, with the route's [`RoutePolicy`] in the request extensions.
//!
//! Destination services are made once per destination (host, subset, port) by a
//! [`MakeDestination`] and kept by the [`RouterHandle`] across [`RouterHandle::update`]s
//! for as long as some route still names the destination, so per-endpoint state (outlier
//! ejections, connection pools) survives a weight change. Each is handed a [`Target`]
//! whose endpoints and policy the handle updates in place.
//!
//! # Layer placement
//!
//! Outermost on the outbound path after telemetry: `telemetry -> Router -> per destination:
//! deadline -> retry -> balancer -> endpoint stack`. The per-destination stack is what
//! [`MakeDestination::make`] builds, the per-route part what [`MakeDestination::route`]
//! puts around it.
//!
//! # Errors
//!
//! - [`NoRoute`] (404 `NR`): no virtual host for the authority, or no route matched.
//! - [`ClusterNotFound`] (503 `NC`): the chosen destination names a host the registry does
//!   not know, a subset no DestinationRule defines, or a port the service lacks.
//! - [`NoHealthyUpstream`] (503 `UH`): the destination has no endpoints.
//! - Errors of the destination service pass through unchanged.
//!
//! The router's `poll_ready` is always ready: the destination is only known in `call`, so
//! the chosen destination service is driven to readiness inside the response future
//! (destination services should be cheap to clone, e.g. behind a buffer).
//!
//! Note for servers: when a router (or its response future) ends up inside a spawned
//! connection future, rustc may fail to prove `Send` for the future over the `dyn Error`
//! inside the request body type ("implementation of `Service` is not general enough").
//! Boxing the response future (`Box::pin(router.call(req))` as a `dyn Future + Send`) or
//! the service (`BoxCloneSyncService`) avoids it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use mesh_core::body::BoxBody;
use mesh_core::error::{
    BoxError, ClusterNotFound, DeadlineExceeded, NoHealthyUpstream, NoRoute, PerTryTimeout,
};
use mesh_core::extensions::{ConnectionInfo, RoutePolicy, add_response_flags};
use mesh_core::flags::ResponseFlags;
use mesh_core::{Endpoint, Labels};
use pin_project::pin_project;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tower_service::Service;

use crate::cors::{CorsCheck, CorsPolicy};
use crate::dns::DnsResolver;
use crate::fault::abort_response;
use crate::headers::Headers;
use crate::matcher::RequestView;
use crate::mirror;
use crate::registry::{PortProtocol, Registry, Resolution, ServicePort};
use crate::stats::RouteStats;
use crate::subset::{DestinationRules, ResolvedPolicy};
use crate::table::{DestinationKey, RouteAction, RouteTable};

/// Everything the router needs from one configuration load.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// The routes.
    pub table: RouteTable,
    /// The services and their endpoints.
    pub registry: Registry,
    /// The DestinationRules (subsets and policies).
    pub rules: DestinationRules,
}

/// One destination as its service sees it: where to send and with which policy.
///
/// Endpoints and policy are updated in place on reloads and DNS refreshes; read them per
/// request (each read is a lock-free load).
#[derive(Debug)]
pub struct Target {
    /// The destination, with the port resolved.
    pub key: DestinationKey,
    endpoints: ArcSwap<Vec<Endpoint>>,
    policy: ArcSwap<ResolvedPolicy>,
    /// The service port's protocol class, as `PortProtocol as u8`.
    protocol: std::sync::atomic::AtomicU8,
}

impl Target {
    /// A target with fixed endpoints and policy (for building stacks in code); its port's
    /// protocol is [`PortProtocol::Auto`] until [`with_protocol`](Self::with_protocol).
    pub fn new(key: DestinationKey, endpoints: Vec<Endpoint>, policy: ResolvedPolicy) -> Self {
        Self {
            key,
            endpoints: ArcSwap::from_pointee(endpoints),
            policy: ArcSwap::from_pointee(policy),
            protocol: std::sync::atomic::AtomicU8::new(PortProtocol::Auto as u8),
        }
    }

    /// Sets the protocol class of the destination's service port.
    #[must_use]
    pub fn with_protocol(self, protocol: PortProtocol) -> Self {
        self.set_protocol(protocol);
        self
    }

    fn set_protocol(&self, protocol: PortProtocol) {
        self.protocol
            .store(protocol as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The protocol class of the destination's service port (what the upstream
    /// protocol follows, ISTIO.md PS-07, PS-20).
    pub fn protocol(&self) -> PortProtocol {
        match self.protocol.load(std::sync::atomic::Ordering::Relaxed) {
            p if p == PortProtocol::Http as u8 => PortProtocol::Http,
            p if p == PortProtocol::Http2 as u8 => PortProtocol::Http2,
            p if p == PortProtocol::Tcp as u8 => PortProtocol::Tcp,
            p if p == PortProtocol::Tls as u8 => PortProtocol::Tls,
            _ => PortProtocol::Auto,
        }
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> Arc<Vec<Endpoint>> {
        self.endpoints.load_full()
    }

    /// The current traffic policy (DestinationRule blocks merged for this subset and port).
    pub fn policy(&self) -> Arc<ResolvedPolicy> {
        self.policy.load_full()
    }

    fn has_endpoints(&self) -> bool {
        !self.endpoints.load().is_empty()
    }
}

/// Makes the service for one destination. Called once per destination, not per request.
pub trait MakeDestination {
    /// The per-destination service.
    type Service;

    /// The service for `target`.
    fn make(&self, target: &Arc<Target>) -> Self::Service;

    /// The service a route forwards to `destination` through: the route's `policy`
    /// (deadline, retries) around the destination's service. Called when a table is
    /// compiled (at start and on every update), once per [`RouteStack`](crate::RouteStack) of the table,
    /// never per request. The default forwards to the destination service as it is and
    /// leaves the policy in the request's extensions ([`RoutePolicy`]) for a service that
    /// reads it there.
    fn route(
        &self,
        policy: &Arc<RoutePolicy>,
        destination: &Self::Service,
        target: &Arc<Target>,
    ) -> Self::Service
    where
        Self::Service: Clone,
    {
        let _ = (policy, target);
        destination.clone()
    }

    /// Whether [`route`](Self::route) applies the route's policy itself; when it does,
    /// the router does not put [`RoutePolicy`] in the request's extensions.
    fn routes_apply_policy(&self) -> bool {
        false
    }

    /// Called on an update for a destination that is kept but whose DestinationRule
    /// policy changed (already stored in `target`): a replacement service, or `None` to
    /// keep `service` (the default; it reads the new policy from `target`).
    fn policy_changed(
        &self,
        service: &Self::Service,
        target: &Arc<Target>,
    ) -> Option<Self::Service> {
        let _ = (service, target);
        None
    }
}

impl<F, S> MakeDestination for F
where
    F: Fn(&Arc<Target>) -> S,
{
    type Service = S;

    fn make(&self, target: &Arc<Target>) -> S {
        self(target)
    }
}

/// A destination slot of a snapshot.
#[derive(Debug)]
enum Slot<S> {
    Ready { service: S, target: Arc<Target> },
    Missing(ClusterNotFound),
}

/// One immutable routing state: the table and a service per destination it names.
#[derive(Debug)]
pub struct Snapshot<S> {
    table: Arc<RouteTable>,
    slots: Vec<Slot<S>>,
    /// One service per [`RouteTable::stacks`] entry; `None` when its destination is missing.
    stacks: Vec<Option<S>>,
    /// Whether requests carry [`RoutePolicy`] (the stacks do not apply it themselves).
    policy_extension: bool,
}

impl<S> Snapshot<S> {
    /// The route table.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// The target of destination `index` of the table, if it resolved.
    pub fn target(&self, index: usize) -> Option<&Arc<Target>> {
        match self.slots.get(index)? {
            Slot::Ready { target, .. } => Some(target),
            Slot::Missing(_) => None,
        }
    }

    /// The service made for destination `index` of the table, if it resolved.
    pub fn service(&self, index: usize) -> Option<&S> {
        match self.slots.get(index)? {
            Slot::Ready { service, .. } => Some(service),
            Slot::Missing(_) => None,
        }
    }
}

/// A destination waiting for DNS answers.
#[derive(Clone, Debug)]
struct DnsJob {
    target: Arc<Target>,
    service: Arc<crate::registry::Service>,
    port: ServicePort,
    selector: Labels,
}

struct Cache<M: MakeDestination> {
    make: M,
    entries: HashMap<DestinationKey, (M::Service, Arc<Target>)>,
    dns: Vec<DnsJob>,
    resolver: DnsResolver,
}

/// Owns the routing state: swaps snapshots atomically and keeps destination services
/// across reloads. Cheap to clone; every clone shares the state.
pub struct RouterHandle<M: MakeDestination> {
    shared: Arc<ArcSwap<Snapshot<M::Service>>>,
    cache: Arc<Mutex<Cache<M>>>,
    seed: u64,
    seq: Arc<AtomicU64>,
}

impl<M: MakeDestination> Clone for RouterHandle<M> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            cache: Arc::clone(&self.cache),
            seed: self.seed,
            seq: Arc::clone(&self.seq),
        }
    }
}

impl<M: MakeDestination> std::fmt::Debug for RouterHandle<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterHandle").finish_non_exhaustive()
    }
}

/// A destination of a route resolved against the registry and the DestinationRules, as
/// the router resolves it when a configuration is applied ([`Routing::resolve`]).
#[derive(Clone, Debug)]
pub struct ResolvedDestination {
    /// The destination with its port resolved.
    pub key: DestinationKey,
    /// The registry service of the host.
    pub service: Arc<crate::registry::Service>,
    /// The service port: the destination's, else the service's first.
    pub port: ServicePort,
    /// The subset's labels (empty without a subset).
    pub selector: Labels,
    /// The DestinationRule policy merged for this subset and port (DR-02..DR-04).
    pub policy: ResolvedPolicy,
}

impl Routing {
    /// Resolves a destination a route names: its registry service and port, its
    /// subset's selector and its merged traffic policy. `Err` when the host, the port or
    /// the subset is unknown (the router then answers 503 `NC`).
    pub fn resolve(&self, key: &DestinationKey) -> Result<ResolvedDestination, ClusterNotFound> {
        let missing = || ClusterNotFound(key.to_string());
        let service = self.registry.service(&key.host).ok_or_else(missing)?;
        let port = match key.port {
            Some(p) => match service.port(p) {
                Some(sp) => sp.clone(),
                None if service.ports.is_empty() => ServicePort::new(p, ""),
                None => return Err(missing()),
            },
            None => service.ports.first().cloned().ok_or_else(missing)?,
        };
        let rule = self.rules.get(&key.host);
        let selector = match &key.subset {
            Some(name) => rule
                .and_then(|r| r.subset(name))
                .map(|s| s.labels.clone())
                .ok_or_else(missing)?,
            None => Labels::new(),
        };
        let policy = rule
            .map(|r| r.resolve(key.subset.as_deref(), port.number))
            .unwrap_or_default();
        let resolved = DestinationKey {
            host: Arc::clone(&key.host),
            subset: key.subset.clone(),
            port: Some(port.number),
        };
        Ok(ResolvedDestination {
            key: resolved,
            service: Arc::clone(service),
            port,
            selector,
            policy,
        })
    }
}

impl<M> RouterHandle<M>
where
    M: MakeDestination,
    M::Service: Clone,
{
    /// A handle serving `routing`, making destination services with `make`. Randomness
    /// (weights, faults, mirrors) is seeded from the OS.
    pub fn new(make: M, routing: Routing) -> Self {
        Self::with_seed(make, routing, rand::rng().random())
    }

    /// Like [`new`](Self::new) with a fixed seed: routers made from the handle draw from
    /// rngs seeded `seed`, `seed + 1`, … in the order they are made (tests fix it).
    pub fn with_seed(make: M, routing: Routing, seed: u64) -> Self {
        let mut cache = Cache {
            make,
            entries: HashMap::new(),
            dns: Vec::new(),
            resolver: DnsResolver::system_or_none(),
        };
        let snapshot = Self::build(&mut cache, routing);
        resolve_new_dns_targets(&cache.dns, &cache.resolver);
        Self {
            shared: Arc::new(ArcSwap::from_pointee(snapshot)),
            cache: Arc::new(Mutex::new(cache)),
            seed,
            seq: Arc::new(AtomicU64::new(0)),
        }
    }

    fn build(cache: &mut Cache<M>, routing: Routing) -> Snapshot<M::Service> {
        let mut slots = Vec::with_capacity(routing.table.destinations().len());
        let mut keep: HashMap<DestinationKey, (M::Service, Arc<Target>)> = HashMap::new();
        let mut dns = Vec::new();
        for key in routing.table.destinations() {
            let slot = match routing.resolve(key) {
                Err(missing) => Slot::Missing(missing),
                Ok(ResolvedDestination {
                    key: resolved,
                    service,
                    port,
                    selector,
                    policy,
                }) => {
                    let (svc, target) =
                        match keep.get(&resolved).or_else(|| cache.entries.get(&resolved)) {
                            Some((svc, target)) => {
                                // Kept across the reload: refresh what may have changed.
                                let changed = *target.policy.load_full() != policy
                                    || target.protocol() != port.protocol();
                                target.policy.store(Arc::new(policy));
                                target.set_protocol(port.protocol());
                                let svc = if changed {
                                    cache
                                        .make
                                        .policy_changed(svc, target)
                                        .unwrap_or_else(|| svc.clone())
                                } else {
                                    svc.clone()
                                };
                                (svc, Arc::clone(target))
                            }
                            None => {
                                let target = Arc::new(
                                    Target::new(resolved.clone(), Vec::new(), policy)
                                        .with_protocol(port.protocol()),
                                );
                                (cache.make.make(&target), target)
                            }
                        };
                    if matches!(
                        service.resolution,
                        Resolution::Dns | Resolution::DnsRoundRobin
                    ) {
                        dns.push(DnsJob {
                            target: Arc::clone(&target),
                            service,
                            port,
                            selector,
                        });
                    } else {
                        target
                            .endpoints
                            .store(Arc::new(service.static_endpoints(&port, &selector)));
                    }
                    keep.insert(resolved, (svc.clone(), Arc::clone(&target)));
                    Slot::Ready {
                        service: svc,
                        target,
                    }
                }
            };
            slots.push(slot);
        }
        // Destinations no route names any more are dropped here (in-flight requests hold clones).
        cache.entries = keep;
        cache.dns = dns;
        let stacks = routing
            .table
            .stacks()
            .iter()
            .map(|stack| match &slots[stack.destination] {
                Slot::Ready { service, target } => {
                    Some(cache.make.route(&stack.policy, service, target))
                }
                Slot::Missing(_) => None,
            })
            .collect();
        Snapshot {
            table: Arc::new(routing.table),
            slots,
            stacks,
            policy_extension: !cache.make.routes_apply_policy(),
        }
    }

    /// Swaps in a new configuration. Requests already routed finish on the old snapshot;
    /// destination services whose destination still exists are kept.
    pub fn update(&self, routing: Routing) {
        let mut cache = match self.cache.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let snapshot = Self::build(&mut cache, routing);
        resolve_new_dns_targets(&cache.dns, &cache.resolver);
        self.shared.store(Arc::new(snapshot));
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot<M::Service>> {
        self.shared.load_full()
    }

    /// A router service reading this handle's snapshots.
    pub fn router(&self) -> Router<M::Service> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        Router {
            shared: Arc::clone(&self.shared),
            rng: SmallRng::seed_from_u64(self.seed.wrapping_add(n)),
            seed: self.seed,
            seq: Arc::clone(&self.seq),
        }
    }

    /// Resolves the DNS names of every `resolution: DNS` destination now and stores the
    /// answers. Names that fail to resolve keep their previous endpoints. New DNS
    /// destinations are also resolved in the background right after [`update`](Self::update)
    /// when a tokio runtime is running.
    pub async fn refresh_dns(&self) -> Option<Duration> {
        let (jobs, resolver) = match self.cache.lock() {
            Ok(guard) => (guard.dns.clone(), guard.resolver.clone()),
            Err(poisoned) => {
                let guard = poisoned.into_inner();
                (guard.dns.clone(), guard.resolver.clone())
            }
        };
        resolve_jobs(jobs, resolver).await
    }

    /// Resolves DNS destinations with `resolver` from now on (the system's resolver
    /// until then), and resolves them again now.
    pub fn set_dns_resolver(&self, resolver: DnsResolver) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.resolver = resolver;
        let jobs = cache.dns.clone();
        let resolver = cache.resolver.clone();
        drop(cache);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(resolve_jobs(jobs, resolver));
        }
    }

    /// Spawns a task that calls [`refresh_dns`](Self::refresh_dns) now, then again when
    /// the shortest TTL of the answers runs out, at least every second and at most every
    /// `every` (Istio's `dnsRefreshRate`; Envoy's `respect_dns_ttl`).
    pub fn spawn_dns_refresh(&self, every: Duration) -> tokio::task::JoinHandle<()>
    where
        M: Send + 'static,
        M::Service: Send + Sync + 'static,
    {
        let handle = self.clone();
        tokio::spawn(async move {
            loop {
                let ttl = handle.refresh_dns().await.unwrap_or(every);
                tokio::time::sleep(
                    ttl.clamp(Duration::from_secs(1), every.max(Duration::from_secs(1))),
                )
                .await;
            }
        })
    }
}

/// Resolves `jobs` with `resolver` and stores the answers; a name that resolves to
/// nothing keeps its previous endpoints (a DNS outage must not empty a destination).
/// Returns the shortest TTL of the answers.
async fn resolve_jobs(jobs: Vec<DnsJob>, resolver: DnsResolver) -> Option<Duration> {
    let mut shortest: Option<Duration> = None;
    for job in jobs {
        let (eps, ttl) = job
            .service
            .resolve_endpoints(&job.port, &job.selector, &resolver)
            .await;
        if let Some(ttl) = ttl {
            shortest = Some(shortest.map_or(ttl, |s| s.min(ttl)));
        }
        if !eps.is_empty() && *job.target.endpoints.load_full() != eps {
            job.target.endpoints.store(Arc::new(eps));
        }
    }
    shortest
}

/// Starts resolving DNS destinations that have no endpoints yet (new ones), when running
/// inside a tokio runtime; otherwise they wait for [`RouterHandle::refresh_dns`].
fn resolve_new_dns_targets(jobs: &[DnsJob], resolver: &DnsResolver) {
    let fresh: Vec<DnsJob> = jobs
        .iter()
        .filter(|j| !j.target.has_endpoints())
        .cloned()
        .collect();
    if fresh.is_empty() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(resolve_jobs(fresh, resolver.clone()));
    }
}

/// The router service; make it with [`RouterHandle::router`].
pub struct Router<S> {
    shared: Arc<ArcSwap<Snapshot<S>>>,
    rng: SmallRng,
    seed: u64,
    seq: Arc<AtomicU64>,
}

impl<S> Clone for Router<S> {
    fn clone(&self) -> Self {
        // Each clone draws from its own rng, seeded from the shared sequence.
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: Arc::clone(&self.shared),
            rng: SmallRng::seed_from_u64(self.seed.wrapping_add(n)),
            seed: self.seed,
            seq: Arc::clone(&self.seq),
        }
    }
}

impl<S> std::fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

type Reply = Result<Response<BoxBody>, BoxError>;

/// What follows an injected delay.
enum Next<S> {
    Reply(Reply),
    Dispatch {
        service: S,
        request: Request<BoxBody>,
    },
}

#[pin_project(project = StateProj)]
enum State<S: Service<Request<BoxBody>>> {
    Done(Option<Reply>),
    Delay {
        #[pin]
        sleep: tokio::time::Sleep,
        next: Option<Next<S>>,
    },
    Ready {
        service: S,
        request: Option<Request<BoxBody>>,
    },
    Call {
        #[pin]
        future: S::Future,
    },
}

/// The response future of [`Router`].
#[pin_project]
pub struct ResponseFuture<S: Service<Request<BoxBody>>> {
    #[pin]
    state: State<S>,
    flags: ResponseFlags,
    route_headers: Option<Arc<Headers>>,
    target_headers: Option<Arc<Headers>>,
    /// The route's CORS policy and the allowed origin of this request.
    cors: Option<(Arc<CorsPolicy>, HeaderValue)>,
    /// The matched block's `statPrefix` counters, and when the upstream call started.
    stats: Option<Arc<RouteStats>>,
    started: Option<tokio::time::Instant>,
}

impl<S: Service<Request<BoxBody>>> std::fmt::Debug for ResponseFuture<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S: Service<Request<BoxBody>>> ResponseFuture<S> {
    fn reply(reply: Reply, route_headers: Option<Arc<Headers>>) -> Self {
        Self {
            state: State::Done(Some(reply)),
            flags: ResponseFlags::NONE,
            route_headers,
            target_headers: None,
            cors: None,
            stats: None,
            started: None,
        }
    }

    fn with_cors(mut self, cors: Option<(Arc<CorsPolicy>, HeaderValue)>) -> Self {
        self.cors = cors;
        self
    }

    fn error(err: impl Into<BoxError>) -> Self {
        Self::reply(Err(err.into()), None)
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>,
{
    type Output = Reply;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let mut this = self.project();
        let reply = loop {
            match this.state.as_mut().project() {
                StateProj::Done(reply) => {
                    break reply
                        .take()
                        .unwrap_or_else(|| Err("polled after completion".into()));
                }
                StateProj::Delay { sleep, next } => {
                    ready!(sleep.poll(cx));
                    // The delay is over: continue with the abort or the upstream call.
                    let next_state = match next.take() {
                        Some(Next::Dispatch { service, request }) => State::Ready {
                            service,
                            request: Some(request),
                        },
                        Some(Next::Reply(reply)) => State::Done(Some(reply)),
                        None => State::Done(None),
                    };
                    this.state.set(next_state);
                }
                StateProj::Ready { service, request } => {
                    if let Err(err) = ready!(service.poll_ready(cx)) {
                        break Err(err);
                    }
                    let Some(req) = request.take() else {
                        break Err("polled after completion".into());
                    };
                    let future = service.call(req);
                    if this.stats.is_some() {
                        *this.started = Some(tokio::time::Instant::now());
                    }
                    this.state.set(State::Call { future });
                }
                StateProj::Call { future } => break ready!(future.poll(cx)),
            }
        };
        this.state.set(State::Done(None));
        if let (Some(stats), Some(started)) = (this.stats.take(), this.started.take()) {
            let elapsed = started.elapsed();
            match &reply {
                Ok(res) => stats.record(res.status().as_u16(), elapsed),
                Err(e) => {
                    let e: &(dyn std::error::Error + 'static) = e.as_ref();
                    let timed_out = mesh_core::error::is_caused_by::<DeadlineExceeded>(e)
                        || mesh_core::error::is_caused_by::<PerTryTimeout>(e);
                    stats.record_failure(timed_out, elapsed);
                }
            }
        }
        Poll::Ready(reply.map(|mut res| {
            if let Some(h) = this.route_headers.as_deref() {
                h.response.apply(res.headers_mut());
            }
            if let Some(h) = this.target_headers.as_deref() {
                h.response.apply(res.headers_mut());
            }
            if let Some((policy, origin)) = this.cors.take() {
                policy.decorate(origin, res.headers_mut());
            }
            if !this.flags.is_empty() {
                add_response_flags(res.extensions_mut(), *this.flags);
            }
            res
        }))
    }
}

fn non_empty(h: &Arc<Headers>) -> Option<Arc<Headers>> {
    (!h.is_empty()).then(|| Arc::clone(h))
}

impl<S> Service<Request<BoxBody>> for Router<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        // Held for the whole request: a reload does not affect a request already routed.
        let snapshot = self.shared.load_full();
        self.dispatch(req, snapshot, None)
    }
}

impl<S> Router<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// The current snapshot (for a caller that resolves the virtual host itself and then
    /// calls [`dispatch`](Self::dispatch) with it).
    pub fn snapshot(&self) -> Arc<Snapshot<S>> {
        self.shared.load_full()
    }

    /// Routes `req` on `snapshot`; `virtual_host` is the index of the request's virtual
    /// host when the caller already resolved it on that snapshot
    /// ([`RouteTable::virtual_host_index`]), so the host is looked up once per request.
    pub fn dispatch(
        &mut self,
        mut req: Request<BoxBody>,
        snapshot: Arc<Snapshot<S>>,
        virtual_host: Option<usize>,
    ) -> ResponseFuture<S> {
        let default_port = req
            .extensions()
            .get::<ConnectionInfo>()
            .map(|c| c.local.port());
        let view = RequestView::from_request(&req, default_port);
        let selected = match virtual_host {
            Some(index) => snapshot.table.select_in(index, &view),
            None => snapshot.table.select(&view),
        };
        let Ok(selected) = selected else {
            return ResponseFuture::error(NoRoute);
        };
        let route = selected.route;
        // CORS comes before everything else the route does (Istio's filter order).
        let cors = match &route.cors {
            Some(policy) => match policy.check(req.method(), req.headers()) {
                CorsCheck::Pass => None,
                CorsCheck::Answer(res) => return ResponseFuture::reply(Ok(res), None),
                CorsCheck::Allowed(origin) => Some((Arc::clone(policy), origin)),
            },
            None => None,
        };
        let route_headers = non_empty(&route.headers);
        let weighted = match &route.action {
            RouteAction::Redirect(redirect) => {
                let res = redirect.response(&view, selected.matched.and_then(|m| m.uri.as_ref()));
                return ResponseFuture::reply(Ok(res), route_headers).with_cors(cors);
            }
            RouteAction::Direct(direct) => {
                return ResponseFuture::reply(Ok(direct.response()), route_headers).with_cors(cors);
            }
            RouteAction::Forward(weighted) => weighted,
        };
        let fault = if route.fault.is_active() {
            route.fault.decide(&mut self.rng)
        } else {
            Default::default()
        };
        let target = weighted.pick(&mut self.rng);
        let mut flags = ResponseFlags::NONE;
        if fault.delay.is_some() {
            flags.insert(ResponseFlags::DELAY_INJECTED);
        }

        let next = if let Some(abort) = fault.abort {
            Next::Reply(Ok(abort_response(abort)))
        } else {
            match &snapshot.slots[target.destination] {
                Slot::Missing(missing) => Next::Reply(Err(missing.clone().into())),
                Slot::Ready { target: t, .. } if !t.has_endpoints() => {
                    Next::Reply(Err(NoHealthyUpstream.into()))
                }
                Slot::Ready { service, .. } => {
                    if let Some(h) = &route_headers {
                        h.request.apply(req.headers_mut());
                    }
                    target.headers.request.apply(req.headers_mut());
                    if !route.rewrite.is_empty() {
                        route
                            .rewrite
                            .apply(&mut req, selected.matched.and_then(|m| m.uri.as_ref()));
                    }
                    if snapshot.policy_extension {
                        req.extensions_mut()
                            .insert(RoutePolicy::clone(&route.policy));
                    }
                    for m in &route.mirrors {
                        if !m.percent.roll(&mut self.rng) {
                            continue;
                        }
                        if let Slot::Ready { service, target } = &snapshot.slots[m.destination]
                            && target.has_endpoints()
                        {
                            let body = std::mem::replace(req.body_mut(), mesh_core::body::empty());
                            let (primary, copy) = mirror::tee(body);
                            *req.body_mut() = primary;
                            let copy = mirror::copy_request(&req, copy);
                            spawn_mirror(service.clone(), copy);
                        }
                    }
                    let service = match snapshot.stacks.get(target.stack) {
                        Some(Some(stack)) => stack.clone(),
                        _ => service.clone(),
                    };
                    Next::Dispatch {
                        service,
                        request: req,
                    }
                }
            }
        };
        // Only blocks with a `statPrefix` hold counters: nothing is cloned otherwise.
        let stats = match &next {
            Next::Dispatch { .. } => selected.matched.and_then(|m| m.stats.clone()),
            Next::Reply(_) => None,
        };
        let state = match (fault.delay, next) {
            (Some(delay), next) => State::Delay {
                sleep: tokio::time::sleep(delay),
                next: Some(next),
            },
            (None, Next::Reply(reply)) => State::Done(Some(reply)),
            (None, Next::Dispatch { service, request }) => State::Ready {
                service,
                request: Some(request),
            },
        };
        ResponseFuture {
            state,
            flags,
            route_headers,
            target_headers: non_empty(&target.headers),
            cors,
            stats,
            started: None,
        }
    }
}

/// Sends a mirrored request and discards the outcome.
fn spawn_mirror<S>(service: S, request: Request<BoxBody>)
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    tokio::spawn(MirrorFuture {
        response: ResponseFuture {
            state: State::Ready {
                service,
                request: Some(request),
            },
            flags: ResponseFlags::NONE,
            route_headers: None,
            target_headers: None,
            cors: None,
            stats: None,
            started: None,
        },
        draining: None,
    });
}

/// Drives a mirrored request and drains its response; a hand-written future so that it
/// is `Send` for any `S` whose future is.
#[pin_project]
struct MirrorFuture<S: Service<Request<BoxBody>>> {
    #[pin]
    response: ResponseFuture<S>,
    draining: Option<BoxBody>,
}

impl<S> Future for MirrorFuture<S>
where
    S: Service<Request<BoxBody>, Response = Response<BoxBody>, Error = BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            if let Some(body) = this.draining.as_mut() {
                // Drain so the upstream connection can be reused.
                match ready!(Pin::new(body).poll_frame(cx)) {
                    Some(Ok(_)) => continue,
                    _ => return Poll::Ready(()),
                }
            }
            match ready!(this.response.as_mut().poll(cx)) {
                Ok(res) => *this.draining = Some(res.into_body()),
                Err(err) => {
                    tracing::debug!(%err, "mirrored request failed");
                    return Poll::Ready(());
                }
            }
        }
    }
}
