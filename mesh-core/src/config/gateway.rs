//! `Gateway` (`networking.istio.io`): listeners (port, protocol, hosts, TLS) of an edge
//! proxy selected by labels. Field names follow istio/api `gateway.proto`.

use serde::Deserialize;

use super::Labels;

/// The `spec` of a Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewaySpec {
    /// Servers (listeners) of the gateway.
    pub servers: Vec<Server>,
    /// Labels of the gateway proxies this applies to.
    pub selector: Labels,
}

/// One listener of a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Server {
    /// The port the proxy listens on (required).
    pub port: Option<GatewayPort>,
    /// Bind address or unix socket.
    pub bind: Option<String>,
    /// Hosts exposed (`[namespace/]dnsName`, required).
    pub hosts: Vec<String>,
    /// TLS settings.
    pub tls: Option<ServerTlsSettings>,
    /// Default endpoint for traffic.
    pub default_endpoint: Option<String>,
    /// Unique server name.
    pub name: Option<String>,
}

/// A gateway or ServiceEntry port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewayPort {
    /// Port number (required).
    pub number: u32,
    /// HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, TCP or TLS.
    pub protocol: String,
    /// Port name.
    pub name: String,
    /// Deprecated target port.
    pub target_port: Option<u32>,
}

/// Server-side TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerTlsSettings {
    /// Redirect plain HTTP to HTTPS.
    pub https_redirect: bool,
    /// TLS mode (default PASSTHROUGH).
    pub mode: Option<ServerTlsMode>,
    /// Server certificate file.
    pub server_certificate: Option<String>,
    /// Server key file.
    pub private_key: Option<String>,
    /// CA bundle for client certificates.
    pub ca_certificates: Option<String>,
    /// CRL file.
    pub ca_crl: Option<String>,
    /// Secret holding the server credentials.
    pub credential_name: Option<String>,
    /// Up to two secrets (RSA + ECDSA).
    pub credential_names: Vec<String>,
    /// Inline certificate files (RSA + ECDSA).
    pub tls_certificates: Vec<TlsCertificate>,
    /// Accepted client SANs.
    pub subject_alt_names: Vec<String>,
    /// Accepted client certificate SPKI hashes.
    pub verify_certificate_spki: Vec<String>,
    /// Accepted client certificate hashes.
    pub verify_certificate_hash: Vec<String>,
    /// Minimum TLS version.
    pub min_protocol_version: Option<TlsProtocol>,
    /// Maximum TLS version.
    pub max_protocol_version: Option<TlsProtocol>,
    /// Cipher suites.
    pub cipher_suites: Vec<String>,
}

/// A certificate/key pair given by file paths.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsCertificate {
    /// Certificate file.
    pub server_certificate: Option<String>,
    /// Key file.
    pub private_key: Option<String>,
    /// CA bundle.
    pub ca_certificates: Option<String>,
}

/// Server TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ServerTlsMode {
    /// No termination; route by SNI.
    Passthrough,
    /// Server certificate only.
    Simple,
    /// Client certificate required.
    Mutual,
    /// SNI-encoded destination (east-west).
    AutoPassthrough,
    /// Istio workload certificates.
    IstioMutual,
    /// Client certificate requested, validated if presented.
    OptionalMutual,
}

/// TLS protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TlsProtocol {
    /// Proxy default.
    #[serde(rename = "TLS_AUTO")]
    Auto,
    /// TLS 1.0.
    #[serde(rename = "TLSV1_0")]
    V1_0,
    /// TLS 1.1.
    #[serde(rename = "TLSV1_1")]
    V1_1,
    /// TLS 1.2.
    #[serde(rename = "TLSV1_2")]
    V1_2,
    /// TLS 1.3.
    #[serde(rename = "TLSV1_3")]
    V1_3,
}
