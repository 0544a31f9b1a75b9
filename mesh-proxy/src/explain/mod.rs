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

mod destination;
mod model;
mod render;

#[cfg(feature = "proxy")]
pub mod cli;

use http::{HeaderMap, Method};
use mesh_core::config::{self, LoadReport, MeshConfig, Resource};
use mesh_core::{Identity, Labels};
use mesh_resilience::retry::RetryPolicy;
use mesh_routing::compile::http_route_sources;
use mesh_routing::{CompileOptions, Listener, Naming, RequestView, RouteAction};
use mesh_tls::PeerAuthentication;
use serde::Serialize;

pub use model::{
    AppliedPolicy, AuthzSummary, DestinationSummary, Explanation, ListenerSummary, Located,
    OutlierSummary, PolicySummary, PoolSummary, RequestSummary, RetrySummary, RouteSummary,
    ServerSummary, SourceSummary, TlsSummary,
};
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
    // What the sender's namespace sees (exportTo), as its proxy compiles it.
    let config = &config.exported_to(&source.namespace);
    let options = CompileOptions {
        naming: Naming {
            namespace: source.namespace.clone(),
            ..Naming::default()
        },
        listener: listener.clone(),
        trust_domain: query.trust_domain.clone(),
        workload_labels: source.labels.clone(),
    };
    let routing = crate::mesh::routing(config, &options, &PeerAuthentication::from_config(config))
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
                None if query.gateway.is_some() => {
                    format!("404 NR: no VirtualService bound to the Gateway answers {host}")
                }
                // The sidecar's outbound stack, for a host outside its route table.
                None => format!(
                    "passthrough: no VirtualService and no service of the files answers {host}; \
                     with outboundTrafficPolicy ALLOW_ANY (the default) the request goes to \
                     {host} itself in plaintext, without mesh policies; with REGISTRY_ONLY it \
                     is answered 502"
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
        let sources = http_route_sources(config, vs, &options);
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
        let d = destination::destination(
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
