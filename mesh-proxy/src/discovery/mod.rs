//! `discovery`: the control plane.
//!
//! One stateless Deployment (two replicas or more; no leader is needed to serve) that
//! watches Istio's resources, Services, EndpointSlices, Pods and Namespaces
//! ([`kube`], [`registry`]), validates each object with the loader's diagnostics, pushes
//! each sidecar only what its workload needs over the xDS transport ([`xds`]), signs
//! workload certificates for callers authenticated by TokenReview ([`ca`]) and validates
//! Istio resources at `kubectl apply` ([`webhook`]). Without a cluster it serves a
//! directory of Istio YAML instead, watched like the sidecar's ([`Source::Files`]).
//!
//! # Ports (Istio's)
//!
//! | port | what |
//! |---|---|
//! | 15012 | gRPC over TLS: xDS (clients present their workload certificate) and the certificate service |
//! | 15014 | monitoring: `GET /metrics`, `GET /ready` (200 once the first catalog is built) |
//!
//! # Identity
//!
//! `discovery` holds the CA. It issues its own certificate from it for
//! `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>` and renews it at
//! half-life; sidecars accept only that identity (their `discovery.identity`).

pub mod ca;
pub mod kube;
pub mod registry;
pub mod root_cert;
pub mod webhook;
pub mod xds;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::{AnyResource, LoadOptions, MeshConfig};
use mesh_tls::{BuiltInIssuer, CertStore, CertificateAuthority, ServerTls};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::xds::{AdsServer, Catalog};

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Files or directories of Istio YAML, reloaded when they change. A reload that
    /// does not validate changes nothing.
    Files(Vec<PathBuf>),
}

/// What `discovery` needs to start.
#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    /// Its own namespace (Istio's `istio-system`).
    pub namespace: String,
    /// Its own service account.
    pub service_account: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Selector-less policies here apply mesh-wide.
    pub root_namespace: String,
    /// The CA: a directory from `mesh-proxy ca init`.
    pub ca_dir: PathBuf,
    /// The configuration source.
    pub source: Source,
    /// gRPC (xDS and certificates), over TLS.
    pub grpc: SocketAddr,
    /// Monitoring (`/metrics`, `/ready`).
    pub monitoring: SocketAddr,
}

/// Why `discovery` could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The CA could not be loaded or its certificate issued.
    #[error("certificate authority: {0}")]
    Ca(String),
    /// The configuration did not load.
    #[error("configuration rejected:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration directory could not be watched.
    #[error("watching the configuration: {0}")]
    Watch(String),
}

/// A running `discovery`.
pub struct Discovery {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    addresses: Vec<(&'static str, SocketAddr)>,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Loads the CA and the configuration, binds the listeners and starts serving.
    pub async fn start(options: DiscoveryOptions) -> Result<Discovery, DiscoveryError> {
        let ca = CertificateAuthority::load_dir(&options.ca_dir)
            .map_err(|e| DiscoveryError::Ca(format!("{}: {e}", options.ca_dir.display())))?;
        let ca = Arc::new(ca);
        let issuer = BuiltInIssuer::new(ca.clone(), &options.namespace, &options.service_account);
        let store =
            CertStore::from_issuer(&issuer).map_err(|e| DiscoveryError::Ca(e.to_string()))?;
        let mut keep: Vec<Box<dyn std::any::Any + Send>> =
            vec![Box::new(store.spawn_issuer(issuer))];

        let shutdown = CancellationToken::new();
        let (catalog_tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let load = LoadOptions {
            default_namespace: options.namespace.clone(),
            root_namespace: options.root_namespace.clone(),
        };
        match &options.source {
            Source::Files(paths) => {
                keep.push(files(paths.clone(), load, catalog_tx, shutdown.clone())?);
            }
        }

        let mut registry = Registry::default();
        let ads = AdsServer::new(catalog.clone(), options.root_namespace.clone());
        ads.metrics().register(&mut registry);
        let registry = Arc::new(registry);

        let grpc = bind(options.grpc).await?;
        let monitoring = bind(options.monitoring).await?;
        let addresses = vec![
            ("grpc", local(&grpc, options.grpc)),
            ("monitoring", local(&monitoring, options.monitoring)),
        ];
        let mut tasks = JoinSet::new();
        let mut routes = tonic::service::Routes::builder();
        routes.add_service(ads.into_service());
        let stop = shutdown.clone();
        let server_tls = ServerTls::new(store);
        tasks.spawn(async move {
            if let Err(e) = xds::serve(grpc, server_tls, routes.routes(), stop).await {
                tracing::error!(error = %e, "the gRPC server failed");
            }
        });
        tasks.spawn(serve_monitoring(
            monitoring,
            registry,
            catalog,
            shutdown.clone(),
        ));
        tracing::info!(addresses = ?addresses, "discovery started");
        Ok(Discovery {
            shutdown,
            tasks,
            addresses,
            _keep: keep,
        })
    }

    /// The bound address of `name` (`grpc`, `monitoring`).
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.addresses
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
    }

    /// Stops serving.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until every server has stopped (after [`shutdown`](Self::shutdown)).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DiscoveryError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DiscoveryError::Bind { addr, source })
}

fn local(listener: &TcpListener, asked: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(asked)
}

/// The file source: loads `paths` now (a failure fails the start) and again whenever
/// they change (a failure keeps the catalog in force). Returns what must be kept alive.
fn files(
    paths: Vec<PathBuf>,
    options: LoadOptions,
    catalog: watch::Sender<Arc<Catalog>>,
    shutdown: CancellationToken,
) -> Result<Box<dyn std::any::Any + Send>, DiscoveryError> {
    let watched = paths.clone();
    let generation = Arc::new(Mutex::new(0u64));
    let load = move || -> Result<(), Vec<String>> {
        let (config, report) = MeshConfig::load(&paths, &options)
            .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        for w in report.warnings() {
            tracing::warn!("{w}");
        }
        let mut generation = generation.lock().unwrap_or_else(|e| e.into_inner());
        *generation += 1;
        catalog.send_replace(Arc::new(Catalog::new(*generation, resources(&config))));
        Ok(())
    };
    load().map_err(DiscoveryError::Config)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = crate::watch::watcher(&watched, notify::RecursiveMode::NonRecursive, tx)
        .map_err(|e| DiscoveryError::Watch(e.to_string()))?;
    let task = crate::watch::on_change(rx, shutdown, move || {
        if let Err(errors) = load() {
            for e in errors {
                tracing::error!("configuration reload rejected: {e}");
            }
        }
    });
    Ok(Box::new((watcher, AbortOnDrop(task))))
}

/// Every resource of `config`.
fn resources(config: &MeshConfig) -> Vec<AnyResource> {
    let mut all = Vec::new();
    all.extend(config.gateways().iter().cloned().map(AnyResource::Gateway));
    all.extend(
        config
            .virtual_services()
            .iter()
            .cloned()
            .map(AnyResource::VirtualService),
    );
    all.extend(
        config
            .destination_rules()
            .iter()
            .cloned()
            .map(AnyResource::DestinationRule),
    );
    all.extend(
        config
            .service_entries()
            .iter()
            .cloned()
            .map(AnyResource::ServiceEntry),
    );
    all.extend(
        config
            .peer_authentications()
            .iter()
            .cloned()
            .map(AnyResource::PeerAuthentication),
    );
    all.extend(
        config
            .authorization_policies()
            .iter()
            .cloned()
            .map(AnyResource::AuthorizationPolicy),
    );
    all
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The monitoring server: `/metrics` and `/ready`.
async fn serve_monitoring(
    listener: TcpListener,
    registry: Arc<Registry>,
    catalog: watch::Receiver<Arc<Catalog>>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let registry = registry.clone();
        let catalog = catalog.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = monitoring(&req, &registry, &catalog);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn monitoring(
    req: &Request<Incoming>,
    registry: &Registry,
    catalog: &watch::Receiver<Arc<Catalog>>,
) -> Response<BoxBody> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(body::full(body));
        *r.status_mut() = status;
        r
    };
    match req.uri().path() {
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, out);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        "/ready" => {
            if catalog.borrow().generation > 0 {
                text(StatusCode::OK, "ready\n".to_owned())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no configuration yet\n".to_owned(),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}
