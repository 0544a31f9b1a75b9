//! `mesh-proxy`: the mesh composed, as a library you embed whole and as a thin sidecar
//! and ingress-gateway binary.
//!
//! # What it holds
//!
//! ```text
//!                 ┌──────────────────────── the stack (library) ─────────────────────────┐
//!  application →  │ Mesh::outbound  sanitize → telemetry(source) → respond → router       │ → network
//!                 │   → per route: deadline → retry → per destination: pool limits        │
//!                 │   → balancer (outlier detection) → per endpoint: mTLS/TLS/plain HTTP  │
//!  network     →  │ Mesh::inbound   mTLS accept per PeerAuthentication → identity         │ → application
//!                 │   → sanitize → telemetry(destination) → respond → AuthorizationPolicy │
//!                 └───────────────────────────────────────────────────────────────────────┘
//!                 ┌──────────────────────── the process (binary) ────────────────────────┐
//!                 │ settings → Mesh → listeners (serve) · admin server · reload · drain   │
//!                 └───────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! - [`Mesh`] ([`mesh`]): one workload's mesh, built from Istio YAML, a [`Workload`] and
//!   [`Certificates`]; hands out the stacks, reloads configuration and certificates,
//!   drains on shutdown. This is what an application embeds.
//! - [`stack`]: the stacks themselves ([`stack::outbound`], [`stack::inbound`],
//!   [`stack::destination`]), the one HTTP client ([`stack::client`]) and header
//!   handling ([`stack::headers`]); every layer in them comes from a behaviour crate
//!   (`mesh-tls`, `mesh-resilience`, `mesh-routing`, `mesh-telemetry`).
//! - [`respond`]: the one error → Istio local reply mapping.
//! - [`serve`]: the accept loop and hyper server shared by every listener, with limits,
//!   idle timeout and graceful drain; [`watch`]: configuration reload on file changes.
//! - [`process`] (feature `proxy`, on by default): [`Sidecar`] and [`Gateway`] start
//!   from [`Settings`] and share [`process::runtime`] (admin server, reload, drain
//!   order); [`ProxyHandle`] stops them. `main.rs` only parses the command line.
//!
//! Crate arrows point one way: `mesh-core` ← the four behaviour crates ← `mesh-proxy`
//! ← `examples`, `benches`.
//!
//! # Features
//!
//! - `watch` (default): reload configuration and SVID directories when their files
//!   change (the `notify` crate).
//! - `proxy` (default, implies `watch`): the sidecar and gateway processes, the admin
//!   server and the command line. An embedder that turns default features off gets
//!   neither CLI, file-watching nor admin-server code in its dependency graph.
//!
//! # Embedding
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use http::{Request, Response};
//! use mesh_core::body;
//! use mesh_proxy::{Certificates, Mesh, Workload};
//! use tower::{ServiceExt, service_fn};
//!
//! let payment = Mesh::builder(Workload::new("production", "payment-service").label("app", "payment-service"))
//!     .config_dir("istio/")
//!     .certificates(Certificates::Dir("/etc/certs".into()))
//!     .build()?;
//! let app = service_fn(|_req: Request<body::BoxBody>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(body::full("paid")))
//! });
//! let server = payment.serve_inbound(tokio::net::TcpListener::bind("0.0.0.0:8080").await?, app);
//! payment.shutdown();
//! server.await?;
//! # Ok(()) }
//! ```
//!
//! # Choices that differ from Istio
//!
//! - Outbound metrics (`reporter="source"`) name the destination service (the FQDN of
//!   the virtual host the request selects); hosts outside the route table are recorded
//!   by authority, bounded.
//! - `REGISTRY_ONLY` answers 502 with flag `NR` for hosts the route table does not know.
//! - Only WebSocket upgrades are forwarded (over an HTTP/1.1 mTLS connection between
//!   the sidecars, since h2 cannot carry them); other `Upgrade` values, `h2c` included,
//!   are removed. Only a `101` answer switches protocols; upgrades are not retried.
//! - The h2 connection between sidecars is chosen by ALPN whatever `h2UpgradePolicy`
//!   says; plaintext and TLS-originated upstreams get HTTP/1.1.
//! - Upstream TLS ([`stack::upstream`]): `SIMPLE`/`MUTUAL` need `caCertificates` (no
//!   system trust store), take SNI and the automatic SAN check from the destination
//!   host rather than the request's authority, and read `credentialName` only where
//!   [`mesh::Options::credentials_dir`] is set (the gateway's `gateway.credentialsDir`;
//!   sidecars use the certificate files, as Istio's do without a `workloadSelector`)
//!   (ISTIO.md §8.12, DR-51..DR-54, SR-23..SR-25).

#[cfg(feature = "proxy")]
pub mod capture;
#[cfg(feature = "xds")]
pub mod control;
pub mod credentials;
#[cfg(feature = "discovery")]
pub mod discovery;
pub mod explain;
#[cfg(feature = "discovery")]
pub mod inject;
pub mod mesh;
#[cfg(feature = "proxy")]
pub mod process;
#[cfg(feature = "xds")]
pub mod proto;
pub mod respond;
pub mod serve;
pub mod settings;
pub mod sniff;
pub mod stack;
#[cfg(feature = "watch")]
pub mod watch;

pub use mesh::{BuildError, Certificates, ConfigError, Mesh, MeshBuilder, Options, Workload};
#[cfg(feature = "proxy")]
pub use process::{Gateway, ProxyHandle, Sidecar, StartError};
pub use settings::Settings;
pub use stack::{Outbound, OutboundMode};
