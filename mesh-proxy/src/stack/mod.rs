//! The composed stacks: what a request goes through, as tower services that need no
//! listener. The sidecar's listeners, the gateway's and an embedding application all
//! serve these same services (usually through [`Mesh`](crate::Mesh)).
//!
//! - [`outbound`]: a workload's requests out (telemetry, routing, then per route and
//!   destination the resilience layers of [`destination`], mTLS per endpoint);
//! - [`inbound`]: requests in (mTLS accept, identity, sanitizing, telemetry,
//!   authorization, the application);
//! - [`gateway`]: requests a Gateway server accepted (the SNI's server kept, HTTPS
//!   redirects, the Gateway's routes, then the outbound path's per-route stacks);
//! - [`tcp`]: TCP connections out to a service's port and in from mesh peers, and TLS
//!   passed through by SNI;
//! - [`client`]: the one HTTP client every upstream path ends in;
//! - [`upstream`]: which transport each endpoint gets (DestinationRule `tls`, auto-mTLS);
//! - [`headers`]: hop-by-hop and untrusted header handling at the edges.
//!
//! Bodies are boxed at the edges, with [`boxed_request`] and [`boxed_response`]
//! (mesh-core's one body type), so every layer inside sees [`BoxBody`].

pub mod client;
pub mod destination;
pub mod gateway;
pub mod headers;
pub mod inbound;
pub mod outbound;
pub mod tcp;
pub mod upstream;

use std::future::{Future, Ready};
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::BoxError;
use pin_project::pin_project;
use tower::util::BoxCloneSyncService;

pub use client::HttpClient;
pub use destination::{DestinationState, Destinations, MakeDest, RouteService};
pub use outbound::{MeshRouter, Outbound, OutboundMode, OutboundPolicy};

/// The HTTP service type listeners serve (after the per-connection layers).
pub type HttpService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Boxes any request body into [`BoxBody`]; called by a listener's service, the body
/// gets the listener's stream limits ([`client::Bounded`]: body size, stream idle and
/// request timeouts) on the way.
pub fn boxed_request<B>(req: Request<B>) -> Request<BoxBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    // A body boxed already was bounded where it was boxed first (and boxing it again
    // would cost an allocation per request).
    let boxed = std::any::TypeId::of::<B>() == std::any::TypeId::of::<BoxBody>();
    match client::downstream_limits() {
        Some(limits) if limits.bounds_requests() && !boxed => {
            req.map(|b| body::boxed(client::Bounded::downstream(b, &limits)))
        }
        _ => req.map(body::boxed),
    }
}

/// Boxes any response body into [`BoxBody`].
pub fn boxed_response<B>(res: Response<B>) -> Response<BoxBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    res.map(body::boxed)
}

/// [`boxed_response`] after the AuthorizationPolicy layer: an allowed request's body is
/// the inner service's box, passed on as it is; only a local reply is boxed.
pub fn authz_response(res: Response<mesh_tls::authz::AuthzBody<BoxBody>>) -> Response<BoxBody> {
    res.map(|b| b.into_inner().unwrap_or_else(body::boxed))
}

/// [`boxed_response`] after the RequestAuthentication layer: the inner service's box
/// passes as it is; only a local `401` is boxed.
pub fn authn_response(res: Response<mesh_tls::authn::AuthnBody<BoxBody>>) -> Response<BoxBody> {
    res.map(|b| match b {
        http_body_util::Either::Left(inner) => inner,
        http_body_util::Either::Right(local) => body::boxed(local),
    })
}

/// The response future of the services that end in the router (outbound and gateway):
/// routed, passed through to a host outside the mesh, or answered locally. Routed
/// requests, the common case, are kept inline rather than boxed: a large future moved
/// once costs less than an allocation per request.
#[pin_project(project = RouteFutureProj)]
#[allow(clippy::large_enum_variant)]
pub enum RouteFuture {
    /// Routed by the VirtualServices.
    Routed(#[pin] mesh_routing::ResponseFuture<RouteService>),
    /// Sent to a host outside the mesh.
    Passthrough(#[pin] client::ResponseFuture),
    /// Answered locally (a redirect, a malformed request, `REGISTRY_ONLY`).
    Local(#[pin] Ready<Result<Response<BoxBody>, BoxError>>),
}

impl RouteFuture {
    /// A local answer or error.
    pub fn local(result: Result<Response<BoxBody>, BoxError>) -> Self {
        Self::Local(std::future::ready(result))
    }
}

impl Future for RouteFuture {
    type Output = Result<Response<BoxBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteFutureProj::Routed(f) => f.poll(cx),
            RouteFutureProj::Passthrough(f) => f.poll(cx),
            RouteFutureProj::Local(f) => f.poll(cx),
        }
    }
}

/// A request for unit tests: `uri`, with `Host: host` when given.
#[cfg(test)]
pub(crate) fn test_request(uri: &str, host: Option<&str>) -> Request<BoxBody> {
    let mut b = Request::builder().uri(uri);
    if let Some(h) = host {
        b = b.header(http::header::HOST, h);
    }
    b.body(body::empty()).expect("a valid request")
}
