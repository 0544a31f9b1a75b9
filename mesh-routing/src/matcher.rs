//! Request matching: Istio's `HTTPMatchRequest` compiled into matchers that never
//! allocate or compile on the hot path.
//!
//! A [`RouteMatch`] ANDs its conditions (VS-04); a route ORs its match blocks. String
//! conditions follow VS-10..VS-17: `exact` and `prefix` are case-sensitive (except the
//! URI under `ignoreUriCase`), regexes are RE2-class ([`regex`]) anchored so they must
//! match the whole value, and an empty matcher or `regex: "*"` means "present".
//!
//! # Errors
//!
//! Building a matcher fails with [`MatchError`] for an invalid regex.
//!
//! # Example
//!
//! ```
//! use http::Request;
//! use mesh_routing::{HeaderMatch, RequestView, RouteMatch, StringMatch, UriMatch};
//!
//! let block = RouteMatch {
//!     uri: Some(UriMatch { matcher: StringMatch::prefix("/api"), ignore_case: false }),
//!     headers: vec![HeaderMatch::new("x-canary".parse().unwrap(), Some(StringMatch::exact("true")))],
//!     ..RouteMatch::default()
//! };
//! let req = Request::get("http://shop/apiv2").header("x-canary", "true").body(()).unwrap();
//! assert!(block.matches(&RequestView::from_request(&req, None)));
//! // Regexes match whole values only.
//! assert!(!StringMatch::regex(r"\d+").unwrap().matches("a123"));
//! ```

use http::{HeaderMap, HeaderName, Method};
use regex::Regex;

/// A matcher could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchError {
    /// The regex does not compile.
    #[error("invalid regex {pattern:?}: {reason}")]
    InvalidRegex {
        /// The pattern as written in the configuration.
        pattern: String,
        /// What the regex engine reported.
        reason: String,
    },
}

/// A regex that must match the whole input (Envoy `safe_regex` semantics, VS-12).
#[derive(Clone, Debug)]
pub struct FullRegex {
    pattern: String,
    compiled: Regex,
}

impl FullRegex {
    /// Compiles `pattern` anchored at both ends.
    pub fn new(pattern: &str) -> Result<Self, MatchError> {
        let compiled =
            Regex::new(&format!("^(?:{pattern})$")).map_err(|e| MatchError::InvalidRegex {
                pattern: pattern.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            pattern: pattern.to_owned(),
            compiled,
        })
    }

    /// The pattern as written (without the anchors).
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.compiled.is_match(value)
    }
}

impl PartialEq for FullRegex {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}

/// Istio's `StringMatch` oneof, compiled (VS-10).
#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    /// The value equals the string.
    Exact(String),
    /// The value starts with the string (a raw prefix, VS-11).
    Prefix(String),
    /// The whole value matches the regex (VS-12).
    Regex(FullRegex),
}

impl StringMatch {
    /// An exact matcher.
    pub fn exact(s: impl Into<String>) -> Self {
        Self::Exact(s.into())
    }

    /// A prefix matcher.
    pub fn prefix(s: impl Into<String>) -> Self {
        Self::Prefix(s.into())
    }

    /// A full-match regex matcher.
    pub fn regex(pattern: &str) -> Result<Self, MatchError> {
        FullRegex::new(pattern).map(Self::Regex)
    }

    /// Whether `value` matches, case-sensitively.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Regex(re) => re.is_match(value),
        }
    }

    /// Whether `value` matches; `exact`/`prefix` ignore ASCII case (regexes never do, VS-13).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value.eq_ignore_ascii_case(s),
            Self::Prefix(p) => {
                value.len() >= p.len()
                    && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            Self::Regex(re) => re.is_match(value),
        }
    }
}

/// The URI condition of a match block, with `ignoreUriCase`.
#[derive(Clone, Debug, PartialEq)]
pub struct UriMatch {
    /// The string condition on the path (without the query string).
    pub matcher: StringMatch,
    /// `ignoreUriCase`: `exact`/`prefix` compare ignoring ASCII case.
    pub ignore_case: bool,
}

impl UriMatch {
    /// Whether `path` satisfies the condition.
    pub fn matches(&self, path: &str) -> bool {
        if self.ignore_case {
            self.matcher.matches_ignore_case(path)
        } else {
            self.matcher.matches(path)
        }
    }
}

/// A condition on a header (`headers`) or its inversion (`withoutHeaders`), VS-14/VS-15.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: HeaderName,
    /// `None`: presence (`{}`, empty value or `regex: "*"`).
    pub matcher: Option<StringMatch>,
    /// `withoutHeaders`: the request matches only if the condition does NOT hold.
    pub invert: bool,
}

impl HeaderMatch {
    /// A `headers` condition; `matcher: None` means "present".
    pub fn new(name: HeaderName, matcher: Option<StringMatch>) -> Self {
        Self {
            name,
            matcher,
            invert: false,
        }
    }

    /// A `withoutHeaders` condition; `matcher: None` means "absent".
    pub fn without(name: HeaderName, matcher: Option<StringMatch>) -> Self {
        Self {
            name,
            matcher,
            invert: true,
        }
    }

    /// Whether `headers` satisfy the condition.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let held = match (&self.matcher, values.next()) {
            (None, first) => first.is_some(),
            (Some(m), None) => {
                // Envoy's treat_missing_header_as_empty applies to the inverted form only.
                self.invert && m.matches("")
            }
            (Some(m), Some(first)) => match values.next() {
                // Envoy joins repeated headers with ',' before matching.
                None => first.to_str().is_ok_and(|v| m.matches(v)),
                Some(_) => {
                    let joined = headers
                        .get_all(&self.name)
                        .iter()
                        .map(|v| v.to_str().unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(",");
                    m.matches(&joined)
                }
            },
        };
        held != self.invert
    }
}

/// A condition on a query parameter (VS-17).
#[derive(Clone, Debug, PartialEq)]
pub struct QueryParamMatch {
    /// The parameter name.
    pub name: String,
    /// `None`: presence.
    pub matcher: Option<StringMatch>,
}

impl QueryParamMatch {
    /// Whether the raw query string (without `?`) satisfies the condition.
    pub fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else {
            return false;
        };
        // The first occurrence of the key decides, as in Envoy; values are not decoded.
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == self.name {
                return self.matcher.as_ref().is_none_or(|m| m.matches(value));
            }
        }
        false
    }
}

/// The parts of a request a match reads, borrowed from it.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// `:method`.
    pub method: &'a Method,
    /// `:scheme` (`http` when unknown).
    pub scheme: &'a str,
    /// `:authority` as sent (may carry a port).
    pub authority: &'a str,
    /// The authority's host part, lower-cased by the caller if it wants case-insensitive host lookup.
    pub host: &'a str,
    /// The destination port the client addressed.
    pub port: u16,
    /// The path without the query string.
    pub path: &'a str,
    /// The query string without `?`.
    pub query: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// Reads the view from a request; `default_port` is used when neither the
    /// authority nor the scheme says which port was addressed.
    pub fn from_request<B>(req: &'a http::Request<B>, default_port: Option<u16>) -> Self {
        let uri = req.uri();
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let (host, explicit_port) = split_host_port(authority);
        let scheme = uri.scheme_str().unwrap_or("http");
        let port = explicit_port.or(default_port).unwrap_or(match scheme {
            "https" => 443,
            _ => 80,
        });
        Self {
            method: req.method(),
            scheme,
            authority,
            host,
            port,
            path: uri.path(),
            query: uri.query(),
            headers: req.headers(),
        }
    }
}

/// Splits `host[:port]` (IPv6 in brackets allowed).
pub fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((h, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (h, port);
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// One `HTTPMatchRequest` block: every present condition must hold (VS-04).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteMatch {
    /// `name` of the block (reported, not matched).
    pub name: Option<String>,
    /// `uri` with `ignoreUriCase`.
    pub uri: Option<UriMatch>,
    /// `scheme`.
    pub scheme: Option<StringMatch>,
    /// `method`.
    pub method: Option<StringMatch>,
    /// `authority`.
    pub authority: Option<StringMatch>,
    /// `headers` and `withoutHeaders`.
    pub headers: Vec<HeaderMatch>,
    /// `queryParams`.
    pub query_params: Vec<QueryParamMatch>,
    /// `port`.
    pub port: Option<u16>,
    /// The counters of the block's `statPrefix` (see [`crate::stats`]); `None` keeps no
    /// per-route statistics.
    pub stats: Option<std::sync::Arc<crate::stats::RouteStats>>,
}

impl RouteMatch {
    /// A block that matches every request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Whether every condition holds for `req`.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        self.port.is_none_or(|p| p == req.port)
            && self.uri.as_ref().is_none_or(|u| u.matches(req.path))
            && self
                .method
                .as_ref()
                .is_none_or(|m| m.matches(req.method.as_str()))
            && self.scheme.as_ref().is_none_or(|m| m.matches(req.scheme))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(req.authority))
            && self.headers.iter().all(|h| h.matches(req.headers))
            && self.query_params.iter().all(|q| q.matches(req.query))
    }
}
