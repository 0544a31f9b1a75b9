//! rustls certificate verifiers that accept only SPIFFE workload identities.
//!
//! [`SpiffeClientVerifier`] (server side) and [`SpiffeServerVerifier`] (client side)
//! first check the leaf with [`check_leaf`] (one x509-parser parse: one URI SAN, a
//! SPIFFE ID in a trusted domain, not a CA, key usage, EKU for the peer's role,
//! validity), then delegate chain building to webpki against the current
//! [`TrustBundle`], and the client side finally applies secure naming
//! ([`SecureNaming`]): the server's identity must be one the destination may have.
//!
//! The bundle is read through an [`ArcSwap`] on every handshake, so rotating the trust
//! bundle takes effect for the next handshake without rebuilding any config.
//!
//! # Session resumption
//!
//! A resumed TLS session skips certificate verification. If it were allowed, a
//! session established under an old trust bundle (or for another destination's
//! expected identities) would be accepted after the bundle changed (Envoy
//! CVE-2022-21654 class). The configs built by [`ServerTls`](crate::ServerTls) and
//! [`ClientTls`](crate::ClientTls) therefore **disable resumption** (no session cache,
//! no tickets on the server; `Resumption::disabled()` on the client): every connection
//! does a full handshake and runs these verifiers. Mesh connections are long-lived
//! and pooled, so the cost is one handshake per connection.
//!
//! # Errors
//!
//! A rejected certificate fails the handshake with
//! `rustls::Error::InvalidCertificate(CertificateError::Other(..))` carrying an
//! [`SvidError`] that says why; webpki's own errors (unknown issuer, bad signature)
//! pass through unchanged. [`svid_error`] digs the [`SvidError`] out of an I/O error
//! returned by tokio-rustls.
//!
//! # Example
//!
//! ```
//! use mesh_tls::{CertificateAuthority, verify::TrustBundle};
//!
//! let ca = CertificateAuthority::new("cluster.local").unwrap();
//! let bundle = TrustBundle::new(vec![ca.root_der().clone()], vec!["cluster.local".into()]).unwrap();
//! assert_eq!(bundle.roots().len(), 1);
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use mesh_core::Identity;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::svid::{PeerRole, SvidError, SvidLeaf, check_leaf};

/// The roots and trust domains a workload trusts.
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    trust_domains: Vec<String>,
    root_store: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .field("trust_domains", &self.trust_domains)
            .finish()
    }
}

/// Why a trust bundle cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// No root certificate.
    #[error("trust bundle has no root certificate")]
    Empty,
    /// A root could not be parsed as a trust anchor.
    #[error("trust bundle root is unusable: {0}")]
    Root(rustls::Error),
    /// webpki refused to build a verifier.
    #[error("cannot build a verifier from the trust bundle: {0}")]
    Verifier(String),
}

impl TrustBundle {
    /// Builds a bundle from root certificates (several during a CA rotation: old and
    /// new are both trusted) and the trust domains whose SPIFFE IDs are accepted.
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        trust_domains: Vec<String>,
    ) -> Result<Self, BundleError> {
        Self::with_provider(roots, trust_domains, &crate::provider())
    }

    /// [`new`](Self::new) with an explicit crypto provider.
    pub fn with_provider(
        roots: Vec<CertificateDer<'static>>,
        trust_domains: Vec<String>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let mut store = RootCertStore::empty();
        for root in &roots {
            store.add(root.clone()).map_err(BundleError::Root)?;
        }
        let root_store = Arc::new(store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(root_store.clone(), provider.clone())
                .build()
                .map_err(|e| BundleError::Verifier(e.to_string()))?;
        Ok(Self {
            roots,
            trust_domains,
            root_store,
            client_verifier,
        })
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trusted trust domains.
    pub fn trust_domains(&self) -> &[String] {
        &self.trust_domains
    }

    /// Checks a client certificate chain: SPIFFE rules, then the chain against the roots.
    pub fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SvidLeaf, rustls::Error> {
        let leaf = check_leaf(end_entity, PeerRole::Client, &self.trust_domains, Some(now))
            .map_err(reject)?;
        self.client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        Ok(leaf)
    }

    /// Checks a server certificate chain: SPIFFE rules, then the chain against the
    /// roots. Names are not checked here (see [`SecureNaming`]).
    pub fn verify_server(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        provider: &CryptoProvider,
    ) -> Result<SvidLeaf, rustls::Error> {
        let leaf = check_leaf(end_entity, PeerRole::Server, &self.trust_domains, Some(now))
            .map_err(reject)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.root_store,
            intermediates,
            now,
            provider.signature_verification_algorithms.all,
        )?;
        Ok(leaf)
    }
}

/// Turns an [`SvidError`] into the rustls error that fails the handshake.
pub fn reject(err: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Finds the [`SvidError`] that failed a handshake, looking through I/O errors
/// (tokio-rustls), rustls errors and `source()` chains.
pub fn svid_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a SvidError> {
    if let Some(e) = err.downcast_ref::<SvidError>() {
        return Some(e);
    }
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
        err.downcast_ref::<rustls::Error>()
    {
        let inner: &(dyn StdError + 'static) = &*other.0;
        return svid_error(inner);
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
    {
        let inner: &(dyn StdError + 'static) = inner;
        return svid_error(inner);
    }
    err.source().and_then(svid_error)
}

/// A handshake error in words: the [`SvidError`] when there is one (rustls shows it
/// only as `Other(..)`), otherwise the error itself.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    match svid_error(err) {
        Some(reason) => format!("invalid peer certificate: {reason}"),
        None => err.to_string(),
    }
}

/// A failed TLS handshake whose message says why in words (see [`describe`]); the
/// original error is its `source()`.
#[derive(Debug)]
pub struct HandshakeError(pub std::io::Error);

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS handshake failed: {}", describe(&self.0))
    }
}

impl StdError for HandshakeError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// Finds the rustls error that failed a handshake inside an I/O error or a `source()` chain.
pub fn rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    if let Some(e) = err.downcast_ref::<rustls::Error>() {
        return Some(e);
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
    {
        let inner: &(dyn StdError + 'static) = inner;
        return rustls_error(inner);
    }
    err.source().and_then(rustls_error)
}

/// Where a verifier leaves the peer it accepted, so the accept or connect path reads
/// the identity without parsing the certificate again. One per connection.
#[derive(Clone, Debug, Default)]
pub struct PeerSlot(Arc<OnceLock<SvidLeaf>>);

impl PeerSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The verified peer, once the handshake has verified it.
    pub fn get(&self) -> Option<&SvidLeaf> {
        self.0.get()
    }

    fn set(&self, leaf: SvidLeaf) {
        // A handshake verifies the peer once; a second value would be a rustls bug, and
        // keeping the first is the safe choice.
        let _ = self.0.set(leaf);
    }
}

/// Which server identities a client accepts for a destination (secure naming).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecureNaming {
    /// Any workload identity in a trusted domain.
    AnyTrusted,
    /// Only these identities (the destination's service accounts).
    OneOf(Arc<[Identity]>),
}

impl SecureNaming {
    /// Accept exactly one identity.
    pub fn only(identity: Identity) -> Self {
        Self::OneOf(Arc::from(vec![identity]))
    }

    /// Checks the server's identity.
    pub fn check(&self, got: &Identity) -> Result<(), SvidError> {
        match self {
            Self::AnyTrusted => Ok(()),
            Self::OneOf(ids) if ids.contains(got) => Ok(()),
            Self::OneOf(ids) => Err(SvidError::UnexpectedServer {
                got: got.clone(),
                expected: ids
                    .iter()
                    .map(Identity::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// Server-side verifier of client certificates: SPIFFE-checked, chained to the current
/// trust bundle; mandatory unless built [`optional`](Self::optional).
#[derive(Clone)]
pub struct SpiffeClientVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    provider: Arc<CryptoProvider>,
    slot: Option<PeerSlot>,
    mandatory: bool,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("bundle", &self.bundle.load())
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// A verifier reading the bundle from `bundle` on every handshake.
    pub fn new(bundle: Arc<ArcSwap<TrustBundle>>, provider: Arc<CryptoProvider>) -> Self {
        Self {
            bundle,
            provider,
            slot: None,
            mandatory: true,
        }
    }

    /// The same verifier, also accepting clients that present no certificate (a
    /// certificate that is presented must still be valid). For servers that
    /// authenticate some callers another way, as the certificate service does with
    /// Kubernetes tokens.
    #[must_use]
    pub fn optional(&self) -> Self {
        Self {
            mandatory: false,
            ..self.clone()
        }
    }

    /// The same verifier, recording the accepted peer into `slot`.
    #[must_use]
    pub fn recording(&self, slot: PeerSlot) -> Self {
        Self {
            slot: Some(slot),
            ..self.clone()
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle lives behind an ArcSwap and cannot be borrowed for the handshake;
        // hints are optional and clients with one SVID send it regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let leaf = self
            .bundle
            .load()
            .verify_client(end_entity, intermediates, now)?;
        if let Some(slot) = &self.slot {
            slot.set(leaf);
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client-side verifier of server certificates: SPIFFE-checked, chained to the current
/// trust bundle, and matched against the destination's expected identities.
#[derive(Clone)]
pub struct SpiffeServerVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    provider: Arc<CryptoProvider>,
    expected: SecureNaming,
    slot: Option<PeerSlot>,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("bundle", &self.bundle.load())
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// A verifier accepting servers named by `expected`.
    pub fn new(
        bundle: Arc<ArcSwap<TrustBundle>>,
        provider: Arc<CryptoProvider>,
        expected: SecureNaming,
    ) -> Self {
        Self {
            bundle,
            provider,
            expected,
            slot: None,
        }
    }

    /// The same verifier, recording the accepted server into `slot`.
    #[must_use]
    pub fn recording(&self, slot: PeerSlot) -> Self {
        Self {
            slot: Some(slot),
            ..self.clone()
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server name (SNI) is not an identity in the mesh: secure naming checks
        // the SPIFFE ID instead of DNS names.
        let leaf =
            self.bundle
                .load()
                .verify_server(end_entity, intermediates, now, &self.provider)?;
        self.expected.check(&leaf.identity).map_err(reject)?;
        if let Some(slot) = &self.slot {
            slot.set(leaf);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CertificateAuthority;

    #[test]
    fn secure_naming_lists_what_was_expected() {
        let a = Identity::parse("spiffe://cluster.local/ns/p/sa/payment").unwrap();
        let b = Identity::parse("spiffe://cluster.local/ns/p/sa/evil").unwrap();
        let naming = SecureNaming::only(a.clone());
        assert!(naming.check(&a).is_ok());
        let err = naming.check(&b).unwrap_err();
        assert!(
            err.to_string()
                .contains("spiffe://cluster.local/ns/p/sa/payment")
        );
        assert!(SecureNaming::AnyTrusted.check(&b).is_ok());
    }

    #[test]
    fn svid_error_is_found_through_io_and_rustls_errors() {
        let err = reject(SvidError::MultipleUriSans(2));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
        assert!(matches!(
            svid_error(&io),
            Some(SvidError::MultipleUriSans(2))
        ));
        assert!(rustls_error(&io).is_some());
    }

    #[test]
    fn bundle_verifies_chain_and_rejects_foreign_issuer() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let other = CertificateAuthority::new("cluster.local").unwrap();
        let bundle =
            TrustBundle::new(vec![ca.root_der().clone()], vec!["cluster.local".into()]).unwrap();
        let good = ca.issue("ns", "sa").unwrap();
        let foreign = other.issue("ns", "sa").unwrap();
        let now = UnixTime::now();
        let leaf = bundle
            .verify_client(&good.chain_der()[0], &[], now)
            .unwrap();
        assert_eq!(leaf.identity, *good.identity());
        let err = bundle
            .verify_client(&foreign.chain_der()[0], &[], now)
            .unwrap_err();
        // Same subject name as our root, different key: webpki finds the "issuer" by
        // name and the signature does not verify.
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
        let provider = crate::provider();
        assert!(
            bundle
                .verify_server(&good.chain_der()[0], &[], now, &provider)
                .is_ok()
        );
    }

    #[test]
    fn empty_bundle_is_refused() {
        assert!(matches!(
            TrustBundle::new(vec![], vec![]),
            Err(BundleError::Empty)
        ));
    }
}
