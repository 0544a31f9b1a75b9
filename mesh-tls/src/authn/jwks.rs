//! JSON Web Key Sets: parsed keys, and remote sets fetched, cached and refreshed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::Uri;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::Jwk;
use tokio::sync::watch;

/// How often a key set that was fetched is fetched again (RA-13's 20 minutes).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// The wait after a failed refresh; it doubles with each further failure (RA-13).
pub const FAILED_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// The longest wait between failed refreshes (RA-13).
pub const MAX_FAILED_REFRESH_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// Network attempts per refresh, and the pause between them (RA-13).
const ATTEMPTS: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// The largest key set (or discovery document) read.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// One usable key of a set.
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    pub(crate) key: DecodingKey,
}

/// The usable keys of a JSON Web Key Set.
pub struct KeySet {
    pub(crate) keys: Vec<Key>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field(
                "kids",
                &self.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KeySet {
    /// Parses a JSON Web Key Set. Keys of a type the verifier does not support are
    /// skipped; a document that is not a key set, or one without a usable key, is an error.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct Raw {
            keys: Vec<serde_json::Value>,
        }
        let raw: Raw =
            serde_json::from_slice(json).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        let mut keys = Vec::new();
        for k in raw.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(k) else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    key,
                });
            }
        }
        if keys.is_empty() {
            return Err("the key set has no usable key".into());
        }
        Ok(KeySet { keys })
    }

    /// Number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no key (never true for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys to try for a token with `kid`: those with that id when the token names
    /// one, else every key.
    pub(crate) fn candidates<'a>(&'a self, kid: Option<&'a str>) -> impl Iterator<Item = &'a Key> {
        self.keys
            .iter()
            .filter(move |k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
    }
}

/// A boxed future of one fetch.
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>>;

/// Fetches documents (key sets, OpenID discovery documents) over HTTP.
pub trait FetchJwks: Send + Sync + 'static {
    /// GETs `uri` within `timeout`; the body of a `200` answer, else why not.
    fn fetch(&self, uri: &Uri, timeout: Duration) -> FetchFuture;
}

/// The client the default fetcher uses.
type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<Bytes>,
>;

/// The default fetcher: a hyper client over HTTP, or over HTTPS verified against the
/// operating system's trust store (issuers are usually outside the mesh).
///
/// The trust store is read, and the client built, on the first fetch, not when the fetcher
/// is made: a proxy with no RequestAuthentication naming a remote key set never reads or
/// holds them. Clones share the one client.
#[derive(Clone, Default)]
pub struct HttpFetch {
    client: Arc<OnceLock<HttpsClient>>,
}

impl std::fmt::Debug for HttpFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpFetch")
    }
}

impl HttpFetch {
    /// A fetcher with the system's trust roots (HTTPS fails when none can be read); they are
    /// read on its first fetch.
    pub fn new() -> Self {
        Self::default()
    }

    fn client(&self) -> &HttpsClient {
        self.client.get_or_init(|| {
            let builder = hyper_rustls::HttpsConnectorBuilder::new();
            let connector = match builder.with_native_roots() {
                Ok(b) => b.https_or_http().enable_http1().build(),
                Err(e) => {
                    tracing::warn!(error = %e, "no system trust roots: JWKS can only be fetched over http");
                    hyper_rustls::HttpsConnectorBuilder::new()
                        .with_tls_config(
                            rustls::ClientConfig::builder()
                                .with_root_certificates(rustls::RootCertStore::empty())
                                .with_no_client_auth(),
                        )
                        .https_or_http()
                        .enable_http1()
                        .build()
                }
            };
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(connector)
        })
    }
}

impl FetchJwks for HttpFetch {
    fn fetch(&self, uri: &Uri, timeout: Duration) -> FetchFuture {
        let client = self.client().clone();
        let uri = uri.clone();
        Box::pin(async move {
            let get = async {
                let req = http::Request::get(uri.clone())
                    .header(http::header::ACCEPT, "application/json")
                    .body(http_body_util::Empty::new())
                    .map_err(|e| e.to_string())?;
                let res = client.request(req).await.map_err(|e| {
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        msg.push_str(": ");
                        msg.push_str(&s.to_string());
                        src = s.source();
                    }
                    msg
                })?;
                if res.status() != http::StatusCode::OK {
                    return Err(format!("status {}", res.status()));
                }
                let body = http_body_util::Limited::new(res.into_body(), MAX_DOCUMENT_BYTES);
                http_body_util::BodyExt::collect(body)
                    .await
                    .map(|c| c.to_bytes())
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(timeout, get).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        })
    }
}

/// Where a remote key set comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Origin {
    /// `jwksUri`.
    Uri(String),
    /// OpenID discovery from the issuer (RA-03).
    Discovery(String),
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::Uri(u) => u.clone(),
            Origin::Discovery(issuer) => format!("{} (OpenID discovery)", discovery_uri(issuer)),
        }
    }
}

/// `<issuer>/.well-known/openid-configuration`.
pub(crate) fn discovery_uri(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// A key set fetched from its origin, cached, and refreshed in the background.
pub(crate) struct RemoteJwks {
    origin: Origin,
    timeout: Duration,
    fetcher: Arc<dyn FetchJwks>,
    keys: ArcSwapOption<KeySet>,
    /// Completed refreshes (successful or not).
    refreshes: watch::Sender<u64>,
    started: AtomicBool,
    this: Weak<RemoteJwks>,
}

impl RemoteJwks {
    fn new(origin: Origin, timeout: Duration, fetcher: Arc<dyn FetchJwks>) -> Arc<Self> {
        Arc::new_cyclic(|this| RemoteJwks {
            origin,
            timeout,
            fetcher,
            keys: ArcSwapOption::empty(),
            refreshes: watch::channel(0).0,
            started: AtomicBool::new(false),
            this: this.clone(),
        })
    }

    /// Starts the refresh task once (needs a tokio runtime; a no-op without one, tried
    /// again on the next call).
    pub(crate) fn start(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(refresh_loop(self.this.clone()));
    }

    /// The keys in force, waiting for the first refresh when none has completed.
    /// `None` when the set could never be fetched (fail closed, RA-14).
    pub(crate) async fn keys(&self) -> Option<Arc<KeySet>> {
        if let Some(k) = self.keys.load_full() {
            return Some(k);
        }
        self.start();
        let mut rx = self.refreshes.subscribe();
        if *rx.borrow_and_update() == 0 {
            // Each attempt is bounded by the timeout; the pauses between are short.
            let bound = self.timeout * ATTEMPTS + RETRY_PAUSE * ATTEMPTS;
            let _ = tokio::time::timeout(bound, rx.changed()).await;
        }
        self.keys.load_full()
    }

    /// The keys in force now, without waiting.
    pub(crate) fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    async fn fetch_once(&self) -> Result<KeySet, String> {
        let jwks_uri = match &self.origin {
            Origin::Uri(u) => u.clone(),
            Origin::Discovery(issuer) => {
                let uri = parse_uri(&discovery_uri(issuer))?;
                let doc = self.fetcher.fetch(&uri, self.timeout).await?;
                #[derive(serde::Deserialize)]
                struct Discovery {
                    jwks_uri: String,
                }
                serde_json::from_slice::<Discovery>(&doc)
                    .map_err(|e| format!("OpenID discovery document: {e}"))?
                    .jwks_uri
            }
        };
        let uri = parse_uri(&jwks_uri)?;
        let body = self.fetcher.fetch(&uri, self.timeout).await?;
        KeySet::parse(&body)
    }

    /// One refresh: up to [`ATTEMPTS`] tries. Keeps the previous keys on failure.
    async fn refresh(&self) -> bool {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            match self.fetch_once().await {
                Ok(set) => {
                    tracing::debug!(jwks = %self.origin.describe(), keys = set.len(), "JWKS fetched");
                    self.keys.store(Some(Arc::new(set)));
                    return true;
                }
                Err(e) => last = e,
            }
        }
        tracing::warn!(
            jwks = %self.origin.describe(),
            error = %last,
            cached = self.keys.load().is_some(),
            "JWKS fetch failed"
        );
        false
    }
}

fn parse_uri(s: &str) -> Result<Uri, String> {
    s.parse::<Uri>()
        .map_err(|e| format!("`{s}` is not a URI: {e}"))
}

/// The wait before the next refresh after `failures` consecutive failures (RA-13).
pub fn next_refresh(failures: u32) -> Duration {
    if failures == 0 {
        return REFRESH_INTERVAL;
    }
    let factor = 1u32 << (failures - 1).min(16);
    (FAILED_REFRESH_INTERVAL * factor).min(MAX_FAILED_REFRESH_INTERVAL)
}

async fn refresh_loop(this: Weak<RemoteJwks>) {
    let mut failures = 0u32;
    loop {
        let Some(jwks) = this.upgrade() else {
            return;
        };
        if jwks.refresh().await {
            failures = 0;
        } else {
            failures = failures.saturating_add(1);
        }
        jwks.refreshes.send_modify(|n| *n += 1);
        drop(jwks);
        tokio::time::sleep(next_refresh(failures)).await;
    }
}

/// The live remote sets, by origin and fetch timeout.
type SetsByOrigin = HashMap<(Origin, Duration), Weak<RemoteJwks>>;

/// Remote key sets shared by every configuration compiled with this cache, so a reload
/// keeps what was fetched (one fetch per origin, however many rules name it).
#[derive(Clone)]
pub struct JwksCache {
    fetcher: Arc<dyn FetchJwks>,
    sets: Arc<Mutex<SetsByOrigin>>,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache").finish_non_exhaustive()
    }
}

impl Default for JwksCache {
    fn default() -> Self {
        Self::new(Arc::new(HttpFetch::new()))
    }
}

impl JwksCache {
    /// A cache fetching with `fetcher`.
    pub fn new(fetcher: Arc<dyn FetchJwks>) -> Self {
        Self {
            fetcher,
            sets: Arc::default(),
        }
    }

    pub(crate) fn get(&self, origin: Origin, timeout: Duration) -> Arc<RemoteJwks> {
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        sets.retain(|_, w| w.strong_count() > 0);
        let key = (origin, timeout);
        if let Some(set) = sets.get(&key).and_then(Weak::upgrade) {
            return set;
        }
        let set = RemoteJwks::new(key.0.clone(), timeout, self.fetcher.clone());
        sets.insert(key, Arc::downgrade(&set));
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_intervals_follow_istiod() {
        assert_eq!(next_refresh(0), Duration::from_secs(1200));
        assert_eq!(next_refresh(1), Duration::from_secs(60));
        assert_eq!(next_refresh(2), Duration::from_secs(120));
        assert_eq!(next_refresh(3), Duration::from_secs(240));
        assert_eq!(next_refresh(6), Duration::from_secs(1920));
        assert_eq!(next_refresh(7), Duration::from_secs(3600));
        assert_eq!(next_refresh(40), Duration::from_secs(3600));
    }

    #[test]
    fn key_sets_need_a_usable_key() {
        assert!(KeySet::parse(b"{\"keys\": []}").is_err());
        assert!(KeySet::parse(b"not json").is_err());
        assert!(KeySet::parse(b"{\"keys\": [{\"kty\": \"weird\"}]}").is_err());
        let set = KeySet::parse(
            br#"{"keys": [{"kty": "EC", "crv": "P-256", "kid": "a",
                 "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
                 "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}, {"kty": "weird"}]}"#,
        )
        .unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.candidates(Some("a")).count(), 1);
        assert_eq!(set.candidates(Some("b")).count(), 0);
        assert_eq!(set.candidates(None).count(), 1);
    }
}
