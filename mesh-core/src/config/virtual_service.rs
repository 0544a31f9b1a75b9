//! `VirtualService` (`networking.istio.io`): ordered HTTP, TLS and TCP routing rules for a
//! set of hosts. Field names and meanings follow istio/api `virtual_service.proto`.

use serde::Deserialize;

use super::{Duration, Labels, Percent, PortSelector, StringMatch};
use std::collections::BTreeMap;

/// The `spec` of a VirtualService.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct VirtualServiceSpec {
    /// Destination hosts this routing applies to (DNS names, `*.` wildcards, or IPs for
    /// gateways). Short names are qualified with the resource's namespace.
    pub hosts: Vec<String>,
    /// Gateways and sidecars (`mesh`) the rules apply to; empty means `mesh` only.
    pub gateways: Vec<String>,
    /// Ordered HTTP rules; the first match wins.
    pub http: Vec<HttpRoute>,
    /// Ordered rules for unterminated TLS, matched on SNI.
    pub tls: Vec<TlsRoute>,
    /// Ordered rules for opaque TCP.
    pub tcp: Vec<TcpRoute>,
    /// Namespaces this VirtualService is visible to (`.` own, `*` all).
    pub export_to: Vec<String>,
}

/// One HTTP routing rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRoute {
    /// Name of the route, used in access logs.
    pub name: Option<String>,
    /// Match conditions; OR between entries, AND inside one entry. Empty matches all.
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    pub route: Vec<HttpRouteDestination>,
    /// Send a redirect instead of forwarding.
    pub redirect: Option<HttpRedirect>,
    /// Answer with a fixed response instead of forwarding.
    pub direct_response: Option<HttpDirectResponse>,
    /// Hand routing over to another VirtualService.
    pub delegate: Option<Delegate>,
    /// Rewrite URI and/or authority before forwarding.
    pub rewrite: Option<HttpRewrite>,
    /// Overall request timeout (the outer deadline over all retries).
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    pub fault: Option<HttpFaultInjection>,
    /// Mirror (shadow) traffic to this destination.
    pub mirror: Option<Destination>,
    /// Mirror traffic to several destinations.
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// Deprecated integer mirror percentage.
    pub mirror_percent: Option<u32>,
    /// Percentage of traffic mirrored by `mirror`.
    pub mirror_percentage: Option<Percent>,
    /// CORS policy.
    pub cors_policy: Option<CorsPolicy>,
    /// Header manipulation for all destinations of this route.
    pub headers: Option<Headers>,
}

/// Conditions an HTTP request must meet for the rule to apply.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpMatchRequest {
    /// Name of the match, appended to the route name in logs.
    pub name: Option<String>,
    /// URI (path) match.
    pub uri: Option<StringMatch>,
    /// `:scheme` match.
    pub scheme: Option<StringMatch>,
    /// `:method` match.
    pub method: Option<StringMatch>,
    /// `:authority` (Host) match.
    pub authority: Option<StringMatch>,
    /// Header matches; keys are lowercase header names. `{}` checks presence.
    pub headers: BTreeMap<String, StringMatch>,
    /// Destination port the client addressed.
    pub port: Option<u32>,
    /// Labels of the client workloads this match applies to (proxy selection).
    pub source_labels: Labels,
    /// Gateways this match applies to (overrides the top-level list).
    pub gateways: Vec<String>,
    /// Query parameter matches.
    pub query_params: BTreeMap<String, StringMatch>,
    /// Case-insensitive `exact`/`prefix` URI match.
    pub ignore_uri_case: bool,
    /// Header conditions that must NOT hold.
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Namespace of the client workloads this match applies to.
    pub source_namespace: Option<String>,
    /// Statistics prefix for this route.
    pub stat_prefix: Option<String>,
}

/// A weighted HTTP destination.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteDestination {
    /// Where to send the request.
    pub destination: Destination,
    /// Relative weight; omitted means 0 (all traffic when it is the only destination).
    pub weight: Option<i32>,
    /// Header manipulation for this destination.
    pub headers: Option<Headers>,
}

/// A weighted L4 (TCP/TLS) destination.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteDestination {
    /// Where to send the connection.
    pub destination: Destination,
    /// Relative weight.
    pub weight: Option<i32>,
}

/// A service (and optionally subset and port) in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Destination {
    /// Service host name (short names are qualified with the resource's namespace).
    pub host: String,
    /// Subset defined by a DestinationRule for `host`.
    pub subset: Option<String>,
    /// Port on the destination host.
    pub port: Option<PortSelector>,
}

/// Routing handed over to another VirtualService.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Delegate {
    /// Name of the delegate VirtualService.
    pub name: String,
    /// Its namespace (default: the root's namespace).
    pub namespace: Option<String>,
}

/// Request and response header manipulation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Headers {
    /// Applied to the request before forwarding.
    pub request: Option<HeaderOperations>,
    /// Applied to the response before returning it.
    pub response: Option<HeaderOperations>,
}

/// Set, add and remove operations on headers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HeaderOperations {
    /// Overwrite (or add) these headers.
    pub set: BTreeMap<String, String>,
    /// Append these values.
    pub add: BTreeMap<String, String>,
    /// Remove these headers.
    pub remove: Vec<String>,
}

/// A TLS (SNI) routing rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsRoute {
    /// Match conditions (required).
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    /// Weighted destinations.
    pub route: Vec<RouteDestination>,
}

/// A TCP routing rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TcpRoute {
    /// Match conditions.
    #[serde(rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    /// Weighted destinations.
    pub route: Vec<RouteDestination>,
}

/// L4 connection match attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct L4MatchAttributes {
    /// Destination IPs or CIDRs.
    pub destination_subnets: Vec<String>,
    /// Destination port.
    pub port: Option<u32>,
    /// Source IP or CIDR.
    pub source_subnet: Option<String>,
    /// Client workload labels (proxy selection).
    pub source_labels: Labels,
    /// Gateways this match applies to.
    pub gateways: Vec<String>,
    /// Client namespace (proxy selection).
    pub source_namespace: Option<String>,
}

/// TLS connection match attributes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsMatchAttributes {
    /// SNI values to match (required).
    pub sni_hosts: Vec<String>,
    /// Destination IPs or CIDRs.
    pub destination_subnets: Vec<String>,
    /// Destination port.
    pub port: Option<u32>,
    /// Client workload labels (proxy selection).
    pub source_labels: Labels,
    /// Gateways this match applies to.
    pub gateways: Vec<String>,
    /// Client namespace (proxy selection).
    pub source_namespace: Option<String>,
}

/// A redirect response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRedirect {
    /// Replace the whole path.
    pub uri: Option<String>,
    /// Replace the authority.
    pub authority: Option<String>,
    /// Replace the port.
    pub port: Option<u32>,
    /// Derive the port from the protocol or the request.
    pub derive_port: Option<RedirectPortSelection>,
    /// Replace the scheme.
    pub scheme: Option<String>,
    /// Status code (default 301).
    pub redirect_code: Option<u32>,
}

/// How a redirect derives its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RedirectPortSelection {
    /// 80 for http, 443 for https.
    FromProtocolDefault,
    /// The port of the request.
    FromRequestPort,
}

/// A fixed response.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpDirectResponse {
    /// Status code (required).
    pub status: u32,
    /// Body; omitted means empty.
    pub body: Option<HttpBody>,
}

/// The body of a direct response: `string` or base64 `bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpBody {
    /// Text body.
    pub string: Option<String>,
    /// Base64-encoded binary body.
    pub bytes: Option<String>,
}

/// URI and authority rewrite before forwarding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRewrite {
    /// Replace the matched prefix (or whole path for exact/regex matches).
    pub uri: Option<String>,
    /// Replace Host/:authority.
    pub authority: Option<String>,
    /// Regex rewrite of the path.
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// A regex path rewrite with `\1`-style capture references.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RegexRewrite {
    /// RE2 pattern.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Replacement.
    pub rewrite: String,
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRetry {
    /// Number of retries (not attempts); 0 disables retries.
    pub attempts: i32,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated retry conditions and status codes.
    pub retry_on: Option<String>,
    /// Retry to other localities.
    pub retry_remote_localities: Option<bool>,
    /// Avoid hosts already tried (default true).
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base back-off interval (default 25ms).
    pub backoff: Option<Duration>,
}

/// CORS policy.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CorsPolicy {
    /// Deprecated exact origins.
    pub allow_origin: Vec<String>,
    /// Allowed origins.
    pub allow_origins: Vec<StringMatch>,
    /// Allowed methods.
    pub allow_methods: Vec<String>,
    /// Allowed request headers.
    pub allow_headers: Vec<String>,
    /// Exposed response headers.
    pub expose_headers: Vec<String>,
    /// Preflight cache duration.
    pub max_age: Option<Duration>,
    /// Allow credentials.
    pub allow_credentials: Option<bool>,
    /// What to do with preflights that match no origin.
    pub unmatched_preflights: Option<UnmatchedPreflights>,
}

/// Handling of unmatched CORS preflight requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UnmatchedPreflights {
    /// Default (FORWARD).
    Unspecified,
    /// Forward to the upstream.
    Forward,
    /// Answer without CORS headers.
    Ignore,
}

/// Fault injection.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpFaultInjection {
    /// Delay before forwarding.
    pub delay: Option<Delay>,
    /// Local abort.
    pub abort: Option<Abort>,
}

/// Injected delay.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Delay {
    /// Deprecated integer percentage.
    pub percent: Option<i32>,
    /// Fixed delay (≥ 1ms).
    pub fixed_delay: Option<Duration>,
    /// Rejected by Istio validation.
    pub exponential_delay: Option<Duration>,
    /// Share of requests delayed; omitted means none.
    pub percentage: Option<Percent>,
}

/// Injected abort.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Abort {
    /// HTTP status (200–599).
    pub http_status: Option<i32>,
    /// gRPC status name, e.g. `UNAVAILABLE`.
    pub grpc_status: Option<String>,
    /// Rejected by Istio validation.
    pub http2_error: Option<String>,
    /// Share of requests aborted; omitted means none.
    pub percentage: Option<Percent>,
}

/// One mirror destination.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpMirrorPolicy {
    /// Where to mirror.
    pub destination: Destination,
    /// Share of traffic mirrored (absent: 100%).
    pub percentage: Option<Percent>,
}
