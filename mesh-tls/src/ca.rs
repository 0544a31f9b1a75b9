//! The mesh's certificate authority: a root (or a plugged-in intermediate) for one trust
//! domain that issues workload SVIDs, directly for development and tests, or from a
//! workload's certificate signing request for the `discovery` control plane.
//!
//! The root made by [`CertificateAuthority::new`] is a self-signed ECDSA P-256
//! certificate valid for ten years (Istio's self-signed root TTL) with the trust domain
//! as its Organization, `cA=TRUE`, `keyCertSign` and `cRLSign`, and **no name
//! constraints**: webpki rejects every leaf with a URI SAN under a CA that carries URI
//! name constraints, so a SPIFFE trust-domain constraint would break the mesh; the trust
//! domain is enforced by the verifiers instead.
//!
//! Workload SVIDs carry one URI SAN `spiffe://<td>/ns/<ns>/sa/<sa>` (plus optional DNS
//! SANs, which curl and other non-mesh clients need to check a server's hostname),
//! `digitalSignature` + `keyEncipherment`, EKU `serverAuth` + `clientAuth`, a random
//! 128-bit serial, and a lifetime of 24 hours by default (Istio's
//! `DEFAULT_WORKLOAD_CERT_TTL`). Keys the CA makes are ECDSA P-256; Istio defaults to
//! RSA 2048, which the ring backend cannot generate, and P-256 is Istio's ECC option.
//!
//! # Signing requests (ISTIO.md CA-04..CA-06)
//!
//! [`CertificateAuthority::sign_csr`] checks the request's self-signature and takes only
//! its public key (ECDSA P-256/P-384, RSA, Ed25519); the certificate names the identity
//! the caller authenticated as, never what the request asks for. A lifetime of `None`
//! means the default (24 h), more than [`MAX_WORKLOAD_TTL`] (90 days) is refused, and
//! every lifetime is cut to the signing chain's remaining life. The chain returned is
//! the leaf, the intermediates, then the roots with the chain's own root last.
//!
//! # Key material (CA-20)
//!
//! [`CertificateAuthority::load_plugin`] reads Istio's plug-in layout (`ca-cert.pem`,
//! `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`), so an intermediate signed by an
//! organisation's offline root can sign workload certificates; `ca init`'s own layout
//! is the same files with the root as the signing certificate; Istio's other accepted
//! form, a `kubernetes.io/tls` secret (`tls.crt`, `tls.key`, `ca.crt`), is read too.
//!
//! # Choices that differ from Istio
//!
//! - Every lifetime, not only the default, is cut to the signing chain's remaining life:
//!   a leaf never outlives a certificate above it.
//! - A `cert-chain.pem` that repeats the root (as Istio's sample tooling writes it) does
//!   not put the root twice in a response; istiod appends the file as it is, then the
//!   root again.
//! - `ca-crl.pem` is not read.
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
//! failure, unreadable or inconsistent CA files, an I/O error writing PEM files, a bad
//! signing request, a lifetime over the maximum, or an expired signing chain.
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
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::svid::{self, CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE, Serial, SvidFiles};

/// Istio's default workload certificate lifetime (24 hours).
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's longest workload certificate lifetime (`MAX_WORKLOAD_CERT_TTL`, 90 days).
pub const MAX_WORKLOAD_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of a self-signed root (Istio: 3650 days).
pub const ROOT_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);
/// File name of the CA certificate (Istio's plugged-in CA layout).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The signing certificate and its chain in a `kubernetes.io/tls`-style CA secret.
pub const TLS_CERT_FILE: &str = "tls.crt";
/// The signing key in a `kubernetes.io/tls`-style CA secret.
pub const TLS_KEY_FILE: &str = "tls.key";
/// The root(s) in a `kubernetes.io/tls`-style CA secret.
pub const TLS_CA_FILE: &str = "ca.crt";

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
    /// The certificate signing request cannot be parsed, its signature does not verify,
    /// or its key type is not supported.
    #[error("bad certificate signing request: {0}")]
    Csr(String),
    /// The requested lifetime is longer than the CA grants.
    #[error("requested lifetime {requested:?} is longer than the maximum {max:?}")]
    TtlTooLong {
        /// What was asked for.
        requested: Duration,
        /// The CA's maximum.
        max: Duration,
    },
    /// The signing chain has expired: nothing can be issued.
    #[error("the CA's signing chain expired at {0:?}")]
    ChainExpired(SystemTime),
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
    /// The signing certificate (`ca-cert.pem`).
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    /// Certificates between an issued leaf and the root: the signing certificate unless
    /// it is itself a root, then the rest of `cert-chain.pem`, roots left out.
    intermediates: Vec<CertificateDer<'static>>,
    /// The trust anchors (`root-cert.pem`), the one the chain ends at last.
    roots: Vec<CertificateDer<'static>>,
    /// `root-cert.pem` as written in the files.
    roots_pem: String,
    /// When the first certificate of the chain (signing certificate, intermediates, root)
    /// expires; no leaf outlives it.
    chain_not_after: SystemTime,
    default_ttl: Duration,
    max_ttl: Duration,
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
            intermediates: Vec::new(),
            roots: vec![cert.der().clone()],
            roots_pem: cert.pem(),
            chain_not_after: SystemTime::from(now + ttl_duration(ROOT_TTL)),
            default_ttl: DEFAULT_WORKLOAD_TTL,
            max_ttl: MAX_WORKLOAD_TTL,
        })
    }

    /// A certificate revocation list (PEM) signed by this CA, revoking the certificates
    /// with `revoked` serials now, valid for `lifetime` (what DestinationRule `caCrl`
    /// names). Number `number` orders the lists of this CA.
    pub fn revocation_list_pem(
        &self,
        revoked: &[&Serial],
        number: u64,
        lifetime: Duration,
    ) -> Result<String, CaError> {
        let now = now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + ttl_duration(lifetime),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial.as_bytes()),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    /// Loads a CA written by [`write_dir`](Self::write_dir) (`ca-cert.pem`, `ca-key.pem`,
    /// and `root-cert.pem` or `cert-chain.pem` when present, as in
    /// [`load_plugin`](Self::load_plugin)). The trust domain is the signing
    /// certificate's Organization.
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let cert_der = first_cert(&cert_path)?;
        let (_, x509) =
            X509Certificate::from_der(&cert_der).map_err(|e| invalid(&cert_path, e.to_string()))?;
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
        Self::load_plugin(dir, &trust_domain)
    }

    /// Loads Istio's plug-in CA layout (the `cacerts` Secret, ISTIO.md CA-20) from `dir`
    /// and signs for `trust_domain`:
    ///
    /// - `ca-cert.pem`: the signing certificate (an intermediate, or the root itself);
    /// - `ca-key.pem`: its key (PKCS#8, PKCS#1 RSA or SEC1 EC);
    /// - `cert-chain.pem` (optional): the chain from the signing certificate up to the
    ///   root; the certificates in it that are not roots are sent after every issued leaf;
    /// - `root-cert.pem` (optional when `ca-cert.pem` is self-signed): the root(s).
    ///
    /// Without `ca-cert.pem`, a `kubernetes.io/tls`-style secret (cert-manager's) is read
    /// instead: `tls.crt` (the signing certificate, then its chain), `tls.key`, `ca.crt`
    /// (the roots).
    ///
    /// The files are checked together: the key must match the signing certificate,
    /// which must be a CA, and a certificate issued by it must verify through the
    /// chain to a root.
    pub fn load_plugin(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        Identity::trust_domain_root(trust_domain)?;
        let tls_layout = !dir.join(CA_CERT_FILE).exists() && dir.join(TLS_CERT_FILE).exists();
        let [cert_path, key_path, chain_path, root_path] = if tls_layout {
            // The signing certificate first in `tls.crt`, then its chain; roots in `ca.crt`.
            [TLS_CERT_FILE, TLS_KEY_FILE, TLS_CERT_FILE, TLS_CA_FILE]
        } else {
            [CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE]
        }
        .map(|name| dir.join(name));
        let cert_der = first_cert(&cert_path)?;
        let key_pem = read_text(&key_path)?;
        let key = load_key(&key_pem).map_err(|what| invalid(&key_path, what))?;
        let (_, x509) =
            X509Certificate::from_der(&cert_der).map_err(|e| invalid(&cert_path, e.to_string()))?;
        if !x509.is_ca() {
            return Err(invalid(&cert_path, "certificate is not a CA".into()));
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(
                &key_path,
                "key does not match the signing certificate".into(),
            ));
        }
        let self_signed = x509.subject() == x509.issuer();
        let (roots, roots_pem) = if root_path.exists() {
            (read_all_certs(&root_path)?, read_text(&root_path)?)
        } else if self_signed {
            (vec![cert_der.clone()], to_pem(&cert_der))
        } else {
            return Err(invalid(
                &root_path,
                "missing, and the signing certificate is not self-signed".into(),
            ));
        };
        let listed = if chain_path.exists() {
            read_all_certs(&chain_path)?
        } else {
            Vec::new()
        };
        let mut intermediates: Vec<CertificateDer<'static>> = Vec::new();
        for cert in std::iter::once(cert_der.clone()).chain(listed) {
            if !roots.contains(&cert) && !intermediates.contains(&cert) {
                intermediates.push(cert);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        let mut ca = Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            cert_pem: to_pem(&cert_der),
            cert_der,
            intermediates,
            roots,
            roots_pem,
            chain_not_after: SystemTime::UNIX_EPOCH,
            default_ttl: DEFAULT_WORKLOAD_TTL,
            max_ttl: MAX_WORKLOAD_TTL,
        };
        ca.order_roots(&root_path)?;
        ca.chain_not_after = ca.chain_expiry(&root_path)?;
        ca.check_chain(&chain_path)?;
        Ok(ca)
    }

    /// Puts the root the chain ends at last in `roots` (CA-06: the root is the last
    /// element of every response).
    fn order_roots(&mut self, root_path: &Path) -> Result<(), CaError> {
        let top = self.intermediates.last().unwrap_or(&self.cert_der);
        let (_, top) =
            X509Certificate::from_der(top).map_err(|e| invalid(root_path, e.to_string()))?;
        let issuing = self.roots.iter().position(|root| {
            X509Certificate::from_der(root)
                .map(|(_, r)| r.subject() == top.issuer())
                .unwrap_or(false)
        });
        match issuing {
            Some(i) => {
                let root = self.roots.remove(i);
                self.roots.push(root);
                Ok(())
            }
            None => Err(invalid(
                root_path,
                "no root here issued the top of the signing chain".into(),
            )),
        }
    }

    /// The earliest `notAfter` of the signing certificate, the intermediates and the root.
    fn chain_expiry(&self, root_path: &Path) -> Result<SystemTime, CaError> {
        let mut earliest: Option<SystemTime> = None;
        let issuing_root = self.roots.last();
        for cert in std::iter::once(&self.cert_der)
            .chain(&self.intermediates)
            .chain(issuing_root)
        {
            let (_, x509) =
                X509Certificate::from_der(cert).map_err(|e| invalid(root_path, e.to_string()))?;
            let t = unix_to_system(x509.validity().not_after.timestamp());
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
        Ok(earliest.unwrap_or(SystemTime::UNIX_EPOCH))
    }

    /// Issues a throw-away leaf and verifies it through the intermediates to the roots,
    /// as a relying party would.
    fn check_chain(&self, chain_path: &Path) -> Result<(), CaError> {
        let probe = self.issue_for("probe", "probe", Duration::from_secs(60))?;
        let bundle =
            crate::verify::TrustBundle::new(self.roots.clone(), vec![self.trust_domain.clone()])
                .map_err(|e| invalid(chain_path, e.to_string()))?;
        bundle
            .verify_client(
                &probe.chain_der[0],
                &probe.chain_der[1..],
                rustls_pki_types::UnixTime::now(),
            )
            .map(drop)
            .map_err(|e| {
                invalid(
                    chain_path,
                    format!("a certificate signed by ca-cert.pem does not verify through the chain to root-cert.pem: {e}"),
                )
            })
    }

    /// Writes `ca-cert.pem`, `ca-key.pem` (mode 0600) and `root-cert.pem` into `dir`,
    /// creating it if needed, and `cert-chain.pem` when the CA has intermediates.
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
        if !self.intermediates.is_empty() {
            let chain: String = self
                .intermediates
                .iter()
                .chain(self.roots.last())
                .map(|c| to_pem(c))
                .collect();
            write_atomic(&dir.join(CERT_CHAIN_FILE), &chain, false)?;
        }
        write_atomic(&dir.join(ROOT_CERT_FILE), &self.roots_pem, false)
    }

    /// Sets the lifetime [`issue`](Self::issue) and [`sign_csr`](Self::sign_csr) give
    /// workload certificates by default.
    #[must_use]
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Sets the longest lifetime [`sign_csr`](Self::sign_csr) grants (Istio's
    /// `MAX_WORKLOAD_CERT_TTL`, 90 days by default).
    #[must_use]
    pub fn with_max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl;
        self
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate the signing chain ends at (DER).
    pub fn root_der(&self) -> &CertificateDer<'static> {
        // `roots` is never empty: `new` puts the root in, `load_plugin` checks it.
        self.roots.last().unwrap_or(&self.cert_der)
    }

    /// The trust anchors (`root-cert.pem`), the root of the signing chain last.
    pub fn roots_der(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// `root-cert.pem`: every trusted root (PEM).
    pub fn root_pem(&self) -> &str {
        &self.roots_pem
    }

    /// The signing certificate (`ca-cert.pem`, DER); the root itself for a CA made by
    /// [`new`](Self::new).
    pub fn signing_cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The certificates sent between an issued leaf and the root.
    pub fn intermediates_der(&self) -> &[CertificateDer<'static>] {
        &self.intermediates
    }

    /// When the signing chain's first certificate expires.
    pub fn chain_not_after(&self) -> SystemTime {
        self.chain_not_after
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

    /// Issues a certificate exactly as `spec` says, valid or not, with a new key.
    pub fn issue_with(&self, spec: &LeafSpec) -> Result<IssuedSvid, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (cert, serial) = self.sign_leaf(spec, &key)?;
        let identity = spec.uri_sans.first().and_then(|u| Identity::parse(u).ok());
        let chain_der: Vec<CertificateDer<'static>> = std::iter::once(cert.der().clone())
            .chain(self.intermediates.iter().cloned())
            .collect();
        let chain_pem = chain_der.iter().map(|c| to_pem(c)).collect();
        Ok(IssuedSvid {
            identity,
            serial,
            chain_der,
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            chain_pem,
            key_pem: key.serialize_pem(),
            root_pem: self.roots_pem.clone(),
            root_der: self.root_der().clone(),
            not_before: spec.not_before.into(),
            not_after: spec.not_after.into(),
        })
    }

    fn sign_leaf(
        &self,
        spec: &LeafSpec,
        public_key: &impl PublicKeyData,
    ) -> Result<(rcgen::Certificate, Serial), CaError> {
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
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok((cert, Serial::from(serial.to_bytes().as_slice())))
    }

    /// Signs a certificate signing request for the workload `ns/<namespace>/sa/<service_account>`
    /// (the caller's identity, found by whoever authenticated it).
    ///
    /// Only the CSR's public key is used (ISTIO.md CA-04): its subject, SANs and
    /// extensions are ignored, so a CSR asking for another identity still gets the
    /// caller's. Its self-signature must verify, proving the caller holds the key.
    ///
    /// `ttl` (CA-05): `None` takes the default lifetime (24 h); more than the maximum
    /// (90 days) is refused; every lifetime is cut to the signing chain's remaining life.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        namespace: &str,
        service_account: &str,
        ttl: Option<Duration>,
    ) -> Result<SignedCsr, CaError> {
        let public_key = csr_public_key(csr_pem)?;
        let requested = ttl.unwrap_or(self.default_ttl);
        if requested > self.max_ttl {
            return Err(CaError::TtlTooLong {
                requested,
                max: self.max_ttl,
            });
        }
        let now = now_utc();
        let remaining = self
            .chain_not_after
            .duration_since(SystemTime::from(now))
            .map_err(|_| CaError::ChainExpired(self.chain_not_after))?;
        if remaining.is_zero() {
            return Err(CaError::ChainExpired(self.chain_not_after));
        }
        let ttl = requested.min(remaining);
        let mut spec = self.workload_spec(namespace, service_account, ttl)?;
        spec.not_before = now;
        spec.not_after = now + ttl_duration(ttl);
        let (cert, serial) = self.sign_leaf(&spec, &public_key)?;
        let identity = Identity::from_istio(&self.trust_domain, namespace, service_account)?;
        let chain: Vec<CertificateDer<'static>> = std::iter::once(cert.der().clone())
            .chain(self.intermediates.iter().cloned())
            .chain(self.roots.iter().cloned())
            .collect();
        Ok(SignedCsr {
            identity,
            serial,
            chain,
            not_before: spec.not_before.into(),
            not_after: spec.not_after.into(),
        })
    }
}

/// A certificate signed from a CSR by [`CertificateAuthority::sign_csr`].
#[derive(Clone, Debug)]
pub struct SignedCsr {
    identity: Identity,
    serial: Serial,
    chain: Vec<CertificateDer<'static>>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl SignedCsr {
    /// The identity the certificate carries (its only URI SAN).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The serial number.
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// The certificate, then the intermediates, then every root with the root of the
    /// chain last (DER).
    pub fn chain_der(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// [`chain_der`](Self::chain_der) as PEM, one certificate per element, each ending in
    /// a newline (ISTIO.md CA-06).
    pub fn chain_pem(&self) -> Vec<String> {
        self.chain.iter().map(|c| to_pem(c)).collect()
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// A workload's key pair, made where it is used, and certificate signing requests for it.
pub struct WorkloadKey {
    key: KeyPair,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// A new ECDSA P-256 key.
    pub fn generate() -> Result<Self, CaError> {
        Ok(Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A PEM certificate signing request signed by this key, with an empty subject and
    /// `identity` as its only SAN.
    pub fn csr_pem(&self, identity: &Identity) -> Result<String, CaError> {
        self.csr_pem_with(&[identity.as_str()])
    }

    /// A PEM certificate signing request with these URI SANs (any number, for tests of
    /// what a CA does with them).
    pub fn csr_pem_with(&self, uri_sans: &[&str]) -> Result<String, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for uri in uri_sans {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into()?));
        }
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    /// The private key (PKCS#8 DER).
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// The private key (PKCS#8 PEM).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// Parses a PEM CSR, checks its self-signature and returns its public key.
fn csr_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    use x509_parser::certification_request::X509CertificationRequest;
    let bad = |what: String| CaError::Csr(what);
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| bad(format!("no CERTIFICATE REQUEST PEM block: {e}")))?;
    let (rest, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the request".into()));
    }
    csr.verify_signature()
        .map_err(|e| bad(format!("the request's signature does not verify: {e}")))?;
    rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|e| bad(format!("unsupported public key: {e}")))
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

fn invalid(path: &Path, what: String) -> CaError {
    CaError::Invalid {
        path: path.to_path_buf(),
        what,
    }
}

fn read_text(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_all_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    svid::read_certs(path).map_err(|e| match e {
        svid::SvidError::Io { path, source } => CaError::Io { path, source },
        other => invalid(path, other.to_string()),
    })
}

fn first_cert(path: &Path) -> Result<CertificateDer<'static>, CaError> {
    Ok(read_all_certs(path)?.swap_remove(0))
}

fn unix_to_system(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// PEM text of one certificate, ending in a newline.
pub(crate) fn to_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

/// Loads a CA key from PEM: PKCS#8, or PKCS#1 (RSA) and SEC1 (EC, P-256 or P-384)
/// rewrapped as PKCS#8, since ring reads only PKCS#8.
fn load_key(pem: &str) -> Result<KeyPair, String> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
    let candidates: Vec<Vec<u8>> = match &key {
        PrivateKeyDer::Pkcs8(k) => vec![k.secret_pkcs8_der().to_vec()],
        PrivateKeyDer::Pkcs1(k) => vec![pkcs8_wrap(RSA_ALGORITHM, k.secret_pkcs1_der())],
        PrivateKeyDer::Sec1(k) => [EC_P256_ALGORITHM, EC_P384_ALGORITHM]
            .iter()
            .map(|alg| pkcs8_wrap(alg, k.secret_sec1_der()))
            .collect(),
        _ => return Err("unsupported private key format".into()),
    };
    let mut last = String::from("no key");
    for der in candidates {
        match KeyPair::try_from(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))) {
            Ok(key) => return Ok(key),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// AlgorithmIdentifier `rsaEncryption` with NULL parameters (DER).
const RSA_ALGORITHM: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// AlgorithmIdentifier `id-ecPublicKey` on `prime256v1` (DER).
const EC_P256_ALGORITHM: &[u8] = &[
    0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
    0xce, 0x3d, 0x03, 0x01, 0x07,
];
/// AlgorithmIdentifier `id-ecPublicKey` on `secp384r1` (DER).
const EC_P384_ALGORITHM: &[u8] = &[
    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04,
    0x00, 0x22,
];

/// `PrivateKeyInfo { version 0, algorithm, privateKey OCTET STRING }` (RFC 5208).
fn pkcs8_wrap(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = body.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
        out.extend_from_slice(body);
        out
    }
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(algorithm);
    body.extend(tlv(0x04, key));
    tlv(0x30, &body)
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

    fn csr_for(key: &WorkloadKey, ns: &str, sa: &str) -> String {
        key.csr_pem(&Identity::from_istio("cluster.local", ns, sa).unwrap())
            .unwrap()
    }

    #[test]
    fn a_csr_gets_the_callers_identity_and_its_own_key() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let signed = ca
            .sign_csr(&csr_for(&key, "other", "admin"), "shop", "orders", None)
            .unwrap();
        assert_eq!(
            signed.identity().as_str(),
            "spiffe://cluster.local/ns/shop/sa/orders"
        );
        assert_eq!(signed.chain_der().len(), 2);
        assert_eq!(&signed.chain_der()[1], ca.root_der());
        let files = SvidFiles {
            chain: signed.chain_der()[..1].to_vec(),
            key: key.key_der(),
            roots: vec![ca.root_der().clone()],
        };
        files.certified_key(&crate::provider()).unwrap();
        let leaf = svid::check_leaf(
            &signed.chain_der()[0],
            svid::PeerRole::Server,
            &["cluster.local"],
            None,
        )
        .unwrap();
        assert_eq!(
            leaf.not_after.duration_since(leaf.not_before).unwrap(),
            DEFAULT_WORKLOAD_TTL
        );
        assert!(
            signed
                .chain_pem()
                .iter()
                .all(|p| p.ends_with("-----END CERTIFICATE-----\n"))
        );
    }

    #[test]
    fn lifetimes_over_the_maximum_are_refused() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let csr = csr_for(&WorkloadKey::generate().unwrap(), "shop", "orders");
        assert!(matches!(
            ca.sign_csr(
                &csr,
                "shop",
                "orders",
                Some(MAX_WORKLOAD_TTL + Duration::from_secs(1))
            ),
            Err(CaError::TtlTooLong { .. })
        ));
        let signed = ca
            .sign_csr(&csr, "shop", "orders", Some(MAX_WORKLOAD_TTL))
            .unwrap();
        assert_eq!(
            signed
                .not_after()
                .duration_since(signed.not_before())
                .unwrap(),
            MAX_WORKLOAD_TTL
        );
    }

    #[test]
    fn a_leaf_never_outlives_the_signing_chain() {
        // A root valid for two more hours, in the plug-in layout.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::hours(2);
        let root = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_CERT_FILE), root.pem()).unwrap();
        std::fs::write(dir.path().join(CA_KEY_FILE), key.serialize_pem()).unwrap();
        let ca = CertificateAuthority::load_plugin(dir.path(), "example.org").unwrap();
        let csr = WorkloadKey::generate()
            .unwrap()
            .csr_pem(&Identity::from_istio("example.org", "a", "b").unwrap())
            .unwrap();
        let signed = ca.sign_csr(&csr, "a", "b", None).unwrap();
        assert_eq!(signed.not_after(), SystemTime::from(params.not_after));
        assert_eq!(signed.chain_der().len(), 2);
    }

    #[test]
    fn bad_csrs_are_refused() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        for csr in ["", "garbage", ca.root_pem()] {
            assert!(
                matches!(ca.sign_csr(csr, "a", "b", None), Err(CaError::Csr(_))),
                "{csr}"
            );
        }
    }

    #[test]
    fn pkcs8_wrapping_reads_sec1_keys() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // ring's PKCS#8 for P-256 holds the SEC1 key in its OCTET STRING.
        let pkcs8 = key.serialize_der();
        // SEQUENCE (long-form length), version 0, the algorithm, OCTET STRING (short).
        let at = 3 + 3 + EC_P256_ALGORITHM.len();
        assert_eq!(&pkcs8[at..at + 1], &[0x04]);
        let sec1 = &pkcs8[at + 2..];
        assert_eq!(pkcs8_wrap(EC_P256_ALGORITHM, sec1), pkcs8);
        let rsa = pkcs8_wrap(RSA_ALGORITHM, &[0u8; 300]);
        assert_eq!(&rsa[..4], &[0x30, 0x82, 0x01, 0x42]);
    }

    #[test]
    fn a_tls_secret_layout_signs_through_its_intermediate() {
        // An intermediate made by the mesh's own root, written as cert-manager writes a
        // CA issuer's secret: tls.crt (intermediate), tls.key, ca.crt (root).
        let root = CertificateAuthority::new("cluster.local").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        let intermediate = params.signed_by(&key, &root.issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TLS_CERT_FILE), intermediate.pem()).unwrap();
        std::fs::write(dir.path().join(TLS_KEY_FILE), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join(TLS_CA_FILE), root.root_pem()).unwrap();
        let ca = CertificateAuthority::load_plugin(dir.path(), "cluster.local").unwrap();
        assert_eq!(ca.root_der(), root.root_der());
        assert_eq!(ca.intermediates_der(), &[intermediate.der().clone()]);
        let csr = csr_for(&WorkloadKey::generate().unwrap(), "a", "b");
        let signed = ca.sign_csr(&csr, "a", "b", None).unwrap();
        assert_eq!(signed.chain_der().len(), 3);
        let bundle = crate::verify::TrustBundle::new(
            vec![root.root_der().clone()],
            vec!["cluster.local".into()],
        )
        .unwrap();
        bundle
            .verify_client(
                &signed.chain_der()[0],
                &signed.chain_der()[1..2],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
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
