//! The proxy's own settings file (YAML): who the workload is, where its configuration
//! and certificates are, its listeners, telemetry and limits.
//!
//! Unknown fields are errors. Errors name the file, the line and column when known, the
//! field path and what is allowed:
//!
//! ```text
//! sidecar.yaml:6:3: error: tracing.sampling: 150 is not a percentage (0 to 100)
//! ```
//!
//! | field | default | meaning |
//! |---|---|---|
//! | `workload.namespace` | required | the workload's namespace; also the default namespace of resources without one |
//! | `workload.serviceAccount` | required | identity `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>` |
//! | `workload.labels` | `{}` | pod labels: select PeerAuthentication, AuthorizationPolicy, `sourceLabels`; `app`/`version` fill metric labels |
//! | `workload.name` | `app` label, else the service account | `*_workload` metric labels |
//! | `workload.serviceHost` | `<app>.<namespace>.svc.cluster.local` | `destination_service` of inbound metrics |
//! | `workload.locality` | none | `region/zone/subzone` the workload runs in: DestinationRule `localityLbSetting` failover and `distribute` start from it |
//! | `workload.network` | none | the workload's network: endpoints whose `network` is another one are left out (no east-west gateway) |
//! | `trustDomain` | `cluster.local` | SPIFFE trust domain |
//! | `clusterId` | `Kubernetes` | the cluster the workload runs in: `source_cluster`/`destination_cluster` metric labels, sent to peers in the metadata exchange |
//! | `configDir` | required without `discovery` | directory of Istio YAML, watched; relative to the settings file |
//! | `discovery.address` | – | `host:port` of the `discovery` control plane: the configuration comes from it over xDS instead of `configDir` |
//! | `discovery.identity` | `spiffe://<trustDomain>/ns/istio-system/sa/mesh-discovery` | the SPIFFE ID `discovery` must prove (xDS) |
//! | `discovery.serverName` | `mesh-discovery.istio-system.svc` | the DNS name `discovery`'s certificate must carry for certificate requests (Istio's `ISTIOD_SAN`) |
//! | `discovery.tokenFile` | `/var/run/secrets/tokens/istio-token` | the projected service-account token (audience `istio-ca`) sent with certificate requests |
//! | `discovery.rootCert` | `/var/run/secrets/istio/root-cert.pem` | the mesh's root certificate, to trust `discovery` before the workload has a certificate |
//! | `svid.certDir` | – | `cert-chain.pem`, `key.pem`, `root-cert.pem`, watched (Kubernetes symlink swaps included); without `certDir` and `caDir`, a sidecar with `discovery` asks it for a certificate by CSR and renews it at Istio's point |
//! | `svid.caDir` | – | a CA from `mesh-proxy ca init`: the built-in issuer mints the SVID and rotates it at half-life |
//! | `svid.lifetime` | `24h` | lifetime of SVIDs from the built-in issuer |
//! | `listeners.inbound` | `0.0.0.0:15006` | mTLS listener for peers |
//! | `listeners.app` | `127.0.0.1:8080` | the application inbound traffic goes to |
//! | `listeners.outbound` | `127.0.0.1:15001` | plain HTTP from the application (origin-form with Host, or proxy absolute-form) |
//! | `listeners.admin` | `127.0.0.1:15000` | admin server |
//! | `listeners.appProtocol` | `HTTP` | `HTTP` (HTTP/1.1) or `HTTP2` (h2 prior knowledge, gRPC) towards the application |
//! | `listeners.capture` | `false` | traffic reaches the listeners by transparent capture (`mesh-proxy init`): routed by original destination; inbound goes to the application's address at the original port |
//! | `tracing.sampling` | `1` | percentage of new traces sampled |
//! | `tracing.otlp` / `tracing.zipkin` | – | collector URL (one of them) |
//! | `accessLog.path` | – (off) | `-` for stdout, or a file to append to |
//! | `accessLog.format` | `TEXT` | `TEXT` (Envoy's default format) or `JSON` |
//! | `pathNormalization` | `DEFAULT` | `DEFAULT` (merge slashes; 400 for `%2F`, `%5C`, `%3B`, double-encoded slashes and dots, percent-escapes that are not UTF-8, `;` parameters), or Istio's `NONE`, `BASE`, `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES` |
//! | `gatewayTopology.numTrustedProxies` | `0` | Istio's `numTrustedProxies` (Envoy `xff_num_trusted_hops`): how many proxies in front of this one append to `X-Forwarded-For`; the client address (`remoteIpBlocks`) is the entry that many places from the right, the connection's peer with `0`. The gateway always appends its peer to `X-Forwarded-For` |
//! | `gatewayTopology.forwardClientCertDetails` | `SANITIZE_SET` | the gateway's `X-Forwarded-Client-Cert`: `SANITIZE`, `FORWARD_ONLY`, `APPEND_FORWARD`, `SANITIZE_SET`, `ALWAYS_FORWARD_ONLY` (Envoy's meanings). The sidecar's inbound listener always uses `SANITIZE_SET`, as Istio |
//! | `gatewayTopology.untrustedHeaders` | `[]` | more request header names removed from clients at the inbound listener and the gateway, besides `x-forwarded-client-cert`, `x-envoy-*`, `x-istio-*`, `l5d-*` |
//! | `limits.maxRequestTargetBytes` | `8192` | request-target size; 414 above |
//! | `limits.maxRequestHeaderBytes` | `61440` | request head size (method, target, names and values, as Envoy's `max_request_headers_kb` counts); 431 above |
//! | `limits.maxHeaders` | `100` | request header count; 431 above |
//! | `limits.requestHeadersTimeout` | `10s` | time to read a request head (and the TLS handshake); a connection that sends nothing is closed after it too (formerly `headerReadTimeout`) |
//! | `limits.streamIdleTimeout` | `5m` | Envoy's `stream_idle_timeout`: a request with no bytes either way for this long gets 408 (`SI`), or is reset once its response began; `0s` disables |
//! | `limits.requestTimeout` | `0s` (off) | Envoy's `request_timeout`: the whole request must arrive within it, else 408 |
//! | `limits.maxRequestBodyBytes` | `0` (off) | larger request bodies get 413 |
//! | `limits.maxResponseBodyBytes` | `0` (off) | larger response bodies get 502, or a reset once the head went out |
//! | `limits.idleTimeout` | `1h` | downstream connections with no request in flight, and idle pooled upstream connections (unless a DestinationRule sets `idleTimeout`), are closed after this; `0s` disables the downstream one |
//! | `limits.http2MaxConcurrentStreams` | `100` | per downstream HTTP/2 connection |
//! | `limits.drainTimeout` | `5s` | drain deadline on SIGTERM (a second SIGTERM ends the process at once) |
//! | `limits.maxRetryBodyBytes` | `65536` | request bodies up to this size are kept for retries |
//! | `limits.connectTimeout` | `10s` | upstream connect + handshake |
//! | `limits.maxConnections` | `10000` | downstream connections served at once per listener; one more is closed at once and counted (`mesh_downstream_cx_overflow_total`) |
//! | `outboundTrafficPolicy.mode` | `ALLOW_ANY` | `ALLOW_ANY` passes unknown hosts (and, under capture, unknown addresses) through in plaintext; `REGISTRY_ONLY` answers 502 (closes captured connections to unknown addresses) |
//! | `randomSeed` | random | seed of weighted route picks (reproducible demos and tests) |
//! | `gateway.name` | required for `gateway` | the Gateway resource to serve |
//! | `gateway.namespace` | `workload.namespace` | its namespace |
//! | `gateway.credentialsDir` | – | the Gateway namespace's Secrets, one directory per Secret name: `tls.crt`, `tls.key`, `ca.crt` (MUTUAL) |
//! | `gateway.ports` | `0.0.0.0:<port>` | where each Gateway server port listens, e.g. `443: 0.0.0.0:8443` |
//!
//! Durations use Istio's syntax (`250ms`, `5s`, `1h`).
//!
//! # Example
//!
//! ```
//! use mesh_proxy::settings::Settings;
//!
//! let yaml = "workload: {namespace: default, serviceAccount: order-service}\nconfigDir: istio\n";
//! let s = Settings::from_yaml("sidecar.yaml", yaml).unwrap();
//! assert_eq!(s.listeners.outbound.port(), 15001);
//! assert_eq!(s.identity().unwrap().as_str(), "spiffe://cluster.local/ns/default/sa/order-service");
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::Identity;
use mesh_core::config::Duration as IstioDuration;
use serde::Deserialize;

/// The whole settings file.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Who this proxy speaks for.
    #[serde(default)]
    pub workload: WorkloadSettings,
    /// SPIFFE trust domain (default `cluster.local`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The cluster the workload runs in (Istio's `CLUSTER_ID`, default `Kubernetes`).
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Directory of Istio YAML (VirtualService, DestinationRule, ServiceEntry,
    /// PeerAuthentication, AuthorizationPolicy, Gateway). Relative paths are relative to
    /// the settings file. Watched for changes. Empty when `discovery` is set.
    #[serde(default)]
    pub config_dir: PathBuf,
    /// The `discovery` control plane the configuration comes from instead of `configDir`.
    #[serde(default)]
    pub discovery: Option<DiscoverySettings>,
    /// Where the workload certificate comes from.
    #[serde(default)]
    pub svid: SvidSettings,
    /// Listener addresses.
    #[serde(default)]
    pub listeners: Listeners,
    /// Tracing.
    #[serde(default)]
    pub tracing: TracingSettings,
    /// Access log.
    #[serde(default)]
    pub access_log: AccessLogSettings,
    /// Path normalization before routing and authorization: `DEFAULT` (default), `BASE`, `NONE`,
    /// `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`.
    #[serde(default = "default_normalization")]
    pub path_normalization: String,
    /// Limits (SECURITY.md defaults).
    #[serde(default)]
    pub limits: Limits,
    /// Istio's `proxyConfig.gatewayTopology`: trusted proxies and XFCC handling.
    #[serde(default)]
    pub gateway_topology: GatewayTopology,
    /// What happens to hosts the registry does not know.
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Seed for weighted route picks (reproducible demos and tests); random when absent.
    #[serde(default)]
    pub random_seed: Option<u64>,
    /// How DNS destinations are resolved.
    #[serde(default)]
    pub dns: DnsSettings,
    /// Ingress gateway settings (only for `mesh-proxy gateway`).
    #[serde(default)]
    pub gateway: Option<GatewaySettings>,
    /// Directory the settings file is in (relative paths resolve against it).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `discovery`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiscoverySettings {
    /// `host:port` of `discovery` (Istio's port is 15012).
    pub address: String,
    /// The SPIFFE ID `discovery` must prove; default
    /// `spiffe://<trustDomain>/ns/istio-system/sa/mesh-discovery`.
    #[serde(default)]
    pub identity: Option<String>,
    /// The DNS name `discovery`'s serving certificate must carry when the workload
    /// asks for its certificate (before it has one to check the SPIFFE ID with).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The projected service-account token sent with certificate requests.
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// The mesh's root certificate (PEM), trusted for `discovery` before the workload
    /// has a certificate of its own.
    #[serde(default = "default_root_cert")]
    pub root_cert: PathBuf,
}

fn default_server_name() -> String {
    "mesh-discovery.istio-system.svc".to_owned()
}

fn default_token_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/tokens/istio-token")
}

fn default_root_cert() -> PathBuf {
    PathBuf::from("/var/run/secrets/istio/root-cert.pem")
}

impl Settings {
    /// The SPIFFE ID `discovery` must prove (see [`DiscoverySettings::identity`]).
    pub fn discovery_identity(&self) -> Option<Result<Identity, mesh_core::IdentityError>> {
        let d = self.discovery.as_ref()?;
        Some(match &d.identity {
            Some(id) => Identity::parse(id),
            None => Identity::from_istio(&self.trust_domain, "istio-system", "mesh-discovery"),
        })
    }
}

/// `dns`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsSettings {
    /// Name servers (`address:port`); empty: the system's configuration.
    pub servers: Vec<SocketAddr>,
    /// The longest time between two resolutions (Istio's `dnsRefreshRate`, default
    /// `60s`); shorter when an answer's TTL is.
    pub refresh_rate: IstioDuration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            refresh_rate: std::time::Duration::from_secs(60).into(),
        }
    }
}

/// `workload`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkloadSettings {
    /// Workload name for metrics (`workload` labels); default: the `app` label, else the
    /// service account.
    pub name: Option<String>,
    /// Kubernetes namespace (required).
    pub namespace: String,
    /// Service account (required): the identity is
    /// `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`.
    pub service_account: String,
    /// Pod labels: select PeerAuthentication/AuthorizationPolicy and fill `app`/`version`.
    pub labels: BTreeMap<String, String>,
    /// The local service's host for inbound metrics; default `<app>.<ns>.svc.cluster.local`.
    pub service_host: Option<String>,
    /// Where the workload runs, `region/zone/subzone` (Istio reads it from the node's
    /// `topology.kubernetes.io/region`/`zone` labels and the pod's
    /// `topology.istio.io/subzone`): the origin of locality-aware balancing.
    pub locality: Option<String>,
    /// The workload's network (Istio's `topology.istio.io/network`); endpoints of other
    /// networks are left out.
    pub network: Option<String>,
}

/// `svid`: either `certDir` or `caDir`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct SvidSettings {
    /// Directory with `cert-chain.pem`, `key.pem`, `root-cert.pem` (Istio's layout),
    /// watched for changes (Kubernetes symlink swaps included).
    pub cert_dir: Option<PathBuf>,
    /// Directory of a CA made by `mesh-proxy ca init`: the built-in issuer mints the SVID
    /// and rotates it at half-life.
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of SVIDs from the built-in issuer (default `24h`).
    pub lifetime: Option<IstioDuration>,
}

/// `listeners`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Listeners {
    /// Inbound mTLS listener (default `0.0.0.0:15006`).
    pub inbound: SocketAddr,
    /// The application's address that inbound traffic goes to (default `127.0.0.1:8080`).
    pub app: SocketAddr,
    /// Outbound listener the application sends plain HTTP to (default `127.0.0.1:15001`).
    pub outbound: SocketAddr,
    /// Admin server (default `127.0.0.1:15000`).
    pub admin: SocketAddr,
    /// Protocol the application speaks: `HTTP` (HTTP/1.1, default) or `HTTP2` (h2 with
    /// prior knowledge, e.g. gRPC servers).
    pub app_protocol: AppProtocol,
    /// TCP egress: a local address the application connects to, and the service
    /// `host:port` its connections go to (Istio's Sidecar egress listener with `bind`
    /// and `captureMode: NONE`), e.g. `127.0.0.1:6379: redis.data:6379`. Routed by the
    /// host's VirtualService `tcp` routes, else to the service's TCP port.
    pub tcp: BTreeMap<SocketAddr, String>,
    /// Transparent capture (`mesh-proxy init` installed the rules): connections
    /// redirected to `outbound` and `inbound` are handled by their original destination
    /// (module `capture`, feature `proxy`); the outbound and inbound listeners also listen on the
    /// IPv6 counterpart of their address (`[::1]` for `127.0.0.1`, `[::]` for `0.0.0.0`).
    /// Direct connections are served as without capture. Default `false`.
    pub capture: bool,
    /// How long a `tcp` listener of a port of no declared protocol waits for the client's
    /// first bytes before taking the connection as opaque TCP (Istio's MeshConfig
    /// `protocolDetectionTimeout`); unset or `0s`: as long as it takes (Istio's default).
    pub protocol_detection_timeout: Option<IstioDuration>,
}

impl Listeners {
    /// The service host and port of a `listeners.tcp` destination (`host:port`).
    pub fn tcp_destination(destination: &str) -> Option<(&str, u16)> {
        let (host, port) = destination.rsplit_once(':')?;
        if host.is_empty() || host.contains(char::is_whitespace) {
            return None;
        }
        Some((host, port.parse().ok().filter(|p| *p > 0)?))
    }
}

/// `listeners.appProtocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            inbound: SocketAddr::from(([0, 0, 0, 0], 15006)),
            app: SocketAddr::from(([127, 0, 0, 1], 8080)),
            outbound: SocketAddr::from(([127, 0, 0, 1], 15001)),
            admin: SocketAddr::from(([127, 0, 0, 1], 15000)),
            app_protocol: AppProtocol::Http,
            tcp: BTreeMap::new(),
            capture: false,
            protocol_detection_timeout: None,
        }
    }
}

/// `tracing`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TracingSettings {
    /// Percentage of new traces sampled, 0..=100 (default 1, Istio's default).
    pub sampling: f64,
    /// OTLP/HTTP collector URL (`http://host:4318/v1/traces`).
    pub otlp: Option<String>,
    /// Zipkin v2 collector URL (`http://host:9411/api/v2/spans`).
    pub zipkin: Option<String>,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            sampling: 1.0,
            otlp: None,
            zipkin: None,
        }
    }
}

/// `accessLog`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessLogSettings {
    /// `-` for standard output, or a file path to append to; absent: no access log.
    pub path: Option<String>,
    /// `TEXT` (Envoy's default format, default) or `JSON`.
    pub format: Option<String>,
}

/// `gatewayTopology` (Istio's `ProxyConfig.GatewayTopology`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewayTopology {
    /// Proxies in front of this one trusted to append to `X-Forwarded-For`.
    pub num_trusted_proxies: usize,
    /// The gateway's `X-Forwarded-Client-Cert` mode (Istio's names); `SANITIZE_SET`
    /// when absent.
    pub forward_client_cert_details: Option<String>,
    /// More identity header names removed from clients.
    pub untrusted_headers: Vec<String>,
}

/// `limits`: bounds on what one client can make the proxy hold, with Envoy's names where
/// Envoy has the knob (`http_connection_manager` fields in brackets).
///
/// | field | default | Envoy |
/// |---|---|---|
/// | `maxRequestTargetBytes` | 8192 (414 above) | – (Envoy counts the path in the header limit) |
/// | `maxRequestHeaderBytes` | 61440 (431 above) | `max_request_headers_kb` (60 KiB) |
/// | `maxHeaders` | 100 (431 above) | `common_http_protocol_options.max_headers_count` |
/// | `requestHeadersTimeout` | 10s | `request_headers_timeout` (Envoy: disabled) |
/// | `streamIdleTimeout` | 5m (408 `SI`) | `stream_idle_timeout` (5 min) |
/// | `requestTimeout` | disabled (408) | `request_timeout` (disabled) |
/// | `maxRequestBodyBytes` | disabled (413) | the buffer filter's `max_request_bytes` |
/// | `maxResponseBodyBytes` | disabled (502, or reset once headers went out) | – |
/// | `maxConnections` | 10000 (refused above) | listener `max_connections` / `downstream_cx_overflow` |
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// Maximum request-target bytes (the path and query of origin form, the whole URI of
    /// absolute form, HTTP/2 `:path`; default 8192, RFC 9112's recommended minimum
    /// support). 414 above, before anything is forwarded.
    pub max_request_target_bytes: usize,
    /// Maximum request header bytes (default 61440 = 60 KiB, Envoy's
    /// `max_request_headers_kb`), counted as Envoy counts its header map: the method,
    /// the request target, and every header's name and value. 431 above, exactly: a head
    /// one byte over is refused and forwarded to no one.
    pub max_request_header_bytes: usize,
    /// Maximum number of request headers (default 100; 431 above).
    pub max_headers: usize,
    /// Time to read a request head, and the TLS handshake (default 10s; Envoy's
    /// `request_headers_timeout`). A connection that sends no byte at all within it is
    /// closed too. The earlier name `headerReadTimeout` is still read.
    #[serde(rename = "requestHeadersTimeout", alias = "headerReadTimeout")]
    pub header_read_timeout: IstioDuration,
    /// A request with no byte received from the client (request body) or from the
    /// upstream (response head and body) for this long ends (Envoy's
    /// `stream_idle_timeout`, default 5 min): 408 `stream timeout`, flag `SI`, when the
    /// response has not begun, else the stream is reset. `0s` disables it.
    pub stream_idle_timeout: IstioDuration,
    /// The whole request (head and body) must be received within this (Envoy's
    /// `request_timeout`, default disabled): 408 `request timeout` otherwise. `0s`
    /// (the default) disables it.
    pub request_timeout: IstioDuration,
    /// Request bodies over this many bytes are refused: 413 (at once when a
    /// `Content-Length` says so, else when the limit is crossed; the upstream request is
    /// cut). `0` (the default) disables it.
    pub max_request_body_bytes: u64,
    /// Response bodies over this many bytes are refused: 502 when a `Content-Length` says
    /// so before the head goes out, else the stream is reset when the limit is crossed.
    /// `0` (the default) disables it.
    pub max_response_body_bytes: u64,
    /// Downstream connections with no request in flight are closed after this (`0s`:
    /// never), and so are idle pooled upstream connections unless a DestinationRule sets
    /// `connectionPool` `idleTimeout` (default 1h).
    pub idle_timeout: IstioDuration,
    /// HTTP/2 max concurrent streams per connection (default 100).
    pub http2_max_concurrent_streams: u32,
    /// Drain deadline on SIGTERM (default 5s).
    pub drain_timeout: IstioDuration,
    /// Request bodies up to this size are buffered for retries (default 65536).
    pub max_retry_body_bytes: usize,
    /// Upstream connect timeout (default 10s, Envoy's).
    pub connect_timeout: IstioDuration,
    /// Downstream connections served at once per listener (default 10000). A connection
    /// over the limit is accepted and closed at once, and counted in
    /// `mesh_downstream_cx_overflow_total{listener}` (Envoy's `downstream_cx_overflow`);
    /// it never waits in the kernel's backlog. The admin server has its own budget.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_target_bytes: 8192,
            max_request_header_bytes: 60 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10).into(),
            stream_idle_timeout: Duration::from_secs(300).into(),
            request_timeout: Duration::ZERO.into(),
            max_request_body_bytes: 0,
            max_response_body_bytes: 0,
            idle_timeout: Duration::from_secs(3600).into(),
            http2_max_concurrent_streams: 100,
            drain_timeout: Duration::from_secs(5).into(),
            max_retry_body_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(10).into(),
            max_connections: 10_000,
        }
    }
}

/// `outboundTrafficPolicy`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutboundTrafficPolicy {
    /// `ALLOW_ANY` (default) or `REGISTRY_ONLY`.
    pub mode: OutboundMode,
}

pub use crate::stack::OutboundMode;

/// `gateway`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySettings {
    /// The Gateway resource this proxy implements, `name` …
    pub name: String,
    /// … in `namespace` (default: `workload.namespace`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Secrets of the Gateway's namespace: one subdirectory per Secret name (the
    /// `credentialName` without `kubernetes://` or namespace) holding `tls.crt`,
    /// `tls.key` and (for MUTUAL) `ca.crt`; files must resolve inside the directory.
    #[serde(default)]
    pub credentials_dir: Option<PathBuf>,
    /// Where each Gateway server port listens: `443: 0.0.0.0:8443`. Ports not listed
    /// listen on `0.0.0.0:<port>`.
    #[serde(default)]
    pub ports: HashMap<u16, SocketAddr>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

fn default_cluster_id() -> String {
    mesh_telemetry::exchange::DEFAULT_CLUSTER_ID.into()
}

fn default_normalization() -> String {
    "DEFAULT".into()
}

/// A settings error, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettingsError {
    /// The settings file.
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(u64, u64)>,
    /// Field path, when known.
    pub path: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((l, c)) = self.position {
            write!(f, ":{l}:{c}")?;
        }
        f.write_str(": error: ")?;
        if let Some(p) = &self.path {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for SettingsError {}

/// Finds the line and column of the key `path` (dotted) in `text`: each key is searched
/// after the previous one, which is exact for the block style settings files use.
fn locate(text: &str, path: &str) -> Option<(u64, u64)> {
    let mut from = 0usize;
    let mut found = None;
    for key in path.split('.') {
        let rest = &text[from..];
        let idx = rest
            .match_indices(key)
            .find(|(i, _)| {
                let after = &rest[i + key.len()..];
                let before_ok =
                    *i == 0 || matches!(rest.as_bytes()[i - 1], b' ' | b'\n' | b'{' | b',' | b'\t');
                before_ok && after.starts_with(':')
            })
            .map(|(i, _)| i)?;
        from += idx;
        found = Some(from);
        from += key.len();
    }
    let at = found?;
    let line = text[..at].matches('\n').count() as u64 + 1;
    let col = (at - text[..at].rfind('\n').map_or(0, |n| n + 1)) as u64 + 1;
    Some((line, col))
}

/// The parser's message without its own location prefix and source snippet (the
/// position is printed once, in front).
fn parse_message(full: &str) -> String {
    let first = full.lines().next().unwrap_or(full);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first.split_once(": ") {
        Some((loc, rest)) if loc.starts_with("line ") && loc.contains(" column ") => {
            rest.to_owned()
        }
        _ => first.to_owned(),
    }
}

impl Settings {
    /// Reads and validates the settings file at `path`.
    pub fn load(path: &Path) -> Result<Self, Vec<SettingsError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![SettingsError {
                file: path.to_path_buf(),
                position: None,
                path: None,
                message: format!("cannot read: {e}"),
            }]
        })?;
        let mut s = Self::from_yaml(path, &text)?;
        s.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(s)
    }

    /// Parses and validates settings text named `file` in errors.
    pub fn from_yaml(file: impl AsRef<Path>, text: &str) -> Result<Self, Vec<SettingsError>> {
        let file = file.as_ref();
        let s: Settings = serde_saphyr::from_str(text).map_err(|e| {
            vec![SettingsError {
                file: file.to_path_buf(),
                position: e.location().map(|l| (l.line(), l.column())),
                path: None,
                message: parse_message(&e.to_string()),
            }]
        })?;
        let errors: Vec<SettingsError> = s
            .problems()
            .into_iter()
            .map(|(path, message)| SettingsError {
                file: file.to_path_buf(),
                position: locate(text, path),
                path: Some(path.to_owned()),
                message,
            })
            .collect();
        if errors.is_empty() {
            Ok(s)
        } else {
            Err(errors)
        }
    }

    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if self.workload.namespace.is_empty() {
            p.push((
                "workload.namespace",
                "required: the workload's namespace".into(),
            ));
        }
        if self.workload.service_account.is_empty() {
            p.push((
                "workload.serviceAccount",
                "required: the workload's service account".into(),
            ));
        }
        if !self.workload.namespace.is_empty()
            && !self.workload.service_account.is_empty()
            && let Err(e) = self.identity()
        {
            p.push(("workload", format!("does not make a SPIFFE ID: {e}")));
        }
        if self.cluster_id.is_empty() {
            p.push(("clusterId", "must not be empty".into()));
        }
        for (bind, destination) in &self.listeners.tcp {
            if Listeners::tcp_destination(destination).is_none() {
                p.push((
                    "listeners.tcp",
                    format!("{bind}: {destination:?} is not a service `host:port`"),
                ));
            }
        }
        match (&self.discovery, self.config_dir.as_os_str().is_empty()) {
            (None, true) => p.push((
                "configDir",
                "required: the directory of Istio YAML (or set `discovery`)".into(),
            )),
            (Some(_), false) => p.push((
                "discovery",
                "set either configDir or discovery, not both".into(),
            )),
            (Some(d), true) => {
                if d.address
                    .rsplit_once(':')
                    .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
                {
                    p.push((
                        "discovery.address",
                        format!("{:?} is not `host:port`", d.address),
                    ));
                }
                if let Some(Err(e)) = self.discovery_identity() {
                    p.push(("discovery.identity", format!("not a SPIFFE ID: {e}")));
                }
            }
            (None, false) => {}
        }
        if self.svid.cert_dir.is_some() && self.svid.ca_dir.is_some() {
            p.push((
                "svid",
                "set either certDir or caDir (built-in issuer), not both".into(),
            ));
        }
        if self
            .svid
            .lifetime
            .is_some_and(|l| l.as_std() < Duration::from_secs(2))
        {
            p.push(("svid.lifetime", "must be at least 2s".into()));
        }
        if !(0.0..=100.0).contains(&self.tracing.sampling) {
            p.push((
                "tracing.sampling",
                format!("{} is not a percentage (0 to 100)", self.tracing.sampling),
            ));
        }
        if self.tracing.otlp.is_some() && self.tracing.zipkin.is_some() {
            p.push(("tracing", "set either otlp or zipkin, not both".into()));
        }
        if let Some(f) = &self.access_log.format
            && !matches!(f.as_str(), "TEXT" | "JSON")
        {
            p.push(("accessLog.format", format!("{f:?}: expected TEXT or JSON")));
        }
        if mesh_tls::authz::PathNormalization::from_istio(&self.path_normalization).is_none() {
            p.push((
                "pathNormalization",
                format!(
                    "{:?}: expected DEFAULT, BASE, NONE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES",
                    self.path_normalization
                ),
            ));
        }
        if let Some(m) = &self.gateway_topology.forward_client_cert_details
            && crate::stack::headers::ForwardClientCertDetails::from_istio(m).is_none()
        {
            p.push((
                "gatewayTopology.forwardClientCertDetails",
                format!(
                    "{m:?}: expected SANITIZE, FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET or ALWAYS_FORWARD_ONLY"
                ),
            ));
        }
        if let Some(h) = self
            .gateway_topology
            .untrusted_headers
            .iter()
            .find(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err())
        {
            p.push((
                "gatewayTopology.untrustedHeaders",
                format!("{h:?} is not a header name"),
            ));
        }
        if self.limits.max_headers == 0 {
            p.push(("limits.maxHeaders", "must be at least 1".into()));
        }
        if self.limits.max_request_header_bytes < 1024 {
            p.push((
                "limits.maxRequestHeaderBytes",
                "must be at least 1024".into(),
            ));
        }
        if self.limits.max_request_target_bytes < 256 {
            p.push((
                "limits.maxRequestTargetBytes",
                "must be at least 256".into(),
            ));
        }
        if self.limits.max_connections == 0 {
            p.push(("limits.maxConnections", "must be at least 1".into()));
        }
        if self.limits.http2_max_concurrent_streams == 0 {
            p.push((
                "limits.http2MaxConcurrentStreams",
                "must be at least 1".into(),
            ));
        }
        p
    }

    /// The workload's SPIFFE identity.
    pub fn identity(&self) -> Result<Identity, mesh_core::IdentityError> {
        Identity::from_istio(
            &self.trust_domain,
            &self.workload.namespace,
            &self.workload.service_account,
        )
    }

    /// `path` resolved against the settings file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "workload: {namespace: default, serviceAccount: order-service}\nconfigDir: istio\n";

    #[test]
    fn workload_locality_and_network_are_read() {
        let yaml = "workload: {namespace: default, serviceAccount: a, locality: us-east/1a/r1, network: net-1}\nconfigDir: istio\n";
        let s = Settings::from_yaml("s.yaml", yaml).unwrap();
        assert_eq!(s.workload.locality.as_deref(), Some("us-east/1a/r1"));
        assert_eq!(s.workload.network.as_deref(), Some("net-1"));
        // The workload the proxy runs as (the `proxy` feature's process code).
        #[cfg(feature = "proxy")]
        {
            let w = crate::process::runtime::workload(&s);
            assert_eq!(w.locality.zone, "1a");
            assert_eq!(w.network.as_deref(), Some("net-1"));
            let unset = Settings::from_yaml("s.yaml", MIN).unwrap();
            assert!(
                crate::process::runtime::workload(&unset)
                    .locality
                    .is_empty()
            );
        }
    }

    #[test]
    fn tcp_egress_names_a_service_port() {
        let ok = format!("{MIN}listeners:\n  tcp:\n    127.0.0.1:6379: redis.data:6379\n");
        let s = Settings::from_yaml("s.yaml", &ok).unwrap();
        let (bind, destination) = s.listeners.tcp.iter().next().unwrap();
        assert_eq!(bind.port(), 6379);
        assert_eq!(
            Listeners::tcp_destination(destination),
            Some(("redis.data", 6379))
        );
        for bad in [
            "redis",
            "redis:",
            ":6379",
            "redis:0",
            "redis:http",
            "re dis:1",
        ] {
            let yaml = format!("{MIN}listeners:\n  tcp:\n    127.0.0.1:6379: \"{bad}\"\n");
            let errors = Settings::from_yaml("s.yaml", &yaml).unwrap_err();
            assert_eq!(errors[0].path.as_deref(), Some("listeners.tcp"), "{bad}");
            assert!(errors[0].position.is_some(), "{bad}");
        }
    }

    #[test]
    fn defaults_follow_istio_ports_and_security_limits() {
        let s = Settings::from_yaml("s.yaml", MIN).unwrap();
        assert_eq!(s.listeners.inbound.port(), 15006);
        assert_eq!(s.listeners.outbound.port(), 15001);
        assert_eq!(s.listeners.admin.port(), 15000);
        assert_eq!(s.limits.max_request_header_bytes, 60 * 1024);
        assert_eq!(s.limits.max_headers, 100);
        assert_eq!(s.limits.drain_timeout.as_std(), Duration::from_secs(5));
        assert_eq!(s.outbound_traffic_policy.mode, OutboundMode::AllowAny);
        assert_eq!(s.tracing.sampling, 1.0);
    }

    #[test]
    fn limits_have_envoys_defaults_and_the_old_timeout_name_is_read() {
        let s = Settings::from_yaml("s.yaml", MIN).unwrap();
        let l = &s.limits;
        assert_eq!(l.max_request_target_bytes, 8192);
        assert_eq!(l.header_read_timeout.as_std(), Duration::from_secs(10));
        assert_eq!(l.stream_idle_timeout.as_std(), Duration::from_secs(300));
        assert_eq!(l.request_timeout.as_std(), Duration::ZERO);
        assert_eq!(
            (l.max_request_body_bytes, l.max_response_body_bytes),
            (0, 0)
        );
        for key in ["requestHeadersTimeout", "headerReadTimeout"] {
            let text = format!(
                "{MIN}limits: {{{key}: 2s, streamIdleTimeout: 1m, requestTimeout: 30s, maxRequestBodyBytes: 10, maxResponseBodyBytes: 20, maxRequestTargetBytes: 300}}\n"
            );
            let l = Settings::from_yaml("s.yaml", &text).unwrap().limits;
            assert_eq!(
                l.header_read_timeout.as_std(),
                Duration::from_secs(2),
                "{key}"
            );
            assert_eq!(l.stream_idle_timeout.as_std(), Duration::from_secs(60));
            assert_eq!(l.request_timeout.as_std(), Duration::from_secs(30));
            assert_eq!(
                (l.max_request_body_bytes, l.max_response_body_bytes),
                (10, 20)
            );
            assert_eq!(l.max_request_target_bytes, 300);
        }
        let text = format!("{MIN}limits:\n  maxRequestTargetBytes: 10\n");
        let errs = Settings::from_yaml("s.yaml", &text).unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "s.yaml:4:3: error: limits.maxRequestTargetBytes: must be at least 256"
        );
    }

    #[test]
    fn unknown_field_is_located() {
        let text = "workload:\n  namespace: default\n  serviceAccount: a\nconfigDir: x\nlisteners:\n  outbund: 127.0.0.1:1\n";
        let errs = Settings::from_yaml("s.yaml", text).unwrap_err();
        assert_eq!(errs.len(), 1);
        let shown = errs[0].to_string();
        assert_eq!(
            shown,
            "s.yaml:6:3: error: unknown field `outbund`, expected one of inbound, app, outbound, admin, appProtocol, tcp, capture, protocolDetectionTimeout"
        );
    }

    #[test]
    fn semantic_errors_name_field_and_line() {
        let text = "workload:\n  namespace: default\n  serviceAccount: a\nconfigDir: x\ntracing:\n  sampling: 150\npathNormalization: WEIRD\n";
        let errs = Settings::from_yaml("s.yaml", text).unwrap_err();
        let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "s.yaml:6:3: error: tracing.sampling: 150 is not a percentage (0 to 100)",
                "s.yaml:7:1: error: pathNormalization: \"WEIRD\": expected DEFAULT, BASE, NONE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES",
            ]
        );
    }

    #[test]
    fn missing_identity_and_both_svid_sources_are_errors() {
        let text = "configDir: x\nsvid: {certDir: a, caDir: b}\n";
        let errs = Settings::from_yaml("s.yaml", text).unwrap_err();
        let paths: Vec<_> = errs.iter().filter_map(|e| e.path.as_deref()).collect();
        assert_eq!(
            paths,
            vec!["workload.namespace", "workload.serviceAccount", "svid"]
        );
    }

    #[test]
    fn registry_only_and_durations_parse() {
        let text = format!(
            "{MIN}outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}\nlimits: {{drainTimeout: 250ms}}\nsvid: {{caDir: ca, lifetime: 1h}}\n"
        );
        let s = Settings::from_yaml("s.yaml", &text).unwrap();
        assert_eq!(s.outbound_traffic_policy.mode, OutboundMode::RegistryOnly);
        assert_eq!(s.limits.drain_timeout.as_std(), Duration::from_millis(250));
        assert_eq!(s.svid.lifetime.unwrap().as_std(), Duration::from_secs(3600));
    }

    #[test]
    fn invalid_address_is_an_error() {
        let text = format!("{MIN}listeners:\n  outbound: localhost\n");
        let errs = Settings::from_yaml("s.yaml", &text).unwrap_err();
        assert!(errs[0].to_string().starts_with("s.yaml:"), "{}", errs[0]);
    }
}
