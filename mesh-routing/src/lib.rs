//! Routing as configuration: VirtualService route tables, weighted subset routing, the
//! service registry and fault injection.
//!
//! # Behaviour
//!
//! A [`RouteTable`] holds the compiled HTTP routes of one listener (the sidecar's `mesh`
//! or one gateway): hosts (exact, `*.suffix`, `*`) to ordered routes whose match blocks are
//! ORed and whose conditions are ANDed; the first matching route wins. A route forwards to
//! weighted destinations ([`Weighted`]), or answers with a redirect or a direct response,
//! and carries fault injection, header operations, rewrites and mirrors.
//!
//! Destinations are (host, subset, port). The [`Registry`] knows hosts, ports and
//! endpoints (from `ServiceEntry`, static or DNS); [`DestinationRules`] know subsets (label
//! selectors) and their traffic policies. The [`RouterHandle`] turns a [`Routing`] (table +
//! registry + rules) into an immutable [`Snapshot`] with one service per destination,
//! swaps snapshots atomically on [`RouterHandle::update`], and keeps destination services
//! across reloads. The [`Router`] service routes each request on the snapshot it started
//! with.
//!
//! # Layer placement
//!
//! `telemetry -> Router -> (per destination) deadline -> retry -> balancer -> endpoint`.
//! The router leaves the route's [`RoutePolicy`](mesh_core::extensions::RoutePolicy) in the
//! request extensions for the deadline and retry layers; the per-destination stack gets its
//! endpoints and merged DestinationRule policy from its [`Target`].
//!
//! # Errors
//!
//! The router fails requests with mesh-core's leaf errors, which the proxy maps to
//! Istio's answers: [`NoRoute`](mesh_core::error::NoRoute) (404 `NR`),
//! [`ClusterNotFound`](mesh_core::error::ClusterNotFound) (503 `NC`) and
//! [`NoHealthyUpstream`](mesh_core::error::NoHealthyUpstream) (503 `UH`). Fault aborts,
//! redirects and direct responses are ordinary responses (aborts flagged `FI`, delays `DI`).
//!
//! # Choices that differ from Istio
//!
//! - A host with no VirtualService is routed to its service (Istio's default route) only
//!   when the registry knows it; unknown hosts get 404 `NR` instead of passthrough.
//! - A destination without a port uses the service's first port.
//! - Destination services are kept across reloads while their (host, subset, port) is
//!   still named by some route; a changed DestinationRule policy is published to the
//!   kept service through its [`Target`] rather than by rebuilding it.
//! - When several VirtualServices claim the same host on one listener, the first loaded
//!   keeps it (Istio merges them on gateways). `exportTo` is applied before compiling
//!   ([`MeshConfig::exported_to`](mesh_core::config::MeshConfig::exported_to)).
//! - `corsPolicy` is applied first on a selected route ([`cors`]): allowed preflights
//!   are answered by the proxy, allowed requests' responses decorated.
//! - Not routed here: `tcp`/`tls` routes (no HTTP
//!   routes result), JWT-claim matches (`@request.auth.claims.*`, ignored).
//! - Mirrored requests keep their trace headers as they are.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response};
//! use mesh_core::body::{self, BoxBody};
//! use mesh_core::error::BoxError;
//! use mesh_routing::{Naming, Registry, RouteTable, Router, RouterHandle, Routing, ServicePort, Target, WorkloadEntry, table};
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let host = "reviews.default.svc.cluster.local";
//! let mut registry = Registry::new();
//! registry.insert_static(host, ServicePort::new(9080, "http"), vec![WorkloadEntry::new("10.0.0.7")]);
//! let mut builder = RouteTable::builder(Naming::default());
//! let dest = builder.destination(table::DestinationKey::new(host, None, None));
//! builder.virtual_host(table::VirtualHost {
//!     name: "default/reviews".into(),
//!     hosts: vec![host.into()],
//!     routes: vec![table::default_route(dest)],
//!     tcp: Vec::new(),
//!     tls: Vec::new(),
//! });
//! let routing = Routing { table: builder.build(), registry, ..Routing::default() };
//!
//! // Each destination gets its own service; this one answers with the endpoint it would use.
//! let make = |target: &Arc<Target>| {
//!     let target = Arc::clone(target);
//!     service_fn(move |_req: Request<BoxBody>| {
//!         let ep = target.endpoints()[0].address.to_string();
//!         async move { Ok::<_, BoxError>(Response::new(body::full(ep))) }
//!     })
//! };
//! let handle = RouterHandle::new(make, routing);
//! let req = Request::get("http://reviews:9080/").body(body::empty()).unwrap();
//! let res = handle.router().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```

pub mod compile;
pub mod cors;
mod delegate;
pub mod dns;
pub mod fault;
pub mod headers;
pub mod matcher;
pub mod mirror;
pub mod registry;
pub mod rewrite;
pub mod router;
pub mod stats;
pub mod subset;
pub mod table;
pub mod weighted;

pub use compile::{CompileOptions, Listener};
pub use fault::{AbortStatus, FaultPolicy, Percent};
pub use headers::{HeaderOps, Headers};
pub use matcher::{HeaderMatch, QueryParamMatch, RequestView, RouteMatch, StringMatch, UriMatch};
pub use registry::{PortProtocol, Registry, Resolution, Service, ServicePort, WorkloadEntry};
pub use rewrite::{DirectResponse, Redirect, RedirectPort, Rewrite};
pub use router::{
    MakeDestination, ResolvedDestination, ResponseFuture, Router, RouterHandle, Routing, Snapshot,
    Target,
};
pub use subset::{DestinationRule, DestinationRules, ResolvedPolicy, Subset};
pub use table::{
    CompileError, DestinationKey, L4Addresses, Naming, Route, RouteAction, RouteStack, RouteTable,
    Selected, VirtualHost,
};
pub use weighted::{WeightError, Weighted};
