//! DestinationRule subsets: named label selections of a host's endpoints, each with the
//! traffic policy that applies to it.

use std::collections::HashMap;
use std::sync::Arc;

use mesh_core::Labels;

/// The traffic policy resolved for one destination (host, subset, port).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolvedPolicy {}

/// One subset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subset {
    /// `name`.
    pub name: String,
    /// `labels`: endpoints must carry all of them.
    pub labels: Labels,
}

/// The DestinationRule of one host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DestinationRule {
    /// Subsets by name.
    pub subsets: Vec<Subset>,
}

impl DestinationRule {
    /// The subset named `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for traffic to `port` of `subset` (or of the host when `None`).
    pub fn resolve(&self, _subset: Option<&str>, _port: u16) -> ResolvedPolicy {
        ResolvedPolicy {}
    }
}

/// DestinationRules by fully qualified host.
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

    /// The rule of `host`.
    pub fn get(&self, host: &str) -> Option<&DestinationRule> {
        self.rules.get(host).map(|r| &**r)
    }
}
