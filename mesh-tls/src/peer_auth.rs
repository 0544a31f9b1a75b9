//! PeerAuthentication: which inbound connections must be mutual TLS.
//!
//! Input is a list of [`PeerAuthenticationPolicy`] (one per Istio `PeerAuthentication`
//! resource, already validated); [`PeerAuthentication::compile`] indexes them once
//! per configuration snapshot, [`PeerAuthentication::for_workload`] resolves them for
//! one workload (namespace + labels) into a [`WorkloadPeerAuthentication`], and
//! [`WorkloadPeerAuthentication::mode`] answers per connection with one hash lookup
//! on the port.
//!
//! Semantics (ISTIO.md §3, Istio's `ComposePeerAuthentication`):
//!
//! - PA-01 modes `STRICT`, `PERMISSIVE`, `DISABLE`, `UNSET` (inherit).
//! - PA-02 a policy without selector (or with empty `matchLabels`) in the root
//!   namespace is mesh-wide; without selector elsewhere it is namespace-wide; with a
//!   selector outside the root namespace it is workload-specific; with a selector in
//!   the root namespace it is ignored.
//! - PA-03 start PERMISSIVE, then apply mesh, namespace, workload modes that are not
//!   UNSET; the narrowest set mode wins.
//! - PA-04 several policies at the same level: the oldest (creation time, then
//!   configuration order, then namespace/name) is used, the others ignored.
//! - PA-05 `portLevelMtls` applies only to workload-specific policies; keys are
//!   workload (container) ports; an UNSET port entry takes the resolved workload mode.
//! - PA-06 no policy at all: PERMISSIVE.
//!
//! # Layer placement
//!
//! Not a layer: the inbound listener looks the mode up per accepted connection and
//! passes it to [`InboundAcceptor::accept`](crate::InboundAcceptor::accept).
//!
//! # Errors
//!
//! None: policies arrive validated (by `mesh_core::config`); compiling cannot fail.
//! A selector policy in the root namespace and `portLevelMtls` without a selector are
//! ignored, as Istio does.
//!
//! # Example
//!
//! ```
//! use mesh_tls::peer_auth::*;
//! use std::collections::BTreeMap;
//!
//! let policies = vec![
//!     PeerAuthenticationPolicy::new("istio-system", "default", MtlsMode::Strict),
//!     PeerAuthenticationPolicy::new("legacy", "default", MtlsMode::Permissive),
//! ];
//! let compiled = PeerAuthentication::compile("istio-system", policies);
//! let labels = BTreeMap::new();
//! assert_eq!(compiled.for_workload("production", &labels).mode(8080), PeerAuthMode::Strict);
//! assert_eq!(compiled.for_workload("legacy", &labels).mode(8080), PeerAuthMode::Permissive);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::SystemTime;

use mesh_core::Labels;

/// A PeerAuthentication mode as written in a policy (`mtls.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Inherit from the parent level (also what an absent `mtls` means).
    #[default]
    Unset,
    /// Plaintext only.
    Disable,
    /// mTLS and plaintext.
    Permissive,
    /// mTLS only.
    Strict,
}

impl MtlsMode {
    fn resolved(self) -> Option<PeerAuthMode> {
        match self {
            Self::Unset => None,
            Self::Disable => Some(PeerAuthMode::Disable),
            Self::Permissive => Some(PeerAuthMode::Permissive),
            Self::Strict => Some(PeerAuthMode::Strict),
        }
    }
}

/// The mode that applies to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerAuthMode {
    /// Plaintext only.
    Disable,
    /// mTLS and plaintext; plaintext has no identity.
    Permissive,
    /// mTLS only; plaintext is refused.
    Strict,
}

impl fmt::Display for PeerAuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disable => "DISABLE",
            Self::Permissive => "PERMISSIVE",
            Self::Strict => "STRICT",
        })
    }
}

/// One PeerAuthentication resource, in runtime form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthenticationPolicy {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `selector.matchLabels`; `None` or empty means namespace- or mesh-wide.
    pub selector: Option<Labels>,
    /// `mtls.mode`.
    pub mode: MtlsMode,
    /// `portLevelMtls`: workload port -> mode.
    pub port_level: BTreeMap<u16, MtlsMode>,
    /// `metadata.creationTimestamp`, when known; older wins among equals.
    pub created: Option<SystemTime>,
    /// Position in the configuration (tie-breaker, and the order when timestamps are absent).
    pub sequence: u64,
}

impl PeerAuthenticationPolicy {
    /// A namespace-wide (or, in the root namespace, mesh-wide) policy.
    pub fn new(namespace: &str, name: &str, mode: MtlsMode) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            selector: None,
            mode,
            port_level: BTreeMap::new(),
            created: None,
            sequence: 0,
        }
    }

    /// Sets the workload selector.
    #[must_use]
    pub fn with_selector(mut self, labels: Labels) -> Self {
        self.selector = Some(labels);
        self
    }

    /// Adds a `portLevelMtls` entry.
    #[must_use]
    pub fn with_port(mut self, port: u16, mode: MtlsMode) -> Self {
        self.port_level.insert(port, mode);
        self
    }

    /// Sets the creation time.
    #[must_use]
    pub fn created_at(mut self, created: SystemTime) -> Self {
        self.created = Some(created);
        self
    }

    /// Sets the position in the configuration.
    #[must_use]
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }

    fn has_selector(&self) -> bool {
        self.selector.as_ref().is_some_and(|s| !s.is_empty())
    }

    fn age_key(&self) -> (Option<SystemTime>, u64, &str, &str) {
        (self.created, self.sequence, &self.namespace, &self.name)
    }
}

#[derive(Debug, Default)]
struct NamespacePolicies {
    /// The oldest policy without selector.
    wide: Option<PeerAuthenticationPolicy>,
    /// Policies with a selector, oldest first.
    workload: Vec<PeerAuthenticationPolicy>,
}

/// All PeerAuthentication policies of a snapshot, indexed by namespace.
#[derive(Debug, Default)]
pub struct PeerAuthentication {
    root_namespace: String,
    namespaces: HashMap<String, NamespacePolicies>,
}

impl PeerAuthentication {
    /// Indexes `policies`; `root_namespace` is MeshConfig's `rootNamespace`
    /// (`istio-system` by default).
    pub fn compile(
        root_namespace: &str,
        policies: impl IntoIterator<Item = PeerAuthenticationPolicy>,
    ) -> Self {
        let mut policies: Vec<_> = policies.into_iter().collect();
        // `None` timestamps sort first; mixing is unusual (files have none, the API
        // server always sets them).
        policies.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let mut namespaces: HashMap<String, NamespacePolicies> = HashMap::new();
        for policy in policies {
            let in_root = policy.namespace == root_namespace;
            if policy.has_selector() && in_root {
                tracing::debug!(name = %policy.name, "PeerAuthentication with a selector in the root namespace is ignored");
                continue;
            }
            let entry = namespaces.entry(policy.namespace.clone()).or_default();
            if policy.has_selector() {
                entry.workload.push(policy);
            } else if entry.wide.is_none() {
                entry.wide = Some(policy);
            }
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            namespaces,
        }
    }

    /// Resolves the modes for the workload in `namespace` with `labels`.
    pub fn for_workload(&self, namespace: &str, labels: &Labels) -> WorkloadPeerAuthentication {
        let (mesh, ns, workload) = self.levels(namespace, labels);
        let mut mode = PeerAuthMode::Permissive;
        for policy in [mesh, ns, workload].into_iter().flatten() {
            if let Some(m) = policy.mode.resolved() {
                mode = m;
            }
        }
        let mut ports = HashMap::new();
        if let Some(policy) = workload {
            for (port, port_mode) in &policy.port_level {
                ports.insert(*port, port_mode.resolved().unwrap_or(mode));
            }
        }
        WorkloadPeerAuthentication { mode, ports }
    }

    /// The policy whose mode is in force for connections to `port` of the workload in
    /// `namespace` with `labels` (the narrowest level that sets a mode, PA-03, PA-05);
    /// `None` when no policy sets one (PERMISSIVE, PA-06). For tools that explain a
    /// [`for_workload`](Self::for_workload) result.
    pub fn deciding_policy(
        &self,
        namespace: &str,
        labels: &Labels,
        port: u16,
    ) -> Option<&PeerAuthenticationPolicy> {
        let (mesh, ns, workload) = self.levels(namespace, labels);
        if let Some(w) = workload
            && w.port_level
                .get(&port)
                .is_some_and(|m| m.resolved().is_some())
        {
            return Some(w);
        }
        [workload, ns, mesh]
            .into_iter()
            .flatten()
            .find(|p| p.mode.resolved().is_some())
    }

    /// The mesh-wide, namespace-wide and workload policies that apply to the workload
    /// in `namespace` with `labels`, the oldest at each level (PA-02, PA-04).
    #[allow(clippy::type_complexity)]
    fn levels(
        &self,
        namespace: &str,
        labels: &Labels,
    ) -> (
        Option<&PeerAuthenticationPolicy>,
        Option<&PeerAuthenticationPolicy>,
        Option<&PeerAuthenticationPolicy>,
    ) {
        let mesh = self
            .namespaces
            .get(&self.root_namespace)
            .and_then(|n| n.wide.as_ref());
        let ns = self.namespaces.get(namespace);
        let wide = ns
            .filter(|_| namespace != self.root_namespace)
            .and_then(|n| n.wide.as_ref());
        let workload = ns.and_then(|n| {
            n.workload.iter().find(|p| {
                p.selector
                    .as_ref()
                    .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
        });
        (mesh, wide, workload)
    }
}

/// The resolved modes of one workload: a default and per-port overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadPeerAuthentication {
    mode: PeerAuthMode,
    ports: HashMap<u16, PeerAuthMode>,
}

impl WorkloadPeerAuthentication {
    /// The same mode on every port.
    pub fn uniform(mode: PeerAuthMode) -> Self {
        Self {
            mode,
            ports: HashMap::new(),
        }
    }

    /// The mode for a connection to workload port `port`.
    pub fn mode(&self, port: u16) -> PeerAuthMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }

    /// The mode on ports without a `portLevelMtls` entry.
    pub fn default_mode(&self) -> PeerAuthMode {
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MtlsMode::*;
    use std::time::{Duration, UNIX_EPOCH};

    const ROOT: &str = "istio-system";

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn resolve(
        policies: Vec<PeerAuthenticationPolicy>,
        ns: &str,
        l: &Labels,
    ) -> WorkloadPeerAuthentication {
        PeerAuthentication::compile(ROOT, policies).for_workload(ns, l)
    }

    #[test]
    fn no_policy_is_permissive() {
        let w = resolve(vec![], "prod", &labels(&[]));
        assert_eq!(w.mode(80), PeerAuthMode::Permissive);
    }

    #[test]
    fn mesh_namespace_workload_narrowest_set_mode_wins() {
        let app = labels(&[("app", "orders")]);
        let mesh = PeerAuthenticationPolicy::new(ROOT, "mesh", Strict);
        let ns = PeerAuthenticationPolicy::new("prod", "ns", Permissive);
        let wl = PeerAuthenticationPolicy::new("prod", "wl", Disable)
            .with_selector(labels(&[("app", "orders")]));
        assert_eq!(
            resolve(vec![mesh.clone()], "prod", &app).mode(1),
            PeerAuthMode::Strict
        );
        assert_eq!(
            resolve(vec![mesh.clone(), ns.clone()], "prod", &app).mode(1),
            PeerAuthMode::Permissive
        );
        assert_eq!(
            resolve(vec![mesh.clone(), ns.clone(), wl.clone()], "prod", &app).mode(1),
            PeerAuthMode::Disable
        );
        // The workload policy does not apply to other workloads or namespaces.
        assert_eq!(
            resolve(
                vec![mesh.clone(), ns, wl.clone()],
                "prod",
                &labels(&[("app", "x")])
            )
            .mode(1),
            PeerAuthMode::Permissive
        );
        assert_eq!(
            resolve(vec![mesh, wl], "staging", &app).mode(1),
            PeerAuthMode::Strict
        );
    }

    #[test]
    fn unset_inherits_from_the_parent_level() {
        let app = labels(&[("app", "orders")]);
        let policies = vec![
            PeerAuthenticationPolicy::new(ROOT, "mesh", Strict),
            PeerAuthenticationPolicy::new("prod", "ns", Unset),
            PeerAuthenticationPolicy::new("prod", "wl", Unset).with_selector(app.clone()),
        ];
        assert_eq!(
            resolve(policies, "prod", &app).mode(1),
            PeerAuthMode::Strict
        );
        let only_unset = vec![PeerAuthenticationPolicy::new(ROOT, "mesh", Unset)];
        assert_eq!(
            resolve(only_unset, "prod", &app).mode(1),
            PeerAuthMode::Permissive
        );
    }

    #[test]
    fn selector_in_root_namespace_is_ignored() {
        let app = labels(&[("app", "orders")]);
        let policies =
            vec![PeerAuthenticationPolicy::new(ROOT, "sel", Disable).with_selector(app.clone())];
        assert_eq!(
            resolve(policies.clone(), "prod", &app).mode(1),
            PeerAuthMode::Permissive
        );
        assert_eq!(
            resolve(policies, ROOT, &app).mode(1),
            PeerAuthMode::Permissive
        );
    }

    #[test]
    fn empty_match_labels_means_namespace_wide() {
        let policies =
            vec![PeerAuthenticationPolicy::new("prod", "ns", Strict).with_selector(Labels::new())];
        assert_eq!(
            resolve(policies, "prod", &labels(&[("a", "b")])).mode(1),
            PeerAuthMode::Strict
        );
    }

    #[test]
    fn oldest_wins_among_equals() {
        let app = labels(&[("app", "orders")]);
        let newer = PeerAuthenticationPolicy::new("prod", "a-newer", Disable).created_at(at(200));
        let older = PeerAuthenticationPolicy::new("prod", "z-older", Strict).created_at(at(100));
        assert_eq!(
            resolve(vec![newer.clone(), older.clone()], "prod", &app).mode(1),
            PeerAuthMode::Strict
        );
        assert_eq!(
            resolve(vec![older, newer], "prod", &app).mode(1),
            PeerAuthMode::Strict
        );

        let wl_newer = PeerAuthenticationPolicy::new("prod", "w1", Disable)
            .with_selector(app.clone())
            .created_at(at(20));
        let wl_older = PeerAuthenticationPolicy::new("prod", "w2", Permissive)
            .with_selector(labels(&[("app", "orders")]))
            .created_at(at(10));
        assert_eq!(
            resolve(vec![wl_newer, wl_older], "prod", &app).mode(1),
            PeerAuthMode::Permissive
        );

        // Equal timestamps: configuration order decides, then name.
        let first = PeerAuthenticationPolicy::new(ROOT, "b", Strict).with_sequence(1);
        let second = PeerAuthenticationPolicy::new(ROOT, "a", Disable).with_sequence(2);
        assert_eq!(
            resolve(vec![second, first], "prod", &app).mode(1),
            PeerAuthMode::Strict
        );
    }

    #[test]
    fn port_level_mtls_overrides_and_unset_port_inherits() {
        let app = labels(&[("app", "orders")]);
        let policies = vec![
            PeerAuthenticationPolicy::new(ROOT, "mesh", Strict),
            PeerAuthenticationPolicy::new("prod", "wl", Unset)
                .with_selector(app.clone())
                .with_port(8080, Disable)
                .with_port(9090, Unset)
                .with_port(9091, Permissive),
        ];
        let w = resolve(policies, "prod", &app);
        assert_eq!(w.mode(8080), PeerAuthMode::Disable);
        assert_eq!(w.mode(9090), PeerAuthMode::Strict);
        assert_eq!(w.mode(9091), PeerAuthMode::Permissive);
        assert_eq!(w.mode(443), PeerAuthMode::Strict);
        assert_eq!(w.default_mode(), PeerAuthMode::Strict);
    }

    #[test]
    fn port_level_mtls_without_selector_is_ignored() {
        let policies =
            vec![PeerAuthenticationPolicy::new("prod", "ns", Strict).with_port(8080, Disable)];
        let w = resolve(policies, "prod", &labels(&[]));
        assert_eq!(w.mode(8080), PeerAuthMode::Strict);
    }

    #[test]
    fn deciding_policy_names_the_narrowest_level_that_sets_the_mode() {
        let app = labels(&[("app", "orders")]);
        let compiled = PeerAuthentication::compile(
            ROOT,
            vec![
                PeerAuthenticationPolicy::new(ROOT, "mesh", Strict),
                PeerAuthenticationPolicy::new("prod", "ns", Unset),
                PeerAuthenticationPolicy::new("prod", "wl", Unset)
                    .with_selector(app.clone())
                    .with_port(8080, Disable),
            ],
        );
        let name = |ns: &str, l: &Labels, port: u16| {
            compiled
                .deciding_policy(ns, l, port)
                .map(|p| p.name.clone())
        };
        assert_eq!(name("prod", &app, 8080).as_deref(), Some("wl"));
        assert_eq!(name("prod", &app, 9090).as_deref(), Some("mesh"));
        assert_eq!(name("prod", &labels(&[]), 8080).as_deref(), Some("mesh"));
        let none = PeerAuthentication::compile(ROOT, Vec::new());
        assert!(none.deciding_policy("prod", &app, 8080).is_none());
    }
}
