//! [`Mesh`]: the whole mesh for one workload, built once from Istio YAML, a workload
//! description and a certificate; the entry point for an application that embeds the
//! mesh, and what the sidecar and the gateway run.
//!
//! # Behaviour
//!
//! [`Mesh::builder`] loads and validates the configuration (every problem, located, in
//! one [`ConfigError`]), obtains the certificate, and compiles what the workload needs:
//! its routes (for the sidecar's `mesh` listener or one gateway), its
//! AuthorizationPolicies and PeerAuthentication. The [`Mesh`] then hands out services:
//!
//! - [`Mesh::outbound`]: the client side (telemetry, VirtualService routing, route
//!   deadline and retries, connection-pool limits, outlier-aware balancing, mTLS per
//!   endpoint with secure naming), a cloneable `tower::Service`;
//! - [`Mesh::inbound`]: the server side around the application's own service
//!   (sanitizing, telemetry, RequestAuthentication, AuthorizationPolicy, Istio's local
//!   replies), and
//!   [`Mesh::serve_inbound`], which also accepts connections per PeerAuthentication;
//! - [`Mesh::tcp_outbound`] and [`Mesh::tcp_inbound`]: TCP to a service's port and
//!   from mesh peers to the application ([`tcp`](crate::stack::tcp));
//! - the gateway's routes when built for a gateway, and
//!   [`Mesh::tls_passthrough`] for its `PASSTHROUGH` servers.
//!
//! [`Mesh::update`] and [`Mesh::reload`] swap in a new configuration atomically (a
//! rejected one changes nothing and is counted). `mesh_config_generation` (a gauge)
//! tells which configuration is in force: 1 for the one built with, one more for each
//! applied update; a rejected update, or one whose content is unchanged, leaves it. It
//! plays the part of the `version` gauge of an Envoy xDS subscription, which holds a
//! hash of the last applied update; a small counter is used because a 64-bit hash does
//! not survive Prometheus' float samples (`mesh-telemetry/ISTIO.md` TM-08); the content hash is the
//! `version` of [`Active`]. [`Mesh::watch`] (feature `watch`)
//! reloads on every change of the configuration directory. Certificates rotate as the
//! source says: a watched SVID directory, or the built-in issuer at half-life.
//! [`Mesh::shutdown`] stops accepting and drains what [`Mesh::serve_inbound`] serves.
//!
//! # Embedding compared with the sidecar
//!
//! An embedder gains: no extra hop or process, no second copy of the request, typed
//! access to the peer's identity (`PeerIdentity` in the request extensions), and the
//! same Istio YAML, metrics and behaviour as the sidecar (the same code). It gives up:
//! the language independence of a sidecar, the operational split (mesh upgrades are
//! application releases), transparent capture (the application calls
//! [`Mesh::outbound`] explicitly), and the admin server (read [`Mesh::telemetry`]
//! instead).
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use http::Request;
//! use mesh_core::body;
//! use mesh_proxy::{Certificates, Mesh, Workload};
//! use tower::ServiceExt;
//!
//! let mesh = Mesh::builder(Workload::new("production", "order-service").label("app", "order-service"))
//!     .config_dir("istio/")
//!     .certificates(Certificates::Dir("/etc/certs".into()))
//!     .build()?;
//! let res = mesh
//!     .outbound()
//!     .oneshot(Request::post("http://payment-service:8080/api/v1/payments").body(body::empty())?)
//!     .await?;
//! println!("{}", res.status());
//! # Ok(()) }
//! ```

use std::any::Any;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_core::{Identity, IdentityError};
use mesh_routing::{CompileOptions, Listener, Naming, RouterHandle, Routing};
use mesh_telemetry::exchange::{LocalMetadata, NodeMetadata};
use mesh_telemetry::policy::TelemetryPolicy;
use mesh_telemetry::{Telemetry, Workload as TelemetryWorkload};
use mesh_tls::authn::{Authenticator, AuthnHandle, JwksCache};
use mesh_tls::authz::{PathNormalization, PolicyHandle, PolicySet};
use mesh_tls::{
    BuiltInIssuer, CertStore, CertificateAuthority, ClientTls, InboundAcceptor, PeerAuthMode,
    PeerAuthentication, WorkloadPeerAuthentication,
};
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::serve;
use crate::settings::Limits;
use crate::stack::inbound::{Application, ApplicationBody};
use crate::stack::tcp::{TcpInbound, TcpOutbound};
use crate::stack::{
    Destinations, HttpService, MakeDest, MeshRouter, Outbound, OutboundMode, OutboundPolicy,
    inbound,
};

/// Who the workload is: what PeerAuthentication, AuthorizationPolicy, DestinationRule
/// `workloadSelector`s and the metrics' labels select on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Kubernetes service account (the SPIFFE identity's last segment).
    pub service_account: String,
    /// Workload name for metrics; `app`, else the service account, when `None`.
    pub name: Option<String>,
    /// Pod labels (`app`, `version`, ...).
    pub labels: BTreeMap<String, String>,
    /// The service host it serves; `<app>.<namespace>.svc.cluster.local` when `None`.
    pub service_host: Option<String>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// The cluster the workload runs in (Istio's `CLUSTER_ID`, `Kubernetes` by
    /// default): the `source_cluster`/`destination_cluster` of its metrics.
    pub cluster_id: String,
    /// Where it runs (`region/zone/subzone`), for locality-aware balancing.
    pub locality: mesh_core::Locality,
    /// Its network; endpoints of other networks are left out.
    pub network: Option<String>,
}

impl Workload {
    /// A workload of `namespace` running as `service_account`, trust domain
    /// `cluster.local`, no labels.
    pub fn new(namespace: impl Into<String>, service_account: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            name: None,
            labels: BTreeMap::new(),
            service_host: None,
            trust_domain: "cluster.local".into(),
            cluster_id: mesh_telemetry::exchange::DEFAULT_CLUSTER_ID.into(),
            locality: mesh_core::Locality::default(),
            network: None,
        }
    }

    /// Sets the cluster id.
    #[must_use]
    pub fn cluster_id(mut self, cluster_id: impl Into<String>) -> Self {
        self.cluster_id = cluster_id.into();
        self
    }

    /// The node metadata the workload's proxy sends its peers (Istio's metadata
    /// exchange): name, namespace, labels, cluster id and owner.
    pub fn node_metadata(&self) -> NodeMetadata {
        NodeMetadata::new(self.workload_name(), &self.namespace, &self.cluster_id)
            .labels(&self.labels)
    }

    /// The node metadata in the exchange's headers, with node id
    /// `sidecar~~<workload>.<namespace>~<namespace>.svc.cluster.local`.
    pub fn local_metadata(&self) -> LocalMetadata {
        let id = format!(
            "sidecar~~{}.{ns}~{ns}.svc.cluster.local",
            self.workload_name(),
            ns = self.namespace
        );
        LocalMetadata::new(&self.node_metadata(), &id)
    }

    /// Adds a label.
    #[must_use]
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The workload's SPIFFE ID.
    pub fn identity(&self) -> Result<Identity, IdentityError> {
        Identity::from_istio(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// The workload name of the metrics.
    pub fn workload_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.labels.get("app").cloned())
            .unwrap_or_else(|| self.service_account.clone())
    }

    /// The service host the workload serves.
    pub fn service_host(&self) -> String {
        self.service_host.clone().unwrap_or_else(|| {
            let app = self
                .labels
                .get("app")
                .cloned()
                .unwrap_or_else(|| self.service_account.clone());
            format!("{app}.{}.svc.cluster.local", self.namespace)
        })
    }

    /// The telemetry identity of the workload (`source_*` or `destination_*` labels),
    /// filled as Istio fills them: `app` and `version` from those labels, the canonical
    /// service and revision from `service.istio.io/canonical-*`, else `app`/`version`,
    /// else the workload name/`latest`, the cluster from [`cluster_id`](Self::cluster_id).
    pub fn telemetry(&self, principal: Identity) -> TelemetryWorkload {
        self.node_metadata().workload().with_principal(principal)
    }
}

/// Where the workload's certificate comes from.
#[derive(Clone, Debug)]
pub enum Certificates {
    /// Istio's SVID files (`cert-chain.pem`, `key.pem`, `root-cert.pem`) in a directory,
    /// reloaded when they change (feature `watch`; loaded once without it).
    Dir(PathBuf),
    /// Issued by this CA for the workload's identity, renewed at half-life.
    Issuer {
        /// The CA.
        ca: Arc<CertificateAuthority>,
        /// Certificate lifetime; 24 h when `None`.
        lifetime: Option<Duration>,
    },
    /// A store the application manages itself.
    Store(Arc<CertStore>),
}

/// How the stacks behave where Istio leaves it to the proxy (the sidecar reads these
/// from its settings' `limits`, `pathNormalization` and `outboundTrafficPolicy`).
#[derive(Clone, Debug)]
pub struct Options {
    /// Limits (connect timeout, idle timeout, retry replay limit, drain, listener limits).
    pub limits: Limits,
    /// Unknown hosts: passthrough or 502.
    pub outbound_mode: OutboundMode,
    /// Path normalization for AuthorizationPolicy.
    pub path_normalization: PathNormalization,
    /// Fixes the routers' random seeds (tests).
    pub random_seed: Option<u64>,
    /// The application's port, when known: AuthorizationPolicy `DENY` rules naming
    /// another port never match and are warned about at every load (ISTIO.md AP-48).
    pub app_port: Option<u16>,
    /// Name servers for ServiceEntries with `resolution: DNS`/`DNS_ROUND_ROBIN`; empty:
    /// the system's resolver configuration.
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// The longest time between two resolutions of a DNS destination (Istio's
    /// `dnsRefreshRate`); shorter when the answer's TTL is.
    pub dns_refresh_rate: std::time::Duration,
    /// Where the Secrets that DestinationRule `tls.credentialName` names are read
    /// ([`crate::credentials`]; a gateway's `gateway.credentialsDir`). `None` (sidecars):
    /// `credentialName` is not read and the certificate files apply, as on Istio's
    /// sidecars without a `workloadSelector`.
    pub credentials_dir: Option<std::path::PathBuf>,
    /// Istio's `numTrustedProxies`: proxies in front of this one trusted to append to
    /// `X-Forwarded-For` (AuthorizationPolicy `remoteIpBlocks`).
    pub num_trusted_proxies: usize,
    /// The gateway's `forwardClientCertDetails` (the sidecar's inbound listener always
    /// uses `SANITIZE_SET`).
    pub gateway_forward_client_cert: crate::stack::headers::ForwardClientCertDetails,
    /// More request header names (lower case) removed from clients at the inbound
    /// listener and the gateway.
    pub untrusted_headers: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            outbound_mode: OutboundMode::AllowAny,
            path_normalization: PathNormalization::default(),
            random_seed: None,
            app_port: None,
            dns_servers: Vec::new(),
            dns_refresh_rate: std::time::Duration::from_secs(60),
            credentials_dir: None,
            num_trusted_proxies: 0,
            gateway_forward_client_cert: Default::default(),
            untrusted_headers: Vec::new(),
        }
    }
}

/// The configuration was rejected: every located diagnostic, one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("configuration rejected:\n{}", .diagnostics.join("\n"))]
pub struct ConfigError {
    /// Each problem, naming file (or object), line, field and what is wrong.
    pub diagnostics: Vec<String>,
}

/// Why a [`Mesh`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration did not load or compile.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The certificate could not be loaded or issued.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The DNS resolver for the configured name servers could not be set up.
    #[error(transparent)]
    Dns(#[from] mesh_routing::dns::DnsError),
}

/// The configuration in force.
#[derive(Debug)]
pub struct Active {
    /// Content hash of the loaded documents.
    pub version: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// The validated configuration.
    pub config: Arc<MeshConfig>,
}

/// Everything compiled from one configuration for one workload.
struct Compiled {
    routing: Routing,
    policies: PolicySet,
    authn: Authenticator,
    peer_auth: WorkloadPeerAuthentication,
    /// The workload's Sidecar resource's `outboundTrafficPolicy.mode`, if it sets one.
    outbound_mode: Option<OutboundMode>,
    /// The workload's effective Telemetry API policy; `None` when no Telemetry applies.
    telemetry: Option<TelemetryPolicy>,
}

/// A function run with the new configuration after a successful update.
type Hook = Box<dyn Fn(&MeshConfig) + Send + Sync>;

struct Inner {
    workload: Workload,
    listener: Listener,
    options: Options,
    sources: Vec<PathBuf>,
    telemetry: Telemetry,
    store: Arc<CertStore>,
    router: MeshRouter,
    authz: PolicyHandle,
    authn: AuthnHandle,
    /// Key sets of RequestAuthentication, kept across reloads.
    jwks: JwksCache,
    peer_auth: Arc<ArcSwap<WorkloadPeerAuthentication>>,
    outbound_policy: OutboundPolicy,
    active: Arc<ArcSwap<Active>>,
    destinations: Destinations,
    hooks: Mutex<Vec<Hook>>,
    shutdown: CancellationToken,
    /// Kept alive as long as the mesh: certificate sources, watchers.
    _keep: Mutex<Vec<Box<dyn Any + Send>>>,
}

/// The mesh of one workload (see the module docs). Cheap to clone; clones share
/// everything.
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("workload", &self.inner.workload)
            .field("listener", &self.inner.listener)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Mesh`].
#[must_use]
pub struct MeshBuilder {
    workload: Workload,
    listener: Listener,
    sources: Vec<PathBuf>,
    config: Option<MeshConfig>,
    certificates: Option<Certificates>,
    telemetry: Option<Telemetry>,
    options: Options,
}

impl std::fmt::Debug for MeshBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshBuilder")
            .field("workload", &self.workload)
            .finish_non_exhaustive()
    }
}

impl MeshBuilder {
    /// Reads the Istio YAML from this file or directory (may be given several times);
    /// [`Mesh::reload`] and [`Mesh::watch`] read it again.
    pub fn config_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.sources.push(path.into());
        self
    }

    /// Starts from an already loaded configuration instead of files.
    pub fn config(mut self, config: MeshConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// Where the certificate comes from (required).
    pub fn certificates(mut self, certificates: Certificates) -> Self {
        self.certificates = Some(certificates);
        self
    }

    /// Reports to `telemetry` (exporters, access log, sampling set by the caller);
    /// by default a telemetry of the workload with 1 % trace sampling and no exporter.
    pub fn telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Limits, outbound mode, path normalization.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// Compiles the routes of Gateway `namespace/name` instead of the sidecar's.
    pub fn gateway(mut self, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        self.listener = Listener::Gateway {
            namespace: namespace.into(),
            name: name.into(),
        };
        self
    }

    /// Loads, validates and compiles the configuration and obtains the certificate.
    /// Needs a tokio runtime when the certificate source is watched or issued.
    pub fn build(self) -> Result<Mesh, BuildError> {
        let config = match self.config {
            Some(c) => c,
            None => load(&self.sources, &self.workload, &self.listener, &self.options)?,
        };
        let jwks = JwksCache::default();
        let compiled = compile(&config, &self.workload, &self.listener, &jwks)?;
        let identity = self
            .workload
            .identity()
            .map_err(|e| BuildError::Certificate(e.to_string()))?;
        let mut keep: Vec<Box<dyn Any + Send>> = Vec::new();
        let store = certificates(
            self.certificates
                .ok_or_else(|| BuildError::Certificate("no certificate source".into()))?,
            &self.workload,
            &mut keep,
        )?;
        if store.identity() != identity {
            tracing::warn!(
                certificate = %store.identity(),
                workload = %identity,
                "the certificate's identity differs from the workload's"
            );
        }
        let telemetry = self.telemetry.unwrap_or_else(|| {
            Telemetry::builder(self.workload.telemetry(store.identity()))
                .metadata_exchange(self.workload.local_metadata())
                .build()
        });
        let limits = &self.options.limits;
        let destinations = Destinations::default();
        let make = MakeDest {
            tls: ClientTls::new(store.clone()),
            connect_timeout: limits.connect_timeout.as_std(),
            replay_limit: limits.max_retry_body_bytes,
            idle_timeout: limits.idle_timeout.as_std(),
            stream_limits: crate::stack::client::StreamLimits::of(limits),
            destinations: destinations.clone(),
            credentials: self.options.credentials_dir.clone().map(Arc::from),
            origin: mesh_resilience::Origin {
                locality: self.workload.locality.clone(),
                network: self.workload.network.clone(),
                labels: self.workload.labels.clone(),
            },
        };
        // What is loaded now is generation 1 of `mesh_config_generation`.
        telemetry.metrics().proxy().config_loaded();
        telemetry.set_policy(compiled.telemetry);
        let router = match self.options.random_seed {
            Some(seed) => RouterHandle::with_seed(make, compiled.routing, seed),
            None => RouterHandle::new(make, compiled.routing),
        };
        if !self.options.dns_servers.is_empty() {
            match mesh_routing::dns::DnsResolver::with_servers(&self.options.dns_servers) {
                Ok(resolver) => router.set_dns_resolver(resolver),
                Err(e) => return Err(BuildError::Dns(e)),
            }
        }
        let shutdown = CancellationToken::new();
        // DNS destinations are resolved again as their answers expire, until shutdown.
        if tokio::runtime::Handle::try_current().is_ok() {
            let refresh = router.spawn_dns_refresh(self.options.dns_refresh_rate);
            let stop = shutdown.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                refresh.abort();
            });
        }
        let outbound_policy =
            OutboundPolicy::new(compiled.outbound_mode.unwrap_or(self.options.outbound_mode));
        Ok(Mesh {
            inner: Arc::new(Inner {
                active: Arc::new(ArcSwap::from_pointee(Active {
                    version: config.version(),
                    loaded_at: SystemTime::now(),
                    config: Arc::new(config),
                })),
                workload: self.workload,
                listener: self.listener,
                options: self.options,
                sources: self.sources,
                telemetry,
                store,
                router,
                authz: PolicyHandle::new(compiled.policies),
                authn: AuthnHandle::new(compiled.authn),
                jwks,
                peer_auth: Arc::new(ArcSwap::from_pointee(compiled.peer_auth)),
                outbound_policy,
                destinations,
                hooks: Mutex::default(),
                shutdown,
                _keep: Mutex::new(keep),
            }),
        })
    }
}

/// Loads the configuration files for `workload` (namespace-less resources land in its
/// namespace), logging the warnings: those of the load, and one for each
/// AuthorizationPolicy `DENY` rule of the workload whose `to.operation.ports` names a
/// port other than the application's (the gateway's stack has no authorization layer).
fn load(
    sources: &[PathBuf],
    workload: &Workload,
    listener: &Listener,
    options: &Options,
) -> Result<MeshConfig, ConfigError> {
    let load_options = LoadOptions {
        default_namespace: workload.namespace.clone(),
        ..LoadOptions::default()
    };
    let (config, report) =
        MeshConfig::load(sources, &load_options).map_err(|errs| ConfigError {
            diagnostics: errs.iter().map(ToString::to_string).collect(),
        })?;
    for w in report.warnings() {
        tracing::warn!("{w}");
    }
    // Telemetry expressions are checked in every resource, located like load errors.
    let mut telemetry_errors = Vec::new();
    for (i, r) in report.resources.iter().enumerate() {
        if let mesh_core::config::AnyResource::Telemetry(t) = r {
            for e in mesh_telemetry::policy::check(t) {
                if let Some(d) = report.error_at(i, &e.path, e.message) {
                    telemetry_errors.push(d.to_string());
                }
            }
        }
    }
    if !telemetry_errors.is_empty() {
        return Err(ConfigError {
            diagnostics: telemetry_errors,
        });
    }
    if let (Listener::Mesh, Some(port)) = (listener, options.app_port) {
        let policies = config.authorization_policies_for(&workload.namespace, &workload.labels);
        for w in report.unserved_deny_ports(policies, &[port]) {
            tracing::warn!("{w}");
        }
    }
    Ok(config)
}

/// The routing of `config` for `options`, the endpoints of servers whose
/// PeerAuthentication (in `peer_auths`) is `DISABLE` on their port marked for plaintext:
/// auto-mTLS sends them none (SR-24).
pub(crate) fn routing(
    config: &MeshConfig,
    options: &CompileOptions,
    peer_auths: &PeerAuthentication,
) -> Result<Routing, Vec<mesh_routing::CompileError>> {
    let mut routing = Routing::compile(config, options)?;
    routing
        .registry
        .mark_plaintext_servers(|namespace, labels, port| {
            peer_auths.for_workload(namespace, labels).mode(port) == PeerAuthMode::Disable
        });
    Ok(routing)
}

/// Compiles `config` for `workload` on `listener`.
fn compile(
    config: &MeshConfig,
    workload: &Workload,
    listener: &Listener,
    jwks: &JwksCache,
) -> Result<Compiled, ConfigError> {
    let diagnostics = |errs: Vec<String>| ConfigError { diagnostics: errs };
    // What the workload's namespace may see (exportTo); a configuration from the
    // control plane holds only that already.
    let config = &config.exported_to(&workload.namespace);
    let options = CompileOptions {
        naming: Naming {
            namespace: workload.namespace.clone(),
            ..Naming::default()
        },
        listener: listener.clone(),
        trust_domain: workload.trust_domain.clone(),
        workload_labels: workload.labels.clone(),
    };
    let peer_auths = PeerAuthentication::from_config(config);
    let routing = routing(config, &options, &peer_auths)
        .map_err(|errs| diagnostics(errs.iter().map(ToString::to_string).collect()))?;
    let policies = PolicySet::from_config(config, &workload.namespace, &workload.labels)
        .map_err(|e| diagnostics(vec![e.to_string()]))?;
    let authn = Authenticator::from_config(config, &workload.namespace, &workload.labels, jwks)
        .map_err(|e| diagnostics(vec![e.to_string()]))?;
    let peer_auth = peer_auths.for_workload(&workload.namespace, &workload.labels);
    // Sidecar resources apply to sidecars only (SR-33).
    let outbound_mode = match listener {
        Listener::Mesh => config
            .sidecar_for(
                &workload.namespace,
                &workload.labels,
                config.root_namespace(),
            )
            .and_then(|s| s.spec.outbound_traffic_policy.as_ref()?.mode)
            .map(|m| match m {
                mesh_core::config::OutboundMode::AllowAny => OutboundMode::AllowAny,
                mesh_core::config::OutboundMode::RegistryOnly => OutboundMode::RegistryOnly,
            }),
        Listener::Gateway { .. } => None,
    };
    let telemetries =
        mesh_core::config::telemetries_for(config, &workload.namespace, &workload.labels);
    let telemetry = if telemetries.is_empty() {
        None
    } else {
        let resources: Vec<_> = telemetries
            .iter()
            .map(|t| format!("Telemetry/{}/{}", t.metadata.namespace, t.metadata.name))
            .collect();
        Some(TelemetryPolicy::compile(telemetries).map_err(|errs| {
            diagnostics(
                errs.into_iter()
                    .map(|e| format!("{}: {}: {}", resources.join(", "), e.path, e.message))
                    .collect(),
            )
        })?)
    };
    Ok(Compiled {
        routing,
        policies,
        authn,
        peer_auth,
        outbound_mode,
        telemetry,
    })
}

/// The certificate store of `source`; what keeps it fresh goes into `keep`.
fn certificates(
    source: Certificates,
    workload: &Workload,
    keep: &mut Vec<Box<dyn Any + Send>>,
) -> Result<Arc<CertStore>, BuildError> {
    let err = |e: &dyn std::fmt::Display| BuildError::Certificate(e.to_string());
    Ok(match source {
        Certificates::Store(store) => store,
        Certificates::Dir(dir) => {
            let store = CertStore::load_dir(&dir).map_err(|e| err(&e))?;
            #[cfg(feature = "watch")]
            keep.push(Box::new(store.watch_dir(&dir).map_err(|e| err(&e))?));
            store
        }
        Certificates::Issuer { ca, lifetime } => {
            if ca.trust_domain() != workload.trust_domain {
                return Err(BuildError::Certificate(format!(
                    "the CA is for trust domain {}, the workload is in {}",
                    ca.trust_domain(),
                    workload.trust_domain
                )));
            }
            let mut issuer = BuiltInIssuer::new(ca, &workload.namespace, &workload.service_account);
            if let Some(l) = lifetime {
                issuer = issuer.with_ttl(l);
            }
            let store = CertStore::from_issuer(&issuer).map_err(|e| err(&e))?;
            keep.push(Box::new(store.spawn_issuer(issuer)));
            store
        }
    })
}

impl Mesh {
    /// A builder for `workload`.
    pub fn builder(workload: Workload) -> MeshBuilder {
        MeshBuilder {
            workload,
            listener: Listener::Mesh,
            sources: Vec::new(),
            config: None,
            certificates: None,
            telemetry: None,
            options: Options::default(),
        }
    }

    /// The `outboundTrafficPolicy.mode` in force: the workload's Sidecar resource's, else
    /// [`Options::outbound_mode`].
    pub fn outbound_mode(&self) -> OutboundMode {
        self.inner.outbound_policy.mode()
    }

    /// The outbound stack: send requests with an authority the configuration knows
    /// (`http://payment-service:8080/...`, or origin-form with a `Host`).
    pub fn outbound(&self) -> Outbound {
        let limits = &self.inner.options.limits;
        Outbound::new(
            &self.inner.router,
            &self.inner.telemetry,
            self.inner.outbound_policy.clone(),
            limits.connect_timeout.as_std(),
            limits.idle_timeout.as_std(),
        )
        .stream_limits(crate::stack::client::StreamLimits::of(limits))
    }

    /// Connections to the TCP port `port` of `host` (as routes name it: short,
    /// namespace-qualified or FQDN), routed by the VirtualService `tcp` routes of the
    /// host, else to the service's own TCP port, and proxied as opaque bytes
    /// ([`tcp`](crate::stack::tcp)). Each call to
    /// [`TcpOutbound::proxy`](crate::stack::tcp::TcpOutbound::proxy) takes one
    /// connection.
    pub fn tcp_outbound(&self, host: &str, port: u16) -> TcpOutbound {
        let qualified = self
            .inner
            .router
            .snapshot()
            .table()
            .naming()
            .qualify(host, &self.inner.workload.namespace);
        TcpOutbound::new(
            self.inner.router.router(),
            self.inner.telemetry.clone(),
            &qualified,
            port,
        )
    }

    /// TLS connections a gateway passes through on `port`, routed by the SNI of their
    /// ClientHello through the VirtualService `tls` routes bound to the gateway
    /// ([`TcpOutbound::proxy_tls`](crate::stack::tcp::TcpOutbound::proxy_tls)).
    pub fn tls_passthrough(&self, port: u16) -> TcpOutbound {
        TcpOutbound::new(
            self.inner.router.router(),
            self.inner.telemetry.clone(),
            "",
            port,
        )
    }

    /// Mesh TCP connections (those whose mTLS handshake chose the TCP ALPN protocols)
    /// proxied to the application at `app`, after the metadata exchange and
    /// AuthorizationPolicy on connection attributes.
    pub fn tcp_inbound(&self, app: SocketAddr) -> TcpInbound {
        TcpInbound::new(
            app,
            self.inner.telemetry.clone(),
            self.inner.authz.clone(),
            mesh_telemetry::DestinationService::from_host(&self.inner.workload.service_host()),
        )
    }

    /// The inbound stack around `app`: what reaches `app` was authorized by the
    /// AuthorizationPolicies in force and carries the caller's identity in its
    /// extensions (when it came through [`serve_inbound`](Self::serve_inbound) or
    /// [`inbound::per_connection`]).
    pub fn inbound<S, B>(&self, app: S) -> HttpService
    where
        S: Application<B>,
        B: ApplicationBody,
    {
        inbound::service(
            &self.inner.telemetry,
            &self.inner.workload.service_host(),
            self.inner.authz.clone(),
            self.inner.authn.clone(),
            self.inner.options.path_normalization,
            self.edge_headers(
                crate::stack::headers::ForwardClientCertDetails::SanitizeSet,
                false,
            ),
            app,
        )
    }

    /// Serves `app` behind the inbound stack on `listener`: each connection accepted
    /// per the PeerAuthentication mode in force for the listener's port (mTLS with the
    /// workload's certificate), HTTP/1.1 and h2, until [`shutdown`](Self::shutdown),
    /// then drained for `limits.drainTimeout`.
    pub fn serve_inbound<S, B>(&self, listener: TcpListener, app: S) -> tokio::task::JoinHandle<()>
    where
        S: Application<B>,
        B: ApplicationBody,
    {
        let port = listener.local_addr().map_or(0, |a| a.port());
        tokio::spawn(self.run_inbound(listener, self.inbound(app), port, None))
    }

    /// Serves `svc` on `listener`, accepting per the PeerAuthentication mode of
    /// `app_port`, until shutdown and drain. Each connection's destination port is
    /// `app_port` (what AuthorizationPolicy `ports` match), whatever port the listener
    /// has. Connections that chose the TCP ALPN protocols go to `tcp` (closed without
    /// one).
    pub(crate) fn run_inbound(
        &self,
        listener: TcpListener,
        svc: HttpService,
        app_port: u16,
        tcp: Option<TcpInbound>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let acceptor = InboundAcceptor::new(self.inner.store.clone())
            .with_handshake_timeout(self.inner.options.limits.header_read_timeout.as_std());
        let modes = self.inner.peer_auth.clone();
        let options = self.serve_options("inbound");
        serve::run(listener, options, move |tcp_stream, _remote| {
            let svc = svc.clone();
            let acceptor = acceptor.clone();
            let modes = modes.clone();
            let tcp_app = tcp.clone();
            async move {
                let (io, mut ctx) = inbound::accept(acceptor, modes, app_port, tcp_stream).await?;
                // The destination is the application (Istio's original destination),
                // not the sidecar's listener: AuthorizationPolicy `ports` and
                // `destination.port` match the application's port.
                ctx.info.local.set_port(app_port);
                if crate::stack::tcp::is_tcp(&ctx) {
                    if let Some(tcp_app) = tcp_app {
                        tokio::spawn(async move { tcp_app.proxy(io, ctx).await });
                    }
                    return None;
                }
                Some((io, inbound::per_connection(svc, ctx)))
            }
        })
    }

    /// How this mesh's listeners serve (limits, drain, shutdown token).
    pub(crate) fn serve_options(&self, listener: &str) -> serve::Options {
        let metrics = self.inner.telemetry.metrics().proxy();
        serve::Options::of(
            &self.inner.options.limits,
            self.inner.shutdown.clone(),
            metrics.active_connections(listener),
            metrics.downstream_cx(listener),
            metrics.downstream_cx_overflow(listener),
        )
    }

    /// Swaps in `config`, compiled for this workload, atomically: routes (destinations
    /// that remain keep their balancer, outlier and pool state), AuthorizationPolicies,
    /// PeerAuthentication. A rejected configuration changes nothing; both outcomes are
    /// counted (`mesh_config_reloads_total`, `mesh_config_reload_failures_total`).
    /// Returns the content version in force.
    pub fn update(&self, config: MeshConfig) -> Result<u64, ConfigError> {
        let version = config.version();
        if version == self.inner.active.load().version {
            return Ok(version);
        }
        let metrics = self.inner.telemetry.metrics().proxy();
        let compiled = match compile(
            &config,
            &self.inner.workload,
            &self.inner.listener,
            &self.inner.jwks,
        ) {
            Ok(c) => c,
            Err(e) => {
                metrics.config_reload_failed();
                for d in &e.diagnostics {
                    tracing::error!("configuration rejected: {d}");
                }
                return Err(e);
            }
        };
        self.inner.router.update(compiled.routing);
        self.inner.authz.store(compiled.policies);
        self.inner.authn.store(compiled.authn);
        self.inner.peer_auth.store(Arc::new(compiled.peer_auth));
        self.inner.outbound_policy.set(
            compiled
                .outbound_mode
                .unwrap_or(self.inner.options.outbound_mode),
        );
        self.inner.telemetry.set_policy(compiled.telemetry);
        for hook in self
            .inner
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            hook(&config);
        }
        self.inner.active.store(Arc::new(Active {
            version,
            loaded_at: SystemTime::now(),
            config: Arc::new(config),
        }));
        metrics.config_reloaded();
        tracing::info!(version = format!("{version:016x}"), "configuration updated");
        Ok(version)
    }

    /// Loads the configuration files again and [`update`](Self::update)s.
    pub fn reload(&self) -> Result<u64, ConfigError> {
        match load(
            &self.inner.sources,
            &self.inner.workload,
            &self.inner.listener,
            &self.inner.options,
        ) {
            Ok(config) => self.update(config),
            Err(e) => {
                self.inner
                    .telemetry
                    .metrics()
                    .proxy()
                    .config_reload_failed();
                for d in &e.diagnostics {
                    tracing::error!("configuration reload rejected: {d}");
                }
                Err(e)
            }
        }
    }

    /// Reloads whenever the configuration directories change (Kubernetes `..data`
    /// swaps included) or on SIGHUP, until [`shutdown`](Self::shutdown).
    #[cfg(feature = "watch")]
    pub fn watch(&self) -> Result<(), crate::watch::WatchError> {
        let (task, watcher) = crate::watch::spawn(self.clone(), self.inner.shutdown.clone())?;
        let mut keep = self.inner._keep.lock().unwrap_or_else(|e| e.into_inner());
        keep.push(Box::new(watcher));
        keep.push(Box::new(AbortOnDrop(task)));
        Ok(())
    }

    /// Applies each configuration `updates` brings (from `discovery`, see
    /// [`control::xds::subscribe`](crate::control::xds::subscribe)) with
    /// [`update`](Self::update), accepting or rejecting it with the diagnostics, until
    /// [`shutdown`](Self::shutdown). The returned channel holds the version of the last
    /// update applied (`None` before the first).
    #[cfg(feature = "xds")]
    pub fn follow(
        &self,
        mut updates: tokio::sync::mpsc::Receiver<crate::control::xds::Update>,
    ) -> tokio::sync::watch::Receiver<Option<String>> {
        let (applied, rx) = tokio::sync::watch::channel(None);
        let mesh = self.clone();
        let stop = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let update = tokio::select! {
                    () = stop.cancelled() => return,
                    update = updates.recv() => match update {
                        Some(update) => update,
                        None => return,
                    },
                };
                let crate::control::xds::Update {
                    version,
                    config,
                    verdict,
                } = update;
                match mesh.update(config) {
                    Ok(_) => {
                        verdict.accept();
                        applied.send_replace(Some(version));
                    }
                    Err(e) => verdict.reject(e.diagnostics.join("\n")),
                }
            }
        });
        rx
    }

    /// Runs `hook` with every configuration swapped in after this call.
    pub fn on_update(&self, hook: impl Fn(&MeshConfig) + Send + Sync + 'static) {
        self.inner
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(hook));
    }

    /// The gateway stack (for a mesh built with [`MeshBuilder::gateway`]): hosts that
    /// `redirect_hosts` covers are redirected to HTTPS, the rest routed by the
    /// Gateway's VirtualServices.
    pub fn gateway(&self, redirect_hosts: Arc<ArcSwap<Vec<String>>>) -> HttpService {
        crate::stack::gateway::service(
            &self.inner.router,
            &self.inner.telemetry,
            redirect_hosts,
            self.inner.authn.clone(),
            self.inner.authz.clone(),
            self.inner.options.path_normalization,
            self.edge_headers(self.inner.options.gateway_forward_client_cert, true),
        )
    }

    /// The header-trust settings of an edge of this mesh: the inbound listener
    /// (`gateway` false) or the gateway.
    fn edge_headers(
        &self,
        forward_client_cert: crate::stack::headers::ForwardClientCertDetails,
        gateway: bool,
    ) -> crate::stack::headers::EdgeHeaders {
        crate::stack::headers::EdgeHeaders {
            forward_client_cert,
            own_identity: self.inner.workload.identity().ok().map(|i| i.to_string()),
            append_forwarded_for: gateway,
            strip_response: gateway,
            extra_untrusted: self.inner.options.untrusted_headers.clone(),
            num_trusted_proxies: self.inner.options.num_trusted_proxies,
        }
    }

    /// Starts the graceful shutdown of what this mesh serves.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Cancelled when shutdown starts.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Metrics, latency percentiles, traces and access log of this workload.
    pub fn telemetry(&self) -> &Telemetry {
        &self.inner.telemetry
    }

    /// The workload certificate.
    pub fn certificates(&self) -> &Arc<CertStore> {
        &self.inner.store
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.inner.workload
    }

    /// The options.
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// The configuration in force.
    pub fn active(&self) -> Arc<ArcSwap<Active>> {
        self.inner.active.clone()
    }

    /// The live destinations (balancers, pools), for an admin view.
    pub fn destinations(&self) -> &Destinations {
        &self.inner.destinations
    }

    /// The router (the gateway routes with it).
    pub fn router(&self) -> &MeshRouter {
        &self.inner.router
    }

    /// The PeerAuthentication modes in force.
    pub fn peer_authentication(&self) -> Arc<ArcSwap<WorkloadPeerAuthentication>> {
        self.inner.peer_auth.clone()
    }

    /// The configuration files and directories this mesh reloads from.
    pub fn sources(&self) -> &[PathBuf] {
        &self.inner.sources
    }
}

/// Aborts a background task when dropped (the mesh's, or `discovery`'s).
#[cfg(feature = "watch")]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

#[cfg(feature = "watch")]
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
