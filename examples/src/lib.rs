//! Runnable programs built on the mesh crates: `sidecar`, the end-to-end demo of the
//! order-service / payment-service scenario, and `embedded`, the same stacks used
//! in-process without a sidecar ([`mesh_proxy::Mesh`]; this crate composes nothing of
//! its own).
//!
//! - [`embedded`]: the embedded scenario behind the `embedded` program.
//! - [`demo`]: the story the `sidecar` program tells, with `mesh-proxy` sidecars and an
//!   ingress gateway started in-process ([`mesh_proxy::Sidecar`], [`mesh_proxy::Gateway`]).
//! - [`scenario`]: a development CA writing Istio's SVID files, service replicas, and
//!   the generated ServiceEntry that places them on loopback.
//!
//! # Where the demo differs from a deployment
//!
//! - All proxies and applications run in one process on 127.0.0.1; each proxy still
//!   has its own listeners, certificate, outlier detectors and telemetry, every hop is
//!   a real connection, and the demo reads what it reports from the admin servers.
//! - Endpoints come from one generated ServiceEntry (the only YAML the demo adds to the
//!   article's), since there is no Kubernetes to discover them.
//! - The article's resources carry no namespace; the demo loads them as `production`,
//!   and runs the ingress gateway in `production` too, so its Gateway and
//!   VirtualServices are found where the gateway looks for them.
//!
//! # Embedding the mesh
//!
//! The README's example: payment-service's own handler behind the mesh's inbound stack
//! and order-service calling it through the outbound stack, both in-process, from the
//! Istio YAML of `examples/embedded/config/` (STRICT mTLS, the article's
//! AuthorizationPolicy, retries under a 5 s deadline, outlier detection, 90/10 subsets,
//! connection-pool limits) plus a ServiceEntry placing the replicas.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let dir = tempfile::tempdir()?;
//! # let ca = std::sync::Arc::new(mesh_tls::CertificateAuthority::new("cluster.local")?);
//! # let (l1, l2) = (tokio::net::TcpListener::bind("127.0.0.1:0").await?, tokio::net::TcpListener::bind("127.0.0.1:0").await?);
//! # let istio = examples::scenario::doc_config(dir.path(), &[("v1", l1.local_addr()?), ("v2", l2.local_addr()?)])?;
//! use http::{Request, Response};
//! use mesh_core::body;
//! use mesh_proxy::{Certificates, Mesh, Workload};
//! use tower::{ServiceExt, service_fn};
//!
//! let certificates = Certificates::Issuer { ca, lifetime: None }; // or Certificates::Dir("/etc/certs")
//! let workload = |sa: &str| Workload::new("production", sa).label("app", sa);
//!
//! // payment-service v1 and v2: a handler behind mTLS, AuthorizationPolicy and metrics.
//! let handler = service_fn(|_req: Request<body::BoxBody>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(body::full("paid")))
//! });
//! for (version, listener) in [("v1", l1), ("v2", l2)] {
//!     let payment = Mesh::builder(workload("payment-service").label("version", version))
//!         .config_dir(&istio)
//!         .certificates(certificates.clone())
//!         .build()?;
//!     payment.serve_inbound(listener, handler.clone());
//! }
//!
//! // order-service: routing, deadline, retries, pool limits, outlier-aware balancing and
//! // mTLS as one tower Service.
//! let order = Mesh::builder(workload("order-service"))
//!     .config_dir(&istio)
//!     .certificates(certificates)
//!     .build()?;
//! let client = order.outbound();
//! for (method, status) in [("POST", 200), ("GET", 403)] {
//!     let req = Request::builder().method(method).uri("http://payment-service:8080/api/v1/payments");
//!     let res = client.clone().oneshot(req.body(body::empty())?).await?;
//!     assert_eq!(res.status(), status);
//! }
//! assert!(order.telemetry().encode_metrics().contains("response_code=\"403\""));
//! # Ok(())
//! # }
//! ```

pub mod demo;
pub mod embedded;
pub mod graph;
pub mod scenario;
