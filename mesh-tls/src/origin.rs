//! TLS origination: the client side of DestinationRule `tls` modes `SIMPLE` and `MUTUAL`
//! (ISTIO.md DR-50, DR-51..DR-54), for upstreams that speak TLS but are not in the mesh.
//!
//! # Behaviour
//!
//! [`Origination::from_settings`] reads the files a rule names once, when the
//! destination's stack is built, and keeps two rustls client configs (ALPN `h2` +
//! `http/1.1`, and `http/1.1` only):
//!
//! - the server's chain is verified against `caCertificates` (a PEM file). There is no
//!   system trust store here: without `caCertificates` the settings are refused unless
//!   `insecureSkipVerify: true` (Istio would use the operating system's roots; DR-52);
//! - with `subjectAltNames`, the server certificate must carry one of them as a DNS,
//!   URI or IP SAN (exact match, DNS names without case); without, it must be valid for
//!   the SNI name, as Envoy's automatic SAN validation does (DR-53);
//! - with `caCrl` (a PEM file of one or more CRLs), the server's chain is also checked
//!   for revocation by rustls's webpki verifier: a certificate a list revokes is refused.
//!   As Envoy does by default (`only_verify_leaf_cert_crl: false`), every certificate of
//!   the chain below the trust anchor is checked, and one whose issuer has no list in the
//!   file is refused too (its status is unknown); an expired list still counts;
//! - `insecureSkipVerify: true` accepts any certificate (the handshake signature is
//!   still checked; `caCrl` is then not read);
//! - `MUTUAL` presents `clientCertificate` with `privateKey`. `credentialName` is not
//!   read: Istio's own sidecars use the file paths and read `credentialName` only when
//!   the rule has a `workloadSelector` (its API reference: "applicable at sidecars only if
//!   DestinationRule has a workloadSelector. Otherwise the field will be applicable only at
//!   gateways, and sidecars will continue to use the certificate paths"); a rule's
//!   `workloadSelector` is not enforced here, so sidecars keep the file paths (DR-54);
//! - SNI is `sni` when set, else the destination host (the caller decides, see
//!   [`Origination::sni`]; Istio takes the request's authority, DR-53).
//!
//! # Errors
//!
//! [`OriginationError`] says which field is missing or which file could not be read.
//! A handshake that fails verification fails the connection attempt (the HTTP client
//! reports 503 `UF`).

use std::path::Path;
use std::sync::Arc;

use mesh_core::config::{ClientTlsMode, ClientTlsSettings};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::connect::Alpn;
use crate::svid::{SvidError, read_certs, read_key};

/// Client configs for TLS origination to one destination.
#[derive(Clone, Debug)]
pub struct Origination {
    negotiate: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    /// No ALPN: TCP connections (the stream is the application's own protocol).
    opaque: Arc<ClientConfig>,
    sni: Option<String>,
}

/// Settings that cannot originate TLS.
#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    /// The mode is not `SIMPLE` or `MUTUAL`.
    #[error("tls.mode is not SIMPLE or MUTUAL")]
    NotOrigination,
    /// No way to verify the server.
    #[error(
        "tls.caCertificates is required to verify the server (no system trust store is used); \
         set insecureSkipVerify: true to skip verification"
    )]
    NoRoots,
    /// `MUTUAL` without the client certificate files.
    #[error("MUTUAL needs clientCertificate and privateKey files (credentialName is not read)")]
    NoClientCertificate,
    /// A file could not be read or parsed.
    #[error("tls.{field} ({path}): {source}")]
    File {
        /// The field naming the file.
        field: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: SvidError,
    },
    /// The `caCrl` file could not be read or holds no usable list.
    #[error("tls.caCrl ({path}): {reason}")]
    Crl {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the settings (for instance a key that does not match).
    #[error("invalid TLS settings: {0}")]
    Tls(#[from] rustls::Error),
}

impl Origination {
    /// Reads the files `tls` names and builds the client configs.
    pub fn from_settings(tls: &ClientTlsSettings) -> Result<Self, OriginationError> {
        let mutual = match tls.mode {
            Some(ClientTlsMode::Simple) => false,
            Some(ClientTlsMode::Mutual) => true,
            _ => return Err(OriginationError::NotOrigination),
        };
        let insecure = tls.insecure_skip_verify == Some(true);
        let roots = match (&tls.ca_certificates, insecure) {
            (_, true) => None,
            (Some(path), false) => {
                let mut store = RootCertStore::empty();
                for cert in read_certs(Path::new(path)).map_err(file("caCertificates", path))? {
                    store.add(cert)?;
                }
                Some(Arc::new(store))
            }
            (None, false) => return Err(OriginationError::NoRoots),
        };
        let client_auth = if mutual {
            let (Some(cert), Some(key)) = (&tls.client_certificate, &tls.private_key) else {
                return Err(OriginationError::NoClientCertificate);
            };
            let chain = read_certs(Path::new(cert)).map_err(file("clientCertificate", cert))?;
            let key = read_key(Path::new(key)).map_err(file("privateKey", key))?;
            Some((chain, key))
        } else {
            None
        };
        let provider = crate::provider();
        let revocation = match (&roots, &tls.ca_crl) {
            (Some(roots), Some(path)) if !path.is_empty() => {
                Some(revocation_verifier(roots, path, &provider)?)
            }
            _ => None,
        };
        let verifier = Arc::new(OriginVerifier {
            roots,
            revocation,
            subject_alt_names: tls.subject_alt_names.clone(),
            provider: provider.clone(),
        });
        let build = |alpn: Alpn| -> Result<Arc<ClientConfig>, OriginationError> {
            let builder = ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(crate::PROTOCOL_VERSIONS)?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone());
            let mut config = match &client_auth {
                Some((chain, key)) => {
                    builder.with_client_auth_cert(chain.clone(), key.clone_key())?
                }
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = match alpn {
                // TCP carries the application's own protocol: no ALPN of ours.
                Alpn::Tcp => Vec::new(),
                _ => alpn.protocols().iter().map(|p| p.to_vec()).collect(),
            };
            Ok(Arc::new(config))
        };
        Ok(Self {
            negotiate: build(Alpn::Negotiate)?,
            http1: build(Alpn::Http1)?,
            opaque: build(Alpn::Tcp)?,
            sni: tls.sni.clone().filter(|s| !s.is_empty()),
        })
    }

    /// The config offering `alpn`.
    pub fn config(&self, alpn: Alpn) -> Arc<ClientConfig> {
        match alpn {
            Alpn::Negotiate => self.negotiate.clone(),
            Alpn::Http1 => self.http1.clone(),
            Alpn::Tcp => self.opaque.clone(),
        }
    }

    /// The SNI the rule sets (`tls.sni`), if any.
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }
}

/// rustls's webpki verifier over `roots` with the lists of the PEM file `path`.
fn revocation_verifier(
    roots: &Arc<RootCertStore>,
    path: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, OriginationError> {
    let crl_error = |reason: String| OriginationError::Crl {
        path: path.to_owned(),
        reason,
    };
    let crls = crate::server_options::read_crls(Path::new(path)).map_err(crl_error)?;
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| crl_error(e.to_string()))
}

/// Maps a file error to the field that names the file.
fn file(field: &'static str, path: &str) -> impl FnOnce(SvidError) -> OriginationError {
    let path = path.to_owned();
    move |source| OriginationError::File {
        field,
        path,
        source,
    }
}

/// Verifies an origination server: chain to the configured roots, then the names.
#[derive(Debug)]
struct OriginVerifier {
    /// `None`: `insecureSkipVerify`.
    roots: Option<Arc<RootCertStore>>,
    /// With `caCrl`: the chain (revocation included) is checked by rustls's verifier.
    revocation: Option<Arc<WebPkiServerVerifier>>,
    subject_alt_names: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for OriginVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        match &self.revocation {
            // rustls's verifier checks the chain and its revocation, then the name
            // against the SNI: a name error means the chain passed, and the name is
            // checked below as the rule says (SNI or `subjectAltNames`).
            Some(webpki) => match webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Ok(_)
                | Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => {}
                Err(e) => return Err(e),
            },
            None => rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?,
        }
        if self.subject_alt_names.is_empty() {
            rustls::client::verify_server_name(&parsed, server_name)?;
        } else if !crate::server_options::carries_subject_alt_name(
            end_entity,
            &self.subject_alt_names,
        ) {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
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

    fn settings(mode: ClientTlsMode) -> ClientTlsSettings {
        ClientTlsSettings {
            mode: Some(mode),
            ..ClientTlsSettings::default()
        }
    }

    #[test]
    fn simple_without_roots_is_refused_unless_verification_is_skipped() {
        assert!(matches!(
            Origination::from_settings(&settings(ClientTlsMode::Simple)),
            Err(OriginationError::NoRoots)
        ));
        let mut s = settings(ClientTlsMode::Simple);
        s.insecure_skip_verify = Some(true);
        s.sni = Some("api.example.com".into());
        let o = Origination::from_settings(&s).expect("insecure SIMPLE");
        assert_eq!(o.sni(), Some("api.example.com"));
        assert_eq!(
            o.config(Alpn::Http1).alpn_protocols,
            vec![b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn mutual_needs_the_files_a_credential_name_does_not_replace() {
        let mut s = settings(ClientTlsMode::Mutual);
        s.insecure_skip_verify = Some(true);
        assert!(matches!(
            Origination::from_settings(&s),
            Err(OriginationError::NoClientCertificate)
        ));
        s.credential_name = Some("client-credential".into());
        assert!(matches!(
            Origination::from_settings(&s),
            Err(OriginationError::NoClientCertificate)
        ));
        assert!(matches!(
            Origination::from_settings(&settings(ClientTlsMode::IstioMutual)),
            Err(OriginationError::NotOrigination)
        ));
    }

    #[test]
    fn a_missing_ca_file_names_the_field() {
        let mut s = settings(ClientTlsMode::Simple);
        s.ca_certificates = Some("/nonexistent/ca.pem".into());
        let e = Origination::from_settings(&s).expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("tls.caCertificates (/nonexistent/ca.pem)"),
            "{e}"
        );
    }

    #[test]
    fn an_unusable_crl_file_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::CertificateAuthority::new("example.com").unwrap();
        let roots = dir.path().join("ca.pem");
        std::fs::write(&roots, ca.root_pem()).unwrap();
        let mut s = settings(ClientTlsMode::Simple);
        s.ca_certificates = Some(roots.display().to_string());
        // A file without a CRL, then no file.
        s.ca_crl = Some(roots.display().to_string());
        let e = Origination::from_settings(&s).expect_err("no CRL in the file");
        assert!(e.to_string().starts_with("tls.caCrl ("), "{e}");
        s.ca_crl = Some("/nonexistent/crl.pem".into());
        let e = Origination::from_settings(&s).expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("tls.caCrl (/nonexistent/crl.pem)"),
            "{e}"
        );
        // A list the CA signed is taken.
        let crl = dir.path().join("crl.pem");
        let pem = ca
            .revocation_list_pem(&[], 1, std::time::Duration::from_secs(60))
            .unwrap();
        std::fs::write(&crl, pem).unwrap();
        s.ca_crl = Some(crl.display().to_string());
        Origination::from_settings(&s).expect("a valid list");
    }
}
