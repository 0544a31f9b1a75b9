//! DestinationRule subsets and traffic-policy merging (DR-01..DR-04).
//!
//! A subset selects the endpoints of its host whose labels contain all of the subset's
//! labels. The policy for traffic to (host, subset, port) is resolved the way Istio does:
//! rule `trafficPolicy` → its `portLevelSettings[port]` → subset `trafficPolicy` → its
//! `portLevelSettings[port]`, where each step replaces whole blocks, never single fields:
//!
//! - a subset that sets `connectionPool` at all replaces the rule's `connectionPool`
//!   (likewise `outlierDetection`, `loadBalancer`, `tls`; `tunnel`, `proxyProtocol` and
//!   `retryBudget` replace only when set);
//! - matching port-level settings replace all four blocks, unset ones included (they fall
//!   back to defaults, not to the level above).
//!
//! The result is a [`ResolvedPolicy`] of raw configuration blocks; the resilience layers
//! turn those into their own policies.

use std::collections::HashMap;
use std::sync::Arc;

use mesh_core::Labels;
use mesh_core::config::{
    ClientTlsSettings, ConnectionPoolSettings, LoadBalancerSettings, OutlierDetection,
    ProxyProtocol, RetryBudget, TrafficPolicy, TunnelSettings,
};

/// The traffic policy resolved for one destination (host, subset, port): whole blocks as
/// configured, `None` meaning "the default".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolvedPolicy {
    /// `loadBalancer`.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// `connectionPool`.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// `outlierDetection`.
    pub outlier_detection: Option<OutlierDetection>,
    /// `tls`.
    pub tls: Option<ClientTlsSettings>,
    /// `tunnel`.
    pub tunnel: Option<TunnelSettings>,
    /// `proxyProtocol`.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// `retryBudget`.
    pub retry_budget: Option<RetryBudget>,
}

impl ResolvedPolicy {
    /// One level of policy for `port`: its blocks, replaced wholesale by a matching
    /// port-level entry. `None` when the level has a policy neither at all.
    fn level(policy: &TrafficPolicy, port: u16) -> (Self, bool) {
        let mut out = Self {
            load_balancer: policy.load_balancer.clone(),
            connection_pool: policy.connection_pool.clone(),
            outlier_detection: policy.outlier_detection.clone(),
            tls: policy.tls.clone(),
            tunnel: policy.tunnel.clone(),
            proxy_protocol: policy.proxy_protocol.clone(),
            retry_budget: policy.retry_budget.clone(),
        };
        let port_level = policy
            .port_level_settings
            .iter()
            .find(|p| p.port.is_some_and(|sel| sel.number == u32::from(port)));
        if let Some(p) = port_level {
            out.load_balancer = p.load_balancer.clone();
            out.connection_pool = p.connection_pool.clone();
            out.outlier_detection = p.outlier_detection.clone();
            out.tls = p.tls.clone();
        }
        (out, port_level.is_some())
    }

    /// Resolves the policy of `port` from the rule's and the subset's policies (DR-02..DR-04).
    pub fn resolve(
        rule: Option<&TrafficPolicy>,
        subset: Option<&TrafficPolicy>,
        port: u16,
    ) -> Self {
        let mut merged = rule.map(|r| Self::level(r, port).0).unwrap_or_default();
        let Some(subset) = subset else {
            return merged;
        };
        let (over, has_port_level) = Self::level(subset, port);
        if has_port_level {
            // Subset port-level settings decide all four blocks, unset ones included.
            merged.load_balancer = over.load_balancer;
            merged.connection_pool = over.connection_pool;
            merged.outlier_detection = over.outlier_detection;
            merged.tls = over.tls;
        } else {
            merged.load_balancer = over.load_balancer.or(merged.load_balancer);
            merged.connection_pool = over.connection_pool.or(merged.connection_pool);
            merged.outlier_detection = over.outlier_detection.or(merged.outlier_detection);
            merged.tls = over.tls.or(merged.tls);
        }
        merged.tunnel = over.tunnel.or(merged.tunnel);
        merged.proxy_protocol = over.proxy_protocol.or(merged.proxy_protocol);
        merged.retry_budget = over.retry_budget.or(merged.retry_budget);
        merged
    }
}

/// One subset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subset {
    /// `name`.
    pub name: String,
    /// `labels`: endpoints must carry all of them.
    pub labels: Labels,
    /// The subset's `trafficPolicy`.
    pub policy: Option<TrafficPolicy>,
}

/// The DestinationRule of one host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestinationRule {
    /// The rule's `trafficPolicy`.
    pub policy: Option<TrafficPolicy>,
    /// Subsets.
    pub subsets: Vec<Subset>,
}

impl DestinationRule {
    /// The subset named `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for traffic to `port` of `subset` (or of the whole host when `None`).
    pub fn resolve(&self, subset: Option<&str>, port: u16) -> ResolvedPolicy {
        let subset_policy = subset
            .and_then(|name| self.subset(name))
            .and_then(|s| s.policy.as_ref());
        ResolvedPolicy::resolve(self.policy.as_ref(), subset_policy, port)
    }
}

impl From<&mesh_core::config::DestinationRuleSpec> for DestinationRule {
    fn from(spec: &mesh_core::config::DestinationRuleSpec) -> Self {
        Self {
            policy: spec.traffic_policy.clone(),
            subsets: spec
                .subsets
                .iter()
                .map(|s| Subset {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                    policy: s.traffic_policy.clone(),
                })
                .collect(),
        }
    }
}

/// DestinationRules by fully qualified host (exact, or a `*.suffix` wildcard).
#[derive(Clone, Debug, Default)]
pub struct DestinationRules {
    rules: HashMap<String, Arc<DestinationRule>>,
}

impl DestinationRules {
    /// No rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the rule of `host` (qualified). The first rule for a host wins.
    pub fn insert(&mut self, host: impl Into<String>, rule: DestinationRule) {
        self.rules
            .entry(host.into())
            .or_insert_with(|| Arc::new(rule));
    }

    /// The rule of `host`: exact first, then the most specific wildcard.
    pub fn get(&self, host: &str) -> Option<&DestinationRule> {
        if let Some(r) = self.rules.get(host) {
            return Some(r);
        }
        let mut rest = host;
        while let Some((_, tail)) = rest.split_once('.') {
            if let Some(r) = self.rules.get(&format!("*.{tail}")) {
                return Some(r);
            }
            rest = tail;
        }
        self.rules.get("*").map(|r| &**r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{HttpSettings, PortSelector, PortTrafficPolicy, SimpleLb, TcpSettings};

    fn tcp_pool(max: i32) -> ConnectionPoolSettings {
        ConnectionPoolSettings {
            tcp: Some(TcpSettings {
                max_connections: Some(max),
                ..TcpSettings::default()
            }),
            ..ConnectionPoolSettings::default()
        }
    }

    fn http_pool(pending: i32) -> ConnectionPoolSettings {
        ConnectionPoolSettings {
            http: Some(HttpSettings {
                http1_max_pending_requests: Some(pending),
                ..HttpSettings::default()
            }),
            ..ConnectionPoolSettings::default()
        }
    }

    fn lb(simple: SimpleLb) -> LoadBalancerSettings {
        LoadBalancerSettings {
            simple: Some(simple),
            ..LoadBalancerSettings::default()
        }
    }

    #[test]
    fn subset_block_replaces_the_whole_rule_block() {
        // DR-03: tcp.maxConnections 100 at rule level is gone for subset traffic.
        let rule = TrafficPolicy {
            connection_pool: Some(tcp_pool(100)),
            load_balancer: Some(lb(SimpleLb::Random)),
            ..TrafficPolicy::default()
        };
        let subset = TrafficPolicy {
            connection_pool: Some(http_pool(10)),
            ..TrafficPolicy::default()
        };
        let p = ResolvedPolicy::resolve(Some(&rule), Some(&subset), 8080);
        assert_eq!(p.connection_pool, Some(http_pool(10)));
        // Blocks the subset leaves unset are inherited.
        assert_eq!(p.load_balancer, Some(lb(SimpleLb::Random)));
    }

    #[test]
    fn rule_port_level_settings_replace_all_four_blocks() {
        let rule = TrafficPolicy {
            connection_pool: Some(tcp_pool(100)),
            load_balancer: Some(lb(SimpleLb::Random)),
            port_level_settings: vec![PortTrafficPolicy {
                port: Some(PortSelector { number: 9080 }),
                connection_pool: Some(tcp_pool(5)),
                ..PortTrafficPolicy::default()
            }],
            ..TrafficPolicy::default()
        };
        let on_port = ResolvedPolicy::resolve(Some(&rule), None, 9080);
        assert_eq!(on_port.connection_pool, Some(tcp_pool(5)));
        assert_eq!(on_port.load_balancer, None, "port level does not inherit");
        let other = ResolvedPolicy::resolve(Some(&rule), None, 80);
        assert_eq!(other.connection_pool, Some(tcp_pool(100)));
        assert_eq!(other.load_balancer, Some(lb(SimpleLb::Random)));
    }

    #[test]
    fn subset_port_level_settings_decide_even_unset_blocks() {
        let rule = TrafficPolicy {
            connection_pool: Some(tcp_pool(100)),
            outlier_detection: Some(OutlierDetection::default()),
            ..TrafficPolicy::default()
        };
        let subset = TrafficPolicy {
            port_level_settings: vec![PortTrafficPolicy {
                port: Some(PortSelector { number: 8080 }),
                load_balancer: Some(lb(SimpleLb::RoundRobin)),
                ..PortTrafficPolicy::default()
            }],
            ..TrafficPolicy::default()
        };
        let p = ResolvedPolicy::resolve(Some(&rule), Some(&subset), 8080);
        assert_eq!(p.load_balancer, Some(lb(SimpleLb::RoundRobin)));
        assert_eq!(p.connection_pool, None);
        assert_eq!(p.outlier_detection, None);
        // On another port the subset has nothing: the rule's blocks hold.
        let p = ResolvedPolicy::resolve(Some(&rule), Some(&subset), 9090);
        assert_eq!(p.connection_pool, Some(tcp_pool(100)));
    }

    #[test]
    fn rules_are_found_by_exact_host_then_wildcard() {
        let mut rules = DestinationRules::new();
        rules.insert(
            "*.example.com",
            DestinationRule {
                subsets: vec![Subset {
                    name: "w".into(),
                    ..Subset::default()
                }],
                ..DestinationRule::default()
            },
        );
        rules.insert("a.example.com", DestinationRule::default());
        assert!(rules.get("a.example.com").unwrap().subsets.is_empty());
        assert!(rules.get("b.example.com").unwrap().subset("w").is_some());
        assert!(rules.get("example.org").is_none());
    }
}
