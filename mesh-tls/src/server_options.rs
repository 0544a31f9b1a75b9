//! Server-side TLS options of an Istio Gateway server (`servers[].tls`), as pieces an
//! embedder can put into its own rustls [`ServerConfig`](rustls::ServerConfig):
//! revocation lists, cipher suites and protocol versions, client certificate pinning and
//! `subjectAltNames`, and a certificate resolver that serves an RSA and an ECDSA
//! certificate side by side. Istio's statements behind each piece are in the crate's
//! `ISTIO.md` (GW-20..GW-29).
//!
//! # Behaviour
//!
//! - [`read_crls`] reads a PEM file of X.509 CRLs (`caCrl`, a Secret's `ca.crl`); a file
//!   without one is an error. rustls's webpki verifier then checks every certificate of
//!   the client's chain below the trust anchor, and refuses one whose issuer has no list
//!   (its status is unknown), as Envoy does by default; an expired list still counts.
//! - [`cipher_suites`] maps Envoy's OpenSSL-style names (`ECDHE-ECDSA-AES256-GCM-SHA384`)
//!   to the provider's TLS 1.2 suites. TLS 1.3 suites are not configurable (Envoy's
//!   `cipher_suites` has no effect on TLS 1.3) and all stay. A name Istio does not accept
//!   is ignored and reported, as Istio's filter drops it; when nothing usable remains the
//!   defaults apply, as Envoy's do for an empty list. A name Istio accepts but rustls does
//!   not implement (the CBC and plain-RSA key exchange suites) is reported too; when only
//!   such names are listed, no TLS 1.2 suite is left and only TLS 1.3 is served (rather
//!   than serving suites the configuration did not list).
//! - [`protocol_versions`]: rustls speaks TLS 1.2 and 1.3 only. A minimum of `TLSV1_0`
//!   or `TLSV1_1` therefore serves 1.2 and 1.3 (clients limited to 1.0/1.1 are refused);
//!   a maximum of `TLSV1_0` or `TLSV1_1` cannot be served and is an error. `TLS_AUTO` and
//!   unset are Istio's gateway defaults: 1.2 to 1.3.
//! - [`CertificatePins`]: `verifyCertificateSpki` (base64 SHA-256 of the certificate's
//!   SubjectPublicKeyInfo) and `verifyCertificateHash` (hex SHA-256 of the DER
//!   certificate, `:` separators allowed, any case). With both lists, a match in either
//!   is enough (Envoy). A value that does not decode to 32 bytes is an error.
//! - [`ClientChecks`] wraps a client verifier: the chain is verified first, then the pins
//!   and `subjectAltNames` (the leaf must carry one of them as a DNS name (any case), URI
//!   or IP address SAN, exact match).
//! - [`ByKeyType`] serves up to one certificate per key type: the first ECDSA certificate
//!   when the client's `signature_algorithms` allow it, else the first certificate the
//!   client can verify (Envoy: "the first RSA certificate is used for clients that only
//!   support RSA and the first ECDSA certificate is used for clients that support
//!   ECDSA").
//!
//! # Errors
//!
//! [`ServerOptionError`] names the field (and the file or the list index) that cannot be
//! used.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use mesh_core::config::TlsProtocol;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, CipherSuite, DigitallySignedStruct, DistinguishedName, SignatureAlgorithm,
    SignatureScheme, SupportedCipherSuite, SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};

/// A server TLS setting that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerOptionError {
    /// A revocation list file that cannot be read or holds no list.
    #[error("tls.caCrl ({path}): {reason}")]
    Crl {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A pin that is not a SHA-256 digest in the field's encoding.
    #[error("tls.{field}[{index}] `{value}`: {reason}")]
    Pin {
        /// `verifyCertificateSpki` or `verifyCertificateHash`.
        field: &'static str,
        /// Index in the list.
        index: usize,
        /// The value as written.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// Protocol versions that rustls cannot serve, or a minimum above the maximum.
    #[error("tls.{field}: {reason}")]
    Version {
        /// `minProtocolVersion` or `maxProtocolVersion`.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// Reads the X.509 CRLs of the PEM file `path`; `Err` holds why (the file cannot be
/// read, a block is malformed, or there is no CRL in it).
pub fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|lists| lists.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    if crls.is_empty() {
        return Err("no X509 CRL in the file".to_owned());
    }
    Ok(crls)
}

/// [`read_crls`] with the error naming `caCrl` and the file.
pub fn read_ca_crl(
    path: &str,
) -> Result<Vec<CertificateRevocationListDer<'static>>, ServerOptionError> {
    read_crls(Path::new(path)).map_err(|reason| ServerOptionError::Crl {
        path: path.to_owned(),
        reason,
    })
}

/// OpenSSL names of the TLS 1.2 suites rustls implements, with their IANA codes.
const OPENSSL_SUITES: &[(&str, CipherSuite)] = &[
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// Names Istio accepts that rustls does not implement (CBC modes, RSA key exchange).
const NOT_IN_RUSTLS: &[&str] = &[
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "AES128-GCM-SHA256",
    "AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES256-GCM-SHA384",
    "AES256-SHA",
];

/// TLS 1.3 suite names (not configurable).
const TLS13_NAMES: &[&str] = &[
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// Why a `cipherSuites` name is left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredReason {
    /// Not a name Istio accepts (Istio drops it too).
    Unknown,
    /// A TLS 1.3 suite: those are not configurable and all stay.
    Tls13,
    /// A suite Istio accepts that rustls does not implement.
    NotImplemented,
    /// Listed twice.
    Duplicate,
}

impl std::fmt::Display for IgnoredReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unknown => "not a cipher suite name Istio accepts; ignored",
            Self::Tls13 => "a TLS 1.3 suite; TLS 1.3 suites are not configurable and all stay",
            Self::NotImplemented => "not implemented by the TLS library; ignored",
            Self::Duplicate => "listed twice",
        })
    }
}

/// The result of mapping `cipherSuites`.
#[derive(Debug, Clone)]
pub struct CipherSuites {
    /// The provider's suites to serve: every TLS 1.3 suite, then the listed TLS 1.2
    /// suites in the list's order (or the provider's TLS 1.2 defaults).
    pub suites: Vec<SupportedCipherSuite>,
    /// Names left out, with why.
    pub ignored: Vec<(String, IgnoredReason)>,
    /// Whether the provider's default TLS 1.2 suites apply (no usable name was listed).
    pub defaults: bool,
}

impl CipherSuites {
    /// Whether a TLS 1.2 suite remains.
    pub fn has_tls12(&self) -> bool {
        self.suites
            .iter()
            .any(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
    }
}

/// Maps `cipherSuites` (OpenSSL names) onto `provider`'s suites; see the module docs.
pub fn cipher_suites(names: &[String], provider: &CryptoProvider) -> CipherSuites {
    let tls13 = provider
        .cipher_suites
        .iter()
        .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)));
    let mut wanted: Vec<CipherSuite> = Vec::new();
    let mut ignored = Vec::new();
    let mut accepted_by_istio = false;
    for name in names {
        let name = name.trim();
        if let Some((_, suite)) = OPENSSL_SUITES.iter().find(|(n, _)| *n == name) {
            accepted_by_istio = true;
            if wanted.contains(suite) {
                ignored.push((name.to_owned(), IgnoredReason::Duplicate));
            } else {
                wanted.push(*suite);
            }
        } else if NOT_IN_RUSTLS.contains(&name) {
            accepted_by_istio = true;
            ignored.push((name.to_owned(), IgnoredReason::NotImplemented));
        } else if TLS13_NAMES.contains(&name) {
            ignored.push((name.to_owned(), IgnoredReason::Tls13));
        } else {
            ignored.push((name.to_owned(), IgnoredReason::Unknown));
        }
    }
    let defaults = !accepted_by_istio;
    let tls12: Vec<SupportedCipherSuite> = if defaults {
        provider
            .cipher_suites
            .iter()
            .filter(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
            .copied()
            .collect()
    } else {
        wanted
            .iter()
            .filter_map(|w| provider.cipher_suites.iter().find(|s| s.suite() == *w))
            .copied()
            .collect()
    };
    CipherSuites {
        suites: tls13.copied().chain(tls12).collect(),
        ignored,
        defaults,
    }
}

/// The versions between `min` and `max` (`minProtocolVersion`, `maxProtocolVersion`)
/// that rustls serves; see the module docs.
pub fn protocol_versions(
    min: Option<TlsProtocol>,
    max: Option<TlsProtocol>,
) -> Result<Vec<&'static SupportedProtocolVersion>, ServerOptionError> {
    let max13 = match max {
        None | Some(TlsProtocol::Auto | TlsProtocol::V1_3) => true,
        Some(TlsProtocol::V1_2) => false,
        Some(TlsProtocol::V1_0 | TlsProtocol::V1_1) => {
            return Err(ServerOptionError::Version {
                field: "maxProtocolVersion",
                reason: "TLS 1.0 and 1.1 are not served (the TLS library speaks TLS 1.2 and 1.3 only)",
            });
        }
    };
    let min13 = min == Some(TlsProtocol::V1_3);
    match (min13, max13) {
        (true, false) => Err(ServerOptionError::Version {
            field: "maxProtocolVersion",
            reason: "maxProtocolVersion is lower than minProtocolVersion",
        }),
        (true, true) => Ok(vec![&rustls::version::TLS13]),
        (false, true) => Ok(vec![&rustls::version::TLS13, &rustls::version::TLS12]),
        (false, false) => Ok(vec![&rustls::version::TLS12]),
    }
}

/// SHA-256 pins of client certificates: `verifyCertificateSpki` and
/// `verifyCertificateHash`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificatePins {
    spki: Vec<[u8; 32]>,
    hashes: Vec<[u8; 32]>,
}

impl CertificatePins {
    /// Decodes the pins: `spki` in base64, `hashes` in hex with optional `:` separators.
    pub fn parse(spki: &[String], hashes: &[String]) -> Result<Self, ServerOptionError> {
        let pin_error = |field, index, value: &str, reason| ServerOptionError::Pin {
            field,
            index,
            value: value.to_owned(),
            reason,
        };
        let spki = spki
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .map_err(|_| pin_error("verifyCertificateSpki", i, v, "not base64"))?;
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
                    pin_error(
                        "verifyCertificateSpki",
                        i,
                        v,
                        "not a SHA-256 digest (32 bytes, base64)",
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let hashes = hashes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let hex: Vec<u8> = v.trim().bytes().filter(|b| *b != b':').collect();
                let bad = || {
                    pin_error(
                        "verifyCertificateHash",
                        i,
                        v,
                        "not a SHA-256 digest (64 hex digits, `:` separators allowed)",
                    )
                };
                if hex.len() != 64 {
                    return Err(bad());
                }
                let mut out = [0u8; 32];
                for (o, pair) in out.iter_mut().zip(hex.chunks(2)) {
                    let digit = |c: u8| (c as char).to_digit(16).ok_or_else(bad);
                    let (hi, lo) = (digit(pair[0])?, digit(pair[1])?);
                    *o = u8::try_from(hi * 16 + lo).map_err(|_| bad())?;
                }
                Ok(out)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { spki, hashes })
    }

    /// Whether no pin is set (every certificate passes).
    pub fn is_empty(&self) -> bool {
        self.spki.is_empty() && self.hashes.is_empty()
    }

    /// Whether `der` matches a pin (or no pin is set).
    pub fn matches(&self, der: &CertificateDer<'_>) -> bool {
        if self.is_empty() {
            return true;
        }
        let sha256 = |bytes: &[u8]| ring::digest::digest(&ring::digest::SHA256, bytes);
        if self
            .hashes
            .iter()
            .any(|h| sha256(der.as_ref()).as_ref() == h)
        {
            return true;
        }
        if self.spki.is_empty() {
            return false;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
            return false;
        };
        let spki = sha256(cert.tbs_certificate.subject_pki.raw);
        self.spki.iter().any(|p| spki.as_ref() == p)
    }
}

/// Whether the certificate carries one of `names` as a DNS (any case), URI or IP address
/// SAN (exact match). Shared with DestinationRule `subjectAltNames` ([`crate::origin`]).
pub fn carries_subject_alt_name(der: &CertificateDer<'_>, names: &[String]) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(|g| match g {
        GeneralName::DNSName(d) => names.iter().any(|n| n.eq_ignore_ascii_case(d)),
        GeneralName::URI(u) => names.iter().any(|n| n == u),
        GeneralName::IPAddress(bytes) => {
            let ip = match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                _ => None,
            };
            ip.is_some_and(|ip| names.iter().any(|n| n.parse::<IpAddr>().ok() == Some(ip)))
        }
        _ => false,
    })
}

/// A client certificate verifier that adds pins and `subjectAltNames` to another one
/// (which verifies the chain, and revocation when it has lists).
#[derive(Debug)]
pub struct ClientChecks {
    inner: Arc<dyn ClientCertVerifier>,
    pins: CertificatePins,
    subject_alt_names: Vec<String>,
}

impl ClientChecks {
    /// `inner`, then `pins`, then one of `subject_alt_names` (when not empty).
    pub fn new(
        inner: Arc<dyn ClientCertVerifier>,
        pins: CertificatePins,
        subject_alt_names: Vec<String>,
    ) -> Self {
        Self {
            inner,
            pins,
            subject_alt_names,
        }
    }
}

impl ClientCertVerifier for ClientChecks {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.pins.matches(end_entity) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        if !self.subject_alt_names.is_empty()
            && !carries_subject_alt_name(end_entity, &self.subject_alt_names)
        {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Serves one of several certificates by the client's signature algorithms: the first
/// ECDSA one the client can verify, else the first one it can verify.
#[derive(Debug)]
pub struct ByKeyType {
    keys: Vec<Arc<CertifiedKey>>,
}

impl ByKeyType {
    /// The certificates in preference order (`credentialNames` / `tlsCertificates` order).
    pub fn new(keys: Vec<Arc<CertifiedKey>>) -> Self {
        Self { keys }
    }
}

impl ResolvesServerCert for ByKeyType {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = client_hello.signature_schemes();
        let usable = || {
            self.keys
                .iter()
                .filter(|k| k.key.choose_scheme(offered).is_some())
        };
        usable()
            .find(|k| k.key.algorithm() == SignatureAlgorithm::ECDSA)
            .or_else(|| usable().next())
            .or_else(|| self.keys.first())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn listed_tls12_suites_are_kept_in_order_and_tls13_stays() {
        let names = [
            "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "NOT-A-SUITE",
            "AES128-SHA",
            "TLS_AES_128_GCM_SHA256",
        ]
        .map(String::from);
        let out = cipher_suites(&names, &provider());
        let tls12: Vec<CipherSuite> = out
            .suites
            .iter()
            .filter(|s| matches!(s, SupportedCipherSuite::Tls12(_)))
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls12,
            [
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            ]
        );
        assert_eq!(
            out.suites
                .iter()
                .filter(|s| matches!(s, SupportedCipherSuite::Tls13(_)))
                .count(),
            3
        );
        assert_eq!(
            out.ignored,
            [
                ("NOT-A-SUITE".to_owned(), IgnoredReason::Unknown),
                ("AES128-SHA".to_owned(), IgnoredReason::NotImplemented),
                ("TLS_AES_128_GCM_SHA256".to_owned(), IgnoredReason::Tls13),
            ]
        );
        assert!(!out.defaults);
    }

    #[test]
    fn only_unknown_names_keep_the_defaults_and_only_unimplemented_ones_leave_no_tls12() {
        let out = cipher_suites(&["bogus".to_owned()], &provider());
        assert!(out.defaults && out.has_tls12());
        let out = cipher_suites(&["AES256-SHA".to_owned()], &provider());
        assert!(!out.defaults && !out.has_tls12());
    }

    #[test]
    fn versions_follow_min_and_max_within_tls12_and_tls13() {
        use TlsProtocol::*;
        let v = |min, max| {
            protocol_versions(min, max).map(|v| v.iter().map(|v| v.version).collect::<Vec<_>>())
        };
        let both = Ok(vec![
            rustls::ProtocolVersion::TLSv1_3,
            rustls::ProtocolVersion::TLSv1_2,
        ]);
        assert_eq!(v(None, None), both);
        assert_eq!(v(Some(V1_0), Some(Auto)), both);
        assert_eq!(
            v(Some(V1_1), Some(V1_2)),
            Ok(vec![rustls::ProtocolVersion::TLSv1_2])
        );
        assert_eq!(
            v(Some(V1_3), None),
            Ok(vec![rustls::ProtocolVersion::TLSv1_3])
        );
        assert!(v(Some(V1_3), Some(V1_2)).is_err());
        assert!(v(None, Some(V1_1)).is_err());
    }

    #[test]
    fn pins_decode_or_name_the_bad_value() {
        let hash = "AB:".repeat(31) + "AB";
        let pins = CertificatePins::parse(
            &["q83vq83vq83vq83vq83vq83vq83vq83vq83vq83vq80=".to_owned()],
            &[hash, "ab".repeat(32)],
        )
        .unwrap();
        assert_eq!(pins.hashes, [[0xab; 32], [0xab; 32]]);
        assert_eq!(pins.spki.len(), 1);
        let e = CertificatePins::parse(&[], &["ab".repeat(31)]).unwrap_err();
        assert!(
            e.to_string().starts_with("tls.verifyCertificateHash[0]"),
            "{e}"
        );
        let e = CertificatePins::parse(&["abcd".to_owned()], &[]).unwrap_err();
        assert!(
            e.to_string().starts_with("tls.verifyCertificateSpki[0]"),
            "{e}"
        );
        let e = CertificatePins::parse(&[], &["zz".repeat(32)]).unwrap_err();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
    }

    #[test]
    fn pins_match_the_certificate_by_hash_or_by_public_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["a.example".to_owned()]).unwrap();
        let der = cert.der().clone();
        let hash = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02X}:")).collect();
        let pins = CertificatePins::parse(&[], &[hex.trim_end_matches(':').to_owned()]).unwrap();
        assert!(pins.matches(&der));
        assert!(!pins.matches(other.cert.der()));
        let spki = ring::digest::digest(
            &ring::digest::SHA256,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(spki.as_ref());
        let pins = CertificatePins::parse(&[b64], &[]).unwrap();
        assert!(pins.matches(&der));
        assert!(!pins.matches(other.cert.der()));
        // Another certificate for the same key carries the same SPKI.
        let again = rcgen::CertificateParams::new(vec!["b.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(pins.matches(again.der()));
    }

    #[test]
    fn subject_alt_names_match_by_kind() {
        let mut params =
            rcgen::CertificateParams::new(vec!["Client.Example.com".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
        ));
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let has = |n: &str| carries_subject_alt_name(cert.der(), &[n.to_owned()]);
        assert!(has("client.example.com"));
        assert!(has("spiffe://cluster.local/ns/a/sa/b"));
        assert!(!has("SPIFFE://cluster.local/ns/a/sa/b"));
        assert!(has("10.0.0.1"));
        assert!(!has("other.example.com"));
    }
}
