//! The sidecar's workload certificate from the `discovery` control plane, by CSR, and
//! its rotation (ISTIO.md CA-07, CA-10, CA-11).
//!
//! # Behaviour
//!
//! - **Key**: made in the sidecar for every certificate, never sent anywhere: ECDSA P-256
//!   (Istio's `ECC_SIGNATURE_ALGORITHM=ECDSA` option; Istio's default is RSA 2048, which
//!   the ring backend cannot generate).
//! - **Request**: a CSR signed by that key with the workload's SPIFFE ID as its only SAN,
//!   the lifetime asked for ([`CaClientOptions::ttl`], Istio's `SECRET_TTL`, 24 h), and
//!   the projected service-account token ([`CaClientOptions::token_file`],
//!   `/var/run/secrets/tokens/istio-token`, audience `istio-ca`), read afresh for every
//!   request since the kubelet refreshes it, in the metadata `authorization: Bearer`.
//! - **Transport**: gRPC over TLS to [`CaClientOptions::address`]; `discovery`'s serving
//!   certificate must chain to the mesh root in [`CaClientOptions::root_cert`] and name
//!   [`CaClientOptions::server_name`] (the address's host by default), as Istio's agent
//!   checks istiod.
//! - **Answer**: the leaf must carry the workload's own identity and chain, through the
//!   intermediates sent, to a root of the root-cert file. The trust bundle is that file,
//!   re-read at every request: the root the server sends last is not trusted for being
//!   sent.
//! - **Rotation**: [`CertificateClient::spawn_rotation`] renews at Istio's point, when
//!   `expire − lifetime × r` is reached with r = 0.5 ± up to 0.01 uniform jitter (CA-10;
//!   a 24 h certificate is renewed 11.76–12.24 h after issue), and at once on
//!   [`CertStore::rotate_now`]. The new key and certificate go into the workload's
//!   [`CertStore`]: new handshakes use them, established connections keep theirs. A
//!   failed renewal keeps the current certificate and is retried with exponential
//!   back-off ([`CaClientOptions::retry_initial`] doubling up to
//!   [`CaClientOptions::retry_max`], each wait drawn in its upper half).
//!
//! # Choices that differ from Istio
//!
//! - ECDSA P-256 keys only (above).
//! - The trust bundle comes from the root-cert file (Istio's `istio-ca-root-cert`
//!   ConfigMap, CA-22), not from the last element of the CA's answer.
//! - The certificate goes straight into the proxy's rustls store; there is no SDS hop
//!   between an agent and Envoy.
//!
//! # Errors
//!
//! [`CertificateError`]: the token or root file cannot be read, the address is invalid,
//! the call failed (its gRPC status is kept), or the answer is unusable.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_core::Identity;
//! use mesh_proxy::control::certificates::{CaClientOptions, CertificateClient};
//!
//! let identity = Identity::from_istio("cluster.local", "production", "order-service")?;
//! let options = CaClientOptions::new(
//!     "https://istiod.istio-system.svc:15012",
//!     "/var/run/secrets/istio/root-cert.pem",
//!     identity,
//! );
//! let client = CertificateClient::new(options);
//! let store = client.store().await?;
//! let rotation = client.spawn_rotation(store.clone());
//! // ... build the mesh with `Certificates::Store(store)`; keep `rotation` alive.
//! # drop(rotation);
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mesh_core::Identity;
use mesh_tls::ca::CaError;
use mesh_tls::svid::{self, SvidFiles, SvidLeaf};
use mesh_tls::{CertStore, StoreError, TrustBundle, WorkloadKey};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::proto::istio::v1::auth::IstioCertificateRequest;
use crate::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

/// Where Kubernetes projects the sidecar's `istio-ca` token (CA-07).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
/// The lifetime the sidecar asks for (Istio's `SECRET_TTL`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's `SECRET_GRACE_PERIOD_RATIO`.
pub const GRACE_RATIO: f64 = 0.5;
/// Istio's `SECRET_GRACE_PERIOD_RATIO_JITTER`.
pub const GRACE_JITTER: f64 = 0.01;

/// Where and how the sidecar asks for its certificate.
#[derive(Clone, Debug)]
pub struct CaClientOptions {
    /// The certificate service: `https://host:port`, or `host:port` (TLS is implied).
    pub address: String,
    /// The name `discovery`'s serving certificate must carry; the address's host when
    /// `None`.
    pub server_name: Option<String>,
    /// The mesh root(s), PEM (`root-cert.pem`): verifies `discovery` and becomes the
    /// workload's trust bundle.
    pub root_cert: PathBuf,
    /// The projected service-account token.
    pub token_file: PathBuf,
    /// The identity the certificate must carry.
    pub identity: Identity,
    /// The lifetime asked for.
    pub ttl: Duration,
    /// The share of the lifetime left when renewing (0.5).
    pub grace_ratio: f64,
    /// The largest random change to `grace_ratio` (0.01).
    pub grace_jitter: f64,
    /// The first wait after a failed renewal (1 s).
    pub retry_initial: Duration,
    /// The longest wait between failed renewals (5 min).
    pub retry_max: Duration,
    /// How long one request may take, connection included (30 s); `None` for no limit.
    pub request_timeout: Option<Duration>,
}

impl CaClientOptions {
    /// Options with Istio's defaults for `identity`, asking `address` and trusting
    /// `root_cert`.
    pub fn new(
        address: impl Into<String>,
        root_cert: impl Into<PathBuf>,
        identity: Identity,
    ) -> Self {
        Self {
            address: address.into(),
            server_name: None,
            root_cert: root_cert.into(),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            identity,
            ttl: DEFAULT_TTL,
            grace_ratio: GRACE_RATIO,
            grace_jitter: GRACE_JITTER,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            request_timeout: Some(Duration::from_secs(30)),
        }
    }

    /// Sets the token file.
    #[must_use]
    pub fn token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = path.into();
        self
    }

    /// Sets the name checked on `discovery`'s certificate.
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Sets the lifetime asked for.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the time limit of one request (`None`: no limit).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the back-off after failed renewals.
    #[must_use]
    pub fn retry(mut self, initial: Duration, max: Duration) -> Self {
        self.retry_initial = initial;
        self.retry_max = max;
        self
    }

    fn uri(&self) -> String {
        if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("https://{}", self.address)
        }
    }
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateError {
    /// The token file cannot be read or is empty.
    #[error("token {path}: {what}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// The root-cert file cannot be read.
    #[error(transparent)]
    Roots(svid::SvidError),
    /// The address or TLS settings are unusable.
    #[error("certificate service address {address:?}: {what}")]
    Address {
        /// The address.
        address: String,
        /// What is wrong.
        what: String,
    },
    /// The connection failed.
    #[error("cannot reach the certificate service at {address}: {source}")]
    Connect {
        /// The address.
        address: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The service answered with an error.
    #[error("the certificate service answered {:?}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
    /// The request took longer than the limit.
    #[error("the certificate service did not answer within {0:?}")]
    Timeout(Duration),
    /// The key or CSR could not be made.
    #[error("cannot make the key or CSR: {0}")]
    Csr(#[from] CaError),
    /// The answer is not a usable certificate for this workload.
    #[error("unusable answer from the certificate service: {0}")]
    Answer(String),
    /// The certificate store refused the certificate.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CertificateError {
    /// The gRPC status, when the service answered with an error.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Refused(status) => Some(status),
            _ => None,
        }
    }
}

/// A certificate obtained by CSR: key, chain and the trust bundle it verified against.
#[derive(Debug)]
pub struct FetchedSvid {
    /// Leaf and intermediates, the locally made key, the roots of the root-cert file.
    pub files: SvidFiles,
    /// Identity, serial and validity of the leaf.
    pub leaf: SvidLeaf,
}

/// Asks `discovery` for the workload's certificate and keeps it fresh.
#[derive(Debug)]
pub struct CertificateClient {
    options: CaClientOptions,
    rng: Mutex<SmallRng>,
}

impl CertificateClient {
    /// A client with `options`.
    pub fn new(options: CaClientOptions) -> Self {
        Self {
            options,
            rng: Mutex::new(SmallRng::from_rng(&mut rand::rng())),
        }
    }

    /// Seeds the jitter so tests are deterministic.
    #[must_use]
    pub fn with_seed(self, seed: u64) -> Self {
        Self {
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
            ..self
        }
    }

    /// The options.
    pub fn options(&self) -> &CaClientOptions {
        &self.options
    }

    /// Makes a key, sends a CSR and checks the answer.
    pub async fn fetch(&self) -> Result<FetchedSvid, CertificateError> {
        let options = &self.options;
        let fetch = self.fetch_inner();
        match options.request_timeout {
            Some(limit) => tokio::time::timeout(limit, fetch)
                .await
                .map_err(|_| CertificateError::Timeout(limit))?,
            None => fetch.await,
        }
    }

    async fn fetch_inner(&self) -> Result<FetchedSvid, CertificateError> {
        let options = &self.options;
        let token = read_token(options)?;
        let roots = svid::read_certs(&options.root_cert).map_err(CertificateError::Roots)?;
        let root_pem = std::fs::read(&options.root_cert).map_err(|e| {
            CertificateError::Roots(svid::SvidError::Io {
                path: options.root_cert.clone(),
                source: e,
            })
        })?;

        let key = WorkloadKey::generate()?;
        let csr = key.csr_pem(&options.identity)?;

        let address = options.uri();
        let bad_address = |what: String| CertificateError::Address {
            address: address.clone(),
            what,
        };
        let endpoint =
            Endpoint::from_shared(address.clone()).map_err(|e| bad_address(e.to_string()))?;
        let server_name = match &options.server_name {
            Some(name) => name.clone(),
            None => endpoint
                .uri()
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                .ok_or_else(|| bad_address("no host".into()))?,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(server_name);
        let channel = endpoint
            .tls_config(tls)
            .map_err(|e| bad_address(e.to_string()))?
            .connect()
            .await
            .map_err(|source| CertificateError::Connect {
                address: address.clone(),
                source,
            })?;
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(options.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: None,
        });
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|_| CertificateError::Token {
                path: options.token_file.clone(),
                what: "not a valid header value".into(),
            })?;
        request.metadata_mut().insert("authorization", bearer);
        let response = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map_err(CertificateError::Refused)?
            .into_inner();

        let mut certs = Vec::new();
        for pem in &response.cert_chain {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                certs.push(cert.map_err(|e| CertificateError::Answer(e.to_string()))?);
            }
        }
        // The last element is the CA's root, trusted only through the root-cert file.
        if certs.len() > 1 {
            certs.pop();
        }
        if certs.is_empty() {
            return Err(CertificateError::Answer("no certificate".into()));
        }
        let bundle = TrustBundle::new(
            roots.clone(),
            vec![options.identity.trust_domain().to_owned()],
        )
        .map_err(|e| CertificateError::Answer(format!("root-cert file: {e}")))?;
        let leaf = bundle
            .verify_client(&certs[0], &certs[1..], UnixTime::now())
            .map_err(|e| {
                CertificateError::Answer(format!(
                    "the certificate does not verify against the mesh root: {e}"
                ))
            })?;
        if leaf.identity != options.identity {
            return Err(CertificateError::Answer(format!(
                "issued for {}, expected {}",
                leaf.identity, options.identity
            )));
        }
        Ok(FetchedSvid {
            files: SvidFiles {
                chain: certs,
                key: key.key_der(),
                roots,
            },
            leaf,
        })
    }

    /// Fetches a certificate and makes a store serving it.
    pub async fn store(&self) -> Result<Arc<CertStore>, CertificateError> {
        Ok(CertStore::new(self.fetch().await?.files)?)
    }

    /// Time from now until the certificate `leaf` should be renewed: until
    /// `not_after − lifetime × r`, r = grace ± jitter clamped to [0, 1] (CA-10); zero if
    /// that point has passed.
    pub fn rotation_delay(&self, leaf: &SvidLeaf) -> Duration {
        let lifetime = leaf
            .not_after
            .duration_since(leaf.not_before)
            .unwrap_or_default();
        let jitter = self.options.grace_jitter.abs();
        let offset = if jitter > 0.0 {
            self.rng
                .lock()
                .map(|mut rng| rng.random_range(-jitter..=jitter))
                .unwrap_or(0.0)
        } else {
            0.0
        };
        let ratio = (self.options.grace_ratio + offset).clamp(0.0, 1.0);
        let renew_at = leaf.not_after - lifetime.mul_f64(ratio);
        renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// The wait before retry number `failures` (1 for the first): initial × 2^(n−1),
    /// capped, drawn in its upper half.
    pub fn retry_delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let full = self
            .options
            .retry_initial
            .saturating_mul(1u32 << exp)
            .min(self.options.retry_max);
        let share = self
            .rng
            .lock()
            .map(|mut rng| rng.random_range(0.5..=1.0))
            .unwrap_or(1.0);
        full.mul_f64(share)
    }

    /// Renews the certificate in `store` at Istio's point for as long as the handle
    /// lives. Timers are tokio's, so tests can drive them with a paused clock.
    pub fn spawn_rotation(self, store: Arc<CertStore>) -> RotationHandle {
        let (tx, rx) = watch::channel(RotationStatus::default());
        let mut deadline = tokio::time::Instant::now() + self.rotation_delay(&store.current().leaf);
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                tx.send_modify(|s| s.next_attempt = Some(deadline));
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = store.rotation_requested() => {}
                }
                let result = match self.fetch().await {
                    Ok(fetched) => store.install(fetched.files).map_err(CertificateError::from),
                    Err(e) => Err(e),
                };
                let delay = match result {
                    Ok(serial) => {
                        failures = 0;
                        tx.send_modify(|s| {
                            s.renewals += 1;
                            s.failures = 0;
                            s.last_error = None;
                        });
                        tracing::info!(%serial, "workload certificate renewed");
                        self.rotation_delay(&store.current().leaf)
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let delay = self.retry_delay(failures);
                        tracing::warn!(error = %e, failures, retry_in = ?delay, "workload certificate renewal failed; keeping the current one");
                        tx.send_modify(|s| {
                            s.failures = failures;
                            s.last_error = Some(e.to_string());
                        });
                        delay
                    }
                };
                deadline = tokio::time::Instant::now() + delay;
            }
        });
        RotationHandle { task, status: rx }
    }
}

/// Where the rotation stands; see [`RotationHandle::status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationStatus {
    /// Certificates renewed so far.
    pub renewals: u64,
    /// Failed renewals since the last success.
    pub failures: u32,
    /// The last failure, until a renewal succeeds.
    pub last_error: Option<String>,
    /// When the next renewal is due.
    pub next_attempt: Option<tokio::time::Instant>,
}

/// The running rotation; dropping it stops renewing.
#[derive(Debug)]
pub struct RotationHandle {
    task: JoinHandle<()>,
    status: watch::Receiver<RotationStatus>,
}

impl RotationHandle {
    /// Changes of the rotation's status.
    pub fn status(&self) -> watch::Receiver<RotationStatus> {
        self.status.clone()
    }
}

impl Drop for RotationHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read_token(options: &CaClientOptions) -> Result<String, CertificateError> {
    let token =
        std::fs::read_to_string(&options.token_file).map_err(|e| CertificateError::Token {
            path: options.token_file.clone(),
            what: e.to_string(),
        })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(CertificateError::Token {
            path: options.token_file.clone(),
            what: "empty".into(),
        });
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> CertificateClient {
        let identity = Identity::from_istio("cluster.local", "ns", "sa").unwrap();
        CertificateClient::new(CaClientOptions::new(
            "discovery:15012",
            "/roots.pem",
            identity,
        ))
        .with_seed(11)
    }

    fn leaf(issued_ago: Duration, lifetime: Duration) -> SvidLeaf {
        let not_before = SystemTime::now() - issued_ago;
        SvidLeaf {
            identity: Identity::from_istio("cluster.local", "ns", "sa").unwrap(),
            serial: svid::Serial::from(&[1u8][..]),
            not_before,
            not_after: not_before + lifetime,
        }
    }

    #[test]
    fn a_day_long_certificate_is_renewed_between_11_76_and_12_24_hours() {
        let client = client();
        let day = Duration::from_secs(24 * 3600);
        let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
        for _ in 0..500 {
            let delay = client.rotation_delay(&leaf(Duration::ZERO, day));
            min = min.min(delay);
            max = max.max(delay);
        }
        assert!(min >= day.mul_f64(0.49) - Duration::from_secs(1), "{min:?}");
        assert!(max <= day.mul_f64(0.51), "{max:?}");
        assert!(
            max - min > Duration::from_secs(20 * 60),
            "jitter spread {:?}",
            max - min
        );
    }

    #[test]
    fn a_certificate_past_its_renewal_point_is_renewed_at_once() {
        let hour = Duration::from_secs(3600);
        assert_eq!(
            client().rotation_delay(&leaf(hour.mul_f64(0.9), hour)),
            Duration::ZERO
        );
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_maximum() {
        let client = client();
        for (failures, full) in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (40, 300)] {
            let delay = client.retry_delay(failures);
            let full = Duration::from_secs(full);
            assert!(delay >= full / 2 && delay <= full, "{failures}: {delay:?}");
        }
    }

    #[test]
    fn an_address_without_a_scheme_means_tls() {
        let options = client().options().clone();
        assert_eq!(options.uri(), "https://discovery:15012");
    }
}
