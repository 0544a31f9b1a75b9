//! Reloading a [`Mesh`]'s configuration when its files change.
//!
//! # Behaviour
//!
//! Each configuration path is watched (a directory itself, so Kubernetes' atomic
//! `..data` symlink swaps are seen) and SIGHUP also triggers a reload. A burst of file
//! events is debounced. A reload loads and validates every file and compiles everything
//! the workload needs; only when all of it succeeds is it swapped in ([`Mesh::update`]).
//! A failed reload changes nothing: every error is logged with `file:line:col`,
//! `mesh_config_reload_failures_total` is incremented, and the configuration in force
//! stays. Requests in flight finish on the snapshot they started with.

use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Mesh;

/// Debounce for bursts of file events.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// The configuration paths could not be watched.
#[derive(Debug, thiserror::Error)]
#[error("watching the configuration: {0}")]
pub struct WatchError(#[from] notify::Error);

/// Watches `mesh`'s configuration paths and SIGHUP, reloading until `stop`; returns
/// the task and the watcher (which must be kept alive).
pub fn spawn(
    mesh: Mesh,
    stop: CancellationToken,
) -> Result<(tokio::task::JoinHandle<()>, notify::RecommendedWatcher), WatchError> {
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let watcher = watcher(mesh.sources(), RecursiveMode::NonRecursive, tx.clone())?;
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
    let task = on_change(rx, stop, move || {
        let _ = mesh.reload();
    });
    Ok((task, watcher))
}

/// A watcher of `paths` that sends on `tx` for every change (reads are not changes).
pub(crate) fn watcher(
    paths: &[std::path::PathBuf],
    mode: RecursiveMode,
    tx: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher, WatchError> {
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) if !matches!(event.kind, EventKind::Access(_)) => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        })?;
    for path in paths {
        watcher.watch(path, mode)?;
    }
    Ok(watcher)
}

/// Runs `apply` off the reactor threads (it reads files) after each burst of changes
/// arriving on `rx`, until `stop` or until every sender is gone.
pub(crate) fn on_change(
    mut rx: mpsc::UnboundedReceiver<()>,
    stop: CancellationToken,
    apply: impl Fn() + Clone + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = rx.recv() => {
                    if event.is_none() {
                        return;
                    }
                    while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    let _ = tokio::task::spawn_blocking(apply.clone()).await;
                }
            }
        }
    })
}
