//! The human-readable form of an [`Explanation`].

use std::fmt::Write as _;

use super::{DestinationSummary, Explanation, Located};

/// ` (file:line)` for a location, or nothing.
fn at(l: Option<&Located>) -> String {
    l.map(|l| format!(" ({})", l.position()))
        .unwrap_or_default()
}

fn labels(l: &mesh_core::Labels) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders `e` as text, one section per step of the request's path.
pub fn text(e: &Explanation) -> String {
    let mut out = String::new();
    let r = &e.request;
    let s = &e.source;
    let _ = writeln!(
        out,
        "request      {} {}{} (port {})",
        r.method, r.authority, r.path, r.port
    );
    for (k, v) in &r.headers {
        let _ = writeln!(out, "             {k}: {v}");
    }
    let _ = writeln!(
        out,
        "source       {}/{} [{}] {}",
        s.namespace,
        s.service_account,
        labels(&s.labels),
        s.spiffe_id
    );
    let l = &e.listener;
    match &l.gateway {
        None => {
            let _ = writeln!(out, "listener     the source's sidecar, outbound (mesh)");
        }
        Some(g) => {
            let _ = writeln!(out, "listener     Gateway {}{}", l.name, at(Some(g)));
            if let Some(server) = &l.server {
                let tls = match (&server.tls_mode, &server.credential_name) {
                    (Some(m), Some(c)) => format!("TLS {m} with credential {c}"),
                    (Some(m), None) => format!("TLS {m}"),
                    _ => "plaintext".into(),
                };
                let _ = writeln!(
                    out,
                    "             servers[{}]: port {} {} hosts {}; client side: {tls}{}",
                    server.index,
                    server.port,
                    server.protocol,
                    server.hosts.join(","),
                    at(Some(&server.at))
                );
            }
        }
    }
    if let Some(route) = &e.route {
        match (&route.virtual_service, &route.rule) {
            (Some(vs), rule) => {
                let _ = writeln!(
                    out,
                    "route        VirtualService {}/{}{}",
                    vs.namespace,
                    vs.name,
                    at(Some(vs))
                );
                if let Some(i) = route.rule_index {
                    let name = route
                        .rule_name
                        .as_deref()
                        .map(|n| format!(" \"{n}\""))
                        .unwrap_or_default();
                    let matched = match (route.match_index, &route.matched) {
                        (Some(j), m) => format!(", match[{j}]{}", at(m.as_ref())),
                        _ => ", no match conditions".into(),
                    };
                    let _ = writeln!(
                        out,
                        "             http[{i}]{name}{}{matched}",
                        at(rule.as_ref())
                    );
                }
            }
            (None, _) => {
                let _ = writeln!(
                    out,
                    "route        the default route of {} (no VirtualService)",
                    route.virtual_host
                );
            }
        }
        let deadline = match route.timeout.as_deref() {
            Some(t) => format!("{t}, the outer deadline"),
            None => "none (no outer deadline)".into(),
        };
        let _ = writeln!(
            out,
            "timeout      {deadline}{}",
            at(route.timeout_at.as_ref())
        );
        let rt = &route.retries;
        if rt.attempts == 0 {
            let _ = writeln!(out, "retries      none{}", at(rt.at.as_ref()));
        } else {
            let per_try = match &rt.per_try_timeout {
                Some(t) => format!("each try at most {t}"),
                None => "no per-try timeout".into(),
            };
            let within = route
                .timeout
                .as_deref()
                .map(|t| format!(", all within {t}"))
                .unwrap_or_default();
            let default = if rt.default { " (Istio's default)" } else { "" };
            let _ = writeln!(
                out,
                "retries      {} on {}; {per_try}{within}; back-off {}{default}{}",
                rt.attempts,
                rt.retry_on,
                rt.backoff,
                at(rt.at.as_ref())
            );
        }
    }
    let _ = writeln!(out, "outcome      {}", e.outcome);
    for d in &e.destinations {
        destination(&mut out, d);
    }
    for n in &e.notes {
        let _ = writeln!(out, "note         {n}");
    }
    out
}

fn destination(out: &mut String, d: &DestinationSummary) {
    let subset = d
        .subset
        .as_deref()
        .map(|s| format!(" subset {s}"))
        .unwrap_or_default();
    let port = d.port.map(|p| format!(":{p}")).unwrap_or_default();
    let weight = d
        .weight
        .map(|w| format!(", weight {w}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "destination  {}% {}{port}{subset}{weight}{}",
        d.percent,
        d.host,
        at(d.at.as_ref())
    );
    if let Some(sl) = &d.subset_labels {
        let _ = writeln!(
            out,
            "  subset       labels {}{}",
            labels(sl),
            at(d.subset_at.as_ref())
        );
    }
    match &d.destination_rule {
        Some(dr) => {
            let _ = writeln!(
                out,
                "  rule         DestinationRule {}/{}{}",
                dr.namespace,
                dr.name,
                at(Some(dr))
            );
        }
        None => {
            let _ = writeln!(out, "  rule         no DestinationRule");
        }
    }
    let p = &d.policy;
    let _ = writeln!(
        out,
        "  balancer     {}{}",
        p.load_balancer,
        at(p.load_balancer_at.as_ref())
    );
    let pl = &p.pool_limits;
    let lim = |name: &str, v: Option<u32>| v.map(|v| format!("{name} {v}"));
    let limits: Vec<String> = [
        lim("maxConnections", pl.max_connections),
        lim("http1MaxPendingRequests", pl.http1_max_pending_requests),
        lim("http2MaxRequests", pl.http2_max_requests),
        lim("maxRequestsPerConnection", pl.max_requests_per_connection),
        lim("maxRetries", pl.max_retries),
    ]
    .into_iter()
    .flatten()
    .collect();
    let limits = if limits.is_empty() {
        "no limits".to_owned()
    } else {
        limits.join(", ")
    };
    let _ = writeln!(
        out,
        "  pool         {limits}; idle timeout {}{}",
        pl.idle_timeout,
        at(p.connection_pool_at.as_ref())
    );
    match &p.outlier {
        Some(o) => {
            let _ = writeln!(
                out,
                "  outlier      eject after {} consecutive 5xx{}, every {}, for {} and more, at most {}% of endpoints{}",
                o.consecutive_5xx_errors,
                if o.consecutive_gateway_errors > 0 {
                    format!(" or {} gateway errors", o.consecutive_gateway_errors)
                } else {
                    String::new()
                },
                o.interval,
                o.base_ejection_time,
                o.max_ejection_percent,
                at(p.outlier_detection_at.as_ref())
            );
        }
        None => {
            let _ = writeln!(out, "  outlier      none");
        }
    }
    let t = &d.tls;
    let _ = writeln!(
        out,
        "  tls client   {} → {}{}",
        if t.client == "AUTO" {
            "auto-mTLS (no DestinationRule tls)"
        } else {
            t.client.as_str()
        },
        t.client_transport,
        at(t.client_at.as_ref())
    );
    let _ = writeln!(
        out,
        "  tls server   {}{}{}",
        t.server,
        if t.server_at.is_none() {
            " (no PeerAuthentication: the default)"
        } else {
            ""
        },
        at(t.server_at.as_ref())
    );
    let _ = writeln!(out, "  connection   {}", t.connection);
    let a = &d.authorization;
    let _ = writeln!(
        out,
        "  workload     {} [{}] ({})",
        a.namespace,
        labels(&a.labels),
        a.labels_from
    );
    let _ = writeln!(
        out,
        "  principal    {}",
        a.principal.as_deref().unwrap_or("none (no mTLS)")
    );
    let verdict = if a.allowed { "ALLOWED" } else { "DENIED" };
    let _ = writeln!(
        out,
        "  authz        {verdict} ({}): {}{}",
        a.status,
        a.reason,
        at(a.at.as_ref())
    );
    for p in &a.policies {
        let _ = writeln!(
            out,
            "               applies: {} {}{}{}",
            p.action,
            p.name,
            if p.dry_run { " (dry run)" } else { "" },
            at(Some(&p.at))
        );
    }
}
