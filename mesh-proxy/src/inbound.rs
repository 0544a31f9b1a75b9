//! The inbound path: mTLS per PeerAuthentication, peer identity, telemetry,
//! authorization, then the local application.
//!
//! # Layer placement
//!
//! ```text
//! TLS accept (STRICT: client certificate required; PERMISSIVE: TLS or plaintext;
//!   DISABLE: plaintext) -> connection extensions (PeerIdentity, ConnectionInfo)
//!   -> sanitize (identity/internal headers from the client removed, `_` names refused)
//!   -> telemetry (reporter=destination) -> respond -> AuthorizationPolicy -> application
//! ```
//!
//! A plaintext connection to a STRICT port is closed before any HTTP is read; a failed
//! handshake closes the connection. The mode is read per connection from the current
//! PeerAuthentication snapshot, for the application's port.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use mesh_core::body::{self, BoxBody};
use mesh_core::error::BoxError;
use mesh_telemetry::{DestinationService, Telemetry, TelemetryLayer};
use mesh_tls::authz::{AuthzLayer, NormalizeOptions, PathNormalization, PolicyHandle};
use mesh_tls::{
    ConnectionExtensionsLayer, InboundAcceptor, MeshStream, WorkloadPeerAuthentication,
};
use tokio::net::TcpStream;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::outbound::AppClient;
use crate::respond::Respond;
use crate::serve::Sanitize;

/// The HTTP service type the listeners serve (after the per-connection layers).
pub type HttpService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Boxes any request body into [`BoxBody`].
pub fn boxed_request<B>(req: Request<B>) -> Request<BoxBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    req.map(body::boxed)
}

/// The inbound HTTP service (shared by all connections).
pub fn service(
    telemetry: &Telemetry,
    service_host: &str,
    authz: PolicyHandle,
    normalization: PathNormalization,
    app: SocketAddr,
    app_h2: bool,
) -> HttpService {
    let authorized = ServiceBuilder::new()
        .map_response(|res: Response<_>| res.map(body::boxed))
        .layer(AuthzLayer::from_handle(authz).normalization(NormalizeOptions::new(normalization)))
        .service(AppClient::new(app, app_h2));
    let recorded = ServiceBuilder::new()
        .map_response(|res: Response<_>| res.map(body::boxed))
        .layer(TelemetryLayer::inbound(
            telemetry,
            DestinationService::from_host(service_host),
        ))
        .map_request(boxed_request)
        .service(Respond::new(authorized));
    BoxCloneSyncService::new(Sanitize::new(recorded, true))
}

/// The per-connection service over `svc` for a connection with `context`.
pub fn per_connection(
    svc: HttpService,
    context: mesh_tls::ConnectionContext,
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
) -> Option<(MeshStream, mesh_tls::ConnectionContext)> {
    let mode = modes.load().mode(app_port);
    match acceptor.accept(tcp, mode).await {
        Ok(conn) => Some((conn.io, conn.context)),
        Err(e) => {
            tracing::debug!(error = %e, %mode, "inbound connection refused");
            None
        }
    }
}
