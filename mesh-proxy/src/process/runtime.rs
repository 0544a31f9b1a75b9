//! The process around the stacks, written once for the sidecar and the gateway: the
//! [`Mesh`] built from the settings (telemetry exporters, access log, certificate
//! source, configuration watch), the listeners' bookkeeping, the admin server and the
//! order of the drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_telemetry::access_log::{AccessLog, Format};
use mesh_telemetry::trace::export::{ExportConfig, OtlpExporter, SpanQueue, ZipkinExporter};
use mesh_telemetry::{MetricsRegistry, Telemetry};
use mesh_tls::CertificateAuthority;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::admin::{self, Admin};
use super::shutdown::ProxyHandle;
use crate::control::certificates::{CaClientOptions, CertificateClient, RotationHandle};
use crate::mesh::{BuildError, Certificates, Mesh, Options, Workload};
use crate::settings::Settings;

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration did not load; every problem, located.
    #[error("configuration rejected:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    /// The certificate could not be loaded or issued.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else (tracing exporter, watcher).
    #[error("{0}")]
    Other(String),
}

impl From<BuildError> for StartError {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::Config(c) => StartError::Config(c.diagnostics),
            BuildError::Certificate(c) => StartError::Certificate(c),
            BuildError::Dns(e) => StartError::Other(e.to_string()),
        }
    }
}

/// A proxy process being started: its mesh and what it serves.
pub struct Process {
    /// The settings.
    pub settings: Arc<Settings>,
    /// The mesh of the workload (or gateway).
    pub mesh: Mesh,
    keep: Vec<Box<dyn std::any::Any + Send>>,
    flush: Vec<BoxFuture<'static, ()>>,
    listeners: JoinSet<()>,
    addresses: Vec<(String, SocketAddr)>,
}

impl Process {
    /// Builds the mesh the settings describe (for Gateway `gateway` when given) and
    /// starts watching its configuration.
    pub async fn new(
        settings: Arc<Settings>,
        gateway: Option<(String, String)>,
    ) -> Result<Self, StartError> {
        let (telemetry, flush) = telemetry(&settings).await?;
        let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        let certificates = match certificate_from_discovery(&settings).await? {
            Some((certificates, rotation)) => {
                keep.push(Box::new(rotation));
                certificates
            }
            None => certificates(&settings)?,
        };
        let mut builder = Mesh::builder(workload(&settings))
            .certificates(certificates)
            .telemetry(telemetry)
            .options(options(&settings));
        builder = match settings.discovery {
            // Nothing is served before the first configuration from `discovery` is in force.
            Some(_) => builder.config(mesh_core::config::MeshConfig::default()),
            None => builder.config_dir(settings.resolve(&settings.config_dir)),
        };
        let is_gateway = gateway.is_some();
        if let Some((namespace, name)) = gateway {
            builder = builder.gateway(namespace, name);
        }
        let mesh = builder.build()?;
        if settings.discovery.is_some() {
            follow_discovery(&settings, &mesh, is_gateway).await?;
        } else {
            mesh.watch()
                .map_err(|e| StartError::Other(format!("configDir: {e}")))?;
        }
        Ok(Self {
            settings,
            mesh,
            keep,
            flush,
            listeners: JoinSet::new(),
            addresses: Vec::new(),
        })
    }

    /// Binds listener `name` on `addr`.
    pub async fn bind(&mut self, name: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|e| StartError::Other(format!("listener address: {e}")))?;
        self.addresses.push((name.to_owned(), local));
        Ok(listener)
    }

    /// Binds listener `name` on the IPv6 address `addr` for IPv6 only (`IPV6_V6ONLY`), so
    /// that it can share its port with an IPv4 listener. `None`, with a warning, when the
    /// namespace has no IPv6 (the address cannot be bound).
    pub fn bind_ipv6_only(&mut self, name: &str, addr: SocketAddr) -> Option<TcpListener> {
        use socket2::{Domain, Protocol, Socket, Type};
        let bound = (|| {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_only_v6(true)?;
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            TcpListener::from_std(std::net::TcpListener::from(socket))
        })();
        match bound {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                self.addresses.push((name.to_owned(), local));
                Some(listener)
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "no IPv6 listener: {name}");
                None
            }
        }
    }

    /// Runs a listener's serve loop; the proxy's `wait` waits for it to drain.
    pub fn serve(&mut self, listener: impl std::future::Future<Output = ()> + Send + 'static) {
        self.listeners.spawn(listener);
    }

    /// Starts the admin server and returns the running proxy. The admin server stays
    /// up while the listeners drain, then stops.
    pub async fn finish(mut self) -> Result<ProxyHandle, StartError> {
        let admin_listener = self.bind("admin", self.settings.listeners.admin).await?;
        let token = self.mesh.shutdown_token();
        let admin_token = tokio_util::sync::CancellationToken::new();
        let mut background = vec![admin::spawn(
            admin_listener,
            Admin::new(&self.mesh),
            Arc::new(crate::serve::builder(&self.settings.limits)),
            admin_token.clone(),
        )];
        let drain = self.settings.limits.drain_timeout.as_std();
        background.push(tokio::spawn(async move {
            token.cancelled().await;
            tokio::time::sleep(drain + Duration::from_millis(50)).await;
            admin_token.cancel();
        }));
        tracing::info!(
            identity = %self.mesh.certificates().identity(),
            addresses = ?self.addresses,
            "proxy started"
        );
        Ok(ProxyHandle {
            token: self.mesh.shutdown_token(),
            listeners: self.listeners,
            background,
            flush: self.flush,
            keep: {
                let mut keep = self.keep;
                keep.push(Box::new(self.mesh));
                keep
            },
            addresses: self.addresses,
        })
    }
}

/// Subscribes `mesh` to the configuration of `discovery` and waits until the first one
/// is in force (retrying while `discovery` is unreachable).
async fn follow_discovery(
    settings: &Settings,
    mesh: &Mesh,
    is_gateway: bool,
) -> Result<(), StartError> {
    use crate::control::xds::{NodeInfo, XdsOptions, subscribe};
    let (Some(discovery), Some(identity)) = (&settings.discovery, settings.discovery_identity())
    else {
        return Ok(());
    };
    let identity = identity.map_err(|e| StartError::Other(format!("discovery.identity: {e}")))?;
    let w = &settings.workload;
    let node = NodeInfo {
        proxy_type: if is_gateway { "router" } else { "sidecar" }.to_owned(),
        ip: None,
        name: workload(settings).workload_name(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        labels: w.labels.clone(),
        cluster_id: settings.cluster_id.clone(),
        domain_suffix: "cluster.local".to_owned(),
    };
    let mut options = XdsOptions::new(
        discovery.address.clone(),
        mesh_tls::SecureNaming::only(identity),
        node,
    );
    options.connect_timeout = settings.limits.connect_timeout.as_std();
    let updates = subscribe(
        options,
        mesh_tls::ClientTls::new(mesh.certificates().clone()),
        mesh.shutdown_token(),
    );
    let mut applied = mesh.follow(updates);
    tracing::info!(address = %discovery.address, "waiting for the configuration from discovery");
    let stop = mesh.shutdown_token();
    tokio::select! {
        () = stop.cancelled() => Err(StartError::Other("stopped before the configuration arrived".into())),
        ready = applied.wait_for(Option::is_some) => ready
            .map(|_| ())
            .map_err(|_| StartError::Other("the configuration subscription ended".into())),
    }
}

/// The workload the settings describe.
pub fn workload(settings: &Settings) -> Workload {
    Workload {
        namespace: settings.workload.namespace.clone(),
        service_account: settings.workload.service_account.clone(),
        name: settings.workload.name.clone(),
        labels: settings.workload.labels.clone(),
        service_host: settings.workload.service_host.clone(),
        trust_domain: settings.trust_domain.clone(),
        cluster_id: settings.cluster_id.clone(),
        locality: mesh_core::Locality::parse(
            settings.workload.locality.as_deref().unwrap_or_default(),
        ),
        network: settings.workload.network.clone().filter(|n| !n.is_empty()),
    }
}

/// The stack options the settings give.
pub fn options(settings: &Settings) -> Options {
    Options {
        limits: settings.limits.clone(),
        outbound_mode: settings.outbound_traffic_policy.mode,
        path_normalization: mesh_tls::authz::PathNormalization::from_istio(
            &settings.path_normalization,
        )
        .unwrap_or_default(),
        random_seed: settings.random_seed,
        // Under capture the application is reached on whatever port was called, so no
        // DENY port can be said to be unserved.
        app_port: (!settings.listeners.capture).then(|| settings.listeners.app.port()),
        dns_servers: settings.dns.servers.clone(),
        dns_refresh_rate: settings.dns.refresh_rate.as_std(),
        credentials_dir: settings
            .gateway
            .as_ref()
            .and_then(|g| g.credentials_dir.as_ref())
            .map(|dir| settings.resolve(dir)),
        num_trusted_proxies: settings.gateway_topology.num_trusted_proxies,
        gateway_forward_client_cert: settings
            .gateway_topology
            .forward_client_cert_details
            .as_deref()
            .and_then(crate::stack::headers::ForwardClientCertDetails::from_istio)
            .unwrap_or_default(),
        untrusted_headers: settings
            .gateway_topology
            .untrusted_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
    }
}

/// The certificate source of the settings.
fn certificates(settings: &Settings) -> Result<Certificates, StartError> {
    if let Some(dir) = &settings.svid.ca_dir {
        let ca = CertificateAuthority::load_dir(&settings.resolve(dir))
            .map_err(|e| StartError::Certificate(format!("svid.caDir: {e}")))?;
        Ok(Certificates::Issuer {
            ca: Arc::new(ca),
            lifetime: settings.svid.lifetime.map(|l| l.as_std()),
        })
    } else if let Some(dir) = &settings.svid.cert_dir {
        Ok(Certificates::Dir(settings.resolve(dir)))
    } else {
        Err(StartError::Certificate(
            "svid: set certDir or caDir (or discovery)".to_owned(),
        ))
    }
}

/// The workload certificate from `discovery` by CSR (when the settings name
/// `discovery` and no other source), retried with backoff until it comes, and the
/// rotation that renews it.
async fn certificate_from_discovery(
    settings: &Settings,
) -> Result<Option<(Certificates, RotationHandle)>, StartError> {
    let Some(discovery) = &settings.discovery else {
        return Ok(None);
    };
    if settings.svid.cert_dir.is_some() || settings.svid.ca_dir.is_some() {
        return Ok(None);
    }
    let identity = workload(settings)
        .identity()
        .map_err(|e| StartError::Certificate(e.to_string()))?;
    let mut options = CaClientOptions::new(
        discovery.address.clone(),
        settings.resolve(&discovery.root_cert),
        identity,
    )
    .token_file(settings.resolve(&discovery.token_file))
    .server_name(discovery.server_name.clone());
    if let Some(lifetime) = settings.svid.lifetime {
        options = options.ttl(lifetime.as_std());
    }
    let client = CertificateClient::new(options);
    let mut failures = 0;
    let store = loop {
        match client.store().await {
            Ok(store) => break store,
            Err(e) => {
                failures += 1;
                let wait = client.retry_delay(failures);
                tracing::warn!(address = %discovery.address, error = %e, retry_in = ?wait, "no certificate from discovery yet");
                tokio::time::sleep(wait).await;
            }
        }
    };
    tracing::info!(identity = %store.identity(), "certificate from discovery");
    let rotation = client.spawn_rotation(store.clone());
    Ok(Some((Certificates::Store(store), rotation)))
}

/// Metrics, traces and access log of the settings, with the flushes to run at exit.
async fn telemetry(
    settings: &Settings,
) -> Result<(Telemetry, Vec<BoxFuture<'static, ()>>), StartError> {
    let workload = workload(settings);
    let identity = workload
        .identity()
        .map_err(|e| StartError::Certificate(e.to_string()))?;
    let metrics = MetricsRegistry::new();
    let counters = Telemetry::export_counters(&metrics);
    let dropped = metrics.proxy().access_log_dropped.clone();
    let mut builder = Telemetry::builder(workload.telemetry(identity))
        .metadata_exchange(workload.local_metadata())
        .metrics(metrics)
        .sampling(settings.tracing.sampling);
    let mut flush: Vec<BoxFuture<'static, ()>> = Vec::new();
    let service_name = format!("{}.{}", workload.workload_name(), workload.namespace);
    let queue = if let Some(url) = &settings.tracing.otlp {
        let exporter = OtlpExporter::new(url, &service_name, Duration::from_secs(10))
            .map_err(|e| StartError::Other(format!("tracing.otlp: {e}")))?;
        Some(SpanQueue::spawn(
            exporter,
            ExportConfig::default(),
            counters,
        ))
    } else if let Some(url) = &settings.tracing.zipkin {
        let exporter = ZipkinExporter::new(url, &service_name)
            .map_err(|e| StartError::Other(format!("tracing.zipkin: {e}")))?;
        Some(SpanQueue::spawn(
            exporter,
            ExportConfig::default(),
            counters,
        ))
    } else {
        None
    };
    if let Some(q) = queue {
        builder = builder.spans(q.clone());
        flush.push(Box::pin(async move { q.flush().await }));
    }
    if let Some(path) = &settings.access_log.path {
        let format = match settings.access_log.format.as_deref() {
            Some("JSON") => Format::Json,
            _ => Format::Text,
        };
        let log = if path == "-" {
            AccessLog::stdout(format, dropped)
        } else {
            AccessLog::file(
                settings.resolve(std::path::Path::new(path)),
                format,
                dropped,
            )
            .await
            .map_err(|e| StartError::Other(format!("accessLog.path {path}: {e}")))?
        };
        builder = builder.access_log(log.clone());
        flush.push(Box::pin(async move { log.flush().await }));
    } else {
        // A Telemetry resource that turns access logging on writes here (Istio's `envoy`
        // provider: standard output, Envoy's text format).
        let log = AccessLog::stdout(Format::Text, dropped);
        builder = builder.standby_access_log(log.clone());
        flush.push(Box::pin(async move { log.flush().await }));
    }
    Ok((builder.build(), flush))
}
