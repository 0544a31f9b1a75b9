//! Workload identity over mutual TLS.
//!
//! This crate owns: loading SVIDs (`cert-chain.pem`, `key.pem`, `root-cert.pem`),
//! rustls server and client configurations that verify SPIFFE identities, extraction
//! of the peer identity into request extensions, `PeerAuthentication` modes (STRICT,
//! PERMISSIVE, DISABLE), a certificate store with rotation, a small certificate
//! authority for development and tests, and the `AuthorizationPolicy` layer.

pub mod authz;
