//! Runnable programs built on the mesh crates: `sidecar`, the end-to-end demo of the
//! order-service / payment-service scenario, and `embedded`, the same layers used
//! in-process without a sidecar.
