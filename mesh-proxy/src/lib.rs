//! `mesh-proxy`: the thin sidecar and ingress gateway composed from the mesh layers.
//!
//! The proxy adds only what a process needs: listeners, settings, configuration and
//! certificate reload, the admin server and graceful shutdown. Everything a request
//! goes through is a layer of another crate:
//!
//! - outbound (application → network): telemetry → router → deadline → retry → pool
//!   limits → balancer with outlier detection → mTLS to the peer sidecar;
//! - inbound (network → application): mTLS per PeerAuthentication → peer identity →
//!   telemetry → AuthorizationPolicy → application;
//! - gateway: TLS `SIMPLE`/`MUTUAL` per Gateway server (selected by SNI) → telemetry →
//!   router (VirtualServices bound to the gateway) → the outbound stack.
//!
//! Start a proxy in-process with [`Sidecar::start`] or [`Gateway::start`]; both return
//! a [`ProxyHandle`] with the bound addresses and the shutdown control. The binary
//! (`mesh-proxy sidecar --settings FILE`, `mesh-proxy gateway --settings FILE`) is a
//! thin wrapper that also handles SIGTERM/SIGINT. Its runtime has one worker thread per
//! CPU unless `--worker-threads N` (or `MESH_PROXY_WORKER_THREADS`) says otherwise.
//!
//! # Choices that differ from Istio
//!
//! - The access log is Envoy's default format without the peer identities (they are in
//!   the metrics' `source_principal`/`destination_principal` labels).
//! - Outbound metrics (`reporter="source"`) name the destination service (the FQDN of
//!   the virtual host the request selects) but not the destination workload or
//!   principal, which are known only after the balancer picked an endpoint; the
//!   destination's sidecar reports both principals (`reporter="destination"`). Hosts
//!   outside the route table are recorded by authority, bounded.
//! - `REGISTRY_ONLY` answers 502 with flag `NR` for hosts the route table does not know.
//! - Only WebSocket upgrades are forwarded (over an HTTP/1.1 mTLS connection between
//!   the sidecars, since h2 cannot carry them); other `Upgrade` values, `h2c` included,
//!   are removed. Only a `101` answer switches protocols; upgrades are not retried.
//! - The h2 connection between sidecars is chosen by ALPN whatever `h2UpgradePolicy`
//!   says.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_proxy::{Settings, Sidecar};
//! let settings = Settings::load(std::path::Path::new("sidecar.yaml")).map_err(|e| format!("{e:?}"))?;
//! let proxy = Sidecar::start(settings).await?;
//! println!("outbound on {:?}", proxy.address("outbound"));
//! proxy.shutdown();
//! proxy.wait().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod gateway;
pub mod inbound;
pub mod outbound;
pub mod reload;
pub mod respond;
pub mod runtime;
pub mod serve;
pub mod settings;
pub mod shutdown;
pub mod sidecar;

pub use gateway::Gateway;
pub use runtime::StartError;
pub use settings::Settings;
pub use shutdown::ProxyHandle;
pub use sidecar::Sidecar;
