//! The mesh's certificate authority on the network: Istio's
//! `istio.v1.auth.IstioCertificateService` (ISTIO.md CA-01), served by `discovery` beside
//! xDS (port 15012, CA-02).
//!
//! [`CertificateService`] signs a workload's certificate signing request with the CA key,
//! which lives only in `discovery` (loaded from Istio's plug-in `cacerts` layout or
//! `ca init`'s, see [`mesh_tls::ca`]). Sidecars make their own keys and never see it.
//!
//! # Behaviour
//!
//! - **Who is calling (CA-03)**, tried in Istio's order:
//!   1. a client certificate from the mTLS handshake (a sidecar renewing): the chain the
//!      TLS server received is verified again here against the CA's roots, with the
//!      SPIFFE X.509-SVID rules, and its SPIFFE ID in the CA's trust domain is the
//!      caller. A chain that does not verify is not an error by itself: the token is
//!      tried next;
//!   2. the metadata `authorization: Bearer <token>`: a Kubernetes service-account
//!      token, checked by a `TokenReview` on the API server with the audiences of
//!      [`CaOptions::audiences`] (`istio-ca`). The review must say authenticated, for
//!      one of those audiences, for a user in the `system:serviceaccounts` group named
//!      `system:serviceaccount:<namespace>:<service account>`.
//!
//!   Anything else is `Unauthenticated` with Istio's message ("request authenticate
//!   failure"); the reason is logged, never sent.
//! - **What is issued (CA-04)**: the caller's identity
//!   `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`, with the CSR's public
//!   key only. A CSR naming another service account gets a certificate for the caller,
//!   as from istiod. Metadata `ImpersonatedIdentity` is refused with `Unauthenticated`
//!   (istiod honours it only for node agents in `CA_TRUSTED_NODE_ACCOUNTS`; there are
//!   none here).
//! - **Lifetime (CA-05)**: `validity_duration` ≤ 0 gets the CA's default (24 h); more
//!   than the maximum (90 days) is `InvalidArgument`; a CSR that cannot be parsed or
//!   whose signature does not verify is `InvalidArgument`; a CA that cannot sign (an
//!   expired chain, a signing failure) is `Internal`.
//! - **Response (CA-06)**: the leaf, each intermediate, the root last, one PEM
//!   certificate per element, each ending in a newline.
//!
//! # Choices that differ from Istio
//!
//! - Tokens must be bound to an audience of [`CaOptions::audiences`]: istiod also accepts
//!   unbound (legacy, audience-less) tokens unless `REQUIRE_3P_TOKEN` is set.
//! - One cluster: the `clusterid` metadata is not read (istiod picks a remote cluster's
//!   API server with it).
//! - The `CertSigner` metadata (istiod's per-signer chains for external signers) is not
//!   read.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use mesh_proxy::discovery::ca::{CaOptions, CertificateService};
//! use mesh_tls::CertificateAuthority;
//!
//! let ca = Arc::new(CertificateAuthority::load_plugin("/etc/cacerts".as_ref(), "cluster.local")?);
//! let client = kube::Client::try_default().await?;
//! let service = CertificateService::new(ca, client, CaOptions::default());
//! tonic::transport::Server::builder()
//!     .add_service(service.into_service())
//!     .serve("0.0.0.0:15012".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, PostParams};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use mesh_core::Identity;
use mesh_tls::ca::CaError;
use mesh_tls::{CertificateAuthority, TrustBundle};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::{Request, Response, Status};

pub use crate::proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

/// Istio's default token audience (`TOKEN_AUDIENCES`).
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// The metadata key of an impersonation request (Istio's `ImpersonatedIdentity`).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// Istio's answer to every caller that could not be authenticated.
const AUTHN_FAILURE: &str = "request authenticate failure";

/// How the certificate service authenticates callers.
#[derive(Clone, Debug)]
pub struct CaOptions {
    /// The audiences a service-account token must be bound to (`["istio-ca"]`).
    pub audiences: Vec<String>,
    /// Whether a caller with a valid mesh client certificate may renew for its own
    /// identity without a token (CA-03 b; on by default, as in istiod).
    pub client_certificates: bool,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            audiences: vec![DEFAULT_AUDIENCE.to_owned()],
            client_certificates: true,
        }
    }
}

/// Why a caller was not authenticated (logged, never sent to the caller).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No usable credential: no valid client certificate and no bearer token.
    #[error("no bearer token in the `authorization` metadata and no valid client certificate")]
    NoCredential,
    /// The TokenReview call failed.
    #[error("TokenReview failed: {0}")]
    Review(#[source] ::kube::Error),
    /// The API server did not authenticate the token.
    #[error("token not authenticated: {0}")]
    Rejected(String),
    /// The token is valid but does not name a service account.
    #[error("token is not a service account's: {0}")]
    NotServiceAccount(String),
}

/// Who called, and how we know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's namespace.
    pub namespace: String,
    /// The caller's service account.
    pub service_account: String,
    /// How the caller was authenticated.
    pub source: CallerSource,
}

/// How a [`Caller`] was authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerSource {
    /// A mesh client certificate (renewal).
    ClientCertificate,
    /// A Kubernetes service-account token, by TokenReview.
    Token,
}

/// The `IstioCertificateService` implementation: authenticates, then signs with the CA.
#[derive(Clone)]
pub struct CertificateService {
    ca: Arc<CertificateAuthority>,
    client: ::kube::Client,
    options: CaOptions,
    /// The CA's roots and trust domain, for client certificates.
    bundle: Option<Arc<TrustBundle>>,
}

impl std::fmt::Debug for CertificateService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateService")
            .field("ca", &self.ca)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl CertificateService {
    /// A service signing with `ca`, reviewing tokens through `client`.
    pub fn new(ca: Arc<CertificateAuthority>, client: ::kube::Client, options: CaOptions) -> Self {
        let bundle = if options.client_certificates {
            match TrustBundle::new(ca.roots_der().to_vec(), vec![ca.trust_domain().to_owned()]) {
                Ok(bundle) => Some(Arc::new(bundle)),
                Err(e) => {
                    tracing::warn!(error = %e, "client-certificate renewal disabled: the CA's roots make no trust bundle");
                    None
                }
            }
        } else {
            None
        };
        Self {
            ca,
            client,
            options,
            bundle,
        }
    }

    /// The tonic service to mount on the gRPC server.
    pub fn into_service(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
    }

    /// Authenticates the caller of `request` (client certificate first, then token).
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, AuthError> {
        if let Some(caller) = self.client_certificate(request) {
            return Ok(caller);
        }
        let token = bearer_token(request).ok_or(AuthError::NoCredential)?;
        self.review(token).await
    }

    fn client_certificate<T>(&self, request: &Request<T>) -> Option<Caller> {
        let bundle = self.bundle.as_ref()?;
        // tonic's own TLS, or discovery's server (`xds::serve`), which keeps them here.
        let certs: Vec<_> = match request.peer_certs() {
            Some(certs) => certs.to_vec(),
            None => request
                .extensions()
                .get::<super::xds::PeerInfo>()?
                .certificates
                .to_vec(),
        };
        let (leaf, intermediates) = certs.split_first()?;
        match verify_peer(bundle, leaf, intermediates) {
            Ok(identity) => Some(Caller {
                namespace: identity.namespace()?.to_owned(),
                service_account: identity.service_account()?.to_owned(),
                source: CallerSource::ClientCertificate,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "client certificate not accepted for renewal; trying the token");
                None
            }
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(self.options.audiences.clone()),
                token: Some(token.to_owned()),
            },
            ..TokenReview::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let done = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::Review)?;
        let status = done
            .status
            .ok_or_else(|| AuthError::Rejected("the review has no status".into()))?;
        if let Some(error) = status.error.filter(|e| !e.is_empty()) {
            return Err(AuthError::Rejected(error));
        }
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected("not authenticated".into()));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.iter().any(|a| self.options.audiences.contains(a)) {
            return Err(AuthError::Rejected(format!(
                "token audiences {audiences:?} do not include {:?}",
                self.options.audiences
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let in_group = user
            .groups
            .unwrap_or_default()
            .iter()
            .any(|g| g == "system:serviceaccounts");
        let parts: Vec<&str> = username.split(':').collect();
        match parts.as_slice() {
            ["system", "serviceaccount", namespace, service_account]
                if in_group && !namespace.is_empty() && !service_account.is_empty() =>
            {
                Ok(Caller {
                    namespace: (*namespace).to_owned(),
                    service_account: (*service_account).to_owned(),
                    source: CallerSource::Token,
                })
            }
            _ => Err(AuthError::NotServiceAccount(username)),
        }
    }
}

/// The token of `authorization: Bearer <token>`, if any.
fn bearer_token<T>(request: &Request<T>) -> Option<&str> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}

fn verify_peer(
    bundle: &TrustBundle,
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
) -> Result<Identity, rustls::Error> {
    bundle
        .verify_client(leaf, intermediates, UnixTime::now())
        .map(|leaf| leaf.identity)
}

/// The gRPC status of a signing failure (CA-05).
fn sign_status(err: &CaError) -> Status {
    match err {
        CaError::Csr(_) | CaError::TtlTooLong { .. } => {
            Status::invalid_argument(format!("CSR signing error ({err})"))
        }
        _ => Status::internal(format!("CSR signing error ({err})")),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = match self.authenticate(&request).await {
            Ok(caller) => caller,
            Err(e) => {
                let remote = request.remote_addr();
                tracing::warn!(error = %e, ?remote, "certificate request not authenticated");
                return Err(Status::unauthenticated(AUTHN_FAILURE));
            }
        };
        let body = request.into_inner();
        // As istiod: only a non-empty string value asks for impersonation.
        let impersonating = body
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s),
                _ => None,
            })
            .is_some_and(|s| !s.is_empty());
        if impersonating {
            tracing::warn!(
                namespace = %caller.namespace,
                service_account = %caller.service_account,
                "impersonation refused: no trusted node accounts"
            );
            return Err(Status::unauthenticated(
                "request impersonation authentication failure",
            ));
        }
        let ttl = u64::try_from(body.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let ca = self.ca.clone();
        let signed = tokio::task::spawn_blocking(move || {
            ca.sign_csr(&body.csr, &caller.namespace, &caller.service_account, ttl)
                .map(|signed| (signed, caller))
        })
        .await
        .map_err(|e| Status::internal(format!("CSR signing error ({e})")))?;
        match signed {
            Ok((signed, caller)) => {
                tracing::info!(
                    identity = %signed.identity(),
                    serial = %signed.serial(),
                    source = ?caller.source,
                    "issued workload certificate"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: signed.chain_pem(),
                }))
            }
            Err(e) => {
                tracing::warn!(error = %e, "CSR signing failed");
                Err(sign_status(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_needs_the_scheme_and_a_value() {
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().unwrap());
            bearer_token(&r).map(str::to_owned)
        };
        assert_eq!(with("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(bearer_token(&Request::new(())), None);
    }

    #[test]
    fn bad_requests_are_invalid_arguments_and_ca_failures_internal() {
        assert_eq!(
            sign_status(&CaError::Csr("x".into())).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            sign_status(&CaError::TtlTooLong {
                requested: Duration::from_secs(2),
                max: Duration::from_secs(1)
            })
            .code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            sign_status(&CaError::ChainExpired(std::time::SystemTime::UNIX_EPOCH)).code(),
            tonic::Code::Internal
        );
    }
}
