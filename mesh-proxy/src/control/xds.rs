//! Configuration from `discovery` over the xDS transport: the client side.
//!
//! # Behaviour
//!
//! [`subscribe`] keeps one aggregated discovery stream (Envoy's ADS,
//! `envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources`,
//! state of the world) open to `discovery` over mTLS: the client presents its SVID and
//! accepts only the server identity it was given. It subscribes to one resource type,
//! [`TYPE_URL`]: every response carries every Istio resource the workload needs, each an
//! [`IstioResource`] holding the object's YAML, under one version.
//!
//! - Each response is loaded with the same loader as files (located diagnostics naming
//!   the object and field) and handed to the caller as an [`Update`]; the caller applies
//!   it (for a [`Mesh`](crate::Mesh), [`Mesh::follow`](crate::Mesh::follow) compiles and
//!   swaps it in) and says whether it was accepted. The client then ACKs (the response's
//!   version and nonce) or NACKs (the last accepted version, the nonce, and the
//!   diagnostics in `error_detail`), as Envoy does.
//! - A rejected or missing update changes nothing: the configuration in force stays.
//! - When the stream fails or `discovery` is unreachable, the client reconnects with
//!   exponential backoff (from [`XdsOptions::initial_backoff`], doubling, at most
//!   [`XdsOptions::max_backoff`], with jitter), sending the version it holds; meanwhile
//!   the workload keeps serving its last good configuration.
//!
//! # Choices
//!
//! - One resource type for all of Istio's kinds, not one per kind: each push is one
//!   consistent whole (a VirtualService never arrives before the DestinationRule that
//!   defines its subsets), and the sidecar compiles it in one step, as it compiles a
//!   directory of files. The payload is the objects' own YAML, so what the sidecar loads
//!   is exactly what a user applied, validated twice by the same code.
//! - The node describes the proxy as Istio's agent does (`id` =
//!   `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`, metadata `NAMESPACE`,
//!   `LABELS`, `SERVICE_ACCOUNT`, `CLUSTER_ID`). `discovery` decides which namespace's
//!   view a proxy may see from its certificate's identity, never from the node; the
//!   node's `LABELS` only choose the `Sidecar` resource that narrows that view (as
//!   istiod trusts them), so a false label can narrow what a proxy receives, never
//!   widen it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind as ValueKind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use mesh_core::config::{AnyResource, LoadOptions, MeshConfig};
use mesh_tls::{Alpn, ClientTls, SecureNaming, UpstreamConnector};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The resource type `discovery` serves: Istio configuration objects.
pub const TYPE_URL: &str = "type.googleapis.com/mesh.discovery.v1.IstioResource";

/// One Istio configuration object as `discovery` sends it.
#[derive(Clone, PartialEq, Message)]
pub struct IstioResource {
    /// `VirtualService`, `DestinationRule`, ...
    #[prost(string, tag = "1")]
    pub kind: String,
    /// The object's namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// The object's name.
    #[prost(string, tag = "3")]
    pub name: String,
    /// The object's version (its Kubernetes `resourceVersion`, or a content hash).
    #[prost(string, tag = "4")]
    pub version: String,
    /// The object as Istio YAML (`apiVersion`, `kind`, `metadata`, `spec`).
    #[prost(string, tag = "5")]
    pub yaml: String,
}

impl IstioResource {
    /// The object `resource` with version `version`.
    pub fn new(
        resource: &AnyResource,
        version: String,
    ) -> Result<Self, serde_saphyr::SerializeError> {
        let m = resource.metadata();
        Ok(Self {
            kind: resource.kind().as_str().to_owned(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            version,
            yaml: serde_saphyr::to_string(resource)?,
        })
    }

    /// Packed for a discovery response.
    pub fn to_any(&self) -> Any {
        Any {
            type_url: TYPE_URL.to_owned(),
            value: self.encode_to_vec(),
        }
    }

    /// `Kind/namespace/name`.
    pub fn display_name(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// How the proxy presents itself to `discovery`.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    /// `sidecar` or `router` (a gateway).
    pub proxy_type: String,
    /// The pod's IP address, when known.
    pub ip: Option<std::net::IpAddr>,
    /// The pod (or workload) name.
    pub name: String,
    /// The workload's namespace.
    pub namespace: String,
    /// The service account.
    pub service_account: String,
    /// The pod's labels.
    pub labels: BTreeMap<String, String>,
    /// The cluster (Istio's `CLUSTER_ID`).
    pub cluster_id: String,
    /// The cluster's DNS suffix (`cluster.local`).
    pub domain_suffix: String,
}

impl NodeInfo {
    /// The Envoy node: Istio's id format and metadata.
    pub fn node(&self) -> Node {
        let ip = self.ip.map(|ip| ip.to_string()).unwrap_or_default();
        let id = format!(
            "{}~{ip}~{}.{ns}~{ns}.svc.{}",
            self.proxy_type,
            self.name,
            self.domain_suffix,
            ns = self.namespace
        );
        let text = |s: &str| Value {
            kind: Some(ValueKind::StringValue(s.to_owned())),
        };
        let labels = Struct {
            fields: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), text(v)))
                .collect(),
        };
        let mut fields = std::collections::HashMap::new();
        fields.insert("NAMESPACE".to_owned(), text(&self.namespace));
        fields.insert("SERVICE_ACCOUNT".to_owned(), text(&self.service_account));
        fields.insert("CLUSTER_ID".to_owned(), text(&self.cluster_id));
        fields.insert("NAME".to_owned(), text(&self.name));
        fields.insert(
            "LABELS".to_owned(),
            Value {
                kind: Some(ValueKind::StructValue(labels)),
            },
        );
        Node {
            id,
            cluster: self.cluster_id.clone(),
            metadata: Some(Struct { fields }),
            user_agent_name: "mesh-proxy".to_owned(),
            ..Node::default()
        }
    }
}

/// Where `discovery` is and how to talk to it.
#[derive(Clone, Debug)]
pub struct XdsOptions {
    /// `host:port` of `discovery` (Istio's port is 15012).
    pub address: String,
    /// Who `discovery` must prove to be.
    pub server: SecureNaming,
    /// The proxy's node.
    pub node: NodeInfo,
    /// How the objects are loaded (the workload's namespace for namespace-less ones).
    pub load: LoadOptions,
    /// Connect and handshake timeout.
    pub connect_timeout: Duration,
    /// First wait before reconnecting.
    pub initial_backoff: Duration,
    /// Longest wait before reconnecting.
    pub max_backoff: Duration,
}

impl XdsOptions {
    /// Options for `discovery` at `address` proving `server`, for `node`.
    pub fn new(address: impl Into<String>, server: SecureNaming, node: NodeInfo) -> Self {
        let load = LoadOptions {
            default_namespace: node.namespace.clone(),
            ..LoadOptions::default()
        };
        Self {
            address: address.into(),
            server,
            node,
            load,
            connect_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(15),
        }
    }
}

/// A configuration received from `discovery`, waiting for the caller's verdict.
#[derive(Debug)]
pub struct Update {
    /// The response's version.
    pub version: String,
    /// The loaded configuration.
    pub config: MeshConfig,
    /// Where the caller says whether it applied it.
    pub verdict: Verdict,
}

/// The caller's answer to an [`Update`]; dropping it unanswered rejects the update.
#[derive(Debug)]
pub struct Verdict(oneshot::Sender<Result<(), String>>);

impl Verdict {
    /// The configuration was applied: the client ACKs it.
    pub fn accept(self) {
        let _ = self.0.send(Ok(()));
    }

    /// The configuration was refused for `why`: the client NACKs it with that detail.
    pub fn reject(self, why: String) {
        let _ = self.0.send(Err(why));
    }
}

/// Why one stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("resolving {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("connecting: {0}")]
    Connect(String),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the update consumer is gone")]
    Closed,
}

/// Subscribes to `discovery`'s configuration for the workload until `shutdown`: the
/// configurations come on the returned channel, one at a time (the next is not read
/// before the verdict on the last one).
pub fn subscribe(
    options: XdsOptions,
    tls: ClientTls,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut held = String::new();
        let mut backoff = options.initial_backoff;
        loop {
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = stream(&options, &tls, &tx, &mut held) => outcome,
            };
            match outcome {
                Ok(received) => {
                    if received {
                        backoff = options.initial_backoff;
                    }
                    tracing::info!(address = %options.address, "discovery stream closed; reconnecting");
                }
                Err(StreamError::Closed) => return,
                Err(e) => {
                    tracing::warn!(address = %options.address, error = %e, "discovery unreachable; keeping the configuration in force");
                }
            }
            let wait = jittered(backoff);
            backoff = (backoff * 2).min(options.max_backoff);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    });
    rx
}

/// `base` minus up to a quarter, so that proxies cut off together do not come back together.
fn jittered(base: Duration) -> Duration {
    let quarter = base / 4;
    base - quarter.mul_f64(rand::random::<f64>())
}

/// One stream: connects, subscribes, and relays responses until the stream ends; whether
/// any response was received.
async fn stream(
    options: &XdsOptions,
    tls: &ClientTls,
    updates: &mpsc::Sender<Update>,
    held: &mut String,
) -> Result<bool, StreamError> {
    let channel = connect(options, tls).await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (requests, rx) = mpsc::channel::<DiscoveryRequest>(4);
    let outgoing = receiver_stream(rx);
    // The first request carries the node and the version already held.
    let _ = requests
        .send(DiscoveryRequest {
            version_info: held.clone(),
            node: Some(options.node.node()),
            type_url: TYPE_URL.to_owned(),
            ..DiscoveryRequest::default()
        })
        .await;
    let mut incoming = client
        .stream_aggregated_resources(outgoing)
        .await?
        .into_inner();
    let mut received = false;
    while let Some(response) = incoming.message().await? {
        received = true;
        if response.type_url != TYPE_URL {
            tracing::debug!(type_url = %response.type_url, "ignoring a response of another type");
            continue;
        }
        let verdict = match load(&response, &options.load) {
            Ok(config) => {
                let (verdict, answer) = oneshot::channel();
                let update = Update {
                    version: response.version_info.clone(),
                    config,
                    verdict: Verdict(verdict),
                };
                updates
                    .send(update)
                    .await
                    .map_err(|_| StreamError::Closed)?;
                answer
                    .await
                    .unwrap_or_else(|_| Err("the update was dropped".to_owned()))
            }
            Err(why) => Err(why),
        };
        let error_detail = match verdict {
            Ok(()) => {
                held.clone_from(&response.version_info);
                tracing::info!(version = %response.version_info, "configuration from discovery applied");
                None
            }
            Err(why) => {
                tracing::error!(version = %response.version_info, "configuration from discovery rejected:\n{why}");
                Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message: why,
                    details: Vec::new(),
                })
            }
        };
        let ack = DiscoveryRequest {
            version_info: held.clone(),
            type_url: TYPE_URL.to_owned(),
            response_nonce: response.nonce.clone(),
            error_detail,
            ..DiscoveryRequest::default()
        };
        if requests.send(ack).await.is_err() {
            break;
        }
    }
    Ok(received)
}

/// The items of `rx` as a stream (a gRPC stream's requests or responses, or accepted
/// connections), ending when every sender is gone.
pub(crate) fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// The resources of `response` loaded as one configuration, or every diagnostic.
fn load(response: &DiscoveryResponse, options: &LoadOptions) -> Result<MeshConfig, String> {
    let mut yaml = String::new();
    for any in &response.resources {
        if any.type_url != TYPE_URL {
            return Err(format!(
                "a resource of type {} in a {TYPE_URL} response",
                any.type_url
            ));
        }
        let resource = IstioResource::decode(any.value.as_slice())
            .map_err(|e| format!("a resource that does not decode: {e}"))?;
        yaml.push_str("---\n");
        yaml.push_str(&resource.yaml);
        if !resource.yaml.ends_with('\n') {
            yaml.push('\n');
        }
    }
    let name = format!("discovery version {}", response.version_info);
    MeshConfig::from_yaml_str(name, &yaml, options)
        .map(|(config, _)| config)
        .map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })
}

/// An HTTP/2 channel to `discovery` over mTLS.
async fn connect(
    options: &XdsOptions,
    tls: &ClientTls,
) -> Result<tonic::transport::Channel, StreamError> {
    let (host, address) = resolve(&options.address).await?;
    let connector = UpstreamConnector::istio(address, &host, tls.clone(), options.server.clone())
        .map_err(|e| StreamError::Connect(e.to_string()))?
        .connect_timeout(options.connect_timeout)
        .alpn(Alpn::Negotiate);
    tonic::transport::Endpoint::from_shared(format!("http://{}", options.address))
        .map_err(|e| StreamError::Connect(e.to_string()))?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| StreamError::Connect(mesh_tls::verify::describe(&e)))
}

/// The host of `address` (for SNI) and one of its socket addresses.
async fn resolve(address: &str) -> Result<(String, SocketAddr), StreamError> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let mut addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|e| StreamError::Resolve(address.to_owned(), e))?;
    let first = addrs
        .next()
        .ok_or_else(|| StreamError::NoAddress(address.to_owned()))?;
    Ok((host, first))
}
