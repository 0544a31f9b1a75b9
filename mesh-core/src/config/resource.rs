//! The resource envelope (`apiVersion`, `kind`, `metadata`, `spec`) and the small types
//! shared by several kinds.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::gateway_api::{
    GATEWAY_API_GROUP, GrpcRouteSpec, HttpRouteSpec, KubernetesGatewaySpec, ReferenceGrantSpec,
};
use super::{
    AuthorizationPolicySpec, DestinationRuleSpec, GatewaySpec, PeerAuthenticationSpec,
    RequestAuthenticationSpec, ServiceEntrySpec, SidecarSpec, TelemetrySpec, VirtualServiceSpec,
    WorkloadEntry as WorkloadEntrySpec,
};

/// Labels (or any string-to-string map) in a stable order.
pub type Labels = BTreeMap<String, String>;

/// The Istio kinds this crate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `networking.istio.io` VirtualService.
    VirtualService,
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `networking.istio.io` Gateway.
    Gateway,
    /// `networking.istio.io` ServiceEntry.
    ServiceEntry,
    /// `networking.istio.io` WorkloadEntry.
    WorkloadEntry,
    /// `networking.istio.io` Sidecar.
    Sidecar,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `security.istio.io` RequestAuthentication.
    RequestAuthentication,
    /// `gateway.networking.k8s.io` Gateway (Kubernetes Gateway API).
    KubernetesGateway,
    /// `gateway.networking.k8s.io` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io` GRPCRoute.
    GrpcRoute,
    /// `gateway.networking.k8s.io` ReferenceGrant.
    ReferenceGrant,
    /// `telemetry.istio.io` Telemetry.
    Telemetry,
}

const NETWORKING_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
const SECURITY_VERSIONS: &[&str] = &["security.istio.io/v1", "security.istio.io/v1beta1"];
const GATEWAY_API_VERSIONS: &[&str] = &[
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];
const GRPC_ROUTE_VERSIONS: &[&str] = &[
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1alpha2",
];
const REFERENCE_GRANT_VERSIONS: &[&str] = &[
    "gateway.networking.k8s.io/v1beta1",
    "gateway.networking.k8s.io/v1alpha2",
];
const TELEMETRY_VERSIONS: &[&str] = &["telemetry.istio.io/v1", "telemetry.istio.io/v1alpha1"];

/// Istio kinds that exist but that this crate does not load (skipped with a warning).
const OTHER_ISTIO_GROUPS: &[&str] = &[
    "networking.istio.io/",
    "security.istio.io/",
    "telemetry.istio.io/",
    "extensions.istio.io/",
    "install.istio.io/",
    "gateway.networking.k8s.io/",
];

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 14] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::Sidecar,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::KubernetesGateway,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::ReferenceGrant,
        Kind::Telemetry,
    ];

    /// The kind's name as written in YAML.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::Sidecar => "Sidecar",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::KubernetesGateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
            Kind::Telemetry => "Telemetry",
        }
    }

    /// Parses a kind name (`Gateway` is Istio's; see [`Kind::resolve`]).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The kind named `name` under `api_version`: `Gateway` of
    /// `gateway.networking.k8s.io` is the Gateway API's, not Istio's.
    pub fn resolve(name: &str, api_version: Option<&str>) -> Option<Kind> {
        let gateway_api = api_version.is_some_and(is_gateway_api);
        match Kind::from_name(name)? {
            Kind::Gateway if gateway_api => Some(Kind::KubernetesGateway),
            k => Some(k),
        }
    }

    /// True for the Kubernetes Gateway API kinds.
    pub fn is_gateway_api(self) -> bool {
        matches!(
            self,
            Kind::KubernetesGateway | Kind::HttpRoute | Kind::GrpcRoute | Kind::ReferenceGrant
        )
    }

    /// The `apiVersion`s Istio serves for this kind.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::PeerAuthentication | Kind::AuthorizationPolicy | Kind::RequestAuthentication => {
                SECURITY_VERSIONS
            }
            Kind::KubernetesGateway | Kind::HttpRoute => GATEWAY_API_VERSIONS,
            Kind::GrpcRoute => GRPC_ROUTE_VERSIONS,
            Kind::ReferenceGrant => REFERENCE_GRANT_VERSIONS,
            Kind::Telemetry => TELEMETRY_VERSIONS,
            _ => NETWORKING_VERSIONS,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kubernetes object metadata.
///
/// Unknown metadata fields are an error (a misspelled `namespace` must not silently move a
/// policy to the default namespace); standard Kubernetes fields such as `uid`,
/// `resourceVersion`, `generation` or `managedFields` are accepted and ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(from = "RawMetadata", rename_all = "camelCase")]
pub struct Metadata {
    /// Resource name (required).
    pub name: String,
    /// Namespace; filled with the load's default namespace when absent.
    pub namespace: String,
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Labels,
    /// RFC 3339 creation time (`2024-01-02T03:04:05Z`), used to order PeerAuthentications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct RawMetadata {
    name: String,
    namespace: String,
    labels: Labels,
    annotations: Labels,
    creation_timestamp: Option<String>,
    // Standard Kubernetes metadata, tolerated and ignored.
    uid: IgnoredAny,
    resource_version: IgnoredAny,
    generation: IgnoredAny,
    generate_name: IgnoredAny,
    managed_fields: IgnoredAny,
    owner_references: IgnoredAny,
    finalizers: IgnoredAny,
    deletion_timestamp: IgnoredAny,
    deletion_grace_period_seconds: IgnoredAny,
    self_link: IgnoredAny,
    cluster_name: IgnoredAny,
}

impl From<RawMetadata> for Metadata {
    fn from(r: RawMetadata) -> Self {
        Metadata {
            name: r.name,
            namespace: r.namespace,
            labels: r.labels,
            annotations: r.annotations,
            creation_timestamp: r.creation_timestamp,
        }
    }
}

/// Where a resource was loaded from.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// 1-based index of the document within the file (non-empty documents only).
    pub document: usize,
    /// 0-based position in the whole load (files sorted, documents in order); the
    /// tiebreak when creation timestamps are equal or absent.
    pub seq: usize,
}

/// One loaded resource: envelope plus typed `spec`.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource<S> {
    /// The `apiVersion` it was written with.
    pub api_version: String,
    /// Metadata (namespace always filled in).
    pub metadata: Metadata,
    /// The typed spec.
    pub spec: S,
    /// Where it came from.
    pub origin: Origin,
}

impl<S> Resource<S> {
    /// The resource name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The resource namespace.
    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }

    /// Qualifies a host written in this resource with its namespace (see [`qualify_host`]).
    pub fn qualify(&self, host: &str) -> String {
        qualify_host(host, &self.metadata.namespace)
    }

    /// Ordering key for "oldest wins": creation time (absent or unparsable sorts last),
    /// then load order.
    pub fn age_key(&self) -> (Option<(i64, u32)>, usize) {
        // `None` must sort after every time: map it to the largest key.
        let time = self.metadata.creation_time().or(Some((i64::MAX, u32::MAX)));
        (time, self.origin.seq)
    }
}

impl Metadata {
    /// `creationTimestamp` as seconds since the Unix epoch and nanoseconds, if it is a
    /// valid RFC 3339 time (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00.5+02:00`).
    pub fn creation_time(&self) -> Option<(i64, u32)> {
        parse_rfc3339(self.creation_timestamp.as_deref()?)
    }
}

/// Parses an RFC 3339 date-time into (Unix seconds, nanoseconds).
pub(crate) fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos: u32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        let digits = &frac[..n.min(9)];
        nanos = digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32);
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let (h, m) = (num_in(rest, 1..3)?, num_in(rest, 4..6)?);
            sign * (h * 3600 + m * 60)
        }
    };
    // Days from the civil date (proleptic Gregorian), after H. Hinnant's algorithm.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((
        days * 86_400 + hour * 3600 + minute * 60 + second - offset,
        nanos,
    ))
}

fn num_in(s: &str, r: std::ops::Range<usize>) -> Option<i64> {
    let t = s.get(r)?;
    if t.bytes().all(|c| c.is_ascii_digit()) {
        t.parse().ok()
    } else {
        None
    }
}

/// A VirtualService resource.
pub type VirtualService = Resource<VirtualServiceSpec>;
/// A DestinationRule resource.
pub type DestinationRule = Resource<DestinationRuleSpec>;
/// A Gateway resource.
pub type Gateway = Resource<GatewaySpec>;
/// A ServiceEntry resource.
pub type ServiceEntry = Resource<ServiceEntrySpec>;
/// A WorkloadEntry resource (its `spec` is the message ServiceEntry `endpoints` use).
pub type WorkloadEntryResource = Resource<WorkloadEntrySpec>;
/// A PeerAuthentication resource.
pub type PeerAuthentication = Resource<PeerAuthenticationSpec>;
/// An AuthorizationPolicy resource.
pub type AuthorizationPolicy = Resource<AuthorizationPolicySpec>;
/// A RequestAuthentication resource.
pub type RequestAuthentication = Resource<RequestAuthenticationSpec>;
pub use super::gateway_api::{
    GrpcRouteResource, HttpRouteResource, KubernetesGateway, ReferenceGrant,
};

/// Any of the supported resources.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum AnyResource {
    /// A VirtualService.
    VirtualService(VirtualService),
    /// A DestinationRule.
    DestinationRule(DestinationRule),
    /// A Gateway.
    Gateway(Gateway),
    /// A ServiceEntry.
    ServiceEntry(ServiceEntry),
    /// A WorkloadEntry.
    WorkloadEntry(WorkloadEntryResource),
    /// A Sidecar.
    Sidecar(super::Sidecar),
    /// A PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// An AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A RequestAuthentication.
    RequestAuthentication(RequestAuthentication),
    /// A Gateway API Gateway.
    KubernetesGateway(KubernetesGateway),
    /// A Gateway API HTTPRoute.
    HttpRoute(HttpRouteResource),
    /// A Gateway API GRPCRoute.
    GrpcRoute(GrpcRouteResource),
    /// A Gateway API ReferenceGrant.
    ReferenceGrant(ReferenceGrant),
    /// A Telemetry.
    Telemetry(super::Telemetry),
}

macro_rules! each {
    ($self:expr, $r:ident => $e:expr) => {
        match $self {
            AnyResource::VirtualService($r) => $e,
            AnyResource::DestinationRule($r) => $e,
            AnyResource::Gateway($r) => $e,
            AnyResource::ServiceEntry($r) => $e,
            AnyResource::WorkloadEntry($r) => $e,
            AnyResource::Sidecar($r) => $e,
            AnyResource::PeerAuthentication($r) => $e,
            AnyResource::AuthorizationPolicy($r) => $e,
            AnyResource::RequestAuthentication($r) => $e,
            AnyResource::KubernetesGateway($r) => $e,
            AnyResource::HttpRoute($r) => $e,
            AnyResource::GrpcRoute($r) => $e,
            AnyResource::ReferenceGrant($r) => $e,
            AnyResource::Telemetry($r) => $e,
        }
    };
}

impl AnyResource {
    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            AnyResource::VirtualService(_) => Kind::VirtualService,
            AnyResource::DestinationRule(_) => Kind::DestinationRule,
            AnyResource::Gateway(_) => Kind::Gateway,
            AnyResource::ServiceEntry(_) => Kind::ServiceEntry,
            AnyResource::WorkloadEntry(_) => Kind::WorkloadEntry,
            AnyResource::Sidecar(_) => Kind::Sidecar,
            AnyResource::PeerAuthentication(_) => Kind::PeerAuthentication,
            AnyResource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            AnyResource::RequestAuthentication(_) => Kind::RequestAuthentication,
            AnyResource::KubernetesGateway(_) => Kind::KubernetesGateway,
            AnyResource::HttpRoute(_) => Kind::HttpRoute,
            AnyResource::GrpcRoute(_) => Kind::GrpcRoute,
            AnyResource::ReferenceGrant(_) => Kind::ReferenceGrant,
            AnyResource::Telemetry(_) => Kind::Telemetry,
        }
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        each!(self, r => &r.metadata)
    }

    /// The metadata, mutably.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        each!(self, r => &mut r.metadata)
    }

    /// The `apiVersion`.
    pub fn api_version(&self) -> &str {
        each!(self, r => &r.api_version)
    }

    /// Where it came from.
    pub fn origin(&self) -> &Origin {
        each!(self, r => &r.origin)
    }

    /// Where it came from, mutably.
    pub fn origin_mut(&mut self) -> &mut Origin {
        each!(self, r => &mut r.origin)
    }

    /// `Kind/namespace/name`, the way diagnostics name a resource.
    pub fn display_name(&self) -> String {
        let m = self.metadata();
        if self.kind() == Kind::KubernetesGateway {
            // Not to be confused with an Istio Gateway of the same name.
            return format!("Gateway.{GATEWAY_API_GROUP}/{}/{}", m.namespace, m.name);
        }
        format!("{}/{}/{}", self.kind(), m.namespace, m.name)
    }

    /// A one-line summary (`VirtualService production/order-service: 2 http routes`).
    pub fn summary(&self) -> String {
        fn plural(n: usize, what: &str) -> String {
            format!("{n} {what}{}", if n == 1 { "" } else { "s" })
        }
        let m = self.metadata();
        let detail = match self {
            AnyResource::VirtualService(r) => {
                let s = &r.spec;
                let mut parts = Vec::new();
                if !s.http.is_empty() || (s.tcp.is_empty() && s.tls.is_empty()) {
                    parts.push(plural(s.http.len(), "http route"));
                }
                if !s.tcp.is_empty() {
                    parts.push(plural(s.tcp.len(), "tcp route"));
                }
                if !s.tls.is_empty() {
                    parts.push(plural(s.tls.len(), "tls route"));
                }
                parts.join(", ")
            }
            AnyResource::DestinationRule(r) => {
                format!(
                    "host {}, {}",
                    r.spec.host,
                    plural(r.spec.subsets.len(), "subset")
                )
            }
            AnyResource::Gateway(r) => plural(r.spec.servers.len(), "server"),
            AnyResource::ServiceEntry(r) => format!(
                "{}, {}",
                plural(r.spec.hosts.len(), "host"),
                plural(r.spec.endpoints.len(), "endpoint")
            ),
            AnyResource::WorkloadEntry(r) => format!(
                "address {}, {}",
                r.spec.address.as_deref().unwrap_or("(none)"),
                plural(r.spec.labels.len(), "label")
            ),
            AnyResource::Sidecar(r) => {
                let hosts = r.spec.egress.iter().map(|e| e.hosts.len()).sum();
                let scope = if r.spec.workload_selector.is_some() {
                    "workload"
                } else {
                    "namespace"
                };
                format!("{}, {scope} scope", plural(hosts, "egress host"))
            }
            AnyResource::PeerAuthentication(r) => {
                let mode = r
                    .spec
                    .mtls
                    .as_ref()
                    .and_then(|m| m.mode)
                    .map_or("UNSET".to_owned(), |m| format!("{m:?}").to_uppercase());
                let scope = if r.spec.selector.is_some() {
                    "workload"
                } else {
                    "namespace"
                };
                format!("mode {mode}, {scope} scope")
            }
            AnyResource::AuthorizationPolicy(r) => {
                let action = format!("{:?}", r.spec.action.unwrap_or_default()).to_uppercase();
                format!("{action}, {}", plural(r.spec.rules.len(), "rule"))
            }
            AnyResource::RequestAuthentication(r) => {
                let scope = if r.spec.selector.is_some() {
                    "workload"
                } else {
                    "namespace"
                };
                format!(
                    "{}, {scope} scope",
                    plural(r.spec.jwt_rules.len(), "JWT rule")
                )
            }
            AnyResource::KubernetesGateway(r) => format!(
                "class {}, {}",
                r.spec.gateway_class_name,
                plural(r.spec.listeners.len(), "listener")
            ),
            AnyResource::HttpRoute(r) => format!(
                "{}, {}",
                plural(r.spec.parent_refs.len(), "parent"),
                plural(r.spec.rules.len(), "rule")
            ),
            AnyResource::GrpcRoute(r) => format!(
                "{}, {}",
                plural(r.spec.parent_refs.len(), "parent"),
                plural(r.spec.rules.len(), "rule")
            ),
            AnyResource::ReferenceGrant(r) => plural(r.spec.from.len(), "grant"),
            AnyResource::Telemetry(r) => {
                let scope = if r.spec.selector.is_some() {
                    "workload"
                } else if r.spec.is_targeted() {
                    "targeted"
                } else {
                    "namespace"
                };
                format!(
                    "{}, {}, {}, {scope} scope",
                    plural(r.spec.tracing.len(), "tracing rule"),
                    plural(r.spec.access_logging.len(), "access-logging rule"),
                    plural(r.spec.metrics.len(), "metrics rule")
                )
            }
        };
        format!("{} {}/{}: {}", self.kind(), m.namespace, m.name, detail)
    }
}

/// A spec type and its kind.
pub trait Spec {
    /// The kind whose `spec` this is.
    const KIND: Kind;
}

impl Spec for VirtualServiceSpec {
    const KIND: Kind = Kind::VirtualService;
}
impl Spec for DestinationRuleSpec {
    const KIND: Kind = Kind::DestinationRule;
}
impl Spec for GatewaySpec {
    const KIND: Kind = Kind::Gateway;
}
impl Spec for ServiceEntrySpec {
    const KIND: Kind = Kind::ServiceEntry;
}
impl Spec for WorkloadEntrySpec {
    const KIND: Kind = Kind::WorkloadEntry;
}
impl Spec for SidecarSpec {
    const KIND: Kind = Kind::Sidecar;
}
impl Spec for PeerAuthenticationSpec {
    const KIND: Kind = Kind::PeerAuthentication;
}
impl Spec for AuthorizationPolicySpec {
    const KIND: Kind = Kind::AuthorizationPolicy;
}
impl Spec for RequestAuthenticationSpec {
    const KIND: Kind = Kind::RequestAuthentication;
}
impl Spec for KubernetesGatewaySpec {
    const KIND: Kind = Kind::KubernetesGateway;
}
impl Spec for HttpRouteSpec {
    const KIND: Kind = Kind::HttpRoute;
}
impl Spec for GrpcRouteSpec {
    const KIND: Kind = Kind::GrpcRoute;
}
impl Spec for ReferenceGrantSpec {
    const KIND: Kind = Kind::ReferenceGrant;
}
impl Spec for TelemetrySpec {
    const KIND: Kind = Kind::Telemetry;
}

/// Serializes as the Kubernetes resource (`apiVersion`, `kind`, `metadata`, `spec`).
impl<S: Spec + Serialize> Serialize for Resource<S> {
    fn serialize<Ser: Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("apiVersion", &self.api_version)?;
        m.serialize_entry("kind", S::KIND.as_str())?;
        m.serialize_entry("metadata", &self.metadata)?;
        m.serialize_entry("spec", &self.spec)?;
        m.end()
    }
}

/// Serializes as the Kubernetes resource it was loaded from (`apiVersion`, `kind`,
/// `metadata`, `spec`), for configuration dumps; loading the output gives the same
/// resource back.
impl Serialize for AnyResource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        each!(self, r => r.serialize(s))
    }
}

/// Whether a resource of namespace `own` whose `exportTo` is `export_to` is visible in
/// `namespace` (SR-30): unset or `*`, everywhere; `.`, its own namespace; names, those
/// namespaces.
pub fn exported(export_to: &[String], own: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && own == namespace) || (e != "." && e == namespace))
}

/// Qualifies a short host with a namespace, the way Istio reads hosts in Kubernetes:
/// a name without dots (`reviews`) becomes `reviews.<namespace>.svc.cluster.local`;
/// names with dots, wildcards (`*`, `*.example.com`) and IP addresses stay as written.
///
/// ```
/// use mesh_core::config::qualify_host;
/// assert_eq!(qualify_host("order-service", "production"), "order-service.production.svc.cluster.local");
/// assert_eq!(qualify_host("api.example.com", "production"), "api.example.com");
/// assert_eq!(qualify_host("*", "production"), "*");
/// ```
pub fn qualify_host(host: &str, namespace: &str) -> String {
    if host.is_empty() || host.contains('.') || host.contains('*') || host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// A percentage in [0, 100] (`{value: 12.5}`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Percent {
    /// The percentage.
    pub value: f64,
}

/// A port selector (`{number: 8080}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortSelector {
    /// Port number.
    pub number: u32,
}

/// The security workload selector (`matchLabels`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkloadSelector {
    /// Labels the workload must carry.
    pub match_labels: Labels,
}

impl WorkloadSelector {
    /// True when every selector label is present with the same value in `labels`.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }
}

/// Istio's `StringMatch` one-of, plus the presence form `{}` (or an empty value) that
/// Istio accepts for header and query-parameter matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// Exact, case-sensitive.
    Exact(String),
    /// Raw string prefix.
    Prefix(String),
    /// RE2 regex, matched against the whole value.
    Regex(String),
    /// `{}`: the value is present (any value).
    Present,
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (key, value) = match self {
            StringMatch::Exact(v) => ("exact", v),
            StringMatch::Prefix(v) => ("prefix", v),
            StringMatch::Regex(v) => ("regex", v),
            StringMatch::Present => return s.serialize_map(Some(0))?.end(),
        };
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(key, value)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            exact: Option<String>,
            prefix: Option<String>,
            regex: Option<String>,
        }
        let f = Option::<Fields>::deserialize(d)?.unwrap_or_default();
        match (f.exact, f.prefix, f.regex) {
            (None, None, None) => Ok(StringMatch::Present),
            (Some(v), None, None) => Ok(StringMatch::Exact(v)),
            (None, Some(v), None) => Ok(StringMatch::Prefix(v)),
            (None, None, Some(v)) => Ok(StringMatch::Regex(v)),
            _ => Err(de::Error::custom(
                "a string match sets exactly one of `exact`, `prefix`, `regex`",
            )),
        }
    }
}

/// One parsed YAML document: one of ours, or something to skip.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Document {
    Istio(AnyResource),
    Other {
        api_version: Option<String>,
        kind: Option<String>,
        name: Option<String>,
    },
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ForeignMetadata {
    name: Option<String>,
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(DocumentVisitor)
    }
}

struct DocumentVisitor;

#[allow(clippy::large_enum_variant)]
enum Parsed {
    Vs(VirtualServiceSpec),
    Dr(DestinationRuleSpec),
    Gw(GatewaySpec),
    Se(ServiceEntrySpec),
    We(WorkloadEntrySpec),
    Sc(SidecarSpec),
    Pa(PeerAuthenticationSpec),
    Ap(AuthorizationPolicySpec),
    Ra(RequestAuthenticationSpec),
    Kg(KubernetesGatewaySpec),
    Hr(HttpRouteSpec),
    Gr(GrpcRouteSpec),
    Rg(ReferenceGrantSpec),
    Te(TelemetrySpec),
}

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes resource: a mapping with apiVersion, kind, metadata and spec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind_name: Option<String> = None;
        let mut kind: Option<Kind> = None;
        let mut metadata: Option<Metadata> = None;
        let mut foreign_name: Option<String> = None;
        let mut spec: Option<Parsed> = None;
        // `foreign` once we know the document is not one of ours: the rest is skipped.
        let mut foreign = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "apiVersion" => {
                    let v: String = map.next_value()?;
                    if let (Some(_), Some(name)) = (kind, &kind_name) {
                        kind = Kind::resolve(name, Some(&v));
                    }
                    if let Some(k) = kind {
                        if is_istio_group(&v) {
                            check_api_version(k, &v).map_err(de::Error::custom)?;
                        } else {
                            // e.g. a `Gateway` of another API: not ours.
                            kind = None;
                            foreign = true;
                        }
                    }
                    api_version = Some(v);
                }
                "kind" => {
                    let v: String = map.next_value()?;
                    kind = Kind::resolve(&v, api_version.as_deref());
                    match (kind, &api_version) {
                        (Some(k), Some(av)) => {
                            // A kind name of ours under a foreign group (e.g. a
                            // `Gateway` of another API) is not ours.
                            if is_istio_group(av) {
                                check_api_version(k, av).map_err(de::Error::custom)?;
                            } else {
                                kind = None;
                                foreign = true;
                            }
                        }
                        (None, _) => foreign = true,
                        (Some(_), None) => {}
                    }
                    kind_name = Some(v);
                }
                "metadata" if !foreign => {
                    metadata = Some(map.next_value()?);
                }
                "metadata" => {
                    foreign_name = map.next_value::<ForeignMetadata>()?.name;
                }
                "spec" if foreign => {
                    map.next_value::<IgnoredAny>()?;
                }
                "spec" => {
                    let Some(k) = kind else {
                        return Err(de::Error::custom(
                            "`spec` appears before `kind`; write apiVersion and kind first, \
                             then metadata and spec",
                        ));
                    };
                    spec = Some(match k {
                        Kind::VirtualService => Parsed::Vs(map.next_value()?),
                        Kind::DestinationRule => Parsed::Dr(map.next_value()?),
                        Kind::Gateway => Parsed::Gw(map.next_value()?),
                        Kind::ServiceEntry => Parsed::Se(map.next_value()?),
                        Kind::WorkloadEntry => Parsed::We(map.next_value()?),
                        Kind::Sidecar => Parsed::Sc(map.next_value()?),
                        Kind::PeerAuthentication => Parsed::Pa(map.next_value()?),
                        Kind::AuthorizationPolicy => Parsed::Ap(map.next_value()?),
                        Kind::RequestAuthentication => Parsed::Ra(map.next_value()?),
                        Kind::KubernetesGateway => Parsed::Kg(map.next_value()?),
                        Kind::HttpRoute => Parsed::Hr(map.next_value()?),
                        Kind::GrpcRoute => Parsed::Gr(map.next_value()?),
                        Kind::ReferenceGrant => Parsed::Rg(map.next_value()?),
                        Kind::Telemetry => Parsed::Te(map.next_value()?),
                    });
                }
                "status" => {
                    map.next_value::<IgnoredAny>()?;
                }
                _ if foreign => {
                    map.next_value::<IgnoredAny>()?;
                }
                other => {
                    return Err(de::Error::custom(format_args!(
                        "unknown field `{other}`, expected one of `apiVersion`, `kind`, \
                         `metadata`, `spec`, `status`"
                    )));
                }
            }
        }
        let Some(kind) = kind else {
            if kind_name.is_none() {
                return Err(de::Error::custom(
                    "missing field `kind`; every document needs apiVersion and kind",
                ));
            }
            return Ok(Document::Other {
                api_version,
                kind: kind_name,
                name: foreign_name.or(metadata.map(|m| m.name)),
            });
        };
        let Some(api_version) = api_version else {
            return Err(de::Error::custom(format_args!(
                "missing field `apiVersion`; {kind} is served as {}",
                kind.api_versions().join(", ")
            )));
        };
        let Some(metadata) = metadata else {
            return Err(de::Error::custom(
                "missing field `metadata`; a resource needs at least `metadata.name`",
            ));
        };
        let spec = spec.unwrap_or(match kind {
            Kind::VirtualService => Parsed::Vs(Default::default()),
            Kind::DestinationRule => Parsed::Dr(Default::default()),
            Kind::Gateway => Parsed::Gw(Default::default()),
            Kind::ServiceEntry => Parsed::Se(Default::default()),
            Kind::WorkloadEntry => Parsed::We(Default::default()),
            Kind::Sidecar => Parsed::Sc(Default::default()),
            Kind::PeerAuthentication => Parsed::Pa(Default::default()),
            Kind::AuthorizationPolicy => Parsed::Ap(Default::default()),
            Kind::RequestAuthentication => Parsed::Ra(Default::default()),
            Kind::KubernetesGateway => Parsed::Kg(Default::default()),
            Kind::HttpRoute => Parsed::Hr(Default::default()),
            Kind::GrpcRoute => Parsed::Gr(Default::default()),
            Kind::ReferenceGrant => Parsed::Rg(Default::default()),
            Kind::Telemetry => Parsed::Te(Default::default()),
        });
        fn r<S>(api_version: String, metadata: Metadata, spec: S) -> Resource<S> {
            Resource {
                api_version,
                metadata,
                spec,
                origin: Origin::default(),
            }
        }
        Ok(Document::Istio(match spec {
            Parsed::Vs(s) => AnyResource::VirtualService(r(api_version, metadata, s)),
            Parsed::Dr(s) => AnyResource::DestinationRule(r(api_version, metadata, s)),
            Parsed::Gw(s) => AnyResource::Gateway(r(api_version, metadata, s)),
            Parsed::Se(s) => AnyResource::ServiceEntry(r(api_version, metadata, s)),
            Parsed::We(s) => AnyResource::WorkloadEntry(r(api_version, metadata, s)),
            Parsed::Sc(s) => AnyResource::Sidecar(r(api_version, metadata, s)),
            Parsed::Pa(s) => AnyResource::PeerAuthentication(r(api_version, metadata, s)),
            Parsed::Ap(s) => AnyResource::AuthorizationPolicy(r(api_version, metadata, s)),
            Parsed::Ra(s) => AnyResource::RequestAuthentication(r(api_version, metadata, s)),
            Parsed::Kg(s) => AnyResource::KubernetesGateway(r(api_version, metadata, s)),
            Parsed::Hr(s) => AnyResource::HttpRoute(r(api_version, metadata, s)),
            Parsed::Gr(s) => AnyResource::GrpcRoute(r(api_version, metadata, s)),
            Parsed::Rg(s) => AnyResource::ReferenceGrant(r(api_version, metadata, s)),
            Parsed::Te(s) => AnyResource::Telemetry(r(api_version, metadata, s)),
        }))
    }
}

fn is_istio_group(api_version: &str) -> bool {
    OTHER_ISTIO_GROUPS
        .iter()
        .any(|g| api_version.starts_with(g))
}

pub(crate) fn is_other_istio(api_version: Option<&str>) -> bool {
    api_version.is_some_and(is_istio_group)
}

/// True for `gateway.networking.k8s.io/...`.
pub(crate) fn is_gateway_api(api_version: &str) -> bool {
    api_version
        .strip_prefix(GATEWAY_API_GROUP)
        .is_some_and(|rest| rest.starts_with('/'))
}

fn check_api_version(kind: Kind, api_version: &str) -> Result<(), String> {
    if kind.api_versions().contains(&api_version) {
        Ok(())
    } else {
        Err(format!(
            "apiVersion `{api_version}` is not served for {kind}; expected one of {}",
            kind.api_versions().join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_compare_by_instant_not_by_text() {
        let t = |s: &str| parse_rfc3339(s).unwrap();
        assert_eq!(t("1970-01-01T00:00:00Z"), (0, 0));
        assert_eq!(t("2024-05-01T12:00:00Z"), (1_714_564_800, 0));
        assert_eq!(t("2024-05-01T14:00:00+02:00"), t("2024-05-01T12:00:00Z"));
        assert!(t("2024-05-01T12:00:00.5Z") > t("2024-05-01T12:00:00Z"));
        assert!(t("2024-05-01T12:00:00Z") < t("2024-05-01T11:00:00-02:00"));
        assert_eq!(t("2000-02-29T00:00:00Z").0, 951_782_400);
        for bad in [
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00:00+0200",
            "2024-05-01T12:00:00.Z",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }
}
