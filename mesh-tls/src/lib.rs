//! Workload identity over mutual TLS.
//!
//! Every hop is encrypted and both ends know who the other is, with no change to the
//! application. This crate provides:
//!
//! - [`svid`]: loading Istio's SVID files (`cert-chain.pem`, `key.pem`,
//!   `root-cert.pem`) and reading a SPIFFE [`Identity`](mesh_core::Identity) out of a
//!   leaf certificate, with the SPIFFE X.509-SVID rules (one URI SAN, not a CA, key
//!   usage, EKU, trust domain, validity).
//! - [`verify`]: rustls verifiers that add those rules (and secure naming on the
//!   client side) on top of webpki's chain validation, reading the trust bundle
//!   through an `ArcSwap` so it can rotate.
//! - [`server`] / [`client`]: rustls configs (ring provider, TLS 1.3 and 1.2, ALPN
//!   `h2` + `http/1.1`, no session resumption), the inbound accept path that applies
//!   the PeerAuthentication mode and puts [`PeerIdentity`](mesh_core::PeerIdentity)
//!   and [`ConnectionSecurity`](mesh_core::ConnectionSecurity) into every request's
//!   extensions, and the outbound connectors ([`connect`]: Istio mTLS, TLS origination
//!   from DestinationRule `tls` ([`origin`]) or plaintext, per endpoint).
//! - [`server_options`]: the pieces of an Istio Gateway server's `tls` (revocation
//!   lists, cipher suites, protocol versions, client certificate pins and names, RSA
//!   and ECDSA certificates side by side) for a rustls server config.
//! - [`peer_auth`]: PeerAuthentication (STRICT / PERMISSIVE / DISABLE, mesh,
//!   namespace and workload scope, `portLevelMtls`) compiled once per snapshot.
//! - [`store`]: the certificate store behind the rustls resolvers, fed by a watched
//!   directory or the built-in issuer, with forced rotation.
//! - [`ca`]: a small certificate authority for development and tests.
//! - [`authn`]: the RequestAuthentication layer (JWT validation, key sets fetched and
//!   refreshed by the proxy, the validated token for authorization).
//! - [`authz`]: the AuthorizationPolicy layer (Istio's evaluation rules, path
//!   canonicalization safe against known bypasses).
//!
//! # Where we differ from Istio
//!
//! - TLS session resumption is disabled on both sides so that a trust-bundle change or
//!   a different destination can never be bypassed by a resumed session; every
//!   connection does a full handshake. Istio (Envoy) rotates ticket keys instead.
//! - Workload keys are ECDSA P-256 (Istio's ECC option); Istio's default is RSA 2048.
//! - The SPIFFE checks apply to server certificates too (clients reject a CA leaf or
//!   two URI SANs from a server), and secure naming compares SPIFFE IDs, never DNS
//!   names.
//! - PERMISSIVE treats every connection that opens with a TLS handshake record as an
//!   mTLS attempt (and requires a valid client SVID); Istio routes TLS without its
//!   `istio-peer-exchange`/`istio` ALPN to the plaintext filter chain as opaque TCP.
//! - STRICT refuses plaintext by peeking at the first byte (a TLS handshake record
//!   starts with `0x16`) and closing the connection, rather than failing a TLS parse.
//!
//! # Example
//!
//! ```
//! use mesh_tls::{CertificateAuthority, CertStore, ClientTls, ServerTls, SecureNaming};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let ca = CertificateAuthority::new("cluster.local").unwrap();
//! let server = ServerTls::new(CertStore::from_issued(&ca.issue("prod", "payment").unwrap()).unwrap());
//! let client = ClientTls::new(CertStore::from_issued(&ca.issue("prod", "orders").unwrap()).unwrap());
//!
//! let (a, b) = tokio::io::duplex(16 * 1024);
//! let expected = SecureNaming::only(server.store().identity());
//! let (accepted, connected) = tokio::join!(server.accept(a), client.connect(b, "payment", &expected));
//! assert_eq!(accepted.unwrap().1.identity.service_account(), Some("orders"));
//! assert_eq!(connected.unwrap().1.identity.service_account(), Some("payment"));
//! # }
//! ```

pub mod authn;
pub mod authz;
pub mod ca;
pub mod client;
pub mod connect;
pub mod origin;
pub mod peer_auth;
pub mod peer_auth_istio;
pub mod preface;
pub mod server;
pub mod server_options;
pub mod sni;
pub mod store;
pub mod svid;
pub mod verify;

use std::sync::Arc;

use rustls::SupportedProtocolVersion;
use rustls::crypto::CryptoProvider;

pub use authz::{AuthzLayer, PolicySet};
pub use ca::{CertificateAuthority, IssuedSvid, LeafSpec, SignedCsr, WorkloadKey};
pub use client::ClientTls;
pub use connect::{
    Alpn, ConnectionOpened, ConnectionRequests, InvalidServerName, Keepalive, UpstreamConn,
    UpstreamConnector, UpstreamSecurity,
};
pub use origin::{Origination, OriginationError};
pub use peer_auth::{
    MtlsMode, PeerAuthMode, PeerAuthentication, PeerAuthenticationPolicy,
    WorkloadPeerAuthentication,
};
pub use preface::{ProxyHeader, ProxyVersion, Tunnel, TunnelMethod};
pub use server::{
    AcceptError, AcceptedConnection, ConnectionContext, ConnectionExtensions,
    ConnectionExtensionsLayer, InboundAcceptor, MeshStream, PeerCertificateHash, ServerTls,
    serve_connection,
};
pub use server_options::{ByKeyType, CertificatePins, ClientChecks, ServerOptionError};
pub use store::{BuiltInIssuer, CertStore, SourceHandle, StoreError, StoreEvent};
pub use svid::{PeerRole, Serial, SvidError, SvidFiles, SvidLeaf};
pub use verify::{SecureNaming, TrustBundle, svid_error};

/// TLS versions the mesh speaks: 1.3 preferred, 1.2 allowed (Istio's minimum).
pub const PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// ALPN protocols offered and accepted, in preference order.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// ALPN protocols of TCP between sidecars (ISTIO.md PS-13): `istio-peer-exchange` (the
/// TCP metadata exchange follows the handshake), then `istio`.
pub const TCP_ALPN: &[&[u8]] = &[b"istio-peer-exchange", b"istio"];

/// What the inbound mTLS server accepts: HTTP ([`ALPN`]) first, then TCP
/// ([`TCP_ALPN`]); a client offering only TCP protocols gets a TCP connection.
pub(crate) fn server_alpn() -> Vec<Vec<u8>> {
    ALPN.iter().chain(TCP_ALPN).map(|p| p.to_vec()).collect()
}

/// The crypto provider every config of this crate uses: rustls' ring provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
