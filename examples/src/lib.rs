//! Runnable programs built on the mesh crates: `sidecar`, the end-to-end demo of the
//! order-service / payment-service scenario, and `embedded`, the same layers used
//! in-process without a sidecar.
//!
//! - [`proxyless`]: the layer crates composed into an inbound server (mTLS accept per
//!   PeerAuthentication, telemetry, AuthorizationPolicy) and an outbound client
//!   (telemetry, VirtualService routing, deadline, retries, balancing with outlier
//!   detection, pooled mTLS connections), configured from Istio YAML.
//! - [`embedded`]: the proxyless scenario behind the `embedded` program.
//! - [`local`]: a sidecar and an ingress gateway assembled in-process from [`proxyless`]
//!   for the loopback demo; [`demo`]: the story the `sidecar` program tells.
//! - [`scenario`]: a development CA writing Istio's SVID files, service replicas, and
//!   the generated ServiceEntry that places them on loopback.
//!
//! # Where the demo differs from a deployment
//!
//! - The demo's sidecars run in one process, built from [`proxyless`]; each still has
//!   its own certificate store, listeners, outlier detectors and telemetry, and every
//!   hop between them is a real mTLS connection on loopback.
//! - Endpoints come from one generated ServiceEntry (the only YAML the demo adds to the
//!   article's); a gateway reports `destination_service` by the request's authority.
//!
//! # Embedding a layer
//!
//! The README's example: AuthorizationPolicy and Istio metrics around an application
//! service, configured from YAML.
//!
//! ```
//! use std::collections::BTreeMap;
//! use http::{Request, Response};
//! use http_body_util::BodyExt;
//! use mesh_core::body;
//! use mesh_core::config::{LoadOptions, MeshConfig};
//! use mesh_telemetry::{DestinationService, Telemetry, TelemetryLayer, Workload};
//! use mesh_tls::{AuthzLayer, PolicySet};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let yaml = r#"
//! apiVersion: security.istio.io/v1
//! kind: AuthorizationPolicy
//! metadata: {name: payments, namespace: production}
//! spec:
//!   selector: {matchLabels: {app: payment-service}}
//!   rules: [{to: [{operation: {methods: ["POST"]}}]}]
//! "#;
//! let (config, _) = MeshConfig::from_yaml_str("authz.yaml", yaml, &LoadOptions::default())
//!     .map_err(|e| format!("{e:?}"))?;
//! let labels = BTreeMap::from([("app".to_owned(), "payment-service".to_owned())]);
//! let telemetry = Telemetry::builder(Workload::new("payment-service", "production")).build();
//! let host = DestinationService::from_host("payment-service.production.svc.cluster.local");
//!
//! let app = service_fn(|_req: Request<_>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(body::full("paid")))
//! });
//! let service = ServiceBuilder::new()
//!     .layer(TelemetryLayer::inbound(&telemetry, host))
//!     .layer(AuthzLayer::new(PolicySet::from_config(&config, "production", &labels)?))
//!     .service(app);
//!
//! for (method, status) in [("GET", 403), ("POST", 200)] {
//!     let req = Request::builder().method(method).uri("/api/v1/payments").body(body::empty())?;
//!     let res = service.clone().oneshot(req).await?;
//!     assert_eq!(res.status(), status);
//!     res.into_body().collect().await?; // metrics are recorded when the body ends
//! }
//! assert!(telemetry.encode_metrics().contains("response_code=\"403\""));
//! # Ok(())
//! # }
//! ```

pub mod demo;
pub mod embedded;
pub mod local;
pub mod proxyless;
pub mod scenario;
