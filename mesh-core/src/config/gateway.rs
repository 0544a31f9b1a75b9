//! `Gateway` (`networking.istio.io`): listeners (port, protocol, hosts, TLS) of an edge
//! proxy selected by labels. Field names follow istio/api `gateway.proto`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::Labels;
use super::validate::{is_dns1123_label, is_dns1123_subdomain};

/// The `spec` of a Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewaySpec {
    /// Servers (listeners) of the gateway.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<Server>,
    /// Labels of the gateway proxies this applies to.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: Labels,
}

/// One listener of a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Server {
    /// The port the proxy listens on (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<GatewayPort>,
    /// Bind address or unix socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// Hosts exposed (`[namespace/]dnsName`, required).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// TLS settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTlsSettings>,
    /// Default endpoint for traffic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_endpoint: Option<String>,
    /// Unique server name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A gateway or ServiceEntry port.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GatewayPort {
    /// Port number (required).
    pub number: u32,
    /// HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, MONGO, TCP or TLS.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// Port name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Deprecated target port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// Server-side TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerTlsSettings {
    /// Redirect plain HTTP to HTTPS.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub https_redirect: bool,
    /// TLS mode (default PASSTHROUGH).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<ServerTlsMode>,
    /// Server certificate file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    /// Server key file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// CA bundle for client certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    /// CRL file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
    /// Secret holding the server credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    /// Up to two secrets (RSA + ECDSA).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub credential_names: Vec<String>,
    /// Inline certificate files (RSA + ECDSA).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_certificates: Vec<TlsCertificate>,
    /// Accepted client SANs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    /// Accepted client certificate SPKI hashes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_spki: Vec<String>,
    /// Accepted client certificate hashes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verify_certificate_hash: Vec<String>,
    /// Minimum TLS version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<TlsProtocol>,
    /// Maximum TLS version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_protocol_version: Option<TlsProtocol>,
    /// Cipher suites.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cipher_suites: Vec<String>,
}

/// A certificate/key pair given by file paths.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TlsCertificate {
    /// Certificate file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_certificate: Option<String>,
    /// Key file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// CA bundle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
}

/// Server TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
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

/// The Kubernetes Secret a Gateway server's `credentialName` refers to, resolved the way
/// Istio resolves it (`pilot/pkg/model/credentials`), and scoped to the Gateway's own
/// namespace (ISTIO.md GW-10).
///
/// Accepted forms, with `ns` the Gateway's namespace:
///
/// | `credentialName` | Secret |
/// |---|---|
/// | `name` | `ns/name` |
/// | `kubernetes://name` | `ns/name` |
/// | `ns/name`, `kubernetes://ns/name`, `kubernetes-gateway://ns/name` | `ns/name` |
///
/// `name` is a Secret name (a DNS-1123 subdomain: lowercase letters, digits, `-` and
/// `.`, each `.`-separated label starting and ending with a letter or digit, at most 253
/// characters) and `ns` a namespace (a DNS-1123 label). Everything else is refused:
/// another namespace (Istio serves one only after an authorization check the proxy has
/// no source for, CVE-2021-34824), `builtin://` and other schemes, more than one `/`,
/// and any text that is not a plain name (`..`, `/abs`, `%2e`, uppercase, empty).
///
/// # Example
///
/// ```
/// use mesh_core::config::SecretRef;
/// let s = SecretRef::parse("kubernetes://api-cert", "istio-system").unwrap();
/// assert_eq!((s.namespace.as_str(), s.name.as_str()), ("istio-system", "api-cert"));
/// assert!(SecretRef::parse("../other/api-cert", "istio-system").is_err());
/// assert!(SecretRef::parse("other/api-cert", "istio-system").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SecretRef {
    /// The Secret's namespace: always the Gateway's own.
    pub namespace: String,
    /// The Secret's name: a DNS-1123 subdomain, so never a path, `.` or `..`.
    pub name: String,
}

/// Why a `credentialName` is refused (see [`SecretRef`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretRefError {
    /// Nothing is named.
    #[error("credentialName must not be empty; name a Secret of the Gateway's namespace")]
    Empty,
    /// The name part is not a Secret name.
    #[error(
        "`{0}` is not a valid credentialName: the Secret name must be a DNS-1123 subdomain \
         (lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit, \
         at most 253 characters), optionally written `kubernetes://<name>` or \
         `<namespace>/<name>`"
    )]
    InvalidName(String),
    /// The namespace part is not a namespace name.
    #[error(
        "`{0}` is not a valid credentialName: `{1}` is not a namespace name (a DNS-1123 label)"
    )]
    InvalidNamespace(String, String),
    /// The Secret is in another namespace.
    #[error(
        "credentialName `{0}` names a Secret in namespace `{1}`; a Gateway may only use \
         Secrets of its own namespace `{2}`"
    )]
    OtherNamespace(String, String, String),
    /// A scheme other than `kubernetes://` and `kubernetes-gateway://`.
    #[error(
        "credentialName `{0}` uses an unsupported scheme; expected a Secret name, \
         `kubernetes://` or `kubernetes-gateway://`"
    )]
    Scheme(String),
    /// `kubernetes-gateway://` without a namespace.
    #[error("credentialName `{0}` needs `kubernetes-gateway://<namespace>/<name>`")]
    MissingNamespace(String),
}

impl SecretRef {
    /// Resolves `credential_name` for a Gateway in `namespace`.
    pub fn parse(credential_name: &str, namespace: &str) -> Result<Self, SecretRefError> {
        let raw = credential_name;
        // Errors quote the name with control characters escaped.
        let shown = || raw.escape_debug().to_string();
        if raw.is_empty() {
            return Err(SecretRefError::Empty);
        }
        let (rest, needs_namespace) = if let Some(r) = raw.strip_prefix("kubernetes://") {
            (r, false)
        } else if let Some(r) = raw.strip_prefix("kubernetes-gateway://") {
            (r, true)
        } else if raw.contains("://") {
            return Err(SecretRefError::Scheme(shown()));
        } else {
            (raw, false)
        };
        let (ns, name) = match rest.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None if needs_namespace => return Err(SecretRefError::MissingNamespace(shown())),
            None => (None, rest),
        };
        if !is_dns1123_subdomain(name) {
            return Err(SecretRefError::InvalidName(shown()));
        }
        if let Some(ns) = ns {
            if !is_dns1123_label(ns) {
                return Err(SecretRefError::InvalidNamespace(
                    shown(),
                    ns.escape_debug().to_string(),
                ));
            }
            if ns != namespace {
                return Err(SecretRefError::OtherNamespace(
                    shown(),
                    ns.to_owned(),
                    namespace.to_owned(),
                ));
            }
        }
        Ok(SecretRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_names_resolve_only_inside_the_gateway_namespace() {
        let ok = |raw: &str| SecretRef::parse(raw, "edge").map(|s| (s.namespace, s.name));
        let want = Ok(("edge".to_owned(), "api-cert".to_owned()));
        for raw in [
            "api-cert",
            "kubernetes://api-cert",
            "edge/api-cert",
            "kubernetes://edge/api-cert",
            "kubernetes-gateway://edge/api-cert",
        ] {
            assert_eq!(ok(raw), want, "{raw}");
        }
        assert_eq!(
            ok("api.example.com"),
            Ok(("edge".to_owned(), "api.example.com".to_owned()))
        );
        for raw in [
            "",
            ".",
            "..",
            "../other/x",
            "/abs",
            "/etc/ssl/private",
            "a/b/c",
            "edge/a/b",
            "other/x",
            "kubernetes://other/x",
            "kubernetes-gateway://other/x",
            "kubernetes-gateway://x",
            "kubernetes://",
            "builtin://",
            "file:///etc/ssl",
            "%2e%2e%2fother%2fx",
            "..%2fother",
            "Api-Cert",
            "api_cert",
            "-api",
            "api-",
            "a..b",
            ".hidden",
            "api cert",
            "api\0cert",
            "edge/",
            "/x",
            "./x",
            "x\\..\\other",
        ] {
            assert!(ok(raw).is_err(), "{raw:?} was accepted");
        }
        assert!(ok(&"a".repeat(254)).is_err());
        assert!(ok(&"a".repeat(253)).is_err(), "labels are at most 63");
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long.len(), 253);
        assert!(ok(&long).is_ok());
    }
}
