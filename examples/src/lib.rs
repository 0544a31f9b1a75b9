//! Runnable programs built on the mesh crates: `sidecar`, the end-to-end demo of the
//! order-service / payment-service scenario, and `embedded`, the same layers used
//! in-process without a sidecar.
//!
//! The [`proxyless`] module is the composition both programs use: an inbound server and
//! an outbound client assembled from the layer crates and configured from Istio YAML.

pub mod demo;
pub mod embedded;
pub mod local;
pub mod proxyless;
pub mod scenario;
