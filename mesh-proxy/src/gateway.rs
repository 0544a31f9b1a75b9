//! The ingress gateway: Gateway servers (HTTP, HTTPS `SIMPLE` and `MUTUAL`) in front of
//! the VirtualServices bound to the gateway, routed to mesh services over mTLS.
//!
//! # Behaviour
//!
//! - The Gateway resource is `gateway.namespace/gateway.name` of the settings. Its
//!   servers are grouped by port; each port gets one listener (address from
//!   `gateway.ports`, else `0.0.0.0:<port>`).
//! - HTTPS: the TLS ClientHello's SNI selects the server whose `hosts` cover it
//!   (`*`, `*.example.com` covering one or more labels, exact names; a `namespace/`
//!   prefix is ignored). An SNI no server covers, or no SNI without a `*` server, fails
//!   the handshake. Credentials come from `gateway.credentialsDir/<credentialName>/`
//!   (`tls.crt`, `tls.key`, and `ca.crt` for `MUTUAL`, which then requires a client
//!   certificate chaining to it).
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
//! at start. The credential lookup is not scoped by namespace: the directory is the
//! scope (one directory per gateway).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use mesh_core::body::BoxBody;
use mesh_core::config::{MeshConfig, Server, ServerTlsMode};
use mesh_core::error::BoxError;
use mesh_core::extensions::ConnectionSecurity;
use mesh_routing::Router;
use mesh_telemetry::TelemetryLayer;
use mesh_tls::ConnectionContext;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
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

fn select<'a>(servers: &'a [TlsServer], sni: Option<&str>) -> Option<&'a TlsServer> {
    match sni {
        Some(name) => servers
            .iter()
            .find(|s| s.hosts.iter().any(|h| covers(h, name))),
        None => servers.iter().find(|s| s.hosts.iter().any(|h| h == "*")),
    }
}

fn credential_config(
    dir: &Path,
    name: &str,
    mutual: bool,
) -> Result<Arc<ServerConfig>, StartError> {
    let err = |what: String| StartError::Certificate(format!("credential {name}: {what}"));
    let base = dir.join(name);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(base.join("tls.crt"))
        .map_err(|e| err(format!("tls.crt: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("tls.crt: {e}")))?;
    let key = PrivateKeyDer::from_pem_file(base.join("tls.key"))
        .map_err(|e| err(format!("tls.key: {e}")))?;
    let provider = mesh_tls::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .map_err(|e| err(e.to_string()))?;
    let builder = if mutual {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(base.join("ca.crt"))
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
                    plan.tls.push(TlsServer {
                        hosts: s.hosts.clone(),
                        config: credential_config(credentials, &name, mutual)?,
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
                    .layer(TelemetryLayer::outbound_by_authority(mesh.telemetry(), 1024))
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
                            let Some(server) = select(&servers, sni.as_deref()) else {
                                tracing::debug!(?sni, %remote, "no gateway server for this SNI");
                                return None;
                            };
                            start.into_stream(server.config.clone()).await.ok()
                        };
                        let stream = tokio::time::timeout(handshake_timeout, accept)
                            .await
                            .ok()??;
                        let mut ctx = ConnectionContext::plaintext(remote, local);
                        ctx.info.security = ConnectionSecurity::Unknown;
                        ctx.alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                        Some((Box::new(stream) as Box<dyn Io>, per_connection(svc, ctx)))
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
            let (task, watcher) =
                watch_credentials(rebuild, mesh.active(), mesh.shutdown_token())
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
}
