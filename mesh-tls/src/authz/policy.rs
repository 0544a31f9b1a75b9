//! AuthorizationPolicy as plain Rust values, buildable in code, and their scope.
//!
//! These mirror Istio's `security.istio.io/v1 AuthorizationPolicy` field by field, with
//! Istio's string forms (`prefix*`, `*suffix`, `*`). [`PolicySet::compile`] validates and
//! compiles them into the matcher the layer evaluates.
//!
//! [`PolicySet::compile`]: super::PolicySet::compile

use std::collections::BTreeMap;

use mesh_core::config;

use super::matcher::{PolicyError, PolicySet};

/// `spec.action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allow matching requests (the default when `action` is omitted).
    #[default]
    Allow,
    /// Deny matching requests.
    Deny,
    /// Mark matching requests for auditing; never affects allow/deny.
    Audit,
    /// Delegate to an extension provider (ext-authz). Not supported: rejected at compilation.
    Custom,
}

impl Action {
    /// Parses Istio's names (`ALLOW`, `DENY`, `AUDIT`, `CUSTOM`).
    pub fn from_istio(name: &str) -> Option<Self> {
        Some(match name {
            "ALLOW" => Self::Allow,
            "DENY" => Self::Deny,
            "AUDIT" => Self::Audit,
            "CUSTOM" => Self::Custom,
            _ => return None,
        })
    }

    /// Istio's name of the action.
    pub fn as_istio(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        }
    }
}

/// One AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.selector.matchLabels`; `None` applies to every workload of the namespace (or
    /// of the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.action`.
    pub action: Action,
    /// `spec.rules`. `None` (omitted) and `Some(vec![])` are the same: no rules, so an
    /// ALLOW policy matches nothing (`spec: {}` denies all) and a DENY policy is rejected.
    pub rules: Option<Vec<Rule>>,
    /// The `istio.io/dry-run: "true"` annotation: evaluated, reported, never enforced.
    pub dry_run: bool,
    /// `spec.targetRef` and `spec.targetRefs`: when any is set, they select the
    /// workloads (Gateway API gateways, AP-50) instead of `selector`.
    pub target_refs: Vec<config::PolicyTargetReference>,
}

impl Policy {
    /// A policy `namespace/name` with `action` and `rules`, no selector.
    pub fn new(namespace: &str, name: &str, action: Action, rules: Vec<Rule>) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            action,
            rules: Some(rules),
            ..Self::default()
        }
    }

    /// Sets the workload selector.
    pub fn with_selector<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.selector = Some(
            labels
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// `<namespace>/<name>`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One entry of `spec.rules`: matches when one `from` AND one `to` AND every `when` match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// `from[].source`; `None` matches any source. `Some(vec![])` is rejected.
    pub from: Option<Vec<Source>>,
    /// `to[].operation`; `None` matches any operation. `Some(vec![])` is rejected.
    pub to: Option<Vec<Operation>>,
    /// `when`: all must match.
    pub when: Vec<Condition>,
}

/// `rules[].from[].source`: every set field must match.
#[allow(missing_docs)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
    pub trust_domains: Vec<String>,
    pub not_trust_domains: Vec<String>,
}

/// `rules[].to[].operation`: every set field must match.
#[allow(missing_docs)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// `rules[].when[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    /// The attribute, e.g. `request.headers[x-user]`, `source.ip`, `destination.port`.
    pub key: String,
    /// Matches when the attribute matches one of these (when non-empty).
    pub values: Vec<String>,
    /// Matches only when the attribute matches none of these.
    pub not_values: Vec<String>,
}

impl Condition {
    /// A condition `key in values`.
    pub fn values(key: &str, values: &[&str]) -> Self {
        Self {
            key: key.to_owned(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
            not_values: Vec::new(),
        }
    }

    /// A condition `key not in not_values`.
    pub fn not_values(key: &str, not_values: &[&str]) -> Self {
        Self {
            key: key.to_owned(),
            values: Vec::new(),
            not_values: not_values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }
}

/// The workload whose inbound traffic a policy set protects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// The workload's namespace.
    pub namespace: String,
    /// The workload's labels.
    pub labels: BTreeMap<String, String>,
    /// MeshConfig `rootNamespace` (Istio's default is `istio-system`).
    pub root_namespace: String,
    /// MeshConfig `trustDomain` (e.g. `cluster.local`); used with the aliases.
    pub trust_domain: String,
    /// MeshConfig `trustDomainAliases`: principals in these domains and in
    /// `trust_domain` are equivalent (AP-24).
    pub trust_domain_aliases: Vec<String>,
}

impl Workload {
    /// Whether `policy` applies to this workload (AP-03): a root-namespace policy without
    /// selector applies mesh-wide, a root-namespace policy with selector to matching
    /// workloads of every namespace, any other policy to its own namespace's workloads
    /// (all of them, or those its selector matches). A policy with `targetRefs` applies
    /// to the pods of the Gateway API gateways they name (AP-50), never otherwise.
    pub fn is_selected_by(&self, policy: &Policy) -> bool {
        if !policy.target_refs.is_empty() {
            return policy.target_refs.iter().any(|r| {
                r.selects(
                    &policy.namespace,
                    &self.root_namespace,
                    &self.namespace,
                    &self.labels,
                )
            });
        }
        let namespace_ok =
            policy.namespace == self.root_namespace || policy.namespace == self.namespace;
        namespace_ok
            && policy.selector.as_ref().is_none_or(|selector| {
                selector
                    .iter()
                    .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
            })
    }
}

/// The annotation that makes a policy dry-run (AP-07).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

impl From<config::Action> for Action {
    fn from(a: config::Action) -> Self {
        match a {
            config::Action::Allow => Action::Allow,
            config::Action::Deny => Action::Deny,
            config::Action::Audit => Action::Audit,
            config::Action::Custom => Action::Custom,
        }
    }
}

impl From<&config::Source> for Source {
    fn from(s: &config::Source) -> Self {
        Source {
            principals: s.principals.clone(),
            not_principals: s.not_principals.clone(),
            request_principals: s.request_principals.clone(),
            not_request_principals: s.not_request_principals.clone(),
            namespaces: s.namespaces.clone(),
            not_namespaces: s.not_namespaces.clone(),
            service_accounts: s.service_accounts.clone(),
            not_service_accounts: s.not_service_accounts.clone(),
            ip_blocks: s.ip_blocks.clone(),
            not_ip_blocks: s.not_ip_blocks.clone(),
            remote_ip_blocks: s.remote_ip_blocks.clone(),
            not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
            trust_domains: s.trust_domains.clone(),
            not_trust_domains: s.not_trust_domains.clone(),
        }
    }
}

impl From<&config::Operation> for Operation {
    fn from(o: &config::Operation) -> Self {
        Operation {
            hosts: o.hosts.clone(),
            not_hosts: o.not_hosts.clone(),
            ports: o.ports.clone(),
            not_ports: o.not_ports.clone(),
            methods: o.methods.clone(),
            not_methods: o.not_methods.clone(),
            paths: o.paths.clone(),
            not_paths: o.not_paths.clone(),
        }
    }
}

impl From<&config::Condition> for Condition {
    fn from(c: &config::Condition) -> Self {
        Condition {
            key: c.key.clone(),
            values: c.values.clone(),
            not_values: c.not_values.clone(),
        }
    }
}

impl TryFrom<&config::AuthorizationPolicy> for Policy {
    type Error = PolicyError;

    /// Converts a loaded AuthorizationPolicy. Fails on a `from`/`to` entry without
    /// `source`/`operation`; everything else is checked by [`PolicySet::compile`].
    fn try_from(r: &config::AuthorizationPolicy) -> Result<Self, PolicyError> {
        let name = format!("{}/{}", r.metadata.namespace, r.metadata.name);
        let err = |field: String, message: &str| PolicyError {
            policy: name.clone(),
            field,
            message: message.to_owned(),
        };
        let mut rules = Vec::with_capacity(r.spec.rules.len());
        for (i, rule) in r.spec.rules.iter().enumerate() {
            let from = match &rule.from {
                None => None,
                Some(entries) => Some(
                    entries
                        .iter()
                        .enumerate()
                        .map(|(j, f)| {
                            f.source.as_ref().map(Source::from).ok_or_else(|| {
                                err(
                                    format!("rules[{i}].from[{j}]"),
                                    "a `from` entry needs a `source`",
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let to = match &rule.to {
                None => None,
                Some(entries) => Some(
                    entries
                        .iter()
                        .enumerate()
                        .map(|(j, t)| {
                            t.operation.as_ref().map(Operation::from).ok_or_else(|| {
                                err(
                                    format!("rules[{i}].to[{j}]"),
                                    "a `to` entry needs an `operation`",
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            rules.push(Rule {
                from,
                to,
                when: rule.when.iter().map(Condition::from).collect(),
            });
        }
        Ok(Policy {
            name: r.metadata.name.clone(),
            namespace: r.metadata.namespace.clone(),
            selector: r.spec.selector.as_ref().map(|s| s.match_labels.clone()),
            action: r.spec.action.unwrap_or_default().into(),
            rules: Some(rules),
            dry_run: r
                .metadata
                .annotations
                .get(DRY_RUN_ANNOTATION)
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            target_refs: r
                .spec
                .target_ref
                .iter()
                .chain(&r.spec.target_refs)
                .cloned()
                .collect(),
        })
    }
}

impl Workload {
    /// The workload `namespace` with `labels`, in `config`'s root namespace.
    pub fn in_config(
        config: &config::MeshConfig,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        Workload {
            namespace: namespace.to_owned(),
            labels: labels.clone(),
            root_namespace: config.root_namespace().to_owned(),
            ..Workload::default()
        }
    }
}

impl PolicySet {
    /// Compiles the AuthorizationPolicies of a loaded configuration that apply to the
    /// workload in `namespace` with `labels` (root-namespace, namespace and selector
    /// scope; `targetRefs` for Gateway API gateways).
    pub fn from_config(
        config: &config::MeshConfig,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Self, PolicyError> {
        let workload = Workload::in_config(config, namespace, labels);
        let policies = config
            .authorization_policies_for(namespace, labels)
            .into_iter()
            .map(Policy::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        PolicySet::for_workload(&policies, &workload)
    }
}
