//! `DestinationRule` (`networking.istio.io`): policies applied after routing (load
//! balancing, connection pool, outlier detection, client TLS) and named subsets of a host.
//! Field names follow istio/api `destination_rule.proto`.

use serde::Deserialize;
use std::collections::BTreeMap;

use super::{Duration, Labels, PortSelector, WorkloadSelector};

/// The `spec` of a DestinationRule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DestinationRuleSpec {
    /// The service this rule applies to (short names qualified with the namespace).
    pub host: String,
    /// Policies for all traffic to the host.
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets (endpoint label selections), each with optional overrides.
    pub subsets: Vec<Subset>,
    /// Namespaces this rule is visible to.
    pub export_to: Vec<String>,
    /// Client workloads this rule applies to.
    pub workload_selector: Option<WorkloadSelector>,
}

/// A named subset of a host's endpoints.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Subset {
    /// Subset name, referenced by `destination.subset`.
    pub name: String,
    /// Endpoint labels that select the subset.
    pub labels: Labels,
    /// Overrides of the rule-level policy (block by block).
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Traffic policy: per destination, per subset, with port-level overrides.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TrafficPolicy {
    /// Load balancing.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool (circuit breaker) limits.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Passive health checking.
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS towards the upstream.
    pub tls: Option<ClientTlsSettings>,
    /// Per-port overrides (replace the blocks above wholesale).
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// HTTP CONNECT tunnelling.
    pub tunnel: Option<TunnelSettings>,
    /// PROXY protocol towards the upstream.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Retry budget.
    pub retry_budget: Option<RetryBudget>,
}

/// Policy for one destination port.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PortTrafficPolicy {
    /// The port (required).
    pub port: Option<PortSelector>,
    /// Load balancing.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool limits.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Outlier detection.
    pub outlier_detection: Option<OutlierDetection>,
    /// Client TLS.
    pub tls: Option<ClientTlsSettings>,
}

/// Load-balancing settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LoadBalancerSettings {
    /// Simple algorithm.
    pub simple: Option<SimpleLb>,
    /// Consistent hashing (affinity).
    pub consistent_hash: Option<ConsistentHashLb>,
    /// Locality-aware balancing.
    pub locality_lb_setting: Option<LocalityLbSetting>,
    /// Deprecated slow-start window.
    pub warmup_duration_secs: Option<Duration>,
    /// Slow start.
    pub warmup: Option<WarmupConfiguration>,
}

/// Simple load-balancing algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Let the proxy choose (LEAST_REQUEST).
    Unspecified,
    /// Deprecated alias of LEAST_REQUEST.
    LeastConn,
    /// Random.
    Random,
    /// Original destination, no balancing.
    Passthrough,
    /// Round robin.
    RoundRobin,
    /// Power of two choices by outstanding requests.
    LeastRequest,
}

/// Consistent-hash load balancing.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConsistentHashLb {
    /// Hash a header.
    pub http_header_name: Option<String>,
    /// Hash a cookie.
    pub http_cookie: Option<HttpCookie>,
    /// Hash the source IP.
    pub use_source_ip: Option<bool>,
    /// Hash a query parameter.
    pub http_query_parameter_name: Option<String>,
    /// Ring hash.
    pub ring_hash: Option<RingHash>,
    /// Maglev.
    pub maglev: Option<Maglev>,
    /// Deprecated ring size.
    pub minimum_ring_size: Option<u64>,
}

/// A hashed cookie.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpCookie {
    /// Cookie name.
    pub name: String,
    /// Cookie path.
    pub path: Option<String>,
    /// Lifetime of a generated cookie.
    pub ttl: Option<Duration>,
    /// Extra cookie attributes.
    pub attributes: Vec<CookieAttribute>,
}

/// A cookie attribute.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CookieAttribute {
    /// Attribute name.
    pub name: String,
    /// Attribute value.
    pub value: Option<String>,
}

/// Ring-hash settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RingHash {
    /// Minimum ring size (default 1024).
    pub minimum_ring_size: Option<u64>,
}

/// Maglev settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Maglev {
    /// Table size (prime, default 65537).
    pub table_size: Option<u64>,
}

/// Locality load-balancing settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalityLbSetting {
    /// Weighted distribution between localities.
    pub distribute: Vec<LocalityDistribute>,
    /// Failover between regions.
    pub failover: Vec<LocalityFailover>,
    /// Ordered labels for failover priority.
    pub failover_priority: Vec<String>,
    /// Enable or disable locality balancing.
    pub enabled: Option<bool>,
}

/// Distribution of traffic from one locality.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalityDistribute {
    /// Originating locality.
    pub from: String,
    /// Destination localities and weights.
    pub to: BTreeMap<String, u32>,
}

/// Failover from one region to another.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalityFailover {
    /// Originating region.
    pub from: String,
    /// Failover region.
    pub to: String,
}

/// Slow-start settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WarmupConfiguration {
    /// Warm-up window (required).
    pub duration: Option<Duration>,
    /// Starting share of traffic (default 10).
    pub minimum_percent: Option<f64>,
    /// Ramp aggression (default 1.0).
    pub aggression: Option<f64>,
}

/// Connection-pool (circuit breaker) settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConnectionPoolSettings {
    /// TCP-level limits.
    pub tcp: Option<TcpSettings>,
    /// HTTP-level limits.
    pub http: Option<HttpSettings>,
}

/// TCP connection-pool settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TcpSettings {
    /// Maximum connections to the destination.
    pub max_connections: Option<i32>,
    /// Connect timeout (default 10s).
    pub connect_timeout: Option<Duration>,
    /// TCP keep-alive.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Maximum lifetime of a connection.
    pub max_connection_duration: Option<Duration>,
    /// Idle timeout (default 1h).
    pub idle_timeout: Option<Duration>,
}

/// TCP keep-alive settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TcpKeepalive {
    /// Probes before the connection is dead.
    pub probes: Option<u32>,
    /// Idle time before probes start.
    pub time: Option<Duration>,
    /// Interval between probes.
    pub interval: Option<Duration>,
}

/// HTTP connection-pool settings.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Maximum queued requests.
    pub http1_max_pending_requests: Option<i32>,
    /// Maximum active requests.
    pub http2_max_requests: Option<i32>,
    /// Requests per connection (1 disables keep-alive, 0 unlimited).
    pub max_requests_per_connection: Option<i32>,
    /// Maximum concurrent retries.
    pub max_retries: Option<i32>,
    /// Upstream idle timeout.
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 upgrade policy.
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// Use the client's protocol upstream.
    pub use_client_protocol: Option<bool>,
    /// Maximum concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: Option<i32>,
}

/// Whether HTTP/1.1 is upgraded to HTTP/2 upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum H2UpgradePolicy {
    /// Mesh default.
    Default,
    /// Never upgrade.
    DoNotUpgrade,
    /// Upgrade.
    Upgrade,
}

/// Outlier detection (passive health checking).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Deprecated: consecutive gateway errors.
    pub consecutive_errors: Option<i32>,
    /// Count local-origin failures separately.
    pub split_external_local_origin_errors: Option<bool>,
    /// Local-origin failures before ejection (split mode).
    pub consecutive_local_origin_failures: Option<u32>,
    /// Consecutive 502/503/504 before ejection.
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive 5xx before ejection (default 5).
    pub consecutive_5xx_errors: Option<u32>,
    /// Sweep interval (default 10s).
    pub interval: Option<Duration>,
    /// Minimum ejection duration (default 30s).
    pub base_ejection_time: Option<Duration>,
    /// Maximum share of hosts ejected (default 10).
    pub max_ejection_percent: Option<i32>,
    /// Panic threshold (default 0).
    pub min_health_percent: Option<i32>,
    /// HTTP status codes counted as errors (default: 5xx).
    pub outlier_detection_http_error_codes: Vec<u32>,
}

/// Client TLS settings towards the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClientTlsSettings {
    /// TLS mode.
    pub mode: Option<ClientTlsMode>,
    /// Client certificate file (MUTUAL).
    pub client_certificate: Option<String>,
    /// Client key file (MUTUAL).
    pub private_key: Option<String>,
    /// CA bundle file.
    pub ca_certificates: Option<String>,
    /// Secret holding the client credentials.
    pub credential_name: Option<String>,
    /// Accepted server SANs.
    pub subject_alt_names: Vec<String>,
    /// SNI to send.
    pub sni: Option<String>,
    /// Skip server verification.
    pub insecure_skip_verify: Option<bool>,
    /// CRL file.
    pub ca_crl: Option<String>,
}

/// Client TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientTlsMode {
    /// Plaintext.
    Disable,
    /// TLS without client certificate.
    Simple,
    /// TLS with a client certificate from files or a secret.
    Mutual,
    /// Istio mTLS with workload certificates.
    IstioMutual,
}

/// HTTP CONNECT tunnel settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TunnelSettings {
    /// `CONNECT` or `POST`.
    pub protocol: Option<String>,
    /// Tunnel target host.
    pub target_host: String,
    /// Tunnel target port.
    pub target_port: u32,
}

/// PROXY protocol settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProxyProtocol {
    /// Protocol version.
    pub version: Option<ProxyProtocolVersion>,
}

/// PROXY protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProxyProtocolVersion {
    /// Text form.
    V1,
    /// Binary form.
    V2,
}

/// Retry budget.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetryBudget {
    /// Share of active requests that may be retries (0–100).
    pub percent: Option<f64>,
    /// Floor on concurrent retries.
    pub min_retry_concurrency: Option<u32>,
}
