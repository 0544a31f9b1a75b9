//! The xDS server of `discovery`: each proxy receives the Istio configuration its
//! workload may see, on every change.
//!
//! # Behaviour
//!
//! [`AdsServer`] serves Envoy's aggregated discovery service (state of the world) for
//! one resource type, [`TYPE_URL`](crate::control::xds::TYPE_URL) (see
//! [`control::xds`](crate::control::xds) for the client and the reasons for one type).
//!
//! - **Who is asking** comes from the client certificate of the mTLS connection
//!   ([`PeerInfo`], put there by [`serve`]), never from the node the proxy describes: a
//!   stream without a verified workload certificate is refused with `Unauthenticated`.
//! - **What it may see** (ISTIO.md SR-30, SR-34): VirtualServices, DestinationRules and
//!   ServiceEntries (the Kubernetes Services among them) exported to the proxy's
//!   namespace (`exportTo` unset or `*`: everywhere; `.`: their own namespace; names:
//!   those namespaces); PeerAuthentications and AuthorizationPolicies of its namespace
//!   and of the root namespace; every Gateway (gateway workloads select theirs by
//!   label). The proxy itself then applies Istio's lookup rules (SR-31) and selectors.
//! - **Versions.** A view's version is a hash of its content, so every replica of
//!   `discovery` gives the same version for the same view: a proxy that reconnects to
//!   another replica holding the same configuration is not pushed again.
//! - **Pushes.** The first request of a stream is answered with the current view; after
//!   that a proxy is pushed when the catalog changes and its view with it (a change in a
//!   namespace it cannot see does not reach it). ACKs and NACKs are matched by nonce; a
//!   NACK is logged with the proxy's diagnostics and counted.
//! - **Metrics** (Istio's names): `pilot_xds` (connected proxies), `pilot_xds_pushes`
//!   (responses sent), `pilot_total_xds_rejects` (NACKs); the two counters are exposed
//!   as OpenMetrics counters, with the `_total` suffix.
//!
//! The delta protocol is not served (`Unimplemented`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::Stream;
use mesh_core::Identity;
use mesh_core::config::AnyResource;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::control::xds::{IstioResource, TYPE_URL};

/// Every valid Istio object `discovery` knows, each encoded once.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Increases with every change.
    pub generation: u64,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    resource: AnyResource,
    any: Any,
    hash: u64,
}

impl Catalog {
    /// The catalog of `resources` (their order does not matter). A resource that cannot
    /// be serialized is left out and logged.
    pub fn new(generation: u64, resources: Vec<AnyResource>) -> Self {
        let mut entries: Vec<Entry> = resources
            .into_iter()
            .filter_map(|resource| {
                let item = match IstioResource::new(&resource, String::new()) {
                    Ok(item) => item,
                    Err(e) => {
                        tracing::error!(resource = %resource.display_name(), error = %e, "cannot serialize; left out");
                        return None;
                    }
                };
                let mut h = std::hash::DefaultHasher::new();
                item.yaml.hash(&mut h);
                let hash = h.finish();
                let item = IstioResource {
                    version: format!("{hash:016x}"),
                    ..item
                };
                Some(Entry {
                    any: item.to_any(),
                    resource,
                    hash,
                })
            })
            .collect();
        entries.sort_by(|a, b| {
            let key = |e: &Entry| {
                let m = e.resource.metadata();
                (
                    e.resource.kind().as_str(),
                    m.namespace.clone(),
                    m.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        Self {
            generation,
            entries,
        }
    }

    /// How many objects it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What a proxy in `namespace` may see (see the module docs).
    pub fn view(&self, namespace: &str, root_namespace: &str) -> View {
        let mut h = std::hash::DefaultHasher::new();
        let mut resources = Vec::new();
        for e in &self.entries {
            if visible(&e.resource, namespace, root_namespace) {
                e.hash.hash(&mut h);
                resources.push(e.any.clone());
            }
        }
        View {
            version: format!("{:016x}", h.finish()),
            resources,
        }
    }
}

/// The objects one namespace's proxies receive, and their version.
#[derive(Clone, Debug)]
pub struct View {
    /// Content hash of the view.
    pub version: String,
    /// The packed objects.
    pub resources: Vec<Any>,
}

/// Whether `resource` is visible to a proxy in `namespace`.
pub fn visible(resource: &AnyResource, namespace: &str, root_namespace: &str) -> bool {
    let exported = |export_to: &[String], own: &str| {
        export_to.is_empty()
            || export_to
                .iter()
                .any(|e| e == "*" || (e == "." && own == namespace) || (e != "." && e == namespace))
    };
    match resource {
        AnyResource::VirtualService(r) => exported(&r.spec.export_to, r.namespace()),
        AnyResource::DestinationRule(r) => exported(&r.spec.export_to, r.namespace()),
        AnyResource::ServiceEntry(r) => exported(&r.spec.export_to, r.namespace()),
        AnyResource::Gateway(_) => true,
        AnyResource::PeerAuthentication(r) => {
            r.namespace() == namespace || r.namespace() == root_namespace
        }
        AnyResource::AuthorizationPolicy(r) => {
            r.namespace() == namespace || r.namespace() == root_namespace
        }
    }
}

/// The identity and address of the connection a request came on (set by [`serve`]).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's verified SPIFFE identity, when it presented a certificate.
    pub identity: Option<Identity>,
    /// The certificates it presented (leaf first); empty without one.
    pub certificates: Arc<[rustls_pki_types::CertificateDer<'static>]>,
    /// The client's address.
    pub remote: SocketAddr,
}

/// The xDS server's counters (Istio's names).
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    clients: Gauge,
    pushes: Family<Vec<(String, String)>, Counter>,
    rejects: Family<Vec<(String, String)>, Counter>,
}

impl XdsMetrics {
    /// Registers the counters in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("pilot_xds", "Connected xDS clients", self.clients.clone());
        registry.register(
            "pilot_xds_pushes",
            "xDS responses sent, by type",
            self.pushes.clone(),
        );
        registry.register(
            "pilot_total_xds_rejects",
            "xDS responses rejected by proxies, by type",
            self.rejects.clone(),
        );
    }

    fn label() -> Vec<(String, String)> {
        vec![("type".to_owned(), "istio".to_owned())]
    }
}

/// The aggregated discovery service over a [`Catalog`] that changes.
#[derive(Clone, Debug)]
pub struct AdsServer {
    catalog: watch::Receiver<Arc<Catalog>>,
    root_namespace: String,
    metrics: XdsMetrics,
    views: Arc<Mutex<HashMap<String, (u64, View)>>>,
}

impl AdsServer {
    /// Serves `catalog`; selector-less policies of `root_namespace` reach every proxy.
    pub fn new(catalog: watch::Receiver<Arc<Catalog>>, root_namespace: impl Into<String>) -> Self {
        Self {
            catalog,
            root_namespace: root_namespace.into(),
            metrics: XdsMetrics::default(),
            views: Arc::default(),
        }
    }

    /// The server's counters (to register them).
    pub fn metrics(&self) -> &XdsMetrics {
        &self.metrics
    }

    /// The tonic service.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(16 * 1024 * 1024)
    }

    /// The view for `namespace` of `catalog`, computed once per catalog generation.
    fn view(&self, catalog: &Catalog, namespace: &str) -> View {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, view)) = views.get(namespace)
            && *generation == catalog.generation
        {
            return view.clone();
        }
        let view = catalog.view(namespace, &self.root_namespace);
        views.insert(namespace.to_owned(), (catalog.generation, view.clone()));
        view
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let Some((identity, namespace)) = peer.as_ref().and_then(|p| {
            let id = p.identity.clone()?;
            let ns = id.namespace()?.to_owned();
            Some((id, ns))
        }) else {
            return Err(Status::unauthenticated(
                "xDS needs a workload certificate (mTLS)",
            ));
        };
        let remote = peer.map(|p| p.remote);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DiscoveryResponse, Status>>(2);
        let server = self.clone();
        tokio::spawn(async move {
            server.metrics.clients.inc();
            let mut catalog = server.catalog.clone();
            let mut subscribed = false;
            let mut nonce: u64 = 0;
            let mut sent: Option<String> = None;
            let mut node_id = String::new();
            loop {
                let push = tokio::select! {
                    request = inbound.message() => {
                        let request = match request {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(%identity, error = %e, "xDS stream ended");
                                break;
                            }
                        };
                        if let Some(node) = &request.node {
                            node_id.clone_from(&node.id);
                        }
                        if request.type_url != TYPE_URL {
                            tracing::debug!(%identity, type_url = %request.type_url, "unknown type; ignored");
                            continue;
                        }
                        if request.response_nonce.is_empty() {
                            // A new subscription: answered unless it already holds the view.
                            subscribed = true;
                            let view = server.view(&catalog.borrow_and_update(), &namespace);
                            (view.version != request.version_info).then_some(view)
                        } else {
                            if request.response_nonce == nonce.to_string() {
                                if let Some(status) = &request.error_detail {
                                    server.metrics.rejects.get_or_create(&XdsMetrics::label()).inc();
                                    tracing::warn!(%identity, node = %node_id, ?remote, version = ?sent, "proxy rejected the configuration:\n{}", status.message);
                                } else {
                                    tracing::debug!(%identity, version = %request.version_info, "acknowledged");
                                }
                            }
                            None
                        }
                    }
                    changed = catalog.changed(), if subscribed => {
                        if changed.is_err() {
                            break;
                        }
                        let view = server.view(&catalog.borrow_and_update(), &namespace);
                        (sent.as_deref() != Some(view.version.as_str())).then_some(view)
                    }
                };
                let Some(view) = push else { continue };
                nonce += 1;
                let response = DiscoveryResponse {
                    version_info: view.version.clone(),
                    resources: view.resources,
                    type_url: TYPE_URL.to_owned(),
                    nonce: nonce.to_string(),
                    ..DiscoveryResponse::default()
                };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
                server
                    .metrics
                    .pushes
                    .get_or_create(&XdsMetrics::label())
                    .inc();
                sent = Some(view.version);
            }
            server.metrics.clients.dec();
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "the delta protocol is not served; use StreamAggregatedResources",
        ))
    }
}

/// A TLS connection with the identity its client proved.
#[pin_project::pin_project]
pub struct PeerStream {
    #[pin]
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().stream.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().stream.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().stream.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serves gRPC `routes` on `listener` over TLS until `shutdown`: the server presents
/// `tls`'s certificate; clients may present a workload certificate (verified against
/// the mesh's roots; its identity reaches the services as [`PeerInfo`]) or none (the
/// certificate service then authenticates them by token). Handshakes that fail or take
/// longer than 10 s are dropped without affecting other clients.
pub async fn serve(
    listener: TcpListener,
    tls: mesh_tls::ServerTls,
    routes: tonic::service::Routes,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let tls = tls.client_certificate_optional();
    let (tx, rx) = mpsc::channel::<Result<PeerStream, std::io::Error>>(64);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = tls.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept_any(tcp));
                match handshake.await {
                    Ok(Ok((stream, leaf))) => {
                        let certificates = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                            .unwrap_or_default();
                        let info = PeerInfo {
                            identity: leaf.map(|l| l.identity),
                            certificates,
                            remote,
                        };
                        let _ = tx.send(Ok(PeerStream { stream, info })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %mesh_tls::verify::describe(&e), "TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
