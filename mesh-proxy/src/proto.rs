//! Code generated from the gRPC APIs under `proto/` (by `build.rs`, feature `xds`).
//!
//! - [`istio::v1::auth`]: Istio's certificate service (ISTIO.md CA-01), the server for
//!   `discovery` and the client for the sidecar.

/// Istio's APIs.
pub mod istio {
    /// Version 1.
    pub mod v1 {
        /// `istio.v1.auth`: the certificate signing service.
        #[allow(missing_docs, clippy::all, clippy::pedantic)]
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}
