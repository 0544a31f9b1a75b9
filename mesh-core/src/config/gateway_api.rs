//! The Kubernetes Gateway API (`gateway.networking.k8s.io`): `Gateway`, `HTTPRoute`,
//! `GRPCRoute` and `ReferenceGrant`, and their translation into the internal Istio
//! `Gateway` and `VirtualService` resources that the route tables, weighted routing and
//! gateway listeners already serve (ISTIO.md GA-01..GA-14).
//!
//! # Behaviour
//!
//! - A `Gateway` of `gatewayClassName: istio` (GA-01) becomes an internal Istio Gateway of
//!   the same namespace and name, so `mesh-proxy gateway` with `gateway.name`/`namespace`
//!   serves it: one server per `HTTP` or `HTTPS` listener (`port`, `hostname`, or `*`),
//!   an `HTTPS` listener terminating TLS with its first `certificateRefs` Secret as the
//!   `credentialName`. Gateways of other classes are left to their own controller.
//! - An `HTTPRoute` or `GRPCRoute` attaches to its `parentRefs`: a Gateway (optionally one
//!   listener by `sectionName` or `port`, if the listener's `allowedRoutes` admit the
//!   route's namespace and kind), or a Service (`group: ""`, `kind: Service`), which is
//!   Istio's `mesh` parent for east-west traffic (GAMMA, GA-10).
//! - All routes for one parent and host are merged into ONE internal VirtualService
//!   (GA-03), one HTTP route per rule and match, sorted by the Gateway API precedence:
//!   exact path before prefix before regex, longer paths first, then a method match, more
//!   header matches, more query matches; ties keep the order of the routes' creation time
//!   then namespace/name, then rule order. Rules without matches go last.
//! - Path matches (GA-04): `PathPrefix` (the default, `/`) is path-segment aware: `/foo`
//!   matches `/foo` and `/foo/bar`, not `/foobar` (it becomes two routes, `exact: /foo` and
//!   `prefix: /foo/`, so that `ReplacePrefixMatch` rewrites each correctly); `Exact`;
//!   `RegularExpression` (RE2). Headers, query parameters and method map to the
//!   VirtualService matches. GRPCRoute method matches become paths (GA-08).
//! - Filters (GA-05): `RequestHeaderModifier`, `ResponseHeaderModifier`,
//!   `RequestRedirect` (default status 302), `URLRewrite` (`ReplaceFullPath`,
//!   `ReplacePrefixMatch`, `hostname`), `RequestMirror`; backendRef-level filters:
//!   the header modifiers. GRPCRoute: header modifiers and mirror. Any other filter
//!   type is a load error naming the file, line and field: the route is rejected.
//! - `backendRefs` (GA-06): Services (`<name>.<namespace>.svc.cluster.local` at `port`),
//!   weight 1 by default, relative. A rule whose weights are all 0, or with no backend and
//!   no redirect, or whose backends all cannot be resolved, answers 500 itself. A backend
//!   in another namespace needs a `ReferenceGrant` in that namespace that allows the
//!   route's kind and namespace to reach the Service.
//! - `timeouts.request` is the route timeout; `timeouts.backendRequest` the per-try
//!   timeout when `retry` is set, else the route timeout; `0s` means none (GA-07).
//!   `retry`: `attempts` (default 2, `0` disables), `codes`, `backoff`.
//! - Mesh routes (GA-11): a route in the Service's namespace (producer route) applies to
//!   every client; a route in another namespace (consumer route) applies only to clients
//!   of its own namespace, which get 404 for a request none of its rules matches, while
//!   other clients keep reaching the Service directly.
//!
//! # Choices
//!
//! - One internal Gateway per Gateway API Gateway, with every listener as a server; a
//!   route bound by `sectionName` gets the hosts of that listener only, but its
//!   VirtualService applies on every port of the Gateway whose hosts include them.
//! - A backendRef that cannot be resolved next to valid ones keeps its share of the
//!   weight and that share is answered 503 `NC` (Istio answers 500 for it); when every
//!   backend of a rule is unresolvable the rule answers 500 as in Istio.
//! - `TCP`, `TLS` and `UDP` listeners, `Passthrough` TLS, `allowedRoutes.namespaces.from:
//!   Selector` and the `mesh` route `hostnames` are not used: the load warns and the
//!   listener (or field) has no effect. A consumer route is merged with the producer's
//!   routes for the same Service by the precedence above.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::diagnostic::Severity;
use super::{
    Destination, Duration, Gateway, GatewayPort, GatewaySpec, HeaderOperations, Headers,
    HttpDirectResponse, HttpMatchRequest, HttpMirrorPolicy, HttpRedirect, HttpRetry, HttpRewrite,
    HttpRoute, HttpRouteDestination, Labels, Metadata, Percent, PortSelector,
    RedirectPortSelection, RegexRewrite, Resource, Server, ServerTlsMode, ServerTlsSettings,
    StringMatch, VirtualService, VirtualServiceSpec,
};

/// The API group of the Gateway API.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// The annotation carried by the Istio Gateways and VirtualServices generated from
/// Gateway API resources: the resources they came from (`HTTPRoute/ns/name,...`).
pub const GENERATED_FROM: &str = "internal.istio.io/parents";

/// The `gatewayClassName` served (Istio's default class, GA-01).
pub const GATEWAY_CLASS: &str = "istio";

// ---------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------

/// The `spec` of a Gateway API `Gateway`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesGatewaySpec {
    /// The GatewayClass; `istio` is served.
    pub gateway_class_name: String,
    /// Listeners.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    /// Requested addresses (a Hostname means an existing Service, GA-02).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<GatewayAddress>,
    /// Labels and annotations for generated infrastructure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<GatewayInfrastructure>,
}

/// `spec.addresses[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewayAddress {
    /// `IPAddress`, `Hostname` or an implementation-specific type.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The address.
    pub value: String,
}

/// `spec.infrastructure`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewayInfrastructure {
    /// Labels for generated resources.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Annotations for generated resources.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Labels,
    /// Implementation parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters_ref: Option<ObjectRef>,
}

/// One listener of a Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Listener {
    /// Unique name within the Gateway.
    pub name: String,
    /// Host (exact or `*.suffix`) this listener serves; none means every host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Port.
    pub port: u32,
    /// `HTTP`, `HTTPS`, `TLS`, `TCP` or `UDP`.
    pub protocol: String,
    /// TLS settings of `HTTPS` (and `TLS`) listeners.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
    /// Which routes may attach.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// `listeners[].tls`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ListenerTls {
    /// `Terminate` (default) or `Passthrough`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Secrets with the certificate and key.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificate_refs: Vec<ObjectRef>,
    /// Implementation-specific options.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub options: Labels,
}

/// `listeners[].allowedRoutes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AllowedRoutes {
    /// Namespaces routes may come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<RouteNamespaces>,
    /// Route kinds that may attach.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<RouteGroupKind>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Namespace label selector for `Selector`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A Kubernetes label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LabelSelector {
    /// Labels that must match.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: Labels,
    /// Set-based requirements.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    /// Values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// `{group, kind}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteGroupKind {
    /// API group (default `gateway.networking.k8s.io`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind (`HTTPRoute`, `GRPCRoute`, ...).
    pub kind: String,
}

/// A reference to an object (certificate Secret, parameters, extension).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ObjectRef {
    /// API group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the referring object's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `parentRefs[]` of a route.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ParentRef {
    /// API group: `gateway.networking.k8s.io` (default) or `""` for a Service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Gateway` (default) or `Service`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace (default: the route's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Listener name (Gateway parents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// Port (listener port, or Service port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

impl ParentRef {
    /// True for the `mesh` parent: a Service (`group: ""`, `kind: Service`).
    pub fn is_service(&self) -> bool {
        self.group.as_deref() == Some("") && self.kind.as_deref() == Some("Service")
    }
}

/// The `spec` of an `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteSpec {
    /// Gateways or Services the route attaches to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentRef>,
    /// Hosts (exact or `*.suffix`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HttpRouteRule>,
}

/// One `rules[]` entry of an `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteRule {
    /// Rule name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Matches (OR); none means every request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    /// Filters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    /// Timeouts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRouteRetry>,
}

/// `rules[].matches[]` of an `HTTPRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteMatch {
    /// Path match (default `PathPrefix /`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header matches (AND).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameter matches (AND).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatch>,
    /// HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// `matches[].path`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PathMatch {
    /// `PathPrefix` (default), `Exact` or `RegularExpression`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The path (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ValueMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Header or parameter name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A route filter.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteFilter {
    /// The filter type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `RequestHeaderModifier`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    /// `ResponseHeaderModifier`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    /// `RequestRedirect`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    /// `URLRewrite`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    /// `RequestMirror`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
    /// `ExtensionRef` (not supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<ObjectRef>,
    /// `CORS` (not supported).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsFilter>,
}

/// The `cors` filter's fields (loaded so that the filter is reported as unsupported).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CorsFilter {
    /// Allowed origins.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<String>,
    /// Allowed methods.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// Allowed headers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// Exposed headers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// Preflight cache time in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    /// Whether credentials are allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HeaderModifier {
    /// Headers set (replacing).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValuePair>,
    /// Headers added (appending).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValuePair>,
    /// Headers removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// `{name, value}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HeaderValuePair {
    /// Header name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `RequestRedirect`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Host of the `Location`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Path modifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// Port of the `Location`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// 301 or 302 (default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u32>,
}

/// `URLRewrite`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct UrlRewrite {
    /// New `Host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Path modifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// A path modifier of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The new path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    /// What replaces the matched prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

/// `RequestMirror`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestMirror {
    /// Where copies go.
    pub backend_ref: BackendObjectRef,
    /// Percentage of requests mirrored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Fraction of requests mirrored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

/// `{numerator, denominator}` (denominator default 100).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Fraction {
    /// Numerator.
    pub numerator: u32,
    /// Denominator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denominator: Option<u32>,
}

/// A backend object (a Service).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BackendObjectRef {
    /// API group (default `""`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind (default `Service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

/// A weighted backend of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BackendRef {
    /// API group (default `""`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind (default `Service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Service port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Relative weight (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// Filters for this backend only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
}

impl BackendRef {
    fn object(&self) -> BackendObjectRef {
        BackendObjectRef {
            group: self.group.clone(),
            kind: self.kind.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            port: self.port,
        }
    }
}

/// `rules[].timeouts`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteTimeouts {
    /// The whole request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// One request to a backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

/// `rules[].retry`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteRetry {
    /// Status codes retried.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u32>,
    /// Retries (default 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// Base back-off interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
}

/// The `spec` of a `GRPCRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GrpcRouteSpec {
    /// Gateways or Services the route attaches to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentRef>,
    /// Hosts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<GrpcRouteRule>,
}

/// One `rules[]` entry of a `GRPCRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GrpcRouteRule {
    /// Rule name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Matches (OR).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    /// Filters.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

/// `rules[].matches[]` of a `GRPCRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GrpcRouteMatch {
    /// Service and method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    /// Header matches.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
}

/// `matches[].method` of a `GRPCRoute`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Fully qualified service (`pkg.Service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// The `spec` of a `ReferenceGrant`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ReferenceGrantSpec {
    /// Who may refer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<ReferenceGrantFrom>,
    /// To what in this namespace.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<ReferenceGrantTo>,
}

/// `from[]` of a ReferenceGrant.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ReferenceGrantFrom {
    /// API group.
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
}

/// `to[]` of a ReferenceGrant.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ReferenceGrantTo {
    /// API group.
    pub group: String,
    /// Kind.
    pub kind: String,
    /// One object's name; none means all of the kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A Gateway API `Gateway`.
pub type KubernetesGateway = Resource<KubernetesGatewaySpec>;
/// An `HTTPRoute`.
pub type HttpRouteResource = Resource<HttpRouteSpec>;
/// A `GRPCRoute`.
pub type GrpcRouteResource = Resource<GrpcRouteSpec>;
/// A `ReferenceGrant`.
pub type ReferenceGrant = Resource<ReferenceGrantSpec>;

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// Where validation findings go: severity, field path, message.
pub(crate) type Sink<'a> = &'a mut dyn FnMut(Severity, String, String);

const HTTP_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
    "RequestMirror",
];
const GRPC_FILTERS: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
];
const BACKEND_FILTERS: &[&str] = &["RequestHeaderModifier", "ResponseHeaderModifier"];

fn at(base: &str, field: &str) -> String {
    let mut s = base.to_owned();
    super::locate::push_key(&mut s, field);
    s
}

fn at_i(base: &str, field: &str, i: usize) -> String {
    let mut s = at(base, field);
    super::locate::push_index(&mut s, i);
    s
}

fn check_hostname(out: Sink<'_>, path: String, host: &str) {
    let bare = host.strip_prefix("*.").unwrap_or(host);
    let ok = !bare.is_empty()
        && host.len() <= 253
        && !bare.contains('*')
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && host.parse::<std::net::IpAddr>().is_err();
    if !ok {
        out(
            Severity::Error,
            path,
            format!(
                "hostname `{host}` is not valid; expected a lowercase DNS name, optionally \
                 starting with `*.` (IP addresses are not allowed)"
            ),
        );
    }
}

fn check_regex(out: Sink<'_>, path: String, pattern: &str) {
    if let Err(e) = regex::Regex::new(pattern) {
        out(
            Severity::Error,
            path,
            format!("`{pattern}` is not a valid RE2 regular expression: {e}"),
        );
    }
}

fn check_header_name(out: Sink<'_>, path: String, name: &str) {
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        out(
            Severity::Error,
            path,
            format!("`{name}` is not a valid HTTP header name"),
        );
    }
}

fn check_parent_refs(out: Sink<'_>, refs: &[ParentRef]) {
    if refs.is_empty() {
        out(
            Severity::Error,
            "spec.parentRefs".to_owned(),
            "a route needs at least one parentRef (a Gateway, or a Service for mesh traffic)"
                .to_owned(),
        );
    }
    for (i, r) in refs.iter().enumerate() {
        let path = at_i("spec", "parentRefs", i);
        let group = r.group.as_deref().unwrap_or(GATEWAY_API_GROUP);
        let kind = r.kind.as_deref().unwrap_or("Gateway");
        match (group, kind) {
            (GATEWAY_API_GROUP, "Gateway") => {}
            ("", "Service") => {
                if r.section_name.is_some() {
                    out(
                        Severity::Error,
                        at(&path, "sectionName"),
                        "a Service parent has no sections; select a port with `port`".to_owned(),
                    );
                }
            }
            _ => out(
                Severity::Error,
                at(&path, "kind"),
                format!(
                    "parentRef {group}/{kind} is not supported; expected a Gateway \
                     (group {GATEWAY_API_GROUP}) or a Service (group \"\")"
                ),
            ),
        }
        if r.name.is_empty() {
            out(
                Severity::Error,
                at(&path, "name"),
                "missing parent name".to_owned(),
            );
        }
        if let Some(p) = r.port
            && !(1..=65535).contains(&p)
        {
            out(
                Severity::Error,
                at(&path, "port"),
                format!("port {p} is out of range 1-65535"),
            );
        }
    }
}

fn check_value_matches(out: Sink<'_>, base: &str, field: &str, matches: &[ValueMatch]) {
    for (i, m) in matches.iter().enumerate() {
        let path = at_i(base, field, i);
        if field == "headers" {
            check_header_name(out, at(&path, "name"), &m.name);
        } else if m.name.is_empty() {
            out(
                Severity::Error,
                at(&path, "name"),
                "missing query parameter name".to_owned(),
            );
        }
        match m.kind.as_deref().unwrap_or("Exact") {
            "Exact" => {}
            "RegularExpression" => check_regex(out, at(&path, "value"), &m.value),
            other => out(
                Severity::Error,
                at(&path, "type"),
                format!(
                    "match type `{other}` is not supported; expected Exact or RegularExpression"
                ),
            ),
        }
    }
}

fn check_modifier(out: Sink<'_>, path: &str, m: &HeaderModifier) {
    for (i, h) in m.set.iter().enumerate() {
        check_header_name(out, at(&at_i(path, "set", i), "name"), &h.name);
    }
    for (i, h) in m.add.iter().enumerate() {
        check_header_name(out, at(&at_i(path, "add", i), "name"), &h.name);
    }
    for (i, h) in m.remove.iter().enumerate() {
        check_header_name(out, at_i(path, "remove", i), h);
    }
}

fn check_path_modifier(out: Sink<'_>, path: &str, m: &PathModifier, prefix_allowed: bool) {
    match m.kind.as_str() {
        "ReplaceFullPath" => match &m.replace_full_path {
            Some(p) if p.starts_with('/') => {}
            Some(p) => out(
                Severity::Error,
                at(path, "replaceFullPath"),
                format!("path `{p}` must start with `/`"),
            ),
            None => out(
                Severity::Error,
                at(path, "replaceFullPath"),
                "type ReplaceFullPath needs `replaceFullPath`".to_owned(),
            ),
        },
        "ReplacePrefixMatch" => {
            match &m.replace_prefix_match {
                Some(p) if p.is_empty() || p.starts_with('/') => {}
                Some(p) => out(
                    Severity::Error,
                    at(path, "replacePrefixMatch"),
                    format!("path `{p}` must start with `/`"),
                ),
                None => out(
                    Severity::Error,
                    at(path, "replacePrefixMatch"),
                    "type ReplacePrefixMatch needs `replacePrefixMatch`".to_owned(),
                ),
            }
            if !prefix_allowed {
                out(
                    Severity::Error,
                    at(path, "type"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match"
                        .to_owned(),
                );
            }
        }
        other => out(
            Severity::Error,
            at(path, "type"),
            format!(
                "path modifier `{other}` is not supported; expected ReplaceFullPath or \
                 ReplacePrefixMatch"
            ),
        ),
    }
}

fn check_filters(
    out: Sink<'_>,
    base: &str,
    filters: &[HttpRouteFilter],
    allowed: &[&str],
    what: &str,
    prefix_allowed: bool,
) {
    for (i, f) in filters.iter().enumerate() {
        let path = at_i(base, "filters", i);
        if !allowed.contains(&f.kind.as_str()) {
            out(
                Severity::Error,
                at(&path, "type"),
                format!(
                    "unsupported filter type `{}` in {what}: the route is rejected; supported \
                     filters are {}",
                    f.kind,
                    allowed.join(", ")
                ),
            );
            continue;
        }
        let missing = |field: &str| format!("filter type {} needs its `{field}` settings", f.kind);
        match f.kind.as_str() {
            "RequestHeaderModifier" => match &f.request_header_modifier {
                Some(m) => check_modifier(out, &at(&path, "requestHeaderModifier"), m),
                None => out(
                    Severity::Error,
                    path.clone(),
                    missing("requestHeaderModifier"),
                ),
            },
            "ResponseHeaderModifier" => match &f.response_header_modifier {
                Some(m) => check_modifier(out, &at(&path, "responseHeaderModifier"), m),
                None => out(
                    Severity::Error,
                    path.clone(),
                    missing("responseHeaderModifier"),
                ),
            },
            "RequestRedirect" => match &f.request_redirect {
                Some(r) => {
                    let rp = at(&path, "requestRedirect");
                    if let Some(s) = &r.scheme
                        && s != "http"
                        && s != "https"
                    {
                        out(
                            Severity::Error,
                            at(&rp, "scheme"),
                            format!("scheme `{s}` is not supported; expected http or https"),
                        );
                    }
                    if let Some(c) = r.status_code
                        && c != 301
                        && c != 302
                    {
                        out(
                            Severity::Error,
                            at(&rp, "statusCode"),
                            format!("status code {c} is not supported; expected 301 or 302"),
                        );
                    }
                    if let Some(h) = &r.hostname {
                        check_hostname(out, at(&rp, "hostname"), h);
                    }
                    if let Some(p) = &r.path {
                        check_path_modifier(out, &at(&rp, "path"), p, prefix_allowed);
                    }
                }
                None => out(Severity::Error, path.clone(), missing("requestRedirect")),
            },
            "URLRewrite" => match &f.url_rewrite {
                Some(r) => {
                    let rp = at(&path, "urlRewrite");
                    if let Some(h) = &r.hostname {
                        check_hostname(out, at(&rp, "hostname"), h);
                    }
                    if let Some(p) = &r.path {
                        check_path_modifier(out, &at(&rp, "path"), p, prefix_allowed);
                    }
                }
                None => out(Severity::Error, path.clone(), missing("urlRewrite")),
            },
            "RequestMirror" => match &f.request_mirror {
                Some(m) => {
                    let mp = at(&path, "requestMirror");
                    check_backend_kind(
                        out,
                        &at(&mp, "backendRef"),
                        m.backend_ref.group.as_deref(),
                        m.backend_ref.kind.as_deref(),
                        m.backend_ref.port,
                    );
                    if m.percent.is_some_and(|p| p > 100) {
                        out(
                            Severity::Error,
                            at(&mp, "percent"),
                            "percent must be 0 to 100".to_owned(),
                        );
                    }
                    if let Some(fr) = &m.fraction
                        && (fr.denominator == Some(0)
                            || fr.numerator > fr.denominator.unwrap_or(100))
                    {
                        out(
                            Severity::Error,
                            at(&mp, "fraction"),
                            "a fraction needs 0 <= numerator <= denominator and a denominator \
                             above 0"
                                .to_owned(),
                        );
                    }
                }
                None => out(Severity::Error, path.clone(), missing("requestMirror")),
            },
            _ => {}
        }
    }
}

fn check_backend_kind(
    out: Sink<'_>,
    path: &str,
    group: Option<&str>,
    kind: Option<&str>,
    port: Option<u32>,
) {
    let (group, kind) = (group.unwrap_or(""), kind.unwrap_or("Service"));
    if !group.is_empty() || kind != "Service" {
        out(
            Severity::Error,
            at(path, "kind"),
            format!("backend {group}/{kind} is not supported; expected a Service (group \"\")"),
        );
        return;
    }
    match port {
        None => out(
            Severity::Error,
            at(path, "port"),
            "a Service backend needs `port`".to_owned(),
        ),
        Some(p) if !(1..=65535).contains(&p) => out(
            Severity::Error,
            at(path, "port"),
            format!("port {p} is out of range 1-65535"),
        ),
        Some(_) => {}
    }
}

fn check_backends(out: Sink<'_>, base: &str, backends: &[BackendRef]) {
    for (i, b) in backends.iter().enumerate() {
        let path = at_i(base, "backendRefs", i);
        check_backend_kind(out, &path, b.group.as_deref(), b.kind.as_deref(), b.port);
        if let Some(w) = b.weight
            && !(0..=1_000_000).contains(&w)
        {
            out(
                Severity::Error,
                at(&path, "weight"),
                format!("weight {w} is out of range; weights are 0 to 1000000"),
            );
        }
        check_filters(
            out,
            &path,
            &b.filters,
            BACKEND_FILTERS,
            "a backendRef",
            false,
        );
    }
}

fn check_hostnames(out: Sink<'_>, hostnames: &[String]) {
    for (i, h) in hostnames.iter().enumerate() {
        check_hostname(out, at_i("spec", "hostnames", i), h);
    }
}

/// Validates a Gateway API Gateway.
pub(crate) fn validate_gateway(gw: &KubernetesGateway, out: Sink<'_>) {
    let s = &gw.spec;
    if s.gateway_class_name.is_empty() {
        out(
            Severity::Error,
            "spec.gatewayClassName".to_owned(),
            "missing field `gatewayClassName`".to_owned(),
        );
    } else if s.gateway_class_name != GATEWAY_CLASS {
        out(
            Severity::Warning,
            "spec.gatewayClassName".to_owned(),
            format!(
                "gatewayClassName `{}` is not `{GATEWAY_CLASS}`: this Gateway belongs to another \
                 controller and is not served",
                s.gateway_class_name
            ),
        );
    }
    let mut names = HashSet::new();
    for (i, l) in s.listeners.iter().enumerate() {
        let path = at_i("spec", "listeners", i);
        if l.name.is_empty() {
            out(
                Severity::Error,
                at(&path, "name"),
                "missing listener name".to_owned(),
            );
        } else if !names.insert(l.name.as_str()) {
            out(
                Severity::Error,
                at(&path, "name"),
                format!("listener name `{}` is used twice", l.name),
            );
        }
        if !(1..=65535).contains(&l.port) {
            out(
                Severity::Error,
                at(&path, "port"),
                format!("port {} is out of range 1-65535", l.port),
            );
        }
        if let Some(h) = &l.hostname {
            check_hostname(out, at(&path, "hostname"), h);
        }
        match l.protocol.as_str() {
            "HTTP" => {}
            "HTTPS" => {
                let tls = l.tls.clone().unwrap_or_default();
                if tls.mode.as_deref().is_some_and(|m| m != "Terminate") {
                    out(
                        Severity::Error,
                        at(&at(&path, "tls"), "mode"),
                        "an HTTPS listener terminates TLS; Passthrough needs protocol TLS"
                            .to_owned(),
                    );
                }
                if tls.certificate_refs.is_empty() {
                    out(
                        Severity::Error,
                        at(&path, "tls"),
                        "an HTTPS listener needs `tls.certificateRefs`".to_owned(),
                    );
                }
                for (j, c) in tls.certificate_refs.iter().enumerate() {
                    let cp = at_i(&at(&path, "tls"), "certificateRefs", j);
                    if c.group.as_ref().is_some_and(|g| !g.is_empty())
                        || c.kind.as_deref().unwrap_or("Secret") != "Secret"
                    {
                        out(
                            Severity::Error,
                            at(&cp, "kind"),
                            "a certificate reference must be a Secret (group \"\")".to_owned(),
                        );
                    }
                    if c.namespace
                        .as_ref()
                        .is_some_and(|n| *n != gw.metadata.namespace)
                    {
                        out(
                            Severity::Error,
                            at(&cp, "namespace"),
                            "the Secret must be in the Gateway's namespace; another \
                             namespace's key is never served"
                                .to_owned(),
                        );
                    }
                    if !super::validate::is_dns1123_subdomain(&c.name) {
                        out(
                            Severity::Error,
                            at(&cp, "name"),
                            format!("`{}` is not a valid Secret name", c.name),
                        );
                    }
                }
            }
            "TLS" | "TCP" | "UDP" => out(
                Severity::Warning,
                at(&path, "protocol"),
                format!(
                    "protocol {} is not supported (TLSRoute, TCPRoute and UDPRoute are not \
                     loaded): this listener is not served",
                    l.protocol
                ),
            ),
            other => out(
                Severity::Error,
                at(&path, "protocol"),
                format!("protocol `{other}` is not supported; expected HTTP or HTTPS"),
            ),
        }
        if let Some(ar) = &l.allowed_routes {
            let ap = at(&path, "allowedRoutes");
            if let Some(ns) = &ar.namespaces {
                match ns.from.as_deref().unwrap_or("Same") {
                    "Same" | "All" => {}
                    "Selector" => out(
                        Severity::Warning,
                        at(&at(&ap, "namespaces"), "from"),
                        "`from: Selector` is not supported (namespace labels are not known \
                         here): only routes of the Gateway's namespace attach"
                            .to_owned(),
                    ),
                    other => out(
                        Severity::Error,
                        at(&at(&ap, "namespaces"), "from"),
                        format!("`{other}` is not valid; expected Same, All or Selector"),
                    ),
                }
            }
        }
    }
}

fn path_match_is_prefix(m: &HttpRouteMatch) -> bool {
    m.path
        .as_ref()
        .is_none_or(|p| p.kind.as_deref().unwrap_or("PathPrefix") == "PathPrefix")
}

/// Validates an HTTPRoute.
pub(crate) fn validate_http_route(r: &HttpRouteResource, out: Sink<'_>) {
    check_parent_refs(out, &r.spec.parent_refs);
    check_hostnames(out, &r.spec.hostnames);
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let rp = at_i("spec", "rules", i);
        for (j, m) in rule.matches.iter().enumerate() {
            let mp = at_i(&rp, "matches", j);
            if let Some(p) = &m.path {
                let pp = at(&mp, "path");
                let value = p.value.as_deref().unwrap_or("/");
                match p.kind.as_deref().unwrap_or("PathPrefix") {
                    "PathPrefix" | "Exact" => {
                        if !value.starts_with('/') {
                            out(
                                Severity::Error,
                                at(&pp, "value"),
                                format!("path `{value}` must start with `/`"),
                            );
                        }
                    }
                    "RegularExpression" => check_regex(out, at(&pp, "value"), value),
                    other => out(
                        Severity::Error,
                        at(&pp, "type"),
                        format!(
                            "path match type `{other}` is not supported; expected PathPrefix, \
                             Exact or RegularExpression"
                        ),
                    ),
                }
            }
            check_value_matches(out, &mp, "headers", &m.headers);
            check_value_matches(out, &mp, "queryParams", &m.query_params);
            if let Some(method) = &m.method
                && http::Method::from_bytes(method.as_bytes()).is_err()
            {
                out(
                    Severity::Error,
                    at(&mp, "method"),
                    format!("`{method}` is not an HTTP method"),
                );
            }
        }
        let prefix_only = rule.matches.iter().all(path_match_is_prefix);
        check_filters(
            out,
            &rp,
            &rule.filters,
            HTTP_FILTERS,
            "an HTTPRoute",
            prefix_only,
        );
        let (mut redirect, mut rewrite) = (false, false);
        for f in &rule.filters {
            redirect |= f.kind == "RequestRedirect";
            rewrite |= f.kind == "URLRewrite";
        }
        if redirect && (rewrite || !rule.backend_refs.is_empty()) {
            out(
                Severity::Error,
                at(&rp, "filters"),
                "RequestRedirect cannot be combined with URLRewrite or backendRefs".to_owned(),
            );
        }
        check_backends(out, &rp, &rule.backend_refs);
        if let Some(t) = &rule.timeouts
            && let (Some(req), Some(backend)) = (t.request, t.backend_request)
            && req != Duration::default()
            && backend > req
        {
            out(
                Severity::Error,
                at(&at(&rp, "timeouts"), "backendRequest"),
                format!("backendRequest {backend} is longer than request {req}"),
            );
        }
        if let Some(rt) = &rule.retry {
            if rt.attempts.is_some_and(|a| a < 0) {
                out(
                    Severity::Error,
                    at(&at(&rp, "retry"), "attempts"),
                    "attempts must be 0 or more".to_owned(),
                );
            }
            for (k, c) in rt.codes.iter().enumerate() {
                if !(400..=599).contains(c) {
                    out(
                        Severity::Error,
                        at_i(&at(&rp, "retry"), "codes", k),
                        format!("status {c} cannot be retried; expected 400 to 599"),
                    );
                }
            }
        }
    }
}

/// Validates a GRPCRoute.
pub(crate) fn validate_grpc_route(r: &GrpcRouteResource, out: Sink<'_>) {
    check_parent_refs(out, &r.spec.parent_refs);
    check_hostnames(out, &r.spec.hostnames);
    for (i, rule) in r.spec.rules.iter().enumerate() {
        let rp = at_i("spec", "rules", i);
        for (j, m) in rule.matches.iter().enumerate() {
            let mp = at_i(&rp, "matches", j);
            if let Some(mm) = &m.method {
                let p = at(&mp, "method");
                if mm.service.is_none() && mm.method.is_none() {
                    out(
                        Severity::Error,
                        p.clone(),
                        "a method match needs `service`, `method` or both".to_owned(),
                    );
                }
                match mm.kind.as_deref().unwrap_or("Exact") {
                    "Exact" => {
                        for (field, v) in [("service", &mm.service), ("method", &mm.method)] {
                            if let Some(v) = v
                                && (v.is_empty() || v.contains('/'))
                            {
                                out(
                                    Severity::Error,
                                    at(&p, field),
                                    format!("`{v}` is not a gRPC {field} name"),
                                );
                            }
                        }
                    }
                    "RegularExpression" => {
                        for (field, v) in [("service", &mm.service), ("method", &mm.method)] {
                            if let Some(v) = v {
                                check_regex(out, at(&p, field), v);
                            }
                        }
                    }
                    other => out(
                        Severity::Error,
                        at(&p, "type"),
                        format!(
                            "method match type `{other}` is not supported; expected Exact or \
                             RegularExpression"
                        ),
                    ),
                }
            }
            check_value_matches(out, &mp, "headers", &m.headers);
        }
        check_filters(out, &rp, &rule.filters, GRPC_FILTERS, "a GRPCRoute", false);
        check_backends(out, &rp, &rule.backend_refs);
    }
}

/// Validates a ReferenceGrant.
pub(crate) fn validate_reference_grant(r: &ReferenceGrant, out: Sink<'_>) {
    for (i, f) in r.spec.from.iter().enumerate() {
        if f.namespace.is_empty() {
            out(
                Severity::Error,
                at(&at_i("spec", "from", i), "namespace"),
                "missing namespace".to_owned(),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Translation
// ---------------------------------------------------------------------------------------

/// The Gateway API resources of one snapshot, and what they need to know of the rest.
pub(crate) struct Input<'a> {
    pub gateways: &'a [KubernetesGateway],
    pub http_routes: &'a [HttpRouteResource],
    pub grpc_routes: &'a [GrpcRouteResource],
    pub grants: &'a [ReferenceGrant],
    /// Qualified hosts of the registry (ServiceEntries, Kubernetes Services).
    pub services: &'a HashSet<String>,
}

/// The internal resources generated from the Gateway API resources.
#[derive(Default)]
pub(crate) struct Output {
    pub gateways: Vec<Gateway>,
    pub virtual_services: Vec<VirtualService>,
}

/// A route of either kind, reduced to what translation needs.
struct RouteRef<'a> {
    kind: &'static str,
    metadata: &'a Metadata,
    origin: &'a super::Origin,
    parents: &'a [ParentRef],
    hostnames: &'a [String],
    age: (Option<(i64, u32)>, usize),
    /// Per rule: its match entries and the rule's action.
    rules: Vec<(Vec<MatchEntry>, RuleAction<'a>)>,
}

/// A match of a rule in a form common to both route kinds.
#[derive(Clone, Debug, Default)]
struct MatchEntry {
    path: PathKind,
    headers: BTreeMap<String, StringMatch>,
    query: BTreeMap<String, StringMatch>,
    method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
enum PathKind {
    /// No path condition (a GRPCRoute match without a method).
    #[default]
    Any,
    Exact(String),
    /// Segment-aware prefix, without a trailing `/` (`""` = everything).
    Prefix(String),
    Regex(String),
}

impl PathKind {
    /// Exact 3, prefix 2, regex 1 (GA-03).
    fn rank(&self) -> u8 {
        match self {
            PathKind::Exact(_) => 3,
            PathKind::Prefix(_) | PathKind::Any => 2,
            PathKind::Regex(_) => 1,
        }
    }

    fn len(&self) -> usize {
        match self {
            PathKind::Any => 1,
            PathKind::Prefix(p) => p.len().max(1),
            PathKind::Exact(p) | PathKind::Regex(p) => p.len(),
        }
    }
}

struct RuleAction<'a> {
    name: Option<&'a str>,
    filters: &'a [HttpRouteFilter],
    backends: &'a [BackendRef],
    timeouts: Option<&'a HttpRouteTimeouts>,
    retry: Option<&'a HttpRouteRetry>,
}

fn value_matches(list: &[ValueMatch], lowercase: bool) -> BTreeMap<String, StringMatch> {
    let mut out = BTreeMap::new();
    for m in list {
        let name = if lowercase {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        };
        // The first match of a name wins (Gateway API).
        out.entry(name).or_insert_with(|| {
            if m.kind.as_deref() == Some("RegularExpression") {
                StringMatch::Regex(m.value.clone())
            } else {
                StringMatch::Exact(m.value.clone())
            }
        });
    }
    out
}

fn http_entry(m: &HttpRouteMatch) -> MatchEntry {
    let path = match &m.path {
        None => PathKind::Prefix(String::new()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
            match p.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathKind::Exact(value),
                "RegularExpression" => PathKind::Regex(value),
                _ => PathKind::Prefix(value.trim_end_matches('/').to_owned()),
            }
        }
    };
    MatchEntry {
        path,
        headers: value_matches(&m.headers, true),
        query: value_matches(&m.query_params, false),
        method: m.method.clone(),
    }
}

/// GA-08: a gRPC method match as a path match.
fn grpc_entry(m: &GrpcRouteMatch) -> MatchEntry {
    let path = match &m.method {
        None => PathKind::Any,
        Some(mm) => {
            let regex = mm.kind.as_deref() == Some("RegularExpression");
            match (mm.service.as_deref(), mm.method.as_deref(), regex) {
                (Some(s), Some(me), false) => PathKind::Exact(format!("/{s}/{me}")),
                (Some(s), None, false) => PathKind::Regex(format!("/{}/[^/]+", regex::escape(s))),
                (None, Some(me), false) => PathKind::Regex(format!("/[^/]+/{}", regex::escape(me))),
                (Some(s), Some(me), true) => PathKind::Regex(format!("/{s}/{me}")),
                (Some(s), None, true) => PathKind::Regex(format!("/{s}/[^/]+")),
                (None, Some(me), true) => PathKind::Regex(format!("/[^/]+/{me}")),
                (None, None, _) => PathKind::Any,
            }
        }
    };
    MatchEntry {
        path,
        headers: value_matches(&m.headers, true),
        query: BTreeMap::new(),
        method: None,
    }
}

fn http_route_ref(r: &HttpRouteResource) -> RouteRef<'_> {
    RouteRef {
        kind: "HTTPRoute",
        metadata: &r.metadata,
        origin: &r.origin,
        parents: &r.spec.parent_refs,
        hostnames: &r.spec.hostnames,
        age: r.age_key(),
        rules: r
            .spec
            .rules
            .iter()
            .map(|rule| {
                (
                    rule.matches.iter().map(http_entry).collect(),
                    RuleAction {
                        name: rule.name.as_deref(),
                        filters: &rule.filters,
                        backends: &rule.backend_refs,
                        timeouts: rule.timeouts.as_ref(),
                        retry: rule.retry.as_ref(),
                    },
                )
            })
            .collect(),
    }
}

fn grpc_route_ref(r: &GrpcRouteResource) -> RouteRef<'_> {
    RouteRef {
        kind: "GRPCRoute",
        metadata: &r.metadata,
        origin: &r.origin,
        parents: &r.spec.parent_refs,
        hostnames: &r.spec.hostnames,
        age: r.age_key(),
        rules: r
            .spec
            .rules
            .iter()
            .map(|rule| {
                (
                    rule.matches.iter().map(grpc_entry).collect(),
                    RuleAction {
                        name: rule.name.as_deref(),
                        filters: &rule.filters,
                        backends: &rule.backend_refs,
                        timeouts: None,
                        retry: None,
                    },
                )
            })
            .collect(),
    }
}

/// `*` covers every host; `*.example.com` covers `a.example.com`, not `example.com`.
fn covers(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || pattern == host
        || pattern.strip_prefix('*').is_some_and(|suffix| {
            suffix.starts_with('.') && host.len() > suffix.len() && host.ends_with(suffix)
        })
}

/// The hosts a route serves on a listener: the route's hostnames intersected with the
/// listener's hostname (none means every host).
fn listener_hosts(route_hosts: &[String], listener: Option<&str>) -> Vec<String> {
    let listener = listener.unwrap_or("*");
    if route_hosts.is_empty() {
        return vec![listener.to_owned()];
    }
    let mut out = Vec::new();
    for h in route_hosts {
        let chosen = if covers(listener, h) {
            Some(h.clone())
        } else if covers(h, listener) {
            Some(listener.to_owned())
        } else {
            None
        };
        if let Some(c) = chosen
            && !out.contains(&c)
        {
            out.push(c);
        }
    }
    out
}

fn listener_admits(gw: &KubernetesGateway, l: &Listener, route_ns: &str, kind: &str) -> bool {
    if !matches!(l.protocol.as_str(), "HTTP" | "HTTPS") {
        return false;
    }
    let ar = l.allowed_routes.clone().unwrap_or_default();
    let ns_ok = match ar
        .namespaces
        .as_ref()
        .and_then(|n| n.from.as_deref())
        .unwrap_or("Same")
    {
        "All" => true,
        _ => route_ns == gw.metadata.namespace,
    };
    let kind_ok = ar.kinds.is_empty()
        || ar.kinds.iter().any(|k| {
            k.kind == kind && k.group.as_deref().unwrap_or(GATEWAY_API_GROUP) == GATEWAY_API_GROUP
        });
    ns_ok && kind_ok
}

/// Whether a ReferenceGrant lets `from_kind` routes of `from_ns` use Service `name` in
/// `to_ns`.
fn granted(
    grants: &[ReferenceGrant],
    from_kind: &str,
    from_ns: &str,
    to_ns: &str,
    name: &str,
) -> bool {
    grants.iter().any(|g| {
        g.metadata.namespace == to_ns
            && g.spec.from.iter().any(|f| {
                f.group == GATEWAY_API_GROUP && f.kind == from_kind && f.namespace == from_ns
            })
            && g.spec.to.iter().any(|t| {
                t.group.is_empty()
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == name)
            })
    })
}

/// Where a parent attaches: a Gateway `namespace/name` or the mesh host of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ParentKey {
    Gateway(String, String),
    Mesh(String, String, String),
}

/// One rule+match entry of a merged VirtualService.
struct Entry<'a> {
    route: &'a RouteRef<'a>,
    rule: usize,
    entry: Option<MatchEntry>,
    /// Port of a Service parent.
    port: Option<u32>,
    /// `Some(ns)` for a consumer route: only clients of `ns`.
    consumer: Option<String>,
}

/// Translates the Gateway API resources of a snapshot (GA-01..GA-11).
pub(crate) fn translate(input: &Input<'_>) -> Output {
    let mut out = Output::default();
    let served: Vec<&KubernetesGateway> = input
        .gateways
        .iter()
        .filter(|g| g.spec.gateway_class_name == GATEWAY_CLASS)
        .collect();
    for gw in &served {
        out.gateways.push(internal_gateway(gw));
    }
    let mut routes: Vec<RouteRef<'_>> = input
        .http_routes
        .iter()
        .map(http_route_ref)
        .chain(input.grpc_routes.iter().map(grpc_route_ref))
        .collect();
    // Ties of the precedence keep the routes' creation order, then namespace/name.
    routes.sort_by(|a, b| {
        a.age.0.cmp(&b.age.0).then_with(|| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        })
    });
    let mut groups: BTreeMap<(ParentKey, String), Vec<Entry<'_>>> = BTreeMap::new();
    for route in &routes {
        let rns = route.metadata.namespace.as_str();
        for parent in route.parents {
            let pns = parent.namespace.clone().unwrap_or_else(|| rns.to_owned());
            let mut targets: Vec<(ParentKey, String, Option<u32>, Option<String>)> = Vec::new();
            if parent.is_service() {
                let host = format!("{}.{pns}.svc.cluster.local", parent.name);
                let consumer = (pns != rns).then(|| rns.to_owned());
                targets.push((
                    ParentKey::Mesh(
                        pns.clone(),
                        host.clone(),
                        parent.port.map_or(String::new(), |p| p.to_string()),
                    ),
                    host,
                    parent.port,
                    consumer,
                ));
            } else {
                let Some(gw) = served
                    .iter()
                    .find(|g| g.metadata.namespace == pns && g.metadata.name == parent.name)
                else {
                    continue;
                };
                let mut hosts: Vec<String> = Vec::new();
                for l in &gw.spec.listeners {
                    if parent.section_name.as_ref().is_some_and(|s| *s != l.name)
                        || parent.port.is_some_and(|p| p != l.port)
                        || !listener_admits(gw, l, rns, route.kind)
                    {
                        continue;
                    }
                    for h in listener_hosts(route.hostnames, l.hostname.as_deref()) {
                        if !hosts.contains(&h) {
                            hosts.push(h);
                        }
                    }
                }
                for h in hosts {
                    targets.push((
                        ParentKey::Gateway(pns.clone(), parent.name.clone()),
                        h,
                        None,
                        None,
                    ));
                }
            }
            for (key, host, port, consumer) in targets {
                let group = groups.entry((key, host)).or_default();
                for (rule, (entries, _)) in route.rules.iter().enumerate() {
                    if entries.is_empty() {
                        group.push(Entry {
                            route,
                            rule,
                            entry: None,
                            port,
                            consumer: consumer.clone(),
                        });
                    }
                    for e in entries {
                        group.push(Entry {
                            route,
                            rule,
                            entry: Some(e.clone()),
                            port,
                            consumer: consumer.clone(),
                        });
                    }
                }
            }
        }
    }
    for ((key, host), mut entries) in groups {
        sort_entries(&mut entries);
        out.virtual_services
            .push(merged_virtual_service(input, &key, &host, &entries));
    }
    out
}

/// GA-03: the Gateway API precedence, stable over the creation order.
fn sort_entries(entries: &mut [Entry<'_>]) {
    entries.sort_by(|a, b| {
        use std::cmp::Ordering;
        match (&a.entry, &b.entry) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => y
                .path
                .rank()
                .cmp(&x.path.rank())
                .then_with(|| y.path.len().cmp(&x.path.len()))
                .then_with(|| y.method.is_some().cmp(&x.method.is_some()))
                .then_with(|| y.headers.len().cmp(&x.headers.len()))
                .then_with(|| y.query.len().cmp(&x.query.len())),
        }
    });
}

fn internal_gateway(gw: &KubernetesGateway) -> Gateway {
    let mut servers = Vec::new();
    for l in &gw.spec.listeners {
        if !matches!(l.protocol.as_str(), "HTTP" | "HTTPS") {
            continue;
        }
        let host = l.hostname.clone().unwrap_or_else(|| "*".to_owned());
        let tls = (l.protocol == "HTTPS").then(|| ServerTlsSettings {
            mode: Some(ServerTlsMode::Simple),
            credential_name: l
                .tls
                .as_ref()
                .and_then(|t| t.certificate_refs.first())
                .map(|c| c.name.clone()),
            ..ServerTlsSettings::default()
        });
        servers.push(Server {
            port: Some(GatewayPort {
                number: l.port,
                protocol: l.protocol.clone(),
                name: l.name.clone(),
                target_port: None,
            }),
            // Routes are admitted per listener at translation; the generated
            // VirtualServices live in the Gateway's namespace.
            hosts: vec![format!("./{host}")],
            tls,
            name: Some(l.name.clone()),
            ..Server::default()
        });
    }
    let mut metadata = gw.metadata.clone();
    metadata.annotations.insert(
        GENERATED_FROM.to_owned(),
        format!(
            "Gateway.{GATEWAY_API_GROUP}/{}/{}",
            gw.metadata.namespace, gw.metadata.name
        ),
    );
    Resource {
        api_version: "networking.istio.io/v1".to_owned(),
        metadata,
        spec: GatewaySpec {
            servers,
            selector: Labels::from([(
                "gateway.networking.k8s.io/gateway-name".to_owned(),
                gw.metadata.name.clone(),
            )]),
        },
        origin: gw.origin.clone(),
    }
}

fn header_ops(m: &HeaderModifier) -> HeaderOperations {
    HeaderOperations {
        set: m
            .set
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        add: m
            .add
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect(),
        remove: m.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
    }
}

fn filter_headers(filters: &[HttpRouteFilter]) -> Option<Headers> {
    let mut h = Headers::default();
    for f in filters {
        if let Some(m) = &f.request_header_modifier
            && f.kind == "RequestHeaderModifier"
        {
            h.request = Some(header_ops(m));
        }
        if let Some(m) = &f.response_header_modifier
            && f.kind == "ResponseHeaderModifier"
        {
            h.response = Some(header_ops(m));
        }
    }
    (h != Headers::default()).then_some(h)
}

/// The qualified host of a Service backend, if the route may use it and it exists.
fn resolve_backend(
    input: &Input<'_>,
    route: &RouteRef<'_>,
    b: &BackendObjectRef,
) -> Option<Destination> {
    if b.group.as_ref().is_some_and(|g| !g.is_empty())
        || b.kind.as_deref().unwrap_or("Service") != "Service"
    {
        return None;
    }
    let rns = route.metadata.namespace.as_str();
    let ns = b.namespace.as_deref().unwrap_or(rns);
    if ns != rns && !granted(input.grants, route.kind, rns, ns, &b.name) {
        return None;
    }
    let host = format!("{}.{ns}.svc.cluster.local", b.name);
    if !input.services.contains(&host) {
        return None;
    }
    Some(Destination {
        host,
        subset: None,
        port: b.port.map(|number| PortSelector { number }),
    })
}

fn matches_for(e: &Entry<'_>) -> Vec<Vec<HttpMatchRequest>> {
    let base = |uri: Option<StringMatch>, m: &MatchEntry| HttpMatchRequest {
        uri,
        method: m.method.clone().map(StringMatch::Exact),
        headers: m.headers.clone(),
        query_params: m.query.clone(),
        port: e.port,
        source_namespace: e.consumer.clone(),
        ..HttpMatchRequest::default()
    };
    let Some(m) = &e.entry else {
        // No matches: every request (of the consumer's namespace, for a consumer route).
        return vec![if e.port.is_some() || e.consumer.is_some() {
            vec![base(None, &MatchEntry::default())]
        } else {
            Vec::new()
        }];
    };
    match &m.path {
        PathKind::Any => vec![vec![base(None, m)]],
        PathKind::Exact(p) => vec![vec![base(Some(StringMatch::Exact(p.clone())), m)]],
        PathKind::Regex(p) => vec![vec![base(Some(StringMatch::Regex(p.clone())), m)]],
        PathKind::Prefix(p) if p.is_empty() => {
            vec![vec![base(Some(StringMatch::Prefix("/".to_owned())), m)]]
        }
        // Segment-aware prefix (GA-04): the path itself, then anything below it; two
        // routes so that a prefix replacement rewrites each form correctly.
        PathKind::Prefix(p) => vec![
            vec![base(Some(StringMatch::Exact(p.clone())), m)],
            vec![base(Some(StringMatch::Prefix(format!("{p}/"))), m)],
        ],
    }
}

/// The replacement for a `ReplacePrefixMatch` on the route whose uri match is `uri`.
fn prefix_replacement(replace: &str, uri: Option<&StringMatch>) -> String {
    let r = replace.trim_end_matches('/');
    match uri {
        // The exact form `/foo` of a prefix: the whole path is the prefix.
        Some(StringMatch::Exact(_)) => {
            if r.is_empty() {
                "/".to_owned()
            } else {
                r.to_owned()
            }
        }
        // `/foo/` (or `/`) is replaced, its slash kept.
        _ => format!("{r}/"),
    }
}

fn mirror_percent(m: &RequestMirror) -> Option<Percent> {
    if let Some(p) = m.percent {
        return Some(Percent {
            value: f64::from(p),
        });
    }
    m.fraction.as_ref().map(|f| Percent {
        value: f64::from(f.numerator) * 100.0 / f64::from(f.denominator.unwrap_or(100).max(1)),
    })
}

fn direct(status: u32) -> HttpDirectResponse {
    HttpDirectResponse { status, body: None }
}

fn merged_virtual_service(
    input: &Input<'_>,
    key: &ParentKey,
    host: &str,
    entries: &[Entry<'_>],
) -> VirtualService {
    let mut http = Vec::new();
    let mut parents: Vec<String> = Vec::new();
    let mut consumers: Vec<String> = Vec::new();
    for e in entries {
        let route = e.route;
        let id = format!(
            "{}/{}/{}",
            route.kind, route.metadata.namespace, route.metadata.name
        );
        if !parents.contains(&id) {
            parents.push(id);
        }
        if let Some(ns) = &e.consumer
            && !consumers.contains(ns)
        {
            consumers.push(ns.clone());
        }
    }
    // GA-11: a client's own-namespace (consumer) routes are chosen over the producer's:
    // their rules come first, restricted to that namespace, and end in a 404 for it.
    // The producer's rules (or the Service itself) serve every other client.
    let port = match key {
        ParentKey::Mesh(_, _, port) => port.parse::<u32>().ok(),
        ParentKey::Gateway(..) => None,
    };
    let push = |e: &Entry<'_>, http: &mut Vec<HttpRoute>| {
        let action = &e.route.rules[e.rule].1;
        for matches in matches_for(e) {
            let uri = matches.first().and_then(|m| m.uri.clone());
            http.push(vs_route(
                input,
                e.route,
                e.rule,
                action,
                matches,
                uri.as_ref(),
            ));
        }
    };
    for ns in &consumers {
        for e in entries.iter().filter(|e| e.consumer.as_ref() == Some(ns)) {
            push(e, &mut http);
        }
        http.push(HttpRoute {
            matches: vec![HttpMatchRequest {
                source_namespace: Some(ns.clone()),
                port,
                ..HttpMatchRequest::default()
            }],
            direct_response: Some(direct(404)),
            ..HttpRoute::default()
        });
    }
    let mut producers = 0;
    for e in entries.iter().filter(|e| e.consumer.is_none()) {
        push(e, &mut http);
        producers += 1;
    }
    if producers == 0 && !consumers.is_empty() {
        http.push(HttpRoute {
            route: vec![HttpRouteDestination {
                destination: Destination {
                    host: host.to_owned(),
                    subset: None,
                    port: port.map(|number| PortSelector { number }),
                },
                weight: None,
                headers: None,
            }],
            ..HttpRoute::default()
        });
    }
    let (namespace, name, gateways) = match key {
        ParentKey::Gateway(ns, name) => (
            ns.clone(),
            format!(
                "{name}-{}-istio-autogenerated-k8s-gateway",
                host.replace('*', "wildcard")
            ),
            vec![format!("{ns}/{name}")],
        ),
        ParentKey::Mesh(ns, _, port) => (
            ns.clone(),
            format!(
                "{host}{}-istio-autogenerated-k8s-mesh",
                if port.is_empty() {
                    String::new()
                } else {
                    format!("-{port}")
                }
            ),
            Vec::new(),
        ),
    };
    let first = entries.first().map(|e| e.route);
    let mut metadata = Metadata {
        name,
        namespace,
        ..Metadata::default()
    };
    metadata
        .annotations
        .insert(GENERATED_FROM.to_owned(), parents.join(","));
    metadata.annotations.insert(
        "internal.istio.io/route-semantics".to_owned(),
        "gateway".to_owned(),
    );
    Resource {
        api_version: "networking.istio.io/v1".to_owned(),
        metadata,
        spec: VirtualServiceSpec {
            hosts: vec![host.to_owned()],
            gateways,
            http,
            ..VirtualServiceSpec::default()
        },
        origin: first.map(|r| r.origin.clone()).unwrap_or_default(),
    }
}

fn vs_route(
    input: &Input<'_>,
    route: &RouteRef<'_>,
    rule: usize,
    action: &RuleAction<'_>,
    matches: Vec<HttpMatchRequest>,
    uri: Option<&StringMatch>,
) -> HttpRoute {
    let mut r = HttpRoute {
        name: Some(match action.name {
            Some(n) => format!("{}.{}.{n}", route.metadata.namespace, route.metadata.name),
            None => format!(
                "{}.{}.{rule}",
                route.metadata.namespace, route.metadata.name
            ),
        }),
        matches,
        headers: filter_headers(action.filters),
        ..HttpRoute::default()
    };
    for f in action.filters {
        match f.kind.as_str() {
            "RequestRedirect" => {
                let Some(rd) = &f.request_redirect else {
                    continue;
                };
                let mut red = HttpRedirect {
                    authority: rd.hostname.clone(),
                    scheme: rd.scheme.clone(),
                    port: rd.port,
                    redirect_code: Some(rd.status_code.unwrap_or(302)),
                    ..HttpRedirect::default()
                };
                if rd.port.is_none() {
                    red.derive_port = Some(if rd.scheme.is_some() {
                        RedirectPortSelection::FromProtocolDefault
                    } else {
                        RedirectPortSelection::FromRequestPort
                    });
                }
                if let Some(p) = &rd.path {
                    match (
                        p.replace_full_path.as_ref(),
                        p.replace_prefix_match.as_ref(),
                    ) {
                        (Some(full), _) if p.kind == "ReplaceFullPath" => {
                            red.uri = Some(full.clone());
                        }
                        (_, Some(prefix)) => {
                            red.prefix_rewrite = Some(prefix_replacement(prefix, uri));
                        }
                        _ => {}
                    }
                }
                r.redirect = Some(red);
            }
            "URLRewrite" => {
                let Some(rw) = &f.url_rewrite else { continue };
                let mut rewrite = HttpRewrite {
                    authority: rw.hostname.clone(),
                    ..HttpRewrite::default()
                };
                if let Some(p) = &rw.path {
                    match (
                        p.replace_full_path.as_ref(),
                        p.replace_prefix_match.as_ref(),
                    ) {
                        (Some(full), _) if p.kind == "ReplaceFullPath" => {
                            rewrite.uri_regex_rewrite = Some(RegexRewrite {
                                pattern: "^.*$".to_owned(),
                                rewrite: full.clone(),
                            });
                        }
                        (_, Some(prefix)) => {
                            rewrite.uri = Some(prefix_replacement(prefix, uri));
                        }
                        _ => {}
                    }
                }
                r.rewrite = Some(rewrite);
            }
            "RequestMirror" => {
                let Some(m) = &f.request_mirror else { continue };
                if let Some(d) = resolve_backend(input, route, &m.backend_ref) {
                    r.mirrors.push(HttpMirrorPolicy {
                        destination: d,
                        percentage: mirror_percent(m),
                    });
                }
            }
            _ => {}
        }
    }
    if r.redirect.is_none() {
        let mut total = 0i64;
        let mut valid = 0usize;
        for b in action.backends {
            let weight = b.weight.unwrap_or(1);
            total += weight;
            if weight == 0 {
                continue;
            }
            let destination = resolve_backend(input, route, &b.object());
            valid += usize::from(destination.is_some());
            r.route.push(HttpRouteDestination {
                destination: destination.unwrap_or_else(|| Destination {
                    // Unresolvable: keeps its share of the weight, answered 503 NC.
                    host: format!(
                        "{}.{}.svc.cluster.local",
                        b.name,
                        b.namespace.as_deref().unwrap_or(&route.metadata.namespace)
                    ),
                    subset: None,
                    port: b.port.map(|number| PortSelector { number }),
                }),
                weight: Some(i32::try_from(weight).unwrap_or(i32::MAX)),
                headers: filter_headers(&b.filters),
            });
        }
        // GA-06: no backend, all weights 0, or nothing resolvable: a direct 500.
        if total == 0 || valid == 0 {
            r.route.clear();
            r.mirrors.clear();
            r.rewrite = None;
            r.direct_response = Some(direct(500));
        }
    }
    if let Some(rt) = action.retry {
        let mut retry_on = "connect-failure,refused-stream,unavailable,cancelled".to_owned();
        for c in &rt.codes {
            retry_on.push_str(&format!(",{c}"));
        }
        r.retries = Some(HttpRetry {
            attempts: rt.attempts.unwrap_or(2),
            retry_on: Some(retry_on),
            backoff: rt.backoff,
            ..HttpRetry::default()
        });
    }
    // GA-07; zero means unset.
    if let Some(t) = action.timeouts {
        if let Some(d) = t.request.filter(|d| *d != Duration::default()) {
            r.timeout = Some(d);
        }
        if let Some(d) = t.backend_request.filter(|d| *d != Duration::default()) {
            match &mut r.retries {
                Some(retries) => retries.per_try_timeout = Some(d),
                None => r.timeout = Some(d),
            }
        }
    }
    r
}

/// Cross-resource findings for the Gateway API resources of a load: routes whose
/// parent Gateway is not defined, backends that cannot be resolved (answered 500),
/// mesh hosts with both an HTTPRoute and a VirtualService (ISTIO.md §8 item 11), and
/// Gateway names shared with an Istio Gateway. Each is `(resource index, path, severity,
/// message)`.
pub(crate) fn cross_check(
    resources: &[super::AnyResource],
) -> Vec<(usize, String, Severity, String)> {
    use super::AnyResource as R;
    let mut out = Vec::new();
    let mut services: HashSet<String> = HashSet::new();
    let mut k8s_gateways: HashMap<(String, String), usize> = HashMap::new();
    let mut istio_gateways: HashSet<(String, String)> = HashSet::new();
    let mut grants: Vec<ReferenceGrant> = Vec::new();
    let mut mesh_vs: HashMap<String, String> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        match r {
            R::ServiceEntry(se) => services.extend(se.spec.hosts.iter().map(|h| se.qualify(h))),
            R::KubernetesGateway(g) => {
                k8s_gateways.insert((g.metadata.namespace.clone(), g.metadata.name.clone()), i);
            }
            R::Gateway(g) => {
                istio_gateways.insert((g.metadata.namespace.clone(), g.metadata.name.clone()));
            }
            R::ReferenceGrant(g) => grants.push(g.clone()),
            R::VirtualService(vs)
                if vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh") =>
            {
                for h in &vs.spec.hosts {
                    mesh_vs.entry(vs.qualify(h)).or_insert_with(|| {
                        format!(
                            "VirtualService/{}/{}",
                            vs.metadata.namespace, vs.metadata.name
                        )
                    });
                }
            }
            _ => {}
        }
    }
    for ((ns, name), &i) in &k8s_gateways {
        if istio_gateways.contains(&(ns.clone(), name.clone())) {
            out.push((
                i,
                "metadata.name".to_owned(),
                Severity::Error,
                format!(
                    "an Istio Gateway {ns}/{name} exists too; a Gateway API Gateway is served \
                     under its own name, so the two must be named differently"
                ),
            ));
        }
    }
    for (i, r) in resources.iter().enumerate() {
        let route = match r {
            R::HttpRoute(h) => http_route_ref(h),
            R::GrpcRoute(g) => grpc_route_ref(g),
            _ => continue,
        };
        let rns = route.metadata.namespace.as_str();
        for (j, p) in route.parents.iter().enumerate() {
            let pns = p.namespace.as_deref().unwrap_or(rns);
            let path = format!("spec.parentRefs[{j}]");
            if p.is_service() {
                let host = format!("{}.{pns}.svc.cluster.local", p.name);
                if let Some(vs) = mesh_vs.get(&host) {
                    out.push((
                        i,
                        path,
                        Severity::Warning,
                        format!(
                            "{vs} also routes mesh traffic for {host}; Istio recommends one \
                             kind of route per host: the VirtualService is applied first"
                        ),
                    ));
                }
            } else if !k8s_gateways.contains_key(&(pns.to_owned(), p.name.clone())) {
                out.push((
                    i,
                    path,
                    Severity::Warning,
                    format!(
                        "Gateway {pns}/{} is not defined; the route attaches to nothing",
                        p.name
                    ),
                ));
            }
        }
        let input = Input {
            gateways: &[],
            http_routes: &[],
            grpc_routes: &[],
            grants: &grants,
            services: &services,
        };
        for (k, (_, action)) in route.rules.iter().enumerate() {
            for (b, backend) in action.backends.iter().enumerate() {
                if backend.weight == Some(0) {
                    continue;
                }
                if resolve_backend(&input, &route, &backend.object()).is_none() {
                    let ns = backend.namespace.as_deref().unwrap_or(rns);
                    let why = if ns != rns && !granted(&grants, route.kind, rns, ns, &backend.name)
                    {
                        format!(
                            "no ReferenceGrant in {ns} allows {} of {rns} to use it",
                            route.kind
                        )
                    } else {
                        "no such service is known".to_owned()
                    };
                    out.push((
                        i,
                        format!("spec.rules[{k}].backendRefs[{b}]"),
                        Severity::Warning,
                        format!(
                            "backend {}.{ns} cannot be resolved ({why}); its share of requests \
                             fails",
                            backend.name
                        ),
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_follows_the_gateway_api_table() {
        let exact = StringMatch::Exact("/foo".into());
        let prefix = StringMatch::Prefix("/foo/".into());
        // (replacement, form matched) -> replacement for that form
        assert_eq!(prefix_replacement("/xyz", Some(&prefix)), "/xyz/");
        assert_eq!(prefix_replacement("/xyz/", Some(&prefix)), "/xyz/");
        assert_eq!(prefix_replacement("/xyz", Some(&exact)), "/xyz");
        assert_eq!(prefix_replacement("/", Some(&exact)), "/");
        assert_eq!(prefix_replacement("", Some(&prefix)), "/");
        assert_eq!(prefix_replacement("/", Some(&prefix)), "/");
    }

    use crate::config::{LoadOptions, MeshConfig};

    fn load(yaml: &str) -> MeshConfig {
        let (config, _) =
            MeshConfig::from_yaml_str("routes.yaml", yaml, &LoadOptions::default()).unwrap();
        config
    }

    const SERVICES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: svc, namespace: prod}
spec:
  hosts: [a, b, c]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: x.example.com}
";

    #[test]
    fn rules_of_all_routes_for_a_host_merge_in_gateway_api_precedence() {
        let yaml = format!(
            "{SERVICES}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: old, namespace: prod, creationTimestamp: \"2024-01-01T00:00:00Z\"}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{type: RegularExpression, value: /r/.*}}}}]
    backendRefs: [{{name: a, port: 80}}]
  - matches: [{{path: {{value: /p}}}}]
    backendRefs: [{{name: a, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: new, namespace: prod, creationTimestamp: \"2024-02-01T00:00:00Z\"}}
spec:
  parentRefs: [{{name: edge}}]
  hostnames: [x.example.com]
  rules:
  - matches:
    - path: {{value: /p}}
      headers: [{{name: X-A, value: \"1\"}}]
    backendRefs: [{{name: b, port: 80}}]
  - matches: [{{path: {{type: Exact, value: /p}}}}]
    backendRefs: [{{name: c, port: 80, weight: 0}}]
  - matches: [{{path: {{value: /p/longer}}, method: POST}}]
    backendRefs: [{{name: b, port: 80}}]
"
        );
        let config = load(&yaml);
        let vs: Vec<_> = config
            .virtual_services()
            .iter()
            .filter(|v| v.spec.gateways == ["prod/edge"])
            .collect();
        assert_eq!(vs.len(), 1, "one VirtualService per parent and host");
        assert_eq!(vs[0].spec.hosts, ["x.example.com"]);
        let order: Vec<String> = vs[0]
            .spec
            .http
            .iter()
            .map(|r| {
                let uri = r.matches.first().and_then(|m| m.uri.clone());
                format!("{} {uri:?}", r.name.clone().unwrap_or_default())
            })
            .collect();
        assert_eq!(
            order,
            [
                // Exact first, then longer prefixes, then more headers; regex; no match.
                "prod.new.1 Some(Exact(\"/p\"))",
                "prod.new.2 Some(Exact(\"/p/longer\"))",
                "prod.new.2 Some(Prefix(\"/p/longer/\"))",
                "prod.new.0 Some(Exact(\"/p\"))",
                "prod.new.0 Some(Prefix(\"/p/\"))",
                "prod.old.2 Some(Exact(\"/p\"))",
                "prod.old.2 Some(Prefix(\"/p/\"))",
                "prod.old.1 Some(Regex(\"/r/.*\"))",
                "prod.old.0 None",
            ]
        );
        let http = &vs[0].spec.http;
        // All weights 0: a direct 500 (GA-06); header names are lowercased.
        assert_eq!(
            http[0].direct_response.as_ref().map(|d| d.status),
            Some(500)
        );
        assert!(http[3].matches[0].headers.contains_key("x-a"));
        assert_eq!(
            http[1].matches[0].method,
            Some(StringMatch::Exact("POST".into()))
        );
        assert_eq!(
            http[8].route[0].destination.host,
            "a.prod.svc.cluster.local"
        );
        assert_eq!(http[8].route[0].weight, Some(1));
    }

    #[test]
    fn grpc_methods_become_paths_and_timeouts_follow_retries() {
        let yaml = format!(
            "{SERVICES}---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: g, namespace: prod}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: a}}]
  rules:
  - matches:
    - method: {{service: pkg.Svc, method: Get}}
    - method: {{service: pkg.Svc}}
    - method: {{method: Get}}
    backendRefs: [{{name: b, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: t, namespace: prod}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: b}}]
  rules:
  - timeouts: {{request: 10s, backendRequest: 2s}}
    retry: {{attempts: 3, codes: [503]}}
    backendRefs: [{{name: b, port: 80}}]
  - matches: [{{path: {{value: /no-retry}}}}]
    timeouts: {{request: 10s, backendRequest: 2s}}
    backendRefs: [{{name: b, port: 80}}]
"
        );
        let config = load(&yaml);
        let vs = config.virtual_services_for_host("a.prod.svc.cluster.local");
        let uris: Vec<_> = vs[0]
            .spec
            .http
            .iter()
            .map(|r| r.matches[0].uri.clone())
            .collect();
        assert_eq!(
            uris,
            [
                Some(StringMatch::Exact("/pkg.Svc/Get".into())),
                Some(StringMatch::Regex("/pkg\\.Svc/[^/]+".into())),
                Some(StringMatch::Regex("/[^/]+/Get".into())),
            ]
        );
        let vs = config.virtual_services_for_host("b.prod.svc.cluster.local");
        let http = &vs[0].spec.http;
        // /no-retry (a path match) sorts before the rule without matches.
        assert_eq!(
            http[0].timeout.map(|d| d.to_string()).as_deref(),
            Some("2s")
        );
        let last = http.last().unwrap();
        let retries = last.retries.as_ref().unwrap();
        assert_eq!(last.timeout.map(|d| d.to_string()).as_deref(), Some("10s"));
        assert_eq!(retries.attempts, 3);
        assert_eq!(
            retries.per_try_timeout.map(|d| d.to_string()).as_deref(),
            Some("2s")
        );
        assert_eq!(
            retries.retry_on.as_deref(),
            Some("connect-failure,refused-stream,unavailable,cancelled,503")
        );
        // The dump has the routes as written, not what they became.
        let dump = config.to_yaml().unwrap();
        assert!(dump.contains("kind: GRPCRoute"), "{dump}");
        assert!(!dump.contains("autogenerated"), "{dump}");
    }

    #[test]
    fn load_warns_of_a_virtual_service_for_the_same_mesh_host_and_unresolved_backends() {
        let yaml = format!(
            "{SERVICES}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: a, namespace: prod}}
spec:
  hosts: [a]
  http: [{{route: [{{destination: {{host: a}}}}]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: prod}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: a}}]
  rules:
  - backendRefs: [{{name: b, namespace: other, port: 80}}]
"
        );
        let (_, report) =
            MeshConfig::from_yaml_str("routes.yaml", &yaml, &LoadOptions::default()).unwrap();
        let warnings: Vec<String> = report.warnings().map(ToString::to_string).collect();
        assert!(
            warnings.iter().any(|w| w.contains("spec.parentRefs[0]")
                && w.contains("VirtualService/prod/a also routes mesh traffic")),
            "{warnings:#?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("spec.rules[0].backendRefs[0]")
                    && w.contains("no ReferenceGrant in other allows HTTPRoute of prod")),
            "{warnings:#?}"
        );
    }

    #[test]
    fn listener_hosts_intersect() {
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            listener_hosts(&[], Some("a.example.com")),
            h(&["a.example.com"])
        );
        assert_eq!(
            listener_hosts(&h(&["*.example.com"]), Some("a.example.com")),
            h(&["a.example.com"])
        );
        assert_eq!(
            listener_hosts(&h(&["a.example.com", "b.other"]), Some("*.example.com")),
            h(&["a.example.com"])
        );
        assert_eq!(listener_hosts(&h(&["x.io"]), None), h(&["x.io"]));
    }
}
