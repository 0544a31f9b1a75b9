//! Rewrites, redirects and direct responses (VS-80..VS-82).
//!
//! - [`Rewrite`]: `rewrite.uri` is Envoy's `prefix_rewrite`: after a prefix match only the
//!   matched prefix is replaced; after an exact or regex match the whole path is; a match
//!   block without a `uri` condition counts as `prefix: /`. `uriRegexRewrite` substitutes
//!   every match of its RE2 regex (`\1` capture references). The query string is kept. The
//!   original `:path` travels upstream in `x-envoy-original-path`.
//! - [`Redirect`]: a local 301 (or `redirectCode`) with a `Location` built from the request.
//! - [`DirectResponse`]: a fixed status and body.

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use mesh_core::body::{self, BoxBody};
use regex::Regex;

use crate::matcher::{MatchError, RequestView, StringMatch, UriMatch};

/// The header carrying the path before a rewrite.
pub static ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

/// Replaces the part of `path` (no query) that `matched` selected with `replacement`.
fn replace_matched(path: &str, matched: Option<&UriMatch>, replacement: &str) -> String {
    let prefix_len = match matched.map(|u| &u.matcher) {
        // Exact and regex matches replace the whole path.
        Some(StringMatch::Exact(_)) | Some(StringMatch::Regex(_)) => path.len(),
        Some(StringMatch::Prefix(p)) => p.len().min(path.len()),
        // No uri condition: Istio emits `prefix: /`.
        None => 1.min(path.len()),
    };
    let mut out = String::with_capacity(replacement.len() + path.len() - prefix_len);
    out.push_str(replacement);
    out.push_str(&path[prefix_len..]);
    out
}

fn with_query(path: String, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// `rewrite.uriRegexRewrite`.
#[derive(Clone, Debug)]
pub struct RegexRewrite {
    regex: Regex,
    replacement: String,
}

impl RegexRewrite {
    /// Compiles `pattern`; `rewrite` may use RE2 capture references `\1`…`\9`.
    pub fn new(pattern: &str, rewrite: &str) -> Result<Self, MatchError> {
        let regex = Regex::new(pattern).map_err(|e| MatchError::InvalidRegex {
            pattern: pattern.to_owned(),
            reason: e.to_string(),
        })?;
        // RE2's `\1` becomes the regex crate's `${1}`; a literal `$` must be doubled.
        let mut replacement = String::with_capacity(rewrite.len() + 8);
        let mut chars = rewrite.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                    let digit = chars.next().unwrap_or('0');
                    replacement.push_str("${");
                    replacement.push(digit);
                    replacement.push('}');
                }
                '$' => replacement.push_str("$$"),
                c => replacement.push(c),
            }
        }
        Ok(Self { regex, replacement })
    }

    fn apply(&self, path: &str) -> String {
        self.regex
            .replace_all(path, self.replacement.as_str())
            .into_owned()
    }
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &Self) -> bool {
        self.regex.as_str() == other.regex.as_str() && self.replacement == other.replacement
    }
}

/// A route's `rewrite` block.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rewrite {
    /// `rewrite.uri` (prefix-rewrite semantics).
    pub uri: Option<String>,
    /// `rewrite.uriRegexRewrite`.
    pub uri_regex: Option<RegexRewrite>,
    /// `rewrite.authority` (or a `set` of `host` in the route's headers).
    pub authority: Option<HeaderValue>,
}

impl Rewrite {
    /// Whether nothing is rewritten.
    pub fn is_empty(&self) -> bool {
        self.uri.is_none() && self.uri_regex.is_none() && self.authority.is_none()
    }

    /// Rewrites `req` in place; `matched` is the uri condition of the block that matched.
    pub fn apply<B>(&self, req: &mut Request<B>, matched: Option<&UriMatch>) {
        let new_path = {
            let uri = req.uri();
            let path = uri.path();
            if let Some(replacement) = &self.uri {
                Some(with_query(
                    replace_matched(path, matched, replacement),
                    uri.query(),
                ))
            } else {
                self.uri_regex
                    .as_ref()
                    .map(|rr| with_query(rr.apply(path), uri.query()))
            }
        };
        if let Some(new_path) = new_path {
            let original = req
                .uri()
                .path_and_query()
                .map(PathAndQuery::as_str)
                .unwrap_or("/")
                .to_owned();
            if let Ok(pq) = new_path.parse::<PathAndQuery>() {
                let mut parts = req.uri().clone().into_parts();
                parts.path_and_query = Some(pq);
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                    if let Ok(v) = HeaderValue::from_str(&original) {
                        req.headers_mut().insert(ORIGINAL_PATH.clone(), v);
                    }
                }
            }
        }
        if let Some(authority) = &self.authority {
            set_authority(req, authority);
        }
    }
}

/// Replaces the request's authority (both the URI's and the `Host` header).
fn set_authority<B>(req: &mut Request<B>, authority: &HeaderValue) {
    req.headers_mut()
        .insert(http::header::HOST, authority.clone());
    if req.uri().authority().is_some()
        && let Ok(a) = authority
            .to_str()
            .unwrap_or_default()
            .parse::<http::uri::Authority>()
    {
        let mut parts = req.uri().clone().into_parts();
        parts.authority = Some(a);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// How a redirect chooses the port of `Location`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedirectPort {
    /// Keep the request's explicit port unless the authority is redirected.
    #[default]
    Keep,
    /// `port`.
    Explicit(u16),
    /// `derivePort: FROM_PROTOCOL_DEFAULT` (80 for http, 443 for https).
    FromProtocolDefault,
    /// `derivePort: FROM_REQUEST_PORT`.
    FromRequestPort,
}

/// A route's `redirect` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `uri`: replaces the whole path.
    pub uri: Option<String>,
    /// `prefixRewrite`: replaces the matched prefix.
    pub prefix_rewrite: Option<String>,
    /// `authority`.
    pub authority: Option<String>,
    /// `scheme`.
    pub scheme: Option<String>,
    /// `port` / `derivePort`.
    pub port: RedirectPort,
    /// `redirectCode`, default 301.
    pub status: StatusCode,
}

impl Default for Redirect {
    fn default() -> Self {
        Self {
            uri: None,
            prefix_rewrite: None,
            authority: None,
            scheme: None,
            port: RedirectPort::Keep,
            status: StatusCode::MOVED_PERMANENTLY,
        }
    }
}

impl Redirect {
    /// The `Location` for `req` (matched by the block whose uri condition is `matched`).
    pub fn location(&self, req: &RequestView<'_>, matched: Option<&UriMatch>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let host = self.authority.as_deref().unwrap_or(req.host);
        let (_, request_port) = crate::matcher::split_host_port(req.authority);
        let default_port = if scheme == "https" { 443 } else { 80 };
        let port = match self.port {
            RedirectPort::Explicit(p) => Some(p),
            RedirectPort::FromProtocolDefault => None,
            RedirectPort::FromRequestPort => Some(req.port),
            RedirectPort::Keep if self.authority.is_none() && self.scheme.is_none() => request_port,
            RedirectPort::Keep => None,
        }
        .filter(|&p| p != default_port);
        let path = if let Some(uri) = &self.uri {
            uri.clone()
        } else if let Some(prefix) = &self.prefix_rewrite {
            replace_matched(req.path, matched, prefix)
        } else {
            req.path.to_owned()
        };
        let path = with_query(path, req.query);
        match port {
            Some(p) => format!("{scheme}://{host}:{p}{path}"),
            None => format!("{scheme}://{host}{path}"),
        }
    }

    /// The redirect response.
    pub fn response(&self, req: &RequestView<'_>, matched: Option<&UriMatch>) -> Response<BoxBody> {
        let mut res = Response::new(body::empty());
        *res.status_mut() = self.status;
        if let Ok(v) = HeaderValue::from_str(&self.location(req, matched)) {
            res.headers_mut().insert(http::header::LOCATION, v);
        }
        res
    }
}

/// A route's `directResponse` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectResponse {
    /// `status`.
    pub status: StatusCode,
    /// `body.string` / `body.bytes`; empty when omitted.
    pub body: Bytes,
}

/// The largest direct-response body Istio accepts (1 MiB).
pub const MAX_DIRECT_RESPONSE_BODY: usize = 1024 * 1024;

impl DirectResponse {
    /// The response.
    pub fn response(&self) -> Response<BoxBody> {
        let mut res = Response::new(if self.body.is_empty() {
            body::empty()
        } else {
            body::full(self.body.clone())
        });
        *res.status_mut() = self.status;
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn prefix(p: &str) -> UriMatch {
        UriMatch {
            matcher: StringMatch::prefix(p),
            ignore_case: false,
        }
    }

    fn rewritten(uri: &str, matched: Option<&UriMatch>, rw: &Rewrite) -> Request<()> {
        let mut req = Request::builder().uri(uri).body(()).unwrap();
        rw.apply(&mut req, matched);
        req
    }

    fn uri_rewrite(to: &str) -> Rewrite {
        Rewrite {
            uri: Some(to.into()),
            ..Rewrite::default()
        }
    }

    #[test]
    fn prefix_rewrite_replaces_only_the_matched_prefix() {
        let req = rewritten(
            "/ratings/5?x=1",
            Some(&prefix("/ratings")),
            &uri_rewrite("/v1/bookRatings"),
        );
        assert_eq!(req.uri(), "/v1/bookRatings/5?x=1");
        assert_eq!(req.headers()[&ORIGINAL_PATH], "/ratings/5?x=1");
    }

    #[test]
    fn prefix_with_trailing_slash_rewrites_to_the_surprising_v15() {
        let req = rewritten(
            "/ratings/5",
            Some(&prefix("/ratings/")),
            &uri_rewrite("/v1"),
        );
        assert_eq!(req.uri(), "/v15");
    }

    #[test]
    fn route_without_uri_match_rewrites_as_prefix_slash() {
        let req = rewritten("/x", None, &uri_rewrite("/v1"));
        assert_eq!(req.uri(), "/v1x");
    }

    #[test]
    fn exact_and_regex_matches_replace_the_whole_path() {
        let exact = UriMatch {
            matcher: StringMatch::exact("/a/b"),
            ignore_case: false,
        };
        assert_eq!(
            rewritten("/a/b", Some(&exact), &uri_rewrite("/c")).uri(),
            "/c"
        );
        let re = UriMatch {
            matcher: StringMatch::regex("/a/.*").unwrap(),
            ignore_case: false,
        };
        assert_eq!(
            rewritten("/a/zz?q", Some(&re), &uri_rewrite("/c")).uri(),
            "/c?q"
        );
    }

    #[test]
    fn regex_rewrite_uses_capture_references() {
        let rw = Rewrite {
            uri_regex: Some(
                RegexRewrite::new("^/service/([^/]+)(/.*)$", "\\2/instance/\\1").unwrap(),
            ),
            ..Rewrite::default()
        };
        let req = rewritten("/service/foo/v1/api?k=v", None, &rw);
        assert_eq!(req.uri(), "/v1/api/instance/foo?k=v");
        assert_eq!(req.headers()[&ORIGINAL_PATH], "/service/foo/v1/api?k=v");
    }

    #[test]
    fn authority_rewrite_changes_host_header_and_absolute_uri() {
        let rw = Rewrite {
            authority: Some(HeaderValue::from_static("new.example.com")),
            ..Rewrite::default()
        };
        let req = rewritten("http://old.example.com/p", None, &rw);
        assert_eq!(req.headers()["host"], "new.example.com");
        assert_eq!(req.uri().host(), Some("new.example.com"));
        assert!(!req.headers().contains_key(&ORIGINAL_PATH));
    }

    fn view<'a>(req: &'a Request<()>) -> RequestView<'a> {
        RequestView::from_request(req, None)
    }

    #[test]
    fn redirect_defaults_to_301_and_keeps_the_rest_of_the_url() {
        let req = Request::builder()
            .method(Method::GET)
            .uri("http://shop.example.com:8080/old?q=1")
            .body(())
            .unwrap();
        let r = Redirect {
            uri: Some("/new".into()),
            ..Redirect::default()
        };
        let res = r.response(&view(&req), None);
        assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            res.headers()["location"],
            "http://shop.example.com:8080/new?q=1"
        );
    }

    #[test]
    fn redirect_prefix_rewrite_keeps_the_tail_including_double_slash() {
        let req = Request::builder().uri("http://h/foo/baz").body(()).unwrap();
        let r = Redirect {
            prefix_rewrite: Some("/".into()),
            ..Redirect::default()
        };
        assert_eq!(
            r.location(&view(&req), Some(&prefix("/foo"))),
            "http://h//baz"
        );
    }

    #[test]
    fn redirect_to_https_with_derived_ports() {
        let req = Request::builder().uri("http://h:8080/p").body(()).unwrap();
        let r = Redirect {
            scheme: Some("https".into()),
            port: RedirectPort::FromProtocolDefault,
            status: StatusCode::PERMANENT_REDIRECT,
            ..Redirect::default()
        };
        assert_eq!(r.location(&view(&req), None), "https://h/p");
        let r = Redirect {
            authority: Some("other".into()),
            port: RedirectPort::FromRequestPort,
            ..Redirect::default()
        };
        assert_eq!(r.location(&view(&req), None), "http://other:8080/p");
        let r = Redirect {
            port: RedirectPort::Explicit(9000),
            ..Redirect::default()
        };
        assert_eq!(r.location(&view(&req), None), "http://h:9000/p");
    }

    #[test]
    fn direct_response_has_status_and_optional_body() {
        let d = DirectResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: Bytes::new(),
        };
        let res = d.response();
        assert_eq!(res.status(), 503);
        assert!(http_body::Body::is_end_stream(res.body()));
    }
}
