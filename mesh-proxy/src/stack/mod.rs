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
//! - [`client`]: the one HTTP client every upstream path ends in;
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

use http::{Request, Response};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::BoxError;
use tower::util::BoxCloneSyncService;

pub use client::HttpClient;
pub use destination::{DestinationState, Destinations, MakeDest, RouteService};
pub use outbound::{MeshRouter, Outbound, OutboundMode};

/// The HTTP service type listeners serve (after the per-connection layers).
pub type HttpService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Boxes any request body into [`BoxBody`].
pub fn boxed_request<B>(req: Request<B>) -> Request<BoxBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    req.map(body::boxed)
}

/// Boxes any response body into [`BoxBody`].
pub fn boxed_response<B>(res: Response<B>) -> Response<BoxBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    res.map(body::boxed)
}
