//! The xDS server of `discovery`: each proxy receives the Istio configuration its
//! workload may see, on every change.
//!
//! # Behaviour
//!
//! [`AdsServer`] serves Envoy's aggregated discovery service (state of the world) for
//! one resource type, [`TYPE_URL`] (see
//! [`control::xds`](crate::control::xds) for the client and the reasons for one type).
//!
//! - **Who is asking** comes from the client certificate of the mTLS connection
//!   ([`PeerInfo`], put there by [`serve`]), never from the node the proxy describes: a
//!   stream without a verified workload certificate is refused with `Unauthenticated`.
//! - **What it may see** (ISTIO.md SR-30, SR-34): VirtualServices, DestinationRules and
//!   ServiceEntries (the Kubernetes Services among them) exported to the proxy's
//!   namespace (`exportTo` unset or `*`: everywhere; `.`: their own namespace; names:
//!   those namespaces); every PeerAuthentication (a client's auto-mTLS reads the
//!   server's mode, SR-24; istiod marks the endpoints it sends instead);
//!   AuthorizationPolicies of its namespace and of the root namespace; every Gateway
//!   (gateway workloads select theirs by label); WorkloadEntries selected by a ServiceEntry it receives; Sidecars of its
//!   namespace and the selector-less ones of the root namespace. The proxy itself then
//!   applies Istio's lookup rules (SR-31) and selectors.
//! - **What it imports** (SR-32, SR-33): the `Sidecar` that applies to the proxy's
//!   workload (one of its namespace selecting its labels, else its namespace's
//!   selector-less one, else the root namespace's) narrows that further: a
//!   ServiceEntry or VirtualService is sent only when one of its hosts is imported by
//!   the Sidecar's egress hosts (`namespace/dnsName`, the namespace being the object's;
//!   `.` the proxy's own, also for the root namespace's default Sidecar),
//!   a DestinationRule only when its host is a host of a ServiceEntry sent, a
//!   WorkloadEntry only when a ServiceEntry sent selects it. Without a Sidecar the proxy
//!   receives everything visible to its namespace. Sidecars never apply to gateways
//!   (node id `router~...`).
//! - **Labels** come from the node's metadata `LABELS`, as istiod reads them: a proxy
//!   is trusted to state its own labels. Its namespace still comes from its certificate,
//!   so a false label can only choose another Sidecar of its own namespace, which
//!   narrows what it receives and never widens it past its namespace's visibility.
//! - **Views are shared**: proxies of one namespace selected by the same Sidecar (or by
//!   none) get one view, computed once per catalog generation.
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
//!
//! # Choices that differ from Istio
//!
//! - A ServiceEntry is sent whole when any of its hosts is imported; istiod keeps only
//!   the imported hosts of it (the payload here is the object as written).

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
use mesh_core::config::{AnyResource, Labels, Sidecar, select_sidecar};
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

use crate::control::xds::{IstioResource, TYPE_URL, receiver_stream};

/// Every valid Istio object `discovery` knows, each encoded once.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Increases with every change.
    pub generation: u64,
    entries: Vec<Entry>,
}

/// What a view depends on besides the catalog: the proxy's namespace and the Sidecar
/// that applies to it (`namespace/name`), if any.
type ViewKey = (String, Option<(String, String)>);

#[derive(Debug)]
struct Entry {
    resource: AnyResource,
    any: Any,
    hash: u64,
}

impl Catalog {
    /// The catalog of `resources` (their order does not matter). A resource that cannot
    /// be serialized is left out and logged. A ServiceEntry with a `workloadSelector` is
    /// sent as written, without the endpoints a [`MeshConfig`](mesh_core::config::MeshConfig)
    /// selected for it: each proxy selects them again from the WorkloadEntries it receives.
    pub fn new(generation: u64, resources: Vec<AnyResource>) -> Self {
        let mut entries: Vec<Entry> = resources
            .into_iter()
            .map(|mut resource| {
                if let AnyResource::ServiceEntry(se) = &mut resource
                    && se.spec.workload_selector.is_some()
                {
                    se.spec.endpoints.clear();
                }
                resource
            })
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

    /// What a proxy in `namespace` may see, without a Sidecar (see the module docs).
    pub fn view(&self, namespace: &str, root_namespace: &str) -> View {
        self.scoped_view(namespace, None, root_namespace)
    }

    /// The Sidecar that applies to a workload in `namespace` with `labels` (SR-33).
    /// Gateways have none: do not ask for them.
    pub fn sidecar_for(
        &self,
        namespace: &str,
        labels: &Labels,
        root_namespace: &str,
    ) -> Option<&Sidecar> {
        let sidecars = self.entries.iter().filter_map(|e| match &e.resource {
            AnyResource::Sidecar(s) => Some(s),
            _ => None,
        });
        select_sidecar(sidecars, namespace, labels, root_namespace)
    }

    /// What a proxy in `namespace` to which `sidecar` applies receives: what is visible
    /// to its namespace, narrowed to the hosts `sidecar` imports (see the module docs).
    pub fn scoped_view(
        &self,
        namespace: &str,
        sidecar: Option<&Sidecar>,
        root_namespace: &str,
    ) -> View {
        let visible: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| visible(&e.resource, namespace, root_namespace))
            .collect();
        let imported = |ns: &str, host: &str| {
            sidecar.is_none_or(|s| {
                s.imports(namespace, ns, &mesh_core::config::qualify_host(host, ns))
            })
        };
        // ServiceEntries first: DestinationRules and WorkloadEntries follow them.
        let entries: Vec<&mesh_core::config::ServiceEntry> = visible
            .iter()
            .filter_map(|e| match &e.resource {
                AnyResource::ServiceEntry(se)
                    if se.spec.hosts.iter().any(|h| imported(se.namespace(), h)) =>
                {
                    Some(se)
                }
                _ => None,
            })
            .collect();
        let keep = |r: &AnyResource| match r {
            AnyResource::ServiceEntry(se) => entries.iter().any(|e| std::ptr::eq(*e, se)),
            AnyResource::VirtualService(vs) => {
                vs.spec.hosts.iter().any(|h| imported(vs.namespace(), h))
            }
            AnyResource::DestinationRule(dr) => {
                sidecar.is_none() || {
                    let host = dr.qualify(&dr.spec.host);
                    entries.iter().any(|se| {
                        se.spec
                            .hosts
                            .iter()
                            .any(|h| hosts_overlap(&host, &se.qualify(h)))
                    })
                }
            }
            AnyResource::WorkloadEntry(we) => entries.iter().any(|se| {
                se.namespace() == we.namespace()
                    && se.spec.workload_selector.as_ref().is_some_and(|sel| {
                        sel.labels
                            .iter()
                            .all(|(k, v)| we.spec.labels.get(k) == Some(v))
                    })
            }),
            _ => true,
        };
        let mut h = std::hash::DefaultHasher::new();
        let mut resources = Vec::new();
        for e in visible {
            if keep(&e.resource) {
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

/// `a` and `b` name a common host: equal, or one a wildcard (`*`, `*.example.com`)
/// covering the other.
fn hosts_overlap(a: &str, b: &str) -> bool {
    let covers = |pattern: &str, host: &str| {
        pattern == "*"
            || pattern
                .strip_prefix('*')
                .is_some_and(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
    };
    a == b || covers(a, b) || covers(b, a)
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
    let exported =
        |export_to: &[String], own: &str| mesh_core::config::exported(export_to, own, namespace);
    match resource {
        AnyResource::VirtualService(r) => exported(&r.spec.export_to, r.namespace()),
        AnyResource::DestinationRule(r) => exported(&r.spec.export_to, r.namespace()),
        AnyResource::ServiceEntry(r) => exported(&r.spec.export_to, r.namespace()),
        // Sent with the ServiceEntries that select them (see `Catalog::scoped_view`).
        AnyResource::WorkloadEntry(_) => true,
        // Sent to the namespaces they may apply to (SR-33).
        AnyResource::Sidecar(r) => {
            r.namespace() == namespace
                || (r.namespace() == root_namespace && r.spec.workload_selector.is_none())
        }
        AnyResource::Gateway(_) => true,
        // Every namespace's: a client's auto-mTLS sends plaintext to a server whose
        // mode is DISABLE (SR-24), which it reads from the server's policies.
        AnyResource::PeerAuthentication(_) => true,
        AnyResource::AuthorizationPolicy(r) => {
            r.namespace() == namespace || r.namespace() == root_namespace
        }
        AnyResource::RequestAuthentication(r) => {
            r.namespace() == namespace || r.namespace() == root_namespace
        }
        // Translated on the proxy into Gateways and VirtualServices, which are visible
        // everywhere as those without `exportTo` are.
        AnyResource::KubernetesGateway(_)
        | AnyResource::HttpRoute(_)
        | AnyResource::GrpcRoute(_)
        | AnyResource::ReferenceGrant(_) => true,
        AnyResource::Telemetry(r) => r.namespace() == namespace || r.namespace() == root_namespace,
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
    views: Arc<Mutex<HashMap<ViewKey, (u64, View)>>>,
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

    /// The view of `catalog` for `proxy`, computed once per catalog generation for all
    /// the proxies of its namespace that the same Sidecar (or none) applies to.
    fn view(&self, catalog: &Catalog, proxy: &ProxyNode) -> View {
        let sidecar = if proxy.gateway {
            None
        } else {
            catalog.sidecar_for(&proxy.namespace, &proxy.labels, &self.root_namespace)
        };
        let key: ViewKey = (
            proxy.namespace.clone(),
            sidecar.map(|s| (s.namespace().to_owned(), s.name().to_owned())),
        );
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((generation, view)) = views.get(&key)
            && *generation == catalog.generation
        {
            return view.clone();
        }
        let view = catalog.scoped_view(&proxy.namespace, sidecar, &self.root_namespace);
        views.insert(key, (catalog.generation, view.clone()));
        view
    }
}

/// What the view of a proxy depends on: its namespace (from its certificate), whether
/// it is a gateway and its labels (from its node).
#[derive(Clone, Debug, Default)]
struct ProxyNode {
    namespace: String,
    gateway: bool,
    labels: Labels,
}

impl ProxyNode {
    /// Reads the node's id (`router~...` is a gateway) and metadata `LABELS`.
    fn update(&mut self, node: &envoy_types::pb::envoy::config::core::v3::Node) {
        use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
        self.gateway = node.id.starts_with("router~");
        let labels = node
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("LABELS"))
            .and_then(|v| match &v.kind {
                Some(ValueKind::StructValue(s)) => Some(s),
                _ => None,
            });
        self.labels = labels
            .map(|s| {
                s.fields
                    .iter()
                    .filter_map(|(k, v)| match &v.kind {
                        Some(ValueKind::StringValue(v)) => Some((k.clone(), v.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
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
            let mut proxy = ProxyNode {
                namespace,
                ..ProxyNode::default()
            };
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
                            proxy.update(node);
                        }
                        if request.type_url != TYPE_URL {
                            tracing::debug!(%identity, type_url = %request.type_url, "unknown type; ignored");
                            continue;
                        }
                        if request.response_nonce.is_empty() {
                            // A new subscription: answered unless it already holds the view.
                            subscribed = true;
                            let view = server.view(&catalog.borrow_and_update(), &proxy);
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
                        let view = server.view(&catalog.borrow_and_update(), &proxy);
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
        let stream = receiver_stream(rx);
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
    let incoming = receiver_stream(rx);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use mesh_core::config::{LoadOptions, load_str};

    const ROOT: &str = "istio-system";

    /// Services in `shop` and `bank`, the VMs of `shop` as WorkloadEntries, and Sidecars:
    /// `shop`'s default imports its own namespace and the root's; `reviews`' imports
    /// everything.
    const CONFIG: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: shop}
spec:
  hosts: [vms.shop.internal]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  workloadSelector: {labels: {app: vms}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop}
spec: {address: 10.0.0.9, labels: {app: vms}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: unselected, namespace: shop}
spec: {address: 10.0.0.10, labels: {app: nothing}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ledger, namespace: bank}
spec:
  hosts: [ledger]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 10.0.1.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ledger, namespace: bank}
spec:
  hosts: [ledger]
  http: [{route: [{destination: {host: ledger}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ledger, namespace: shop}
spec: {host: ledger.bank.svc.cluster.local}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: shop}
spec: {host: ratings}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  egress: [{hosts: [./*, istio-system/*]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: reviews, namespace: shop}
spec:
  workloadSelector: {labels: {app: reviews}}
  egress: [{hosts: [\"*/*\"]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress: [{hosts: [./*]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: payments, namespace: bank}
spec:
  workloadSelector: {labels: {app: payments}}
  egress: [{hosts: [./*]}]
";

    fn catalog(generation: u64) -> Catalog {
        let report = load_str("config.yaml", CONFIG, &LoadOptions::default());
        assert!(!report.has_errors(), "{:#?}", report.diagnostics);
        Catalog::new(generation, report.resources)
    }

    fn names(view: &View) -> Vec<String> {
        view.resources
            .iter()
            .map(|any| {
                use prost::Message;
                IstioResource::decode(any.value.as_slice())
                    .unwrap()
                    .display_name()
            })
            .collect()
    }

    fn labels(app: &str) -> Labels {
        Labels::from([("app".to_owned(), app.to_owned())])
    }

    #[test]
    fn a_namespace_sidecar_keeps_only_the_hosts_it_imports() {
        let c = catalog(1);
        let sidecar = c.sidecar_for("shop", &labels("ratings"), ROOT).unwrap();
        assert_eq!(sidecar.name(), "default");
        let view = names(&c.scoped_view("shop", Some(sidecar), ROOT));
        assert_eq!(
            view,
            [
                "DestinationRule/shop/ratings",
                "ServiceEntry/shop/ratings",
                "ServiceEntry/shop/vms",
                "Sidecar/istio-system/default",
                "Sidecar/shop/default",
                "Sidecar/shop/reviews",
                "WorkloadEntry/shop/vm-1",
            ]
        );
    }

    #[test]
    fn a_workload_selected_sidecar_beats_the_namespace_one() {
        let c = catalog(1);
        let sidecar = c.sidecar_for("shop", &labels("reviews"), ROOT).unwrap();
        assert_eq!(sidecar.name(), "reviews");
        let view = names(&c.scoped_view("shop", Some(sidecar), ROOT));
        for expected in [
            "ServiceEntry/bank/ledger",
            "VirtualService/bank/ledger",
            "DestinationRule/shop/ledger",
            "WorkloadEntry/shop/vm-1",
        ] {
            assert!(view.iter().any(|v| v == expected), "{expected}: {view:?}");
        }
        assert!(!view.iter().any(|v| v == "WorkloadEntry/shop/unselected"));
        // Without any Sidecar: everything visible, which here is the same.
        assert_eq!(view, names(&c.view("shop", ROOT)));
    }

    #[test]
    fn the_root_sidecar_is_the_default_of_namespaces_without_one() {
        let c = catalog(1);
        // `bank` has only a workload-selected Sidecar; others fall to the root's, whose
        // `./*` imports each workload's own namespace.
        let sidecar = c.sidecar_for("bank", &labels("teller"), ROOT).unwrap();
        assert_eq!(sidecar.namespace(), ROOT);
        let view = names(&c.scoped_view("bank", Some(sidecar), ROOT));
        assert_eq!(
            view,
            [
                "DestinationRule/shop/ledger",
                "ServiceEntry/bank/ledger",
                "Sidecar/bank/payments",
                "Sidecar/istio-system/default",
                "VirtualService/bank/ledger",
            ]
        );
        let payments = c.sidecar_for("bank", &labels("payments"), ROOT).unwrap();
        assert_eq!(payments.name(), "payments");
        let view = names(&c.scoped_view("bank", Some(payments), ROOT));
        assert!(
            view.iter().any(|v| v == "ServiceEntry/bank/ledger"),
            "{view:?}"
        );
        assert!(
            !view.iter().any(|v| v.starts_with("ServiceEntry/shop")),
            "{view:?}"
        );
    }

    fn node(id: &str, app: &str) -> Node {
        NodeInfo {
            proxy_type: id.to_owned(),
            name: "pod".to_owned(),
            namespace: "shop".to_owned(),
            labels: labels(app),
            domain_suffix: "cluster.local".to_owned(),
            ..NodeInfo::default()
        }
        .node()
    }

    use crate::control::xds::NodeInfo;

    #[test]
    fn proxies_selected_by_one_sidecar_share_a_view_and_gateways_are_not_scoped() {
        let (_tx, rx) = watch::channel(Arc::new(catalog(7)));
        let server = AdsServer::new(rx, ROOT);
        let c = catalog(7);
        let proxy = |id: &str, app: &str| {
            let mut p = ProxyNode {
                namespace: "shop".to_owned(),
                ..ProxyNode::default()
            };
            p.update(&node(id, app));
            p
        };
        let ratings = proxy("sidecar", "ratings");
        assert_eq!(ratings.labels, labels("ratings"));
        assert!(!ratings.gateway);
        let a = server.view(&c, &ratings);
        let b = server.view(&c, &proxy("sidecar", "details"));
        assert_eq!(a.version, b.version);
        let reviews = server.view(&c, &proxy("sidecar", "reviews"));
        assert_ne!(a.version, reviews.version);
        let gateway = proxy("router", "ratings");
        assert!(gateway.gateway);
        let g = server.view(&c, &gateway);
        assert_eq!(names(&g), names(&c.view("shop", ROOT)));
        // Three views: shop's default Sidecar, shop's reviews Sidecar, and none.
        let views = server.views.lock().unwrap();
        assert_eq!(views.len(), 3, "{:?}", views.keys().collect::<Vec<_>>());
        assert!(views.contains_key(&(
            "shop".to_owned(),
            Some(("shop".to_owned(), "default".to_owned()))
        )));
        assert!(views.contains_key(&("shop".to_owned(), None)));
    }
}
