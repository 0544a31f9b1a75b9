//! Which transport each upstream endpoint gets: Istio mTLS, TLS origination or
//! plaintext, from the destination's DestinationRule `tls` and the endpoint's sidecar
//! mark (auto-mTLS).
//!
//! # Behaviour
//!
//! [`UpstreamTls`] is built once per destination from its resolved policy (the `tls`
//! block after DR-02..DR-04 merging: rule, port, subset, subset port, whole blocks) and
//! hands out an [`UpstreamSecurity`] per endpoint:
//!
//! | DestinationRule `tls` | transport |
//! |---|---|
//! | none (auto-mTLS, DR-50, SR-24) | Istio mTLS to an endpoint whose `tls_mode` is `istio` (label `security.istio.io/tlsMode: istio`, or a ServiceEntry endpoint with a `serviceAccount`, SR-23, SR-25), plaintext to the others; an endpoint of a `MESH_EXTERNAL` service, or whose PeerAuthentication is `DISABLE` on its port, is never marked `istio` ([`mesh_routing::Registry::mark_plaintext_servers`]) |
//! | `DISABLE` (also a `tls` block without `mode`, DR-51) | plaintext |
//! | `SIMPLE`, `MUTUAL` | TLS origination ([`Origination`], DR-52..DR-54) to every endpoint |
//! | `ISTIO_MUTUAL` | Istio mTLS to every endpoint |
//!
//! Istio mTLS checks the server's SPIFFE ID against `tls.subjectAltNames` when set,
//! else against the endpoint's identities (SR-22); SNI is `tls.sni` when set, else the
//! destination host.
//!
//! `credentialName` (`SIMPLE`, `MUTUAL`) is read where a credentials directory is given
//! ([`UpstreamTls::credentials`]; the gateway's `gateway.credentialsDir`, through
//! [`crate::credentials`]): the Secret's `tls.crt` and `tls.key` are the client
//! certificate and key (`MUTUAL`), its `ca.crt`, when present, the roots. The Secret is
//! named by its name or `kubernetes://<name>`, and must be in the directory, which holds
//! the proxy's own namespace. Without a credentials directory (sidecars) the certificate
//! files apply, as on Istio's sidecars for rules without a `workloadSelector`.
//!
//! # Errors
//!
//! TLS origination settings that cannot be used (no `caCertificates`, an unreadable
//! file, `MUTUAL` without certificate files) are logged when the destination is built, and
//! every connection to it fails (503 `UF`) rather than falling back to plaintext.

use std::sync::Arc;

use mesh_core::config::{ClientTlsMode, ClientTlsSettings, SecretRef};
use mesh_core::{Endpoint, Identity, TlsMode};
use mesh_tls::{ClientTls, Origination, SecureNaming, UpstreamSecurity};
use rustls_pki_types::ServerName;

use crate::credentials::CredentialFiles;

/// The transport choice of one destination.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    choice: Choice,
    tls: ClientTls,
    /// SNI: `tls.sni`, else the destination host; `None` when neither is a valid name.
    server_name: Option<ServerName<'static>>,
}

#[derive(Clone, Debug)]
enum Choice {
    Auto,
    Plaintext,
    Originate(Arc<Origination>),
    Refuse(Arc<str>),
    Istio(Option<Arc<[Identity]>>),
}

impl UpstreamTls {
    /// The choice for a destination `host` whose resolved `tls` block is `settings`;
    /// Istio mTLS presents `tls`'s SVID.
    pub fn new(settings: Option<&ClientTlsSettings>, host: &str, tls: ClientTls) -> Self {
        let choice = match settings {
            None => Choice::Auto,
            Some(s) => match s.mode {
                None | Some(ClientTlsMode::Disable) => Choice::Plaintext,
                Some(ClientTlsMode::IstioMutual) => {
                    let sans: Vec<Identity> = s
                        .subject_alt_names
                        .iter()
                        .filter_map(|san| Identity::parse(san).ok())
                        .collect();
                    Choice::Istio((!sans.is_empty()).then(|| Arc::from(sans)))
                }
                Some(ClientTlsMode::Simple | ClientTlsMode::Mutual) => {
                    match Origination::from_settings(s) {
                        Ok(o) => Choice::Originate(Arc::new(o)),
                        Err(e) => {
                            tracing::warn!(
                                destination = host,
                                "DestinationRule tls cannot be used, connections will fail: {e}"
                            );
                            Choice::Refuse(Arc::from(format!("DestinationRule tls of {host}: {e}")))
                        }
                    }
                }
            },
        };
        let sni = settings
            .and_then(|s| s.sni.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or(host);
        Self {
            choice,
            tls,
            server_name: ServerName::try_from(sni.to_owned()).ok(),
        }
    }

    /// With `credentials` (a credentials directory), `settings`' `credentialName`
    /// replaces its certificate files (see the module docs); a Secret that cannot be
    /// read makes every connection fail, as unusable files do.
    #[must_use]
    pub fn credentials(
        mut self,
        settings: Option<&ClientTlsSettings>,
        credentials: Option<&std::path::Path>,
    ) -> Self {
        let (Some(settings), Some(dir)) = (settings, credentials) else {
            return self;
        };
        let Some(name) = settings.credential_name.as_deref() else {
            return self;
        };
        if !matches!(
            settings.mode,
            Some(ClientTlsMode::Simple | ClientTlsMode::Mutual)
        ) {
            return self;
        }
        self.choice = match from_secret(settings, name, dir) {
            Ok(o) => Choice::Originate(Arc::new(o)),
            Err(e) => {
                tracing::warn!(
                    credential = name,
                    "DestinationRule tls cannot be used, connections will fail: {e}"
                );
                Choice::Refuse(Arc::from(format!("DestinationRule tls: {e}")))
            }
        };
        self
    }

    /// The transport to `ep`.
    pub fn security(&self, ep: &Endpoint) -> UpstreamSecurity {
        match &self.choice {
            Choice::Auto if ep.tls_mode == TlsMode::Istio => self.istio(ep, None),
            Choice::Auto | Choice::Plaintext => UpstreamSecurity::Plaintext,
            Choice::Istio(sans) => self.istio(ep, sans.as_ref()),
            Choice::Originate(origination) => UpstreamSecurity::Originate {
                origination: origination.clone(),
                server_name: self.server_name_or_address(ep),
            },
            Choice::Refuse(reason) => UpstreamSecurity::Refuse(reason.clone()),
        }
    }

    fn istio(&self, ep: &Endpoint, sans: Option<&Arc<[Identity]>>) -> UpstreamSecurity {
        let naming = match (sans, &self.server_name) {
            (Some(sans), _) => SecureNaming::OneOf(sans.clone()),
            // A host that is not a DNS name (a wildcard ServiceEntry host): its address
            // is sent as SNI and any trusted identity is accepted.
            (None, None) => SecureNaming::AnyTrusted,
            (None, Some(_)) if ep.identities.is_empty() => SecureNaming::AnyTrusted,
            (None, Some(_)) => SecureNaming::OneOf(ep.identities.clone()),
        };
        UpstreamSecurity::Istio {
            tls: self.tls.clone(),
            naming,
            server_name: self.server_name_or_address(ep),
        }
    }

    fn server_name_or_address(&self, ep: &Endpoint) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(ep.address.ip().into()))
    }
}

/// The connection settings of a destination's `connectionPool.tcp`: the connect
/// timeout (the mesh's default when unset), TCP keep-alive, and the age at which a
/// connection is retired (`maxConnectionDuration`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpPool {
    /// `connectTimeout`.
    pub connect_timeout: Option<std::time::Duration>,
    /// `tcpKeepalive`.
    pub keepalive: Option<mesh_tls::Keepalive>,
    /// `maxConnectionDuration`.
    pub max_connection_duration: Option<std::time::Duration>,
}

impl TcpPool {
    /// The settings of `policy` (the merged DestinationRule blocks of a destination).
    pub fn of(policy: &mesh_routing::ResolvedPolicy) -> Self {
        let Some(tcp) = policy
            .connection_pool
            .as_ref()
            .and_then(|cp| cp.tcp.as_ref())
        else {
            return Self::default();
        };
        let std = |d: Option<mesh_core::config::Duration>| {
            d.map(std::time::Duration::from).filter(|d| !d.is_zero())
        };
        Self {
            connect_timeout: std(tcp.connect_timeout),
            keepalive: tcp.tcp_keepalive.as_ref().map(|k| mesh_tls::Keepalive {
                time: std(k.time),
                interval: std(k.interval),
                probes: k.probes,
            }),
            max_connection_duration: std(tcp.max_connection_duration),
        }
    }
}

/// The origination of `settings` with the files of Secret `name` in `dir`.
fn from_secret(
    settings: &ClientTlsSettings,
    name: &str,
    dir: &std::path::Path,
) -> Result<Origination, String> {
    let secret = SecretRef::parse(name, "").map_err(|e| e.to_string())?;
    let files = CredentialFiles::open(dir, &secret).map_err(|e| e.to_string())?;
    let path = |file: &str| {
        files
            .join(file)
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string())
    };
    let mut resolved = settings.clone();
    resolved.credential_name = None;
    if files.has("ca.crt") {
        resolved.ca_certificates = Some(path("ca.crt")?);
    }
    if settings.mode == Some(ClientTlsMode::Mutual) {
        resolved.client_certificate = Some(path("tls.crt")?);
        resolved.private_key = Some(path("tls.key")?);
    }
    Origination::from_settings(&resolved).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use mesh_core::Labels;
    use mesh_tls::{CertStore, CertificateAuthority};

    #[test]
    fn tcp_pool_settings_from_the_rule() {
        use mesh_core::config::{ConnectionPoolSettings, TcpKeepalive, TcpSettings};
        let secs = |s: u64| Some(std::time::Duration::from_secs(s).into());
        let policy = mesh_routing::ResolvedPolicy {
            connection_pool: Some(ConnectionPoolSettings {
                tcp: Some(TcpSettings {
                    connect_timeout: secs(2),
                    max_connection_duration: secs(0),
                    tcp_keepalive: Some(TcpKeepalive {
                        time: secs(7),
                        interval: None,
                        probes: Some(3),
                    }),
                    ..TcpSettings::default()
                }),
                ..ConnectionPoolSettings::default()
            }),
            ..mesh_routing::ResolvedPolicy::default()
        };
        let pool = TcpPool::of(&policy);
        assert_eq!(
            pool.connect_timeout,
            Some(std::time::Duration::from_secs(2))
        );
        // Zero is "not set", as Envoy reads it.
        assert_eq!(pool.max_connection_duration, None);
        assert_eq!(
            pool.keepalive,
            Some(mesh_tls::Keepalive {
                time: Some(std::time::Duration::from_secs(7)),
                interval: None,
                probes: Some(3),
            })
        );
        assert_eq!(
            TcpPool::of(&mesh_routing::ResolvedPolicy::default()),
            TcpPool::default()
        );
    }

    fn client() -> ClientTls {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        ClientTls::new(CertStore::from_issued(&ca.issue("prod", "orders").unwrap()).unwrap())
    }

    fn endpoint(mode: TlsMode) -> Endpoint {
        Endpoint::new("127.0.0.1:8080".parse().unwrap()).with_tls_mode(mode)
    }

    #[test]
    fn auto_mtls_follows_the_endpoint_and_an_explicit_rule_wins() {
        let auto = UpstreamTls::new(None, "payment", client());
        assert_eq!(
            auto.security(&endpoint(TlsMode::Istio)).as_str(),
            "istio_mutual"
        );
        assert_eq!(
            auto.security(&endpoint(TlsMode::Disabled)).as_str(),
            "plaintext"
        );

        let disable = ClientTlsSettings {
            mode: Some(ClientTlsMode::Disable),
            ..ClientTlsSettings::default()
        };
        let rule = UpstreamTls::new(Some(&disable), "payment", client());
        assert_eq!(
            rule.security(&endpoint(TlsMode::Istio)).as_str(),
            "plaintext"
        );

        let istio = ClientTlsSettings {
            mode: Some(ClientTlsMode::IstioMutual),
            ..ClientTlsSettings::default()
        };
        let rule = UpstreamTls::new(Some(&istio), "payment", client());
        assert_eq!(
            rule.security(&endpoint(TlsMode::Disabled)).as_str(),
            "istio_mutual"
        );
    }

    #[test]
    fn unusable_origination_settings_refuse_instead_of_plaintext() {
        let simple = ClientTlsSettings {
            mode: Some(ClientTlsMode::Simple),
            ..ClientTlsSettings::default()
        };
        let rule = UpstreamTls::new(Some(&simple), "api.example.com", client());
        let ep = endpoint(TlsMode::Disabled).with_labels(Labels::new());
        assert_eq!(rule.security(&ep).as_str(), "refused");
    }
}
