//! The shared vocabulary of the mesh workspace.
//!
//! - [`Identity`]: a validated SPIFFE ID with Istio's accessors.
//! - [`ResponseFlags`]: Envoy's response flags (`UH`, `UO`, `UT`, …).
//! - [`error`]: [`BoxError`], [`is_caused_by`] and the leaf errors every layer recognises.
//! - [`Outcome`]: the one classification of an upstream outcome that retry, outlier
//!   detection and telemetry all read.
//! - [`extensions`]: facts one layer leaves for another in request/response extensions
//!   ([`PeerIdentity`], [`ConnectionSecurity`], response flags, [`UpstreamHost`]).
//! - [`body`]: body type aliases; [`Endpoint`]: an upstream instance with labels and identity.
//! - [`config`]: Istio's configuration resources (VirtualService, DestinationRule,
//!   PeerAuthentication, AuthorizationPolicy, Gateway, ServiceEntry), loaded from YAML
//!   with located errors and validated with Istio's rules.
//!
//! Nothing here depends on another crate of the workspace; the layer crates depend on this one.

pub mod body;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod extensions;
pub mod flags;
pub mod grpc;
pub mod identity;
pub mod outcome;

pub use body::BoxBody;
pub use endpoint::{
    Endpoint, Labels, Locality, NETWORK_LABEL, REGION_LABEL, SUBZONE_LABEL, TLS_MODE_LABEL,
    TlsMode, ZONE_LABEL,
};
pub use error::{BoxError, find_cause, is_caused_by};
pub use extensions::{AuthzDecision, DryRunDecision, MatchedPolicy};
pub use extensions::{
    ConnectionInfo, ConnectionSecurity, LocalReply, PeerIdentity, RoutedService, UpstreamHost,
    UpstreamPeerIdentity,
};
pub use flags::ResponseFlags;
pub use identity::{Identity, IdentityError};
pub use outcome::Outcome;
