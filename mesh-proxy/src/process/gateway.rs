//! The ingress gateway process: Gateway servers (HTTP, HTTPS `SIMPLE` and `MUTUAL`) in
//! front of the VirtualServices bound to the gateway, routed to mesh services over mTLS.
//! This module holds the listeners, the TLS servers and their credentials; what a
//! request goes through once accepted is [`crate::stack::gateway`].
//!
//! # Behaviour
//!
//! - The Gateway resource is `gateway.namespace/gateway.name` of the settings. Its
//!   servers are grouped by listen address; each address gets one listener: the port's
//!   entry of `gateway.ports` when there is one (it overrides `bind`, so all servers of
//!   that port share it), else the server's `bind` IP with the port, else
//!   `0.0.0.0:<port>`. Servers of one port with different `bind`s get separate
//!   listeners, as Istio's do.
//! - HTTPS: the TLS ClientHello's SNI selects the server whose `hosts` cover it most
//!   specifically (an exact name, then the longest `*.example.com` wildcard covering one
//!   or more labels, then `*`; a `namespace/` prefix is ignored; ties go to the first
//!   server). An SNI no server covers, or no SNI without a `*` server, fails the
//!   handshake.
//! - `SIMPLE` and `MUTUAL` certificates (GW-20..GW-29 of mesh-tls's `ISTIO.md`) come
//!   from `credentialName` or `credentialNames` (Secrets under
//!   `gateway.credentialsDir/<name>/`: `tls.crt` or `cert`, `tls.key` or `key`), else
//!   from `tlsCertificates`, else from the files `serverCertificate` and `privateKey`.
//!   With two certificates (RSA and ECDSA) the ECDSA one serves clients whose signature
//!   algorithms allow it, the other the rest ([`mesh_tls::server_options::ByKeyType`]).
//!   `MUTUAL` requires a client certificate chaining to the CA: the first Secret's
//!   `ca.crt` (or `cacert`), else that of the Secret `<name>-cacert`; with files,
//!   `caCertificates` (else the first `tlsCertificates[].caCertificates`). Revocation
//!   lists from `caCrl` and from the CA's Secret (`ca.crl` or `crl`) both apply; pins
//!   (`verifyCertificateSpki`, `verifyCertificateHash`) and `subjectAltNames` are checked
//!   after the chain. `minProtocolVersion`, `maxProtocolVersion` and `cipherSuites` shape
//!   the handshake ([`mesh_tls::server_options`]: TLS 1.2 and 1.3 only; unknown suite
//!   names are logged and ignored). A setting that cannot be used (a file, a CRL, a pin,
//!   a version) is an error naming the Gateway, the server (`servers[i]` and its name)
//!   and the field: the start fails, or a reload keeps the previous servers.
//! - A connection stays on the server its SNI selected. Every request's host
//!   (`:authority`, or the absolute-form target, or `Host`) is looked up among the port's
//!   servers with the same rule as the SNI: when it selects another server the answer is
//!   `421 Misdirected Request` (flag `NR`), so that an HTTP/2 client that coalesced the
//!   request onto this connection retries on a new one whose SNI names the host (RFC 9110
//!   §15.5.20, RFC 9113 §9.1.1); when no server of the port covers it, `404` with flag
//!   `NR`, as for any host without a route. Both answers are the same for HTTP/1.1 and
//!   HTTP/2, and nothing is forwarded. Plain-HTTP ports have no SNI and route by host as
//!   before (ISTIO.md GW-11).
//! - Each server has its own TLS session cache, rebuilt with its credentials: a session
//!   is resumed only on the server (and under the client-certificate rule) that
//!   established it, and rustls also refuses a session whose SNI differs, so resuming a
//!   `SIMPLE` server's session against a `MUTUAL` server's name is a full handshake that
//!   asks for a client certificate (GW-12).
//! - `credentialName` is resolved as a Kubernetes Secret of the Gateway's namespace
//!   ([`SecretRef`]: validated when the configuration loads). The credentials directory
//!   holds that namespace's Secrets, one directory per Secret name (`<name>/`), so the
//!   forms `name`, `kubernetes://name` and `<namespace>/name` of the same Secret all read
//!   `<credentialsDir>/name/`. The path is built only from the validated name (one path
//!   component, never `.` or `..`), and each file is resolved through its symlinks and
//!   refused when it lands outside the credentials directory. A Kubernetes-Secret source
//!   (not built yet) must apply the same rule: the Gateway's namespace only, never a
//!   name taken from the request or from unvalidated text (GW-10).
//! - HTTP servers with `tls.httpsRedirect: true` answer 301 to the `https://` URL.
//! - Requests are routed by the VirtualServices bound to this gateway (host and path);
//!   destinations are mesh services reached with the outbound stack (mTLS, retries,
//!   outlier detection). A host or path without a route gets 404 `NR`.
//! - Identity and internal headers from clients are removed; `x-request-id` is
//!   generated when absent.
//!
//! # Choices that differ from Istio
//!
//! Listening ports are fixed at start: a reload updates routes, server hosts, TLS modes
//! and credentials (also when the credential files change), but a new port needs a
//! restart.
//! `AUTO_PASSTHROUGH` and `OPTIONAL_MUTUAL` are refused at start. A `bind` of
//! `unix://…` is refused at start: the gateway listens on TCP only. Certificate files
//! named by path (`serverCertificate`, `caCrl`, ...) are read again on every
//! configuration update and credentials-directory change, but are not watched
//! themselves. `SIMPLE` servers ask for no client certificate, so `caCrl`, pins and
//! `subjectAltNames` do not apply to them; `ISTIO_MUTUAL` servers keep the mesh's protocol versions and cipher suites. `ISTIO_MUTUAL` servers
//! (protocol `HTTPS`) present the gateway's own SVID and require a client SVID from the
//! mesh's trust bundle; the client's SPIFFE identity travels with its requests.
//! `PASSTHROUGH` servers (protocol `TLS` or `HTTPS`) are served: the ClientHello's SNI,
//! read without terminating the TLS, selects a VirtualService `tls` route bound to the
//! gateway (`sniHosts`, port), and the connection's bytes go to its destination as they
//! came, over Istio mTLS to endpoints with a sidecar; a passthrough server's hosts take
//! precedence over a terminating server of the same port. Istio can serve a Secret of another namespace after an authorization check
//! (`kubernetes://<ns>/<name>`, `kubernetes-gateway://`); without a source for that
//! authorization, such names are refused. Istio routes a host that a `*` server and a
//! more specific server both cover through either filter chain; here the most specific
//! server owns it and the `*` server's connections get 421 for it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::config::{MeshConfig, SecretRef, Server, ServerTlsMode, ServerTlsSettings};
use mesh_core::extensions::ConnectionSecurity;
use mesh_tls::ConnectionContext;
use rustls::ServerConfig;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use super::runtime::{Process, StartError};
use super::shutdown::ProxyHandle;
use crate::credentials::{CredentialError, CredentialFiles};
use crate::mesh::Active;
use crate::serve;
use crate::settings::Settings;
use crate::stack::gateway::{ChosenServer, covers, most_specific, on_server};
use crate::stack::inbound::per_connection;
use crate::watch::{self, WatchError};

/// The ingress gateway proxy.
#[derive(Debug)]
pub struct Gateway;

/// The HTTPS servers of a port: each server's host patterns (shared with every
/// connection's [`ChosenServer`]) and TLS config, in the Gateway's order.
#[derive(Default)]
struct TlsServers {
    hosts: Arc<Vec<Vec<String>>>,
    configs: Vec<Arc<ServerConfig>>,
}

impl TlsServers {
    fn push(&mut self, hosts: Vec<String>, config: Arc<ServerConfig>) {
        Arc::make_mut(&mut self.hosts).push(hosts);
        self.configs.push(config);
    }

    fn is_empty(&self) -> bool {
        self.configs.is_empty()
    }
}

/// The server of a port the SNI `sni` selects (the `*` server when there is none).
fn select(servers: &TlsServers, sni: Option<&str>) -> Option<usize> {
    match sni {
        Some(name) => most_specific(servers.hosts.iter().map(Vec::as_slice), name),
        None => servers
            .hosts
            .iter()
            .position(|hosts| hosts.iter().any(|h| h == "*")),
    }
}

/// A credential that cannot be read stops the start (or the reload).
fn cred(at: &str) -> impl Fn(CredentialError) -> StartError + '_ {
    move |e| StartError::Certificate(format!("{at}: {e}"))
}

/// Key material of one server: its certificates (one per key type at most two), the
/// client CA for `MUTUAL`, and revocation lists.
#[derive(Default)]
struct Material {
    keys: Vec<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    roots: Option<Vec<CertificateDer<'static>>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

/// Reads a Secret's certificate and key (and, with `ca`, its CA and revocation lists,
/// from the Secret or from `<name>-cacert`) into `material`.
fn secret_material(
    at: &str,
    dir: &Path,
    secret: &SecretRef,
    ca: bool,
    material: &mut Material,
) -> Result<(), StartError> {
    let base = CredentialFiles::open(dir, secret).map_err(cred(at))?;
    let err =
        |what: String| StartError::Certificate(format!("{at}: credential {}: {what}", secret.name));
    let required = |files: &[&str]| {
        base.find(files)
            .unwrap_or_else(|| base.join(files[0]))
            .map_err(cred(at))
    };
    let certs = mesh_tls::svid::read_certs(&required(&["tls.crt", "cert"])?)
        .map_err(|e| err(e.to_string()))?;
    let key = mesh_tls::svid::read_key(&required(&["tls.key", "key"])?)
        .map_err(|e| err(e.to_string()))?;
    material.keys.push((certs, key));
    if !ca {
        return Ok(());
    }
    // The CA (and its lists) come from the Secret, or from the Secret `<name>-cacert`.
    let separate = SecretRef {
        namespace: secret.namespace.clone(),
        name: format!("{}-cacert", secret.name),
    };
    let mut holders = vec![base.clone()];
    if let Ok(other) = CredentialFiles::open(dir, &separate) {
        holders.push(other);
    }
    for holder in holders {
        let Some(ca_file) = holder.find(&["ca.crt", "cacert"]) else {
            continue;
        };
        let ca_file = ca_file.map_err(cred(at))?;
        let roots = mesh_tls::svid::read_certs(&ca_file).map_err(|e| {
            StartError::Certificate(format!("{at}: credential {}: {e}", holder.name()))
        })?;
        material.roots = Some(roots);
        if let Some(crl) = holder.find(&["ca.crl", "crl"]) {
            let crl = crl.map_err(cred(at))?;
            let lists = mesh_tls::server_options::read_crls(&crl).map_err(|e| {
                StartError::Certificate(format!(
                    "{at}: credential {}: {}: {e}",
                    holder.name(),
                    crl.display()
                ))
            })?;
            material.crls.extend(lists);
        }
        return Ok(());
    }
    Err(err(format!(
        "MUTUAL needs a CA: ca.crt (or cacert) in the Secret or in the Secret {}",
        separate.name
    )))
}

/// Reads a certificate and key given by file paths into `material`.
fn file_material(
    at: &str,
    fields: (&str, &str),
    cert: Option<&String>,
    key: Option<&String>,
    material: &mut Material,
) -> Result<(), StartError> {
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(StartError::Certificate(format!(
            "{at}: tls.{} and tls.{} are both required without credentialName",
            fields.0, fields.1
        )));
    };
    let read_err = |field: &str, path: &str, e: mesh_tls::SvidError| {
        StartError::Certificate(format!("{at}: tls.{field} ({path}): {e}"))
    };
    let certs =
        mesh_tls::svid::read_certs(Path::new(cert)).map_err(|e| read_err(fields.0, cert, e))?;
    let key_der =
        mesh_tls::svid::read_key(Path::new(key)).map_err(|e| read_err(fields.1, key, e))?;
    material.keys.push((certs, key_der));
    Ok(())
}

/// Reads the certificates a server's `tls` names, from Secrets (`credentialName`,
/// `credentialNames`) or files (`tlsCertificates`, else `serverCertificate`,
/// `privateKey`, `caCertificates`), and the revocation lists of `caCrl`.
fn material(
    at: &str,
    tls: &ServerTlsSettings,
    namespace: &str,
    credentials: &Path,
    mutual: bool,
) -> Result<Material, StartError> {
    let mut m = Material::default();
    let names: Vec<&String> = tls
        .credential_name
        .iter()
        .chain(&tls.credential_names)
        .collect();
    if !names.is_empty() {
        for (i, name) in names.iter().enumerate() {
            let secret = SecretRef::parse(name, namespace)
                .map_err(|e| StartError::Other(format!("{at}: {e}")))?;
            // The first Secret carries the client CA.
            secret_material(at, credentials, &secret, mutual && i == 0, &mut m)?;
        }
    } else {
        let mut ca = tls.ca_certificates.as_ref().map(|p| ("caCertificates", p));
        if tls.tls_certificates.is_empty() {
            file_material(
                at,
                ("serverCertificate", "privateKey"),
                tls.server_certificate.as_ref(),
                tls.private_key.as_ref(),
                &mut m,
            )?;
        } else {
            for (i, c) in tls.tls_certificates.iter().enumerate() {
                let (cert, key) = (
                    format!("tlsCertificates[{i}].serverCertificate"),
                    format!("tlsCertificates[{i}].privateKey"),
                );
                file_material(
                    at,
                    (&cert, &key),
                    c.server_certificate.as_ref(),
                    c.private_key.as_ref(),
                    &mut m,
                )?;
            }
            if ca.is_none() {
                ca = tls
                    .tls_certificates
                    .iter()
                    .find_map(|c| c.ca_certificates.as_ref())
                    .map(|p| ("tlsCertificates[].caCertificates", p));
            }
        }
        if mutual {
            let Some((field, path)) = ca else {
                return Err(StartError::Certificate(format!(
                    "{at}: MUTUAL needs tls.caCertificates to verify clients"
                )));
            };
            m.roots = Some(mesh_tls::svid::read_certs(Path::new(path)).map_err(|e| {
                StartError::Certificate(format!("{at}: tls.{field} ({path}): {e}"))
            })?);
        }
    }
    if mutual && let Some(path) = tls.ca_crl.as_ref().filter(|p| !p.is_empty()) {
        let lists = mesh_tls::server_options::read_ca_crl(path)
            .map_err(|e| StartError::Certificate(format!("{at}: {e}")))?;
        m.crls.extend(lists);
    }
    Ok(m)
}

/// The rustls config of a `SIMPLE` or `MUTUAL` server: its certificates, the client
/// verification of `MUTUAL` (CA, revocation lists, pins, `subjectAltNames`), protocol
/// versions and cipher suites.
fn server_config(
    at: &str,
    tls: &ServerTlsSettings,
    namespace: &str,
    credentials: &Path,
    mutual: bool,
) -> Result<Arc<ServerConfig>, StartError> {
    use mesh_tls::server_options::{self, IgnoredReason};
    let err = |what: String| StartError::Certificate(format!("{at}: {what}"));
    let m = material(at, tls, namespace, credentials, mutual)?;
    let mut provider = (*mesh_tls::provider()).clone();
    if !tls.cipher_suites.is_empty() {
        let chosen = server_options::cipher_suites(&tls.cipher_suites, &provider);
        for (name, why) in &chosen.ignored {
            if *why != IgnoredReason::Tls13 {
                tracing::warn!("{at}: tls.cipherSuites `{name}`: {why}");
            }
        }
        if chosen.defaults {
            tracing::warn!(
                "{at}: tls.cipherSuites names no usable suite; the default TLS 1.2 suites apply"
            );
        } else if !chosen.has_tls12() {
            tracing::warn!(
                "{at}: tls.cipherSuites leaves no TLS 1.2 suite; only TLS 1.3 is served"
            );
        }
        provider.cipher_suites = chosen.suites;
    }
    let versions =
        server_options::protocol_versions(tls.min_protocol_version, tls.max_protocol_version)
            .map_err(|e| err(e.to_string()))?;
    if versions == [&rustls::version::TLS12]
        && !provider
            .cipher_suites
            .iter()
            .any(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)))
    {
        return Err(err(
            "tls.cipherSuites leaves no suite for maxProtocolVersion TLSV1_2".to_owned(),
        ));
    }
    let provider = Arc::new(provider);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| err(e.to_string()))?;
    let builder = match (&m.roots, mutual) {
        (Some(roots), true) => {
            let mut store = rustls::RootCertStore::empty();
            for ca in roots {
                store
                    .add(ca.clone())
                    .map_err(|e| err(format!("client CA: {e}")))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
                    .with_crls(m.crls.clone())
                    .build()
                    .map_err(|e| err(format!("client verification: {e}")))?;
            let pins = server_options::CertificatePins::parse(
                &tls.verify_certificate_spki,
                &tls.verify_certificate_hash,
            )
            .map_err(|e| err(e.to_string()))?;
            if pins.is_empty() && tls.subject_alt_names.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(server_options::ClientChecks::new(
                    verifier,
                    pins,
                    tls.subject_alt_names.clone(),
                )))
            }
        }
        _ => builder.with_no_client_auth(),
    };
    let keys = m
        .keys
        .into_iter()
        .map(|(certs, key)| {
            rustls::sign::CertifiedKey::from_der(certs, key, &provider)
                .map(Arc::new)
                .map_err(|e| err(format!("server certificate: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = builder.with_cert_resolver(Arc::new(server_options::ByKeyType::new(keys)));
    config.alpn_protocols = mesh_tls::ALPN.iter().map(|p| p.to_vec()).collect();
    // One session cache per server and per load: a session is only resumed on the server
    // (and under the client-certificate rule) that established it.
    config.session_storage = ServerSessionMemoryCache::new(256);
    Ok(Arc::new(config))
}

/// Where a gateway server's listener is: `gateway.ports` when it names the port, else
/// the server's `bind` address (an IP), else `0.0.0.0`.
fn listen_address(
    at: &str,
    server: &Server,
    port: u16,
    ports: &HashMap<u16, SocketAddr>,
) -> Result<SocketAddr, StartError> {
    if let Some(addr) = ports.get(&port) {
        return Ok(*addr);
    }
    match server
        .bind
        .as_deref()
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        None => Ok(SocketAddr::from(([0, 0, 0, 0], port))),
        Some(b) if b.starts_with("unix://") => Err(StartError::Other(format!(
            "{at}: bind `{b}`: Unix domain sockets are not supported; the gateway listens on TCP only"
        ))),
        Some(b) => b
            .parse::<IpAddr>()
            .map(|ip| SocketAddr::new(ip, port))
            .map_err(|_| StartError::Other(format!("{at}: bind `{b}` is not an IP address"))),
    }
}

/// What one port serves: HTTPS servers (selected by SNI) or plain HTTP with the hosts
/// that are redirected to HTTPS.
struct PortPlan {
    /// The Gateway's port number (routes match it; the listener may be elsewhere).
    port: u16,
    tls: TlsServers,
    redirect: Vec<String>,
    /// Host patterns of the `PASSTHROUGH` servers: TLS passed through by SNI.
    passthrough: Vec<String>,
}

/// The swappable state of one listening port.
#[derive(Clone)]
struct PortState {
    tls: Arc<ArcSwap<TlsServers>>,
    redirect: Arc<ArcSwap<Vec<String>>>,
    passthrough: Arc<ArcSwap<Vec<String>>>,
}

/// Builds the per-listener plan of a Gateway resource, loading its credentials: servers
/// are grouped by the address they listen on ([`listen_address`]).
fn plan(
    resource: &mesh_core::config::Gateway,
    credentials: &Path,
    mesh_tls: &mesh_tls::ServerTls,
    ports: &HashMap<u16, SocketAddr>,
) -> Result<BTreeMap<SocketAddr, PortPlan>, StartError> {
    let gw = format!(
        "Gateway {}/{}",
        resource.metadata.namespace, resource.metadata.name
    );
    // Per listen address: the Gateway port, and the servers with where they are.
    type Located<'a> = Vec<(String, &'a Server)>;
    let mut by_addr: BTreeMap<SocketAddr, (u16, Located<'_>)> = BTreeMap::new();
    for (i, server) in resource.spec.servers.iter().enumerate() {
        let at = match &server.name {
            Some(name) => format!("{gw} servers[{i}] ({name})"),
            None => format!("{gw} servers[{i}]"),
        };
        if let Some(port) = server
            .port
            .as_ref()
            .and_then(|p| u16::try_from(p.number).ok())
        {
            let addr = listen_address(&at, server, port, ports)?;
            let (first, servers) = by_addr.entry(addr).or_insert((port, Vec::new()));
            if *first != port {
                return Err(StartError::Other(format!(
                    "{at}: port {port} would listen on {addr}, which port {first} already uses"
                )));
            }
            servers.push((at, server));
        }
    }
    let mut plans = BTreeMap::new();
    for (addr, (port, servers)) in by_addr {
        let mut plan = PortPlan {
            port,
            tls: TlsServers::default(),
            redirect: Vec::new(),
            passthrough: Vec::new(),
        };
        for (at, s) in servers {
            let protocol = s
                .port
                .as_ref()
                .map(|p| p.protocol.to_ascii_uppercase())
                .unwrap_or_default();
            match &s.tls {
                Some(tls) if tls.https_redirect && protocol == "HTTP" => {
                    plan.redirect.extend(s.hosts.iter().cloned());
                }
                // An unset mode is PASSTHROUGH, the enum's zero value (GW-05).
                Some(tls)
                    if matches!(protocol.as_str(), "HTTPS" | "TLS")
                        && tls.mode.unwrap_or(ServerTlsMode::Passthrough)
                            == ServerTlsMode::Passthrough =>
                {
                    plan.passthrough.extend(s.hosts.iter().cloned());
                }
                Some(tls)
                    if protocol == "HTTPS" && tls.mode == Some(ServerTlsMode::IstioMutual) =>
                {
                    // The gateway's own SVID; clients present theirs, verified against
                    // the mesh's trust bundle (east-west traffic).
                    let mut config = (*mesh_tls.config(None)).clone();
                    config.alpn_protocols = mesh_tls::ALPN.iter().map(|p| p.to_vec()).collect();
                    plan.tls.push(s.hosts.clone(), Arc::new(config));
                }
                Some(tls) if protocol == "HTTPS" => {
                    let mutual = match tls.mode.unwrap_or(ServerTlsMode::Passthrough) {
                        ServerTlsMode::Simple => false,
                        ServerTlsMode::Mutual => true,
                        other => {
                            return Err(StartError::Other(format!(
                                "{at}: TLS mode {other:?} is not supported"
                            )));
                        }
                    };
                    plan.tls.push(
                        s.hosts.clone(),
                        server_config(&at, tls, &resource.metadata.namespace, credentials, mutual)?,
                    );
                }
                _ => {}
            }
        }
        plans.insert(addr, plan);
    }
    Ok(plans)
}

/// Re-plans the gateway's servers from a configuration and swaps them into the ports.
#[derive(Clone)]
struct Rebuild {
    namespace: String,
    name: String,
    credentials: std::path::PathBuf,
    mesh_tls: mesh_tls::ServerTls,
    /// `gateway.ports` of the settings.
    listen: Arc<HashMap<u16, SocketAddr>>,
    ports: Arc<BTreeMap<SocketAddr, PortState>>,
}

impl Rebuild {
    fn apply(&self, config: &MeshConfig) {
        let Some(resource) = config.gateway(&self.namespace, &self.name) else {
            tracing::error!(gateway = %self.name, "Gateway removed from the configuration; keeping its servers");
            return;
        };
        match plan(resource, &self.credentials, &self.mesh_tls, &self.listen) {
            Ok(plans) => {
                for (addr, plan) in plans {
                    match self.ports.get(&addr) {
                        Some(state) => {
                            state.tls.store(Arc::new(plan.tls));
                            state.redirect.store(Arc::new(plan.redirect));
                            state.passthrough.store(Arc::new(plan.passthrough));
                        }
                        None => {
                            tracing::warn!(%addr, "new Gateway listener address needs a restart to listen")
                        }
                    }
                }
                tracing::info!(gateway = %self.name, "gateway servers and credentials reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "gateway servers not reloaded; keeping the previous ones")
            }
        }
    }
}

/// Watches the credentials directory (recursively: one directory per credential,
/// Kubernetes symlink swaps included) and re-plans the servers on change.
fn watch_credentials(
    rebuild: Rebuild,
    active: Arc<ArcSwap<Active>>,
    stop: CancellationToken,
) -> Result<(tokio::task::JoinHandle<()>, notify::RecommendedWatcher), WatchError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = watch::watcher(
        std::slice::from_ref(&rebuild.credentials),
        notify::RecursiveMode::Recursive,
        tx,
    )?;
    let task = watch::on_change(rx, stop, move || rebuild.apply(&active.load().config));
    Ok((task, watcher))
}

impl Gateway {
    /// Starts the gateway described by `settings` (which must have a `gateway` section).
    pub async fn start(settings: Settings) -> Result<ProxyHandle, StartError> {
        let gw = settings
            .gateway
            .clone()
            .ok_or_else(|| StartError::Other("settings: a gateway section is required".into()))?;
        let namespace = gw
            .namespace
            .clone()
            .unwrap_or_else(|| settings.workload.namespace.clone());
        let settings = Arc::new(settings);
        let mut process =
            Process::new(settings.clone(), Some((namespace.clone(), gw.name.clone()))).await?;
        let mesh = process.mesh.clone();
        let resource = mesh
            .active()
            .load()
            .config
            .gateway(&namespace, &gw.name)
            .cloned()
            .ok_or_else(|| {
                StartError::Config(vec![format!(
                    "Gateway {namespace}/{} is not in configDir",
                    gw.name
                )])
            })?;
        let credentials = gw
            .credentials_dir
            .as_ref()
            .map(|d| settings.resolve(d))
            .unwrap_or_default();
        let mesh_tls = mesh_tls::ServerTls::new(mesh.certificates().clone());
        let plans = plan(&resource, &credentials, &mesh_tls, &gw.ports)?;
        let handshake_timeout = settings.limits.header_read_timeout.as_std();
        let mut ports: BTreeMap<SocketAddr, PortState> = BTreeMap::new();
        for (addr, plan) in plans {
            let port = plan.port;
            let state = PortState {
                tls: Arc::new(ArcSwap::from_pointee(plan.tls)),
                redirect: Arc::new(ArcSwap::from_pointee(plan.redirect)),
                passthrough: Arc::new(ArcSwap::from_pointee(plan.passthrough)),
            };
            ports.insert(addr, state.clone());
            let tcp = process.bind(&format!("gateway:{port}"), addr).await?;
            let svc = mesh.gateway(state.redirect.clone());
            let tls = state.tls.clone();
            let passthrough = state.passthrough.clone();
            let forward = mesh.tls_passthrough(port);
            process.serve(serve::run(
                tcp,
                mesh.serve_options("gateway"),
                move |tcp, remote| {
                    let svc = svc.clone();
                    let servers = tls.load_full();
                    let passthrough = passthrough.load_full();
                    let forward = forward.clone();
                    async move {
                        let local = tcp.local_addr().ok()?;
                        if !passthrough.is_empty() {
                            // PASSTHROUGH: the SNI, read without consuming the hello,
                            // picks a VirtualService `tls` route; the TLS stays the
                            // client's and the endpoint's.
                            let sni = tokio::time::timeout(
                                handshake_timeout,
                                mesh_tls::sni::peek_server_name(&tcp),
                            )
                            .await
                            .ok()?
                            .ok()?;
                            if let Some(sni) =
                                sni.filter(|n| passthrough.iter().any(|p| covers(p, n)))
                            {
                                tokio::spawn(async move { forward.proxy_tls(tcp, &sni).await });
                                return None;
                            }
                            if servers.is_empty() {
                                tracing::debug!(%remote, "no gateway server for this SNI");
                                return None;
                            }
                        }
                        if servers.is_empty() {
                            let ctx = ConnectionContext::plaintext(remote, local);
                            return Some((Box::new(tcp) as Box<dyn Io>, per_connection(svc, ctx)));
                        }
                        let accept = async {
                            let start =
                                LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
                                    .await
                                    .ok()?;
                            let sni = start.client_hello().server_name().map(str::to_owned);
                            let Some(index) = select(&servers, sni.as_deref()) else {
                                tracing::debug!(?sni, %remote, "no gateway server for this SNI");
                                return None;
                            };
                            let config = servers.configs[index].clone();
                            Some((start.into_stream(config).await.ok()?, index))
                        };
                        let (stream, index) = tokio::time::timeout(handshake_timeout, accept)
                            .await
                            .ok()??;
                        let chosen = ChosenServer {
                            hosts: servers.hosts.clone(),
                            index,
                        };
                        let mut ctx = ConnectionContext::plaintext(remote, local);
                        ctx.info.security = ConnectionSecurity::Unknown;
                        ctx.alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                        ctx.peer_cert_hash =
                            mesh_tls::PeerCertificateHash::of_connection(stream.get_ref().1);
                        // An ISTIO_MUTUAL server's client proved a SPIFFE identity (its
                        // chain was verified during the handshake).
                        if let Some(leaf) = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|der| {
                                mesh_tls::svid::check_leaf_with(
                                    der,
                                    mesh_tls::PeerRole::Client,
                                    |_| true,
                                    None,
                                )
                                .ok()
                            })
                        {
                            ctx.peer = Some(mesh_core::extensions::PeerIdentity(leaf.identity));
                            ctx.info.security = ConnectionSecurity::MutualTls;
                        }
                        Some((
                            Box::new(stream) as Box<dyn Io>,
                            per_connection(on_server(svc, chosen), ctx),
                        ))
                    }
                },
            ));
        }
        // Gateway servers and credentials follow the configuration and the credential
        // files; listeners (ports) are fixed at start.
        let rebuild = Rebuild {
            namespace: namespace.clone(),
            name: gw.name.clone(),
            credentials: credentials.clone(),
            mesh_tls,
            listen: Arc::new(gw.ports.clone()),
            ports: Arc::new(ports),
        };
        {
            let rebuild = rebuild.clone();
            mesh.on_update(move |config: &MeshConfig| rebuild.apply(config));
        }
        if credentials.is_dir() {
            let (task, watcher) = watch_credentials(rebuild, mesh.active(), mesh.shutdown_token())
                .map_err(|e| StartError::Other(format!("watching credentialsDir: {e}")))?;
            process.serve(async move {
                let _watcher = watcher;
                let _ = task.await;
            });
        }
        tracing::info!(gateway = %format!("{namespace}/{}", gw.name), "gateway started");
        process.finish().await
    }
}

/// A byte stream a listener serves (TCP or TLS).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(hosts: &[&[&str]]) -> TlsServers {
        let tmp = tempfile::tempdir().unwrap();
        write_secret(&tmp.path().join("c"), "x.example.com");
        let tls = ServerTlsSettings {
            credential_name: Some("c".to_owned()),
            ..Default::default()
        };
        let config = server_config("test", &tls, "edge", tmp.path(), false).unwrap();
        let mut servers = TlsServers::default();
        for h in hosts {
            servers.push(h.iter().map(|s| (*s).to_owned()).collect(), config.clone());
        }
        servers
    }

    #[test]
    fn the_sni_selects_the_most_specific_server_and_no_sni_the_catch_all() {
        let s = servers(&[&["*"], &["*.example.com"], &["mutual.example.com"]]);
        assert_eq!(select(&s, Some("mutual.example.com")), Some(2));
        assert_eq!(select(&s, Some("simple.example.com")), Some(1));
        assert_eq!(select(&s, None), Some(0));
        let s = servers(&[&["simple.example.com"]]);
        assert_eq!(select(&s, Some("other.example.com")), None);
        assert_eq!(select(&s, None), None);
    }

    fn write_secret(dir: &Path, host: &str) {
        let key = rcgen::generate_simple_self_signed(vec![host.to_owned()]).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("tls.crt"), key.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.crt"), key.cert.pem()).unwrap();
    }

    #[test]
    fn the_listen_address_is_the_settings_port_else_bind_else_any() {
        let mut server = Server {
            bind: Some("127.0.0.2".to_owned()),
            ..Default::default()
        };
        let mut ports = HashMap::new();
        let addr = |s: &Server, p: &HashMap<u16, SocketAddr>| listen_address("gw", s, 8443, p);
        assert_eq!(
            addr(&server, &ports).unwrap(),
            "127.0.0.2:8443".parse().unwrap()
        );
        server.bind = Some("::1".to_owned());
        assert_eq!(
            addr(&server, &ports).unwrap(),
            "[::1]:8443".parse().unwrap()
        );
        ports.insert(8443, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(
            addr(&server, &ports).unwrap(),
            "127.0.0.1:9443".parse().unwrap()
        );
        ports.clear();
        server.bind = None;
        assert_eq!(
            addr(&server, &ports).unwrap(),
            "0.0.0.0:8443".parse().unwrap()
        );
        for bad in ["unix:///var/run/gw.sock", "gateway.local"] {
            server.bind = Some(bad.to_owned());
            let e = addr(&server, &ports).unwrap_err().to_string();
            assert!(e.contains("gw: bind") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_ca_and_its_list_come_from_the_secret_or_its_cacert_secret() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = mesh_tls::CertificateAuthority::new("cluster.local").unwrap();
        let crl = ca
            .revocation_list_pem(&[], 1, std::time::Duration::from_secs(60))
            .unwrap();
        write_secret(&tmp.path().join("api"), "api.example.com");
        std::fs::remove_file(tmp.path().join("api/ca.crt")).unwrap();
        let tls = ServerTlsSettings {
            credential_name: Some("api".to_owned()),
            ..Default::default()
        };
        let e = material("gw", &tls, "edge", tmp.path(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("api-cacert"), "{e}");
        let cacert = tmp.path().join("api-cacert");
        std::fs::create_dir_all(&cacert).unwrap();
        std::fs::write(cacert.join("cacert"), ca.root_pem()).unwrap();
        std::fs::write(cacert.join("crl"), &crl).unwrap();
        let m = material("gw", &tls, "edge", tmp.path(), true).unwrap();
        assert_eq!(m.roots.as_deref(), Some(ca.roots_der()));
        assert_eq!(m.crls.len(), 1);
        // A `ca.crl` that holds no list names the file.
        std::fs::write(cacert.join("crl"), ca.root_pem()).unwrap();
        let e = material("gw", &tls, "edge", tmp.path(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("credential api-cacert") && e.contains("no X509 CRL"),
            "{e}"
        );
    }

    #[test]
    fn tls_certificates_give_two_keys_and_their_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let mut entries = Vec::new();
        for name in ["a", "b"] {
            write_secret(&tmp.path().join(name), "api.example.com");
            let file = |f: &str| Some(tmp.path().join(name).join(f).display().to_string());
            entries.push(mesh_core::config::TlsCertificate {
                server_certificate: file("tls.crt"),
                private_key: file("tls.key"),
                ca_certificates: file("ca.crt"),
            });
        }
        let mut tls = ServerTlsSettings {
            mode: Some(ServerTlsMode::Mutual),
            tls_certificates: entries,
            ..Default::default()
        };
        let m = material("gw", &tls, "edge", tmp.path(), true).unwrap();
        assert_eq!((m.keys.len(), m.roots.map(|r| r.len())), (2, Some(1)));
        assert!(server_config("gw", &tls, "edge", tmp.path(), true).is_ok());
        tls.tls_certificates[1].private_key = Some("/nonexistent/key.pem".to_owned());
        let e = material("gw", &tls, "edge", tmp.path(), true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("gw: tls.tlsCertificates[1].privateKey (/nonexistent/key.pem)"),
            "{e}"
        );
    }

    fn gateway(credential_name: &str) -> mesh_core::config::Gateway {
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: Gateway\n\
             metadata: {{name: gw, namespace: edge}}\n\
             spec:\n  servers:\n  - port: {{number: 443, name: https, protocol: HTTPS}}\n    \
             hosts: [api.example.com]\n    tls: {{mode: MUTUAL, credentialName: {credential_name:?}}}\n"
        );
        let report = mesh_core::config::load_str(
            "gw.yaml",
            &yaml,
            &mesh_core::config::LoadOptions::default(),
        );
        // Validation refuses most of these names; the proxy must refuse them on its own
        // too, so the resource is taken even when the load has errors.
        match report.resources.into_iter().next() {
            Some(mesh_core::config::AnyResource::Gateway(g)) => g,
            other => panic!("no Gateway: {other:?}"),
        }
    }

    #[test]
    fn no_form_of_credential_name_reaches_another_namespace() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        // The gateway's namespace `edge`, and another namespace's Secret beside it.
        let creds = tmp.path().join("edge");
        let other = tmp.path().join("other");
        write_secret(&creds.join("api-cert"), "api.example.com");
        write_secret(&other.join("x"), "other.example.com");
        // A Kubernetes Secret volume: files are symlinks through `..data`, inside.
        let kube = creds.join("kube-cert");
        write_secret(&kube.join("..2026_01_01"), "api.example.com");
        symlink("..2026_01_01", kube.join("..data")).unwrap();
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            symlink(Path::new("..data").join(f), kube.join(f)).unwrap();
        }
        // A Secret directory that is a symlink out, and one whose key file is.
        symlink(other.join("x"), creds.join("leak")).unwrap();
        let half = creds.join("half");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::copy(creds.join("api-cert/tls.crt"), half.join("tls.crt")).unwrap();
        std::fs::copy(creds.join("api-cert/ca.crt"), half.join("ca.crt")).unwrap();
        symlink("../../other/x/tls.key", half.join("tls.key")).unwrap();
        // `other` seen from the credentials directory's parent, and a directory literally
        // named like an escape attempt.
        symlink(&other, tmp.path().join("edge-other")).unwrap();

        let ca = mesh_tls::CertificateAuthority::new("cluster.local").unwrap();
        let mesh_tls = mesh_tls::ServerTls::new(
            mesh_tls::CertStore::from_issued(&ca.issue("edge", "gateway").unwrap()).unwrap(),
        );
        for name in [
            "api-cert",
            "kubernetes://api-cert",
            "edge/api-cert",
            "kubernetes://edge/api-cert",
            "kubernetes-gateway://edge/api-cert",
            "kube-cert",
        ] {
            assert!(
                plan(&gateway(name), &creds, &mesh_tls, &HashMap::new()).is_ok(),
                "{name} did not load"
            );
        }
        for name in [
            "../other/x",
            "..",
            ".",
            "",
            "/abs",
            &other.join("x").display().to_string(),
            "a/b/c",
            "other/x",
            "kubernetes://other/x",
            "kubernetes-gateway://other/x",
            "kubernetes://../other/x",
            "edge/../other/x",
            "%2e%2e%2fother%2fx",
            "..%2fother%2fx",
            "%2e%2e",
            "API-CERT",
            "Api-Cert",
            "../edge-other/x",
            "leak",
            "half",
            "builtin://",
        ] {
            let err = match plan(&gateway(name), &creds, &mesh_tls, &HashMap::new()) {
                Ok(_) => panic!("{name:?} loaded a credential"),
                Err(e) => e.to_string(),
            };
            assert!(!err.contains("other.example.com"), "{err}");
        }
    }
}
