//! The Kubernetes service registry: Services, EndpointSlices and Pods turned into
//! mesh-internal `ServiceEntry` resources of the configuration model.
//!
//! Pure functions over `k8s-openapi` objects; [`super::kube::KubeSource`] calls
//! [`service_entries`] with what its watches hold, after every settled change.
//!
//! # Behaviour
//!
//! - Each Service becomes one ServiceEntry in the Service's namespace, named
//!   `kubernetes.<service>` (a name no Service can take, so it never replaces a
//!   ServiceEntry written by a user), `location: MESH_INTERNAL`, `resolution: STATIC`,
//!   host `<service>.<namespace>.svc.<domain suffix>` (SR-01) and the cluster IPs as
//!   `addresses` (SR-04).
//! - Each Service port becomes a ServiceEntry port with the Service port number and name
//!   (an unnamed port, allowed when it is the only one, is named `port-<number>`) and the
//!   protocol Istio selects (SR-01, PS-01 to PS-04): `protocol: UDP` first, then
//!   `appProtocol` when set (`kubernetes.io/h2c`, `kubernetes.io/ws`,
//!   `kubernetes.io/wss` understood), else the name's part before the first `-`; an
//!   unknown protocol on ports 25, 53, 3306 and 27017 is TCP. A numeric `targetPort` is
//!   kept as the port's `targetPort`. A port whose protocol is detected has no
//!   `protocol`, which the model reads from the port's name, as here.
//! - A Service without endpoints keeps its entry (requests fail with 503 `UH`, not with
//!   404 `NR`), which names the Service's selector as its `workloadSelector`: a STATIC
//!   entry needs endpoints or a selector.
//! - Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name` with
//!   the Service's name. Each endpoint port is matched to the Service port by name and
//!   carries the pod's port number (SR-03). Slices with `addressType: FQDN` are ignored
//!   (SR-09). One address seen in several slices is one endpoint.
//! - Endpoint conditions (SR-10, SR-11): an endpoint is sent when `ready` is unset or
//!   true and `terminating` is not true. Terminating endpoints are never sent.
//! - An endpoint whose `targetRef` is a Pod carries the pod's labels (subsets, SR-20),
//!   plus `topology.kubernetes.io/zone` (the endpoint's zone) and
//!   `kubernetes.io/hostname` (its node) when known, and the pod's service account
//!   (`default` when the pod names none, as Kubernetes fills it in), which is the
//!   identity it must present (secure naming, SR-21). An endpoint whose pod is not known
//!   yet is left out until the pod is seen (as istiod waits for the pod); an endpoint
//!   without a `targetRef` has no labels and no identity.
//! - The `security.istio.io/tlsMode` label of the pod decides auto-mTLS for the endpoint
//!   (SR-23): `istio` means Istio mTLS. A pod without the label is given
//!   `security.istio.io/tlsMode: disabled`, so that it is reached in plaintext as
//!   Istio does (the model's own default for an endpoint that names a service account
//!   would be mTLS).
//! - `subjectAltNames` is the sorted union of the endpoints' identities and those named
//!   by the annotations `alpha.istio.io/kubernetes-serviceaccounts` and
//!   `alpha.istio.io/canonical-serviceaccounts` (SR-21). The annotation
//!   `networking.istio.io/exportTo` becomes `exportTo` (SR-30). Annotated names that are
//!   not valid identities are left out.
//! - Every entry made here loads without errors when it is written out as YAML and read
//!   again (the way `discovery` ships configuration to sidecars).
//!
//! # Choices that differ from Istio
//!
//! - Not-ready endpoints (`ready: false`, `terminating: false`) are left out. Istio sends
//!   them marked unhealthy so that Envoy knows the healthy ratio but does not balance to
//!   them (SR-11); the model has no health status per endpoint, so leaving them out
//!   gives the same balancing, without Envoy's panic threshold.
//! - Headless Services (`clusterIP: None`, SR-05) are load-balanced over their endpoints
//!   like any other Service, which is Istio's behaviour at gateways and with
//!   `PILOT_ENABLE_EDS_FOR_HEADLESS_SERVICES=true`; Istio's sidecar default (one
//!   original-destination listener per endpoint, no balancing) has no equivalent in the
//!   model. Their ServiceEntry has no `addresses`.
//! - ExternalName Services become a mesh-external ServiceEntry with `resolution: DNS`
//!   and the external name as the only endpoint, with the Service's ports: Istio's
//!   behaviour before 1.21 (SR-08), not the alias of today (SR-07), which the model
//!   cannot express.
//! - Region and subzone topology labels are not added (they need Node objects, which
//!   are not watched), nor `topology.istio.io/cluster`.
//! - LoadBalancer ingress addresses and `externalIPs` are not recorded (SR-04);
//!   `internalTrafficPolicy` is not applied.
//! - A port whose `appProtocol` is not a protocol Istio knows is auto-detected in Istio
//!   even when its name is one (`name: http`, `appProtocol: foo`); here the port has no
//!   protocol, so the model reads the protocol from the name.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::TLS_MODE_LABEL;
use mesh_core::config::{
    EntryWorkloadSelector, GatewayPort, Labels, Location, Metadata, Origin, Resolution,
    ServiceEntry, ServiceEntrySpec, WorkloadEntry, WorkloadEntryResource,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Service annotation: the namespaces the Service is visible to (SR-30).
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";
/// Service annotation: more service accounts (names in the Service's namespace) whose
/// identities the Service's endpoints may present (SR-21).
pub const KUBERNETES_SA_ANNOTATION: &str = "alpha.istio.io/kubernetes-serviceaccounts";
/// Service annotation: more identities, written in full (SR-21).
pub const CANONICAL_SA_ANNOTATION: &str = "alpha.istio.io/canonical-serviceaccounts";
/// The prefix of the names of the ServiceEntries made from Services.
pub const ENTRY_NAME_PREFIX: &str = "kubernetes.";
/// The prefix of the names of the WorkloadEntries made from pods that ServiceEntries
/// select.
pub const POD_ENTRY_NAME_PREFIX: &str = "kubernetes-pod.";

/// What the registry needs to know about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// The cluster's DNS domain suffix (`cluster.local`).
    pub domain_suffix: String,
    /// The trust domain of workload identities (`cluster.local`).
    pub trust_domain: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            domain_suffix: "cluster.local".to_owned(),
            trust_domain: "cluster.local".to_owned(),
        }
    }
}

/// What the registry keeps of a Pod: its labels, its service account, and what a
/// ServiceEntry that selects it needs (its address and readiness).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    /// The pod's labels.
    pub labels: Labels,
    /// `spec.serviceAccountName`, `default` when unset.
    pub service_account: String,
    /// `status.podIP` (the primary address), when assigned.
    pub ip: Option<String>,
    /// Condition `Ready` is `True` and the pod is not being deleted.
    pub ready: bool,
}

impl From<&Pod> for PodInfo {
    fn from(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        PodInfo {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            ip: status
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
            ready: ready && pod.metadata.deletion_timestamp.is_none(),
        }
    }
}

/// The pods that ServiceEntries written by users select with `workloadSelector`, as
/// WorkloadEntries of their namespace (in Istio's ServiceEntry reference the selector
/// takes Kubernetes pods as well as WorkloadEntries): a ready pod with an address whose
/// labels match a non-empty selector of a ServiceEntry in its namespace. The proxy's
/// snapshot then selects them like any WorkloadEntry; the ServiceEntry's port number (or
/// `targetPort`) is the pod's port. The pod's service account is its identity and its
/// `security.istio.io/tlsMode` label (else `disabled`) decides auto-mTLS, as for the
/// endpoints of Services.
pub fn selected_pods<'a>(
    entries: impl IntoIterator<Item = &'a ServiceEntry>,
    pods: &Pods,
) -> Vec<WorkloadEntryResource> {
    let mut selectors: HashMap<&str, Vec<&Labels>> = HashMap::new();
    for entry in entries {
        if let Some(selector) = &entry.spec.workload_selector
            && !selector.labels.is_empty()
        {
            selectors
                .entry(entry.metadata.namespace.as_str())
                .or_default()
                .push(&selector.labels);
        }
    }
    let mut out: Vec<WorkloadEntryResource> = pods
        .iter()
        .filter_map(|((namespace, name), pod)| {
            let ip = pod.ip.as_ref().filter(|_| pod.ready)?;
            let selected = selectors.get(namespace.as_str())?.iter().any(|labels| {
                labels
                    .iter()
                    .all(|(k, v)| pod.labels.get(k).is_some_and(|l| l == v))
            });
            if !selected {
                return None;
            }
            let mut labels = pod.labels.clone();
            labels
                .entry(TLS_MODE_LABEL.to_owned())
                .or_insert_with(|| "disabled".to_owned());
            Some(WorkloadEntryResource {
                api_version: "networking.istio.io/v1".to_owned(),
                metadata: Metadata {
                    name: format!("{POD_ENTRY_NAME_PREFIX}{name}"),
                    namespace: namespace.clone(),
                    ..Metadata::default()
                },
                spec: WorkloadEntry {
                    address: Some(ip.clone()),
                    labels,
                    service_account: Some(pod.service_account.clone()),
                    ..WorkloadEntry::default()
                },
                origin: Origin {
                    file: format!("Pod/{namespace}/{name}").into(),
                    document: 1,
                    seq: 0,
                },
            })
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    out
}

/// Pods by `(namespace, name)`.
pub type Pods = HashMap<(String, String), PodInfo>;

/// `<name>.<namespace>.svc.<domain suffix>` (SR-01).
pub fn service_host(name: &str, namespace: &str, domain_suffix: &str) -> String {
    format!("{name}.{namespace}.svc.{domain_suffix}")
}

/// The protocol Istio selects for a Service port (PS-01 to PS-04), as a ServiceEntry
/// protocol; `None` when it is detected from traffic.
pub fn port_protocol(port: &ServicePort) -> Option<&'static str> {
    if port.protocol.as_deref() == Some("UDP") {
        return Some("UDP");
    }
    let declared = match port.app_protocol.as_deref() {
        Some("kubernetes.io/h2c") => return Some("HTTP2"),
        Some("kubernetes.io/ws") => return Some("HTTP"),
        Some("kubernetes.io/wss") => return Some("HTTPS"),
        Some(app) => app,
        None => port.name.as_deref().unwrap_or(""),
    };
    let lower = declared.to_ascii_lowercase();
    let parsed = if lower.starts_with("grpc-web") {
        Some("GRPC-WEB")
    } else {
        match lower.split('-').next().unwrap_or("") {
            "tcp" => Some("TCP"),
            "udp" => Some("UDP"),
            "grpc" => Some("GRPC"),
            "http" | "http_proxy" => Some("HTTP"),
            "http2" => Some("HTTP2"),
            "https" => Some("HTTPS"),
            "tls" => Some("TLS"),
            "mongo" => Some("MONGO"),
            "redis" => Some("REDIS"),
            "mysql" => Some("MYSQL"),
            _ => None,
        }
    };
    parsed.or(matches!(port.port, 25 | 53 | 3306 | 27017).then_some("TCP"))
}

/// Whether an endpoint with these conditions is sent (SR-10, SR-11): ready (or not
/// said) and not terminating.
pub fn is_sent(conditions: Option<&EndpointConditions>) -> bool {
    let Some(c) = conditions else { return true };
    c.ready != Some(false) && c.terminating != Some(true)
}

/// The ServiceEntries of every Service, with the endpoints of their EndpointSlices.
pub fn service_entries<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    pods: &Pods,
    options: &RegistryOptions,
) -> Vec<ServiceEntry> {
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            by_service
                .entry((ns, svc.as_str()))
                .or_default()
                .push(slice);
        }
    }
    services
        .into_iter()
        .filter_map(|svc| {
            let key = (
                svc.metadata.namespace.as_deref().unwrap_or_default(),
                svc.metadata.name.as_deref().unwrap_or_default(),
            );
            let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
            service_entry(svc, slices, pods, options)
        })
        .collect()
}

/// The ServiceEntry of one Service with the endpoints of `slices` (those of other
/// Services are ignored); `None` for a Service without a name or namespace.
pub fn service_entry(
    service: &Service,
    slices: &[&EndpointSlice],
    pods: &Pods,
    options: &RegistryOptions,
) -> Option<ServiceEntry> {
    let name = service.metadata.name.as_deref()?;
    let namespace = service.metadata.namespace.as_deref()?;
    let spec = service.spec.clone().unwrap_or_default();
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let k8s_ports = spec.ports.clone().unwrap_or_default();
    let ports: Vec<GatewayPort> = k8s_ports
        .iter()
        .filter_map(|p| {
            Some(GatewayPort {
                number: u32::try_from(p.port).ok()?,
                protocol: port_protocol(p).unwrap_or_default().to_owned(),
                name: port_name(p.name.as_deref(), p.port),
                target_port: match &p.target_port {
                    Some(IntOrString::Int(t)) => u32::try_from(*t).ok(),
                    _ => None,
                },
            })
        })
        .collect();
    let mut entry = ServiceEntrySpec {
        hosts: vec![service_host(name, namespace, &options.domain_suffix)],
        ports,
        location: Some(Location::MeshInternal),
        resolution: Some(Resolution::Static),
        export_to: annotations
            .get(EXPORT_TO_ANNOTATION)
            .map(|v| list(v))
            .unwrap_or_default(),
        ..ServiceEntrySpec::default()
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        entry.location = Some(Location::MeshExternal);
        entry.resolution = Some(Resolution::Dns);
        if let Some(external) = spec.external_name.as_deref().filter(|n| !n.is_empty()) {
            entry.endpoints.push(WorkloadEntry {
                address: Some(external.trim_end_matches('.').to_owned()),
                ..WorkloadEntry::default()
            });
        }
    } else {
        let ips = spec
            .cluster_ips
            .clone()
            .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
            .unwrap_or_default();
        entry.addresses = ips
            .into_iter()
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            .collect();
        entry.endpoints = endpoints(namespace, name, &k8s_ports, slices, pods);
        if entry.endpoints.is_empty() {
            // A Service without ready endpoints still exists (requests to it fail with
            // 503 `UH`, not 404 `NR`); a STATIC entry without endpoints names the workloads
            // that would be its endpoints, the Service's selector.
            entry.workload_selector = Some(EntryWorkloadSelector {
                labels: spec.selector.clone().unwrap_or_default(),
            });
        }
    }
    let mut sans = BTreeSet::new();
    for e in &entry.endpoints {
        if let Some(sa) = &e.service_account {
            sans.insert(spiffe(&options.trust_domain, namespace, sa));
        }
    }
    if let Some(v) = annotations.get(KUBERNETES_SA_ANNOTATION) {
        sans.extend(
            list(v)
                .iter()
                .map(|sa| spiffe(&options.trust_domain, namespace, sa)),
        );
    }
    if let Some(v) = annotations.get(CANONICAL_SA_ANNOTATION) {
        sans.extend(list(v));
    }
    // Only identities the mesh can check (a malformed annotation must not make the
    // whole configuration invalid where it is loaded again).
    sans.retain(|san| mesh_core::Identity::parse(san).is_ok());
    entry.subject_alt_names = sans.into_iter().collect();
    Some(ServiceEntry {
        api_version: "networking.istio.io/v1".to_owned(),
        metadata: Metadata {
            name: format!("{ENTRY_NAME_PREFIX}{name}"),
            namespace: namespace.to_owned(),
            creation_timestamp: service
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            ..Metadata::default()
        },
        spec: entry,
        origin: Origin {
            file: format!("Service/{namespace}/{name}").into(),
            document: 1,
            seq: 0,
        },
    })
}

fn port_name(name: Option<&str>, number: i32) -> String {
    match name {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => format!("port-{number}"),
    }
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn spiffe(trust_domain: &str, namespace: &str, sa: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{sa}")
}

fn endpoints(
    namespace: &str,
    service: &str,
    service_ports: &[ServicePort],
    slices: &[&EndpointSlice],
    pods: &Pods,
) -> Vec<WorkloadEntry> {
    // By address and port numbers, so that an address listed by two slices with the
    // same ports is one endpoint, and one address serving the Service on two ports (two
    // workloads sharing the host's network) is two, as Envoy tells endpoints apart by
    // address and port.
    let mut out: BTreeMap<(String, Vec<u32>), WorkloadEntry> = BTreeMap::new();
    for slice in slices {
        let meta = &slice.metadata;
        if meta.namespace.as_deref() != Some(namespace)
            || meta
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(String::as_str)
                != Some(service)
        {
            continue;
        }
        // SR-09: FQDN slices are ignored.
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        // SR-03: endpoint ports are matched to the Service's ports by name.
        let mut ports = BTreeMap::new();
        for sp in slice.ports.iter().flatten() {
            let slice_name = sp.name.as_deref().unwrap_or("");
            let Some(number) = sp.port.and_then(|p| u32::try_from(p).ok()) else {
                continue;
            };
            if let Some(svc_port) = service_ports
                .iter()
                .find(|p| p.name.as_deref().unwrap_or("") == slice_name)
            {
                ports.insert(port_name(svc_port.name.as_deref(), svc_port.port), number);
            }
        }
        for ep in &slice.endpoints {
            if !is_sent(ep.conditions.as_ref()) {
                continue;
            }
            let (mut labels, service_account) = match &ep.target_ref {
                Some(r) if r.kind.as_deref() == Some("Pod") => {
                    let pod_ns = r.namespace.as_deref().unwrap_or(namespace);
                    let key = (pod_ns.to_owned(), r.name.clone().unwrap_or_default());
                    let Some(pod) = pods.get(&key) else {
                        tracing::debug!(
                            pod = %format!("{}/{}", key.0, key.1),
                            service = %format!("{namespace}/{service}"),
                            "endpoint left out until its pod is seen"
                        );
                        continue;
                    };
                    (pod.labels.clone(), Some(pod.service_account.clone()))
                }
                _ => (Labels::new(), None),
            };
            if let Some(zone) = &ep.zone {
                labels.insert("topology.kubernetes.io/zone".to_owned(), zone.clone());
            }
            if let Some(node) = &ep.node_name {
                labels.insert("kubernetes.io/hostname".to_owned(), node.clone());
            }
            labels
                .entry(TLS_MODE_LABEL.to_owned())
                .or_insert_with(|| "disabled".to_owned());
            let numbers: Vec<u32> = ports.values().copied().collect();
            for address in &ep.addresses {
                let key = (address.clone(), numbers.clone());
                let entry = out.entry(key).or_insert_with(|| WorkloadEntry {
                    address: Some(address.clone()),
                    labels: labels.clone(),
                    service_account: service_account.clone(),
                    ..WorkloadEntry::default()
                });
                for (name, number) in &ports {
                    entry.ports.entry(name.clone()).or_insert(*number);
                }
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::api::core::v1::{ObjectReference, PodSpec, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use mesh_core::config::AnyResource;

    fn meta(ns: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        }
    }

    fn port(name: Option<&str>, number: i32, target: i32) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            port: number,
            target_port: Some(IntOrString::Int(target)),
            ..ServicePort::default()
        }
    }

    fn service(ns: &str, name: &str, ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: meta(ns, name),
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".to_owned()),
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn endpoint(ip: &str, pod: Option<&str>, conditions: (Option<bool>, Option<bool>)) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready: conditions.0,
                serving: None,
                terminating: conditions.1,
            }),
            target_ref: pod.map(|p| ObjectReference {
                kind: Some("Pod".to_owned()),
                name: Some(p.to_owned()),
                namespace: Some("shop".to_owned()),
                ..ObjectReference::default()
            }),
            node_name: Some("node-1".to_owned()),
            ..Endpoint::default()
        }
    }

    fn slice(
        svc: &str,
        address_type: &str,
        ports: &[(&str, i32)],
        eps: Vec<Endpoint>,
    ) -> EndpointSlice {
        let mut m = meta("shop", &format!("{svc}-abc"));
        m.labels = Some([(SERVICE_NAME_LABEL.to_owned(), svc.to_owned())].into());
        EndpointSlice {
            metadata: m,
            address_type: address_type.to_owned(),
            endpoints: eps,
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some((*n).to_owned()),
                        port: Some(*p),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
        }
    }

    fn pods() -> Pods {
        let pod = |labels: &[(&str, &str)], sa: Option<&str>| {
            PodInfo::from(&Pod {
                metadata: ObjectMeta {
                    labels: Some(
                        labels
                            .iter()
                            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                            .collect(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(PodSpec {
                    service_account_name: sa.map(str::to_owned),
                    ..PodSpec::default()
                }),
                ..Pod::default()
            })
        };
        [
            (
                ("shop".to_owned(), "orders-v1".to_owned()),
                pod(
                    &[
                        ("app", "orders"),
                        ("version", "v1"),
                        (TLS_MODE_LABEL, "istio"),
                    ],
                    Some("orders"),
                ),
            ),
            (
                ("shop".to_owned(), "orders-v2".to_owned()),
                pod(&[("app", "orders"), ("version", "v2")], None),
            ),
        ]
        .into()
    }

    fn orders() -> Service {
        service(
            "shop",
            "orders",
            vec![
                port(Some("http-api"), 80, 8080),
                port(Some("grpc"), 9090, 9090),
            ],
        )
    }

    #[test]
    fn a_service_becomes_a_mesh_internal_entry_with_its_host_ports_and_vip() {
        let se = service_entry(&orders(), &[], &Pods::new(), &RegistryOptions::default()).unwrap();
        assert_eq!(se.metadata.name, "kubernetes.orders");
        assert_eq!(se.metadata.namespace, "shop");
        assert_eq!(se.spec.hosts, ["orders.shop.svc.cluster.local"]);
        assert_eq!(se.spec.addresses, ["10.96.0.10"]);
        assert_eq!(se.spec.location, Some(Location::MeshInternal));
        assert_eq!(se.spec.resolution, Some(Resolution::Static));
        let ports: Vec<_> = se
            .spec
            .ports
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.name.as_str(),
                    p.protocol.as_str(),
                    p.target_port,
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                (80, "http-api", "HTTP", Some(8080)),
                (9090, "grpc", "GRPC", Some(9090))
            ]
        );
        assert!(se.spec.endpoints.is_empty());
        assert!(
            se.spec.workload_selector.is_some(),
            "a STATIC entry needs a selector"
        );
    }

    /// Written out as YAML and loaded again, as sidecars receive it: no errors.
    fn reloads(se: &ServiceEntry) {
        let yaml = serde_saphyr::to_string(&AnyResource::ServiceEntry(se.clone())).unwrap();
        let report = mesh_core::config::load_str("entry.yaml", &yaml, &Default::default());
        let errors: Vec<String> = report.errors().map(ToString::to_string).collect();
        assert!(errors.is_empty(), "{yaml}\n{errors:#?}");
        assert_eq!(
            report.resources[0],
            AnyResource::ServiceEntry(ServiceEntry {
                origin: report.resources[0].origin().clone(),
                ..se.clone()
            })
        );
    }

    #[test]
    fn every_kind_of_entry_reloads_from_yaml_without_errors() {
        let options = RegistryOptions::default();
        let empty = service_entry(&orders(), &[], &pods(), &options).unwrap();
        reloads(&empty);
        let s = slice(
            "orders",
            "IPv4",
            &[("http-api", 8081)],
            vec![
                endpoint("127.0.0.11", Some("orders-v1"), (None, None)),
                endpoint("127.0.0.15", None, (None, None)),
            ],
        );
        reloads(&service_entry(&orders(), &[&s], &pods(), &options).unwrap());
        let mut headless = service("shop", "db", vec![port(None, 5432, 5432)]);
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".to_owned());
        reloads(&service_entry(&headless, &[], &pods(), &options).unwrap());
        let mut external = service("shop", "search", vec![port(Some("https"), 443, 443)]);
        let spec = external.spec.as_mut().unwrap();
        spec.type_ = Some("ExternalName".to_owned());
        spec.external_name = Some("search.example.com".to_owned());
        reloads(&service_entry(&external, &[], &pods(), &options).unwrap());
        let mut annotated = orders();
        annotated.metadata.annotations = Some(
            [(
                CANONICAL_SA_ANNOTATION.to_owned(),
                "not-an-identity, spiffe://a.org/ns/x/sa/y".to_owned(),
            )]
            .into(),
        );
        let se = service_entry(&annotated, &[], &pods(), &options).unwrap();
        assert_eq!(se.spec.subject_alt_names, ["spiffe://a.org/ns/x/sa/y"]);
        reloads(&se);
    }

    #[test]
    fn protocol_follows_app_protocol_then_name_then_well_known_ports() {
        let with = |name: Option<&str>, app: Option<&str>, number: i32, proto: Option<&str>| {
            port_protocol(&ServicePort {
                name: name.map(str::to_owned),
                app_protocol: app.map(str::to_owned),
                port: number,
                protocol: proto.map(str::to_owned),
                ..ServicePort::default()
            })
        };
        assert_eq!(with(Some("http-web"), None, 80, None), Some("HTTP"));
        assert_eq!(with(Some("httpfoo"), None, 80, None), None);
        assert_eq!(with(Some("tcp"), Some("http2"), 80, None), Some("HTTP2"));
        assert_eq!(
            with(Some("tcp"), Some("kubernetes.io/h2c"), 80, None),
            Some("HTTP2")
        );
        assert_eq!(
            with(Some("web"), Some("kubernetes.io/wss"), 443, None),
            Some("HTTPS")
        );
        assert_eq!(with(Some("GRPC-Web-x"), None, 80, None), Some("GRPC-WEB"));
        assert_eq!(with(Some("http"), None, 53, Some("UDP")), Some("UDP"));
        assert_eq!(with(None, None, 3306, None), Some("TCP"));
        assert_eq!(with(Some("db"), None, 27017, None), Some("TCP"));
        assert_eq!(with(None, None, 8080, None), None);
    }

    #[test]
    fn endpoints_carry_pod_port_labels_identity_and_tls_mode() {
        let s = slice(
            "orders",
            "IPv4",
            &[("http-api", 8081), ("grpc", 9091)],
            vec![
                endpoint("127.0.0.11", Some("orders-v1"), (Some(true), Some(false))),
                endpoint("127.0.0.12", Some("orders-v2"), (None, None)),
            ],
        );
        let se = service_entry(&orders(), &[&s], &pods(), &RegistryOptions::default()).unwrap();
        let eps = &se.spec.endpoints;
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].address.as_deref(), Some("127.0.0.11"));
        assert_eq!(
            eps[0].ports,
            [("grpc".to_owned(), 9091), ("http-api".to_owned(), 8081)].into()
        );
        assert_eq!(eps[0].labels["version"], "v1");
        assert_eq!(eps[0].labels[TLS_MODE_LABEL], "istio");
        assert_eq!(eps[0].labels["kubernetes.io/hostname"], "node-1");
        assert_eq!(eps[0].service_account.as_deref(), Some("orders"));
        assert_eq!(eps[1].labels["version"], "v2");
        assert_eq!(eps[1].labels[TLS_MODE_LABEL], "disabled");
        assert_eq!(eps[1].service_account.as_deref(), Some("default"));
        assert_eq!(
            se.spec.subject_alt_names,
            [
                "spiffe://cluster.local/ns/shop/sa/default",
                "spiffe://cluster.local/ns/shop/sa/orders"
            ]
        );
    }

    #[test]
    fn terminating_and_not_ready_endpoints_are_not_sent() {
        assert!(is_sent(None));
        let c = |ready, terminating| EndpointConditions {
            ready,
            serving: Some(true),
            terminating,
        };
        assert!(is_sent(Some(&c(None, None))));
        assert!(is_sent(Some(&c(Some(true), Some(false)))));
        assert!(!is_sent(Some(&c(Some(false), Some(true)))));
        assert!(!is_sent(Some(&c(Some(true), Some(true)))));
        assert!(!is_sent(Some(&c(Some(false), None))));
        assert!(!is_sent(Some(&c(Some(false), Some(false)))));
        let s = slice(
            "orders",
            "IPv4",
            &[("http-api", 8080)],
            vec![
                endpoint("127.0.0.11", Some("orders-v1"), (Some(false), Some(true))),
                endpoint("127.0.0.12", Some("orders-v2"), (Some(true), None)),
            ],
        );
        let se = service_entry(&orders(), &[&s], &pods(), &RegistryOptions::default()).unwrap();
        let addrs: Vec<_> = se
            .spec
            .endpoints
            .iter()
            .filter_map(|e| e.address.clone())
            .collect();
        assert_eq!(addrs, ["127.0.0.12"]);
    }

    #[test]
    fn fqdn_slices_unknown_pods_and_other_services_slices_are_left_out() {
        let fqdn = slice(
            "orders",
            "FQDN",
            &[("http-api", 80)],
            vec![endpoint("db.example.com", None, (None, None))],
        );
        let unknown_pod = slice(
            "orders",
            "IPv4",
            &[("http-api", 80)],
            vec![endpoint("127.0.0.13", Some("gone"), (None, None))],
        );
        let other = slice(
            "payments",
            "IPv4",
            &[("http-api", 80)],
            vec![endpoint("127.0.0.14", None, (None, None))],
        );
        let no_pod = slice(
            "orders",
            "IPv6",
            &[("http-api", 80)],
            vec![endpoint("::1", None, (None, None))],
        );
        let se = service_entry(
            &orders(),
            &[&fqdn, &unknown_pod, &other, &no_pod],
            &pods(),
            &RegistryOptions::default(),
        )
        .unwrap();
        let eps = &se.spec.endpoints;
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].address.as_deref(), Some("::1"));
        assert_eq!(eps[0].service_account, None);
        assert_eq!(eps[0].labels[TLS_MODE_LABEL], "disabled");
    }

    #[test]
    fn one_address_in_two_slices_is_one_endpoint() {
        let a = slice(
            "orders",
            "IPv4",
            &[("http-api", 8080)],
            vec![endpoint("127.0.0.11", Some("orders-v1"), (None, None))],
        );
        let mut b = a.clone();
        b.metadata.name = Some("orders-def".to_owned());
        let all = service_entries([&orders()], [&a, &b], &pods(), &RegistryOptions::default());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].spec.endpoints.len(), 1);
    }

    #[test]
    fn unnamed_port_headless_and_external_name_services() {
        let mut headless = service("shop", "db", vec![port(None, 5432, 5432)]);
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".to_owned());
        let s = slice(
            "db",
            "IPv4",
            &[("", 5433)],
            vec![endpoint("127.0.0.20", None, (None, None))],
        );
        let se = service_entry(&headless, &[&s], &pods(), &RegistryOptions::default()).unwrap();
        assert!(se.spec.addresses.is_empty());
        assert_eq!(se.spec.ports[0].name, "port-5432");
        assert_eq!(se.spec.ports[0].protocol, "");
        assert_eq!(se.spec.endpoints[0].ports["port-5432"], 5433);

        let mut external = service("shop", "search", vec![port(Some("https"), 443, 443)]);
        let spec = external.spec.as_mut().unwrap();
        spec.type_ = Some("ExternalName".to_owned());
        spec.external_name = Some("search.example.com.".to_owned());
        spec.cluster_ip = None;
        let se = service_entry(&external, &[], &pods(), &RegistryOptions::default()).unwrap();
        assert_eq!(se.spec.location, Some(Location::MeshExternal));
        assert_eq!(se.spec.resolution, Some(Resolution::Dns));
        assert_eq!(
            se.spec.endpoints[0].address.as_deref(),
            Some("search.example.com")
        );
    }

    #[test]
    fn annotations_give_export_to_and_more_identities() {
        let mut svc = orders();
        svc.metadata.annotations = Some(
            [
                (EXPORT_TO_ANNOTATION.to_owned(), ".,shop-ui".to_owned()),
                (
                    KUBERNETES_SA_ANNOTATION.to_owned(),
                    "legacy, batch".to_owned(),
                ),
                (
                    CANONICAL_SA_ANNOTATION.to_owned(),
                    "spiffe://other.org/ns/x/sa/y".to_owned(),
                ),
            ]
            .into(),
        );
        let se = service_entry(&svc, &[], &pods(), &RegistryOptions::default()).unwrap();
        assert_eq!(se.spec.export_to, [".", "shop-ui"]);
        assert_eq!(
            se.spec.subject_alt_names,
            [
                "spiffe://cluster.local/ns/shop/sa/batch",
                "spiffe://cluster.local/ns/shop/sa/legacy",
                "spiffe://other.org/ns/x/sa/y"
            ]
        );
    }
}
