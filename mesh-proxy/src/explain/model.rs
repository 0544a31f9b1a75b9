//! The answer of [`explain`](super::explain): what decided, and where it is written.

use std::collections::BTreeMap;

use mesh_core::Labels;
use serde::Serialize;

/// A resource (and one of its fields) in the files, where it decided something.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Located {
    /// Kind (`VirtualService`, ...).
    pub kind: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The field that decided (`spec.http[1]`); `None`: the resource as a whole.
    pub field: Option<String>,
    /// The file.
    pub file: String,
    /// 1-based line of the field (or of the resource's first line).
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
}

impl Located {
    /// `file:line`.
    pub fn position(&self) -> String {
        match self.line {
            Some(line) => format!("{}:{line}", self.file),
            None => self.file.clone(),
        }
    }
}

/// The whole answer.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The request as understood.
    pub request: RequestSummary,
    /// The sender.
    pub source: SourceSummary,
    /// Where the request enters the mesh.
    pub listener: ListenerSummary,
    /// The route chosen; `None` when none matches.
    pub route: Option<RouteSummary>,
    /// What happens, in one line (`forwarded`, `404 NR: ...`, `redirect 301 ...`).
    pub outcome: String,
    /// The destinations of the route, with their shares.
    pub destinations: Vec<DestinationSummary>,
    /// What the files leave open, and other remarks.
    pub notes: Vec<String>,
}

/// The request.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestSummary {
    /// Method.
    pub method: String,
    /// Authority as sent.
    pub authority: String,
    /// The port addressed.
    pub port: u16,
    /// Path (with query).
    pub path: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
}

/// The sender.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSummary {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Labels.
    pub labels: Labels,
    /// SPIFFE ID (`spiffe://cluster.local/ns/<ns>/sa/<sa>`).
    pub spiffe_id: String,
    /// The principal AuthorizationPolicies match (the SPIFFE ID without `spiffe://`).
    pub principal: String,
}

/// The listener.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerSummary {
    /// `sidecar` or `gateway`.
    pub kind: String,
    /// `mesh`, or the Gateway's `namespace/name`.
    pub name: String,
    /// The Gateway resource.
    pub gateway: Option<Located>,
    /// The Gateway server that owns the host.
    pub server: Option<ServerSummary>,
}

/// A Gateway server.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerSummary {
    /// Index in `spec.servers`.
    pub index: usize,
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: String,
    /// Hosts.
    pub hosts: Vec<String>,
    /// `tls.mode` (the downstream side of the gateway); `None`: plaintext.
    pub tls_mode: Option<String>,
    /// `tls.credentialName`.
    pub credential_name: Option<String>,
    /// Where.
    pub at: Located,
}

/// The route.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSummary {
    /// The route table's virtual host (`namespace/name` of the VirtualService, or the
    /// host for a service's default route).
    pub virtual_host: String,
    /// The VirtualService; `None` for a default route.
    pub virtual_service: Option<Located>,
    /// The `http` rule.
    pub rule: Option<Located>,
    /// Its index in `spec.http`.
    pub rule_index: Option<usize>,
    /// Its `name`.
    pub rule_name: Option<String>,
    /// The match block that matched; `None` for a rule without match blocks.
    pub matched: Option<Located>,
    /// Its index in `spec.http[i].match`.
    pub match_index: Option<usize>,
    /// The outer deadline (`timeout`); `None`: no deadline.
    pub timeout: Option<String>,
    /// Where `timeout` is written.
    pub timeout_at: Option<Located>,
    /// The retry policy in force.
    pub retries: RetrySummary,
}

/// Retries as the retry layer applies them.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetrySummary {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    /// Per-try timeout, after clipping under the route timeout; `None`: none.
    pub per_try_timeout: Option<String>,
    /// `retryOn`.
    pub retry_on: String,
    /// Back-off base interval.
    pub backoff: String,
    /// Whether this is Istio's default (no `retries` on the rule).
    pub default: bool,
    /// Where `retries` is written.
    pub at: Option<Located>,
}

/// One destination of the route.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationSummary {
    /// Qualified host.
    pub host: String,
    /// Subset.
    pub subset: Option<String>,
    /// Port (the destination's, else the service's first, else the request's).
    pub port: Option<u16>,
    /// `weight` as written.
    pub weight: Option<i32>,
    /// Share of requests, in percent.
    pub percent: f64,
    /// Where the destination is written.
    pub at: Option<Located>,
    /// The subset's labels.
    pub subset_labels: Option<Labels>,
    /// Where the subset is defined.
    pub subset_at: Option<Located>,
    /// The DestinationRule that applies to this client.
    pub destination_rule: Option<Located>,
    /// Whether a service of these files declares the host.
    pub registered: bool,
    /// Instances known from the files: endpoints, or for a DNS service its entries'
    /// names (`None`: unknown).
    pub endpoints: Option<usize>,
    /// The traffic policy after the merge.
    pub policy: PolicySummary,
    /// TLS on each side.
    pub tls: TlsSummary,
    /// The authorization decision at the destination.
    pub authorization: AuthzSummary,
}

/// The merged DestinationRule blocks and what is enforced.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    /// The balancing algorithm.
    pub load_balancer: String,
    /// Where `loadBalancer` comes from.
    pub load_balancer_at: Option<Located>,
    /// `connectionPool` as configured (merged block), as Istio YAML.
    pub connection_pool: Option<serde_json::Value>,
    /// The limits enforced.
    pub pool_limits: PoolSummary,
    /// Where `connectionPool` comes from.
    pub connection_pool_at: Option<Located>,
    /// `outlierDetection` as configured.
    pub outlier_detection: Option<serde_json::Value>,
    /// The detection enforced; `None`: no outlier detection.
    pub outlier: Option<OutlierSummary>,
    /// Where `outlierDetection` comes from.
    pub outlier_detection_at: Option<Located>,
}

/// Pool limits; `None`: unlimited.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSummary {
    /// `tcp.maxConnections`.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`.
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`.
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`.
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`.
    pub max_retries: Option<u32>,
    /// Idle timeout of upstream connections.
    pub idle_timeout: String,
}

/// Outlier detection as enforced (Istio's defaults filled in).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierSummary {
    /// `consecutive5xxErrors`.
    pub consecutive_5xx_errors: u32,
    /// `consecutiveGatewayErrors`.
    pub consecutive_gateway_errors: u32,
    /// `interval`.
    pub interval: String,
    /// `baseEjectionTime`.
    pub base_ejection_time: String,
    /// `maxEjectionPercent`.
    pub max_ejection_percent: u32,
    /// `minHealthPercent`.
    pub min_health_percent: u32,
}

/// TLS on each side of the hop to the destination.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsSummary {
    /// The client's mode: `ISTIO_MUTUAL`, `SIMPLE`, `MUTUAL`, `DISABLE`, or `AUTO`
    /// (auto-mTLS, no `tls` in the DestinationRule).
    pub client: String,
    /// What the client sends: `Istio mTLS`, `TLS origination`, `plaintext`.
    pub client_transport: String,
    /// Where `tls` comes from.
    pub client_at: Option<Located>,
    /// The PeerAuthentication mode at the destination workload (`STRICT`, `PERMISSIVE`,
    /// `DISABLE`), or `NONE` when its endpoints have no sidecar.
    pub server: String,
    /// The PeerAuthentication that set it; `None`: the default (PERMISSIVE).
    pub server_at: Option<Located>,
    /// What the connection becomes: `mTLS`, `plaintext`, or `refused: <why>`.
    pub connection: String,
}

/// The authorization decision at the destination workload.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzSummary {
    /// The destination workload's namespace.
    pub namespace: String,
    /// Its labels.
    pub labels: Labels,
    /// Where the labels come from.
    pub labels_from: String,
    /// The principal the destination sees; `None` without mTLS.
    pub principal: Option<String>,
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The status the request gets from authorization (200 when passed on to the
    /// application, 403, or 400 for a path the proxy refuses).
    pub status: u16,
    /// The action of the policy that decided (`ALLOW`, `DENY`); `None`: a default.
    pub action: Option<String>,
    /// `namespace/name` of the policy that decided.
    pub policy: Option<String>,
    /// Index of the rule in its `rules`.
    pub rule: Option<usize>,
    /// Where the rule is written.
    pub at: Option<Located>,
    /// Why, in words.
    pub reason: String,
    /// Every AuthorizationPolicy that applies to the workload.
    pub policies: Vec<AppliedPolicy>,
}

/// An AuthorizationPolicy that applies to the destination workload.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedPolicy {
    /// `namespace/name`.
    pub name: String,
    /// `ALLOW`, `DENY`, `AUDIT`.
    pub action: String,
    /// Whether it is a dry run (never enforced).
    pub dry_run: bool,
    /// Where.
    pub at: Located,
}
