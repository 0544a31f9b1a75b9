//! The ingress gateway: Gateway servers (HTTP, HTTPS `SIMPLE` and `MUTUAL`) in front of
//! the VirtualServices bound to the gateway, routed to mesh services over mTLS.
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
//! `PASSTHROUGH`, `AUTO_PASSTHROUGH`, `ISTIO_MUTUAL` and `OPTIONAL_MUTUAL` are refused
//! at start. Istio can serve a Secret of another namespace after an authorization check
//! (`kubernetes://<ns>/<name>`, `kubernetes-gateway://`); without a source for that
//! authorization, such names are refused. Istio routes a host that a `*` server and a
//! more specific server both cover through either filter chain; here the most specific
//! server owns it and the `*` server's connections get 421 for it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use mesh_core::body::BoxBody;
use mesh_core::config::{MeshConfig, SecretRef, Server, ServerTlsMode};
use mesh_core::error::{BoxError, NoRoute};
use mesh_core::extensions::ConnectionSecurity;
use mesh_routing::Router;
use mesh_telemetry::TelemetryLayer;
use mesh_tls::ConnectionContext;
use rustls::ServerConfig;
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder};

use crate::mesh::Active;
use crate::respond::{self, Respond};
use crate::runtime::{Process, StartError};
use crate::serve;
use crate::settings::Settings;
use crate::shutdown::ProxyHandle;
use crate::stack::headers::Sanitize;
use crate::stack::inbound::per_connection;
use crate::stack::outbound::{prepare, request_host};
use crate::stack::{HttpService, RouteService, boxed_request};

/// The ingress gateway proxy.
#[derive(Debug)]
pub struct Gateway;

/// Whether the Gateway host `pattern` (`ns/host` allowed) covers `host`.
fn covers(pattern: &str, host: &str) -> bool {
    let pattern = pattern.rsplit_once('/').map_or(pattern, |(_, h)| h);
    let pattern = pattern.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    pattern == "*"
        || pattern == host
        || pattern.strip_prefix('*').is_some_and(|suffix| {
            suffix.starts_with('.') && host.len() > suffix.len() && host.ends_with(suffix)
        })
}

/// One HTTPS server of a port.
struct TlsServer {
    hosts: Vec<String>,
    config: Arc<ServerConfig>,
}

fn select(servers: &[TlsServer], sni: Option<&str>) -> Option<usize> {
    match sni {
        Some(name) => most_specific(servers, name),
        None => servers
            .iter()
            .position(|s| s.hosts.iter().any(|h| h == "*")),
    }
}

/// How specifically the Gateway host `pattern` covers `host`, `None` when it does not:
/// an exact name beats any wildcard, a longer wildcard suffix beats a shorter one, and
/// `*` comes last (the order Envoy matches filter-chain `server_names` in).
fn specificity(pattern: &str, host: &str) -> Option<usize> {
    if !covers(pattern, host) {
        return None;
    }
    let bare = pattern.rsplit_once('/').map_or(pattern, |(_, h)| h);
    Some(match bare.strip_prefix('*') {
        Some("") => 0,
        Some(suffix) => suffix.len(),
        None => usize::MAX,
    })
}

/// The server of a port that serves `host`: the one whose hosts cover it most
/// specifically; on a tie, the first in the Gateway's order.
fn most_specific(servers: &[TlsServer], host: &str) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (index, server) in servers.iter().enumerate() {
        let rank = server
            .hosts
            .iter()
            .filter_map(|h| specificity(h, host))
            .max();
        if let Some(rank) = rank
            && best.is_none_or(|(r, _)| rank > r)
        {
            best = Some((rank, index));
        }
    }
    best.map(|(_, index)| index)
}

/// The HTTPS server the connection's SNI selected, put in the extensions of every
/// request on that connection so that routing never leaves it.
#[derive(Clone)]
struct ChosenServer {
    /// The port's servers as they were when the connection was accepted.
    servers: Arc<Vec<TlsServer>>,
    /// The selected one.
    index: usize,
}

/// The error for a request whose host the connection's server does not serve: 421 when
/// another server of the port serves it (the client should open a connection with that
/// SNI), 404 `NR` when none does.
fn off_server(chosen: &ChosenServer, host: &str) -> Option<BoxError> {
    match most_specific(&chosen.servers, host) {
        Some(index) if index == chosen.index => None,
        Some(_) => Some(Box::new(respond::Misdirected)),
        None => Some(Box::new(NoRoute)),
    }
}

/// `svc` for the requests of one TLS connection whose SNI selected `chosen`.
fn on_server(svc: HttpService, chosen: ChosenServer) -> HttpService {
    tower::util::BoxCloneSyncService::new(tower::ServiceExt::map_request(
        svc,
        move |mut req: Request<BoxBody>| {
            req.extensions_mut().insert(chosen.clone());
            req
        },
    ))
}

/// The files of one Secret in the credentials directory: `<credentialsDir>/<name>/`.
///
/// The directory holds the Secrets of the Gateway's own namespace (the layout is
/// unchanged from one directory per `credentialName`). The path is built only from a
/// validated [`SecretRef`] name, which is one path component and never `.` or `..`; each
/// file is then resolved through its symlinks (Kubernetes' `..data` swaps) and refused
/// when it ends up outside the credentials directory.
struct CredentialFiles {
    /// The credentials directory, canonical.
    root: std::path::PathBuf,
    /// `<root>/<name>`.
    dir: std::path::PathBuf,
    name: String,
}

impl CredentialFiles {
    fn open(credentials: &Path, secret: &SecretRef) -> Result<Self, StartError> {
        let err =
            |what: String| StartError::Certificate(format!("credential {}: {what}", secret.name));
        let mut parts = Path::new(&secret.name).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(std::path::Component::Normal(_)), None)
        ) {
            return Err(err("not a Secret name".to_owned()));
        }
        let root = credentials
            .canonicalize()
            .map_err(|e| err(format!("credentials directory: {e}")))?;
        Ok(Self {
            dir: root.join(&secret.name),
            root,
            name: secret.name.clone(),
        })
    }

    /// The canonical path of `file` of the Secret.
    fn join(&self, file: &str) -> Result<std::path::PathBuf, StartError> {
        let err =
            |what: String| StartError::Certificate(format!("credential {}: {what}", self.name));
        let real = self
            .dir
            .join(file)
            .canonicalize()
            .map_err(|e| err(format!("{file}: {e}")))?;
        if !real.starts_with(&self.root) {
            return Err(err(format!(
                "{file} resolves outside the credentials directory"
            )));
        }
        Ok(real)
    }
}

fn credential_config(
    dir: &Path,
    secret: &SecretRef,
    mutual: bool,
) -> Result<Arc<ServerConfig>, StartError> {
    let name = &secret.name;
    let err = |what: String| StartError::Certificate(format!("credential {name}: {what}"));
    let base = CredentialFiles::open(dir, secret)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(base.join("tls.crt")?)
        .map_err(|e| err(format!("tls.crt: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("tls.crt: {e}")))?;
    let key = PrivateKeyDer::from_pem_file(base.join("tls.key")?)
        .map_err(|e| err(format!("tls.key: {e}")))?;
    let provider = mesh_tls::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .map_err(|e| err(e.to_string()))?;
    let builder = if mutual {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(base.join("ca.crt")?)
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

/// Routes gateway requests: https redirect, then the gateway's route table.
#[derive(Clone)]
struct GatewayRoutes {
    router: Router<RouteService>,
    redirect_hosts: Arc<ArcSwap<Vec<String>>>,
}

impl Service<Request<BoxBody>> for GatewayRoutes {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        if let Err(e) = prepare(&mut req) {
            return Box::pin(async move { Err(Box::new(e) as BoxError) });
        }
        let host = request_host(&req).unwrap_or_default().into_owned();
        if let Some(e) = req
            .extensions()
            .get::<ChosenServer>()
            .and_then(|chosen| off_server(chosen, &host))
        {
            return Box::pin(async move { Err(e) });
        }
        if self.redirect_hosts.load().iter().any(|p| covers(p, &host)) {
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            return Box::pin(async move { Ok(respond::https_redirect(&host, &pq)) });
        }
        Box::pin(self.router.call(req))
    }
}

/// What one port serves: HTTPS servers (selected by SNI) or plain HTTP with the hosts
/// that are redirected to HTTPS.
struct PortPlan {
    tls: Vec<TlsServer>,
    redirect: Vec<String>,
}

/// The swappable state of one listening port.
#[derive(Clone)]
struct PortState {
    tls: Arc<ArcSwap<Vec<TlsServer>>>,
    redirect: Arc<ArcSwap<Vec<String>>>,
}

/// Builds the per-port plan of a Gateway resource, loading its credentials.
fn plan(
    resource: &mesh_core::config::Gateway,
    credentials: &Path,
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
            tls: Vec::new(),
            redirect: Vec::new(),
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
                Some(tls) if protocol == "HTTPS" => {
                    let mutual = match tls.mode {
                        Some(ServerTlsMode::Simple) | None => false,
                        Some(ServerTlsMode::Mutual) => true,
                        Some(other) => {
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
                    plan.tls.push(TlsServer {
                        hosts: s.hosts.clone(),
                        config: credential_config(credentials, &secret, mutual)?,
                    });
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
    ports: Arc<BTreeMap<u16, PortState>>,
}

impl Rebuild {
    fn apply(&self, config: &MeshConfig) {
        let Some(resource) = config.gateway(&self.namespace, &self.name) else {
            tracing::error!(gateway = %self.name, "Gateway removed from the configuration; keeping its servers");
            return;
        };
        match plan(resource, &self.credentials) {
            Ok(plans) => {
                for (port, plan) in plans {
                    match self.ports.get(&port) {
                        Some(state) => {
                            state.tls.store(Arc::new(plan.tls));
                            state.redirect.store(Arc::new(plan.redirect));
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
) -> Result<(tokio::task::JoinHandle<()>, Box<dyn std::any::Any + Send>), notify::Error> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && !matches!(event.kind, EventKind::Access(_))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&rebuild.credentials, RecursiveMode::Recursive)?;
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = rx.recv() => {
                    if event.is_none() {
                        return;
                    }
                    while let Ok(Some(())) =
                        tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {}
                    let config = active.load().config.clone();
                    let rebuild = rebuild.clone();
                    let _ = tokio::task::spawn_blocking(move || rebuild.apply(&config)).await;
                }
            }
        }
    });
    Ok((task, Box::new(watcher)))
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
        let plans = plan(&resource, &credentials)?;
        let handshake_timeout = settings.limits.header_read_timeout.as_std();
        let mut ports: BTreeMap<u16, PortState> = BTreeMap::new();
        for (port, plan) in plans {
            let state = PortState {
                tls: Arc::new(ArcSwap::from_pointee(plan.tls)),
                redirect: Arc::new(ArcSwap::from_pointee(plan.redirect)),
            };
            ports.insert(port, state.clone());
            let addr = gw
                .ports
                .get(&port)
                .copied()
                .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], port)));
            let tcp = process.bind(&format!("gateway:{port}"), addr).await?;
            let routes = GatewayRoutes {
                router: mesh.router().router(),
                redirect_hosts: state.redirect.clone(),
            };
            let svc: HttpService = tower::util::BoxCloneSyncService::new(Sanitize::new(
                ServiceBuilder::new()
                    .map_response(|res: Response<_>| res.map(mesh_core::body::boxed))
                    .layer(TelemetryLayer::outbound_by_authority(
                        mesh.telemetry(),
                        1024,
                    ))
                    .map_request(boxed_request)
                    .service(Respond::new(routes)),
                true,
            ));
            let tls = state.tls.clone();
            process.serve(serve::run(
                tcp,
                mesh.serve_options(
                    mesh.telemetry()
                        .metrics()
                        .proxy()
                        .active_connections("gateway"),
                ),
                move |tcp, remote| {
                    let svc = svc.clone();
                    let servers = tls.load_full();
                    async move {
                        let local = tcp.local_addr().ok()?;
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
                            let config = servers[index].config.clone();
                            Some((start.into_stream(config).await.ok()?, index))
                        };
                        let (stream, index) = tokio::time::timeout(handshake_timeout, accept)
                            .await
                            .ok()??;
                        let chosen = ChosenServer {
                            servers: servers.clone(),
                            index,
                        };
                        let mut ctx = ConnectionContext::plaintext(remote, local);
                        ctx.info.security = ConnectionSecurity::Unknown;
                        ctx.alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
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

    #[test]
    fn host_patterns_cover_like_istio() {
        assert!(covers("api.example.com", "API.example.com"));
        assert!(covers("*.example.com", "a.b.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(covers("*", "anything"));
        assert!(covers("prod/api.example.com", "api.example.com"));
        assert!(!covers("api.example.com", "evil.com"));
    }

    fn servers(hosts: &[&[&str]]) -> Vec<TlsServer> {
        let tmp = tempfile::tempdir().unwrap();
        write_secret(&tmp.path().join("c"), "x.example.com");
        let secret = SecretRef::parse("c", "edge").unwrap();
        let config = credential_config(tmp.path(), &secret, false).unwrap();
        hosts
            .iter()
            .map(|h| TlsServer {
                hosts: h.iter().map(|s| (*s).to_owned()).collect(),
                config: config.clone(),
            })
            .collect()
    }

    #[test]
    fn the_most_specific_server_owns_a_host() {
        let s = servers(&[&["*"], &["*.example.com"], &["mutual.example.com"]]);
        assert_eq!(most_specific(&s, "mutual.example.com"), Some(2));
        assert_eq!(most_specific(&s, "MUTUAL.example.com"), Some(2));
        assert_eq!(most_specific(&s, "simple.example.com"), Some(1));
        assert_eq!(most_specific(&s, "example.org"), Some(0));
        assert_eq!(select(&s, None), Some(0));
        let chosen = ChosenServer {
            servers: Arc::new(s),
            index: 0,
        };
        // A `*` server's connection does not carry a host another server owns.
        assert!(off_server(&chosen, "mutual.example.com").is_some());
        assert!(off_server(&chosen, "example.org").is_none());
        let s = servers(&[&["simple.example.com"], &["mutual.example.com"]]);
        let chosen = ChosenServer {
            servers: Arc::new(s),
            index: 0,
        };
        let e = off_server(&chosen, "mutual.example.com").unwrap();
        assert!(mesh_core::error::is_caused_by::<respond::Misdirected>(
            e.as_ref()
        ));
        let e = off_server(&chosen, "other.example.com").unwrap();
        assert!(mesh_core::error::is_caused_by::<NoRoute>(e.as_ref()));
        assert!(off_server(&chosen, "simple.example.com").is_none());
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

        for name in [
            "api-cert",
            "kubernetes://api-cert",
            "edge/api-cert",
            "kubernetes://edge/api-cert",
            "kubernetes-gateway://edge/api-cert",
            "kube-cert",
        ] {
            assert!(plan(&gateway(name), &creds).is_ok(), "{name} did not load");
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
            let err = match plan(&gateway(name), &creds) {
                Ok(_) => panic!("{name:?} loaded a credential"),
                Err(e) => e.to_string(),
            };
            assert!(!err.contains("other.example.com"), "{err}");
        }
    }
}
