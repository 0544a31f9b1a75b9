//! The sidecar's side of the `discovery` control plane: configuration over the xDS
//! transport ([`xds`]) and workload certificates by CSR ([`certificates`]).

pub mod certificates;
pub mod xds;
