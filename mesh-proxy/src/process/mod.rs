//! The process around the stacks (feature `proxy`): the sidecar and the gateway started
//! from [`Settings`](crate::Settings), written once in [`runtime`] (the [`Mesh`] built
//! from the settings, listeners, admin server, reload, drain order), and the handle of a
//! running proxy ([`shutdown`]). Nothing a request goes through is defined here: that
//! is [`crate::stack`].
//!
//! [`Mesh`]: crate::Mesh

pub mod admin;
pub mod gateway;
pub mod runtime;
pub mod shutdown;
pub mod sidecar;

pub use gateway::Gateway;
pub use runtime::StartError;
pub use shutdown::ProxyHandle;
pub use sidecar::Sidecar;
