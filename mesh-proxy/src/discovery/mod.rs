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
//! | 15017 | the admission webhooks (HTTPS), with the Kubernetes source: `POST /validate`, and `POST /inject` (sidecar injection) when [`DiscoveryOptions::inject`] is set |
//!
//! # Identity
//!
//! `discovery` holds the CA. It issues its own certificate from it for
//! `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`, with the DNS name of its
//! Service (`mesh-discovery.<namespace>.svc`) and any `dns_names`, and renews it at
//! half-life. Sidecars check the SPIFFE ID on xDS (their `discovery.identity`) and the
//! DNS name when they ask for a certificate (`discovery.serverName`, as Istio's agent
//! checks istiod); the API server checks the DNS name when it calls the webhook, and
//! `discovery` keeps the webhook configurations' `caBundle` set to the mesh root (the
//! ValidatingWebhookConfiguration and, for injection, the MutatingWebhookConfiguration).
//!
//! # Choices that differ from Istio
//!
//! - The file source serves no certificates: the certificate service authenticates
//!   callers with the Kubernetes TokenReview API.
//! - The CA files are read at start; a new CA takes a restart (istiod watches them).

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
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_tls::{CertStore, CertificateAuthority, LeafSpec, ServerTls};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::xds::{AdsServer, Catalog};
use crate::mesh::AbortOnDrop;

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Files or directories of Istio YAML, reloaded when they change. A reload that
    /// does not validate changes nothing.
    Files(Vec<PathBuf>),
    /// The Kubernetes API ([`kube::KubeSource`]): with this kubeconfig, or else the
    /// in-cluster service account (or `KUBECONFIG`). Enables the certificate service
    /// (TokenReview needs the API), the root certificate ConfigMaps and the webhook.
    Kubernetes {
        /// A kubeconfig file; `None` for the in-cluster configuration.
        kubeconfig: Option<PathBuf>,
    },
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
    /// The validating webhook (HTTPS), Kubernetes source only.
    pub webhook: Option<SocketAddr>,
    /// The ValidatingWebhookConfiguration whose `caBundle` `discovery` keeps set to the
    /// mesh root.
    pub webhook_config: Option<String>,
    /// DNS names on the serving certificate besides `mesh-discovery.<namespace>.svc`.
    pub dns_names: Vec<String>,
    /// Audiences a certificate request's token must carry (`istio-ca`).
    pub token_audiences: Vec<String>,
    /// Lifetime of issued workload certificates when the request asks for none (24 h).
    pub workload_cert_ttl: Option<std::time::Duration>,
    /// Sidecar injection on the webhook listener (`POST /inject`): the proxy's image and
    /// revision. Its trust domain, token audience and `discovery` namespace and service
    /// account are this process's own.
    pub inject: Option<crate::inject::InjectOptions>,
    /// Inject native sidecars: `None` decides by the API server's version (1.33 or later,
    /// as Istio's `auto` decides by the kubelets').
    pub native_sidecars: Option<bool>,
    /// The MutatingWebhookConfiguration whose `caBundle` `discovery` keeps set to the
    /// mesh root.
    pub injector_config: Option<String>,
}

impl DiscoveryOptions {
    /// Options with Istio's defaults (ports 15012 and 15014 on all addresses, namespace
    /// `istio-system`, service account `mesh-discovery`) for `source` and the CA in
    /// `ca_dir`.
    pub fn new(source: Source, ca_dir: impl Into<PathBuf>) -> Self {
        Self {
            namespace: "istio-system".to_owned(),
            service_account: "mesh-discovery".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
            ca_dir: ca_dir.into(),
            source,
            grpc: SocketAddr::from(([0, 0, 0, 0], 15012)),
            monitoring: SocketAddr::from(([0, 0, 0, 0], 15014)),
            webhook: None,
            webhook_config: None,
            dns_names: Vec::new(),
            token_audiences: vec!["istio-ca".to_owned()],
            workload_cert_ttl: None,
            inject: None,
            native_sidecars: None,
            injector_config: None,
        }
    }
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
    /// The Kubernetes API could not be reached.
    #[error("Kubernetes: {0}")]
    Kubernetes(String),
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
        let mut ca = CertificateAuthority::load_plugin(&options.ca_dir, &options.trust_domain)
            .map_err(|e| DiscoveryError::Ca(format!("{}: {e}", options.ca_dir.display())))?;
        if let Some(ttl) = options.workload_cert_ttl {
            ca = ca.with_default_ttl(ttl);
        }
        let ca = Arc::new(ca);
        let (store, renewal) = serving_certificate(&ca, &options)?;
        let shutdown = CancellationToken::new();
        let mut keep: Vec<Box<dyn std::any::Any + Send>> = vec![Box::new(renewal)];
        let mut tasks = JoinSet::new();
        let mut registry = Registry::default();
        let mut routes = tonic::service::Routes::builder();

        let (catalog_tx, catalog) = watch::channel(Arc::new(Catalog::default()));
        let load = LoadOptions {
            default_namespace: options.namespace.clone(),
            root_namespace: options.root_namespace.clone(),
        };
        let mut webhook = None;
        match &options.source {
            Source::Files(paths) => {
                keep.push(files(paths.clone(), load, catalog_tx, shutdown.clone())?);
            }
            Source::Kubernetes { kubeconfig } => {
                let client = kube_client(kubeconfig.as_deref()).await?;
                let source_options = kube::SourceOptions {
                    trust_domain: options.trust_domain.clone(),
                    root_namespace: options.root_namespace.clone(),
                    instance: std::env::var("POD_NAME").ok(),
                    ..kube::SourceOptions::default()
                };
                let source = kube::KubeSource::start(client.clone(), source_options)
                    .await
                    .map_err(|e| DiscoveryError::Kubernetes(e.to_string()))?;
                source.register_metrics(&mut registry);
                let mut states = source.subscribe();
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    loop {
                        let state = states.borrow_and_update().clone();
                        if state.generation > 0 {
                            catalog_tx.send_replace(Arc::new(Catalog::new(
                                state.generation,
                                state.resources.clone(),
                            )));
                        }
                        tokio::select! {
                            () = stop.cancelled() => return,
                            changed = states.changed() => if changed.is_err() { return },
                        }
                    }
                });
                keep.push(Box::new(source));
                let certificates = ca::CertificateService::new(
                    ca.clone(),
                    client.clone(),
                    ca::CaOptions {
                        audiences: options.token_audiences.clone(),
                        ..ca::CaOptions::default()
                    },
                );
                routes.add_service(certificates.into_service());
                tasks.spawn(root_cert::publish(
                    client.clone(),
                    ca.root_pem().to_owned(),
                    shutdown.clone(),
                ));
                if let Some(addr) = options.webhook {
                    let inject = match options.inject.clone() {
                        Some(inject) => Some(injection(inject, &options, &client).await),
                        None => None,
                    };
                    webhook = Some((bind(addr).await?, addr, load, client, inject));
                }
            }
        }

        let ads = AdsServer::new(catalog.clone(), options.root_namespace.clone());
        ads.metrics().register(&mut registry);
        routes.add_service(ads.into_service());
        let registry = Arc::new(registry);

        let grpc = bind(options.grpc).await?;
        let monitoring = bind(options.monitoring).await?;
        let mut addresses = vec![
            ("grpc", local(&grpc, options.grpc)),
            ("monitoring", local(&monitoring, options.monitoring)),
        ];
        if let Some((listener, addr, load, client, inject)) = webhook {
            addresses.push(("webhook", local(&listener, addr)));
            let tls = webhook_tls(&store);
            let stop = shutdown.clone();
            let injecting = inject.is_some();
            tasks.spawn(webhook::serve_webhooks(listener, tls, load, inject, stop));
            if let Some(name) = options.webhook_config.clone() {
                tasks.spawn(keep_ca_bundle(
                    client.clone(),
                    WebhookKind::Validating,
                    name,
                    ca.root_pem().to_owned(),
                ));
            }
            if let Some(name) = options.injector_config.clone().filter(|_| injecting) {
                tasks.spawn(keep_ca_bundle(
                    client,
                    WebhookKind::Mutating,
                    name,
                    ca.root_pem().to_owned(),
                ));
            }
        }
        let stop = shutdown.clone();
        let server_tls = ServerTls::new(store);
        let routes = routes.routes();
        tasks.spawn(async move {
            if let Err(e) = xds::serve(grpc, server_tls, routes, stop).await {
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

/// Lifetime of `discovery`'s own serving certificate; renewed at half-life.
const SERVING_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `discovery`'s own certificate, from its CA: its SPIFFE ID (which proxies check on
/// xDS) and the DNS names of its Service (which certificate clients and the API
/// server's webhook calls check), renewed at half-life by the returned task.
fn serving_certificate(
    ca: &Arc<CertificateAuthority>,
    options: &DiscoveryOptions,
) -> Result<(Arc<CertStore>, AbortOnDrop), DiscoveryError> {
    let mut spec = LeafSpec::workload(
        &options.trust_domain,
        &options.namespace,
        &options.service_account,
    )
    .with_ttl(SERVING_TTL)
    .with_dns(&format!("mesh-discovery.{}.svc", options.namespace));
    for name in &options.dns_names {
        spec = spec.with_dns(name);
    }
    let issue = {
        let ca = ca.clone();
        move || {
            ca.issue_with(&spec)
                .map_err(|e| DiscoveryError::Ca(e.to_string()))
        }
    };
    let store = CertStore::from_issued(&issue()?).map_err(|e| DiscoveryError::Ca(e.to_string()))?;
    let renewing = store.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(SERVING_TTL / 2).await;
            match issue() {
                Ok(svid) => {
                    if let Err(e) = renewing.install(svid.files()) {
                        tracing::error!(error = %e, "cannot install the renewed serving certificate");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot renew the serving certificate"),
            }
        }
    });
    Ok((store, AbortOnDrop(task)))
}

/// The webhook's TLS: `store`'s certificate, no client certificate asked.
fn webhook_tls(store: &Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(store.provider().clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("ring supports the default versions"))
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A client of the Kubernetes API: from `kubeconfig`, else in-cluster or `KUBECONFIG`.
async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
) -> Result<::kube::Client, DiscoveryError> {
    let err = |e: &dyn std::fmt::Display| DiscoveryError::Kubernetes(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let file = ::kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            ::kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| err(&e))?
        }
        None => ::kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    ::kube::Client::try_from(config).map_err(|e| err(&e))
}

/// The two kinds of webhook configuration whose `caBundle` `discovery` keeps.
#[derive(Clone, Copy, Debug)]
enum WebhookKind {
    Validating,
    Mutating,
}

impl WebhookKind {
    fn kind(self) -> &'static str {
        match self {
            Self::Validating => "ValidatingWebhookConfiguration",
            Self::Mutating => "MutatingWebhookConfiguration",
        }
    }
}

/// The injector's options completed with this process's identity and trust domain, and
/// native sidecars decided by the API server's version when not set.
async fn injection(
    mut inject: crate::inject::InjectOptions,
    options: &DiscoveryOptions,
    client: &::kube::Client,
) -> crate::inject::InjectOptions {
    inject.trust_domain = options.trust_domain.clone();
    inject.discovery_namespace = options.namespace.clone();
    inject.discovery_service_account = options.service_account.clone();
    if let Some(audience) = options.token_audiences.first() {
        inject.token_audience = audience.clone();
    }
    inject.native_sidecars = match options.native_sidecars {
        Some(native) => native,
        None => match client.apiserver_version().await {
            Ok(info) => {
                let minor: u32 = info
                    .minor
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .unwrap_or(0);
                info.major == "1" && minor >= 33
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the API server's version; injecting classic sidecars");
                false
            }
        },
    };
    tracing::info!(
        native_sidecars = inject.native_sidecars,
        image = %inject.image,
        "sidecar injection on"
    );
    inject
}

/// Keeps every webhook of the webhook configuration `name` trusting `root_pem` (as
/// istiod patches its webhooks): checked at start and every minute.
async fn keep_ca_bundle(client: ::kube::Client, kind: WebhookKind, name: String, root_pem: String) {
    use ::kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "admissionregistration.k8s.io",
        "v1",
        kind.kind(),
    ));
    let api: ::kube::Api<DynamicObject> = ::kube::Api::all_with(client, &resource);
    // Serialized as base64, as the field is in the API.
    let bundle = serde_json::to_value(k8s_openapi::ByteString(root_pem.as_bytes().to_vec()))
        .unwrap_or_default();
    let kind = kind.kind();
    loop {
        match api.get_opt(&name).await {
            Ok(Some(config)) => {
                let stale: Vec<&str> = config.data["webhooks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|w| w["clientConfig"]["caBundle"] != bundle)
                    .filter_map(|w| w["name"].as_str())
                    .collect();
                if !stale.is_empty() {
                    let webhooks: Vec<serde_json::Value> = stale
                        .iter()
                        .map(|n| serde_json::json!({"name": n, "clientConfig": {"caBundle": bundle}}))
                        .collect();
                    let patch =
                        ::kube::api::Patch::Strategic(serde_json::json!({"webhooks": webhooks}));
                    match api
                        .patch(&name, &::kube::api::PatchParams::default(), &patch)
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(%kind, webhook = %name, "caBundle set to the mesh root")
                        }
                        Err(e) => {
                            tracing::warn!(%kind, webhook = %name, error = %e, "cannot set caBundle")
                        }
                    }
                }
            }
            Ok(None) => {
                tracing::debug!(%kind, webhook = %name, "no such webhook configuration yet")
            }
            Err(e) => {
                tracing::warn!(%kind, webhook = %name, error = %e, "cannot read the webhook configuration")
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }
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
        catalog.send_replace(Arc::new(Catalog::new(*generation, config.resources())));
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

/// The monitoring server: `/metrics` and `/ready`.
async fn serve_monitoring(
    listener: TcpListener,
    registry: Arc<Registry>,
    catalog: watch::Receiver<Arc<Catalog>>,
    shutdown: CancellationToken,
) {
    let svc = tower::service_fn(move |req: Request<Incoming>| {
        let answer = monitoring(&req, &registry, &catalog);
        async move { Ok::<_, Infallible>(answer) }
    });
    let builder = Arc::new(crate::serve::builder(&crate::settings::Limits::default()));
    crate::serve::run(
        listener,
        crate::serve::Options::internal(builder, shutdown),
        move |tcp, _| {
            let svc = svc.clone();
            async move { Some((tcp, svc)) }
        },
    )
    .await;
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
