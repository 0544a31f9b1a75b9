//! One destination of the chosen route: its DestinationRule policy after the merge, TLS
//! on each side, and the authorization decision at the destination workload.

use std::fmt::Write as _;

use mesh_core::config::{self, LoadReport, MeshConfig, TrafficPolicy};
use mesh_core::{Identity, Labels, TlsMode};
use mesh_resilience::balance::{LbConfig, LbPolicy};
use mesh_resilience::limit::PoolLimits;
use mesh_resilience::outlier::OutlierConfig;
use mesh_routing::{
    DestinationKey, Naming, RequestView, ResolvedDestination, ResolvedPolicy, Routing,
};
use mesh_tls::PeerAuthentication;
use mesh_tls::authz::{NormalizeOptions, PolicySet, RequestAttributes, ServerName, canonicalize};
use mesh_tls::peer_auth::PeerAuthMode;

use super::{
    AppliedPolicy, AuthzSummary, DestinationSummary, Located, OutlierSummary, PolicySummary,
    PoolSummary, Query, TlsSummary, duration, host_namespace, istio_name, locate,
};
/// The destination `key`: subset, DestinationRule, policy, TLS and authorization.
#[allow(clippy::too_many_arguments)]
pub(super) fn destination(
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
            let endpoints = Some(instances(r));
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
        .and_then(|e| e.port)
        .unwrap_or(target_port);

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
    // The server side is the destination's sidecar, when its endpoints have one (assumed
    // when the files do not list them); without one, the application itself answers and
    // neither PeerAuthentication nor AuthorizationPolicy applies.
    let (known, with_sidecar) = endpoints.as_ref().map_or((0, 0), |e| {
        let n = e.iter().filter(|i| i.tls_mode == TlsMode::Istio).count();
        (e.len(), n)
    });
    let sidecar = known == 0 || with_sidecar > 0;
    if with_sidecar > 0 && with_sidecar < known {
        notes.push(format!(
            "{} of {known} endpoints of {key} have no sidecar: they get what the client sends \
             (plaintext under auto-mTLS), and no PeerAuthentication or AuthorizationPolicy \
             applies to them; what follows is for the endpoints with a sidecar",
            known - with_sidecar
        ));
    }
    let (server, server_at, connection) = if sidecar {
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
        (server_mode.to_string(), server_at, connection)
    } else {
        let connection = if client_transport == "Istio mTLS" {
            "refused: the endpoints have no sidecar to accept Istio mTLS".to_owned()
        } else {
            client_transport.clone()
        };
        ("NONE".to_owned(), None, connection)
    };
    let tls = TlsSummary {
        client,
        client_transport,
        client_at: tls_at,
        server,
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
        sidecar,
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

/// An instance of the destination known from the files (a ServiceEntry endpoint or a
/// selected WorkloadEntry).
struct Instance {
    /// Its address (an IP, or a DNS name).
    address: String,
    /// The port it serves the destination's port on; `None` until resolved by DNS.
    port: Option<u16>,
    labels: Labels,
    /// Whether auto-mTLS sends it Istio mTLS.
    tls_mode: TlsMode,
}

/// The instances of a resolved destination, as the router finds them: static endpoints
/// with their addresses, or for DNS services the entries (the service's own hosts when it
/// has none), which get addresses only at run time.
fn instances(r: &ResolvedDestination) -> Vec<Instance> {
    if matches!(r.service.resolution, mesh_routing::Resolution::Static) {
        return r
            .service
            .static_endpoints(&r.port, &r.selector)
            .into_iter()
            .map(|e| Instance {
                address: e.address.ip().to_string(),
                port: Some(e.address.port()),
                labels: (*e.labels).clone(),
                tls_mode: e.tls_mode,
            })
            .collect();
    }
    let selected: Vec<Instance> = r
        .service
        .endpoints
        .iter()
        .filter(|w| r.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .map(|w| Instance {
            address: w.address.clone(),
            port: None,
            labels: w.labels.clone(),
            // Never Istio mTLS to a mesh-external service (SR-24).
            tls_mode: if r.service.mesh_external {
                mesh_core::TlsMode::Disabled
            } else {
                w.tls_mode()
            },
        })
        .collect();
    if !selected.is_empty() || !r.service.endpoints.is_empty() || !r.selector.is_empty() {
        return selected;
    }
    r.service
        .hosts
        .iter()
        .map(|h| Instance {
            address: h.clone(),
            port: None,
            labels: Labels::new(),
            tls_mode: mesh_routing::WorkloadEntry::new(h.clone()).tls_mode(),
        })
        .collect()
}

/// The destination workload's namespace and labels, and where the labels come from.
fn destination_workload(
    query: &Query,
    host: &str,
    domain: &str,
    selector: Option<&Labels>,
    endpoints: Option<&[Instance]>,
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
    let labelled = |e: &&Instance| !e.labels.is_empty();
    let chosen = endpoints.and_then(|e| {
        e.iter()
            .filter(|i| i.tls_mode == TlsMode::Istio)
            .find(labelled)
            .or_else(|| e.iter().find(labelled))
    });
    if let Some(ep) = chosen {
        let labels: Labels = ep.labels.clone();
        return (
            namespace,
            labels,
            format!("the labels of endpoint {}", ep.address),
        );
    }
    let mut labels = Labels::from([("app".to_owned(), name.clone())]);
    let mut from = format!("assumed: app={name}");
    if let Some(sel) = selector.filter(|s| !s.is_empty()) {
        from.push_str(", plus the subset's");
        for (i, (k, v)) in sel.iter().enumerate() {
            labels.insert(k.clone(), v.clone());
            let _ = write!(from, "{} {k}={v}", if i == 0 { "" } else { "," });
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
    sidecar: bool,
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
    if !sidecar {
        out.allowed = true;
        out.status = 200;
        out.principal = None;
        out.reason = "the endpoints have no sidecar: no AuthorizationPolicy is enforced and \
                      the application itself answers"
            .into();
        return out;
    }
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
