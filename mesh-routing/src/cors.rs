//! A route's CORS policy (VirtualService `corsPolicy`), as Envoy's CORS filter applies it.
//!
//! # Behaviour
//!
//! A request is a CORS request when it carries `Origin` and the origin matches one of
//! `allowOrigins` (exact, prefix or regex; the deprecated `allowOrigin` list is exact
//! matches; no origins: nothing matches):
//!
//! - a **preflight** (`OPTIONS` with `Access-Control-Request-Method`) is answered by the
//!   proxy, 200 with `Access-Control-Allow-Origin: <origin>` and, when configured,
//!   `-Allow-Methods`, `-Allow-Headers`, `-Max-Age` (seconds) and
//!   `-Allow-Credentials: true`; nothing is forwarded, and faults do not apply (Istio
//!   places the CORS filter before the fault filter);
//! - any other request is routed as usual, and its response gets
//!   `Access-Control-Allow-Origin: <origin>`, `-Allow-Credentials: true` when set, and
//!   `-Expose-Headers` when configured.
//!
//! A preflight whose origin matches nothing is forwarded (`unmatchedPreflights: FORWARD`,
//! Istio's default, VS-85) or answered 200 without CORS headers (`IGNORE`). Other
//! requests from origins that match nothing get no CORS headers. Lists are joined with
//! `,` as Istio writes them into Envoy's configuration.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, HeaderMap, HeaderValue, ORIGIN,
};
use http::{Method, Response, StatusCode};
use mesh_core::body::BoxBody;

use crate::matcher::StringMatch;

/// A compiled `corsPolicy`.
#[derive(Clone, Debug, Default)]
pub struct CorsPolicy {
    origins: Vec<StringMatch>,
    methods: Option<HeaderValue>,
    headers: Option<HeaderValue>,
    expose: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
    forward_unmatched_preflights: bool,
}

/// What the policy makes of one request.
#[derive(Debug)]
pub enum CorsCheck {
    /// Not a CORS request this policy allows: route it as usual.
    Pass,
    /// A preflight the proxy answers.
    Answer(Response<BoxBody>),
    /// An allowed cross-origin request: route it, then add the headers for this origin
    /// to its response ([`CorsPolicy::decorate`]).
    Allowed(HeaderValue),
}

/// A `corsPolicy` list or value that cannot be a header value.
#[derive(Debug, thiserror::Error)]
#[error("corsPolicy.{field}: {value:?} is not a valid header value")]
pub struct CorsError {
    field: &'static str,
    value: String,
}

fn joined(field: &'static str, items: &[String]) -> Result<Option<HeaderValue>, CorsError> {
    if items.is_empty() {
        return Ok(None);
    }
    let value = items.join(",");
    HeaderValue::from_str(&value)
        .map(Some)
        .map_err(|_| CorsError { field, value })
}

impl CorsPolicy {
    /// The policy allowing `origins`, with the other fields of `policy`.
    pub fn new(
        origins: Vec<StringMatch>,
        policy: &mesh_core::config::CorsPolicy,
    ) -> Result<Self, CorsError> {
        let max_age = policy
            .max_age
            .map(|d| HeaderValue::from(std::time::Duration::from(d).as_secs()));
        Ok(Self {
            origins,
            methods: joined("allowMethods", &policy.allow_methods)?,
            headers: joined("allowHeaders", &policy.allow_headers)?,
            expose: joined("exposeHeaders", &policy.expose_headers)?,
            max_age,
            credentials: policy.allow_credentials == Some(true),
            forward_unmatched_preflights: policy.unmatched_preflights
                != Some(mesh_core::config::UnmatchedPreflights::Ignore),
        })
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        origin
            .to_str()
            .is_ok_and(|o| self.origins.iter().any(|m| m.matches(o)))
    }

    /// What to do with a request of `method` with `headers`.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> CorsCheck {
        let Some(origin) = headers.get(ORIGIN).filter(|o| !o.is_empty()) else {
            return CorsCheck::Pass;
        };
        let preflight = method == Method::OPTIONS
            && headers
                .get(ACCESS_CONTROL_REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        if !self.allows(origin) {
            return if preflight && !self.forward_unmatched_preflights {
                CorsCheck::Answer(ok(HeaderMap::new()))
            } else {
                CorsCheck::Pass
            };
        }
        if !preflight {
            return CorsCheck::Allowed(origin.clone());
        }
        let mut h = HeaderMap::new();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        for (name, value) in [
            (ACCESS_CONTROL_ALLOW_METHODS, &self.methods),
            (ACCESS_CONTROL_ALLOW_HEADERS, &self.headers),
            (ACCESS_CONTROL_MAX_AGE, &self.max_age),
        ] {
            if let Some(v) = value {
                h.insert(name, v.clone());
            }
        }
        CorsCheck::Answer(ok(h))
    }

    /// Adds the response headers of an allowed request from `origin`.
    pub fn decorate(&self, origin: HeaderValue, headers: &mut HeaderMap) {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if self.credentials {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

fn ok(headers: HeaderMap) -> Response<BoxBody> {
    let mut res = Response::new(mesh_core::body::empty());
    *res.status_mut() = StatusCode::OK;
    *res.headers_mut() = headers;
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(unmatched: Option<mesh_core::config::UnmatchedPreflights>) -> CorsPolicy {
        let config = mesh_core::config::CorsPolicy {
            allow_methods: vec!["POST".into(), "GET".into()],
            allow_headers: vec!["x-token".into()],
            expose_headers: vec!["x-trace".into()],
            max_age: Some(std::time::Duration::from_secs(86400).into()),
            allow_credentials: Some(true),
            unmatched_preflights: unmatched,
            ..mesh_core::config::CorsPolicy::default()
        };
        CorsPolicy::new(
            vec![
                StringMatch::exact("https://shop.example"),
                StringMatch::regex(r"https://.*\.partner\.example").unwrap(),
            ],
            &config,
        )
        .unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn an_allowed_preflight_is_answered_with_every_configured_header() {
        let p = policy(None);
        let req = headers(&[
            ("origin", "https://a.partner.example"),
            ("access-control-request-method", "POST"),
        ]);
        let CorsCheck::Answer(res) = p.check(&Method::OPTIONS, &req) else {
            panic!("not answered");
        };
        assert_eq!(res.status(), 200);
        let h = res.headers();
        assert_eq!(
            h["access-control-allow-origin"],
            "https://a.partner.example"
        );
        assert_eq!(h["access-control-allow-methods"], "POST,GET");
        assert_eq!(h["access-control-allow-headers"], "x-token");
        assert_eq!(h["access-control-max-age"], "86400");
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert!(!h.contains_key("access-control-expose-headers"));
    }

    #[test]
    fn actual_requests_pass_and_unmatched_preflights_follow_the_setting() {
        let p = policy(None);
        let get = headers(&[("origin", "https://shop.example")]);
        let CorsCheck::Allowed(origin) = p.check(&Method::GET, &get) else {
            panic!("not allowed");
        };
        let mut res = HeaderMap::new();
        p.decorate(origin, &mut res);
        assert_eq!(res["access-control-allow-origin"], "https://shop.example");
        assert_eq!(res["access-control-expose-headers"], "x-trace");
        // OPTIONS without Access-Control-Request-Method is an ordinary request.
        assert!(matches!(
            p.check(&Method::OPTIONS, &get),
            CorsCheck::Allowed(_)
        ));
        let evil = headers(&[
            ("origin", "https://shop.example.evil"),
            ("access-control-request-method", "POST"),
        ]);
        assert!(matches!(p.check(&Method::OPTIONS, &evil), CorsCheck::Pass));
        assert!(matches!(
            p.check(&Method::GET, &headers(&[])),
            CorsCheck::Pass
        ));
        let ignore = policy(Some(mesh_core::config::UnmatchedPreflights::Ignore));
        let CorsCheck::Answer(res) = ignore.check(&Method::OPTIONS, &evil) else {
            panic!("not answered");
        };
        assert_eq!(res.status(), 200);
        assert!(res.headers().is_empty());
    }
}
