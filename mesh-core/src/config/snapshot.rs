//! [`MeshConfig`]: the indexed snapshot of one load.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::WorkloadSelector;
use super::diagnostic::Diagnostic;
use super::load::{Fnv, LoadOptions, LoadReport, load_paths, load_str};
use super::{
    AnyResource, AuthorizationPolicy, DestinationRule, Gateway, Kind, Labels, PeerAuthentication,
    PolicyTargetReference, RequestAuthentication, ServiceEntry, Sidecar, Subset, Telemetry,
    VirtualService, WorkloadEntryResource, select_sidecar,
};

/// All resources of one successful load, indexed by host, by namespace and by workload
/// selector, with a content version.
///
/// Hosts in the indexes are qualified ([`super::qualify_host`]) with the namespace of the
/// resource that names them. When the same `Kind/namespace/name` is defined twice, the later
/// definition replaces the earlier one (as `kubectl apply` would) and the load warns.
///
/// A ServiceEntry with a `workloadSelector` gets, as its `endpoints`, the WorkloadEntries
/// of its namespace whose labels include the selector's (Istio's serviceentry controller
/// does the same; the selected entries' names, in name order, are its endpoints' order).
/// [`MeshConfig::to_yaml`] writes such an entry as it was written, without them.
#[derive(Debug, Clone, Default)]
pub struct MeshConfig {
    version: u64,
    root_namespace: String,
    virtual_services: Vec<VirtualService>,
    destination_rules: Vec<DestinationRule>,
    gateways: Vec<Gateway>,
    service_entries: Vec<ServiceEntry>,
    workload_entries: Vec<WorkloadEntryResource>,
    sidecars: Vec<Sidecar>,
    /// Oldest first (creation timestamp, then load order).
    peer_authentications: Vec<PeerAuthentication>,
    authorization_policies: Vec<AuthorizationPolicy>,
    request_authentications: Vec<RequestAuthentication>,
    /// Gateway API resources as written; the Istio Gateways and VirtualServices generated
    /// from them are in `gateways` and `virtual_services`.
    gateway_api: GatewayApiResources,
    telemetries: Vec<Telemetry>,
    vs_by_host: HostIndex,
    dr_by_host: HostIndex,
    se_by_host: HostIndex,
    by_namespace: BTreeMap<String, NamespaceIndex>,
}

/// The Kubernetes Gateway API resources of a snapshot.
#[derive(Debug, Clone, Default)]
struct GatewayApiResources {
    gateways: Vec<super::KubernetesGateway>,
    http_routes: Vec<super::HttpRouteResource>,
    grpc_routes: Vec<super::GrpcRouteResource>,
    reference_grants: Vec<super::ReferenceGrant>,
    /// How many of the snapshot's Gateways and VirtualServices were written (the rest
    /// are generated from the resources above).
    written_gateways: usize,
    written_virtual_services: usize,
}

/// Resources by qualified host: exact names in a map, wildcard patterns (`*`,
/// `*.example.com`) in a list ordered from the most to the least specific.
#[derive(Debug, Clone, Default)]
struct HostIndex {
    exact: HashMap<String, Vec<usize>>,
    wildcards: Vec<(String, Vec<usize>)>,
}

impl HostIndex {
    fn insert(&mut self, host: String, i: usize) {
        if host.starts_with('*') {
            match self.wildcards.iter_mut().find(|(h, _)| *h == host) {
                Some((_, v)) => v.push(i),
                None => self.wildcards.push((host, vec![i])),
            }
        } else {
            self.exact.entry(host).or_default().push(i);
        }
    }

    fn finish(&mut self) {
        // Most specific (longest) wildcard first; ties by name for a stable order.
        self.wildcards
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    }

    /// Exact matches first, then covering wildcards, without repeats.
    fn lookup(&self, host: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self.exact.get(host).cloned().unwrap_or_default();
        for (pattern, v) in &self.wildcards {
            if pattern == host || wildcard_covers(pattern, host) {
                for &i in v {
                    if !out.contains(&i) {
                        out.push(i);
                    }
                }
            }
        }
        out
    }
}

/// Indices of the resources of one namespace.
#[derive(Debug, Clone, Default)]
struct NamespaceIndex {
    virtual_services: Vec<usize>,
    destination_rules: Vec<usize>,
    gateways: Vec<usize>,
    service_entries: Vec<usize>,
    workload_entries: Vec<usize>,
    sidecars: Vec<usize>,
    peer_authentications: Vec<usize>,
    authorization_policies: Vec<usize>,
    request_authentications: Vec<usize>,
}

/// Which workloads a policy applies to: its `selector` (none: every workload of its
/// namespace, or of the mesh from the root namespace), or its target references, which
/// replace the selector (validation refuses both).
struct Scope<'a, R> {
    selector: Option<&'a WorkloadSelector>,
    refs: R,
    namespace: &'a str,
}

impl<'a, R: Iterator<Item = &'a PolicyTargetReference>> Scope<'a, R> {
    fn takes(self, root_namespace: &str, namespace: &str, labels: &Labels) -> bool {
        let mut refs = self.refs.peekable();
        if refs.peek().is_some() {
            return refs.any(|r| r.selects(self.namespace, root_namespace, namespace, labels));
        }
        self.selector.is_none_or(|s| s.matches(labels))
    }
}

impl MeshConfig {
    /// Loads and validates `paths`; on success the snapshot and the report (with warnings
    /// and notes), otherwise every error.
    pub fn load<P: AsRef<Path>>(
        paths: &[P],
        options: &LoadOptions,
    ) -> Result<(MeshConfig, LoadReport), Vec<Diagnostic>> {
        let report = load_paths(paths, options);
        let config = MeshConfig::from_report(&report, options)?;
        Ok((config, report))
    }

    /// Like [`MeshConfig::load`] for YAML text named `name` in diagnostics.
    pub fn from_yaml_str(
        name: impl Into<std::path::PathBuf>,
        yaml: &str,
        options: &LoadOptions,
    ) -> Result<(MeshConfig, LoadReport), Vec<Diagnostic>> {
        let report = load_str(name, yaml, options);
        let config = MeshConfig::from_report(&report, options)?;
        Ok((config, report))
    }

    /// Builds the snapshot of a report; fails with the report's errors if it has any.
    pub fn from_report(
        report: &LoadReport,
        options: &LoadOptions,
    ) -> Result<MeshConfig, Vec<Diagnostic>> {
        if report.has_errors() {
            return Err(report.errors().cloned().collect());
        }
        // The report's version already hashes the documents' text.
        Ok(MeshConfig::assemble(
            report.resources.clone(),
            options,
            Some(report.version),
        ))
    }

    /// Builds the snapshot of resources that were validated one by one (for example
    /// objects read from the Kubernetes API); nothing is validated here. When the same
    /// `Kind/namespace/name` appears twice, the later one replaces the earlier one. The
    /// version is a hash of the resources' content.
    pub fn from_resources(resources: Vec<AnyResource>, options: &LoadOptions) -> MeshConfig {
        MeshConfig::assemble(resources, options, None)
    }

    /// The snapshot of `resources`, versioned `version`, or by a hash of the resources
    /// kept when `None`.
    fn assemble(
        resources: Vec<AnyResource>,
        options: &LoadOptions,
        version: Option<u64>,
    ) -> MeshConfig {
        // Later definitions of the same Kind/namespace/name replace earlier ones.
        let mut last: HashMap<(Kind, String, String), usize> = HashMap::new();
        for (i, r) in resources.iter().enumerate() {
            let m = r.metadata();
            last.insert((r.kind(), m.namespace.clone(), m.name.clone()), i);
        }
        let mut hash = Fnv::new();
        let mut c = MeshConfig {
            root_namespace: options.root_namespace.clone(),
            ..MeshConfig::default()
        };
        for (i, r) in resources.into_iter().enumerate() {
            let m = r.metadata();
            if last.get(&(r.kind(), m.namespace.clone(), m.name.clone())) != Some(&i) {
                continue;
            }
            if version.is_none() {
                hash.write(format!("{r:?}").as_bytes());
            }
            match r {
                AnyResource::VirtualService(v) => c.virtual_services.push(v),
                AnyResource::DestinationRule(v) => c.destination_rules.push(v),
                AnyResource::Gateway(v) => c.gateways.push(v),
                AnyResource::ServiceEntry(v) => c.service_entries.push(v),
                AnyResource::WorkloadEntry(v) => c.workload_entries.push(v),
                AnyResource::Sidecar(v) => c.sidecars.push(v),
                AnyResource::PeerAuthentication(v) => c.peer_authentications.push(v),
                AnyResource::AuthorizationPolicy(v) => c.authorization_policies.push(v),
                AnyResource::RequestAuthentication(v) => c.request_authentications.push(v),
                AnyResource::KubernetesGateway(v) => c.gateway_api.gateways.push(v),
                AnyResource::HttpRoute(v) => c.gateway_api.http_routes.push(v),
                AnyResource::GrpcRoute(v) => c.gateway_api.grpc_routes.push(v),
                AnyResource::ReferenceGrant(v) => c.gateway_api.reference_grants.push(v),
                AnyResource::Telemetry(v) => c.telemetries.push(v),
            }
        }
        c.version = version.unwrap_or_else(|| hash.finish());
        c.peer_authentications.sort_by_key(|p| p.age_key());
        c.select_workload_entries();
        c.translate_gateway_api();
        c.index();
        c
    }

    /// Adds the Istio Gateways and VirtualServices the Gateway API resources stand for,
    /// after the written ones (so a written VirtualService for the same mesh host comes
    /// first; the load warns about it).
    fn translate_gateway_api(&mut self) {
        self.gateway_api.written_gateways = self.gateways.len();
        self.gateway_api.written_virtual_services = self.virtual_services.len();
        let g = &self.gateway_api;
        if g.gateways.is_empty() && g.http_routes.is_empty() && g.grpc_routes.is_empty() {
            return;
        }
        let services: std::collections::HashSet<String> = self
            .service_entries
            .iter()
            .flat_map(|se| se.spec.hosts.iter().map(|h| se.qualify(h)))
            .collect();
        let out = super::gateway_api::translate(&super::gateway_api::Input {
            gateways: &g.gateways,
            http_routes: &g.http_routes,
            grpc_routes: &g.grpc_routes,
            grants: &g.reference_grants,
            services: &services,
        });
        self.gateways.extend(out.gateways);
        self.virtual_services.extend(out.virtual_services);
    }

    /// The Gateway API Gateways, as written.
    pub fn kubernetes_gateways(&self) -> &[super::KubernetesGateway] {
        &self.gateway_api.gateways
    }

    /// The HTTPRoutes, as written.
    pub fn http_routes(&self) -> &[super::HttpRouteResource] {
        &self.gateway_api.http_routes
    }

    /// The GRPCRoutes, as written.
    pub fn grpc_routes(&self) -> &[super::GrpcRouteResource] {
        &self.gateway_api.grpc_routes
    }

    /// The ReferenceGrants, as written.
    pub fn reference_grants(&self) -> &[super::ReferenceGrant] {
        &self.gateway_api.reference_grants
    }

    /// Gives each ServiceEntry with a `workloadSelector` the WorkloadEntries of its
    /// namespace that it selects, as endpoints (validation forbids writing both).
    fn select_workload_entries(&mut self) {
        if self.workload_entries.is_empty() {
            return;
        }
        let mut entries: Vec<&WorkloadEntryResource> = self.workload_entries.iter().collect();
        entries.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        for se in &mut self.service_entries {
            let Some(sel) = &se.spec.workload_selector else {
                continue;
            };
            // An empty selector selects nothing here (see the module docs of `config`).
            if !se.spec.endpoints.is_empty() || sel.labels.is_empty() {
                continue;
            }
            se.spec.endpoints = entries
                .iter()
                .filter(|we| we.metadata.namespace == se.metadata.namespace)
                .filter(|we| {
                    sel.labels
                        .iter()
                        .all(|(k, v)| we.spec.labels.get(k) == Some(v))
                })
                .map(|we| we.spec.clone())
                .collect();
        }
    }

    /// The snapshot as a proxy in `namespace` sees it (SR-30): the VirtualServices,
    /// DestinationRules and ServiceEntries not exported to `namespace` are left out
    /// (see [`exported`](super::exported)). The version stays; when every resource is
    /// exported there, this snapshot itself.
    pub fn exported_to(&self, namespace: &str) -> std::borrow::Cow<'_, MeshConfig> {
        let to = |export_to: &[String], own: &str| super::exported(export_to, own, namespace);
        let hidden = self
            .virtual_services
            .iter()
            .any(|r| !to(&r.spec.export_to, &r.metadata.namespace))
            || self
                .destination_rules
                .iter()
                .any(|r| !to(&r.spec.export_to, &r.metadata.namespace))
            || self
                .service_entries
                .iter()
                .any(|r| !to(&r.spec.export_to, &r.metadata.namespace));
        if !hidden {
            return std::borrow::Cow::Borrowed(self);
        }
        let mut c = self.clone();
        c.virtual_services
            .retain(|r| to(&r.spec.export_to, &r.metadata.namespace));
        c.destination_rules
            .retain(|r| to(&r.spec.export_to, &r.metadata.namespace));
        c.service_entries
            .retain(|r| to(&r.spec.export_to, &r.metadata.namespace));
        c.vs_by_host = HostIndex::default();
        c.dr_by_host = HostIndex::default();
        c.se_by_host = HostIndex::default();
        c.by_namespace = BTreeMap::new();
        c.index();
        std::borrow::Cow::Owned(c)
    }

    fn index(&mut self) {
        for (i, vs) in self.virtual_services.iter().enumerate() {
            for h in &vs.spec.hosts {
                self.vs_by_host.insert(vs.qualify(h), i);
            }
            self.by_namespace
                .entry(vs.metadata.namespace.clone())
                .or_default()
                .virtual_services
                .push(i);
        }
        for (i, dr) in self.destination_rules.iter().enumerate() {
            self.dr_by_host.insert(dr.qualify(&dr.spec.host), i);
            self.by_namespace
                .entry(dr.metadata.namespace.clone())
                .or_default()
                .destination_rules
                .push(i);
        }
        for (i, se) in self.service_entries.iter().enumerate() {
            for h in &se.spec.hosts {
                self.se_by_host.insert(se.qualify(h), i);
            }
            self.by_namespace
                .entry(se.metadata.namespace.clone())
                .or_default()
                .service_entries
                .push(i);
        }
        self.vs_by_host.finish();
        self.dr_by_host.finish();
        self.se_by_host.finish();
        for (i, w) in self.workload_entries.iter().enumerate() {
            self.by_namespace
                .entry(w.metadata.namespace.clone())
                .or_default()
                .workload_entries
                .push(i);
        }
        for (i, s) in self.sidecars.iter().enumerate() {
            self.by_namespace
                .entry(s.metadata.namespace.clone())
                .or_default()
                .sidecars
                .push(i);
        }
        for (i, g) in self.gateways.iter().enumerate() {
            self.by_namespace
                .entry(g.metadata.namespace.clone())
                .or_default()
                .gateways
                .push(i);
        }
        for (i, p) in self.peer_authentications.iter().enumerate() {
            self.by_namespace
                .entry(p.metadata.namespace.clone())
                .or_default()
                .peer_authentications
                .push(i);
        }
        for (i, p) in self.authorization_policies.iter().enumerate() {
            self.by_namespace
                .entry(p.metadata.namespace.clone())
                .or_default()
                .authorization_policies
                .push(i);
        }
        for (i, p) in self.request_authentications.iter().enumerate() {
            self.by_namespace
                .entry(p.metadata.namespace.clone())
                .or_default()
                .request_authentications
                .push(i);
        }
    }

    /// Every resource as it was written (ServiceEntries without the endpoints selected
    /// from WorkloadEntries), by kind in the order of [`Kind::ALL`]: what loading them
    /// again, or sending them to a proxy, needs.
    pub fn resources(&self) -> Vec<AnyResource> {
        let mut all: Vec<AnyResource> = Vec::new();
        all.extend(
            self.written_virtual_services()
                .iter()
                .cloned()
                .map(AnyResource::VirtualService),
        );
        all.extend(
            self.destination_rules
                .iter()
                .cloned()
                .map(AnyResource::DestinationRule),
        );
        all.extend(
            self.written_gateways()
                .iter()
                .cloned()
                .map(AnyResource::Gateway),
        );
        all.extend(self.service_entries.iter().map(|se| {
            let mut se = se.clone();
            if se.spec.workload_selector.is_some() {
                se.spec.endpoints.clear();
            }
            AnyResource::ServiceEntry(se)
        }));
        all.extend(
            self.workload_entries
                .iter()
                .cloned()
                .map(AnyResource::WorkloadEntry),
        );
        all.extend(self.sidecars.iter().cloned().map(AnyResource::Sidecar));
        all.extend(
            self.peer_authentications
                .iter()
                .cloned()
                .map(AnyResource::PeerAuthentication),
        );
        all.extend(
            self.authorization_policies
                .iter()
                .cloned()
                .map(AnyResource::AuthorizationPolicy),
        );
        all.extend(
            self.request_authentications
                .iter()
                .cloned()
                .map(AnyResource::RequestAuthentication),
        );
        let g = &self.gateway_api;
        all.extend(
            g.gateways
                .iter()
                .cloned()
                .map(AnyResource::KubernetesGateway),
        );
        all.extend(g.http_routes.iter().cloned().map(AnyResource::HttpRoute));
        all.extend(g.grpc_routes.iter().cloned().map(AnyResource::GrpcRoute));
        all.extend(
            g.reference_grants
                .iter()
                .cloned()
                .map(AnyResource::ReferenceGrant),
        );
        all.extend(self.telemetries.iter().cloned().map(AnyResource::Telemetry));
        all
    }

    /// The Gateways written as Istio Gateways (without those generated from the Gateway
    /// API).
    fn written_gateways(&self) -> &[Gateway] {
        &self.gateways[..self.gateway_api.written_gateways.min(self.gateways.len())]
    }

    /// The VirtualServices written as such (without those generated from routes).
    fn written_virtual_services(&self) -> &[VirtualService] {
        let n = self.gateway_api.written_virtual_services;
        &self.virtual_services[..n.min(self.virtual_services.len())]
    }

    /// Every resource as a multi-document Istio YAML stream (for `/config_dump`); loading
    /// it gives the same resources back.
    pub fn to_yaml(&self) -> Result<String, serde_saphyr::SerializeError> {
        fn push<T: serde::Serialize>(
            out: &mut String,
            items: &[T],
        ) -> Result<(), serde_saphyr::SerializeError> {
            for item in items {
                if !out.is_empty() {
                    out.push_str("---\n");
                }
                out.push_str(&serde_saphyr::to_string(item)?);
            }
            Ok(())
        }
        let mut out = String::new();
        push(&mut out, self.written_gateways())?;
        push(&mut out, self.written_virtual_services())?;
        push(&mut out, &self.destination_rules)?;
        // Endpoints selected from WorkloadEntries are not written: the entry is dumped as
        // written, and the WorkloadEntries after it.
        let written: Vec<ServiceEntry> = self
            .service_entries
            .iter()
            .map(|se| {
                let mut se = se.clone();
                if se.spec.workload_selector.is_some() {
                    se.spec.endpoints.clear();
                }
                se
            })
            .collect();
        push(&mut out, &written)?;
        push(&mut out, &self.workload_entries)?;
        push(&mut out, &self.sidecars)?;
        push(&mut out, &self.peer_authentications)?;
        push(&mut out, &self.authorization_policies)?;
        push(&mut out, &self.request_authentications)?;
        push(&mut out, &self.gateway_api.gateways)?;
        push(&mut out, &self.gateway_api.http_routes)?;
        push(&mut out, &self.gateway_api.grpc_routes)?;
        push(&mut out, &self.gateway_api.reference_grants)?;
        push(&mut out, &self.telemetries)?;
        Ok(out)
    }

    /// Content version of the load (a hash of the documents' text).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The root namespace (mesh-wide policies), from [`LoadOptions::root_namespace`].
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// All VirtualServices, in load order.
    pub fn virtual_services(&self) -> &[VirtualService] {
        &self.virtual_services
    }

    /// All DestinationRules, in load order.
    pub fn destination_rules(&self) -> &[DestinationRule] {
        &self.destination_rules
    }

    /// All Gateways, in load order.
    pub fn gateways(&self) -> &[Gateway] {
        &self.gateways
    }

    /// All ServiceEntries, in load order.
    pub fn service_entries(&self) -> &[ServiceEntry] {
        &self.service_entries
    }

    /// All WorkloadEntries, in load order.
    pub fn workload_entries(&self) -> &[WorkloadEntryResource] {
        &self.workload_entries
    }

    /// All Sidecars, in load order.
    pub fn sidecars(&self) -> &[Sidecar] {
        &self.sidecars
    }

    /// The Sidecar that applies to a workload (not a gateway) in `namespace` with
    /// `labels` (ISTIO.md SR-33): one of its namespace whose `workloadSelector` matches,
    /// else the selector-less one of its namespace, else the selector-less one of
    /// `root_namespace`; the oldest among several. `None`: the workload imports
    /// everything visible to its namespace.
    pub fn sidecar_for(
        &self,
        namespace: &str,
        labels: &Labels,
        root_namespace: &str,
    ) -> Option<&Sidecar> {
        let in_ns = |ns: &str| {
            self.by_namespace
                .get(ns)
                .into_iter()
                .flat_map(|n| n.sidecars.iter().map(|&i| &self.sidecars[i]))
        };
        let root = (namespace != root_namespace)
            .then(|| in_ns(root_namespace))
            .into_iter()
            .flatten();
        select_sidecar(
            in_ns(namespace).chain(root),
            namespace,
            labels,
            root_namespace,
        )
    }

    /// All PeerAuthentications, OLDEST FIRST (creation timestamp, then load order), which
    /// is the order "oldest wins" needs (ISTIO.md PA-04).
    pub fn peer_authentications(&self) -> &[PeerAuthentication] {
        &self.peer_authentications
    }

    /// All AuthorizationPolicies, in load order.
    pub fn authorization_policies(&self) -> &[AuthorizationPolicy] {
        &self.authorization_policies
    }

    /// All Telemetry resources, in load order.
    pub fn telemetries(&self) -> &[Telemetry] {
        &self.telemetries
    }

    /// All RequestAuthentications, in load order.
    pub fn request_authentications(&self) -> &[RequestAuthentication] {
        &self.request_authentications
    }

    /// Namespaces that have at least one resource.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.by_namespace.keys().map(String::as_str)
    }

    /// VirtualServices whose hosts cover `host` (a qualified name such as
    /// `reviews.default.svc.cluster.local`, or an external name): exact host matches first,
    /// then wildcard hosts (`*.example.com`, `*`) from the most to the least specific.
    /// Gateway binding (`spec.gateways`) is not considered here.
    pub fn virtual_services_for_host(&self, host: &str) -> Vec<&VirtualService> {
        self.lookup_host(&self.vs_by_host, host)
            .into_iter()
            .map(|i| &self.virtual_services[i])
            .collect()
    }

    /// VirtualServices bound to the gateway `namespace/name` (listed in `spec.gateways`,
    /// with unqualified names read in the VirtualService's namespace).
    pub fn virtual_services_for_gateway(
        &self,
        namespace: &str,
        name: &str,
    ) -> Vec<&VirtualService> {
        self.virtual_services
            .iter()
            .filter(|vs| {
                vs.spec.gateways.iter().any(|g| match g.split_once('/') {
                    Some((ns, n)) => ns == namespace && n == name,
                    None => g == name && vs.metadata.namespace == namespace,
                })
            })
            .collect()
    }

    /// VirtualServices that apply to sidecars (`gateways` empty or containing `mesh`).
    pub fn mesh_virtual_services(&self) -> impl Iterator<Item = &VirtualService> {
        self.virtual_services.iter().filter(|vs| {
            vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh")
        })
    }

    /// The DestinationRule that applies to traffic from `client_namespace` to `host`:
    /// among rules for the host (exact before wildcard, most specific wildcard first), one in
    /// the client's namespace wins, then one in the host's own namespace, then one in the
    /// root namespace, then the first loaded. Rules with a `workloadSelector` are left
    /// out (see [`destination_rule_for_workload`](Self::destination_rule_for_workload)).
    pub fn destination_rule_for(
        &self,
        host: &str,
        client_namespace: &str,
    ) -> Option<&DestinationRule> {
        self.destination_rule_for_workload(host, client_namespace, None)
    }

    /// [`destination_rule_for`](Self::destination_rule_for) for a client whose labels
    /// are `client_labels`: a rule of the client's namespace whose `workloadSelector`
    /// selects them comes first (DR-06); rules with a selector apply to no other client,
    /// nor to any client when the labels are not known (`None`).
    pub fn destination_rule_for_workload(
        &self,
        host: &str,
        client_namespace: &str,
        client_labels: Option<&Labels>,
    ) -> Option<&DestinationRule> {
        let candidates = self.lookup_host(&self.dr_by_host, host);
        let selected = candidates.iter().copied().find(|&i| {
            let dr = &self.destination_rules[i];
            dr.metadata.namespace == client_namespace
                && dr.spec.workload_selector.as_ref().is_some_and(|sel| {
                    !sel.match_labels.is_empty() && client_labels.is_some_and(|l| sel.matches(l))
                })
        });
        if let Some(i) = selected {
            return Some(&self.destination_rules[i]);
        }
        let candidates: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| {
                self.destination_rules[i]
                    .spec
                    .workload_selector
                    .as_ref()
                    .is_none_or(|sel| sel.match_labels.is_empty())
            })
            .collect();
        let host_ns = host_namespace(host);
        let pick = |ns: &str| {
            candidates
                .iter()
                .copied()
                .find(|&i| self.destination_rules[i].metadata.namespace == ns)
        };
        pick(client_namespace)
            .or_else(|| host_ns.and_then(pick))
            .or_else(|| pick(&self.root_namespace))
            .or_else(|| candidates.first().copied())
            .map(|i| &self.destination_rules[i])
    }

    /// The subset `name` of `host` as seen from `client_namespace`.
    pub fn subset(&self, host: &str, client_namespace: &str, name: &str) -> Option<&Subset> {
        self.destination_rule_for(host, client_namespace)?
            .spec
            .subsets
            .iter()
            .find(|s| s.name == name)
    }

    /// ServiceEntries that declare `host`.
    pub fn service_entries_for_host(&self, host: &str) -> Vec<&ServiceEntry> {
        self.lookup_host(&self.se_by_host, host)
            .into_iter()
            .map(|i| &self.service_entries[i])
            .collect()
    }

    /// The gateway `namespace/name`.
    pub fn gateway(&self, namespace: &str, name: &str) -> Option<&Gateway> {
        self.by_namespace
            .get(namespace)?
            .gateways
            .iter()
            .map(|&i| &self.gateways[i])
            .find(|g| g.metadata.name == name)
    }

    /// Gateways whose selector matches a gateway proxy's labels.
    pub fn gateways_for_labels(&self, labels: &Labels) -> Vec<&Gateway> {
        self.gateways
            .iter()
            .filter(|g| {
                g.spec
                    .selector
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect()
    }

    /// PeerAuthentications that may apply to a workload, oldest first: mesh-wide ones (root
    /// namespace, no selector), namespace-wide ones, and those whose selector matches
    /// `labels`. Resolution by scope (PA-03) is the caller's.
    pub fn peer_authentications_for(
        &self,
        namespace: &str,
        labels: &Labels,
    ) -> Vec<&PeerAuthentication> {
        self.peer_authentications
            .iter()
            .filter(|p| {
                let ns = p.metadata.namespace.as_str();
                match &p.spec.selector {
                    None => ns == self.root_namespace || ns == namespace,
                    // Selector policies in the root namespace are ignored (PA-02).
                    Some(sel) => {
                        ns == namespace && ns != self.root_namespace && sel.matches(labels)
                    }
                }
            })
            .collect()
    }

    /// AuthorizationPolicies that apply to a workload in `namespace` with `labels`:
    /// policies of that namespace without selector or whose selector matches, and policies
    /// of the root namespace (mesh-wide, or selecting by labels in every namespace).
    /// A policy with `targetRef`/`targetRefs` applies to the Gateway API gateways they
    /// name ([`PolicyTargetReference::selects`]).
    pub fn authorization_policies_for(
        &self,
        namespace: &str,
        labels: &Labels,
    ) -> Vec<&AuthorizationPolicy> {
        self.selected_for(
            namespace,
            labels,
            |idx| &idx.authorization_policies,
            &self.authorization_policies,
            |p| Scope {
                selector: p.spec.selector.as_ref(),
                refs: p.spec.target_ref.iter().chain(&p.spec.target_refs),
                namespace: &p.metadata.namespace,
            },
        )
    }

    /// RequestAuthentications that apply to a workload in `namespace` with `labels`
    /// (ISTIO.md RA-01), in load order: those of that namespace without selector or whose
    /// selector matches, and those of the root namespace (mesh-wide, or selecting by labels
    /// in every namespace). A policy with `targetRef`/`targetRefs` applies to the Gateway
    /// API gateways they name ([`PolicyTargetReference::selects`]).
    pub fn request_authentications_for(
        &self,
        namespace: &str,
        labels: &Labels,
    ) -> Vec<&RequestAuthentication> {
        self.selected_for(
            namespace,
            labels,
            |idx| &idx.request_authentications,
            &self.request_authentications,
            |p| Scope {
                selector: p.spec.selector.as_ref(),
                refs: p.spec.target_ref.iter().chain(&p.spec.target_refs),
                namespace: &p.metadata.namespace,
            },
        )
    }

    /// The policies of `items` (indexed per namespace by `index`) that apply to a
    /// workload in `namespace` with `labels`: those of its namespace and of the root
    /// namespace whose [`Scope`] takes it.
    fn selected_for<'a, 'r, T, R>(
        &'a self,
        namespace: &str,
        labels: &Labels,
        index: impl Fn(&NamespaceIndex) -> &Vec<usize>,
        items: &'a [T],
        scope: impl Fn(&'a T) -> Scope<'a, R>,
    ) -> Vec<&'a T>
    where
        R: Iterator<Item = &'a PolicyTargetReference>,
    {
        let mut out = Vec::new();
        let mut scan = |ns: &str| {
            if let Some(idx) = self.by_namespace.get(ns) {
                for &i in index(idx) {
                    let p = &items[i];
                    if scope(p).takes(&self.root_namespace, namespace, labels) {
                        out.push(p);
                    }
                }
            }
        };
        scan(namespace);
        if namespace != self.root_namespace {
            scan(&self.root_namespace);
        }
        out
    }

    /// Resources of `namespace`, by kind.
    pub fn count_in_namespace(&self, namespace: &str, kind: Kind) -> usize {
        fn count<S>(items: &[super::Resource<S>], namespace: &str) -> usize {
            items
                .iter()
                .filter(|r| r.metadata.namespace == namespace)
                .count()
        }
        let g = &self.gateway_api;
        match kind {
            Kind::KubernetesGateway => return count(&g.gateways, namespace),
            Kind::HttpRoute => return count(&g.http_routes, namespace),
            Kind::GrpcRoute => return count(&g.grpc_routes, namespace),
            Kind::ReferenceGrant => return count(&g.reference_grants, namespace),
            _ => {}
        }
        self.by_namespace.get(namespace).map_or(0, |n| match kind {
            Kind::VirtualService => n.virtual_services.len(),
            Kind::DestinationRule => n.destination_rules.len(),
            Kind::Gateway => n.gateways.len(),
            Kind::ServiceEntry => n.service_entries.len(),
            Kind::WorkloadEntry => n.workload_entries.len(),
            Kind::Sidecar => n.sidecars.len(),
            Kind::PeerAuthentication => n.peer_authentications.len(),
            Kind::AuthorizationPolicy => n.authorization_policies.len(),
            Kind::RequestAuthentication => n.request_authentications.len(),
            Kind::Telemetry => self
                .telemetries
                .iter()
                .filter(|t| t.metadata.namespace == namespace)
                .count(),
            _ => 0,
        })
    }

    /// VirtualServices of `namespace`.
    pub fn virtual_services_in(&self, namespace: &str) -> Vec<&VirtualService> {
        self.by_namespace.get(namespace).map_or_else(Vec::new, |n| {
            n.virtual_services
                .iter()
                .map(|&i| &self.virtual_services[i])
                .collect()
        })
    }

    /// DestinationRules of `namespace`.
    pub fn destination_rules_in(&self, namespace: &str) -> Vec<&DestinationRule> {
        self.by_namespace.get(namespace).map_or_else(Vec::new, |n| {
            n.destination_rules
                .iter()
                .map(|&i| &self.destination_rules[i])
                .collect()
        })
    }

    fn lookup_host(&self, index: &HostIndex, host: &str) -> Vec<usize> {
        index.lookup(host)
    }
}

/// `*` covers every host; `*.example.com` covers `a.example.com` and `a.b.example.com`
/// but not `example.com`.
fn wildcard_covers(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => false,
    }
}

/// The namespace of `name.namespace.svc.cluster.local`.
fn host_namespace(host: &str) -> Option<&str> {
    let rest = host.strip_suffix(".svc.cluster.local")?;
    let (_, ns) = rest.split_once('.')?;
    (!ns.contains('.')).then_some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                      metadata: {name: reviews, namespace: prod}\n\
                      spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n";

    fn resource(yaml: &str) -> AnyResource {
        let report = load_str("VirtualService/prod/reviews", yaml, &LoadOptions::default());
        assert!(!report.has_errors(), "{:?}", report.diagnostics);
        report.resources.into_iter().next().unwrap()
    }

    #[test]
    fn from_resources_keeps_the_later_of_one_name_and_versions_by_content() {
        let first = resource(VS);
        let second = resource(&VS.replace("{host: reviews}", "{host: ratings}"));
        let options = LoadOptions::default();
        let c = MeshConfig::from_resources(vec![first.clone(), second.clone()], &options);
        assert_eq!(c.virtual_services().len(), 1);
        assert_eq!(
            c.virtual_services()[0].spec.http[0].route[0]
                .destination
                .host,
            "ratings"
        );
        let again = MeshConfig::from_resources(vec![first.clone(), second], &options);
        assert_eq!(c.version(), again.version());
        let other = MeshConfig::from_resources(vec![first], &options);
        assert_ne!(c.version(), other.version());
    }

    #[test]
    fn object_diagnostics_name_the_object_and_field_instead_of_the_line() {
        let bad = VS.replace("{host: reviews}\n", "{host: reviews}\n      weight: -1\n");
        let report = load_str("VirtualService/prod/reviews", &bad, &LoadOptions::default());
        let e = report.errors().next().unwrap();
        assert_eq!(
            e.in_object().to_string(),
            "error: VirtualService/prod/reviews, spec.http[0].route[0].weight: \
             weight -1 is negative; weights must be 0 or more"
        );
    }
}
