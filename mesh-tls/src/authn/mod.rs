//! RequestAuthentication: JWT validation as a Tower layer, with Istio's semantics
//! (ISTIO.md RA-01..RA-15).
//!
//! [`AuthnLayer`] checks the JSON Web Tokens of every inbound HTTP request against the
//! [`Authenticator`] of the workload (its RequestAuthentication `jwtRules`), answers
//! `401` when a token is invalid, and otherwise hands the request on with the validated
//! token as a [`RequestAuth`] in its extensions, where
//! [`AuthzLayer`](crate::authz::AuthzLayer) reads `requestPrincipals` and the
//! `request.auth.*` attributes.
//!
//! # Behaviour
//!
//! - **Scope** (RA-01): RequestAuthentications of the workload's namespace without
//!   selector or whose selector matches, and those of the root namespace
//!   ([`Authenticator::from_config`]). `targetRefs` policies select no workload.
//! - **Locations** (RA-02, RA-03): `fromHeaders` (the prefix, e.g. `Bearer `, compared
//!   without ASCII case), `fromParams`, `fromCookies`; with none of them,
//!   `Authorization: Bearer <token>` and then the `access_token` query parameter.
//! - **Outcomes** (RA-04..RA-06): a request without a token passes unauthenticated (only
//!   an AuthorizationPolicy such as `requestPrincipals: ["*"]` can require one). Every
//!   token present must be valid for a rule that reads it from where it was found and
//!   names its `iss`; otherwise `401` with `www-authenticate: Bearer realm="<url>",
//!   error="invalid_token"` and Envoy's body (`Jwt is expired`, `Jwt verification
//!   fails`, `Jwt issuer is not configured`, ...). Several tokens that are all valid:
//!   the first found (rules in order, then their locations) gives the principal (RA-07
//!   leaves it undefined). CORS preflights (`OPTIONS` with `Origin` and
//!   `Access-Control-Request-Method`) are not checked.
//! - **Checks**: `iss` equals the rule's `issuer`; `aud` (a string or a list) contains one
//!   of `audiences` when they are set (none set: any audience); `exp` and `nbf` with 60 s
//!   of clock skew (Envoy's default), a token without them is accepted; the signature
//!   with a key of the set whose `kid` matches the token's (a token without `kid` tries
//!   every key). Algorithms: those `jsonwebtoken` verifies with ring — RS256/384/512,
//!   PS256/384/512, ES256/384, EdDSA (Ed25519) and HS256/384/512 with `oct` keys; `none`
//!   is never accepted.
//! - **Time** is tokio's: a wall-clock reading taken when the rules are compiled,
//!   advanced by tokio's monotonic clock ([`Authenticator`] is recompiled on every
//!   configuration change).
//! - **Keys** (RA-12..RA-14): inline `jwks`, or fetched by the proxy itself from
//!   `jwksUri`, or, with neither, from the `jwks_uri` of
//!   `<issuer>/.well-known/openid-configuration`. A fetched set is refreshed every 20
//!   minutes; after a failed refresh the next is in 1 minute, doubling with each further
//!   failure up to 60 minutes, and back to 20 minutes after a success. A refresh makes up
//!   to three attempts one second apart, each bounded by the rule's `timeout` (default
//!   5 s). A failed refresh keeps the keys it had. A set that was never fetched fails
//!   closed: a request with a token for its issuer gets `401` (after waiting for the first
//!   fetch), a request without a token passes. Sets are shared by origin in a
//!   [`JwksCache`], so a configuration reload does not fetch again.
//! - **Forwarding** (RA-08): on success the token's header is removed before the
//!   application unless `forwardOriginalToken: true`; `outputPayloadToHeader` receives
//!   the token's payload (base64url, as in the token) and `outputClaimToHeaders` the
//!   named claims (`a.b` for nested ones; strings, numbers and booleans).
//!
//! # Choices
//!
//! - The proxy fetches the key sets itself (Istio's `PILOT_JWT_ENABLE_REMOTE_JWKS=envoy`
//!   mode), with istiod's refresh schedule: there is no istiod to inline them. The fetch
//!   goes over a plain hyper client (HTTP, or HTTPS verified against the operating
//!   system's trust store through `hyper-rustls`), not the mesh's upstream connector,
//!   because an issuer is not a mesh destination and needs public trust roots that the
//!   upstream connector does not carry. [`FetchJwks`] lets an embedder fetch otherwise.
//! - Tokens carried in query parameters and cookies are forwarded as they are (Envoy
//!   removes only header tokens).
//! - Headers named by `outputPayloadToHeader` and `outputClaimToHeaders` are removed from
//!   every request before authentication, so a client cannot forge them (Envoy
//!   overwrites them only when a token is valid).
//! - `jsonwebtoken` 9 on ring is used rather than 12 on RustCrypto: ring already
//!   verifies the mesh's TLS, so the graph gains no second crypto stack.
//!
//! # Layer placement
//!
//! Inbound and at gateways: after the local replies (`respond`) and before
//! AuthorizationPolicy, inside the per-connection extensions.
//!
//! # Errors
//!
//! [`RuleError`] names the policy and field of a rule that cannot be compiled (a `jwks`
//! that is not a key set, a bad header name). Requests are never failed by the layer
//! except with `401`; the inner service's errors pass through.

mod jwks;
mod layer;
mod rules;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use jwks::{
    FAILED_REFRESH_INTERVAL, FetchFuture, FetchJwks, HttpFetch, JwksCache, KeySet,
    MAX_DOCUMENT_BYTES, MAX_FAILED_REFRESH_INTERVAL, REFRESH_INTERVAL, next_refresh,
};
pub use layer::{Authn, AuthnBody, AuthnFuture, AuthnHandle, AuthnLayer};
pub use rules::{
    Authenticator, CLOCK_SKEW, DEFAULT_FETCH_TIMEOUT, JwtProvider, Location, RuleError,
};

/// Why a token was refused (each answered with `401`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// Not three base64url parts with a JSON payload.
    #[error("the token is malformed")]
    Malformed,
    /// No rule that reads the token's location names its issuer.
    #[error("the token's issuer is not configured")]
    UnknownIssuer,
    /// `exp` has passed.
    #[error("the token is expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not yet valid")]
    NotYetValid,
    /// `aud` names none of the rule's audiences.
    #[error("the token's audience is not allowed")]
    AudienceNotAllowed,
    /// The signature does not verify with any key.
    #[error("the token's signature does not verify")]
    Unverified,
    /// No key of the set has the token's `kid`.
    #[error("no key of the JWKS matches the token")]
    NoMatchingKey,
    /// The rule's key set could not be fetched.
    #[error("the JWKS could not be fetched")]
    JwksUnavailable,
}

impl AuthnError {
    /// The `401` body (Envoy's jwt_authn wording, RA-15).
    pub fn body(self) -> &'static str {
        match self {
            AuthnError::Malformed => "Jwt is not in the form of Header.Payload.Signature",
            AuthnError::UnknownIssuer => "Jwt issuer is not configured",
            AuthnError::Expired => "Jwt is expired",
            AuthnError::NotYetValid => "Jwt not yet valid",
            AuthnError::AudienceNotAllowed => "Audiences in Jwt are not allowed",
            AuthnError::Unverified => "Jwt verification fails",
            AuthnError::NoMatchingKey => "Jwks doesn't have key to match kid or alg from Jwt",
            AuthnError::JwksUnavailable => "Jwks remote fetch is failed",
        }
    }
}

/// A validated token, inserted into the request extensions by [`AuthnLayer`]: the
/// request principal and the claims AuthorizationPolicy matches on. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RequestAuth(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    claims: Map<String, Value>,
    principal: Option<String>,
    space_delimited: Arc<[String]>,
}

impl RequestAuth {
    /// A validated token with `claims`; top-level claims named in `space_delimited`
    /// are read as space-separated lists.
    pub fn new(claims: Map<String, Value>, space_delimited: Arc<[String]>) -> Self {
        let principal = match (
            claims.get("iss").and_then(Value::as_str),
            claims.get("sub").and_then(Value::as_str),
        ) {
            (Some(iss), Some(sub)) => Some(format!("{iss}/{sub}")),
            _ => None,
        };
        RequestAuth(Arc::new(Inner {
            claims,
            principal,
            space_delimited,
        }))
    }

    /// `<iss>/<sub>` (RA-09), when the token has both.
    pub fn principal(&self) -> Option<&str> {
        self.0.principal.as_deref()
    }

    /// The `iss` claim.
    pub fn issuer(&self) -> Option<&str> {
        self.0.claims.get("iss").and_then(Value::as_str)
    }

    /// The `sub` claim.
    pub fn subject(&self) -> Option<&str> {
        self.0.claims.get("sub").and_then(Value::as_str)
    }

    /// Every claim.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.0.claims
    }

    /// The claim at `path` (`["a", "b"]` for `[a][b]`).
    pub fn claim(&self, path: &[&str]) -> Option<&Value> {
        let (first, rest) = path.split_first()?;
        let mut v = self.0.claims.get(*first)?;
        for p in rest {
            v = v.as_object()?.get(*p)?;
        }
        Some(v)
    }

    /// The string values of the claim at `path` (RA-10): a string (split on spaces for
    /// `scope`, `permission` and `spaceDelimitedClaims`), or the strings of a list.
    pub fn claim_strings(&self, path: &[&str]) -> Vec<&str> {
        let Some(v) = self.claim(path) else {
            return Vec::new();
        };
        let split = path.len() == 1 && self.0.space_delimited.iter().any(|c| c == path[0]);
        match v {
            Value::String(s) if split => s.split(' ').filter(|s| !s.is_empty()).collect(),
            Value::String(s) => vec![s.as_str()],
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
}
