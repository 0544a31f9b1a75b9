//! The inbound server: the callee's side of every hop.
//!
//! `TLS accept per PeerAuthentication -> peer identity into the request -> telemetry
//! (reporter=destination) -> authorization (AuthorizationPolicy) -> application`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::{Request, Response};
use mesh_core::body::BoxBody;
use mesh_core::config::MeshConfig;
use mesh_core::error::BoxError;
use mesh_telemetry::{DestinationService, RequestBody, Telemetry, TelemetryLayer};
use mesh_tls::authz::PolicyHandle;
use mesh_tls::{
    AuthzLayer, InboundAcceptor, PeerAuthentication, PolicySet, WorkloadPeerAuthentication,
    serve_connection,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use super::outbound::{box_request, box_response};

type InboundService =
    BoxCloneSyncService<Request<hyper::body::Incoming>, Response<BoxBody>, BoxError>;

/// The application behind the inbound path.
pub type AppService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Who a workload is: the facts PeerAuthentication and AuthorizationPolicy select on.
#[derive(Clone, Debug)]
pub struct WorkloadId {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Labels (`app`, `version`).
    pub labels: BTreeMap<String, String>,
    /// The Kubernetes service host it serves (`payment-service.production.svc.cluster.local`).
    pub service_host: String,
}

/// The inbound policies of one workload, compiled from configuration and swappable.
#[derive(Clone, Debug)]
pub struct InboundPolicy {
    peer_auth: std::sync::Arc<arc_swap::ArcSwap<WorkloadPeerAuthentication>>,
    authz: PolicyHandle,
}

impl InboundPolicy {
    /// Compiles `config` for `workload`.
    pub fn new(config: &MeshConfig, workload: &WorkloadId) -> Result<Self, BoxError> {
        let (pa, set) = compile(config, workload)?;
        Ok(Self {
            peer_auth: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(pa)),
            authz: PolicyHandle::new(set),
        })
    }

    /// Swaps in policies compiled from a new configuration.
    pub fn update(&self, config: &MeshConfig, workload: &WorkloadId) -> Result<(), BoxError> {
        let (pa, set) = compile(config, workload)?;
        self.peer_auth.store(std::sync::Arc::new(pa));
        self.authz.store(set);
        Ok(())
    }
}

fn compile(
    config: &MeshConfig,
    workload: &WorkloadId,
) -> Result<(WorkloadPeerAuthentication, PolicySet), BoxError> {
    let pa =
        PeerAuthentication::from_config(config).for_workload(&workload.namespace, &workload.labels);
    let set = PolicySet::from_config(config, &workload.namespace, &workload.labels)?;
    Ok((pa, set))
}

/// Serves `app` on `listener` behind the inbound path, until the task is aborted.
/// Refused connections (plaintext under STRICT, a bad certificate) are counted in
/// `refused` and closed.
pub fn serve(
    listener: TcpListener,
    acceptor: InboundAcceptor,
    policy: InboundPolicy,
    telemetry: &Telemetry,
    service_host: &str,
    app: AppService,
) -> JoinHandle<()> {
    let telemetry_layer =
        TelemetryLayer::inbound(telemetry, DestinationService::from_host(service_host));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let port = tcp.local_addr().map_or(0, |a: SocketAddr| a.port());
            let mode = policy.peer_auth.load().mode(port);
            let acceptor = acceptor.clone();
            let svc = ServiceBuilder::new()
                .map_response(box_response)
                .map_request(box_request::<hyper::body::Incoming>)
                .layer(telemetry_layer.clone())
                .layer(AuthzLayer::from_handle(policy.authz.clone()))
                .map_request(box_request::<RequestBody<BoxBody>>)
                .service(app.clone());
            let svc: InboundService = BoxCloneSyncService::new(svc);
            tokio::spawn(async move {
                let Ok(conn) = acceptor.accept(tcp, mode).await else {
                    return;
                };
                let _ = serve_boxed(conn, svc).await;
            });
        }
    })
}

/// Serves one connection; boxed so that the spawned task's type is concrete.
fn serve_boxed(
    conn: mesh_tls::AcceptedConnection,
    svc: InboundService,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>> {
    Box::pin(serve_connection(conn, svc))
}
