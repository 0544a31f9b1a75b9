//! The outbound side: a rustls client config that presents the workload SVID and
//! accepts only the server identities expected for the destination (secure naming).
//!
//! [`ClientTls::connect`] builds a per-connection config whose verifier records the
//! server's identity as it verifies it, so the caller gets the server's SPIFFE ID
//! without parsing the certificate again. The client certificate comes from the
//! [`CertStore`] on every handshake, so rotation applies to new connections only.
//!
//! ALPN offers `h2` and `http/1.1`; TLS 1.3 and 1.2 with the ring provider;
//! resumption is disabled (see [`verify`](crate::verify) for why).
//!
//! # Layer placement
//!
//! Below the connection pool, per endpoint: `TCP connect -> ClientTls::connect -> hyper
//! client connection`. The destination's identities come from the endpoint
//! (`mesh_core::Endpoint::identities`).
//!
//! # Errors
//!
//! `connect` returns an I/O error wrapping a [`HandshakeError`] whose message says why
//! the server was refused; [`svid_error`](crate::verify::svid_error) finds the
//! [`SvidError`](crate::SvidError) (e.g. `UnexpectedServer` for a secure-naming mismatch).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<mesh_tls::CertStore>) -> std::io::Result<()> {
//! use mesh_tls::{ClientTls, SecureNaming};
//! use mesh_core::Identity;
//!
//! let client = ClientTls::new(store);
//! let tcp = tokio::net::TcpStream::connect("10.0.0.7:8080").await?;
//! let payment = Identity::parse("spiffe://cluster.local/ns/prod/sa/payment").unwrap();
//! let (tls, server) = client
//!     .connect(tcp, "payment.prod.svc", &SecureNaming::only(payment))
//!     .await?;
//! println!("talking to {}", server.identity);
//! # drop(tls); Ok(()) }
//! ```

use std::sync::Arc;

use rustls::ClientConfig;
use rustls::client::Resumption;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::store::CertStore;
use crate::svid::SvidLeaf;
use crate::verify::{HandshakeError, PeerSlot, SecureNaming, SpiffeServerVerifier};

/// Builds client configs for outbound mTLS from a [`CertStore`].
#[derive(Clone, Debug)]
pub struct ClientTls {
    store: Arc<CertStore>,
}

impl ClientTls {
    /// Client configs presenting `store`'s SVID and trusting its bundle.
    pub fn new(store: Arc<CertStore>) -> Self {
        Self { store }
    }

    /// The store.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    /// A client config accepting servers named by `expected`; if `slot` is given, the
    /// verified server is recorded in it.
    pub fn config(&self, expected: &SecureNaming, slot: Option<PeerSlot>) -> Arc<ClientConfig> {
        self.config_with_alpn(expected, slot, crate::ALPN)
    }

    /// Like [`config`](Self::config), offering `alpn` (for instance only `http/1.1` for a
    /// connection that will carry an HTTP Upgrade).
    pub fn config_with_alpn(
        &self,
        expected: &SecureNaming,
        slot: Option<PeerSlot>,
        alpn: &[&[u8]],
    ) -> Arc<ClientConfig> {
        let verifier = SpiffeServerVerifier::new(
            self.store.bundle_handle(),
            self.store.provider().clone(),
            expected.clone(),
        );
        let verifier = match slot {
            Some(slot) => verifier.recording(slot),
            None => verifier,
        };
        let mut config = ClientConfig::builder_with_provider(self.store.provider().clone())
            .with_protocol_versions(crate::PROTOCOL_VERSIONS)
            // The ring provider supports both versions; this cannot fail.
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(self.store.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = Resumption::disabled();
        Arc::new(config)
    }

    /// Performs the mTLS handshake over `io`, sending `server_name` as SNI, and returns
    /// the stream with the server's verified SVID.
    pub async fn connect<IO>(
        &self,
        io: IO,
        server_name: &str,
        expected: &SecureNaming,
    ) -> std::io::Result<(TlsStream<IO>, SvidLeaf)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        self.connect_to(io, name, expected, crate::ALPN).await
    }

    /// Like [`connect`](Self::connect) with a parsed server name and the ALPN protocols
    /// to offer.
    pub async fn connect_to<IO>(
        &self,
        io: IO,
        server_name: ServerName<'static>,
        expected: &SecureNaming,
        alpn: &[&[u8]],
    ) -> std::io::Result<(TlsStream<IO>, SvidLeaf)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name;
        let slot = PeerSlot::new();
        let config = self.config_with_alpn(expected, Some(slot.clone()), alpn);
        let stream = TlsConnector::from(config)
            .connect(name, io)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), HandshakeError(e)))?;
        let leaf = slot.get().cloned().ok_or_else(|| {
            std::io::Error::other("handshake completed without verifying the server")
        })?;
        Ok((stream, leaf))
    }
}
