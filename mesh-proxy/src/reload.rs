//! Hot reload of the Istio configuration directory.
//!
//! # Behaviour
//!
//! The directory is watched (the directory itself, so Kubernetes' atomic `..data`
//! symlink swaps are seen) and SIGHUP also triggers a reload. A burst of file events is
//! debounced. A reload loads and validates the whole directory and compiles everything
//! the proxy needs (routes, registry, DestinationRules, AuthorizationPolicies,
//! PeerAuthentication); only when all of it succeeds is it swapped in, atomically per
//! table. A failed reload changes nothing: every error is logged with `file:line:col`,
//! `mesh_config_reload_failures_total` is incremented, and `/config_dump` keeps showing
//! the active version. Requests in flight finish on the snapshot they started with; the
//! router keeps destination services (outlier state, connection pools) of destinations
//! that still exist.
//!
//! Warnings of a load are logged, including one for each AuthorizationPolicy `DENY`
//! rule of this workload whose `to.operation.ports` names a port other than the
//! application's (`listeners.app`): it never matches (ISTIO.md AP-48).
//!
//! `mesh_config_generation` (a gauge on `/metrics`) tells which configuration is in
//! force: 1 for the one loaded at start, one more for each applied reload; a rejected
//! reload, or one whose content is unchanged, leaves it. It plays the part of the
//! `version` gauge of an Envoy xDS subscription (`lds.version`, `cds.version`), which
//! holds a hash of the last applied update; a small counter is used instead because a
//! 64-bit hash does not survive Prometheus' float samples. The content hash itself is
//! the `version` of `/config_dump` (ISTIO.md TM-08).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_routing::{CompileOptions, Listener, Naming, Routing};
use mesh_telemetry::ProxyMetrics;
use mesh_tls::authz::{PolicyHandle, PolicySet};
use mesh_tls::{PeerAuthentication, WorkloadPeerAuthentication};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::outbound::MeshRouter;
use crate::settings::Settings;

/// Debounce for bursts of file events.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The configuration that is active.
#[derive(Debug)]
pub struct Active {
    /// Content hash of the loaded documents.
    pub version: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// The validated configuration.
    pub config: Arc<MeshConfig>,
}

/// Everything compiled from one load.
pub struct Compiled {
    /// The configuration.
    pub config: Arc<MeshConfig>,
    /// Routes of the listener.
    pub routing: Routing,
    /// AuthorizationPolicies for this workload.
    pub policies: PolicySet,
    /// PeerAuthentication modes for this workload.
    pub peer_auth: WorkloadPeerAuthentication,
}

/// Loads and compiles the configuration for `listener`; every problem is a line of
/// text naming where it is.
pub fn compile(settings: &Settings, listener: &Listener) -> Result<Compiled, Vec<String>> {
    let dir = settings.resolve(&settings.config_dir);
    let options = LoadOptions {
        default_namespace: settings.workload.namespace.clone(),
        ..LoadOptions::default()
    };
    let (config, report) = MeshConfig::load(&[dir], &options)
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    for w in report.warnings() {
        tracing::warn!("{w}");
    }
    for w in unserved_port_warnings(settings, listener, &config, &report) {
        tracing::warn!("{w}");
    }
    let compile_options = CompileOptions {
        naming: Naming {
            namespace: settings.workload.namespace.clone(),
            ..Naming::default()
        },
        listener: listener.clone(),
        trust_domain: settings.trust_domain.clone(),
        workload_labels: settings.workload.labels.clone(),
    };
    let routing = Routing::compile(&config, &compile_options)
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let policies = PolicySet::from_config(
        &config,
        &settings.workload.namespace,
        &settings.workload.labels,
    )
    .map_err(|e| vec![e.to_string()])?;
    let peer_auth = PeerAuthentication::from_config(&config)
        .for_workload(&settings.workload.namespace, &settings.workload.labels);
    Ok(Compiled {
        config: Arc::new(config),
        routing,
        policies,
        peer_auth,
    })
}

/// The DENY rules of this workload's AuthorizationPolicies that name a port other than
/// its application port: they never match. The gateway's stack has no authorization
/// layer, so it has nothing to check.
fn unserved_port_warnings(
    settings: &Settings,
    listener: &Listener,
    config: &MeshConfig,
    report: &mesh_core::config::LoadReport,
) -> Vec<mesh_core::config::Diagnostic> {
    if !matches!(listener, Listener::Mesh) {
        return Vec::new();
    }
    let policies =
        config.authorization_policies_for(&settings.workload.namespace, &settings.workload.labels);
    report.unserved_deny_ports(policies, &[settings.listeners.app.port()])
}

/// The swappable state a reload updates.
#[derive(Clone)]
pub struct Reloadable {
    /// The settings.
    pub settings: Arc<Settings>,
    /// The listener the routes are compiled for.
    pub listener: Listener,
    /// Routes.
    pub router: MeshRouter,
    /// AuthorizationPolicies.
    pub authz: PolicyHandle,
    /// PeerAuthentication modes.
    pub peer_auth: Arc<ArcSwap<WorkloadPeerAuthentication>>,
    /// The active configuration, for `/config_dump`.
    pub active: Arc<ArcSwap<Active>>,
    /// `mesh_config_reloads_total` and `mesh_config_reload_failures_total`.
    pub metrics: ProxyMetrics,
    /// Run after a successful swap (the gateway re-plans its servers).
    pub on_swap: SwapHook,
}

/// A function run with the new configuration after a successful reload.
pub type SwapHook = Arc<std::sync::Mutex<Option<Box<dyn Fn(&MeshConfig) + Send + Sync>>>>;

impl Reloadable {
    /// Loads, validates and compiles the directory; swaps it in only if all succeeded.
    pub fn reload(&self) -> Result<u64, Vec<String>> {
        match compile(&self.settings, &self.listener) {
            Ok(c) => {
                let version = c.config.version();
                if version == self.active.load().version {
                    return Ok(version);
                }
                self.router.update(c.routing);
                self.authz.store(c.policies);
                self.peer_auth.store(Arc::new(c.peer_auth));
                if let Some(hook) = &*self.on_swap.lock().unwrap_or_else(|e| e.into_inner()) {
                    hook(&c.config);
                }
                self.active.store(Arc::new(Active {
                    version,
                    loaded_at: SystemTime::now(),
                    config: c.config,
                }));
                self.metrics.config_reloaded();
                tracing::info!(
                    version = format!("{version:016x}"),
                    "configuration reloaded"
                );
                Ok(version)
            }
            Err(errors) => {
                self.metrics.config_reload_failed();
                for e in &errors {
                    tracing::error!("configuration reload rejected: {e}");
                }
                Err(errors)
            }
        }
    }
}

/// Watches `dir` and SIGHUP, reloading until `stop`.
pub fn spawn_watch(
    reloadable: Reloadable,
    dir: PathBuf,
    stop: CancellationToken,
) -> Result<(tokio::task::JoinHandle<()>, Box<dyn std::any::Any + Send>), notify::Error> {
    // From here the directory is followed; what was loaded at start is generation 1.
    reloadable.metrics.config_loaded();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watch_tx = tx.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) if !matches!(event.kind, EventKind::Access(_)) => {
                let _ = watch_tx.send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "configuration directory watch error"),
        })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    #[cfg(unix)]
    {
        let tx = tx.clone();
        let stop = stop.clone();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        got = hup.recv() => {
                            if got.is_none() { return; }
                            tracing::info!("SIGHUP: reloading configuration");
                            let _ = tx.send(());
                        }
                    }
                }
            });
        }
    }
    drop(tx);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = rx.recv() => {
                    if event.is_none() {
                        return;
                    }
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    let r = reloadable.clone();
                    // Loading reads files: keep it off the reactor threads.
                    let _ = tokio::task::spawn_blocking(move || r.reload()).await;
                }
            }
        }
    });
    Ok((task, Box::new(watcher)))
}

/// The directory a settings file's `configDir` names.
pub fn config_dir(settings: &Settings) -> PathBuf {
    settings.resolve(Path::new(&settings.config_dir))
}
