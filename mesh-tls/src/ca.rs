//! A small certificate authority for development and tests: a root for one trust
//! domain that issues workload SVIDs.
//!
//! The root is a self-signed ECDSA P-256 certificate valid for ten years (Istio's
//! self-signed root TTL) with the trust domain as its Organization, `cA=TRUE`,
//! `keyCertSign` and `cRLSign`, and **no name constraints**: webpki rejects every
//! leaf with a URI SAN under a CA that carries URI name constraints, so a SPIFFE
//! trust-domain constraint would break the mesh; the trust domain is enforced by the
//! verifiers instead.
//!
//! Workload SVIDs carry one URI SAN `spiffe://<td>/ns/<ns>/sa/<sa>` (plus optional DNS
//! SANs, which curl and other non-mesh clients need to check a server's hostname),
//! `digitalSignature` + `keyEncipherment`, EKU `serverAuth` + `clientAuth`, a random
//! 128-bit serial, and a lifetime of 24 hours by default (Istio's
//! `DEFAULT_WORKLOAD_CERT_TTL`). Keys are ECDSA P-256; Istio defaults to RSA 2048,
//! which the ring backend cannot generate, and P-256 is Istio's ECC option.
//!
//! [`LeafSpec`] exposes every field so tests can mint deliberately broken
//! certificates (two URI SANs, a CA leaf, expired, not yet valid, another trust domain).
//!
//! Files follow Istio's names: [`CertificateAuthority::write_dir`] writes `ca-cert.pem`,
//! `ca-key.pem` and `root-cert.pem`; [`IssuedSvid::write_dir`] writes `cert-chain.pem`,
//! `key.pem` and `root-cert.pem`, each through a temporary file and a rename so a
//! watching proxy never reads half a file.
//!
//! # Errors
//!
//! [`CaError`]: an invalid trust domain, namespace or service account, an rcgen
//! failure, unreadable or inconsistent CA files, or an I/O error writing PEM files.
//!
//! # Example
//!
//! ```
//! use mesh_tls::CertificateAuthority;
//! use std::time::Duration;
//!
//! let ca = CertificateAuthority::new("cluster.local").unwrap();
//! let svid = ca.issue_for("production", "order-service", Duration::from_secs(3600)).unwrap();
//! assert_eq!(svid.identity().service_account(), Some("order-service"));
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use mesh_core::{Identity, IdentityError};
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::svid::{self, CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, Serial, SvidFiles};

/// Istio's default workload certificate lifetime (24 hours).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a self-signed root (Istio: 3650 days).
pub const ROOT_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);
/// File name of the CA certificate (Istio's plugged-in CA layout).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Why the CA could not be created, loaded, written or could not issue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// rcgen refused the parameters or the key.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The trust domain, namespace or service account do not form a SPIFFE ID.
    #[error("invalid workload identity: {0}")]
    Identity(#[from] IdentityError),
    /// A namespace or service account is not a single path segment.
    #[error("{what} {value:?} must be one non-empty path segment without `/`")]
    Name {
        /// `namespace` or `service account`.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA files exist but are not a usable CA.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// A root certificate authority for one trust domain.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    default_ttl: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("default_ttl", &self.default_ttl)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    // Positive and without a leading zero byte, so the DER integer keeps all 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn now_utc() -> OffsetDateTime {
    // Whole seconds: X.509 times have second granularity.
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn ttl_duration(ttl: Duration) -> time::Duration {
    time::Duration::try_from(ttl).unwrap_or(time::Duration::MAX)
}

impl CertificateAuthority {
    /// Creates a new self-signed root for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Self, CaError> {
        // Validates the trust domain with the SPIFFE rules.
        Identity::trust_domain_root(trust_domain)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = now_utc();
        params.not_before = now;
        params.not_after = now + ttl_duration(ROOT_TTL);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            default_ttl: DEFAULT_WORKLOAD_TTL,
        })
    }

    /// Loads a CA written by [`write_dir`](Self::write_dir) (`ca-cert.pem`, `ca-key.pem`).
    /// The trust domain is the certificate's Organization.
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let invalid = |p: &Path, what: String| CaError::Invalid {
            path: p.to_path_buf(),
            what,
        };
        let cert_der = svid::read_certs(&cert_path)
            .map_err(|e| invalid(&cert_path, e.to_string()))?
            .swap_remove(0);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&key_path, e.to_string()))?;
        let (_, x509) =
            X509Certificate::from_der(&cert_der).map_err(|e| invalid(&cert_path, e.to_string()))?;
        if !x509.is_ca() {
            return Err(invalid(&cert_path, "certificate is not a CA".into()));
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(&key_path, "key does not match ca-cert.pem".into()));
        }
        let trust_domain = x509
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .ok_or_else(|| {
                invalid(
                    &cert_path,
                    "no Organization (trust domain) in subject".into(),
                )
            })?
            .to_owned();
        Identity::trust_domain_root(&trust_domain)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            trust_domain,
            issuer,
            cert_der,
            cert_pem,
            default_ttl: DEFAULT_WORKLOAD_TTL,
        })
    }

    /// Writes `ca-cert.pem`, `ca-key.pem` (mode 0600) and `root-cert.pem` into `dir`,
    /// creating it if needed.
    pub fn write_dir(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(
            &dir.join(CA_KEY_FILE),
            &self.issuer.key().serialize_pem(),
            true,
        )?;
        write_atomic(&dir.join(CA_CERT_FILE), &self.cert_pem, false)?;
        write_atomic(&dir.join(ROOT_CERT_FILE), &self.cert_pem, false)
    }

    /// Sets the lifetime [`issue`](Self::issue) gives workload certificates.
    #[must_use]
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate (DER).
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The root certificate (PEM).
    pub fn root_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues an SVID for `ns/<namespace>/sa/<service_account>` with the default lifetime.
    pub fn issue(&self, namespace: &str, service_account: &str) -> Result<IssuedSvid, CaError> {
        self.issue_for(namespace, service_account, self.default_ttl)
    }

    /// Issues an SVID for `ns/<namespace>/sa/<service_account>` valid for `ttl` from now.
    pub fn issue_for(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<IssuedSvid, CaError> {
        self.issue_with(&self.workload_spec(namespace, service_account, ttl)?)
    }

    /// The [`LeafSpec`] of a valid SVID for `ns/<namespace>/sa/<service_account>`, valid
    /// for `ttl` from now, after checking the names; add DNS SANs before issuing.
    pub fn workload_spec(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<LeafSpec, CaError> {
        for (what, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if value.is_empty() || value.contains('/') {
                return Err(CaError::Name {
                    what,
                    value: value.to_owned(),
                });
            }
        }
        Identity::from_istio(&self.trust_domain, namespace, service_account)?;
        Ok(LeafSpec::workload(&self.trust_domain, namespace, service_account).with_ttl(ttl))
    }

    /// Issues a certificate exactly as `spec` says, valid or not.
    pub fn issue_with(&self, spec: &LeafSpec) -> Result<IssuedSvid, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for uri in &spec.uri_sans {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        for dns in &spec.dns_sans {
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.as_str().try_into()?));
        }
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.extended_key_usages.clone();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(&key, &self.issuer)?;
        let identity = spec.uri_sans.first().and_then(|u| Identity::parse(u).ok());
        Ok(IssuedSvid {
            identity,
            serial: Serial::from(serial.to_bytes().as_slice()),
            chain_der: vec![cert.der().clone()],
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            root_pem: self.cert_pem.clone(),
            root_der: self.cert_der.clone(),
            not_before: spec.not_before.into(),
            not_after: spec.not_after.into(),
        })
    }
}

/// Every field of a leaf certificate [`CertificateAuthority::issue_with`] mints.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// URI SANs, in order (a valid SVID has exactly one).
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns_sans: Vec<String>,
    /// Whether to set `basicConstraints cA=TRUE`.
    pub is_ca: bool,
    /// Key usage bits (empty: no extension).
    pub key_usages: Vec<KeyUsagePurpose>,
    /// Extended key usages (empty: no extension).
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A valid workload SVID for `spiffe://<td>/ns/<ns>/sa/<sa>`, valid for 24 hours from now.
    pub fn workload(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        let now = now_utc();
        Self {
            uri_sans: vec![format!(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
            )],
            dns_sans: Vec::new(),
            is_ca: false,
            key_usages: vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ],
            extended_key_usages: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            not_before: now,
            not_after: now + ttl_duration(DEFAULT_WORKLOAD_TTL),
        }
    }

    /// Sets the validity to `ttl` from `not_before`.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.not_after = self.not_before + ttl_duration(ttl);
        self
    }

    /// Adds a DNS SAN (for clients that check hostnames, such as curl).
    #[must_use]
    pub fn with_dns(mut self, name: &str) -> Self {
        self.dns_sans.push(name.to_owned());
        self
    }
}

/// A certificate and key issued by the [`CertificateAuthority`], with the CA's root.
#[derive(Debug)]
pub struct IssuedSvid {
    identity: Option<Identity>,
    serial: Serial,
    chain_der: Vec<CertificateDer<'static>>,
    key_der: PrivatePkcs8KeyDer<'static>,
    chain_pem: String,
    key_pem: String,
    root_pem: String,
    root_der: CertificateDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl IssuedSvid {
    /// The SPIFFE ID of the first URI SAN.
    ///
    /// # Panics
    ///
    /// Only for deliberately broken certificates minted with [`LeafSpec`] whose first
    /// URI SAN is not a SPIFFE ID; [`CertificateAuthority::issue`] never produces one.
    #[allow(clippy::expect_used)]
    pub fn identity(&self) -> &Identity {
        self.identity
            .as_ref()
            .expect("certificate was minted without a SPIFFE URI SAN")
    }

    /// The serial number.
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// The leaf certificate (DER).
    pub fn leaf_der(&self) -> &[u8] {
        self.chain_der[0].as_ref()
    }

    /// The certificate chain (DER, leaf first).
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain_der
    }

    /// The private key (DER).
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }

    /// `cert-chain.pem` contents.
    pub fn cert_chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// `key.pem` contents.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// `root-cert.pem` contents (the issuing CA's root).
    pub fn root_cert_pem(&self) -> &str {
        &self.root_pem
    }

    /// The issuing CA's root (DER).
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The same material as [`SvidFiles`].
    pub fn files(&self) -> SvidFiles {
        SvidFiles {
            chain: self.chain_der.clone(),
            key: self.key_der(),
            roots: vec![self.root_der.clone()],
        }
    }

    /// Writes `key.pem` (mode 0600), `cert-chain.pem` and `root-cert.pem` into `dir`,
    /// each atomically (temporary file + rename), creating `dir` if needed.
    pub fn write_dir(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_atomic(&dir.join(KEY_FILE), &self.key_pem, true)?;
        write_atomic(&dir.join(CERT_CHAIN_FILE), &self.chain_pem, false)?;
        write_atomic(&dir.join(ROOT_CERT_FILE), &self.root_pem, false)
    }
}

fn write_atomic(path: &Path, contents: &str, secret: bool) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = secret;
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(contents.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_a_ca_without_name_constraints() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let (_, x509) = X509Certificate::from_der(ca.root_der()).unwrap();
        assert!(x509.is_ca());
        assert!(x509.name_constraints().unwrap().is_none());
        let ku = x509.key_usage().unwrap().unwrap();
        assert!(ku.value.key_cert_sign());
    }

    #[test]
    fn invalid_trust_domain_is_refused() {
        assert!(matches!(
            CertificateAuthority::new("Cluster.Local"),
            Err(CaError::Identity(_))
        ));
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        assert!(matches!(ca.issue("a/b", "c"), Err(CaError::Name { .. })));
        assert!(matches!(ca.issue("ns", "s a"), Err(CaError::Identity(_))));
    }

    #[test]
    fn written_ca_loads_back_and_issues_chaining_certs() {
        let ca = CertificateAuthority::new("example.org").unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.write_dir(dir.path()).unwrap();
        let loaded = CertificateAuthority::load_dir(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain(), "example.org");
        assert_eq!(loaded.root_der(), ca.root_der());
        let svid = loaded.issue("ns1", "sa1").unwrap();
        let (_, leaf) = X509Certificate::from_der(svid.leaf_der()).unwrap();
        let (_, root) = X509Certificate::from_der(ca.root_der()).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn serials_differ_between_issues() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let a = ca.issue("ns", "sa").unwrap();
        let b = ca.issue("ns", "sa").unwrap();
        assert_ne!(a.serial(), b.serial());
        assert_eq!(a.serial().as_bytes().len(), 16);
    }
}
