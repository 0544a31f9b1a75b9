//! `explain`: what the mesh would do with one request, from the configuration files alone.
//!
//! Given a loaded configuration ([`MeshConfig`] and its [`LoadReport`], the loader
//! `mesh-proxy validate` and the sidecar use) and a [`Query`] (who sends, to which host,
//! method, path, headers and port, through a sidecar or a Gateway), [`explain`] answers,
//! with the file and line of every resource that decided:
//!
//! - the **listener** (the source's sidecar, or a Gateway and the server that owns the
//!   host) and the **route**: the VirtualService, its `http` rule and match block,
//!   chosen by the route table the proxy compiles ([`Routing::compile`], first match
//!   wins);
//! - each **destination** with its weight and share, its subset and the subset's labels;
//! - the **route policy**: the outer deadline (`timeout`) and the retries with the
//!   per-try timeout as the retry layer applies it (clipped under the deadline,
//!   [`RetryPolicy::from_route`]); and per destination the DestinationRule blocks after
//!   Istio's merge (rule, port, subset, subset port: [`Routing::resolve`]) with the
//!   values the resilience layers enforce ([`OutlierConfig`], [`PoolLimits`],
//!   [`LbConfig`]);
//! - **TLS** on each side: the client's (DestinationRule `tls`, else auto-mTLS) and the
//!   server's (PeerAuthentication mode in force at the destination workload, with the
//!   policy that set it), and what the connection becomes;
//! - the **AuthorizationPolicy decision** at the destination workload, by the compiled
//!   [`PolicySet`] the inbound stack evaluates (CUSTOM → DENY → ALLOW), with the
//!   principal of the source's SPIFFE ID when the connection is mutual TLS: the policy
//!   and rule that decided, or the default.
//!
//! Nothing is matched here that the proxy does not match itself: route selection, the
//! merge, the retry and pool conversions, PeerAuthentication and authorization are the
//! library's own code, run on the same compiled tables.
//!
//! # What the files do not say, and what is assumed
//!
//! - **The destination workload.** Authorization and PeerAuthentication select pods by
//!   labels, which the Istio files do not hold. The labels are, in order:
//!   [`Query::destination_labels`] when given; else those of the destination's first
//!   ServiceEntry or WorkloadEntry endpoint in the subset; else `app: <service name>`
//!   plus the subset's labels (the labels the Deployments of a Kubernetes service
//!   usually carry). The namespace is the host's (`name.namespace.svc.cluster.local`).
//!   The output says which was used.
//! - **Endpoints.** Without a ServiceEntry for the host (a Kubernetes Service supplies
//!   it in a cluster), its port and endpoints are unknown: the DestinationRule is
//!   resolved for the destination's port (else the request's), endpoints are assumed to
//!   run a sidecar (auto-mTLS then sends Istio mTLS), and a note says that a sidecar
//!   reading only these files answers 503 `NC`.
//! - **Connection attributes.** Addresses are not known offline: AuthorizationPolicy
//!   conditions on source or destination IPs and ports are *unknown*, evaluated
//!   three-valued as the authorization layer evaluates anything it cannot know (an
//!   ALLOW rule must match whatever they are; a DENY rule applies unless it fails
//!   whatever they are). JWT attributes are those of a request without a token; a
//!   RequestAuthentication that applies is named in a note.
//!
//! # Errors
//!
//! [`explain`] fails with [`ExplainError`] when the query names something the
//! configuration does not have (a Gateway), when the source's identity is not a valid
//! SPIFFE ID, or when compiling the configuration fails (with the compiler's
//! diagnostics); a request that is denied or not routed is an answer, not an error.
//!
//! # Example
//!
//! ```
//! use mesh_core::config::{LoadOptions, MeshConfig};
//! use mesh_proxy::explain::{self, Query, Source};
//!
//! let yaml = r#"
//! apiVersion: networking.istio.io/v1
//! kind: VirtualService
//! metadata: {name: reviews, namespace: prod}
//! spec:
//!   hosts: [reviews]
//!   http:
//!   - route:
//!     - destination: {host: reviews, subset: v1}
//!       weight: 90
//!     - destination: {host: reviews, subset: v2}
//!       weight: 10
//! "#;
//! let options = LoadOptions::default();
//! let (config, report) = MeshConfig::from_yaml_str("reviews.yaml", yaml, &options).unwrap();
//! let query = Query::new(Source::new("prod", "productpage"), "reviews");
//! let answer = explain::explain(&config, &report, &query).unwrap();
//! let route = answer.route.as_ref().unwrap();
//! assert_eq!(route.rule.as_ref().unwrap().line, Some(8));
//! assert_eq!(answer.destinations[1].percent, 10.0);
//! ```

mod render;

#[cfg(feature = "proxy")]
pub mod cli;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use http::{HeaderMap, Method};
use mesh_core::Identity;
use mesh_core::config::{self, LoadReport, MeshConfig, Resource, TrafficPolicy};
use mesh_core::{Labels, TlsMode};
use mesh_resilience::balance::{LbConfig, LbPolicy};
use mesh_resilience::limit::PoolLimits;
use mesh_resilience::outlier::OutlierConfig;
use mesh_resilience::retry::RetryPolicy;
use mesh_routing::compile::http_route_sources;
use mesh_routing::{
    CompileOptions, DestinationKey, Listener, Naming, RequestView, ResolvedPolicy, RouteAction,
    Routing,
};
use mesh_tls::PeerAuthentication;
use mesh_tls::authz::{NormalizeOptions, PolicySet, RequestAttributes, ServerName, canonicalize};
use mesh_tls::peer_auth::PeerAuthMode;
use serde::Serialize;

pub use render::text;

/// Who sends the request: a workload of the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// Namespace.
    pub namespace: String,
    /// Service account (the SPIFFE ID's last segment).
    pub service_account: String,
    /// Pod labels (select `sourceLabels` match blocks of VirtualServices).
    pub labels: Labels,
}

impl Source {
    /// The workload `namespace/service_account` labelled `app: <service_account>`.
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        let service_account = service_account.into();
        let labels = Labels::from([("app".to_owned(), service_account.clone())]);
        Self {
            namespace: namespace.into(),
            service_account,
            labels,
        }
    }
}

/// The request to explain.
#[derive(Clone, Debug)]
pub struct Query {
    /// The sender; for a Gateway, the gateway's own workload (its service account).
    pub source: Source,
    /// The Gateway (`namespace`, `name`) the request arrives at; `None`: the source's
    /// sidecar (the `mesh` listener).
    pub gateway: Option<(String, String)>,
    /// Method.
    pub method: Method,
    /// Host as the client sends it (`payment-service`, `api.example.com`), optionally
    /// with `:port`.
    pub host: String,
    /// The port the client addresses, when the host does not carry it.
    pub port: Option<u16>,
    /// Path, optionally with `?query`.
    pub path: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// The destination workload's labels, when known (see the module docs).
    pub destination_labels: Option<Labels>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
}

impl Query {
    /// A `GET /` from `source` to `host` through its sidecar.
    pub fn new(source: Source, host: impl Into<String>) -> Self {
        Self {
            source,
            gateway: None,
            method: Method::GET,
            host: host.into(),
            port: None,
            path: "/".into(),
            headers: HeaderMap::new(),
            destination_labels: None,
            trust_domain: "cluster.local".into(),
        }
    }
}

/// Why a query cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The query is not valid for this configuration.
    #[error("{0}")]
    Query(String),
    /// The configuration does not compile; each line is one diagnostic.
    #[error("{}", .0.join("\n"))]
    Compile(Vec<String>),
}

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
    /// Endpoints known from the files (`None`: unknown).
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
    /// The PeerAuthentication mode at the destination workload.
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

/// The Istio name of a configuration enum (`ISTIO_MUTUAL`), from its serde form.
fn istio_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn duration(d: std::time::Duration) -> String {
    config::Duration::from(d).to_string()
}

/// Locates `field` of `resource` (of `kind`) in the files of `report`.
fn locate<S>(report: &LoadReport, kind: &str, resource: &Resource<S>, field: &str) -> Located {
    let pos = report.key_location_of(resource.origin.seq, field);
    Located {
        kind: kind.to_owned(),
        namespace: resource.metadata.namespace.clone(),
        name: resource.metadata.name.clone(),
        field: (!field.is_empty()).then(|| field.to_owned()),
        file: resource.origin.file.display().to_string(),
        line: pos.map(|p| p.0),
        column: pos.map(|p| p.1),
    }
}

/// The namespace of `name.namespace.svc.<domain>`.
fn host_namespace<'a>(host: &'a str, domain: &str) -> Option<(&'a str, &'a str)> {
    let base = host.strip_suffix(&format!(".svc.{domain}"))?;
    let (name, ns) = base.split_once('.')?;
    (!ns.contains('.')).then_some((name, ns))
}

/// Explains `query` against `config` (loaded as `report`).
pub fn explain(
    config: &MeshConfig,
    report: &LoadReport,
    query: &Query,
) -> Result<Explanation, ExplainError> {
    let source = &query.source;
    let identity = Identity::from_istio(
        &query.trust_domain,
        &source.namespace,
        &source.service_account,
    )
    .map_err(|e| {
        ExplainError::Query(format!(
            "the source {}/{} has no valid SPIFFE ID: {e}",
            source.namespace, source.service_account
        ))
    })?;
    let mut notes = Vec::new();

    // The listener, and for a Gateway the server that owns the host.
    let (host_part, host_port) = mesh_routing::matcher::split_host_port(&query.host);
    let host = host_part.to_ascii_lowercase();
    let mut port = host_port.or(query.port);
    let mut scheme = "http";
    let (listener, listener_summary) = match &query.gateway {
        None => (
            Listener::Mesh,
            ListenerSummary {
                kind: "sidecar".into(),
                name: "mesh".into(),
                gateway: None,
                server: None,
            },
        ),
        Some((ns, name)) => {
            let gw = config.gateway(ns, name).ok_or_else(|| {
                ExplainError::Query(format!("Gateway {ns}/{name} is not in the configuration"))
            })?;
            let candidates: Vec<(usize, &config::Server)> = gw
                .spec
                .servers
                .iter()
                .enumerate()
                .filter(|(_, s)| {
                    port.is_none_or(|p| s.port.as_ref().is_some_and(|sp| sp.number == u32::from(p)))
                })
                .collect();
            let chosen = crate::stack::gateway::most_specific(
                candidates.iter().map(|(_, s)| s.hosts.as_slice()),
                &host,
            )
            .map(|i| candidates[i]);
            let server = chosen.map(|(index, s)| {
                let number = s
                    .port
                    .as_ref()
                    .and_then(|p| u16::try_from(p.number).ok())
                    .unwrap_or(0);
                let tls = s.tls.as_ref().filter(|t| t.mode.is_some());
                ServerSummary {
                    index,
                    port: number,
                    protocol: s
                        .port
                        .as_ref()
                        .map(|p| p.protocol.clone())
                        .unwrap_or_default(),
                    hosts: s.hosts.clone(),
                    tls_mode: tls.and_then(|t| t.mode.as_ref()).map(istio_name),
                    credential_name: tls.and_then(|t| t.credential_name.clone()),
                    at: locate(report, "Gateway", gw, &format!("spec.servers[{index}]")),
                }
            });
            if let Some(s) = &server {
                port = port.or(Some(s.port));
                if s.tls_mode.is_some() {
                    scheme = "https";
                }
            }
            (
                Listener::Gateway {
                    namespace: ns.clone(),
                    name: name.clone(),
                },
                ListenerSummary {
                    kind: "gateway".into(),
                    name: format!("{ns}/{name}"),
                    gateway: Some(locate(report, "Gateway", gw, "")),
                    server,
                },
            )
        }
    };
    let options = CompileOptions {
        naming: Naming {
            namespace: source.namespace.clone(),
            ..Naming::default()
        },
        listener: listener.clone(),
        trust_domain: query.trust_domain.clone(),
        workload_labels: source.labels.clone(),
    };
    let routing = Routing::compile(config, &options)
        .map_err(|errs| ExplainError::Compile(errs.iter().map(ToString::to_string).collect()))?;

    // The request, as the router reads it.
    let authority = match host_port.or(query.port) {
        Some(p) => format!("{host_part}:{p}"),
        None => host_part.to_owned(),
    };
    let mut builder = http::Request::builder()
        .method(query.method.clone())
        .uri(format!("{scheme}://{authority}{}", query.path));
    for (name, value) in &query.headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(())
        .map_err(|e| ExplainError::Query(format!("not a valid request: {e}")))?;
    let view = RequestView::from_request(&request, port);
    let request_port = view.port;
    let request_summary = RequestSummary {
        method: query.method.to_string(),
        authority: authority.clone(),
        port: request_port,
        path: query.path.clone(),
        headers: query
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let source_summary = SourceSummary {
        namespace: source.namespace.clone(),
        service_account: source.service_account.clone(),
        labels: source.labels.clone(),
        spiffe_id: identity.as_str().to_owned(),
        principal: identity.principal().to_owned(),
    };
    let mut answer = Explanation {
        request: request_summary,
        source: source_summary,
        listener: listener_summary,
        route: None,
        outcome: String::new(),
        destinations: Vec::new(),
        notes: Vec::new(),
    };
    if let (Some((ns, name)), None) = (&query.gateway, &answer.listener.server) {
        answer.outcome = format!(
            "404 NR: no server of Gateway {ns}/{name} serves {host}{}",
            port.map(|p| format!(" on port {p}")).unwrap_or_default()
        );
        return Ok(answer);
    }

    let selected = match routing.table.select(&view) {
        Ok(s) => s,
        Err(_) => {
            answer.outcome = match routing.table.virtual_host(&host) {
                Some(vh) => format!("404 NR: no route of {} matches the request", vh.name),
                None => format!(
                    "404 NR: no VirtualService on this listener and no service of the files answers {host}"
                ),
            };
            answer.notes = notes;
            return Ok(answer);
        }
    };

    // The VirtualService, rule and match block behind the selected route.
    let vs = selected
        .virtual_host
        .name
        .split_once('/')
        .and_then(|(ns, name)| {
            config
                .virtual_services()
                .iter()
                .find(|v| v.metadata.namespace == ns && v.metadata.name == name)
        });
    let position = selected
        .virtual_host
        .routes
        .iter()
        .position(|r| std::ptr::eq(r, selected.route));
    let source_of = vs.and_then(|vs| {
        let sources = http_route_sources(vs, &options);
        position.and_then(|p| sources.get(p).cloned())
    });
    let rule_index = source_of.as_ref().map(|(i, _)| *i);
    let match_index = selected.matched.and_then(|m| {
        let j = selected
            .route
            .matches
            .iter()
            .position(|b| std::ptr::eq(b, m))?;
        source_of
            .as_ref()
            .and_then(|(_, kept)| kept.get(j).copied())
    });
    let http_rule = vs.zip(rule_index).and_then(|(vs, i)| vs.spec.http.get(i));
    let rule_path = rule_index.map(|i| format!("spec.http[{i}]"));
    let at = |field: &str| vs.map(|vs| locate(report, "VirtualService", vs, field));
    let route_policy = &selected.route.policy;
    let retry = RetryPolicy::from_route(route_policy.retries.as_deref(), route_policy.timeout)
        .map_err(|e| ExplainError::Compile(vec![e.to_string()]))?;
    let retries = RetrySummary {
        attempts: retry.attempts,
        per_try_timeout: retry.per_try_timeout.map(duration),
        retry_on: retry.retry_on.to_string(),
        backoff: duration(retry.backoff.base()),
        default: route_policy.retries.is_none(),
        at: rule_path
            .as_ref()
            .filter(|_| http_rule.is_some_and(|r| r.retries.is_some()))
            .and_then(|p| at(&format!("{p}.retries"))),
    };
    answer.route = Some(RouteSummary {
        virtual_host: selected.virtual_host.name.clone(),
        virtual_service: at(""),
        rule: rule_path.as_deref().and_then(at),
        rule_index,
        rule_name: selected.route.name.clone(),
        matched: rule_path
            .as_ref()
            .zip(match_index)
            .and_then(|(p, j)| at(&format!("{p}.match[{j}]"))),
        match_index,
        timeout: route_policy.timeout.map(duration),
        timeout_at: rule_path
            .as_ref()
            .filter(|_| http_rule.is_some_and(|r| r.timeout.is_some()))
            .and_then(|p| at(&format!("{p}.timeout"))),
        retries,
    });

    let weighted = match &selected.route.action {
        RouteAction::Forward(w) => w,
        RouteAction::Redirect(r) => {
            answer.outcome = format!("redirect {}", r.status.as_u16());
            answer.notes = notes;
            return Ok(answer);
        }
        RouteAction::Direct(d) => {
            answer.outcome = format!("direct response {}", d.status.as_u16());
            answer.notes = notes;
            return Ok(answer);
        }
    };
    answer.outcome = "forwarded".into();

    // The written destinations the compiled ones come from (weight-0 entries of a
    // multi-destination route are not in the table, VS-31).
    let written: Vec<(usize, &config::HttpRouteDestination)> = http_rule
        .map(|r| {
            let single = r.route.len() == 1;
            r.route
                .iter()
                .enumerate()
                .filter(|(_, d)| single || d.weight.unwrap_or(0) != 0)
                .collect()
        })
        .unwrap_or_default();
    let peer_auth = PeerAuthentication::from_config(config);
    for (i, target) in weighted.items().iter().enumerate() {
        let Some(key) = routing.table.destinations().get(target.destination) else {
            continue;
        };
        let (yaml_weight, dest_at) = match (written.get(i), &rule_path) {
            (Some((k, d)), Some(p)) => (d.weight, at(&format!("{p}.route[{k}]"))),
            _ => (None, None),
        };
        let d = destination(
            config,
            report,
            &routing,
            query,
            &identity,
            &peer_auth,
            key,
            request_port,
            &view,
            &mut notes,
        );
        answer.destinations.push(DestinationSummary {
            weight: yaml_weight,
            percent: (weighted.share(i) * 1000.0).round() / 10.0,
            at: dest_at,
            ..d
        });
    }
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    answer.notes = notes;
    Ok(answer)
}

/// The destination `key`: subset, DestinationRule, policy, TLS and authorization.
#[allow(clippy::too_many_arguments)]
fn destination(
    config: &MeshConfig,
    report: &LoadReport,
    routing: &Routing,
    query: &Query,
    identity: &Identity,
    peer_auth: &PeerAuthentication,
    key: &DestinationKey,
    request_port: u16,
    view: &RequestView<'_>,
    notes: &mut Vec<String>,
) -> DestinationSummary {
    let host = key.host.to_string();
    let subset = key.subset.as_deref().map(str::to_owned);
    let client_ns = &query.source.namespace;
    let domain = Naming::default().domain;
    let dr = config.destination_rule_for(&host, client_ns);
    let subset_index = subset
        .as_deref()
        .and_then(|name| dr?.spec.subsets.iter().position(|s| s.name == name));
    let resolved = routing.resolve(key);
    let (port, target_port, policy, selector, endpoints) = match &resolved {
        Ok(r) => {
            let endpoints = matches!(r.service.resolution, mesh_routing::Resolution::Static)
                .then(|| r.service.static_endpoints(&r.port, &r.selector));
            (
                Some(r.port.number),
                r.port.target_port.unwrap_or(r.port.number),
                r.policy.clone(),
                Some(r.selector.clone()),
                endpoints,
            )
        }
        Err(_) => {
            let port = key.port.unwrap_or(request_port);
            let rule = routing.rules.get(&host);
            let registered = routing.registry.service(&host).is_some();
            if !registered {
                notes.push(format!(
                    "no ServiceEntry in these files declares {host}: its port and endpoints come \
                     from the platform (a Kubernetes Service under `discovery`); a sidecar reading \
                     only these files answers 503 NC"
                ));
            } else {
                notes.push(format!(
                    "{key} cannot be resolved (unknown port or subset): the proxy answers 503 NC"
                ));
            }
            let selector = match &subset {
                Some(name) => rule.and_then(|r| r.subset(name)).map(|s| s.labels.clone()),
                None => Some(Labels::new()),
            };
            if selector.is_none()
                && let Some(name) = &subset
            {
                notes.push(format!(
                    "no DestinationRule defines subset `{name}` of {host}: the proxy answers 503 NC"
                ));
            }
            let policy = rule
                .map(|r| r.resolve(subset.as_deref(), port))
                .unwrap_or_default();
            (Some(port), port, policy, selector, None)
        }
    };
    let subset_labels = subset.as_ref().and(selector.clone());

    // Where each merged block comes from: the most specific level holding it.
    let dr_located = dr.map(|dr| locate(report, "DestinationRule", dr, ""));
    let block_at = |pick: &dyn Fn(&TrafficPolicy, u16) -> Option<String>| {
        let dr = dr?;
        let p = port?;
        let mut candidates: Vec<String> = Vec::new();
        if let Some(si) = subset_index
            && let Some(tp) = dr.spec.subsets[si].traffic_policy.as_ref()
            && let Some(path) = pick(tp, p)
        {
            candidates.push(format!("spec.subsets[{si}].trafficPolicy{path}"));
        }
        if let Some(tp) = dr.spec.traffic_policy.as_ref()
            && let Some(path) = pick(tp, p)
        {
            candidates.push(format!("spec.trafficPolicy{path}"));
        }
        candidates
            .first()
            .map(|path| locate(report, "DestinationRule", dr, path))
    };
    // Picks the written block equal to the merged one: port level first, then the level.
    macro_rules! picker {
        ($field:ident, $yaml:literal) => {
            |tp: &TrafficPolicy, p: u16| -> Option<String> {
                let merged = policy.$field.as_ref()?;
                if let Some((j, pl)) = tp
                    .port_level_settings
                    .iter()
                    .enumerate()
                    .find(|(_, pl)| pl.port.is_some_and(|s| s.number == u32::from(p)))
                {
                    return (pl.$field.as_ref() == Some(merged))
                        .then(|| format!(".portLevelSettings[{j}].{}", $yaml));
                }
                (tp.$field.as_ref() == Some(merged)).then(|| format!(".{}", $yaml))
            }
        };
    }
    let lb_at = block_at(&picker!(load_balancer, "loadBalancer"));
    let pool_at = block_at(&picker!(connection_pool, "connectionPool"));
    let outlier_at = block_at(&picker!(outlier_detection, "outlierDetection"));
    let tls_at = block_at(&picker!(tls, "tls"));
    let policy_summary = policy_summary(&policy, lb_at, pool_at, outlier_at, notes);

    // The destination workload, for PeerAuthentication and authorization.
    let (dest_ns, labels, labels_from) = destination_workload(
        query,
        &host,
        &domain,
        selector.as_ref(),
        endpoints.as_deref(),
    );
    let workload_port = endpoints
        .as_ref()
        .and_then(|e| e.first())
        .map_or(target_port, |e| e.address.port());

    // TLS: the client's choice, the server's mode, and what the connection becomes.
    let (client, client_transport) = match policy.tls.as_ref() {
        None => {
            let transport = match endpoints.as_deref() {
                Some(eps) if !eps.is_empty() => {
                    let istio = eps.iter().filter(|e| e.tls_mode == TlsMode::Istio).count();
                    if istio == eps.len() {
                        "Istio mTLS".to_owned()
                    } else if istio == 0 {
                        "plaintext".to_owned()
                    } else {
                        format!(
                            "Istio mTLS to {istio} of {} endpoints (those with a sidecar), plaintext to the others",
                            eps.len()
                        )
                    }
                }
                _ => "Istio mTLS".to_owned(),
            };
            ("AUTO".to_owned(), transport)
        }
        Some(tls) => {
            let mode = tls.mode.unwrap_or(config::ClientTlsMode::Disable);
            let transport = match mode {
                config::ClientTlsMode::Disable => "plaintext",
                config::ClientTlsMode::Simple | config::ClientTlsMode::Mutual => "TLS origination",
                config::ClientTlsMode::IstioMutual => "Istio mTLS",
            };
            (istio_name(&mode), transport.to_owned())
        }
    };
    let server_mode = peer_auth
        .for_workload(&dest_ns, &labels)
        .mode(workload_port);
    let server_at = peer_auth
        .deciding_policy(&dest_ns, &labels, workload_port)
        .and_then(|p| {
            let r = config
                .peer_authentications()
                .iter()
                .find(|r| r.metadata.namespace == p.namespace && r.metadata.name == p.name)?;
            let port_key = u32::from(workload_port);
            let field = if r.spec.port_level_mtls.contains_key(&port_key) {
                format!("spec.portLevelMtls[\"{workload_port}\"].mode")
            } else {
                "spec.mtls.mode".to_owned()
            };
            Some(locate(report, "PeerAuthentication", r, &field))
        });
    let mtls = client_transport.starts_with("Istio mTLS");
    let connection = match (mtls, client_transport.as_str(), server_mode) {
        (true, _, PeerAuthMode::Strict | PeerAuthMode::Permissive) => "mTLS".to_owned(),
        (true, _, PeerAuthMode::Disable) => "refused: the client sends Istio mTLS and the \
             destination's PeerAuthentication DISABLE accepts plaintext only"
            .to_owned(),
        (false, "plaintext", PeerAuthMode::Strict) => {
            "refused: the destination's PeerAuthentication STRICT accepts mTLS only and the \
             client sends plaintext"
                .to_owned()
        }
        (false, "plaintext", _) => "plaintext".to_owned(),
        (false, _, PeerAuthMode::Strict) => "refused: the destination's PeerAuthentication \
             STRICT accepts Istio mTLS only and the client originates TLS of its own"
            .to_owned(),
        (false, other, _) => other.to_owned(),
    };
    let tls = TlsSummary {
        client,
        client_transport,
        client_at: tls_at,
        server: server_mode.to_string(),
        server_at,
        connection: connection.clone(),
    };

    let authorization = authorize(
        config,
        report,
        query,
        identity,
        view,
        &dest_ns,
        labels,
        labels_from,
        &connection,
        notes,
    );
    DestinationSummary {
        host,
        subset,
        port,
        weight: None,
        percent: 0.0,
        at: None,
        subset_labels,
        subset_at: dr
            .zip(subset_index)
            .map(|(dr, i)| locate(report, "DestinationRule", dr, &format!("spec.subsets[{i}]"))),
        destination_rule: dr_located,
        registered: resolved.is_ok(),
        endpoints: endpoints.as_ref().map(Vec::len),
        policy: policy_summary,
        tls,
        authorization,
    }
}

fn policy_summary(
    policy: &ResolvedPolicy,
    lb_at: Option<Located>,
    pool_at: Option<Located>,
    outlier_at: Option<Located>,
    notes: &mut Vec<String>,
) -> PolicySummary {
    let lb = match policy.load_balancer.as_ref().map(LbConfig::try_from) {
        None => LbConfig::default(),
        Some(Ok(lb)) => lb,
        Some(Err(e)) => {
            notes.push(e.to_string());
            LbConfig::default()
        }
    };
    let load_balancer = match lb.policy {
        LbPolicy::LeastRequest => "LEAST_REQUEST",
        LbPolicy::RoundRobin => "ROUND_ROBIN",
        LbPolicy::Random => "RANDOM",
        LbPolicy::ConsistentHash(_) => "consistentHash",
    };
    let limits = policy
        .connection_pool
        .as_ref()
        .map(PoolLimits::from)
        .unwrap_or_default();
    let set = |v: u32| (v != u32::MAX).then_some(v);
    let pool_limits = PoolSummary {
        max_connections: set(limits.max_connections),
        http1_max_pending_requests: set(limits.http1_max_pending_requests),
        http2_max_requests: set(limits.http2_max_requests),
        max_requests_per_connection: (limits.max_requests_per_connection != 0)
            .then_some(limits.max_requests_per_connection),
        max_retries: set(limits.max_retries),
        idle_timeout: duration(limits.idle_timeout),
    };
    let outlier = policy.outlier_detection.as_ref().map(|od| {
        let c = OutlierConfig::from(od);
        OutlierSummary {
            consecutive_5xx_errors: c.consecutive_5xx_errors,
            consecutive_gateway_errors: c.consecutive_gateway_errors,
            interval: duration(c.interval),
            base_ejection_time: duration(c.base_ejection_time),
            max_ejection_percent: c.max_ejection_percent,
            min_health_percent: c.min_health_percent,
        }
    });
    let json = |v: Option<serde_json::Value>| v.filter(|v| !v.is_null());
    PolicySummary {
        load_balancer: load_balancer.to_owned(),
        load_balancer_at: lb_at,
        connection_pool: json(
            policy
                .connection_pool
                .as_ref()
                .and_then(|c| serde_json::to_value(c).ok()),
        ),
        pool_limits,
        connection_pool_at: pool_at,
        outlier_detection: json(
            policy
                .outlier_detection
                .as_ref()
                .and_then(|c| serde_json::to_value(c).ok()),
        ),
        outlier,
        outlier_detection_at: outlier_at,
    }
}

/// The destination workload's namespace and labels, and where the labels come from.
fn destination_workload(
    query: &Query,
    host: &str,
    domain: &str,
    selector: Option<&Labels>,
    endpoints: Option<&[mesh_core::Endpoint]>,
) -> (String, Labels, String) {
    let (name, namespace) = match host_namespace(host, domain) {
        Some((name, ns)) => (name.to_owned(), ns.to_owned()),
        None => (
            host.split('.').next().unwrap_or(host).to_owned(),
            query.source.namespace.clone(),
        ),
    };
    if let Some(labels) = &query.destination_labels {
        return (namespace, labels.clone(), "given".into());
    }
    if let Some(ep) = endpoints.and_then(|e| e.iter().find(|e| !e.labels.is_empty())) {
        let labels: Labels = (*ep.labels).clone();
        return (
            namespace,
            labels,
            format!("the labels of endpoint {}", ep.address),
        );
    }
    let mut labels = Labels::from([("app".to_owned(), name.clone())]);
    let mut from = format!("assumed: app={name}");
    if let Some(sel) = selector {
        for (k, v) in sel {
            labels.insert(k.clone(), v.clone());
            let _ = write!(from, ", {k}={v}");
        }
        if !sel.is_empty() {
            from.push_str(" (the subset's labels)");
        }
    }
    (namespace, labels, from)
}

/// The AuthorizationPolicy decision at the destination workload.
#[allow(clippy::too_many_arguments)]
fn authorize(
    config: &MeshConfig,
    report: &LoadReport,
    query: &Query,
    identity: &Identity,
    view: &RequestView<'_>,
    namespace: &str,
    labels: Labels,
    labels_from: String,
    connection: &str,
    notes: &mut Vec<String>,
) -> AuthzSummary {
    let applied: Vec<AppliedPolicy> = config
        .authorization_policies_for(namespace, &labels)
        .into_iter()
        .map(|p| AppliedPolicy {
            name: format!("{}/{}", p.metadata.namespace, p.metadata.name),
            action: istio_name(&p.spec.action.unwrap_or_default()),
            dry_run: p
                .metadata
                .annotations
                .get(mesh_tls::authz::DRY_RUN_ANNOTATION)
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            at: locate(report, "AuthorizationPolicy", p, ""),
        })
        .collect();
    for ra in config.request_authentications_for(namespace, &labels) {
        notes.push(format!(
            "RequestAuthentication {}/{} applies at {namespace} ({}): a request with an invalid \
             token is answered 401; this explanation is for a request without a token",
            ra.metadata.namespace,
            ra.metadata.name,
            locate(report, "RequestAuthentication", ra, "").position()
        ));
    }
    let mtls = connection == "mTLS";
    let principal = mtls.then(|| identity.principal().to_owned());
    let mut out = AuthzSummary {
        namespace: namespace.to_owned(),
        labels,
        labels_from,
        principal,
        allowed: false,
        status: 403,
        action: None,
        policy: None,
        rule: None,
        at: None,
        reason: String::new(),
        policies: applied,
    };
    if connection.starts_with("refused") {
        out.status = 503;
        out.reason = "the connection is refused before any request is read".into();
        return out;
    }
    let set = match PolicySet::from_config(config, namespace, &out.labels) {
        Ok(s) => s,
        Err(e) => {
            // The proxy refuses such a configuration; say so rather than guess.
            out.reason =
                format!("the policies do not compile ({e}): the proxy refuses this configuration");
            return out;
        }
    };
    let target = query.path.as_str();
    let canonical = match canonicalize(target, &NormalizeOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            out.status = 400;
            out.reason = format!("the path is refused before authorization: {e}");
            return out;
        }
    };
    let attrs = RequestAttributes {
        method: view.method.as_str(),
        path: canonical.path(),
        host: Some(view.authority),
        headers: view.headers,
        peer: mtls.then_some(identity),
        connection: None,
        remote_ip: None,
        server_name: ServerName::Unknown,
        request_auth: None,
    };
    let decision = set.evaluate(&attrs);
    out.allowed = decision.allowed;
    out.status = if decision.allowed { 200 } else { 403 };
    let enforced: Vec<&AppliedPolicy> = out.policies.iter().filter(|p| !p.dry_run).collect();
    let allow_policies: Vec<String> = enforced
        .iter()
        .filter(|p| p.action == "ALLOW")
        .map(|p| p.name.clone())
        .collect();
    match &decision.policy {
        Some(m) => {
            let name = m.name.to_string();
            let resource = config
                .authorization_policies()
                .iter()
                .find(|p| format!("{}/{}", p.metadata.namespace, p.metadata.name) == name);
            let action = if decision.allowed { "ALLOW" } else { "DENY" };
            out.action = Some(action.into());
            out.policy = Some(name.clone());
            out.rule = Some(m.rule);
            out.at = resource.map(|r| {
                locate(
                    report,
                    "AuthorizationPolicy",
                    r,
                    &format!("spec.rules[{}]", m.rule),
                )
            });
            out.reason = if decision.allowed {
                format!("allowed by rules[{}] of ALLOW policy {name}", m.rule)
            } else {
                format!("denied by rules[{}] of DENY policy {name}", m.rule)
            };
        }
        None if decision.allowed => {
            out.reason = "allowed: no CUSTOM or DENY rule matches and no ALLOW policy applies \
                          to the workload (the default)"
                .into();
        }
        None => {
            out.reason = format!(
                "denied by default: no CUSTOM or DENY rule matches, and ALLOW policies apply to the \
                 workload ({}) but none of their rules matches",
                allow_policies.join(", ")
            );
            if allow_policies.len() == 1 {
                out.policy = allow_policies.first().cloned();
                out.at = enforced
                    .iter()
                    .find(|p| p.action == "ALLOW")
                    .map(|p| p.at.clone());
            }
        }
    }
    if let Some(a) = &decision.audit {
        let _ = write!(out.reason, "; audited by rules[{}] of {}", a.rule, a.name);
    }
    if let Some(d) = &decision.dry_run {
        let _ = write!(
            out.reason,
            "; the dry-run policies would {}",
            if d.allowed { "allow it" } else { "deny it" }
        );
    }
    out
}
