//! Compilation of Istio configuration ([`MeshConfig`]) into a [`Routing`]: the route table
//! of one listener, the registry from `ServiceEntry`s and the DestinationRules.
//!
//! # Behaviour
//!
//! - Listener binding (VS-02, VS-06, GW-03): for [`Listener::Mesh`] the VirtualServices
//!   whose `gateways` are empty or list `mesh`; for [`Listener::Gateway`] those listing the
//!   gateway (`name` in their own namespace or `namespace/name`), with their hosts narrowed
//!   to the gateway servers' hosts (`*.example.com` covers `dev.example.com`, not
//!   `example.com`). A match block with its own `gateways` is kept only if that list names
//!   the listener; a route whose blocks are all dropped is dropped. On the mesh listener,
//!   blocks whose `sourceLabels` or `sourceNamespace` do not describe this proxy's workload
//!   ([`CompileOptions::workload_labels`], [`Naming::namespace`]) are dropped the same way.
//! - Hosts and destination hosts are qualified with the VirtualService's namespace (VS-01).
//! - Weights (VS-30..VS-33), faults (VS-70..VS-72, omitted percentage = 0 %), headers
//!   (VS-83: `host`/`:authority` become an authority rewrite, other pseudo-headers are
//!   dropped), rewrites, redirects, direct responses and mirrors (VS-84, absent percentage =
//!   100 %) are translated to the runtime types of this crate.
//! - Delegation (VS-86): a route with `delegate` is replaced by the delegate
//!   VirtualService's routes merged with it (see the `delegate` module: one level,
//!   conflicting delegate routes dropped, a missing delegate drops the route); delegate
//!   destinations are qualified with the delegate's namespace.
//! - On the mesh listener every registry host without a VirtualService gets a default
//!   route to itself.
//!
//! # Errors
//!
//! Every translation problem is collected as a [`CompileError`] naming the VirtualService;
//! configuration that passed `mesh-core` validation compiles.
//!
//! # Example
//!
//! ```
//! use http::Request;
//! use mesh_core::config::{LoadOptions, MeshConfig};
//! use mesh_routing::{CompileOptions, RequestView, Routing};
//!
//! let yaml = r#"
//! apiVersion: networking.istio.io/v1
//! kind: VirtualService
//! metadata: {name: reviews, namespace: default}
//! spec:
//!   hosts: [reviews]
//!   http:
//!   - match: [{headers: {end-user: {exact: jason}}}]
//!     route: [{destination: {host: reviews, subset: v2}}]
//!   - route: [{destination: {host: reviews, subset: v1}}]
//! "#;
//! let (config, _) = MeshConfig::from_yaml_str("reviews.yaml", yaml, &LoadOptions::default()).unwrap();
//! let routing = Routing::compile(&config, &CompileOptions::default()).unwrap();
//! let req = Request::get("http://reviews:9080/").header("end-user", "jason").body(()).unwrap();
//! let selected = routing.table.select(&RequestView::from_request(&req, None)).unwrap();
//! assert!(selected.matched.is_some());
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use mesh_core::config::{self, HttpMatchRequest, HttpRoute, MeshConfig, VirtualService};
use mesh_core::extensions::RoutePolicy;
use mesh_core::{Identity, Locality};

use crate::cors::CorsPolicy;
use crate::fault::{AbortStatus, FaultPolicy, Percent, grpc_code};
use crate::headers::{HeaderOps, Headers};
use crate::matcher::{HeaderMatch, MatchError, QueryParamMatch, RouteMatch, StringMatch, UriMatch};
use crate::registry::{PortProtocol, Registry, Resolution, Service, ServicePort, WorkloadEntry};
use crate::rewrite::{DirectResponse, Redirect, RedirectPort, RegexRewrite, Rewrite};
use crate::router::Routing;
use crate::stats::RouteStats;
use crate::subset::{DestinationRule, DestinationRules};
use crate::table::{
    CompileError, DestinationKey, L4Match, Mirror, Naming, Route, RouteAction, RouteTable,
    RouteTarget, TableBuilder, TcpRule, VirtualHost, default_route, effective_timeout,
};
use crate::weighted::Weighted;

/// One match block of a `tcp` or `tls` route, borrowed from the configuration.
struct L4Block<'a> {
    gateways: &'a [String],
    source_labels: &'a mesh_core::Labels,
    source_namespace: Option<&'a String>,
    port: Option<u32>,
    sni_hosts: &'a [String],
    destination_subnets: &'a [String],
    source_subnet: Option<&'a String>,
}

impl<'a> L4Block<'a> {
    fn tcp(m: &'a config::L4MatchAttributes) -> Self {
        Self {
            gateways: &m.gateways,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_ref(),
            port: m.port,
            sni_hosts: &[],
            destination_subnets: &m.destination_subnets,
            source_subnet: m.source_subnet.as_ref(),
        }
    }

    fn tls(m: &'a config::TlsMatchAttributes) -> Self {
        Self {
            gateways: &m.gateways,
            source_labels: &m.source_labels,
            source_namespace: m.source_namespace.as_ref(),
            port: m.port,
            sni_hosts: &m.sni_hosts,
            // TLS routes are chosen by SNI before any address is looked at.
            destination_subnets: &[],
            source_subnet: None,
        }
    }
}

/// The listener a table is compiled for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The sidecar (`mesh`).
    Mesh,
    /// A gateway, `namespace/name`.
    Gateway {
        /// The Gateway resource's namespace.
        namespace: String,
        /// The Gateway resource's name.
        name: String,
    },
}

/// What the compilation needs besides the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Namespace and cluster domain of the proxy.
    pub naming: Naming,
    /// The listener the table serves.
    pub listener: Listener,
    /// Trust domain of `serviceAccount` identities (`cluster.local`).
    pub trust_domain: String,
    /// Labels of the workload this sidecar serves: match blocks with `sourceLabels` apply
    /// only when they are all among these (VS-06).
    pub workload_labels: mesh_core::Labels,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            naming: Naming::default(),
            listener: Listener::Mesh,
            trust_domain: "cluster.local".into(),
            workload_labels: mesh_core::Labels::new(),
        }
    }
}

impl CompileOptions {
    /// Options for the gateway `namespace/name`.
    pub fn gateway(namespace: &str, name: &str) -> Self {
        Self {
            listener: Listener::Gateway {
                namespace: namespace.into(),
                name: name.into(),
            },
            ..Self::default()
        }
    }
}

/// Whether the gateway list `gateways` (of a resource in `namespace`) names `listener`.
fn binds(gateways: &[String], namespace: &str, listener: &Listener) -> bool {
    match listener {
        Listener::Mesh => gateways.is_empty() || gateways.iter().any(|g| g == "mesh"),
        Listener::Gateway {
            namespace: gns,
            name,
        } => gateways.iter().any(|g| match g.split_once('/') {
            Some((ns, n)) => ns == gns && n == name,
            None => g == name && namespace == gns,
        }),
    }
}

/// Whether the host pattern `pattern` covers `host` (`*`, exact, or `*.suffix` with at
/// least one more label).
fn covers(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || pattern == host
        || pattern.strip_prefix('*').is_some_and(|suffix| {
            suffix.starts_with('.') && host.len() > suffix.len() && host.ends_with(suffix)
        })
}

/// The hosts of a VirtualService a gateway exposes (GW-03): each VS host covered by a
/// server host, or each server host covered by a wildcard VS host.
fn gateway_hosts(vs_hosts: &[String], vs_namespace: &str, gw: &config::Gateway) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for server in &gw.spec.servers {
        for entry in &server.hosts {
            let (ns, dns) = entry.split_once('/').unwrap_or(("*", entry.as_str()));
            let ns_ok = match ns {
                "*" => true,
                "." => vs_namespace == gw.metadata.namespace,
                other => other == vs_namespace,
            };
            if !ns_ok {
                continue;
            }
            let dns = dns.to_ascii_lowercase();
            for h in vs_hosts {
                let chosen = if covers(&dns, h) {
                    Some(h.clone())
                } else if covers(h, &dns) {
                    Some(dns.clone())
                } else {
                    None
                };
                if let Some(c) = chosen
                    && !out.contains(&c)
                {
                    out.push(c);
                }
            }
        }
    }
    out
}

struct Ctx<'a> {
    resource: String,
    namespace: &'a str,
    naming: &'a Naming,
}

impl Ctx<'_> {
    fn invalid(&self, message: impl Into<String>) -> CompileError {
        CompileError::Invalid {
            resource: self.resource.clone(),
            message: message.into(),
        }
    }

    fn matcher(&self, source: MatchError) -> CompileError {
        CompileError::Match {
            resource: self.resource.clone(),
            source,
        }
    }

    fn string_match(&self, m: &config::StringMatch) -> Result<Option<StringMatch>, CompileError> {
        Ok(match m {
            config::StringMatch::Exact(s) => Some(StringMatch::Exact(s.clone())),
            config::StringMatch::Prefix(s) => Some(StringMatch::Prefix(s.clone())),
            // VS-14/VS-17: `regex: "*"` is a presence match, not a regex.
            config::StringMatch::Regex(r) if r == "*" => None,
            config::StringMatch::Regex(r) => {
                Some(StringMatch::regex(r).map_err(|e| self.matcher(e))?)
            }
            config::StringMatch::Present => None,
        })
    }

    fn required_match(
        &self,
        m: &config::StringMatch,
        field: &str,
    ) -> Result<StringMatch, CompileError> {
        self.string_match(m)?
            .ok_or_else(|| self.invalid(format!("`{field}` needs exact, prefix or regex")))
    }

    fn header_name(&self, name: &str) -> Result<HeaderName, CompileError> {
        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| self.invalid(format!("invalid header name {name:?}")))
    }

    fn route_match(&self, m: &HttpMatchRequest) -> Result<RouteMatch, CompileError> {
        let mut headers = Vec::new();
        for (name, sm) in &m.headers {
            // VS-14: pseudo-header keys are ignored; VS-19 JWT claims are not headers.
            if matches!(name.as_str(), "uri" | "scheme" | "method" | "authority")
                || name.starts_with("@request.auth.claims")
            {
                continue;
            }
            headers.push(HeaderMatch::new(
                self.header_name(name)?,
                self.string_match(sm)?,
            ));
        }
        for (name, sm) in &m.without_headers {
            if matches!(name.as_str(), "uri" | "scheme" | "method" | "authority")
                || name.starts_with("@request.auth.claims")
            {
                continue;
            }
            headers.push(HeaderMatch::without(
                self.header_name(name)?,
                self.string_match(sm)?,
            ));
        }
        let mut query_params = Vec::new();
        for (name, sm) in &m.query_params {
            query_params.push(QueryParamMatch {
                name: name.clone(),
                matcher: self.string_match(sm)?,
            });
        }
        let uri = match &m.uri {
            None | Some(config::StringMatch::Present) => None,
            Some(sm) => Some(UriMatch {
                matcher: self.required_match(sm, "uri")?,
                ignore_case: m.ignore_uri_case,
            }),
        };
        let opt = |sm: &Option<config::StringMatch>,
                   field: &str|
         -> Result<Option<StringMatch>, CompileError> {
            sm.as_ref()
                .map(|s| self.required_match(s, field))
                .transpose()
        };
        let port = m
            .port
            .map(|p| u16::try_from(p).map_err(|_| self.invalid(format!("port {p} out of range"))))
            .transpose()?;
        Ok(RouteMatch {
            name: m.name.clone(),
            uri,
            scheme: opt(&m.scheme, "scheme")?,
            method: opt(&m.method, "method")?,
            authority: opt(&m.authority, "authority")?,
            headers,
            query_params,
            port,
            stats: None,
        })
    }

    /// Translates header operations; `host`/`:authority` in set/add becomes `authority`.
    fn header_ops(
        &self,
        ops: Option<&config::HeaderOperations>,
        authority: &mut Option<HeaderValue>,
    ) -> Result<HeaderOps, CompileError> {
        let mut out = HeaderOps::default();
        let Some(ops) = ops else {
            return Ok(out);
        };
        let mut pairs = |src: &std::collections::BTreeMap<String, String>,
                         dst: &mut Vec<(HeaderName, HeaderValue)>|
         -> Result<(), CompileError> {
            for (k, v) in src {
                let lower = k.to_ascii_lowercase();
                let value = HeaderValue::from_str(v)
                    .map_err(|_| self.invalid(format!("invalid value for header {k:?}")))?;
                if lower == "host" || lower == ":authority" {
                    *authority = Some(value);
                    continue;
                }
                if lower.starts_with(':') {
                    continue;
                }
                dst.push((self.header_name(&lower)?, value));
            }
            Ok(())
        };
        pairs(&ops.set, &mut out.set)?;
        pairs(&ops.add, &mut out.add)?;
        for name in &ops.remove {
            if !name.starts_with(':') {
                out.remove.push(self.header_name(name)?);
            }
        }
        Ok(out)
    }

    fn headers(
        &self,
        h: Option<&config::Headers>,
        authority: &mut Option<HeaderValue>,
    ) -> Result<Headers, CompileError> {
        let Some(h) = h else {
            return Ok(Headers::default());
        };
        let request = self.header_ops(h.request.as_ref(), authority)?;
        let mut ignored = None;
        let response = self.header_ops(h.response.as_ref(), &mut ignored)?;
        Ok(Headers { request, response })
    }

    fn destination(
        &self,
        builder: &mut TableBuilder,
        d: &config::Destination,
    ) -> Result<usize, CompileError> {
        let host = self.naming.qualify(&d.host, self.namespace);
        let port = d
            .port
            .map(|p| {
                u16::try_from(p.number)
                    .map_err(|_| self.invalid(format!("port {} out of range", p.number)))
            })
            .transpose()?;
        Ok(builder.destination(DestinationKey::new(&host, d.subset.as_deref(), port)))
    }

    /// A VirtualService `tcp` or `tls` route from its match blocks (as
    /// `(gateways, sourceLabels, sourceNamespace, port, sniHosts)`) and destinations:
    /// the blocks that apply to this proxy, and the weighted destinations; `None` when
    /// the route has blocks and none applies.
    fn l4_route<'m>(
        &self,
        builder: &mut TableBuilder,
        blocks: impl ExactSizeIterator<Item = L4Block<'m>>,
        route: &[config::RouteDestination],
        listener: &Listener,
        workload_labels: &mesh_core::Labels,
    ) -> Result<Option<TcpRule>, CompileError> {
        let had_blocks = blocks.len() > 0;
        let mut matches = Vec::new();
        for m in blocks {
            if !m.gateways.is_empty() && !binds(m.gateways, self.namespace, listener) {
                continue;
            }
            if *listener == Listener::Mesh
                && (!m
                    .source_labels
                    .iter()
                    .all(|(k, v)| workload_labels.get(k) == Some(v))
                    || m.source_namespace
                        .is_some_and(|ns| *ns != self.naming.namespace))
            {
                continue;
            }
            let port = m
                .port
                .map(|p| {
                    u16::try_from(p).map_err(|_| self.invalid(format!("port {p} out of range")))
                })
                .transpose()?;
            let subnet = |s: &String| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| self.invalid(format!("`{s}` is not an IP address or CIDR")))
            };
            matches.push(L4Match {
                port,
                sni_hosts: m.sni_hosts.to_vec(),
                destination_subnets: m
                    .destination_subnets
                    .iter()
                    .map(subnet)
                    .collect::<Result<_, _>>()?,
                source_subnet: m.source_subnet.map(subnet).transpose()?,
            });
        }
        if had_blocks && matches.is_empty() {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(route.len());
        for d in route {
            let weight = d.weight.unwrap_or(0);
            let weight = u32::try_from(weight)
                .map_err(|_| self.invalid(format!("weight {weight} is negative")))?;
            entries.push((self.destination(builder, &d.destination)?, weight));
        }
        let destinations = Weighted::new(entries).map_err(|source| CompileError::Weights {
            resource: self.resource.clone(),
            source,
        })?;
        Ok(Some(TcpRule {
            matches,
            destinations,
        }))
    }

    fn fault(&self, f: Option<&config::HttpFaultInjection>) -> Result<FaultPolicy, CompileError> {
        let Some(f) = f else {
            return Ok(FaultPolicy::default());
        };
        let percent = |p: Option<config::Percent>, deprecated: Option<i32>| match (p, deprecated) {
            (Some(p), _) => Percent::from_percent(p.value),
            (None, Some(int)) => Percent::from_percent(f64::from(int)),
            // Pinned choice 5: omitted percentage = 0 %.
            (None, None) => Percent::NONE,
        };
        let delay = match &f.delay {
            Some(d) => {
                let fixed = d
                    .fixed_delay
                    .ok_or_else(|| self.invalid("fault.delay needs fixedDelay"))?;
                Some((fixed.as_std(), percent(d.percentage, d.percent)))
            }
            None => None,
        };
        let abort = match &f.abort {
            Some(a) => {
                let status = match (&a.http_status, &a.grpc_status) {
                    (Some(code), _) => AbortStatus::Http(
                        u16::try_from(*code)
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .ok_or_else(|| self.invalid(format!("invalid abort status {code}")))?,
                    ),
                    (None, Some(name)) => AbortStatus::Grpc(
                        grpc_code(name)
                            .ok_or_else(|| self.invalid(format!("unknown gRPC status {name:?}")))?,
                    ),
                    (None, None) => {
                        return Err(self.invalid("fault.abort needs httpStatus or grpcStatus"));
                    }
                };
                Some((status, percent(a.percentage, None)))
            }
            None => None,
        };
        Ok(FaultPolicy { delay, abort })
    }

    fn route(
        &self,
        builder: &mut TableBuilder,
        r: &HttpRoute,
        matches: Vec<RouteMatch>,
    ) -> Result<Route, CompileError> {
        let mut authority = None;
        let headers = self.headers(r.headers.as_ref(), &mut authority)?;
        let action = if let Some(red) = &r.redirect {
            let port = match (red.port, red.derive_port) {
                (Some(p), _) => RedirectPort::Explicit(
                    u16::try_from(p)
                        .map_err(|_| self.invalid(format!("redirect port {p} out of range")))?,
                ),
                (None, Some(config::RedirectPortSelection::FromProtocolDefault)) => {
                    RedirectPort::FromProtocolDefault
                }
                (None, Some(config::RedirectPortSelection::FromRequestPort)) => {
                    RedirectPort::FromRequestPort
                }
                (None, None) => RedirectPort::Keep,
            };
            let status = match red.redirect_code {
                Some(code) => u16::try_from(code)
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| self.invalid(format!("invalid redirect code {code}")))?,
                None => StatusCode::MOVED_PERMANENTLY,
            };
            RouteAction::Redirect(Redirect {
                uri: red.uri.clone(),
                prefix_rewrite: red.prefix_rewrite.clone(),
                authority: red.authority.clone(),
                scheme: red.scheme.clone(),
                port,
                status,
            })
        } else if let Some(dr) = &r.direct_response {
            let status = u16::try_from(dr.status)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| {
                    self.invalid(format!("invalid direct response status {}", dr.status))
                })?;
            let body = match &dr.body {
                Some(config::HttpBody {
                    string: Some(s), ..
                }) => Bytes::from(s.clone().into_bytes()),
                Some(config::HttpBody { bytes: Some(b), .. }) => Bytes::from(
                    decode_base64(b)
                        .ok_or_else(|| self.invalid("directResponse.body.bytes is not base64"))?,
                ),
                _ => Bytes::new(),
            };
            RouteAction::Direct(DirectResponse { status, body })
        } else {
            let mut entries = Vec::with_capacity(r.route.len());
            for d in &r.route {
                let weight = d.weight.unwrap_or(0);
                let weight = u32::try_from(weight)
                    .map_err(|_| self.invalid(format!("weight {weight} is negative")))?;
                let mut dest_authority = None;
                let dest_headers = self.headers(d.headers.as_ref(), &mut dest_authority)?;
                if dest_authority.is_some() {
                    authority = dest_authority;
                }
                entries.push((
                    RouteTarget {
                        destination: self.destination(builder, &d.destination)?,
                        stack: 0,
                        headers: Arc::new(dest_headers),
                    },
                    weight,
                ));
            }
            RouteAction::Forward(Weighted::new(entries).map_err(|source| {
                CompileError::Weights {
                    resource: self.resource.clone(),
                    source,
                }
            })?)
        };
        let mut rewrite = Rewrite::default();
        if let Some(rw) = &r.rewrite {
            rewrite.uri = rw.uri.clone();
            if let Some(rr) = &rw.uri_regex_rewrite {
                rewrite.uri_regex =
                    Some(RegexRewrite::new(&rr.pattern, &rr.rewrite).map_err(|e| self.matcher(e))?);
            }
            if let Some(a) = &rw.authority {
                authority = Some(
                    HeaderValue::from_str(a)
                        .map_err(|_| self.invalid(format!("invalid authority {a:?}")))?,
                );
            }
        }
        rewrite.authority = authority;
        let mut mirrors = Vec::new();
        if let Some(m) = &r.mirror {
            let percent = match (r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => Percent::from_percent(p.value),
                (None, Some(int)) => Percent::from_percent(f64::from(int)),
                (None, None) => Percent::ALL,
            };
            mirrors.push(Mirror {
                destination: self.destination(builder, m)?,
                percent,
            });
        }
        for m in &r.mirrors {
            mirrors.push(Mirror {
                destination: self.destination(builder, &m.destination)?,
                percent: m
                    .percentage
                    .map_or(Percent::ALL, |p| Percent::from_percent(p.value)),
            });
        }
        let cors = match &r.cors_policy {
            Some(c) => {
                let mut origins: Vec<StringMatch> = c
                    .allow_origin
                    .iter()
                    .cloned()
                    .map(StringMatch::Exact)
                    .collect();
                for m in &c.allow_origins {
                    // A presence match allows every origin.
                    origins.push(
                        self.string_match(m)?
                            .unwrap_or_else(|| StringMatch::Prefix(String::new())),
                    );
                }
                Some(Arc::new(
                    CorsPolicy::new(origins, c).map_err(|e| self.invalid(e.to_string()))?,
                ))
            }
            None => None,
        };
        Ok(Route {
            name: r.name.clone(),
            matches,
            action,
            rewrite,
            fault: self.fault(r.fault.as_ref())?,
            headers: Arc::new(headers),
            mirrors,
            policy: Arc::new(RoutePolicy {
                timeout: effective_timeout(r.timeout.map(|d| d.as_std())),
                retries: r.retries.clone().map(Arc::new),
                route_name: r.name.as_deref().map(Arc::from),
            }),
            cors,
        })
    }
}

/// Decodes standard base64 (padding optional).
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(s.trim()).ok()
}

/// Whether the HTTP match block `m` of a VirtualService in `namespace` applies on
/// `options.listener`: its own `gateways` name the listener (VS-06, overriding the
/// top-level list), and on the mesh listener its `sourceLabels` and `sourceNamespace`
/// describe this proxy's workload.
fn block_applies(m: &HttpMatchRequest, namespace: &str, options: &CompileOptions) -> bool {
    if !m.gateways.is_empty() && !binds(&m.gateways, namespace, &options.listener) {
        return false;
    }
    // VS-06: source selectors choose proxies, and only on the mesh listener.
    !(options.listener == Listener::Mesh
        && (!m
            .source_labels
            .iter()
            .all(|(k, v)| options.workload_labels.get(k) == Some(v))
            || m.source_namespace
                .as_ref()
                .is_some_and(|ns| *ns != options.naming.namespace)))
}

/// Where the compiled HTTP routes of `vs` on `options.listener` come from: one entry per
/// [`Route`] of its [`VirtualHost`], in order, holding the index of the `spec.http` entry
/// it was compiled from and, for each of its match blocks, the index of the
/// `spec.http[i].match` entry (blocks and routes that do not apply to the listener are
/// left out of the table, so table positions and YAML positions differ). For tools that
/// point a user at the YAML behind a routing decision. A route merged from a delegate
/// (VS-86) points at the root's delegating `spec.http` entry, with no block indexes.
pub fn http_route_sources(
    config: &MeshConfig,
    vs: &VirtualService,
    options: &CompileOptions,
) -> Vec<(usize, Vec<usize>)> {
    let namespace = vs.metadata.namespace.as_str();
    let mut out = Vec::with_capacity(vs.spec.http.len());
    for (i, r) in vs.spec.http.iter().enumerate() {
        if let Some(d) = &r.delegate {
            let Some(delegate) = crate::delegate::find(config, d, namespace) else {
                continue;
            };
            for leaf in delegate.spec.http.iter().filter(|l| l.delegate.is_none()) {
                if let Some(merged) = crate::delegate::merge_route(r, leaf)
                    && (merged.matches.is_empty()
                        || merged
                            .matches
                            .iter()
                            .any(|m| block_applies(m, namespace, options)))
                {
                    out.push((i, Vec::new()));
                }
            }
            continue;
        }
        let kept: Vec<usize> = r
            .matches
            .iter()
            .enumerate()
            .filter(|(_, m)| block_applies(m, namespace, options))
            .map(|(j, _)| j)
            .collect();
        if !r.matches.is_empty() && kept.is_empty() {
            continue;
        }
        out.push((i, kept));
    }
    out
}

/// The HTTP route `r` (of a VirtualService in `namespace`) for `options.listener`, or
/// `None` when it has match blocks and none applies there.
fn compile_http_route(
    builder: &mut TableBuilder,
    ctx: &Ctx<'_>,
    r: &HttpRoute,
    namespace: &str,
    virtual_host: &str,
    options: &CompileOptions,
) -> Result<Option<Route>, CompileError> {
    let mut matches = Vec::with_capacity(r.matches.len());
    for m in &r.matches {
        if block_applies(m, namespace, options) {
            let mut block = ctx.route_match(m)?;
            block.stats = m
                .stat_prefix
                .as_deref()
                .filter(|p| !p.is_empty())
                .map(|p| RouteStats::get(virtual_host, p));
            matches.push(block);
        }
    }
    if !r.matches.is_empty() && matches.is_empty() {
        return Ok(None);
    }
    ctx.route(builder, r, matches).map(Some)
}

/// Compiles the VirtualService `vs` into `builder` for `options.listener`.
fn compile_virtual_service(
    builder: &mut TableBuilder,
    config: &MeshConfig,
    vs: &VirtualService,
    options: &CompileOptions,
) -> Result<(), CompileError> {
    let namespace = vs.metadata.namespace.as_str();
    if !binds(&vs.spec.gateways, namespace, &options.listener) {
        return Ok(());
    }
    let ctx = Ctx {
        resource: format!("VirtualService/{namespace}/{}", vs.metadata.name),
        namespace,
        naming: &options.naming,
    };
    let qualified: Vec<String> = vs
        .spec
        .hosts
        .iter()
        .map(|h| options.naming.qualify(h, namespace))
        .collect();
    let hosts = match &options.listener {
        Listener::Mesh => qualified,
        Listener::Gateway {
            namespace: gns,
            name,
        } => match config.gateway(gns, name) {
            Some(gw) => gateway_hosts(&qualified, namespace, gw),
            None => return Ok(()),
        },
    };
    if hosts.is_empty() {
        return Ok(());
    }
    let vh_name = format!("{namespace}/{}", vs.metadata.name);
    let mut routes = Vec::with_capacity(vs.spec.http.len());
    for r in &vs.spec.http {
        let Some(d) = &r.delegate else {
            routes.extend(compile_http_route(
                builder, &ctx, r, namespace, &vh_name, options,
            )?);
            continue;
        };
        // VS-86: the delegate's routes, each merged with this one; a missing delegate
        // drops the route (validation warns at it).
        let Some(delegate) = crate::delegate::find(config, d, namespace) else {
            continue;
        };
        let dctx = Ctx {
            resource: format!(
                "VirtualService/{}/{} (delegate of {})",
                delegate.metadata.namespace, delegate.metadata.name, ctx.resource
            ),
            namespace: &delegate.metadata.namespace,
            naming: &options.naming,
        };
        for leaf in &delegate.spec.http {
            if leaf.delegate.is_some() {
                // One level only: a delegate's own delegation is dropped.
                continue;
            }
            if let Some(merged) = crate::delegate::merge_route(r, leaf) {
                routes.extend(compile_http_route(
                    builder, &dctx, &merged, namespace, &vh_name, options,
                )?);
            }
        }
    }
    let (listener, labels) = (&options.listener, &options.workload_labels);
    let mut tcp = Vec::new();
    // Gateways proxy no plain TCP (their TCP servers are not served yet).
    if options.listener == Listener::Mesh {
        for r in &vs.spec.tcp {
            let blocks = r.matches.iter().map(L4Block::tcp);
            tcp.extend(ctx.l4_route(builder, blocks, &r.route, listener, labels)?);
        }
    }
    let mut tls = Vec::new();
    for r in &vs.spec.tls {
        let blocks = r.matches.iter().map(L4Block::tls);
        tls.extend(ctx.l4_route(builder, blocks, &r.route, listener, labels)?);
    }
    builder.virtual_host(VirtualHost {
        name: vh_name,
        hosts,
        routes,
        tcp,
        tls,
    });
    Ok(())
}

/// The registry described by the configuration's ServiceEntries.
pub fn registry(config: &MeshConfig, options: &CompileOptions) -> Registry {
    let mut registry = Registry::new();
    for se in config.service_entries() {
        let ns = se.metadata.namespace.as_str();
        let resolution = match se.spec.resolution {
            Some(config::Resolution::Dns) | Some(config::Resolution::DynamicDns) => Resolution::Dns,
            Some(config::Resolution::DnsRoundRobin) => Resolution::DnsRoundRobin,
            Some(config::Resolution::None) => Resolution::None,
            Some(config::Resolution::Static) | None => Resolution::Static,
        };
        let ports = se
            .spec
            .ports
            .iter()
            .filter_map(|p| {
                Some(ServicePort {
                    number: u16::try_from(p.number).ok()?,
                    name: p.name.clone(),
                    target_port: p.target_port.and_then(|t| u16::try_from(t).ok()),
                    protocol: p.protocol.clone(),
                })
            })
            .collect();
        let endpoints = se
            .spec
            .endpoints
            .iter()
            .filter_map(|e| {
                let mut w = WorkloadEntry::new(e.address.clone()?);
                w.ports = e
                    .ports
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), u16::try_from(*v).ok()?)))
                    .collect();
                w.labels = e.labels.clone();
                w.locality = Locality::parse(e.locality.as_deref().unwrap_or_default());
                w.network = e.network.clone().filter(|n| !n.is_empty());
                w.weight = e.weight.unwrap_or(1).max(1);
                if let Some(sa) = &e.service_account
                    && let Ok(id) = Identity::from_istio(&options.trust_domain, ns, sa)
                {
                    w.identities = vec![id];
                }
                Some(w)
            })
            .collect();
        registry.insert(Service {
            hosts: se
                .spec
                .hosts
                .iter()
                .map(|h| options.naming.qualify(h, ns))
                .collect(),
            ports,
            endpoints,
            resolution,
            namespace: ns.to_owned(),
            mesh_external: se.spec.location == Some(config::Location::MeshExternal),
        });
    }
    registry
}

/// The DestinationRules that apply to clients in `options.naming.namespace`.
pub fn destination_rules(config: &MeshConfig, options: &CompileOptions) -> DestinationRules {
    let mut rules = DestinationRules::new();
    let mut seen: HashMap<String, ()> = HashMap::new();
    for dr in config.destination_rules() {
        let host = options
            .naming
            .qualify(&dr.spec.host, &dr.metadata.namespace);
        if seen.insert(host.clone(), ()).is_some() {
            continue;
        }
        if let Some(chosen) = config.destination_rule_for_workload(
            &host,
            &options.naming.namespace,
            Some(&options.workload_labels),
        ) {
            rules.insert(host, DestinationRule::from(&chosen.spec));
        }
    }
    rules
}

fn build_table(
    config: &MeshConfig,
    options: &CompileOptions,
) -> Result<TableBuilder, Vec<CompileError>> {
    let mut builder = RouteTable::builder(options.naming.clone());
    let mut errors = Vec::new();
    for vs in config.virtual_services() {
        if let Err(e) = compile_virtual_service(&mut builder, config, vs, options) {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(builder)
    } else {
        Err(errors)
    }
}

/// The route table of `options.listener`, without default routes for registry hosts.
pub fn route_table(
    config: &MeshConfig,
    options: &CompileOptions,
) -> Result<RouteTable, Vec<CompileError>> {
    build_table(config, options).map(TableBuilder::build)
}

impl Routing {
    /// Compiles `config` for `options.listener`: table, registry and rules.
    pub fn compile(
        config: &MeshConfig,
        options: &CompileOptions,
    ) -> Result<Self, Vec<CompileError>> {
        let registry = registry(config, options);
        let mut builder = build_table(config, options)?;
        if options.listener == Listener::Mesh {
            let mut hosts: Vec<&str> = registry.hosts().filter(|h| !h.starts_with('*')).collect();
            hosts.sort_unstable();
            for host in hosts {
                // The service's TCP ports, and its ports of no declared protocol (whose
                // connections may be detected as opaque TCP, PS-05), go to the service
                // unless a `tcp` route of its VirtualService takes them.
                let ports: Vec<(u16, PortProtocol)> = registry
                    .service(host)
                    .map(|s| s.ports.iter().map(|p| (p.number, p.protocol())).collect())
                    .unwrap_or_default();
                for &(port, protocol) in &ports {
                    builder.port_protocol(host, port, protocol);
                }
                let tcp_ports = ports.iter().filter_map(|&(port, protocol)| {
                    matches!(
                        protocol,
                        PortProtocol::Tcp | PortProtocol::Tls | PortProtocol::Auto
                    )
                    .then_some(port)
                });
                if !builder.has_host(host) {
                    let dest = builder.destination(DestinationKey::new(host, None, None));
                    builder.virtual_host(VirtualHost {
                        name: host.to_owned(),
                        hosts: vec![host.to_owned()],
                        routes: vec![default_route(dest)],
                        tcp: Vec::new(),
                        tls: Vec::new(),
                    });
                }
                for port in tcp_ports {
                    builder.default_tcp(host, port);
                }
            }
        }
        Ok(Self {
            table: builder.build(),
            registry,
            rules: destination_rules(config, options),
        })
    }
}

impl TryFrom<&MeshConfig> for Routing {
    type Error = Vec<CompileError>;

    /// The sidecar (`mesh`) routing with default options.
    fn try_from(config: &MeshConfig) -> Result<Self, Self::Error> {
        Self::compile(config, &CompileOptions::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_cover_needs_one_more_label() {
        assert!(covers("*.example.com", "dev.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(covers("*", "anything"));
        assert!(covers("a.b", "a.b"));
        assert!(!covers("a.b", "c.b"));
    }

    #[test]
    fn base64_bodies_decode() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert!(decode_base64("!!").is_none());
    }
}
