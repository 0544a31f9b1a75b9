//! The single table of fields that are parsed but not enforced.
//!
//! Every field of Istio's API is known to the loader, so configuration written for Istio
//! loads; but a field the proxy does not act on must not look as if it works. Each entry
//! here turns into a warning wherever the field is written. Work that implements a field
//! removes its line.

use super::Kind;
use super::locate::SourceMap;

/// A field that the loader accepts but the proxy does not act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotEnforced {
    /// The kind.
    pub kind: Kind,
    /// Path pattern: `.`-separated segments; `[]` after a name matches any index or map
    /// key; `**` matches any number of segments.
    pub pattern: &'static str,
    /// What happens instead.
    pub effect: &'static str,
}

const fn ne(kind: Kind, pattern: &'static str, effect: &'static str) -> NotEnforced {
    NotEnforced {
        kind,
        pattern,
        effect,
    }
}

use Kind::{DestinationRule as DR, Gateway as GW, Sidecar as SC, Telemetry as TE};

/// Fields parsed but not enforced by the proxy.
pub const NOT_ENFORCED: &[NotEnforced] = &[
    ne(
        DR,
        "spec.**.outlierDetection.outlierDetectionHttpErrorCodes",
        "only 5xx responses count as errors (the field is proposed for Istio's API, not part \
         of a released one, and its meaning is not settled)",
    ),
    ne(
        GW,
        "spec.servers[].defaultEndpoint",
        "traffic is routed by VirtualServices only (Istio's API marks this field not \
         implemented)",
    ),
    ne(
        SC,
        "spec.egress[].port",
        "egress hosts apply to every port; no listener is made per port (the proxy's \
         listeners come from its settings, `listeners.outbound` and `listeners.tcp`, not \
         from Sidecar resources)",
    ),
    ne(
        SC,
        "spec.egress[].bind",
        "the proxy's own outbound listener is used (listeners come from the proxy's \
         settings; `listeners.tcp` binds a local address per service port)",
    ),
    ne(
        SC,
        "spec.egress[].captureMode",
        "the proxy's own outbound listener is used (capture is the proxy's setting \
         `listeners.capture` with the rules of `mesh-proxy init`, not a per-listener \
         choice)",
    ),
    ne(
        SC,
        "spec.ingress",
        "inbound traffic is served by the proxy's own inbound listener and sent to \
         `listeners.app` (listeners come from the proxy's settings, not from Sidecar \
         resources)",
    ),
    ne(
        SC,
        "spec.inboundConnectionPool",
        "inbound connections are limited by the setting `limits.maxConnections` only \
         (connection-pool limits are kept per upstream destination, and the application \
         behind the inbound listener is not one)",
    ),
    ne(
        SC,
        "spec.outboundTrafficPolicy.egressProxy",
        "unknown destinations pass through to the address they were sent to (an egress \
         proxy would be a destination outside every route table, which the router does not \
         hold)",
    ),
    ne(
        TE,
        "spec.tracing[].providers",
        "spans go to the exporter the proxy's settings name (providers are defined in \
         Istio's MeshConfig `extensionProviders`, which the proxy does not read)",
    ),
    ne(
        TE,
        "spec.tracing[].useRequestIdForTraceSampling",
        "new traces are sampled at random, not from the request id (the proxy samples at \
         random by design, see `mesh_telemetry::trace`)",
    ),
    ne(
        TE,
        "spec.tracing[].enableIstioTags",
        "Istio's span tags are always added (Kiali and Jaeger views rely on them, so they \
         are not made optional)",
    ),
    ne(
        TE,
        "spec.tracing[].disableContextPropagation",
        "trace headers are always forwarded (the propagation step has no per-workload switch yet)",
    ),
    ne(
        TE,
        "spec.tracing[].customTags.**.formatter",
        "the tag is not added (formatter values are Envoy substitution format strings, \
         which the proxy does not evaluate)",
    ),
    ne(
        TE,
        "spec.accessLogging[].providers",
        "the access log goes where the proxy's settings say (standard output when they name \
         none; providers are defined in Istio's MeshConfig, which the proxy does not read)",
    ),
    ne(
        TE,
        "spec.metrics[].providers",
        "metrics are served on /metrics in the Prometheus format (providers are defined in \
         Istio's MeshConfig, which the proxy does not read)",
    ),
    ne(
        TE,
        "spec.metrics[].reportingInterval",
        "TCP metrics are recorded as they happen (so no interval applies: they are never \
         older than the scrape)",
    ),
    ne(
        TE,
        "spec.metrics[].overrides[].match.customMetric",
        "the override applies to no metric (custom metrics come from Envoy stats or Wasm \
         plugins, which the proxy does not run)",
    ),
];

/// Normalizes a concrete path to pattern form: indices and map keys become `[]`.
fn normalize(path: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = path.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' => out.push(std::mem::take(&mut cur)),
            '[' => {
                // Skip to the matching `]`, honouring quoted keys.
                let mut quoted = false;
                while let Some(d) = chars.next() {
                    match d {
                        '\\' if quoted => {
                            chars.next();
                        }
                        '"' => quoted = !quoted,
                        ']' if !quoted => break,
                        _ => {}
                    }
                }
                cur.push_str("[]");
            }
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn matches(pattern: &[&str], path: &[String]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| matches(rest, &path[i..])),
        Some((seg, rest)) => path
            .split_first()
            .is_some_and(|(p, tail)| p == seg && matches(rest, tail)),
    }
}

/// Warnings for every not-enforced field written in a document: `(path, message)`.
/// A field is reported once, at its top (not again for its children).
pub(crate) fn not_enforced_warnings(kind: Kind, source: &SourceMap) -> Vec<(String, String)> {
    let rules: Vec<(&NotEnforced, Vec<&str>)> = NOT_ENFORCED
        .iter()
        .filter(|n| n.kind == kind)
        .map(|n| (n, n.pattern.split('.').collect()))
        .collect();
    let mut out: Vec<(String, String)> = Vec::new();
    for path in source.paths() {
        let inside = |reported: &str| {
            path.strip_prefix(reported)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        };
        if out.iter().any(|(reported, _)| inside(reported)) {
            continue;
        }
        let norm = normalize(path);
        if let Some((n, _)) = rules.iter().find(|(_, pat)| matches(pat, &norm)) {
            out.push((
                path.to_owned(),
                format!(
                    "`{}` is parsed but not enforced: {}",
                    n.pattern.rsplit('.').next().unwrap_or(n.pattern),
                    n.effect
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_indices_keys_and_deep_paths() {
        let m =
            |pat: &str, path: &str| matches(&pat.split('.').collect::<Vec<_>>(), &normalize(path));
        assert!(m("spec.http[].corsPolicy", "spec.http[3].corsPolicy"));
        assert!(!m(
            "spec.http[].corsPolicy",
            "spec.http[3].corsPolicy.maxAge"
        ));
        assert!(m("spec.**.tls", "spec.trafficPolicy.tls"));
        assert!(m(
            "spec.**.tls",
            "spec.subsets[1].trafficPolicy.portLevelSettings[0].tls"
        ));
        assert!(!m("spec.**.tls", "spec.subsets[1].trafficPolicy"));
        assert_eq!(
            normalize("a[\"x.y]\"].b"),
            vec!["a[]".to_owned(), "b".to_owned()]
        );
    }
}
