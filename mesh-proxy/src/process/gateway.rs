//! The ingress gateway process: Gateway servers (HTTP, HTTPS `SIMPLE` and `MUTUAL`) in
//! front of the VirtualServices bound to the gateway, routed to mesh services over mTLS.
//! This module holds the listeners, the TLS servers and their credentials; what a
//! request goes through once accepted is [`crate::stack::gateway`].
//!
//! # Behaviour
//!
//! - The Gateway resource is `gateway.namespace/gateway.name` of the settings. Its
//!   servers are grouped by port; each port gets one listener (address from
//!   `gateway.ports`, else `0.0.0.0:<port>`).
//! - HTTPS: the TLS ClientHello's SNI selects the server whose `hosts` cover it most
//!   specifically (an exact name, then the longest `*.example.com` wildcard covering one
//!   or more labels, then `*`; a `namespace/` prefix is ignored; ties go to the first
//!   server). An SNI no server covers, or no SNI without a `*` server, fails the
//!   handshake. Credentials come from `gateway.credentialsDir/<name>/` (`tls.crt`,
//!   `tls.key`, and `ca.crt` for `MUTUAL`, which then requires a client certificate
//!   chaining to it).
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
//! `AUTO_PASSTHROUGH` and `OPTIONAL_MUTUAL` are refused at start. `ISTIO_MUTUAL` servers
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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_core::config::{MeshConfig, SecretRef, Server, ServerTlsMode};
use mesh_core::extensions::ConnectionSecurity;
use mesh_tls::ConnectionContext;
use rustls::ServerConfig;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
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
fn cred(e: CredentialError) -> StartError {
    StartError::Certificate(e.to_string())
}

fn credential_config(
    dir: &Path,
    secret: &SecretRef,
    mutual: bool,
) -> Result<Arc<ServerConfig>, StartError> {
    let name = &secret.name;
    let err = |what: String| StartError::Certificate(format!("credential {name}: {what}"));
    let base = CredentialFiles::open(dir, secret).map_err(cred)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(base.join("tls.crt").map_err(cred)?)
            .map_err(|e| err(format!("tls.crt: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("tls.crt: {e}")))?;
    let key = PrivateKeyDer::from_pem_file(base.join("tls.key").map_err(cred)?)
        .map_err(|e| err(format!("tls.key: {e}")))?;
    let provider = mesh_tls::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .map_err(|e| err(e.to_string()))?;
    let builder = if mutual {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(base.join("ca.crt").map_err(cred)?)
            .map_err(|e| err(format!("ca.crt: {e}")))?
        {
            roots
                .add(ca.map_err(|e| err(format!("ca.crt: {e}")))?)
                .map_err(|e| err(format!("ca.crt: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| err(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| err(e.to_string()))?;
    config.alpn_protocols = mesh_tls::ALPN.iter().map(|p| p.to_vec()).collect();
    // One session cache per server and per load: a session is only resumed on the server
    // (and under the client-certificate rule) that established it.
    config.session_storage = ServerSessionMemoryCache::new(256);
    Ok(Arc::new(config))
}

/// What one port serves: HTTPS servers (selected by SNI) or plain HTTP with the hosts
/// that are redirected to HTTPS.
struct PortPlan {
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

/// Builds the per-port plan of a Gateway resource, loading its credentials.
fn plan(
    resource: &mesh_core::config::Gateway,
    credentials: &Path,
    mesh_tls: &mesh_tls::ServerTls,
) -> Result<BTreeMap<u16, PortPlan>, StartError> {
    let gw = format!(
        "Gateway {}/{}",
        resource.metadata.namespace, resource.metadata.name
    );
    let mut by_port: BTreeMap<u16, Vec<&Server>> = BTreeMap::new();
    for server in &resource.spec.servers {
        if let Some(port) = server
            .port
            .as_ref()
            .and_then(|p| u16::try_from(p.number).ok())
        {
            by_port.entry(port).or_default().push(server);
        }
    }
    let mut plans = BTreeMap::new();
    for (port, servers) in by_port {
        let mut plan = PortPlan {
            tls: TlsServers::default(),
            redirect: Vec::new(),
            passthrough: Vec::new(),
        };
        for s in servers {
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
                                "{gw}: TLS mode {other:?} is not supported"
                            )));
                        }
                    };
                    let name = tls.credential_name.clone().ok_or_else(|| {
                        StartError::Other(format!(
                            "{gw}: HTTPS server on port {port} needs credentialName"
                        ))
                    })?;
                    let secret = SecretRef::parse(&name, &resource.metadata.namespace)
                        .map_err(|e| StartError::Other(format!("{gw}: {e}")))?;
                    plan.tls.push(
                        s.hosts.clone(),
                        credential_config(credentials, &secret, mutual)?,
                    );
                }
                _ => {}
            }
        }
        plans.insert(port, plan);
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
    ports: Arc<BTreeMap<u16, PortState>>,
}

impl Rebuild {
    fn apply(&self, config: &MeshConfig) {
        let Some(resource) = config.gateway(&self.namespace, &self.name) else {
            tracing::error!(gateway = %self.name, "Gateway removed from the configuration; keeping its servers");
            return;
        };
        match plan(resource, &self.credentials, &self.mesh_tls) {
            Ok(plans) => {
                for (port, plan) in plans {
                    match self.ports.get(&port) {
                        Some(state) => {
                            state.tls.store(Arc::new(plan.tls));
                            state.redirect.store(Arc::new(plan.redirect));
                            state.passthrough.store(Arc::new(plan.passthrough));
                        }
                        None => tracing::warn!(port, "new Gateway port needs a restart to listen"),
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
        let plans = plan(&resource, &credentials, &mesh_tls)?;
        let handshake_timeout = settings.limits.header_read_timeout.as_std();
        let mut ports: BTreeMap<u16, PortState> = BTreeMap::new();
        for (port, plan) in plans {
            let state = PortState {
                tls: Arc::new(ArcSwap::from_pointee(plan.tls)),
                redirect: Arc::new(ArcSwap::from_pointee(plan.redirect)),
                passthrough: Arc::new(ArcSwap::from_pointee(plan.passthrough)),
            };
            ports.insert(port, state.clone());
            let addr = gw
                .ports
                .get(&port)
                .copied()
                .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], port)));
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
        let secret = SecretRef::parse("c", "edge").unwrap();
        let config = credential_config(tmp.path(), &secret, false).unwrap();
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
                plan(&gateway(name), &creds, &mesh_tls).is_ok(),
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
            let err = match plan(&gateway(name), &creds, &mesh_tls) {
                Ok(_) => panic!("{name:?} loaded a credential"),
                Err(e) => e.to_string(),
            };
            assert!(!err.contains("other.example.com"), "{err}");
        }
    }
}
