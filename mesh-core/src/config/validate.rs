//! Validation with Istio's rules (ISTIO.md VS-20, VS-33, VS-70–73, VS-80–84, DR, PA, AP,
//! GW), collecting every error of a resource rather than stopping at the first.
//!
//! Rules follow istiod's validating webhook (`pkg/config/validation`); where a rule here
//! is stricter, the message says why (for example exact `principals` must be SPIFFE
//! identities without the scheme, because anything else can never match a peer).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::diagnostic::{Diagnostic, Severity};
use super::load::LoadReport;
use super::locate::{SourceMap, push_index, push_key};
use super::warnings::not_enforced_warnings;
use super::*;
use crate::Identity;

/// Where diagnostics of one resource go.
struct Ctx<'a> {
    out: &'a mut Vec<Diagnostic>,
    source: &'a SourceMap,
    base: Diagnostic,
}

impl Ctx<'_> {
    fn push(&mut self, severity: Severity, path: &str, at_key: bool, message: String) {
        let pos = if at_key {
            self.source.key(path)
        } else {
            self.source.value(path)
        };
        self.out.push(Diagnostic {
            severity,
            path: (!path.is_empty()).then(|| path.to_owned()),
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            message,
            ..self.base.clone()
        });
    }

    /// An error located at the value of `path` (or its nearest written ancestor).
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Error, path, false, message.into());
    }

    /// An error located at the key of `path` (for "this field must not be here").
    fn error_at_key(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Error, path, true, message.into());
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.push(Severity::Warning, path, true, message.into());
    }
}

fn p(base: &str, field: &str) -> String {
    let mut s = base.to_owned();
    push_key(&mut s, field);
    s
}

fn pi(base: &str, field: &str, index: usize) -> String {
    let mut s = p(base, field);
    push_index(&mut s, index);
    s
}

/// Validates one resource, appending diagnostics.
pub(crate) fn validate_resource(r: &AnyResource, source: &SourceMap, out: &mut Vec<Diagnostic>) {
    let origin = r.origin();
    let mut ctx = Ctx {
        out,
        source,
        base: Diagnostic {
            severity: Severity::Error,
            file: origin.file.clone(),
            document: Some(origin.document),
            resource: Some(r.display_name()),
            path: None,
            line: None,
            column: None,
            message: String::new(),
        },
    };
    metadata(&mut ctx, r.metadata());
    match r {
        AnyResource::VirtualService(v) => virtual_service(&mut ctx, v),
        AnyResource::DestinationRule(v) => destination_rule(&mut ctx, v),
        AnyResource::Gateway(v) => gateway(&mut ctx, v),
        AnyResource::ServiceEntry(v) => service_entry(&mut ctx, v),
        AnyResource::WorkloadEntry(v) => workload_entry(&mut ctx, v),
        AnyResource::Sidecar(v) => sidecar(&mut ctx, v),
        AnyResource::PeerAuthentication(v) => peer_authentication(&mut ctx, v),
        AnyResource::AuthorizationPolicy(v) => authorization_policy(&mut ctx, v),
        AnyResource::RequestAuthentication(v) => request_authentication(&mut ctx, v),
        AnyResource::KubernetesGateway(_)
        | AnyResource::HttpRoute(_)
        | AnyResource::GrpcRoute(_)
        | AnyResource::ReferenceGrant(_) => {
            let mut sink = |severity, path: String, message| {
                ctx.push(severity, &path, severity == Severity::Warning, message);
            };
            match r {
                AnyResource::KubernetesGateway(v) => {
                    super::gateway_api::validate_gateway(v, &mut sink)
                }
                AnyResource::HttpRoute(v) => super::gateway_api::validate_http_route(v, &mut sink),
                AnyResource::GrpcRoute(v) => super::gateway_api::validate_grpc_route(v, &mut sink),
                AnyResource::ReferenceGrant(v) => {
                    super::gateway_api::validate_reference_grant(v, &mut sink)
                }
                _ => {}
            }
        }
        // Telemetry's CEL expressions are checked where they are compiled
        // (`mesh-telemetry`), and reported through `LoadReport::error_at`.
        AnyResource::Telemetry(_) => {}
    }
    for (path, message) in not_enforced_warnings(r.kind(), source) {
        ctx.warn(&path, message);
    }
}

/// Checks across the resources of one load: duplicates, references between resources.
pub(crate) fn validate_all(report: &mut LoadReport) {
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, r) in report.resources.iter().enumerate() {
        let name = r.display_name();
        if let Some(&prev) = seen.get(&name) {
            let o = report.resources[prev].origin();
            let at = report.sources[i].key("metadata.name");
            out.push(Diagnostic {
                severity: Severity::Warning,
                file: r.origin().file.clone(),
                document: Some(r.origin().document),
                resource: Some(name.clone()),
                path: Some("metadata.name".to_owned()),
                line: at.map(|p| p.line),
                column: at.map(|p| p.column),
                message: format!(
                    "{name} is defined again; this definition replaces the one in {} document {} \
                     (as kubectl apply would)",
                    o.file.display(),
                    o.document
                ),
            });
        }
        seen.insert(name, i);
    }
    // Gateway API: parents, backends, and hosts shared with VirtualServices.
    for (i, path, severity, message) in super::gateway_api::cross_check(&report.resources) {
        if let Some(mut d) = report.error_at(i, &path, message) {
            d.severity = severity;
            out.push(d);
        }
    }
    // Subsets referenced by routes must be defined by a DestinationRule of that host.
    let mut subsets: HashMap<String, BTreeSet<&str>> = HashMap::new();
    for r in &report.resources {
        if let AnyResource::DestinationRule(dr) = r {
            let e = subsets.entry(dr.qualify(&dr.spec.host)).or_default();
            e.extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
        }
    }
    let gateways: BTreeSet<(String, String)> = report
        .resources
        .iter()
        .filter(|r| r.kind() == Kind::Gateway)
        .map(|r| (r.metadata().namespace.clone(), r.metadata().name.clone()))
        .collect();
    for (r, source) in report.resources.iter().zip(&report.sources) {
        let AnyResource::VirtualService(vs) = r else {
            continue;
        };
        let mut ctx = Ctx {
            out: &mut out,
            source,
            base: Diagnostic {
                severity: Severity::Warning,
                document: Some(vs.origin.document),
                resource: Some(r.display_name()),
                ..Diagnostic::file_error(&vs.origin.file, "")
            },
        };
        let check = |ctx: &mut Ctx<'_>, path: String, d: &Destination| {
            let Some(subset) = &d.subset else { return };
            if d.host.is_empty() || d.host.contains('*') {
                return;
            }
            let host = vs.qualify(&d.host);
            let known = subsets
                .get(&host)
                .is_some_and(|s| s.contains(subset.as_str()));
            if !known {
                ctx.warn(
                    &p(&path, "subset"),
                    format!(
                        "subset `{subset}` of {host} is not defined by any DestinationRule in this \
                         configuration; requests routed here fail with 503 (NC)"
                    ),
                );
            }
        };
        for (i, h) in vs.spec.http.iter().enumerate() {
            for (j, d) in h.route.iter().enumerate() {
                check(
                    &mut ctx,
                    p(&pi(&pi("spec", "http", i), "route", j), "destination"),
                    &d.destination,
                );
            }
        }
        for (i, t) in vs.spec.tcp.iter().enumerate() {
            for (j, d) in t.route.iter().enumerate() {
                check(
                    &mut ctx,
                    p(&pi(&pi("spec", "tcp", i), "route", j), "destination"),
                    &d.destination,
                );
            }
        }
        for (i, h) in vs.spec.http.iter().enumerate() {
            let Some(d) = &h.delegate else { continue };
            if vs.spec.hosts.is_empty() {
                continue;
            }
            let ns = d
                .namespace
                .as_deref()
                .filter(|ns| !ns.is_empty())
                .unwrap_or(&vs.metadata.namespace);
            let found = report.resources.iter().find_map(|r| match r {
                AnyResource::VirtualService(d2)
                    if d2.metadata.name == d.name && d2.metadata.namespace == ns =>
                {
                    Some(d2)
                }
                _ => None,
            });
            let problem = match found {
                None => Some(format!(
                    "delegate VirtualService {ns}/{} is not defined in this configuration; \
                     this route is dropped",
                    d.name
                )),
                Some(d2) if !d2.spec.hosts.is_empty() => Some(format!(
                    "VirtualService {ns}/{} has hosts, so it is not a delegate; this route is \
                     dropped",
                    d.name
                )),
                Some(d2) if !super::exported(&d2.spec.export_to, ns, &vs.metadata.namespace) => {
                    Some(format!(
                        "delegate VirtualService {ns}/{} is not exported to namespace {}; this \
                         route is dropped",
                        d.name, vs.metadata.namespace
                    ))
                }
                Some(_) => None,
            };
            if let Some(message) = problem {
                ctx.warn(&p(&pi("spec", "http", i), "delegate"), message);
            }
        }
        for (i, g) in vs.spec.gateways.iter().enumerate() {
            if g == "mesh" {
                continue;
            }
            let (ns, name) = g
                .split_once('/')
                .map_or((vs.metadata.namespace.as_str(), g.as_str()), |(a, b)| {
                    (a, b)
                });
            if !gateways.contains(&(ns.to_owned(), name.to_owned())) {
                ctx.warn(
                    &pi("spec", "gateways", i),
                    format!("gateway {ns}/{name} is not defined in this configuration"),
                );
            }
        }
    }
    // Several namespace-wide (or mesh-wide) PeerAuthentications: only the oldest applies.
    let mut scopes: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in report.resources.iter().enumerate() {
        if let AnyResource::PeerAuthentication(pa) = r
            && pa.spec.selector.is_none()
        {
            scopes.entry(&pa.metadata.namespace).or_default().push(i);
        }
    }
    for (ns, idx) in scopes {
        if idx.len() < 2 {
            continue;
        }
        let age = |i: &usize| match &report.resources[*i] {
            AnyResource::PeerAuthentication(pa) => pa.age_key(),
            _ => (None, usize::MAX),
        };
        let oldest = idx.iter().min_by(|a, b| age(a).cmp(&age(b))).copied();
        for &i in &idx {
            if Some(i) == oldest {
                continue;
            }
            let r = &report.resources[i];
            let at = report.sources[i].key("metadata.name");
            let winner = oldest
                .map(|o| report.resources[o].display_name())
                .unwrap_or_default();
            out.push(Diagnostic {
                severity: Severity::Warning,
                file: r.origin().file.clone(),
                document: Some(r.origin().document),
                resource: Some(r.display_name()),
                path: Some("metadata.name".to_owned()),
                line: at.map(|p| p.line),
                column: at.map(|p| p.column),
                message: format!(
                    "namespace {ns} has several PeerAuthentications without selector; only the \
                     oldest ({winner}) applies and this one is ignored"
                ),
            });
        }
    }
    // Several selector-less Sidecars in one namespace: Istio leaves the choice undefined
    // (SR-33); the oldest applies here.
    let mut defaults: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in report.resources.iter().enumerate() {
        if let AnyResource::Sidecar(sc) = r
            && sc.spec.workload_selector.is_none()
        {
            defaults.entry(&sc.metadata.namespace).or_default().push(i);
        }
    }
    for (ns, idx) in defaults {
        let age = |i: &usize| match &report.resources[*i] {
            AnyResource::Sidecar(sc) => sc.age_key(),
            _ => (None, usize::MAX),
        };
        let Some(oldest) = idx.iter().min_by(|a, b| age(a).cmp(&age(b))).copied() else {
            continue;
        };
        let winner = report.resources[oldest].display_name();
        for &i in idx.iter().filter(|&&i| i != oldest) {
            let r = &report.resources[i];
            let at = report.sources[i].key("metadata.name");
            out.push(Diagnostic {
                severity: Severity::Warning,
                file: r.origin().file.clone(),
                document: Some(r.origin().document),
                resource: Some(r.display_name()),
                path: Some("metadata.name".to_owned()),
                line: at.map(|p| p.line),
                column: at.map(|p| p.column),
                message: format!(
                    "namespace {ns} has several Sidecars without workloadSelector, which Istio \
                     leaves undefined; only the oldest ({winner}) applies and this one is ignored"
                ),
            });
        }
    }
    report.diagnostics.extend(out);
}

// ---------------------------------------------------------------------------------------
// Shared value checks

const DNS1123_LABEL_MAX: usize = 63;

pub(super) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DNS1123_LABEL_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(super) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A DNS name label as Istio accepts it in hosts (letters of either case, digits, `-`).
fn is_host_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// FQDN or short name, optionally with a leading `*.` wildcard (or `*` alone).
fn check_host(host: &str, allow_wildcard: bool) -> Result<(), String> {
    if host.is_empty() {
        return Err("host must not be empty".to_owned());
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if host == "*" {
        return if allow_wildcard {
            Ok(())
        } else {
            Err("wildcard host `*` is not allowed here; name a service".to_owned())
        };
    }
    let name = match host.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => {
            return Err(format!(
                "wildcard host `{host}` is not allowed here; name a service"
            ));
        }
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if host.len() > 255 || !name.split('.').all(is_host_label) {
        return Err(format!(
            "`{host}` is not a valid host; expected a DNS name such as `reviews` or \
             `reviews.prod.svc.cluster.local`{}",
            if allow_wildcard {
                ", a wildcard such as `*.example.com`, or an IP address"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

fn check_port(ctx: &mut Ctx<'_>, path: &str, port: u32) {
    if !(1..=65535).contains(&port) {
        ctx.error(
            path,
            format!("port {port} is out of range; ports are 1 to 65535"),
        );
    }
}

fn check_ip_or_cidr(value: &str) -> Result<(), String> {
    if value.parse::<IpAddr>().is_ok() || value.parse::<ipnet::IpNet>().is_ok() {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not an IP address or CIDR; expected e.g. 10.0.0.1 or 10.0.0.0/16"
        ))
    }
}

/// Istio's `google.protobuf.Duration` rule: at least 1ms, millisecond precision.
fn check_duration(ctx: &mut Ctx<'_>, path: &str, d: &Duration) {
    let n = d.as_std().as_nanos();
    if n < 1_000_000 {
        ctx.error(
            path,
            format!("duration {d} is too short; it must be at least 1ms"),
        );
    } else if !n.is_multiple_of(1_000_000) {
        ctx.error(
            path,
            format!(
                "duration {d} has sub-millisecond precision; only whole milliseconds are supported"
            ),
        );
    }
}

fn check_percent(ctx: &mut Ctx<'_>, path: &str, value: f64) {
    if !(0.0..=100.0).contains(&value) || value.is_nan() {
        ctx.error(
            path,
            format!("percentage {value} is out of range; it must be between 0 and 100"),
        );
    }
}

fn check_regex(ctx: &mut Ctx<'_>, path: &str, pattern: &str) {
    if let Err(e) = regex::Regex::new(pattern) {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or_default().trim();
        let last = last.strip_prefix("error: ").unwrap_or(last).to_owned();
        ctx.error(
            path,
            format!("regex `{pattern}` does not compile ({last}); use RE2 syntax (no backreferences or lookaround)"),
        );
    }
}

fn check_labels(ctx: &mut Ctx<'_>, path: &str, labels: &Labels) {
    for (k, v) in labels {
        let kp = p(path, k);
        let (prefix, name) = match k.rsplit_once('/') {
            Some((pre, n)) => (Some(pre), n),
            None => (None, k.as_str()),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
        if !name_ok || prefix.is_some_and(|p| !is_dns1123_subdomain(p)) {
            ctx.error_at_key(
                &kp,
                format!("`{k}` is not a valid label key; expected [prefix/]name with alphanumerics, `-`, `_`, `.`"),
            );
        }
        let value_ok = v.is_empty()
            || (v.len() <= 63
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && v.as_bytes()[0].is_ascii_alphanumeric()
                && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric());
        if !value_ok {
            ctx.error(
                &kp,
                format!("`{v}` is not a valid label value; expected up to 63 alphanumerics, `-`, `_`, `.`"),
            );
        }
    }
}

fn check_export_to(ctx: &mut Ctx<'_>, export_to: &[String]) {
    for (i, e) in export_to.iter().enumerate() {
        if e != "." && e != "*" && !is_dns1123_label(e) {
            ctx.error(
                &pi("spec", "exportTo", i),
                format!(
                    "`{e}` is not a valid exportTo value; expected `.`, `*` or a namespace name"
                ),
            );
        }
    }
}

fn check_spiffe_san(ctx: &mut Ctx<'_>, path: &str, san: &str) {
    if san.is_empty() {
        ctx.error(path, "subject alternative name must not be empty");
    } else if san.starts_with("spiffe:")
        && let Err(e) = Identity::parse(san)
    {
        ctx.error(path, format!("`{san}` is not a valid SPIFFE ID: {e}"));
    }
}

fn metadata(ctx: &mut Ctx<'_>, m: &Metadata) {
    if m.name.is_empty() {
        ctx.error("metadata.name", "metadata.name is required");
    } else if !is_dns1123_subdomain(&m.name) {
        ctx.error(
            "metadata.name",
            format!(
                "`{}` is not a valid name; expected lowercase letters, digits, `-` and `.`",
                m.name
            ),
        );
    }
    if !is_dns1123_label(&m.namespace) {
        ctx.error(
            "metadata.namespace",
            format!(
                "`{}` is not a valid namespace; expected lowercase letters, digits and `-`",
                m.namespace
            ),
        );
    }
    if let Some(ts) = &m.creation_timestamp
        && super::resource::parse_rfc3339(ts).is_none()
    {
        ctx.error(
            "metadata.creationTimestamp",
            format!("`{ts}` is not an RFC 3339 time; expected e.g. 2024-05-01T12:00:00Z"),
        );
    }
    check_labels(ctx, "metadata.labels", &m.labels);
}

// ---------------------------------------------------------------------------------------
// VirtualService

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn virtual_service(ctx: &mut Ctx<'_>, vs: &VirtualService) {
    let s = &vs.spec;
    let applies_to_mesh = s.gateways.is_empty() || s.gateways.iter().any(|g| g == "mesh");
    if s.hosts.is_empty() {
        // A delegate (VS-86): its HTTP routes serve only through a root's `delegate`.
        for (i, r) in s.http.iter().enumerate() {
            if r.delegate.is_some() {
                ctx.warn(
                    &p(&pi("spec", "http", i), "delegate"),
                    "a delegate VirtualService (no hosts) cannot delegate again; this route is dropped",
                );
            }
        }
        if !s.tcp.is_empty() || !s.tls.is_empty() {
            ctx.warn(
                "spec",
                "no hosts: this is a delegate VirtualService; only its http routes are used, \
                 through a root's delegate",
            );
        }
    }
    for (i, h) in s.hosts.iter().enumerate() {
        let path = pi("spec", "hosts", i);
        if let Err(e) = check_host(h, true) {
            ctx.error(&path, e);
        } else if h == "*" && applies_to_mesh {
            ctx.error(
                &path,
                "wildcard host `*` is not allowed for a VirtualService that applies to sidecars \
                 (`mesh`); list the gateways it is for in `gateways`",
            );
        }
    }
    for (i, g) in s.gateways.iter().enumerate() {
        check_gateway_ref(ctx, &pi("spec", "gateways", i), g);
    }
    check_export_to(ctx, &s.export_to);
    if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
        ctx.error(
            "spec",
            "a VirtualService needs at least one of http, tcp or tls routes",
        );
    }
    for (i, route) in s.http.iter().enumerate() {
        http_route(ctx, &pi("spec", "http", i), route);
    }
    for (i, t) in s.tcp.iter().enumerate() {
        let path = pi("spec", "tcp", i);
        for (j, m) in t.matches.iter().enumerate() {
            let mp = pi(&path, "match", j);
            if let Some(port) = m.port {
                check_port(ctx, &p(&mp, "port"), port);
            }
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                if let Err(e) = check_ip_or_cidr(subnet) {
                    ctx.error(&pi(&mp, "destinationSubnets", k), e);
                }
            }
            if let Some(subnet) = &m.source_subnet
                && let Err(e) = check_ip_or_cidr(subnet)
            {
                ctx.error(&p(&mp, "sourceSubnet"), e);
            }
            for (k, g) in m.gateways.iter().enumerate() {
                check_gateway_ref(ctx, &pi(&mp, "gateways", k), g);
            }
        }
        l4_destinations(ctx, &path, &t.route);
    }
    for (i, t) in s.tls.iter().enumerate() {
        let path = pi("spec", "tls", i);
        if t.matches.is_empty() {
            ctx.error(&path, "a TLS route needs at least one match with sniHosts");
        }
        for (j, m) in t.matches.iter().enumerate() {
            let mp = pi(&path, "match", j);
            if m.sni_hosts.is_empty() {
                ctx.error(&mp, "sniHosts is required in a TLS match");
            }
            for (k, h) in m.sni_hosts.iter().enumerate() {
                if let Err(e) = check_host(h, true) {
                    ctx.error(&pi(&mp, "sniHosts", k), e);
                }
            }
            if let Some(port) = m.port {
                check_port(ctx, &p(&mp, "port"), port);
            }
            for (k, subnet) in m.destination_subnets.iter().enumerate() {
                if let Err(e) = check_ip_or_cidr(subnet) {
                    ctx.error(&pi(&mp, "destinationSubnets", k), e);
                }
            }
        }
        l4_destinations(ctx, &path, &t.route);
    }
}

fn check_gateway_ref(ctx: &mut Ctx<'_>, path: &str, g: &str) {
    let ok = if g == "mesh" {
        true
    } else {
        match g.split_once('/') {
            Some((ns, name)) => is_dns1123_label(ns) && is_dns1123_subdomain(name),
            None => is_dns1123_subdomain(g),
        }
    };
    if !ok {
        ctx.error(
            path,
            format!("`{g}` is not a valid gateway reference; expected `mesh`, `name` or `namespace/name`"),
        );
    }
}

fn l4_destinations(ctx: &mut Ctx<'_>, path: &str, route: &[RouteDestination]) {
    if route.is_empty() {
        ctx.error(path, "route must have at least one destination");
    }
    let weights: Vec<Option<i32>> = route.iter().map(|d| d.weight).collect();
    for (j, d) in route.iter().enumerate() {
        destination(
            ctx,
            &p(&pi(path, "route", j), "destination"),
            &d.destination,
        );
    }
    check_weights(ctx, path, &weights);
}

fn check_weights(ctx: &mut Ctx<'_>, path: &str, weights: &[Option<i32>]) {
    let mut total: i64 = 0;
    for (j, w) in weights.iter().enumerate() {
        let w = w.unwrap_or(0);
        if w < 0 {
            ctx.error(
                &p(&pi(path, "route", j), "weight"),
                format!("weight {w} is negative; weights must be 0 or more"),
            );
        }
        total += i64::from(w.max(0));
    }
    if weights.len() > 1 && total == 0 {
        ctx.error(
            &p(path, "route"),
            format!(
                "total destination weight is 0 across {} destinations; give at least one destination a positive weight",
                weights.len()
            ),
        );
    }
}

fn destination(ctx: &mut Ctx<'_>, path: &str, d: &Destination) {
    if d.host.is_empty() {
        ctx.error(&p(path, "host"), "destination host is required");
    } else if let Err(e) = check_host(&d.host, false) {
        ctx.error(&p(path, "host"), e);
    }
    if let Some(subset) = &d.subset
        && !is_dns1123_label(subset)
    {
        ctx.error(
            &p(path, "subset"),
            format!(
                "`{subset}` is not a valid subset name; expected lowercase letters, digits and `-`"
            ),
        );
    }
    if let Some(port) = &d.port {
        check_port(ctx, &p(&p(path, "port"), "number"), port.number);
    }
}

fn http_route(ctx: &mut Ctx<'_>, path: &str, r: &HttpRoute) {
    let has_route = !r.route.is_empty();
    let at = |f: &str| p(path, f);
    if !has_route && r.redirect.is_none() && r.direct_response.is_none() && r.delegate.is_none() {
        ctx.error(
            path,
            "an HTTP route needs one of route, redirect, directResponse or delegate",
        );
    }
    if has_route && r.redirect.is_some() {
        ctx.error_at_key(
            &at("redirect"),
            "an HTTP route cannot have both route and redirect",
        );
    }
    if let Some(_dr) = &r.direct_response {
        if has_route {
            ctx.error_at_key(
                &at("directResponse"),
                "an HTTP route cannot have both route and directResponse",
            );
        }
        if r.redirect.is_some() {
            ctx.error_at_key(
                &at("directResponse"),
                "an HTTP route cannot have both redirect and directResponse",
            );
        }
    }
    if r.delegate.is_some() && (has_route || r.redirect.is_some() || r.direct_response.is_some()) {
        ctx.error_at_key(
            &at("delegate"),
            "an HTTP route with delegate may only have match and delegate",
        );
    }
    if r.rewrite.is_some() && r.redirect.is_some() {
        ctx.error_at_key(
            &at("rewrite"),
            "an HTTP route cannot have both rewrite and redirect",
        );
    }
    if let Some(red) = &r.redirect
        && red.uri.is_some()
        && red.prefix_rewrite.is_some()
    {
        ctx.error_at_key(
            &p(&at("redirect"), "prefixRewrite"),
            "a redirect sets either uri (the whole path) or prefixRewrite (the matched prefix), not both",
        );
    }
    if r.mirror.is_some() && !r.mirrors.is_empty() {
        ctx.error_at_key(&at("mirrors"), "set either mirror or mirrors, not both");
    }
    for (j, m) in r.matches.iter().enumerate() {
        http_match(ctx, &pi(path, "match", j), m);
    }
    for (j, d) in r.route.iter().enumerate() {
        let dp = pi(path, "route", j);
        destination(ctx, &p(&dp, "destination"), &d.destination);
        if let Some(h) = &d.headers {
            headers(ctx, &p(&dp, "headers"), h);
        }
    }
    check_weights(
        ctx,
        path,
        &r.route.iter().map(|d| d.weight).collect::<Vec<_>>(),
    );
    if let Some(t) = &r.timeout
        && !t.is_zero()
    {
        check_duration(ctx, &at("timeout"), t);
    }
    if let Some(retry) = &r.retries {
        retries(ctx, &at("retries"), retry);
    }
    if let Some(f) = &r.fault {
        fault(ctx, &at("fault"), f);
    }
    if let Some(rw) = &r.rewrite {
        let rp = at("rewrite");
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            ctx.error_at_key(
                &p(&rp, "uriRegexRewrite"),
                "rewrite sets either uri or uriRegexRewrite, not both",
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            check_regex(ctx, &p(&p(&rp, "uriRegexRewrite"), "match"), &rr.pattern);
        }
        if rw.uri.is_none() && rw.authority.is_none() && rw.uri_regex_rewrite.is_none() {
            ctx.error(&rp, "rewrite must set uri, uriRegexRewrite or authority");
        }
    }
    if let Some(rd) = &r.redirect {
        let rp = at("redirect");
        if rd.uri.is_none()
            && rd.authority.is_none()
            && rd.prefix_rewrite.is_none()
            && rd.scheme.is_none()
            && rd.port.is_none()
            && rd.derive_port.is_none()
        {
            ctx.error(
                &rp,
                "redirect must set at least one of uri, prefixRewrite, authority, scheme, port or derivePort",
            );
        }
        if let Some(code) = rd.redirect_code
            && !(300..=399).contains(&code)
        {
            ctx.error(
                &p(&rp, "redirectCode"),
                format!("redirect code {code} is not a redirect; use a 3xx code (301, 302, 303, 307, 308)"),
            );
        }
        if rd.port.is_some() && rd.derive_port.is_some() {
            ctx.error_at_key(
                &p(&rp, "derivePort"),
                "redirect sets either port or derivePort, not both",
            );
        }
        if let Some(port) = rd.port {
            check_port(ctx, &p(&rp, "port"), port);
        }
    }
    if let Some(dr) = &r.direct_response {
        let dp = at("directResponse");
        if !(200..=599).contains(&dr.status) {
            ctx.error(
                &p(&dp, "status"),
                format!(
                    "directResponse status {} is out of range; it must be 200 to 599",
                    dr.status
                ),
            );
        }
        if let Some(body) = &dr.body {
            match (&body.string, &body.bytes) {
                (Some(_), Some(_)) => ctx.error_at_key(
                    &p(&p(&dp, "body"), "bytes"),
                    "body sets either string or bytes, not both",
                ),
                (Some(s), None) | (None, Some(s)) if s.len() > 1024 * 1024 => {
                    ctx.error(&p(&dp, "body"), "directResponse body is larger than 1 MiB");
                }
                _ => {}
            }
        }
    }
    if let Some(m) = &r.mirror {
        destination(ctx, &at("mirror"), m);
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        let mp = pi(path, "mirrors", j);
        destination(ctx, &p(&mp, "destination"), &m.destination);
        if let Some(pc) = &m.percentage {
            check_percent(ctx, &p(&p(&mp, "percentage"), "value"), pc.value);
        }
    }
    if let Some(pc) = &r.mirror_percentage {
        check_percent(ctx, &p(&at("mirrorPercentage"), "value"), pc.value);
    }
    if let Some(pc) = r.mirror_percent
        && pc > 100
    {
        ctx.error(
            &at("mirrorPercent"),
            format!("mirrorPercent {pc} is out of range; it must be 0 to 100"),
        );
    }
    if let Some(h) = &r.headers {
        headers(ctx, &at("headers"), h);
    }
    authority_rewrites(ctx, path, r);
    if let Some(c) = &r.cors_policy {
        for (j, o) in c.allow_origins.iter().enumerate() {
            string_match(
                ctx,
                &pi(&at("corsPolicy"), "allowOrigins", j),
                o,
                "allowOrigins",
                false,
            );
        }
        if let Some(age) = &c.max_age {
            check_duration(ctx, &p(&at("corsPolicy"), "maxAge"), age);
        }
    }
    if let Some(d) = &r.delegate
        && d.name.is_empty()
    {
        ctx.error(&p(&at("delegate"), "name"), "delegate name is required");
    }
}

/// The authority may be rewritten in one place only (VS-83): `rewrite.authority`, or a
/// `host`/`:authority` header set or added at route level or on each destination.
fn authority_rewrites(ctx: &mut Ctx<'_>, path: &str, r: &HttpRoute) {
    fn authority_ops(base: &str, h: &Headers) -> Vec<String> {
        let Some(req) = &h.request else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (op, map) in [("set", &req.set), ("add", &req.add)] {
            for name in map.keys() {
                if name.eq_ignore_ascii_case("host") || name == ":authority" {
                    out.push(p(&p(&p(base, "request"), op), name));
                }
            }
        }
        out
    }
    let mut places = Vec::new();
    if r.rewrite.as_ref().is_some_and(|rw| rw.authority.is_some()) {
        places.push(p(&p(path, "rewrite"), "authority"));
    }
    if let Some(h) = &r.headers {
        places.extend(authority_ops(&p(path, "headers"), h));
    }
    let route_level = places.len();
    for (j, d) in r.route.iter().enumerate() {
        if let Some(h) = &d.headers {
            let found = authority_ops(&p(&pi(path, "route", j), "headers"), h);
            // One per destination is fine on its own; with a route-level one it is not.
            if route_level > 0 || found.len() > 1 {
                places.extend(found);
            }
        }
    }
    if places.len() > 1 {
        for extra in &places[1..] {
            ctx.error_at_key(
                extra,
                format!(
                    "the authority is already rewritten at {}; rewrite it in one place only",
                    places[0]
                ),
            );
        }
    }
}

fn http_match(ctx: &mut Ctx<'_>, path: &str, m: &HttpMatchRequest) {
    if let Some(u) = &m.uri {
        // `uri` may be an empty prefix (matches everything), unlike the others (VS-20).
        string_match(ctx, &p(path, "uri"), u, "uri", true);
    }
    for (field, sm) in [
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            string_match(ctx, &p(path, field), sm, field, false);
            if matches!(sm, StringMatch::Exact(v) if v.is_empty()) {
                ctx.error(
                    &p(&p(path, field), "exact"),
                    format!("{field}: an empty exact match never matches; give a value or remove the match"),
                );
            }
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (name, sm) in map {
            let hp = p(&p(path, field), name);
            header_name(ctx, &hp, name, true);
            match sm {
                // `regex: "*"` is Istio's spelling of presence, not a regex (VS-14).
                StringMatch::Regex(r) if r == "*" => {}
                StringMatch::Prefix(v) if v.is_empty() => ctx.error(
                    &p(&hp, "prefix"),
                    format!(
                        "{field}: an empty prefix is not allowed; use `{{}}` to match any value"
                    ),
                ),
                _ => string_match_regex_only(ctx, &hp, sm),
            }
        }
    }
    for (name, sm) in &m.query_params {
        let qp = p(&p(path, "queryParams"), name);
        if !matches!(sm, StringMatch::Regex(r) if r == "*") && *sm != StringMatch::Present {
            string_match(ctx, &qp, sm, "queryParams", false);
        }
    }
    if let Some(port) = m.port {
        check_port(ctx, &p(path, "port"), port);
    }
    check_labels(ctx, &p(path, "sourceLabels"), &m.source_labels);
    for (k, g) in m.gateways.iter().enumerate() {
        check_gateway_ref(ctx, &pi(path, "gateways", k), g);
    }
}

fn string_match_regex_only(ctx: &mut Ctx<'_>, path: &str, sm: &StringMatch) {
    if let StringMatch::Regex(r) = sm {
        check_regex(ctx, &p(path, "regex"), r);
    }
}

fn string_match(
    ctx: &mut Ctx<'_>,
    path: &str,
    sm: &StringMatch,
    what: &str,
    empty_prefix_ok: bool,
) {
    match sm {
        StringMatch::Prefix(v) if v.is_empty() && !empty_prefix_ok => ctx.error(
            &p(path, "prefix"),
            format!("{what}: an empty prefix matches everything and is not allowed here; remove the match or give a prefix"),
        ),
        StringMatch::Regex(r) => check_regex(ctx, &p(path, "regex"), r),
        StringMatch::Present => ctx.error(
            path,
            format!("{what}: the match is empty; set one of exact, prefix or regex"),
        ),
        _ => {}
    }
}

fn header_name(ctx: &mut Ctx<'_>, path: &str, name: &str, allow_claims: bool) {
    if allow_claims && name.starts_with("@request.auth.claims") {
        ctx.warn(path, "JWT claim matches (`@request.auth.claims`) are not enforced: request authentication is not supported, so this match never succeeds");
        return;
    }
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':' || b == b'.');
    if !ok {
        ctx.error_at_key(
            path,
            format!(
                "`{name}` is not a valid header name; expected lowercase letters, digits and `-`"
            ),
        );
    }
}

fn headers(ctx: &mut Ctx<'_>, path: &str, h: &Headers) {
    for (dir, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        let dp = p(path, dir);
        for (op, map) in [("set", &ops.set), ("add", &ops.add)] {
            for name in map.keys() {
                header_name(ctx, &p(&p(&dp, op), name), name, false);
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            header_name(ctx, &pi(&dp, "remove", i), name, false);
        }
    }
}

fn retries(ctx: &mut Ctx<'_>, path: &str, r: &HttpRetry) {
    if r.attempts < 0 {
        ctx.error(
            &p(path, "attempts"),
            format!(
                "attempts {} is negative; use 0 to disable retries",
                r.attempts
            ),
        );
    }
    if let Some(t) = &r.per_try_timeout {
        check_duration(ctx, &p(path, "perTryTimeout"), t);
    }
    if let Some(b) = &r.backoff {
        check_duration(ctx, &p(path, "backoff"), b);
    }
    if let Some(on) = &r.retry_on {
        for token in on.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let status = token.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c));
            if !status && !RETRY_ON.contains(&token) {
                ctx.error(
                    &p(path, "retryOn"),
                    format!(
                        "unknown retry condition `{token}`; allowed: {}, or an HTTP status code",
                        RETRY_ON.join(", ")
                    ),
                );
            }
        }
    }
}

fn fault(ctx: &mut Ctx<'_>, path: &str, f: &HttpFaultInjection) {
    if f.delay.is_none() && f.abort.is_none() {
        ctx.error(path, "fault must set delay, abort or both");
    }
    if let Some(d) = &f.delay {
        let dp = p(path, "delay");
        if d.exponential_delay.is_some() {
            ctx.error_at_key(
                &p(&dp, "exponentialDelay"),
                "exponentialDelay is not supported; use fixedDelay",
            );
        }
        match &d.fixed_delay {
            Some(fd) => check_duration(ctx, &p(&dp, "fixedDelay"), fd),
            None if d.exponential_delay.is_none() => {
                ctx.error(&p(&dp, "fixedDelay"), "delay needs fixedDelay (e.g. 5s)");
            }
            None => {}
        }
        if let Some(pc) = &d.percentage {
            check_percent(ctx, &p(&p(&dp, "percentage"), "value"), pc.value);
        }
        if let Some(pc) = d.percent
            && !(0..=100).contains(&pc)
        {
            ctx.error(
                &p(&dp, "percent"),
                format!("percent {pc} is out of range; it must be 0 to 100"),
            );
        }
    }
    if let Some(a) = &f.abort {
        let ap = p(path, "abort");
        if a.http2_error.is_some() {
            ctx.error_at_key(
                &p(&ap, "http2Error"),
                "http2Error is not supported; use httpStatus or grpcStatus",
            );
        }
        let set = [
            a.http_status.is_some(),
            a.grpc_status.is_some(),
            a.http2_error.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set == 0 {
            ctx.error(&ap, "abort needs httpStatus (200 to 599) or grpcStatus");
        } else if set > 1 {
            ctx.error(&ap, "abort sets exactly one of httpStatus, grpcStatus");
        }
        if let Some(code) = a.http_status
            && !(200..=599).contains(&code)
        {
            ctx.error(
                &p(&ap, "httpStatus"),
                format!("abort httpStatus {code} is out of range; it must be 200 to 599"),
            );
        }
        if let Some(g) = &a.grpc_status
            && crate::grpc::status_code(g).is_none()
        {
            ctx.error(
                &p(&ap, "grpcStatus"),
                format!(
                    "`{g}` is not a gRPC status name; expected one of {}",
                    crate::grpc::STATUS_NAMES.join(", ")
                ),
            );
        }
        if let Some(pc) = &a.percentage {
            check_percent(ctx, &p(&p(&ap, "percentage"), "value"), pc.value);
        }
    }
}

// ---------------------------------------------------------------------------------------
// DestinationRule

fn destination_rule(ctx: &mut Ctx<'_>, dr: &DestinationRule) {
    let s = &dr.spec;
    if s.host.is_empty() {
        ctx.error("spec.host", "host is required");
    } else if let Err(e) = check_host(&s.host, true) {
        ctx.error("spec.host", e);
    }
    check_export_to(ctx, &s.export_to);
    if let Some(sel) = &s.workload_selector {
        check_labels(ctx, "spec.workloadSelector.matchLabels", &sel.match_labels);
    }
    if let Some(tp) = &s.traffic_policy {
        traffic_policy(ctx, "spec.trafficPolicy", tp);
    }
    let mut names = BTreeSet::new();
    for (i, subset) in s.subsets.iter().enumerate() {
        let sp = pi("spec", "subsets", i);
        if subset.name.is_empty() {
            ctx.error(&p(&sp, "name"), "subset name is required");
        } else if !is_dns1123_label(&subset.name) {
            ctx.error(
                &p(&sp, "name"),
                format!(
                    "`{}` is not a valid subset name; expected lowercase letters, digits and `-`",
                    subset.name
                ),
            );
        } else if !names.insert(subset.name.as_str()) {
            ctx.error(
                &p(&sp, "name"),
                format!("duplicate subset name `{}`", subset.name),
            );
        }
        check_labels(ctx, &p(&sp, "labels"), &subset.labels);
        if let Some(tp) = &subset.traffic_policy {
            traffic_policy(ctx, &p(&sp, "trafficPolicy"), tp);
        }
    }
}

fn traffic_policy(ctx: &mut Ctx<'_>, path: &str, tp: &TrafficPolicy) {
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none()
    {
        ctx.error(path, "trafficPolicy must set at least one field");
    }
    policy_blocks(
        ctx,
        path,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    let mut ports = BTreeSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = pi(path, "portLevelSettings", i);
        match &pl.port {
            None => ctx.error(&p(&pp, "port"), "port-level settings need port.number"),
            Some(port) => {
                check_port(ctx, &p(&p(&pp, "port"), "number"), port.number);
                if !ports.insert(port.number) {
                    ctx.error(
                        &p(&p(&pp, "port"), "number"),
                        format!("port {} has more than one port-level setting", port.number),
                    );
                }
            }
        }
        if pl.load_balancer.is_none()
            && pl.connection_pool.is_none()
            && pl.outlier_detection.is_none()
            && pl.tls.is_none()
        {
            ctx.error(&pp, "port-level settings must set at least one of loadBalancer, connectionPool, outlierDetection, tls");
        }
        policy_blocks(
            ctx,
            &pp,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
        );
    }
    if let Some(t) = &tp.tunnel {
        let tpath = p(path, "tunnel");
        if let Some(proto) = &t.protocol
            && proto != "CONNECT"
            && proto != "POST"
        {
            ctx.error(
                &p(&tpath, "protocol"),
                format!("tunnel protocol `{proto}` is not CONNECT or POST"),
            );
        }
        if t.target_host.is_empty() {
            ctx.error(&p(&tpath, "targetHost"), "tunnel targetHost is required");
        }
        check_port(ctx, &p(&tpath, "targetPort"), t.target_port);
    }
    if let Some(rb) = &tp.retry_budget
        && let Some(pc) = rb.percent
    {
        check_percent(ctx, &p(&p(path, "retryBudget"), "percent"), pc);
    }
}

fn policy_blocks(
    ctx: &mut Ctx<'_>,
    path: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    od: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        let lp = p(path, "loadBalancer");
        if lb.simple.is_some() && lb.consistent_hash.is_some() {
            ctx.error(
                &lp,
                "loadBalancer sets either simple or consistentHash, not both",
            );
        }
        if let Some(ch) = &lb.consistent_hash {
            let cp = p(&lp, "consistentHash");
            let keys = [
                ch.http_header_name.is_some(),
                ch.http_cookie.is_some(),
                ch.use_source_ip == Some(true),
                ch.http_query_parameter_name.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if keys != 1 {
                ctx.error(
                    &cp,
                    "consistentHash sets exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName",
                );
            }
            if ch.ring_hash.is_some() && ch.maglev.is_some() {
                ctx.error(
                    &cp,
                    "consistentHash sets either ringHash or maglev, not both",
                );
            }
            if let Some(c) = &ch.http_cookie
                && c.name.is_empty()
            {
                ctx.error(&p(&p(&cp, "httpCookie"), "name"), "cookie name is required");
            }
        }
        if let Some(l) = &lb.locality_lb_setting {
            let llp = p(&lp, "localityLbSetting");
            if !l.distribute.is_empty() && !l.failover.is_empty() {
                ctx.error(
                    &llp,
                    "localityLbSetting sets either distribute or failover, not both",
                );
            }
            for (i, d) in l.distribute.iter().enumerate() {
                let total: u64 = d.to.values().map(|v| u64::from(*v)).sum();
                if total != 100 {
                    ctx.error(
                        &p(&pi(&llp, "distribute", i), "to"),
                        format!("locality weights must total 100, not {total}"),
                    );
                }
            }
        }
        if let Some(w) = &lb.warmup {
            let wp = p(&lp, "warmup");
            match &w.duration {
                Some(d) => check_duration(ctx, &p(&wp, "duration"), d),
                None => ctx.error(&p(&wp, "duration"), "warmup needs a duration"),
            }
            if let Some(m) = w.minimum_percent {
                check_percent(ctx, &p(&wp, "minimumPercent"), m);
            }
            if let Some(a) = w.aggression
                && a < 1.0
            {
                ctx.error(
                    &p(&wp, "aggression"),
                    format!("aggression {a} must be 1.0 or more"),
                );
            }
        }
        if let Some(d) = &lb.warmup_duration_secs {
            check_duration(ctx, &p(&lp, "warmupDurationSecs"), d);
        }
    }
    if let Some(pool) = pool {
        let cp = p(path, "connectionPool");
        if pool.tcp.is_none() && pool.http.is_none() {
            ctx.error(&cp, "connectionPool must set tcp or http");
        }
        if let Some(tcp) = &pool.tcp {
            let tp = p(&cp, "tcp");
            non_negative(ctx, &p(&tp, "maxConnections"), tcp.max_connections);
            for (f, d) in [
                ("connectTimeout", &tcp.connect_timeout),
                ("maxConnectionDuration", &tcp.max_connection_duration),
                ("idleTimeout", &tcp.idle_timeout),
            ] {
                if let Some(d) = d {
                    check_duration(ctx, &p(&tp, f), d);
                }
            }
            if let Some(k) = &tcp.tcp_keepalive {
                for (f, d) in [("time", &k.time), ("interval", &k.interval)] {
                    if let Some(d) = d {
                        check_duration(ctx, &p(&p(&tp, "tcpKeepalive"), f), d);
                    }
                }
            }
        }
        if let Some(http) = &pool.http {
            let hp = p(&cp, "http");
            for (f, v) in [
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("http2MaxRequests", http.http2_max_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
                ("maxConcurrentStreams", http.max_concurrent_streams),
            ] {
                non_negative(ctx, &p(&hp, f), v);
            }
            if let Some(d) = &http.idle_timeout {
                check_duration(ctx, &p(&hp, "idleTimeout"), d);
            }
        }
    }
    if let Some(od) = od {
        let op = p(path, "outlierDetection");
        non_negative(ctx, &p(&op, "consecutiveErrors"), od.consecutive_errors);
        for (f, d) in [
            ("interval", &od.interval),
            ("baseEjectionTime", &od.base_ejection_time),
        ] {
            if let Some(d) = d {
                check_duration(ctx, &p(&op, f), d);
            }
        }
        for (f, v) in [
            ("maxEjectionPercent", od.max_ejection_percent),
            ("minHealthPercent", od.min_health_percent),
        ] {
            if let Some(v) = v
                && !(0..=100).contains(&v)
            {
                ctx.error(
                    &p(&op, f),
                    format!("{f} {v} is out of range; it must be 0 to 100"),
                );
            }
        }
        for (i, code) in od.outlier_detection_http_error_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                ctx.error(
                    &pi(&op, "outlierDetectionHttpErrorCodes", i),
                    format!("{code} is not an HTTP status code (100 to 599)"),
                );
            }
        }
    }
    if let Some(tls) = tls {
        let tp = p(path, "tls");
        match tls.mode {
            Some(ClientTlsMode::IstioMutual)
                if (tls.client_certificate.is_some()
                    || tls.private_key.is_some()
                    || tls.ca_certificates.is_some()
                    || tls.credential_name.is_some()
                    || tls.ca_crl.is_some()) =>
            {
                ctx.error(
                    &tp,
                    "ISTIO_MUTUAL uses the workload certificates; clientCertificate, privateKey, \
                         caCertificates, caCrl and credentialName must be empty",
                );
            }
            Some(ClientTlsMode::Mutual) if tls.credential_name.is_none() => {
                if tls.client_certificate.is_none() {
                    ctx.error(
                        &p(&tp, "clientCertificate"),
                        "MUTUAL needs clientCertificate (or credentialName)",
                    );
                }
                if tls.private_key.is_none() {
                    ctx.error(
                        &p(&tp, "privateKey"),
                        "MUTUAL needs privateKey (or credentialName)",
                    );
                }
            }
            _ => {}
        }
        if matches!(
            tls.mode,
            Some(ClientTlsMode::Simple | ClientTlsMode::Mutual)
        ) && tls.ca_certificates.is_none()
            && tls.insecure_skip_verify != Some(true)
        {
            // Istio would fall back to the operating system's roots (DR-52); we have none.
            ctx.warn(
                &tp,
                "without caCertificates the server cannot be verified (no system trust store \
                 is used), so connections to this destination fail; set caCertificates, or \
                 insecureSkipVerify: true",
            );
        }
        for (i, san) in tls.subject_alt_names.iter().enumerate() {
            check_spiffe_san(ctx, &pi(&tp, "subjectAltNames", i), san);
        }
    }
}

fn non_negative(ctx: &mut Ctx<'_>, path: &str, v: Option<i32>) {
    if let Some(v) = v
        && v < 0
    {
        ctx.error(path, format!("{v} is negative; it must be 0 or more"));
    }
}

// ---------------------------------------------------------------------------------------
// Gateway

const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "UDP", "REDIS", "MYSQL",
    "HBONE",
];

fn check_protocol(ctx: &mut Ctx<'_>, path: &str, proto: &str) {
    if !PROTOCOLS.iter().any(|p| p.eq_ignore_ascii_case(proto)) {
        ctx.error(
            path,
            format!(
                "`{proto}` is not a known protocol; expected one of {}",
                PROTOCOLS.join(", ")
            ),
        );
    }
}

fn gateway(ctx: &mut Ctx<'_>, gw: &Gateway) {
    let s = &gw.spec;
    if s.servers.is_empty() {
        ctx.error("spec.servers", "a Gateway needs at least one server");
    }
    check_labels(ctx, "spec.selector", &s.selector);
    let mut names = BTreeSet::new();
    for (i, server) in s.servers.iter().enumerate() {
        let sp = pi("spec", "servers", i);
        let protocol = server
            .port
            .as_ref()
            .map(|p| p.protocol.to_ascii_uppercase());
        match &server.port {
            None => ctx.error(&p(&sp, "port"), "server needs a port"),
            Some(port) => {
                check_port(ctx, &p(&p(&sp, "port"), "number"), port.number);
                if port.protocol.is_empty() {
                    ctx.error(&p(&p(&sp, "port"), "protocol"), "port protocol is required");
                } else {
                    check_protocol(ctx, &p(&p(&sp, "port"), "protocol"), &port.protocol);
                }
            }
        }
        if let Some(name) = &server.name
            && !names.insert(name.as_str())
        {
            ctx.error(&p(&sp, "name"), format!("duplicate server name `{name}`"));
        }
        if server.hosts.is_empty() {
            ctx.error(&p(&sp, "hosts"), "server needs at least one host");
        }
        for (j, h) in server.hosts.iter().enumerate() {
            let (ns, dns) = h.split_once('/').unwrap_or(("*", h.as_str()));
            let hp = pi(&sp, "hosts", j);
            if ns != "*" && ns != "." && ns != "~" && !is_dns1123_label(ns) {
                ctx.error(&hp, format!("`{ns}` is not a valid namespace in host `{h}`; expected `*`, `.` or a namespace"));
            } else if let Err(e) = check_host(dns, true) {
                ctx.error(&hp, e);
            }
        }
        let secure = matches!(protocol.as_deref(), Some("HTTPS" | "TLS"));
        match &server.tls {
            None if secure => ctx.error(
                &p(&sp, "tls"),
                "HTTPS and TLS servers need tls settings (mode SIMPLE, MUTUAL, PASSTHROUGH, ...)",
            ),
            None => {}
            Some(tls) => {
                server_tls(ctx, &p(&sp, "tls"), tls, secure);
                credential_names(ctx, &p(&sp, "tls"), tls, &gw.metadata.namespace);
            }
        }
    }
}

/// `credentialName` and `credentialNames[]` must name Secrets of the Gateway's own
/// namespace, in a form Istio resolves ([`SecretRef`]).
fn credential_names(ctx: &mut Ctx<'_>, path: &str, tls: &ServerTlsSettings, namespace: &str) {
    let named = tls
        .credential_name
        .iter()
        .map(|n| (p(path, "credentialName"), n))
        .chain(
            tls.credential_names
                .iter()
                .enumerate()
                .map(|(i, n)| (pi(path, "credentialNames", i), n)),
        );
    for (at, name) in named {
        if let Err(e) = SecretRef::parse(name, namespace) {
            ctx.error(&at, e.to_string());
        }
    }
}

fn server_tls(ctx: &mut Ctx<'_>, path: &str, tls: &ServerTlsSettings, secure: bool) {
    let mode = tls.mode.unwrap_or(ServerTlsMode::Passthrough);
    if tls.credential_name.is_some() && !tls.credential_names.is_empty() {
        ctx.error(
            &p(path, "credentialNames"),
            "set either credentialName or credentialNames, not both",
        );
    }
    if tls.credential_names.len() > 2 {
        ctx.error(
            &p(path, "credentialNames"),
            "credentialNames holds at most 2 secrets (one RSA, one ECDSA)",
        );
    }
    if tls.tls_certificates.len() > 2 {
        ctx.error(
            &p(path, "tlsCertificates"),
            "tlsCertificates holds at most 2 certificates (one RSA, one ECDSA)",
        );
    }
    let has_credential = tls.credential_name.is_some()
        || !tls.credential_names.is_empty()
        || !tls.tls_certificates.is_empty();
    match mode {
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual
            if secure && !has_credential =>
        {
            if tls.server_certificate.is_none() {
                ctx.error(
                    &p(path, "serverCertificate"),
                    format!(
                        "{mode:?} TLS needs credentialName or serverCertificate and privateKey"
                    ),
                );
            }
            if tls.private_key.is_none() {
                ctx.error(
                    &p(path, "privateKey"),
                    format!(
                        "{mode:?} TLS needs credentialName or serverCertificate and privateKey"
                    ),
                );
            }
            if mode != ServerTlsMode::Simple && tls.ca_certificates.is_none() {
                ctx.error(&p(path, "caCertificates"), "MUTUAL TLS needs caCertificates to verify clients (or credentialName with a CA)");
            }
        }
        ServerTlsMode::IstioMutual
            if (has_credential
                || tls.server_certificate.is_some()
                || tls.private_key.is_some()
                || tls.ca_certificates.is_some()) =>
        {
            ctx.error(path, "ISTIO_MUTUAL uses the workload certificates; certificate fields and credentialName must be empty");
        }
        _ => {}
    }
    if let (Some(min), Some(max)) = (tls.min_protocol_version, tls.max_protocol_version)
        && tls_rank(min) > tls_rank(max)
        && max != TlsProtocol::Auto
    {
        ctx.error(
            &p(path, "maxProtocolVersion"),
            "maxProtocolVersion is lower than minProtocolVersion",
        );
    }
    for (i, san) in tls.subject_alt_names.iter().enumerate() {
        check_spiffe_san(ctx, &pi(path, "subjectAltNames", i), san);
    }
}

fn tls_rank(v: TlsProtocol) -> u8 {
    match v {
        TlsProtocol::Auto => 0,
        TlsProtocol::V1_0 => 1,
        TlsProtocol::V1_1 => 2,
        TlsProtocol::V1_2 => 3,
        TlsProtocol::V1_3 => 4,
    }
}

// ---------------------------------------------------------------------------------------
// ServiceEntry

fn service_entry(ctx: &mut Ctx<'_>, se: &ServiceEntry) {
    let s = &se.spec;
    if s.hosts.is_empty() {
        ctx.error("spec.hosts", "a ServiceEntry needs at least one host");
    }
    for (i, h) in s.hosts.iter().enumerate() {
        let path = pi("spec", "hosts", i);
        if h == "*" {
            ctx.error(
                &path,
                "host `*` is not allowed in a ServiceEntry; name the service",
            );
        } else if let Err(e) = check_host(h, true) {
            ctx.error(&path, e);
        }
    }
    for (i, a) in s.addresses.iter().enumerate() {
        if let Err(e) = check_ip_or_cidr(a) {
            ctx.error(&pi("spec", "addresses", i), e);
        }
    }
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, port) in s.ports.iter().enumerate() {
        let pp = pi("spec", "ports", i);
        check_port(ctx, &p(&pp, "number"), port.number);
        if !numbers.insert(port.number) {
            ctx.error(
                &p(&pp, "number"),
                format!("port {} is listed twice", port.number),
            );
        }
        if port.name.is_empty() {
            ctx.error(&p(&pp, "name"), "port name is required");
        } else if !names.insert(port.name.as_str()) {
            ctx.error(
                &p(&pp, "name"),
                format!("port name `{}` is used twice", port.name),
            );
        }
        // An empty protocol is detected (Istio: sniffing); the proxy reads the port's
        // name as a Kubernetes Service port's (PS-01, PS-02).
        if !port.protocol.is_empty() {
            check_protocol(ctx, &p(&pp, "protocol"), &port.protocol);
        }
        if let Some(t) = port.target_port {
            check_port(ctx, &p(&pp, "targetPort"), t);
        }
    }
    check_export_to(ctx, &s.export_to);
    if s.workload_selector.is_some() && !s.endpoints.is_empty() {
        ctx.error(
            "spec.workloadSelector",
            "set either workloadSelector or endpoints, not both",
        );
    }
    if let Some(sel) = &s.workload_selector {
        check_labels(ctx, "spec.workloadSelector.labels", &sel.labels);
    }
    let resolution = s.resolution.unwrap_or(Resolution::None);
    match resolution {
        Resolution::Static if s.endpoints.is_empty() && s.workload_selector.is_none() => {
            ctx.error(
                "spec.endpoints",
                "resolution STATIC needs endpoints (or a workloadSelector)",
            );
        }
        Resolution::DnsRoundRobin if s.endpoints.len() > 1 => {
            ctx.error(
                "spec.endpoints",
                "resolution DNS_ROUND_ROBIN allows at most one endpoint",
            );
        }
        Resolution::Dns | Resolution::DnsRoundRobin if s.endpoints.is_empty() => {
            for (i, h) in s.hosts.iter().enumerate() {
                if h.starts_with('*') {
                    ctx.error(
                        &pi("spec", "hosts", i),
                        "wildcard hosts cannot be resolved by DNS; add endpoints or use resolution NONE",
                    );
                }
            }
        }
        _ => {}
    }
    for (i, ep) in s.endpoints.iter().enumerate() {
        let ep_path = pi("spec", "endpoints", i);
        match &ep.address {
            None => {
                if s.addresses.is_empty() && resolution != Resolution::Dns {
                    ctx.error(&p(&ep_path, "address"), "endpoint address is required");
                }
            }
            Some(addr) => {
                let unix = addr.starts_with("unix://");
                let ip = addr.parse::<IpAddr>().is_ok();
                if resolution == Resolution::Static && !ip && !unix {
                    ctx.error(
                        &p(&ep_path, "address"),
                        format!("`{addr}` is not an IP address; resolution STATIC needs IP endpoints (or unix:// sockets)"),
                    );
                } else if !ip && !unix && check_host(addr, false).is_err() {
                    ctx.error(
                        &p(&ep_path, "address"),
                        format!("`{addr}` is not an IP address or DNS name"),
                    );
                }
            }
        }
        for (name, port) in &ep.ports {
            let pp = p(&p(&ep_path, "ports"), name);
            check_port(ctx, &pp, *port);
            if !s.ports.iter().any(|sp| &sp.name == name) {
                ctx.error_at_key(
                    &pp,
                    format!(
                        "endpoint port `{name}` is not a port of this ServiceEntry; ports are named {}",
                        s.ports.iter().map(|p| format!("`{}`", p.name)).collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
        check_labels(ctx, &p(&ep_path, "labels"), &ep.labels);
        if let Some(sa) = &ep.service_account {
            check_entry_service_account(ctx, &p(&ep_path, "serviceAccount"), sa);
        }
    }
    for (i, san) in s.subject_alt_names.iter().enumerate() {
        check_spiffe_san(ctx, &pi("spec", "subjectAltNames", i), san);
    }
}

fn check_entry_service_account(ctx: &mut Ctx<'_>, path: &str, sa: &str) {
    if sa.starts_with("spiffe:") {
        ctx.error(
            path,
            format!(
                "serviceAccount is a service account name in the entry's namespace, not a SPIFFE ID; write `{}`",
                Identity::parse(sa)
                    .ok()
                    .and_then(|id| id.service_account().map(str::to_owned))
                    .unwrap_or_else(|| "name".to_owned())
            ),
        );
    } else if !is_dns1123_subdomain(sa) {
        ctx.error(
            path,
            format!("`{sa}` is not a valid service account name; expected lowercase letters, digits, `-` and `.`"),
        );
    }
}

// ---------------------------------------------------------------------------------------
// WorkloadEntry

fn workload_entry(ctx: &mut Ctx<'_>, we: &WorkloadEntryResource) {
    let s = &we.spec;
    match s.address.as_deref() {
        // Istio: an entry reached through its network's gateway may omit its address.
        None | Some("") if s.network.as_deref().is_some_and(|n| !n.is_empty()) => {}
        None | Some("") => ctx.error(
            "spec.address",
            "address is required (an IP address, a DNS name or a unix:// socket), unless \
             `network` names the network whose gateway reaches the workload",
        ),
        Some(addr) if addr.starts_with("unix://") => {
            if !s.ports.is_empty() {
                ctx.error_at_key(
                    "spec.ports",
                    "a unix:// address has no ports; remove `ports`",
                );
            }
        }
        Some(addr) => {
            if addr.parse::<IpAddr>().is_err() && check_host(addr, false).is_err() {
                ctx.error(
                    "spec.address",
                    format!("`{addr}` is not an IP address, a DNS name or a unix:// socket"),
                );
            }
        }
    }
    for (name, port) in &s.ports {
        let mut pp = "spec.ports".to_owned();
        push_key(&mut pp, name);
        check_port(ctx, &pp, *port);
    }
    check_labels(ctx, "spec.labels", &s.labels);
    if let Some(sa) = &s.service_account {
        check_entry_service_account(ctx, "spec.serviceAccount", sa);
    }
}

// ---------------------------------------------------------------------------------------
// Sidecar

fn sidecar(ctx: &mut Ctx<'_>, sc: &Sidecar) {
    let s = &sc.spec;
    if let Some(sel) = &s.workload_selector {
        if sel.labels.is_empty() {
            ctx.error(
                "spec.workloadSelector",
                "workloadSelector needs labels; omit it to apply to every workload of the namespace",
            );
        }
        check_labels(ctx, "spec.workloadSelector.labels", &sel.labels);
    }
    if s.egress.is_empty()
        && s.ingress.is_empty()
        && s.outbound_traffic_policy.is_none()
        && s.inbound_connection_pool.is_none()
    {
        ctx.warn(
            "spec",
            "the Sidecar configures nothing; it imports every host (`*/*`)",
        );
    }
    let mut ports: BTreeSet<(u32, &str)> = BTreeSet::new();
    for (i, l) in s.ingress.iter().enumerate() {
        let lp = pi("spec", "ingress", i);
        match &l.port {
            None => ctx.error(&lp, "an ingress listener needs a port"),
            Some(port) => {
                sidecar_port(ctx, &p(&lp, "port"), port);
                if !ports.insert((port.number, l.bind.as_str())) {
                    ctx.error(
                        &p(&p(&lp, "port"), "number"),
                        format!(
                            "port {} is used by another ingress listener on the same bind address",
                            port.number
                        ),
                    );
                }
            }
        }
        sidecar_bind(ctx, &p(&lp, "bind"), &l.bind);
        let ep = &l.default_endpoint;
        if !ep.is_empty() && !ep.starts_with("unix://") {
            let ok = ["127.0.0.1:", "0.0.0.0:", "[::1]:", "[::]:"]
                .iter()
                .find_map(|prefix| ep.strip_prefix(prefix))
                .is_some_and(|port| port.parse::<u16>().is_ok_and(|n| n > 0));
            if !ok {
                ctx.error(
                    &p(&lp, "defaultEndpoint"),
                    format!("`{ep}` is not a default endpoint; expected 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or unix:///path"),
                );
            }
        }
        if let Some(tls) = &l.tls {
            server_tls(ctx, &p(&lp, "tls"), tls, true);
        }
    }
    let mut ports: BTreeSet<(u32, &str)> = BTreeSet::new();
    let mut catch_all: Option<usize> = None;
    for (i, l) in s.egress.iter().enumerate() {
        let lp = pi("spec", "egress", i);
        match &l.port {
            Some(port) => {
                sidecar_port(ctx, &p(&lp, "port"), port);
                if !ports.insert((port.number, l.bind.as_str())) {
                    ctx.error(
                        &p(&p(&lp, "port"), "number"),
                        format!(
                            "port {} is used by another egress listener on the same bind address",
                            port.number
                        ),
                    );
                }
            }
            None => {
                if catch_all.is_some() {
                    ctx.error(
                        &lp,
                        "only one egress listener may omit its port (the catch-all listener)",
                    );
                }
                catch_all = Some(i);
            }
        }
        sidecar_bind(ctx, &p(&lp, "bind"), &l.bind);
        if l.hosts.is_empty() {
            ctx.error(
                &lp,
                "an egress listener needs hosts (`namespace/dnsName`); write `*/*` to import everything",
            );
        }
        for (j, h) in l.hosts.iter().enumerate() {
            egress_host(ctx, &pi(&lp, "hosts", j), h);
        }
    }
    if let Some(i) = catch_all
        && i + 1 != s.egress.len()
    {
        ctx.error(
            &pi("spec", "egress", i),
            "the egress listener without a port (the catch-all) must be the last one",
        );
    }
    if let Some(otp) = &s.outbound_traffic_policy
        && let Some(proxy) = &otp.egress_proxy
    {
        let pp = "spec.outboundTrafficPolicy.egressProxy";
        if otp.mode != Some(OutboundMode::AllowAny) {
            ctx.error(pp, "egressProxy is only allowed with mode ALLOW_ANY");
        }
        if proxy.port.is_none() {
            ctx.error(pp, "egressProxy needs a port");
        }
        destination(ctx, pp, proxy);
    }
}

fn sidecar_port(ctx: &mut Ctx<'_>, path: &str, port: &GatewayPort) {
    check_port(ctx, &p(path, "number"), port.number);
    if !port.protocol.is_empty() {
        check_protocol(ctx, &p(path, "protocol"), &port.protocol);
    }
    if let Some(t) = port.target_port {
        check_port(ctx, &p(path, "targetPort"), t);
    }
}

fn sidecar_bind(ctx: &mut Ctx<'_>, path: &str, bind: &str) {
    if !bind.is_empty() && !bind.starts_with("unix://") && bind.parse::<IpAddr>().is_err() {
        ctx.error(
            path,
            format!("`{bind}` is not an IP address or a unix:// socket"),
        );
    }
}

fn egress_host(ctx: &mut Ctx<'_>, path: &str, host: &str) {
    let h = match EgressHost::parse(host) {
        Ok(h) => h,
        Err(e) => return ctx.error(path, e),
    };
    if !matches!(h.namespace, "*" | "." | "~") && !is_dns1123_label(h.namespace) {
        ctx.error(
            path,
            format!(
                "`{}` is not a namespace; expected `*`, `.`, `~`, a namespace name, or `~name` to exclude one",
                h.namespace
            ),
        );
    }
    if h.dns_name != "*" {
        if let Err(e) = check_host(h.dns_name, true) {
            ctx.error(path, e);
        } else if !h.dns_name.contains('.') && h.dns_name.parse::<IpAddr>().is_err() {
            ctx.warn(
                path,
                format!(
                    "`{}` is not qualified and matches no service (hosts here are compared as written); write its full name, e.g. `{}.<namespace>.svc.cluster.local`",
                    h.dns_name, h.dns_name
                ),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// PeerAuthentication

fn peer_authentication(ctx: &mut Ctx<'_>, pa: &PeerAuthentication) {
    let s = &pa.spec;
    if let Some(sel) = &s.selector {
        selector(ctx, "spec.selector", sel);
    }
    if !s.port_level_mtls.is_empty()
        && s.selector
            .as_ref()
            .is_none_or(|sel| sel.match_labels.is_empty())
    {
        ctx.error_at_key(
            "spec.portLevelMtls",
            "portLevelMtls only applies to a workload: add a selector with matchLabels",
        );
    }
    for port in s.port_level_mtls.keys() {
        let mut pp = "spec.portLevelMtls".to_owned();
        push_key(&mut pp, &port.to_string());
        if !(1..=65535).contains(port) {
            ctx.error_at_key(
                &pp,
                format!("port {port} is out of range; ports are 1 to 65535"),
            );
        }
    }
}

/// The claim names of `[a][b]...` (ISTIO.md RA-10): one or more non-empty bracketed
/// names, nothing between or after them.
pub(crate) fn claim_path(mut rest: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else {
            return Err("claims are written `[name]`, nested claims `[outer][inner]`".into());
        };
        let Some(end) = inner.find(']') else {
            return Err("a `[` is not closed".into());
        };
        if end == 0 {
            return Err("claim names must not be empty".into());
        }
        names.push(&inner[..end]);
        rest = &inner[end + 1..];
    }
    if names.is_empty() {
        return Err("a claim name is required, e.g. `request.auth.claims[groups]`".into());
    }
    Ok(names)
}

/// The most JWT rules a RequestAuthentication may hold (istio/api).
const MAX_JWT_RULES: usize = 4096;

fn request_authentication(ctx: &mut Ctx<'_>, ra: &RequestAuthentication) {
    let s = &ra.spec;
    policy_scope(
        ctx,
        s.selector.as_ref(),
        s.target_ref.is_some(),
        !s.target_refs.is_empty(),
    );
    if s.target_refs.len() > 16 {
        ctx.error(
            "spec.targetRefs",
            format!(
                "targetRefs holds at most 16 references, not {}",
                s.target_refs.len()
            ),
        );
    }
    if s.jwt_rules.len() > MAX_JWT_RULES {
        ctx.error(
            "spec.jwtRules",
            format!(
                "jwtRules holds at most {MAX_JWT_RULES} rules, not {}",
                s.jwt_rules.len()
            ),
        );
    }
    let header_name = |v: &str| {
        http::HeaderName::from_bytes(v.as_bytes())
            .map(|_| ())
            .map_err(|_| format!("`{v}` is not a valid header name"))
    };
    for (i, rule) in s.jwt_rules.iter().enumerate() {
        let rp = pi("spec", "jwtRules", i);
        if rule.issuer.is_empty() {
            ctx.error(&rp, "issuer is required");
        }
        if let (Some(_), Some(_)) = (&rule.jwks_uri, &rule.jwks) {
            ctx.error_at_key(&p(&rp, "jwks"), "set either jwksUri or jwks, not both");
        }
        if let Some(uri) = &rule.jwks_uri
            && let Err(e) = check_jwks_uri(uri)
        {
            ctx.error(&p(&rp, "jwksUri"), e);
        }
        if let Some(jwks) = &rule.jwks
            && let Err(e) = check_jwks(jwks)
        {
            ctx.error(&p(&rp, "jwks"), e);
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            let hp = pi(&rp, "fromHeaders", j);
            if h.name.is_empty() {
                ctx.error(&hp, "fromHeaders entries need a name");
            } else if let Err(e) = header_name(&h.name) {
                ctx.error(&p(&hp, "name"), e);
            }
        }
        values(ctx, &rp, "fromParams", &rule.from_params, |_| Ok(()));
        values(ctx, &rp, "fromCookies", &rule.from_cookies, |_| Ok(()));
        values(ctx, &rp, "audiences", &rule.audiences, |_| Ok(()));
        values(
            ctx,
            &rp,
            "spaceDelimitedClaims",
            &rule.space_delimited_claims,
            |_| Ok(()),
        );
        if let Some(h) = &rule.output_payload_to_header
            && let Err(e) = header_name(h)
        {
            ctx.error(&p(&rp, "outputPayloadToHeader"), e);
        }
        for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
            let cp = pi(&rp, "outputClaimToHeaders", j);
            if let Err(e) = header_name(&c.header) {
                ctx.error(&p(&cp, "header"), e);
            }
            if c.claim.is_empty() {
                ctx.error(&cp, "outputClaimToHeaders entries need a claim");
            }
        }
        if let Some(t) = rule.timeout
            && t.as_std().is_zero()
        {
            ctx.error(&p(&rp, "timeout"), "timeout must be greater than 0");
        }
    }
}

/// A `jwksUri`: an absolute `http` or `https` URL of at most 2048 characters.
fn check_jwks_uri(uri: &str) -> Result<(), String> {
    if uri.len() > 2048 {
        return Err(format!(
            "jwksUri is {} characters long; at most 2048 are allowed",
            uri.len()
        ));
    }
    let parsed: http::Uri = uri
        .parse()
        .map_err(|e| format!("`{uri}` is not a URL: {e}"))?;
    match parsed.scheme_str() {
        Some("http" | "https") if parsed.host().is_some_and(|h| !h.is_empty()) => Ok(()),
        Some("http" | "https") => Err(format!("`{uri}` has no host")),
        _ => Err(format!(
            "`{uri}` is not an http or https URL; the key set is fetched over HTTP"
        )),
    }
}

/// An inline `jwks`: a JSON Web Key Set with at least one key that has a `kty`.
fn check_jwks(jwks: &str) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<BTreeMap<String, serde::de::IgnoredAny>>,
    }
    // JSON is YAML: the loader's parser reads the set without another dependency.
    let set: Set = serde_saphyr::from_str(jwks)
        .map_err(|e| format!("jwks is not a JSON Web Key Set (`{{\"keys\": [...]}}`): {e}"))?;
    if set.keys.is_empty() {
        return Err("jwks has no keys; every token would be rejected".into());
    }
    if let Some(i) = set.keys.iter().position(|k| !k.contains_key("kty")) {
        return Err(format!("jwks key {i} has no `kty`"));
    }
    Ok(())
}

/// A security policy's scope: a valid selector, and only one of `selector`, `targetRef`
/// and `targetRefs`.
fn policy_scope(
    ctx: &mut Ctx<'_>,
    sel: Option<&WorkloadSelector>,
    target_ref: bool,
    target_refs: bool,
) {
    if let Some(sel) = sel {
        selector(ctx, "spec.selector", sel);
        if target_refs || target_ref {
            ctx.error(
                "spec.selector",
                "set either selector or targetRefs, not both",
            );
        }
    }
    if target_ref && target_refs {
        ctx.error_at_key(
            "spec.targetRef",
            "set either targetRef or targetRefs, not both",
        );
    }
}

fn selector(ctx: &mut Ctx<'_>, path: &str, sel: &WorkloadSelector) {
    if sel.match_labels.is_empty() {
        ctx.error(
            path,
            "selector needs matchLabels; omit the selector to select every workload",
        );
    }
    for k in sel.match_labels.keys() {
        if k.is_empty() {
            ctx.error(
                &p(path, "matchLabels"),
                "selector label keys must not be empty",
            );
        }
    }
    check_labels(ctx, &p(path, "matchLabels"), &sel.match_labels);
}

// ---------------------------------------------------------------------------------------
// AuthorizationPolicy

fn authorization_policy(ctx: &mut Ctx<'_>, ap: &AuthorizationPolicy) {
    let s = &ap.spec;
    let action = s.action.unwrap_or_default();
    if action == Action::Custom {
        ctx.error(
            "spec.action",
            "action CUSTOM (external authorization) is not supported by this proxy; use ALLOW, DENY or AUDIT",
        );
    }
    if s.provider.is_some() && action != Action::Custom {
        ctx.error_at_key(
            "spec.provider",
            "provider is only allowed with action CUSTOM",
        );
    }
    if (action == Action::Deny || action == Action::Audit) && s.rules.is_empty() {
        ctx.error(
            "spec",
            format!(
                "a {} policy without rules never matches; add `rules: [{{}}]` to match every request, or add rules",
                if action == Action::Deny { "DENY" } else { "AUDIT" }
            ),
        );
    }
    policy_scope(
        ctx,
        s.selector.as_ref(),
        s.target_ref.is_some(),
        !s.target_refs.is_empty(),
    );
    for (i, rule) in s.rules.iter().enumerate() {
        let rp = pi("spec", "rules", i);
        if let Some(from) = &rule.from {
            if from.is_empty() {
                ctx.error(
                    &p(&rp, "from"),
                    "`from` must not be empty; omit it to match any source",
                );
            }
            for (j, f) in from.iter().enumerate() {
                let fp = pi(&rp, "from", j);
                match &f.source {
                    None => ctx.error(&fp, "a `from` entry needs a source"),
                    Some(src) => source(ctx, &p(&fp, "source"), src),
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                ctx.error(
                    &p(&rp, "to"),
                    "`to` must not be empty; omit it to match any operation",
                );
            }
            for (j, t) in to.iter().enumerate() {
                let tp = pi(&rp, "to", j);
                match &t.operation {
                    None => ctx.error(&tp, "a `to` entry needs an operation"),
                    Some(op) => operation(ctx, &p(&tp, "operation"), op),
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            condition(ctx, &pi(&rp, "when", j), c);
        }
    }
}

fn values(
    ctx: &mut Ctx<'_>,
    path: &str,
    field: &str,
    vals: &[String],
    check: impl Fn(&str) -> Result<(), String>,
) {
    for (i, v) in vals.iter().enumerate() {
        let vp = pi(path, field, i);
        if v.is_empty() {
            ctx.error(&vp, format!("{field} values must not be empty"));
        } else if let Err(e) = check(v) {
            ctx.error(&vp, e);
        }
    }
}

/// The four string forms of authorization values: exact, `prefix*`, `*suffix`, `*`.
fn split_wildcard(v: &str) -> (&str, bool, bool) {
    if v == "*" {
        return ("", true, true);
    }
    if let Some(rest) = v.strip_prefix('*') {
        return (rest, true, false);
    }
    if let Some(rest) = v.strip_suffix('*') {
        return (rest, false, true);
    }
    (v, false, false)
}

fn check_principal(v: &str) -> Result<(), String> {
    if v.starts_with("spiffe://") {
        return Err(format!(
            "principal `{v}` must be written without `spiffe://`, e.g. `{}`",
            v.trim_start_matches("spiffe://")
        ));
    }
    let (core, prefix, suffix) = split_wildcard(v);
    if core.contains('*') {
        return Err(format!(
            "principal `{v}` has `*` in the middle, where it is a literal character; use exact, `prefix*`, `*suffix` or `*`"
        ));
    }
    if !prefix && !suffix {
        let id = Identity::parse(&format!("spiffe://{v}")).map_err(|e| {
            format!("principal `{v}` is not a SPIFFE identity without scheme ({e}); expected <trust-domain>/ns/<namespace>/sa/<service-account>")
        })?;
        if id.namespace().is_none() {
            return Err(format!(
                "principal `{v}` is not an Istio workload identity; expected <trust-domain>/ns/<namespace>/sa/<service-account>"
            ));
        }
    }
    Ok(())
}

fn check_namespace_value(v: &str) -> Result<(), String> {
    let (core, _, _) = split_wildcard(v);
    if core.contains('*')
        || !(core.is_empty()
            || core
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        return Err(format!(
            "`{v}` is not a namespace value; expected a namespace name, `prefix*`, `*suffix` or `*`"
        ));
    }
    Ok(())
}

fn check_service_account(v: &str) -> Result<(), String> {
    if v.contains('*') {
        return Err(format!(
            "service account `{v}` contains `*`; wildcards are not allowed in serviceAccounts"
        ));
    }
    if v.len() > 320 {
        return Err("service account values are at most 320 characters".to_owned());
    }
    let ok = match v.split_once('/') {
        Some((ns, sa)) => is_dns1123_label(ns) && is_dns1123_subdomain(sa),
        None => is_dns1123_subdomain(v),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{v}` is not a service account; expected `namespace/name` or `name`"
        ))
    }
}

fn source(ctx: &mut Ctx<'_>, path: &str, s: &Source) {
    let all: [(&str, &Vec<String>); 14] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ];
    if all.iter().all(|(_, v)| v.is_empty()) {
        ctx.error(
            path,
            "a source must set at least one field (principals, namespaces, ipBlocks, ...)",
        );
    }
    let sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let pn = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if sa && pn {
        ctx.error(
            path,
            "serviceAccounts cannot be combined with principals or namespaces",
        );
    }
    for f in ["serviceAccounts", "notServiceAccounts"] {
        let v = if f == "serviceAccounts" {
            &s.service_accounts
        } else {
            &s.not_service_accounts
        };
        if v.len() > 16 {
            ctx.error(
                &p(path, f),
                format!("{f} holds at most 16 values, not {}", v.len()),
            );
        }
    }
    values(ctx, path, "principals", &s.principals, check_principal);
    values(
        ctx,
        path,
        "notPrincipals",
        &s.not_principals,
        check_principal,
    );
    values(
        ctx,
        path,
        "requestPrincipals",
        &s.request_principals,
        |_| Ok(()),
    );
    values(
        ctx,
        path,
        "notRequestPrincipals",
        &s.not_request_principals,
        |_| Ok(()),
    );
    values(
        ctx,
        path,
        "namespaces",
        &s.namespaces,
        check_namespace_value,
    );
    values(
        ctx,
        path,
        "notNamespaces",
        &s.not_namespaces,
        check_namespace_value,
    );
    for f in [
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
    ] {
        let v = all
            .iter()
            .find(|(n, _)| *n == f)
            .map(|(_, v)| *v)
            .cloned()
            .unwrap_or_default();
        values(ctx, path, f, &v, check_ip_or_cidr);
    }
    values(
        ctx,
        path,
        "serviceAccounts",
        &s.service_accounts,
        check_service_account,
    );
    values(
        ctx,
        path,
        "notServiceAccounts",
        &s.not_service_accounts,
        check_service_account,
    );
    let td = |v: &str| {
        Identity::trust_domain_root(v)
            .map(|_| ())
            .map_err(|e| format!("`{v}` is not a valid trust domain: {e}"))
    };
    values(ctx, path, "trustDomains", &s.trust_domains, td);
    values(ctx, path, "notTrustDomains", &s.not_trust_domains, td);
}

fn check_path_value(v: &str) -> Result<(), String> {
    if !(v.starts_with('/') || v.starts_with('*')) {
        return Err(format!(
            "path `{v}` must start with `/` (or be `*`, `*suffix`)"
        ));
    }
    if v.contains('{') || v.contains('}') {
        let segments: Vec<&str> = v.split('/').collect();
        for (i, seg) in segments.iter().enumerate() {
            let templ = seg.contains('{') || seg.contains('}');
            if templ && *seg != "{*}" && *seg != "{**}" {
                return Err(format!(
                    "path template `{v}`: a template segment must be exactly `{{*}}` or `{{**}}`"
                ));
            }
            if *seg == "{**}" && i != segments.len() - 1 {
                return Err(format!(
                    "path template `{v}`: `{{**}}` must be the last segment"
                ));
            }
        }
        if v.starts_with('*') || (v.ends_with('*') && !v.ends_with("}")) {
            return Err(format!(
                "path template `{v}` cannot be combined with a `*` prefix or suffix match"
            ));
        }
    }
    Ok(())
}

fn operation(ctx: &mut Ctx<'_>, path: &str, o: &Operation) {
    let all = [
        &o.hosts,
        &o.not_hosts,
        &o.ports,
        &o.not_ports,
        &o.methods,
        &o.not_methods,
        &o.paths,
        &o.not_paths,
    ];
    if all.iter().all(|v| v.is_empty()) {
        ctx.error(
            path,
            "an operation must set at least one field (hosts, ports, methods, paths, ...)",
        );
    }
    values(ctx, path, "hosts", &o.hosts, |_| Ok(()));
    values(ctx, path, "notHosts", &o.not_hosts, |_| Ok(()));
    let port = |v: &str| match v.parse::<u32>() {
        Ok(n) if n <= 65535 => Ok(()),
        _ => Err(format!("`{v}` is not a port; expected a number 0 to 65535")),
    };
    values(ctx, path, "ports", &o.ports, port);
    values(ctx, path, "notPorts", &o.not_ports, port);
    values(ctx, path, "methods", &o.methods, |_| Ok(()));
    values(ctx, path, "notMethods", &o.not_methods, |_| Ok(()));
    values(ctx, path, "paths", &o.paths, check_path_value);
    values(ctx, path, "notPaths", &o.not_paths, check_path_value);
}

const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

fn condition(ctx: &mut Ctx<'_>, path: &str, c: &Condition) {
    let key = c.key.as_str();
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('[') && rest.ends_with(']') && rest.len() > 2)
    };
    let known = CONDITION_KEYS.contains(&key)
        || bracketed("request.headers")
        || bracketed("request.auth.claims")
        || key.starts_with("experimental.envoy.filters.");
    if key.is_empty() {
        ctx.error(&p(path, "key"), "condition key is required");
    } else if !known {
        ctx.error(
            &p(path, "key"),
            format!(
                "unknown condition key `{key}`; expected one of {}, request.headers[<name>], request.auth.claims[<claim>]",
                CONDITION_KEYS.join(", ")
            ),
        );
    } else if key.starts_with("request.auth.claims")
        && let Err(e) = claim_path(&key["request.auth.claims".len()..])
    {
        ctx.error(&p(path, "key"), format!("`{key}`: {e}"));
    } else if key.starts_with("experimental.") {
        ctx.warn(&p(path, "key"), format!("`{key}` is not enforced"));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        ctx.error(path, "a condition needs values or notValues");
    }
    let check: fn(&str) -> Result<(), String> = match key {
        "source.ip" | "remote.ip" | "destination.ip" => check_ip_or_cidr,
        "destination.port" => |v| match v.parse::<u32>() {
            Ok(n) if n <= 65535 => Ok(()),
            _ => Err(format!("`{v}` is not a port; expected a number 0 to 65535")),
        },
        "source.principal" => check_principal,
        "source.namespace" => check_namespace_value,
        _ => |_| Ok(()),
    };
    values(ctx, path, "values", &c.values, check);
    values(ctx, path, "notValues", &c.not_values, check);
}
