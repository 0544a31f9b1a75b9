//! The inbound stack: requests a workload receives, from mTLS accept to the
//! application.
//!
//! # Layer placement
//!
//! ```text
//! TLS accept per PeerAuthentication ([`accept`]: STRICT requires a client certificate;
//!   PERMISSIVE takes TLS or plaintext; DISABLE plaintext)
//!   -> connection extensions (PeerIdentity, ConnectionInfo) ([`per_connection`])
//!   -> sanitize (identity/internal headers from the client removed, `_` names refused;
//!      the peer's Istio metadata kept as an extension when its mTLS identity vouches for it;
//!      `X-Forwarded-Client-Cert` set from the verified caller, `SANITIZE_SET`)
//!   -> telemetry (reporter=destination; `source_*` labels from that metadata; answers
//!      with this workload's metadata) -> respond -> RequestAuthentication (JWT)
//!   -> AuthorizationPolicy -> application
//! ```
//!
//! A plaintext connection to a STRICT port is closed before any HTTP is read; a failed
//! handshake closes the connection. The mode is read per connection from the current
//! PeerAuthentication snapshot, for the application's port.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::body::BoxBody;
use mesh_core::error::BoxError;
use mesh_telemetry::{DestinationService, Telemetry, TelemetryLayer};
use mesh_tls::authz::{AuthzLayer, NormalizeOptions, PathNormalization, PolicyHandle};
use mesh_tls::{
    ConnectionContext, ConnectionExtensionsLayer, InboundAcceptor, MeshStream,
    WorkloadPeerAuthentication,
};
use tokio::net::TcpStream;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, ServiceExt};

use super::headers::{EdgeHeaders, Sanitize};
use super::{HttpService, authn_response, authz_response, boxed_request, boxed_response};
use crate::respond::Respond;

/// An application the inbound stack can wrap: a cloneable tower service of
/// `Request<BoxBody>` (axum's `Router` and tonic's services after a body map, or a
/// `service_fn`), answering with any [`ApplicationBody`].
pub trait Application<B>:
    tower::Service<
        Request<BoxBody>,
        Response = Response<B>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> Application<B> for S
where
    S: tower::Service<Request<BoxBody>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
}

/// A response body of an [`Application`].
pub trait ApplicationBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<BoxError>> + Send + Sync + 'static
{
}

impl<B> ApplicationBody for B
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
}

/// The inbound stack around `app` (shared by all connections).
pub fn service<S, B>(
    telemetry: &Telemetry,
    service_host: &str,
    authz: PolicyHandle,
    authn: mesh_tls::authn::AuthnHandle,
    normalization: PathNormalization,
    edge: EdgeHeaders,
    app: S,
) -> HttpService
where
    S: Application<B>,
    B: ApplicationBody,
{
    let authorized = ServiceBuilder::new()
        .map_response(authn_response)
        .layer(mesh_tls::authn::AuthnLayer::from_handle(authn))
        .map_response(authz_response)
        .layer(
            AuthzLayer::from_handle(authz)
                .normalization(NormalizeOptions::new(normalization))
                .trusted_proxies(edge.num_trusted_proxies),
        )
        .service(app.map_response(boxed_response).map_err(Into::into));
    let recorded = ServiceBuilder::new()
        .map_response(boxed_response)
        .layer(TelemetryLayer::inbound(
            telemetry,
            DestinationService::from_host(service_host),
        ))
        .map_request(boxed_request)
        .service(Respond::new(authorized));
    BoxCloneSyncService::new(Sanitize::inbound(recorded).edge(edge))
}

/// The per-connection service over `svc` for a connection with `context`.
pub fn per_connection(
    svc: HttpService,
    context: ConnectionContext,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<BoxBody>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    ConnectionExtensionsLayer::new(context)
        .layer(svc.map_request(|req: Request<Incoming>| boxed_request(req)))
}

/// Accepts a connection per the current PeerAuthentication mode of `app_port`.
pub async fn accept(
    acceptor: InboundAcceptor,
    modes: Arc<ArcSwap<WorkloadPeerAuthentication>>,
    app_port: u16,
    tcp: TcpStream,
) -> Option<(MeshStream, ConnectionContext)> {
    let mode = modes.load().mode(app_port);
    match acceptor.accept(tcp, mode).await {
        Ok(conn) => Some((conn.io, conn.context)),
        Err(e) => {
            tracing::debug!(error = %e, %mode, "inbound connection refused");
            None
        }
    }
}
