//! RequestAuthentication rules compiled for one workload, and token validation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::header::{AUTHORIZATION, COOKIE, HeaderName, HeaderValue};
use http::{HeaderMap, Request};
use jsonwebtoken::{Validation, decode, decode_header};
use mesh_core::config;
use serde_json::{Map, Value};

use super::jwks::{JwksCache, KeySet, Origin, RemoteJwks};
use super::{AuthnError, RequestAuth};

/// The default timeout of a JWKS fetch (RA-02).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Clock skew accepted on `exp` and `nbf` (Envoy's `clock_skew_seconds` default).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Where a token is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A header, with the prefix before the token (`Bearer `); the prefix is compared
    /// without ASCII case.
    Header {
        /// The header.
        name: HeaderName,
        /// The prefix (may be empty).
        prefix: String,
    },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl Location {
    /// RA-03: `Authorization: Bearer <token>`, then the `access_token` parameter.
    pub fn defaults() -> Vec<Location> {
        vec![
            Location::Header {
                name: AUTHORIZATION,
                prefix: "Bearer ".into(),
            },
            Location::Param("access_token".into()),
        ]
    }

    fn extract<'r>(&self, headers: &'r HeaderMap, query: Option<&'r str>) -> Vec<&'r str> {
        let mut out = Vec::new();
        match self {
            Location::Header { name, prefix } => {
                for v in headers.get_all(name) {
                    let Ok(v) = v.to_str() else { continue };
                    let v = v.trim();
                    let p = prefix.trim_end();
                    let rest = if p.is_empty() {
                        Some(v)
                    } else if v.len() > p.len()
                        && v.is_char_boundary(p.len())
                        && v[..p.len()].eq_ignore_ascii_case(p)
                    {
                        Some(&v[p.len()..])
                    } else {
                        None
                    };
                    if let Some(t) = rest.map(str::trim).filter(|t| !t.is_empty()) {
                        out.push(t);
                    }
                }
            }
            Location::Param(name) => {
                for pair in query.unwrap_or("").split('&') {
                    if let Some((k, v)) = pair.split_once('=')
                        && k == name
                        && !v.is_empty()
                    {
                        out.push(v);
                    }
                }
            }
            Location::Cookie(name) => {
                for v in headers.get_all(COOKIE) {
                    let Ok(v) = v.to_str() else { continue };
                    for c in v.split(';') {
                        if let Some((k, val)) = c.trim().split_once('=')
                            && k == name
                            && !val.is_empty()
                        {
                            out.push(val.trim_matches('"'));
                        }
                    }
                }
            }
        }
        out
    }
}

/// Where a rule's keys come from.
#[derive(Clone)]
pub(crate) enum Keys {
    Inline(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

/// One `jwtRules[]` entry, compiled.
#[derive(Clone)]
pub struct JwtProvider {
    pub(crate) issuer: String,
    pub(crate) audiences: Vec<String>,
    pub(crate) locations: Vec<Location>,
    pub(crate) keys: Keys,
    pub(crate) forward: bool,
    pub(crate) payload_header: Option<HeaderName>,
    pub(crate) claim_headers: Vec<(HeaderName, Vec<String>)>,
    pub(crate) space_delimited: Arc<[String]>,
}

impl std::fmt::Debug for JwtProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtProvider")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("locations", &self.locations)
            .finish_non_exhaustive()
    }
}

/// A rule that cannot be compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("RequestAuthentication {policy}: {field}: {message}")]
pub struct RuleError {
    /// `<namespace>/<name>`.
    pub policy: String,
    /// Where, e.g. `jwtRules[0].jwks`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl JwtProvider {
    /// Compiles `rule` of policy `policy` (for errors); remote key sets come from `cache`.
    pub fn compile(
        policy: &str,
        at: &str,
        rule: &config::JwtRule,
        cache: &JwksCache,
    ) -> Result<Self, RuleError> {
        let err = |field: &str, message: String| RuleError {
            policy: policy.to_owned(),
            field: format!("{at}{field}"),
            message,
        };
        if rule.issuer.is_empty() {
            return Err(err("issuer", "issuer is required".into()));
        }
        let timeout = rule
            .timeout
            .map_or(DEFAULT_FETCH_TIMEOUT, |t| t.as_std())
            .max(Duration::from_millis(1));
        let keys = match (&rule.jwks, &rule.jwks_uri) {
            (Some(_), Some(_)) => {
                return Err(err("jwks", "set either jwksUri or jwks, not both".into()));
            }
            (Some(jwks), None) => Keys::Inline(Arc::new(
                KeySet::parse(jwks.as_bytes()).map_err(|e| err("jwks", e))?,
            )),
            (None, Some(uri)) => Keys::Remote(cache.get(Origin::Uri(uri.clone()), timeout)),
            (None, None) => {
                Keys::Remote(cache.get(Origin::Discovery(rule.issuer.clone()), timeout))
            }
        };
        let header = |field: String, v: &str| {
            HeaderName::from_bytes(v.as_bytes())
                .map_err(|_| err(&field, format!("`{v}` is not a valid header name")))
        };
        let mut locations = Vec::new();
        for (i, h) in rule.from_headers.iter().enumerate() {
            locations.push(Location::Header {
                name: header(format!("fromHeaders[{i}].name"), &h.name)?,
                prefix: h.prefix.clone().unwrap_or_default(),
            });
        }
        locations.extend(rule.from_params.iter().cloned().map(Location::Param));
        locations.extend(rule.from_cookies.iter().cloned().map(Location::Cookie));
        if locations.is_empty() {
            locations = Location::defaults();
        }
        let payload_header = rule
            .output_payload_to_header
            .as_deref()
            .map(|h| header("outputPayloadToHeader".into(), h))
            .transpose()?;
        let mut claim_headers = Vec::new();
        for (i, c) in rule.output_claim_to_headers.iter().enumerate() {
            let name = header(format!("outputClaimToHeaders[{i}].header"), &c.header)?;
            claim_headers.push((name, c.claim.split('.').map(str::to_owned).collect()));
        }
        let space_delimited: Vec<String> = ["scope", "permission"]
            .into_iter()
            .map(str::to_owned)
            .chain(rule.space_delimited_claims.iter().cloned())
            .collect();
        Ok(JwtProvider {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            locations,
            keys,
            forward: rule.forward_original_token.unwrap_or(false),
            payload_header,
            claim_headers,
            space_delimited: space_delimited.into(),
        })
    }

    async fn key_set(&self) -> Option<Arc<KeySet>> {
        match &self.keys {
            Keys::Inline(k) => Some(k.clone()),
            Keys::Remote(r) => r.keys().await,
        }
    }
}

/// The wall clock as tokio's clock moves: a wall-clock reading taken when the
/// authenticator was compiled, advanced by tokio's monotonic clock (so paused-clock
/// tests move token time, and a wall-clock step does not).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    wall: u64,
    at: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Clock {
            wall: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            at: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> u64 {
        self.wall + self.at.elapsed().as_secs()
    }
}

/// The RequestAuthentication rules that apply to one workload.
#[derive(Clone, Debug)]
pub struct Authenticator {
    providers: Vec<JwtProvider>,
    clock: Clock,
}

impl Default for Authenticator {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// A token found in the request: its text, and the locations it was found at.
struct Found<'r> {
    token: &'r str,
    /// `(provider index, location index)`.
    at: Vec<(usize, usize)>,
}

/// What a successful authentication changes in the request.
struct Success {
    auth: RequestAuth,
    /// Headers whose token is removed (`forwardOriginalToken: false`).
    remove: Vec<HeaderName>,
    /// Headers set from the token.
    set: Vec<(HeaderName, HeaderValue)>,
}

impl Authenticator {
    /// An authenticator for `providers` (no providers: every request passes untouched).
    pub fn new(providers: Vec<JwtProvider>) -> Self {
        Self {
            providers,
            clock: Clock::new(),
        }
    }

    /// Compiles the RequestAuthentications of `config` that apply to the workload in
    /// `namespace` with `labels` (RA-01), fetching remote key sets through `cache`.
    pub fn from_config(
        config: &config::MeshConfig,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        cache: &JwksCache,
    ) -> Result<Self, RuleError> {
        let mut providers = Vec::new();
        for ra in config.request_authentications_for(namespace, labels) {
            let name = format!("{}/{}", ra.metadata.namespace, ra.metadata.name);
            for (i, rule) in ra.spec.jwt_rules.iter().enumerate() {
                providers.push(JwtProvider::compile(
                    &name,
                    &format!("jwtRules[{i}]."),
                    rule,
                    cache,
                )?);
            }
        }
        let auth = Self::new(providers);
        auth.start();
        Ok(auth)
    }

    /// Starts fetching the remote key sets (when a tokio runtime is running).
    pub fn start(&self) {
        for p in &self.providers {
            if let Keys::Remote(r) = &p.keys {
                r.start();
            }
        }
    }

    /// Whether no rule applies.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// The compiled rules.
    pub fn providers(&self) -> &[JwtProvider] {
        &self.providers
    }

    /// Whether every remote key set has been fetched at least once.
    pub fn keys_ready(&self) -> bool {
        self.providers.iter().all(|p| match &p.keys {
            Keys::Inline(_) => true,
            Keys::Remote(r) => r.current().is_some(),
        })
    }

    /// Removes the headers the rules write (`outputPayloadToHeader`,
    /// `outputClaimToHeaders`): they are the proxy's to write, never the client's.
    pub fn strip_outputs(&self, headers: &mut HeaderMap) {
        for p in &self.providers {
            if let Some(h) = &p.payload_header {
                headers.remove(h);
            }
            for (h, _) in &p.claim_headers {
                headers.remove(h);
            }
        }
    }

    fn find<'r>(&self, headers: &'r HeaderMap, query: Option<&'r str>) -> Vec<Found<'r>> {
        let mut found: Vec<Found<'r>> = Vec::new();
        for (pi, p) in self.providers.iter().enumerate() {
            for (li, l) in p.locations.iter().enumerate() {
                for token in l.extract(headers, query) {
                    match found.iter_mut().find(|f| f.token == token) {
                        Some(f) => f.at.push((pi, li)),
                        None => found.push(Found {
                            token,
                            at: vec![(pi, li)],
                        }),
                    }
                }
            }
        }
        found
    }

    /// Authenticates `req` (RA-04..RA-08): no token passes unauthenticated; every token
    /// present must be valid for a rule that reads it from where it was found; on success
    /// the first token's [`RequestAuth`] goes into the extensions, tokens are removed
    /// from their headers unless `forwardOriginalToken`, and output headers are set.
    pub async fn authenticate<B>(&self, req: &mut Request<B>) -> Result<(), AuthnError> {
        self.strip_outputs(req.headers_mut());
        if self.providers.is_empty() {
            return Ok(());
        }
        let successes = {
            let found = self.find(req.headers(), req.uri().query());
            if found.is_empty() {
                return Ok(());
            }
            let mut successes = Vec::with_capacity(found.len());
            for f in &found {
                successes.push(self.validate(f).await?);
            }
            successes
        };
        let mut first = None;
        for s in successes {
            for h in &s.remove {
                req.headers_mut().remove(h);
            }
            for (h, v) in s.set {
                req.headers_mut().insert(h, v);
            }
            first.get_or_insert(s.auth);
        }
        if let Some(auth) = first {
            req.extensions_mut().insert(auth);
        }
        Ok(())
    }

    async fn validate(&self, f: &Found<'_>) -> Result<Success, AuthnError> {
        let unverified = Unverified::parse(f.token)?;
        let iss = unverified.claims.get("iss").and_then(Value::as_str);
        // Rules that read this location and name the token's issuer.
        let mut candidates: Vec<(usize, usize)> =
            f.at.iter()
                .copied()
                .filter(|(pi, _)| Some(self.providers[*pi].issuer.as_str()) == iss)
                .collect();
        candidates.dedup_by_key(|(pi, _)| *pi);
        if candidates.is_empty() {
            return Err(AuthnError::UnknownIssuer);
        }
        let mut last = AuthnError::Unverified;
        for (pi, li) in candidates {
            let p = &self.providers[pi];
            match self.check(p, f.token, &unverified).await {
                Ok(()) => {
                    let mut remove = Vec::new();
                    if !p.forward
                        && let Location::Header { name, .. } = &p.locations[li]
                    {
                        remove.push(name.clone());
                    }
                    let mut set = Vec::new();
                    if let Some(h) = &p.payload_header
                        && let Ok(v) = HeaderValue::from_str(unverified.payload_b64)
                    {
                        set.push((h.clone(), v));
                    }
                    for (h, path) in &p.claim_headers {
                        if let Some(v) = claim_header_value(&unverified.claims, path) {
                            set.push((h.clone(), v));
                        }
                    }
                    let auth = RequestAuth::new(unverified.claims, p.space_delimited.clone());
                    return Ok(Success { auth, remove, set });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Time, audience and signature checks of a token for `p` (its issuer matched).
    async fn check(
        &self,
        p: &JwtProvider,
        token: &str,
        u: &Unverified<'_>,
    ) -> Result<(), AuthnError> {
        let now = self.clock.now();
        let skew = CLOCK_SKEW.as_secs();
        if let Some(exp) = numeric(&u.claims, "exp")?
            && exp.saturating_add(skew) < now
        {
            return Err(AuthnError::Expired);
        }
        if let Some(nbf) = numeric(&u.claims, "nbf")?
            && nbf > now.saturating_add(skew)
        {
            return Err(AuthnError::NotYetValid);
        }
        if !p.audiences.is_empty() {
            let ok = match u.claims.get("aud") {
                Some(Value::String(a)) => p.audiences.iter().any(|x| x == a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| p.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(AuthnError::AudienceNotAllowed);
            }
        }
        let Some(keys) = p.key_set().await else {
            return Err(AuthnError::JwksUnavailable);
        };
        let header = decode_header(token).map_err(|_| AuthnError::Malformed)?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let mut tried = false;
        for key in keys.candidates(header.kid.as_deref()) {
            tried = true;
            if decode::<Map<String, Value>>(token, &key.key, &validation).is_ok() {
                return Ok(());
            }
        }
        Err(if tried {
            AuthnError::Unverified
        } else {
            AuthnError::NoMatchingKey
        })
    }
}

/// A token's parts before verification.
struct Unverified<'t> {
    payload_b64: &'t str,
    claims: Map<String, Value>,
}

impl<'t> Unverified<'t> {
    fn parse(token: &'t str) -> Result<Self, AuthnError> {
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthnError::Malformed);
        };
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| AuthnError::Malformed)?;
        let claims: Map<String, Value> =
            serde_json::from_slice(&raw).map_err(|_| AuthnError::Malformed)?;
        Ok(Unverified {
            payload_b64: payload,
            claims,
        })
    }
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, AuthnError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(AuthnError::Malformed),
    }
}

/// A claim as a header value: strings as they are, numbers and booleans as JSON;
/// other claims (objects, lists) are not written (as Envoy).
fn claim_header_value(claims: &Map<String, Value>, path: &[String]) -> Option<HeaderValue> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for p in rest {
        v = v.as_object()?.get(p)?;
    }
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    HeaderValue::from_str(&text).ok()
}
