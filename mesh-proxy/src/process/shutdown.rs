//! Graceful shutdown: the handle a started proxy returns, and the signals that stop it.
//!
//! [`ProxyHandle::shutdown`] (or SIGTERM/SIGINT in the binary) stops every listener
//! accepting at once, drains in-flight requests until the drain deadline, resets the
//! connections still open (see [`serve`](crate::serve) for what is finished and what is
//! cut), flushes the span export queue and the access log, and then
//! [`ProxyHandle::wait`] returns.
//!
//! A second SIGTERM or SIGINT during the drain ends the drain at once
//! ([`drain_unless_signalled`]): the binary then exits with status 1 without waiting for
//! the requests still in flight (their connections are reset by the kernel as the
//! process ends), as an operator who signals twice asks.

use std::net::SocketAddr;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A running proxy (sidecar or gateway).
pub struct ProxyHandle {
    pub(crate) token: CancellationToken,
    pub(crate) listeners: JoinSet<()>,
    pub(crate) background: Vec<tokio::task::JoinHandle<()>>,
    pub(crate) flush: Vec<futures_util::future::BoxFuture<'static, ()>>,
    pub(crate) keep: Vec<Box<dyn std::any::Any + Send>>,
    /// The addresses the listeners are bound to, by name (`inbound`, `outbound`,
    /// `admin`, `gateway:<port>`).
    pub addresses: Vec<(String, SocketAddr)>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("addresses", &self.addresses)
            .field("shutting_down", &self.token.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl ProxyHandle {
    /// The bound address of listener `name`.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.addresses
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// A token that is cancelled when shutdown starts.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Starts the graceful shutdown.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// Waits until every listener has drained, then flushes spans and logs.
    pub async fn wait(mut self) {
        while self.listeners.join_next().await.is_some() {}
        for f in self.flush.drain(..) {
            f.await;
        }
        for task in &self.background {
            task.abort();
        }
        drop(self.keep);
    }
}

/// Waits for `proxy` to drain (after [`ProxyHandle::shutdown`]) unless another SIGTERM
/// or SIGINT arrives first; returns whether the drain finished.
pub async fn drain_unless_signalled(proxy: ProxyHandle) -> bool {
    tokio::select! {
        () = proxy.wait() => true,
        () = signal() => {
            tracing::warn!("second signal during the drain: exiting at once");
            false
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
