//! `Sidecar` (`networking.istio.io`): which configuration a workload's proxy imports.
//! Field names follow istio/api `sidecar.proto`.
//!
//! # Behaviour
//!
//! - Egress `hosts` are `namespace/dnsName` (ISTIO.md SR-32): namespace `*` is any
//!   namespace, `.` the workload's own (the Sidecar's, except for the root namespace's
//!   default Sidecar, which Istio documents as importing `./*` for each workload from its
//!   own namespace), `~` none (`~/*` imports nothing), a name that
//!   namespace; dnsName `*` is every host of those namespaces, `*.example.com` a
//!   left-wildcard, anything else one exact name. A namespace written `~name` (istio/api's
//!   newest form) EXCLUDES the hosts it names from what the other entries import.
//! - A Sidecar without egress listeners imports everything (`*/*`), as Istio's default
//!   egress listener does.
//! - Which Sidecar applies to a workload ([`select_sidecar`], SR-33): one in the workload's
//!   namespace whose `workloadSelector` matches its labels, else the selector-less one of
//!   its namespace, else the selector-less one of the root namespace; the oldest wins
//!   among equals (Istio leaves several matching Sidecars undefined). Sidecars never
//!   apply to gateways; that is the caller's to decide.
//!
//! # Choices that differ from Istio
//!
//! - The egress hosts scope what `discovery` sends to a proxy; a configuration loaded
//!   from files is not scoped (every proxy loading the files sees all of it). Ports,
//!   `bind`, `captureMode`, `ingress`, `outboundTrafficPolicy` and
//!   `inboundConnectionPool` are parsed and validated but not enforced (see
//!   [`NOT_ENFORCED`](super::NOT_ENFORCED)).

use serde::{Deserialize, Serialize};

use super::{ConnectionPoolSettings, Destination, EntryWorkloadSelector, GatewayPort, Labels};
use super::{Resource, ServerTlsSettings};

/// The `spec` of a Sidecar.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SidecarSpec {
    /// The workloads it applies to; absent: every workload of its namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<EntryWorkloadSelector>,
    /// Inbound listeners.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressListener>,
    /// Outbound listeners and the hosts they import.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressListener>,
    /// Connection pool of inbound connections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_connection_pool: Option<ConnectionPoolSettings>,
    /// What to do with traffic to unknown destinations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

/// An inbound listener (`IstioIngressListener`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IngressListener {
    /// The port (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<GatewayPort>,
    /// The address to bind to.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub bind: String,
    /// How traffic reaches the listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_mode: Option<CaptureMode>,
    /// `127.0.0.1:port`, `0.0.0.0:port`, `[::1]:port` or `unix://...`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub default_endpoint: String,
    /// TLS of the listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsSettings>,
    /// Connection pool of the listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
}

/// An outbound listener (`IstioEgressListener`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EgressListener {
    /// The port; absent: every port (the catch-all listener).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<GatewayPort>,
    /// The address to bind to.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub bind: String,
    /// How traffic reaches the listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_mode: Option<CaptureMode>,
    /// Imported hosts, `namespace/dnsName` (required).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// How traffic is captured to a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaptureMode {
    /// The environment's default.
    Default,
    /// iptables redirection.
    Iptables,
    /// No capture: the application addresses the listener.
    None,
}

/// `outboundTrafficPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutboundTrafficPolicy {
    /// `REGISTRY_ONLY` or `ALLOW_ANY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<OutboundMode>,
    /// Where unknown traffic goes in `ALLOW_ANY` mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<Destination>,
}

/// Outbound traffic mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Only known destinations.
    RegistryOnly,
    /// Unknown destinations pass through.
    AllowAny,
}

/// A Sidecar resource.
pub type Sidecar = Resource<SidecarSpec>;

/// One parsed egress host, `namespace/dnsName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressHost<'a> {
    /// Written `~name/...`: the hosts are excluded, not imported.
    pub exclude: bool,
    /// `*`, `.`, `~` or a namespace name (without the exclusion `~`).
    pub namespace: &'a str,
    /// `*`, `*.suffix` or an exact name.
    pub dns_name: &'a str,
}

impl<'a> EgressHost<'a> {
    /// Parses `namespace/dnsName`; the error says what is wrong.
    pub fn parse(s: &'a str) -> Result<Self, String> {
        let Some((ns, dns)) = s.split_once('/') else {
            return Err(format!(
                "`{s}` is not `namespace/dnsName`; write e.g. `./{s}`, `*/{s}` or `istio-system/*`"
            ));
        };
        let (exclude, ns) = match ns.strip_prefix('~') {
            Some(rest) if !rest.is_empty() => (true, rest),
            _ => (false, ns),
        };
        if ns.is_empty() {
            return Err(format!(
                "`{s}` has an empty namespace; write `*`, `.`, `~` or a name"
            ));
        }
        if dns.is_empty() {
            return Err(format!(
                "`{s}` has an empty dnsName; write `*` for every host"
            ));
        }
        Ok(EgressHost {
            exclude,
            namespace: ns,
            dns_name: dns,
        })
    }

    /// Whether this entry names `host` of a configuration in `config_namespace`, for a
    /// workload in `workload_namespace`.
    fn names(&self, host: &str, config_namespace: &str, workload_namespace: &str) -> bool {
        let ns = match self.namespace {
            "*" => true,
            "~" => false,
            "." => config_namespace == workload_namespace,
            n => n == config_namespace,
        };
        ns && hosts_overlap(self.dns_name, host)
    }
}

/// `a` and `b` name a common host: equal, or one a wildcard covering the other.
pub(crate) fn hosts_overlap(a: &str, b: &str) -> bool {
    a == b || wildcard_covers(a, b) || wildcard_covers(b, a)
}

/// `*` covers every host; `*.example.com` covers `a.example.com` and `a.b.example.com`
/// (and the narrower wildcard `*.a.example.com`) but not `example.com`.
pub(crate) fn wildcard_covers(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => false,
    }
}

impl Resource<SidecarSpec> {
    /// Whether the Sidecar, applied to a workload in `workload_namespace`, imports `host`
    /// (qualified) of a configuration (Service, ServiceEntry, VirtualService) in
    /// `config_namespace` (SR-32): some egress host names it and no exclusion does.
    /// Unparsable hosts name nothing.
    pub fn imports(&self, workload_namespace: &str, config_namespace: &str, host: &str) -> bool {
        if self.spec.egress.is_empty() {
            return true;
        }
        let own = workload_namespace;
        let hosts = || {
            self.spec
                .egress
                .iter()
                .flat_map(|e| &e.hosts)
                .filter_map(|h| EgressHost::parse(h).ok())
        };
        let named = |exclude: bool| {
            hosts().any(|h| h.exclude == exclude && h.names(host, config_namespace, own))
        };
        named(false) && !named(true)
    }

    /// Whether the Sidecar has a `workloadSelector`.
    pub fn has_selector(&self) -> bool {
        self.spec.workload_selector.is_some()
    }
}

/// The Sidecar that applies to a workload in `namespace` with `labels` (SR-33): one of
/// its namespace selecting it, else the selector-less one of its namespace, else the
/// selector-less one of `root_namespace`; among several, the oldest
/// ([`Resource::age_key`]). Gateways are not workloads a Sidecar applies to: do not ask.
pub fn select_sidecar<'a>(
    sidecars: impl IntoIterator<Item = &'a Sidecar>,
    namespace: &str,
    labels: &Labels,
    root_namespace: &str,
) -> Option<&'a Sidecar> {
    // 0: selects the workload; 1: namespace default; 2: mesh default.
    let mut best: Option<(u8, &Sidecar)> = None;
    for s in sidecars {
        let rank = match &s.spec.workload_selector {
            Some(sel) if s.namespace() == namespace => {
                let selected = sel.labels.iter().all(|(k, v)| labels.get(k) == Some(v));
                if !selected {
                    continue;
                }
                0
            }
            Some(_) => continue,
            None if s.namespace() == namespace => 1,
            None if s.namespace() == root_namespace => 2,
            None => continue,
        };
        let better = match best {
            None => true,
            Some((r, b)) => rank < r || (rank == r && s.age_key() < b.age_key()),
        };
        if better {
            best = Some((rank, s));
        }
    }
    best.map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Metadata;

    fn sidecar(ns: &str, name: &str, selector: Option<&[(&str, &str)]>, hosts: &[&str]) -> Sidecar {
        Resource {
            api_version: "networking.istio.io/v1".to_owned(),
            metadata: Metadata {
                name: name.to_owned(),
                namespace: ns.to_owned(),
                ..Metadata::default()
            },
            spec: SidecarSpec {
                workload_selector: selector.map(|l| EntryWorkloadSelector {
                    labels: l
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                }),
                egress: vec![EgressListener {
                    hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
                    ..EgressListener::default()
                }],
                ..SidecarSpec::default()
            },
            origin: Default::default(),
        }
    }

    #[test]
    fn egress_hosts_import_by_namespace_and_dns_name() {
        let s = sidecar(
            "shop",
            "default",
            None,
            &["./*", "istio-system/*", "*/*.example.com", "~prod/*"],
        );
        assert!(s.imports("shop", "shop", "reviews.shop.svc.cluster.local"));
        assert!(s.imports(
            "shop",
            "istio-system",
            "istiod.istio-system.svc.cluster.local"
        ));
        assert!(!s.imports("shop", "bank", "ledger.bank.svc.cluster.local"));
        assert!(s.imports("shop", "bank", "api.example.com"));
        assert!(s.imports("shop", "bank", "*.example.com"));
        assert!(!s.imports("shop", "bank", "example.com"));
        assert!(
            !s.imports("shop", "prod", "api.example.com"),
            "excluded by ~prod/*"
        );
        let nothing = sidecar("shop", "n", None, &["~/*"]);
        assert!(!nothing.imports("shop", "shop", "reviews.shop.svc.cluster.local"));
        let mut all = sidecar("shop", "a", None, &[]);
        all.spec.egress.clear();
        assert!(all.imports("shop", "bank", "ledger.bank.svc.cluster.local"));
    }

    #[test]
    fn selected_beats_namespace_default_beats_root_default() {
        let root = sidecar("istio-system", "default", None, &["*/*"]);
        let ns = sidecar("shop", "default", None, &["./*"]);
        let sel = sidecar("shop", "reviews", Some(&[("app", "reviews")]), &["./*"]);
        let other_ns_sel = sidecar("bank", "reviews", Some(&[("app", "reviews")]), &["./*"]);
        let all = [&root, &ns, &sel, &other_ns_sel];
        let labels = |app: &str| Labels::from([("app".to_owned(), app.to_owned())]);
        let pick = |ns: &str, app: &str| {
            select_sidecar(all, ns, &labels(app), "istio-system").map(|s| s.name().to_owned())
        };
        assert_eq!(pick("shop", "reviews").as_deref(), Some("reviews"));
        assert_eq!(pick("shop", "ratings").as_deref(), Some("default"));
        let chosen = select_sidecar(all, "bank", &labels("ratings"), "istio-system").unwrap();
        assert_eq!(chosen.namespace(), "istio-system");
        assert!(select_sidecar([&sel], "shop", &labels("ratings"), "istio-system").is_none());
    }

    #[test]
    fn egress_host_parse_errors_say_what_to_write() {
        assert!(
            EgressHost::parse("reviews")
                .unwrap_err()
                .contains("namespace/dnsName")
        );
        assert!(EgressHost::parse("/x").is_err());
        assert!(EgressHost::parse("ns/").is_err());
        let h = EgressHost::parse("~prod/*").unwrap();
        assert!(h.exclude && h.namespace == "prod");
        let h = EgressHost::parse("~/*").unwrap();
        assert!(!h.exclude && h.namespace == "~");
    }
}
