//! The mesh without a sidecar: the layer crates composed into an inbound server and an
//! outbound client that an application embeds, configured from Istio YAML.
//!
//! - [`inbound`]: mTLS accept per PeerAuthentication, telemetry, AuthorizationPolicy,
//!   then the application.
//! - [`outbound`]: telemetry, VirtualService routing, route deadline and retries,
//!   balancing with outlier detection, pooled mTLS connections per endpoint.
//! - [`convert`]: workload labels.
//! - [`connect`]: the per-endpoint client.

pub mod connect;
pub mod convert;
pub mod inbound;
pub mod outbound;

pub use inbound::{AppService, InboundPolicy, WorkloadId};
pub use outbound::{DestinationService, Outbound};
