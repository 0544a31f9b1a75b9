//! The workload's certificate store: the current SVID and trust bundle, swapped
//! atomically, behind the rustls certificate resolvers.
//!
//! [`CertStore`] implements `ResolvesServerCert` and `ResolvesClientCert`: every new
//! handshake reads the current SVID (`ArcSwap::load_full`), connections already
//! established keep the keys they negotiated and stay up. The trust bundle lives in
//! its own `ArcSwap`, read by the verifiers on every handshake.
//!
//! Nothing is swapped in before it is checked: the key must match the leaf
//! (`CertifiedKey::from_der`), the leaf must be a valid workload SVID for both client
//! and server use, and it must chain to the (new) trust bundle. A bad update is logged,
//! reported as [`StoreEvent::Rejected`], and the previous SVID keeps serving.
//!
//! Two sources keep the store fresh:
//!
//! - **Files** ([`CertStore::watch_dir`]): Istio's `cert-chain.pem`, `key.pem`,
//!   `root-cert.pem` in one directory. The *directory* is watched (notify, non
//!   recursive), not the files, so Kubernetes Secret updates (a new `..<timestamp>`
//!   directory and an atomic rename of the `..data` symlink) are seen every time.
//!   Events are debounced for [`DEBOUNCE`] and the three files are re-read together.
//! - **Built-in issuer** ([`CertStore::spawn_issuer`]): a [`BuiltInIssuer`] re-issues
//!   the SVID when half of its lifetime has passed, with ±1 % jitter (Istio's
//!   `SECRET_GRACE_PERIOD_RATIO=0.5`, `SECRET_GRACE_PERIOD_RATIO_JITTER=0.01`).
//!
//! Run one source per store. [`CertStore::rotate_now`] forces a rotation at once (a compromised workload): the
//! issuer mints a new key and certificate, the file source re-reads its directory.
//!
//! Trust-bundle rotation with overlap: put both the old and the new root in
//! `root-cert.pem` (or call [`CertStore::set_trust_roots`] with both); both are trusted
//! until the old one is removed.
//!
//! # Layer placement
//!
//! Not a layer: one store per workload, shared by the inbound [`ServerTls`](crate::ServerTls)
//! and the outbound [`ClientTls`](crate::ClientTls).
//!
//! # Errors
//!
//! [`StoreError`] from [`CertStore::install`] and friends says why an update was refused
//! (key mismatch, not an SVID, does not chain to the bundle, unusable bundle); the
//! background sources log it and publish [`StoreEvent::Rejected`].
//!
//! # Example
//!
//! ```
//! use mesh_tls::{CertificateAuthority, CertStore, BuiltInIssuer};
//! use std::sync::Arc;
//!
//! let ca = Arc::new(CertificateAuthority::new("cluster.local").unwrap());
//! let issuer = BuiltInIssuer::new(ca, "production", "order-service");
//! let store = CertStore::from_issuer(&issuer).unwrap();
//! assert_eq!(store.identity().service_account(), Some("order-service"));
//! ```

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mesh_core::Identity;
#[cfg(feature = "watch")]
use notify::{EventKind, RecursiveMode, Watcher};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
#[cfg(feature = "watch")]
use tokio::sync::mpsc;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;

use crate::ca::{CaError, CertificateAuthority, DEFAULT_WORKLOAD_TTL, IssuedSvid};
use crate::svid::{PeerRole, Serial, SvidError, SvidFiles, SvidLeaf, check_leaf_with};
use crate::verify::{BundleError, TrustBundle};

/// How long the file source waits for more events before re-reading the directory.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// How long the built-in issuer waits before retrying a failed rotation.
pub const ISSUE_RETRY: Duration = Duration::from_secs(10);

/// The SVID currently served.
#[derive(Debug)]
pub struct WorkloadCert {
    /// Chain and signing key, as rustls uses them.
    pub certified_key: Arc<CertifiedKey>,
    /// Identity, serial and validity of the leaf.
    pub leaf: SvidLeaf,
}

/// What happened in the store; see [`CertStore::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// A new SVID is served to new handshakes.
    Rotated {
        /// The new certificate's serial.
        serial: Serial,
    },
    /// The trust bundle changed.
    BundleChanged {
        /// How many roots are trusted now.
        roots: usize,
    },
    /// An update was refused; the previous SVID and bundle are kept.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// Why an SVID or bundle update was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The files or the certificate are not a valid workload SVID.
    #[error(transparent)]
    Svid(#[from] SvidError),
    /// The trust bundle is unusable.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The SVID does not chain to the trust bundle, or is outside its validity.
    #[error("workload certificate does not verify against the trust bundle: {0}")]
    Chain(rustls::Error),
    /// The built-in issuer failed.
    #[error(transparent)]
    Issue(#[from] CaError),
    /// The directory cannot be watched.
    #[cfg(feature = "watch")]
    #[error("cannot watch {path}: {source}")]
    Watch {
        /// The directory.
        path: std::path::PathBuf,
        /// The notify error.
        source: notify::Error,
    },
}

/// The current SVID and trust bundle of a workload.
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    cert: ArcSwap<WorkloadCert>,
    bundle: Arc<ArcSwap<TrustBundle>>,
    aliases: Vec<String>,
    events: broadcast::Sender<StoreEvent>,
    rotate: Notify,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cert = self.cert.load();
        f.debug_struct("CertStore")
            .field("identity", &cert.leaf.identity)
            .field("serial", &cert.leaf.serial)
            .field("bundle", &self.bundle.load())
            .finish_non_exhaustive()
    }
}

/// Checks a chain + key against `bundle` (or a bundle made from `roots`) and returns
/// what to swap in.
fn validate(
    provider: &Arc<CryptoProvider>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Option<Vec<CertificateDer<'static>>>,
    current_bundle: &TrustBundle,
    aliases: &[String],
) -> Result<(WorkloadCert, Option<TrustBundle>), StoreError> {
    let files = SvidFiles {
        chain,
        key,
        roots: Vec::new(),
    };
    let certified_key = files.certified_key(provider)?;
    let leaf_der = &files.chain[0];
    // Our own trust domain is trusted by definition; the checks that matter here are
    // the SVID shape and the chain.
    let leaf = check_leaf_with(leaf_der, PeerRole::Server, |_| true, None)?;
    check_leaf_with(leaf_der, PeerRole::Client, |_| true, None)?;
    let own = leaf.identity.trust_domain();
    let mut domains = vec![own.to_owned()];
    domains.extend(aliases.iter().filter(|a| a.as_str() != own).cloned());
    let new_bundle = match roots {
        Some(roots) => Some(TrustBundle::with_provider(roots, domains, provider)?),
        None if current_bundle.trust_domains() != domains.as_slice() => Some(
            TrustBundle::with_provider(current_bundle.roots().to_vec(), domains, provider)?,
        ),
        None => None,
    };
    let bundle = new_bundle.as_ref().unwrap_or(current_bundle);
    let now = UnixTime::now();
    bundle
        .verify_client(leaf_der, &files.chain[1..], now)
        .and_then(|_| bundle.verify_server(leaf_der, &files.chain[1..], now, provider))
        .map_err(StoreError::Chain)?;
    Ok((
        WorkloadCert {
            certified_key: Arc::new(certified_key),
            leaf,
        },
        new_bundle,
    ))
}

impl CertStore {
    /// A store serving `files` (checked first), trusting the SVID's own trust domain.
    pub fn new(files: SvidFiles) -> Result<Arc<Self>, StoreError> {
        Self::with_aliases(files, Vec::new())
    }

    /// A store that also trusts the trust domains in `aliases` (Istio's
    /// `trustDomainAliases`).
    pub fn with_aliases(files: SvidFiles, aliases: Vec<String>) -> Result<Arc<Self>, StoreError> {
        let provider = crate::provider();
        let placeholder = TrustBundle::with_provider(files.roots.clone(), Vec::new(), &provider)?;
        let (cert, bundle) = validate(
            &provider,
            files.chain,
            files.key,
            Some(files.roots),
            &placeholder,
            &aliases,
        )?;
        let bundle = bundle.unwrap_or(placeholder);
        let (events, _) = broadcast::channel(64);
        Ok(Arc::new(Self {
            provider,
            cert: ArcSwap::from_pointee(cert),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
            aliases,
            events,
            rotate: Notify::new(),
        }))
    }

    /// A store serving the SVID in `dir` (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
    pub fn load_dir(dir: &Path) -> Result<Arc<Self>, StoreError> {
        Self::new(SvidFiles::load_dir(dir)?)
    }

    /// A store serving `svid`, trusting its CA's root.
    pub fn from_issued(svid: &IssuedSvid) -> Result<Arc<Self>, StoreError> {
        Self::new(svid.files())
    }

    /// A store serving a fresh SVID from `issuer` (see [`spawn_issuer`](Self::spawn_issuer)).
    pub fn from_issuer(issuer: &BuiltInIssuer) -> Result<Arc<Self>, StoreError> {
        Self::from_issued(&issuer.issue()?)
    }

    /// The crypto provider (ring) the store and configs use.
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// The SVID new handshakes use.
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.cert.load_full()
    }

    /// The workload's identity.
    pub fn identity(&self) -> Identity {
        self.cert.load().leaf.identity.clone()
    }

    /// The serial of the SVID new handshakes use.
    pub fn serial(&self) -> Serial {
        self.cert.load().leaf.serial.clone()
    }

    /// The trust bundle new handshakes verify against.
    pub fn trust_bundle(&self) -> Arc<TrustBundle> {
        self.bundle.load_full()
    }

    /// The shared handle the verifiers read the bundle through.
    pub fn bundle_handle(&self) -> Arc<ArcSwap<TrustBundle>> {
        self.bundle.clone()
    }

    /// Events about rotations, bundle changes and rejected updates.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    /// Forces the running source to rotate now: the built-in issuer mints a new key
    /// and certificate, the file source re-reads its directory. Without a running
    /// source the request waits for one to start.
    pub fn rotate_now(&self) {
        self.rotate.notify_one();
    }

    /// Completes when [`rotate_now`](Self::rotate_now) is called: for certificate
    /// sources outside this crate (a client that renews by CSR).
    pub async fn rotation_requested(&self) {
        self.rotate.notified().await;
    }

    fn emit(&self, event: StoreEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    fn refused(&self, err: StoreError) -> StoreError {
        tracing::warn!(error = %err, "certificate update refused; keeping the current SVID");
        self.emit(StoreEvent::Rejected {
            reason: err.to_string(),
        });
        err
    }

    fn commit(&self, cert: WorkloadCert, bundle: Option<TrustBundle>) -> Serial {
        if let Some(bundle) = bundle {
            let roots = bundle.roots().len();
            self.bundle.store(Arc::new(bundle));
            self.emit(StoreEvent::BundleChanged { roots });
        }
        let serial = cert.leaf.serial.clone();
        tracing::info!(identity = %cert.leaf.identity, %serial, "serving new workload certificate");
        self.cert.store(Arc::new(cert));
        self.emit(StoreEvent::Rotated {
            serial: serial.clone(),
        });
        serial
    }

    /// Checks `files` (pair, SVID rules, chain to the new roots) and, if good, swaps
    /// in both the SVID and the trust bundle. On error nothing changes.
    pub fn install(&self, files: SvidFiles) -> Result<Serial, StoreError> {
        let current = self.bundle.load();
        match validate(
            &self.provider,
            files.chain,
            files.key,
            Some(files.roots),
            &current,
            &self.aliases,
        ) {
            Ok((cert, bundle)) => Ok(self.commit(cert, bundle)),
            Err(e) => Err(self.refused(e)),
        }
    }

    /// Checks a new chain and key against the current bundle and swaps them in.
    pub fn install_cert(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Serial, StoreError> {
        let current = self.bundle.load();
        match validate(&self.provider, chain, key, None, &current, &self.aliases) {
            Ok((cert, bundle)) => Ok(self.commit(cert, bundle)),
            Err(e) => Err(self.refused(e)),
        }
    }

    /// Replaces the trusted roots. During a CA rotation pass the old and the new root
    /// together; drop the old one when every workload has a certificate from the new.
    pub fn set_trust_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), StoreError> {
        let domains = self.bundle.load().trust_domains().to_vec();
        let bundle = TrustBundle::with_provider(roots, domains, &self.provider)
            .map_err(|e| self.refused(e.into()))?;
        let n = bundle.roots().len();
        self.bundle.store(Arc::new(bundle));
        self.emit(StoreEvent::BundleChanged { roots: n });
        Ok(())
    }

    /// Re-reads `dir` and installs what it holds.
    pub fn reload_dir(&self, dir: &Path) -> Result<Serial, StoreError> {
        match SvidFiles::load_dir(dir) {
            Ok(files) => self.install(files),
            Err(e) => Err(self.refused(e.into())),
        }
    }

    /// Watches `dir` (the directory, so Kubernetes `..data` symlink swaps are seen) and
    /// installs its SVID whenever it changes, or when [`rotate_now`](Self::rotate_now)
    /// is called. Stops when the handle is dropped. Needs a tokio runtime and the
    /// `watch` feature (on by default).
    #[cfg(feature = "watch")]
    pub fn watch_dir(self: &Arc<Self>, dir: &Path) -> Result<SourceHandle, StoreError> {
        let watch_err = |source| StoreError::Watch {
            path: dir.to_path_buf(),
            source,
        };
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) if !matches!(event.kind, EventKind::Access(_)) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "certificate directory watch error"),
            })
            .map_err(watch_err)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(watch_err)?;
        let store = self.clone();
        let dir = dir.to_path_buf();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = rx.recv() => {
                        if event.is_none() {
                            return;
                        }
                        // Debounce: a Secret update is a burst of events; read once it settles.
                        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
                    }
                    () = store.rotate.notified() => {}
                }
                // Errors were logged and reported as events by `reload_dir`.
                let _ = store.reload_dir(&dir);
            }
        });
        Ok(SourceHandle {
            task,
            _watcher: Some(watcher),
        })
    }

    /// Runs `issuer`: re-issues the SVID at half of its lifetime (±1 % jitter) and on
    /// [`rotate_now`](Self::rotate_now). Stops when the handle is dropped. Timers are
    /// tokio's, so tests can drive them with a paused clock.
    pub fn spawn_issuer(self: &Arc<Self>, mut issuer: BuiltInIssuer) -> SourceHandle {
        let store = self.clone();
        // The first period counts from now (the current SVID was just issued), not from
        // whenever the task is first polled.
        let mut deadline = tokio::time::Instant::now() + issuer.rotation_delay();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = store.rotate.notified() => {}
                }
                let result = issuer
                    .issue()
                    .map_err(StoreError::from)
                    .and_then(|svid| store.install_cert(svid.chain_der().to_vec(), svid.key_der()));
                let delay = match result {
                    Ok(_) => issuer.rotation_delay(),
                    Err(e) => {
                        tracing::warn!(error = %e, "certificate rotation failed; retrying");
                        ISSUE_RETRY.min(issuer.ttl / 10)
                    }
                };
                deadline = tokio::time::Instant::now() + delay;
            }
        });
        SourceHandle {
            task,
            #[cfg(feature = "watch")]
            _watcher: None,
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.cert.load().certified_key.clone())
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.cert.load().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A running certificate source; dropping it stops the source.
#[derive(Debug)]
pub struct SourceHandle {
    task: JoinHandle<()>,
    #[cfg(feature = "watch")]
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Drop for SourceHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The built-in SVID issuer: a [`CertificateAuthority`] and the workload it issues for.
pub struct BuiltInIssuer {
    ca: Arc<CertificateAuthority>,
    namespace: String,
    service_account: String,
    ttl: Duration,
    grace_ratio: f64,
    jitter: f64,
    rng: SmallRng,
}

impl fmt::Debug for BuiltInIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuiltInIssuer")
            .field("trust_domain", &self.ca.trust_domain())
            .field("namespace", &self.namespace)
            .field("service_account", &self.service_account)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl BuiltInIssuer {
    /// Issues for `ns/<namespace>/sa/<service_account>` with a 24 h lifetime, rotating
    /// when less than 50 % ± 1 % of it remains.
    pub fn new(ca: Arc<CertificateAuthority>, namespace: &str, service_account: &str) -> Self {
        Self {
            ca,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            ttl: DEFAULT_WORKLOAD_TTL,
            grace_ratio: 0.5,
            jitter: 0.01,
            rng: SmallRng::from_rng(&mut rand::rng()),
        }
    }

    /// Sets the certificate lifetime.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Seeds the jitter so tests are deterministic.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = SmallRng::seed_from_u64(seed);
        self
    }

    /// The certificate lifetime.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a new SVID (new key, new serial).
    pub fn issue(&self) -> Result<IssuedSvid, CaError> {
        self.ca
            .issue_for(&self.namespace, &self.service_account, self.ttl)
    }

    /// Time from issuance to the next rotation: the lifetime times
    /// `1 - (grace_ratio ± jitter)`, i.e. 12 h ± 14.4 min for 24 h.
    pub fn rotation_delay(&mut self) -> Duration {
        let ratio = self.grace_ratio + self.rng.random_range(-self.jitter..=self.jitter);
        self.ttl.mul_f64((1.0 - ratio).clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_delay_stays_within_half_life_plus_minus_one_percent() {
        let ca = Arc::new(CertificateAuthority::new("cluster.local").unwrap());
        let mut issuer = BuiltInIssuer::new(ca, "ns", "sa").with_seed(7);
        let ttl = issuer.ttl().as_secs_f64();
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let d = issuer.rotation_delay().as_secs_f64();
            assert!(d >= ttl * 0.49 - 1e-6 && d <= ttl * 0.51 + 1e-6, "{d}");
            seen.push(d);
        }
        // Jitter actually varies.
        let min = seen.iter().copied().fold(f64::MAX, f64::min);
        let max = seen.iter().copied().fold(f64::MIN, f64::max);
        assert!(max - min > ttl * 0.015, "spread {}", max - min);
    }

    #[test]
    fn mismatched_pair_is_refused_and_the_old_one_kept() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let a = ca.issue("ns", "a").unwrap();
        let b = ca.issue("ns", "b").unwrap();
        let store = CertStore::from_issued(&a).unwrap();
        let mut events = store.subscribe();
        let err = store
            .install_cert(a.chain_der().to_vec(), b.key_der())
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Svid(SvidError::KeyMismatch(_))),
            "{err}"
        );
        assert_eq!(store.serial(), *a.serial());
        assert!(matches!(events.try_recv(), Ok(StoreEvent::Rejected { .. })));
    }

    #[test]
    fn cert_from_an_untrusted_ca_is_refused() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let other = CertificateAuthority::new("cluster.local").unwrap();
        let store = CertStore::from_issued(&ca.issue("ns", "a").unwrap()).unwrap();
        let foreign = other.issue("ns", "a").unwrap();
        let err = store
            .install_cert(foreign.chain_der().to_vec(), foreign.key_der())
            .unwrap_err();
        assert!(matches!(err, StoreError::Chain(_)), "{err}");
    }

    #[test]
    fn installing_new_files_swaps_cert_and_bundle() {
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let next = CertificateAuthority::new("cluster.local").unwrap();
        let store = CertStore::from_issued(&ca.issue("ns", "a").unwrap()).unwrap();
        let fresh = next.issue("ns", "a").unwrap();
        let serial = store.install(fresh.files()).unwrap();
        assert_eq!(serial, *fresh.serial());
        assert_eq!(store.trust_bundle().roots(), &[next.root_der().clone()]);
    }
}
