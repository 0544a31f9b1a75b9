//! X.509-SVIDs: loading them from Istio's PEM files and reading a workload identity
//! out of a leaf certificate.
//!
//! [`check_leaf`] is the one place where a peer certificate is parsed (with
//! x509-parser). It is pure: bytes in, an [`SvidLeaf`] or an [`SvidError`] that says
//! why the certificate is not a workload identity. The verifiers in
//! [`verify`](crate::verify) call it once per handshake; nothing parses the
//! certificate again for the lifetime of the connection.
//!
//! A leaf is a valid workload identity (SPIFFE X.509-SVID §4, §5) only if:
//!
//! - it has exactly one URI SAN, and that URI is a valid `spiffe://` ID with a path;
//! - its trust domain is one of the trusted ones;
//! - it is not a CA (`basicConstraints cA=FALSE` or absent);
//! - its key usage extension is present with `digitalSignature`, without
//!   `keyCertSign` or `cRLSign`;
//! - its extended key usage, if present, includes `id-kp-clientAuth` when the peer
//!   is a client and `id-kp-serverAuth` when it is a server;
//! - `now` is within its validity period.
//!
//! Chain validation against the trust bundle is not done here; the verifiers delegate
//! it to webpki.
//!
//! # Files
//!
//! [`SvidFiles::load_dir`] reads Istio's file names from one directory:
//! [`CERT_CHAIN_FILE`] (leaf first, then intermediates), [`KEY_FILE`] and
//! [`ROOT_CERT_FILE`] (the trust bundle; several roots during a CA rotation).
//! [`SvidFiles::certified_key`] checks that the key matches the leaf before the
//! pair is used.
//!
//! # Errors
//!
//! [`SvidError`] names the rule a certificate breaks (`2 URI SANs`, `is a CA`,
//! `trust domain "other.local" ... not trusted`, `expired at ...`), or the file and
//! PEM problem when loading, or a key that does not match the certificate.
//!
//! # Example
//!
//! ```
//! use mesh_tls::{CertificateAuthority, svid::{check_leaf, PeerRole}};
//!
//! let ca = CertificateAuthority::new("cluster.local").unwrap();
//! let svid = ca.issue("production", "order-service").unwrap();
//! let leaf = check_leaf(svid.leaf_der(), PeerRole::Client, &["cluster.local"], None).unwrap();
//! assert_eq!(leaf.identity.as_str(), "spiffe://cluster.local/ns/production/sa/order-service");
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::{Identity, IdentityError};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Istio's file name for the workload certificate chain (leaf first).
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Istio's file name for the workload private key.
pub const KEY_FILE: &str = "key.pem";
/// Istio's file name for the trust bundle (one or more root certificates).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Which side of the handshake presented the certificate being checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// The peer is a TLS client: its EKU (if any) must allow `clientAuth`.
    Client,
    /// The peer is a TLS server: its EKU (if any) must allow `serverAuth`.
    Server,
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "id-kp-clientAuth",
            Self::Server => "id-kp-serverAuth",
        })
    }
}

/// A certificate serial number, shown as lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Serial(Arc<[u8]>);

impl Serial {
    /// The serial's big-endian bytes, as encoded in the certificate.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for Serial {
    fn from(bytes: &[u8]) -> Self {
        Self(Arc::from(bytes))
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.iter() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// What [`check_leaf`] learned from a valid workload certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvidLeaf {
    /// The SPIFFE ID of the workload.
    pub identity: Identity,
    /// The certificate's serial number.
    pub serial: Serial,
    /// Start of the validity period.
    pub not_before: SystemTime,
    /// End of the validity period.
    pub not_after: SystemTime,
}

/// Why a certificate is not a valid workload identity, or why SVID files cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The bytes are not a DER X.509 certificate, or an extension is malformed or repeated.
    #[error("certificate is not a well-formed X.509 certificate: {0}")]
    Malformed(String),
    /// No URI SAN.
    #[error("certificate has no URI SAN; a SPIFFE SVID has exactly one")]
    NoUriSan,
    /// More than one URI SAN (SPIFFE X.509-SVID §2: validators must reject it).
    #[error("certificate has {0} URI SANs; a SPIFFE SVID must have exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a SPIFFE ID.
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    NotSpiffe {
        /// The URI as found in the certificate.
        uri: String,
        /// What is wrong with it.
        source: IdentityError,
    },
    /// The SPIFFE ID has no path (a trust-domain ID names a CA, not a workload).
    #[error("SPIFFE ID {0} has no path; a workload SVID names a workload")]
    NoPath(Identity),
    /// The trust domain is not one this workload trusts.
    #[error("SPIFFE ID {0} is in trust domain {td:?}, which is not trusted", td = .0.trust_domain())]
    UntrustedDomain(Identity),
    /// `basicConstraints cA=TRUE` on a leaf.
    #[error("certificate is a CA (basicConstraints cA=TRUE); a workload SVID must not be")]
    IsCa,
    /// No key usage extension.
    #[error("certificate has no key usage extension; a workload SVID needs digitalSignature")]
    NoKeyUsage,
    /// Key usage without `digitalSignature`.
    #[error("certificate key usage lacks digitalSignature")]
    NoDigitalSignature,
    /// Key usage with `keyCertSign` or `cRLSign`.
    #[error("certificate key usage has keyCertSign or cRLSign; a workload SVID must not sign")]
    SigningKeyUsage,
    /// Extended key usage present but without the purpose the peer's role needs.
    #[error("certificate extended key usage lacks {0}")]
    ExtendedKeyUsage(PeerRole),
    /// `now` is after `notAfter`.
    #[error("certificate expired at {} (unix seconds)", unix_secs(.0))]
    Expired(SystemTime),
    /// `now` is before `notBefore`.
    #[error("certificate is not valid before {} (unix seconds)", unix_secs(.0))]
    NotYetValid(SystemTime),
    /// The server's identity is not one the destination may have (secure naming).
    #[error(
        "server identity {got} is not among the identities expected for this destination: {expected}"
    )]
    UnexpectedServer {
        /// What the server presented.
        got: Identity,
        /// What was expected, comma separated.
        expected: String,
    },
    /// Reading a PEM file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file has no usable item of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The private key does not belong to the leaf certificate, or cannot be loaded.
    #[error("private key does not match the certificate: {0}")]
    KeyMismatch(rustls::Error),
}

fn unix_secs(t: &SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks that `der` is a valid workload SVID for a peer in `role`, with a trust domain
/// among `trusted_domains`, and returns its identity.
///
/// `now` (if given) is checked against the validity period. Chain validation is the
/// caller's job (the verifiers delegate it to webpki).
pub fn check_leaf<T: AsRef<str>>(
    der: &[u8],
    role: PeerRole,
    trusted_domains: &[T],
    now: Option<UnixTime>,
) -> Result<SvidLeaf, SvidError> {
    check_leaf_with(
        der,
        role,
        |td| trusted_domains.iter().any(|t| t.as_ref() == td),
        now,
    )
}

/// [`check_leaf`] with a predicate deciding which trust domains are trusted.
pub fn check_leaf_with(
    der: &[u8],
    role: PeerRole,
    is_trusted: impl Fn(&str) -> bool,
    now: Option<UnixTime>,
) -> Result<SvidLeaf, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    let identity = spiffe_id(&cert)?;
    if !is_trusted(identity.trust_domain()) {
        return Err(SvidError::UntrustedDomain(identity));
    }
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed(e.to_string());
    if let Some(bc) = cert.basic_constraints().map_err(malformed)?
        && bc.value.ca
    {
        return Err(SvidError::IsCa);
    }
    let ku = cert
        .key_usage()
        .map_err(malformed)?
        .ok_or(SvidError::NoKeyUsage)?;
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidError::SigningKeyUsage);
    }
    if let Some(eku) = cert.extended_key_usage().map_err(malformed)? {
        let ok = eku.value.any
            || match role {
                PeerRole::Client => eku.value.client_auth,
                PeerRole::Server => eku.value.server_auth,
            };
        if !ok {
            return Err(SvidError::ExtendedKeyUsage(role));
        }
    }
    let validity = cert.validity();
    let not_before = to_system_time(validity.not_before.timestamp());
    let not_after = to_system_time(validity.not_after.timestamp());
    if let Some(now) = now {
        let now = UNIX_EPOCH + Duration::from_secs(now.as_secs());
        if now < not_before {
            return Err(SvidError::NotYetValid(not_before));
        }
        if now > not_after {
            return Err(SvidError::Expired(not_after));
        }
    }
    Ok(SvidLeaf {
        identity,
        serial: Serial::from(cert.raw_serial()),
        not_before,
        not_after,
    })
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs()),
    }
}

fn spiffe_id(cert: &X509Certificate<'_>) -> Result<Identity, SvidError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(e.to_string()))?
        .ok_or(SvidError::NoUriSan)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next().ok_or(SvidError::NoUriSan)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(SvidError::MultipleUriSans(extra + 1));
    }
    // `Identity::parse` allows only printable ASCII, so a SAN with an embedded NUL or
    // control byte is rejected here (Envoy CVE-2025-66220 class).
    let identity = Identity::parse(uri).map_err(|source| SvidError::NotSpiffe {
        uri: uri.escape_debug().to_string(),
        source,
    })?;
    if !identity.is_workload() {
        return Err(SvidError::NoPath(identity));
    }
    Ok(identity)
}

/// The three PEM files of an SVID as DER, read but not yet checked.
#[derive(Debug)]
pub struct SvidFiles {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The workload's private key.
    pub key: PrivateKeyDer<'static>,
    /// The trust bundle.
    pub roots: Vec<CertificateDer<'static>>,
}

impl SvidFiles {
    /// Reads `cert-chain.pem`, `key.pem` and `root-cert.pem` from `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, SvidError> {
        Ok(Self {
            chain: read_certs(&dir.join(CERT_CHAIN_FILE))?,
            key: read_key(&dir.join(KEY_FILE))?,
            roots: read_certs(&dir.join(ROOT_CERT_FILE))?,
        })
    }

    /// Parses the three files from PEM text.
    pub fn from_pem(chain: &str, key: &str, roots: &str) -> Result<Self, SvidError> {
        let pem_err = |what: &str, e: rustls_pki_types::pem::Error| SvidError::Pem {
            path: PathBuf::from(what),
            what: e.to_string(),
        };
        let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(CERT_CHAIN_FILE, e))?;
        let roots = CertificateDer::pem_slice_iter(roots.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(ROOT_CERT_FILE, e))?;
        let key =
            PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| pem_err(KEY_FILE, e))?;
        non_empty(&chain, Path::new(CERT_CHAIN_FILE))?;
        non_empty(&roots, Path::new(ROOT_CERT_FILE))?;
        Ok(Self { chain, key, roots })
    }

    /// Loads the key with `provider` and checks that it matches the leaf certificate.
    pub fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, SvidError> {
        CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), provider)
            .map_err(SvidError::KeyMismatch)
    }
}

fn non_empty(certs: &[CertificateDer<'_>], path: &Path) -> Result<(), SvidError> {
    if certs.is_empty() {
        return Err(SvidError::Pem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE block".into(),
        });
    }
    Ok(())
}

/// Reads every `CERTIFICATE` block of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SvidError> {
    let bytes = std::fs::read(path).map_err(|source| SvidError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Pem {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
    non_empty(&certs, path)?;
    Ok(certs)
}

/// Reads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, SvidError> {
    let bytes = std::fs::read(path).map_err(|source| SvidError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| SvidError::Pem {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertificateAuthority, LeafSpec};

    const TD: &[&str] = &["cluster.local"];

    fn ca() -> CertificateAuthority {
        CertificateAuthority::new("cluster.local").unwrap()
    }

    fn check(ca: &CertificateAuthority, spec: LeafSpec) -> Result<SvidLeaf, SvidError> {
        let svid = ca.issue_with(&spec).unwrap();
        check_leaf(svid.leaf_der(), PeerRole::Client, TD, Some(UnixTime::now()))
    }

    #[test]
    fn valid_workload_leaf_yields_its_identity_and_serial() {
        let ca = ca();
        let svid = ca.issue("production", "order-service").unwrap();
        let leaf =
            check_leaf(svid.leaf_der(), PeerRole::Server, TD, Some(UnixTime::now())).unwrap();
        assert_eq!(
            leaf.identity.as_str(),
            "spiffe://cluster.local/ns/production/sa/order-service"
        );
        assert_eq!(&leaf.serial, svid.serial());
        let life = leaf.not_after.duration_since(leaf.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn two_uri_sans_are_rejected() {
        let ca = ca();
        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.uri_sans
            .push("spiffe://cluster.local/ns/ns1/sa/b".into());
        assert!(matches!(
            check(&ca, spec),
            Err(SvidError::MultipleUriSans(2))
        ));
    }

    #[test]
    fn missing_uri_san_is_rejected_even_with_dns_names() {
        let ca = ca();
        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.uri_sans.clear();
        spec.dns_sans.push("a.ns1.svc".into());
        assert!(matches!(check(&ca, spec), Err(SvidError::NoUriSan)));
    }

    #[test]
    fn non_spiffe_and_pathless_uris_are_rejected() {
        let ca = ca();
        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.uri_sans = vec!["https://cluster.local/ns/ns1/sa/a".into()];
        let err = check(&ca, spec).unwrap_err();
        assert!(matches!(err, SvidError::NotSpiffe { .. }), "{err}");

        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.uri_sans = vec!["spiffe://cluster.local".into()];
        assert!(matches!(check(&ca, spec), Err(SvidError::NoPath(_))));
    }

    #[test]
    fn other_trust_domain_is_rejected_with_its_name() {
        let ca = ca();
        let spec = LeafSpec::workload("other.local", "ns1", "a");
        let err = check(&ca, spec).unwrap_err();
        assert!(matches!(err, SvidError::UntrustedDomain(_)));
        assert!(err.to_string().contains("\"other.local\""), "{err}");
    }

    #[test]
    fn ca_leaf_and_signing_key_usage_are_rejected() {
        let ca = ca();
        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.is_ca = true;
        assert!(matches!(check(&ca, spec), Err(SvidError::IsCa)));

        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.key_usages.push(rcgen::KeyUsagePurpose::KeyCertSign);
        assert!(matches!(check(&ca, spec), Err(SvidError::SigningKeyUsage)));

        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment];
        assert!(matches!(
            check(&ca, spec),
            Err(SvidError::NoDigitalSignature)
        ));

        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.key_usages.clear();
        assert!(matches!(check(&ca, spec), Err(SvidError::NoKeyUsage)));
    }

    #[test]
    fn extended_key_usage_must_fit_the_role() {
        let ca = ca();
        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::EmailProtection];
        assert!(matches!(
            check(&ca, spec),
            Err(SvidError::ExtendedKeyUsage(PeerRole::Client))
        ));

        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let svid = ca.issue_with(&spec).unwrap();
        assert!(check_leaf(svid.leaf_der(), PeerRole::Server, TD, None).is_ok());
        assert!(matches!(
            check_leaf(svid.leaf_der(), PeerRole::Client, TD, None),
            Err(SvidError::ExtendedKeyUsage(PeerRole::Client))
        ));

        // No EKU at all is allowed (SPIFFE: SHOULD be present).
        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.extended_key_usages.clear();
        assert!(check(&ca, spec).is_ok());
    }

    #[test]
    fn validity_window_is_enforced() {
        let ca = ca();
        let now = time::OffsetDateTime::now_utc();
        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.not_before = now - time::Duration::hours(2);
        spec.not_after = now - time::Duration::hours(1);
        assert!(matches!(check(&ca, spec), Err(SvidError::Expired(_))));

        let mut spec = LeafSpec::workload("cluster.local", "ns1", "a");
        spec.not_before = now + time::Duration::hours(1);
        spec.not_after = now + time::Duration::hours(2);
        assert!(matches!(check(&ca, spec), Err(SvidError::NotYetValid(_))));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [&b""[..], b"\x30\x03\x02\x01\x01", b"not a certificate"] {
            assert!(matches!(
                check_leaf(bytes, PeerRole::Client, TD, None),
                Err(SvidError::Malformed(_))
            ));
        }
    }

    #[test]
    fn pem_files_round_trip_and_key_mismatch_is_detected() {
        let ca = ca();
        let a = ca.issue("ns1", "a").unwrap();
        let b = ca.issue("ns1", "b").unwrap();
        let dir = tempfile::tempdir().unwrap();
        a.write_dir(dir.path()).unwrap();
        let files = SvidFiles::load_dir(dir.path()).unwrap();
        assert_eq!(files.chain[0].as_ref(), a.leaf_der());
        assert_eq!(files.roots.len(), 1);
        let provider = rustls::crypto::ring::default_provider();
        assert!(files.certified_key(&provider).is_ok());

        let mismatched =
            SvidFiles::from_pem(a.cert_chain_pem(), b.key_pem(), a.root_cert_pem()).unwrap();
        assert!(matches!(
            mismatched.certified_key(&provider),
            Err(SvidError::KeyMismatch(_))
        ));
    }

    proptest::proptest! {
        // Fuzz-style: any byte string, and a valid certificate with bytes flipped, is
        // either rejected with an error or yields a valid workload identity; never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = check_leaf(&bytes, PeerRole::Client, TD, None);
        }

        #[test]
        fn corrupted_certificates_never_panic(
            flips in proptest::collection::vec((0usize..2048, 1u8..=255), 1..8),
        ) {
            let der = CORRUPT_BASE.with(|d| d.clone());
            let mut der = der;
            for (pos, x) in flips {
                let i = pos % der.len();
                der[i] ^= x;
            }
            if let Ok(leaf) = check_leaf(&der, PeerRole::Client, TD, None) {
                proptest::prop_assert!(leaf.identity.is_workload());
                proptest::prop_assert_eq!(leaf.identity.trust_domain(), "cluster.local");
            }
        }
    }

    thread_local! {
        static CORRUPT_BASE: Vec<u8> = ca().issue("ns1", "a").unwrap().leaf_der().to_vec();
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = SvidFiles::load_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains(CERT_CHAIN_FILE), "{err}");
    }
}
