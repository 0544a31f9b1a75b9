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
pub mod scenario;
