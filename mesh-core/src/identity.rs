//! SPIFFE identities: `spiffe://<trust-domain>/<path>`.
//!
//! Parsing follows the SPIFFE ID standard (`standards/SPIFFE-ID.md`):
//!
//! - the scheme is exactly `spiffe` (lowercase) followed by `://`;
//! - the trust domain is non-empty, at most 255 bytes, made only of lowercase
//!   letters, digits, `.`, `-` and `_` (so no port, no userinfo, no uppercase);
//! - the path is empty or a sequence of `/segment`, each segment non-empty, not
//!   `.` or `..`, made of letters, digits, `.`, `-` and `_`; no trailing `/`;
//! - no query and no fragment (`?` and `#` are not allowed characters anyway);
//! - the whole ID is at most 2048 bytes.
//!
//! Istio's workload identities have the path `/ns/<namespace>/sa/<service-account>`;
//! [`Identity::namespace`] and [`Identity::service_account`] read that form, and
//! [`Identity::principal`] gives the scheme-less form AuthorizationPolicy uses.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest SPIFFE ID the standard allows, in bytes.
pub const MAX_ID_LEN: usize = 2048;
/// Longest trust domain the standard allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME_PREFIX: &str = "spiffe://";

/// A validated SPIFFE ID.
///
/// Cheap to clone (one `Arc`); compares and hashes as its string form.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    uri: Arc<str>,
    // Byte offset in `uri` where the path starts (== uri.len() for a root ID).
    path_start: usize,
}

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The string is empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The ID is longer than 2048 bytes.
    #[error("SPIFFE ID is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    /// The scheme is not `spiffe://`.
    #[error("SPIFFE ID must start with `spiffe://`")]
    Scheme,
    /// The trust domain is empty.
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    /// The trust domain is longer than 255 bytes.
    #[error("SPIFFE trust domain is {0} bytes long; at most 255 are allowed")]
    TrustDomainTooLong(usize),
    /// A character outside `[a-z0-9._-]` in the trust domain (this also rejects ports,
    /// userinfo and uppercase letters).
    #[error(
        "SPIFFE trust domain has the character {0:?}; only lowercase letters, digits, `.`, `-` and `_` are allowed"
    )]
    TrustDomainChar(char),
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("SPIFFE ID path has an empty segment (`//` or a trailing `/`)")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("SPIFFE ID path has a `.` or `..` segment")]
    DotSegment,
    /// A character outside `[a-zA-Z0-9._-]` in the path (this also rejects query and fragment).
    #[error(
        "SPIFFE ID path has the character {0:?}; only letters, digits, `.`, `-` and `_` are allowed"
    )]
    PathChar(char),
}

fn trust_domain_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

fn first_bad_char(s: &str, ok: fn(u8) -> bool) -> Option<char> {
    s.char_indices()
        .find(|(i, c)| !c.is_ascii() || !ok(s.as_bytes()[*i]))
        .map(|(_, c)| c)
}

impl Identity {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        if s.is_empty() {
            return Err(IdentityError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdentityError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(IdentityError::Scheme)?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        validate_path(path)?;
        Ok(Self {
            uri: Arc::from(s),
            path_start: SCHEME_PREFIX.len() + trust_domain.len(),
        })
    }

    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`, Istio's workload form.
    pub fn from_istio(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        Self::parse(&format!(
            "{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// Builds the root ID of a trust domain, `spiffe://<trust_domain>`.
    pub fn trust_domain_root(trust_domain: &str) -> Result<Self, IdentityError> {
        Self::parse(&format!("{SCHEME_PREFIX}{trust_domain}"))
    }

    /// The whole ID, `spiffe://…`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..self.path_start]
    }

    /// The path, empty for a trust-domain root ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// Whether this ID names a workload (has a path), as an X.509-SVID leaf requires.
    pub fn is_workload(&self) -> bool {
        self.path_start < self.uri.len()
    }

    /// Istio's principal form: the ID without `spiffe://`, e.g.
    /// `cluster.local/ns/production/sa/order-service`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..]
    }

    fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut segments = self.path().strip_prefix('/')?.split('/');
        match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The namespace of an Istio workload ID (`/ns/<namespace>/sa/<sa>`), `None` for other forms.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// The service account of an Istio workload ID, `None` for other forms.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    if td.is_empty() {
        return Err(IdentityError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdentityError::TrustDomainTooLong(td.len()));
    }
    match first_bad_char(td, trust_domain_char) {
        Some(c) => Err(IdentityError::TrustDomainChar(c)),
        None => Ok(()),
    }
}

fn validate_path(path: &str) -> Result<(), IdentityError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is empty and skipped.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(IdentityError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(IdentityError::DotSegment);
        }
        if let Some(c) = first_bad_char(segment, path_char) {
            return Err(IdentityError::PathChar(c));
        }
    }
    Ok(())
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Identity {
    type Error = IdentityError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.uri)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Valid and invalid examples from the SPIFFE ID standard and the reference
    // implementations' test tables (go-spiffe `spiffeid` package).
    #[test]
    fn accepts_the_standard_examples() {
        for id in [
            "spiffe://trust-domain-name/path",
            "spiffe://example.org",
            "spiffe://cluster.local/ns/production/sa/order-service",
            "spiffe://staging.example.com/payments/mysql",
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "spiffe://example.org/9eebccd2-12bf-40a6-b262-65fe0487d453",
            "spiffe://a_b.c-d/A.B_c-1",
            "spiffe://example.org/..a/b..",
        ] {
            let parsed = Identity::parse(id).unwrap();
            assert_eq!(parsed.as_str(), id);
        }
    }

    #[test]
    fn rejects_the_standard_counter_examples() {
        use IdentityError::*;
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let long_id = format!("spiffe://example.org/{}", "a".repeat(2048));
        let cases: Vec<(&str, IdentityError)> = vec![
            ("", Empty),
            ("http://example.org/foo", Scheme),
            ("SPIFFE://example.org/foo", Scheme),
            ("spiffe:/example.org/foo", Scheme),
            ("example.org/foo", Scheme),
            ("spiffe://", EmptyTrustDomain),
            ("spiffe:///path", EmptyTrustDomain),
            ("spiffe://Example.org/foo", TrustDomainChar('E')),
            ("spiffe://example.org:8080/foo", TrustDomainChar(':')),
            ("spiffe://user@example.org/foo", TrustDomainChar('@')),
            ("spiffe://example.org?query=1", TrustDomainChar('?')),
            ("spiffe://example.org#frag", TrustDomainChar('#')),
            ("spiffe://exa mple.org/foo", TrustDomainChar(' ')),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org/foo/", EmptySegment),
            ("spiffe://example.org//foo", EmptySegment),
            ("spiffe://example.org/./foo", DotSegment),
            ("spiffe://example.org/foo/..", DotSegment),
            ("spiffe://example.org/foo?x=1", PathChar('?')),
            ("spiffe://example.org/foo#frag", PathChar('#')),
            ("spiffe://example.org/f%20o", PathChar('%')),
            ("spiffe://example.org/fö", PathChar('ö')),
            ("spiffe://example.org/a\0b", PathChar('\0')),
        ];
        for (input, want) in cases {
            assert_eq!(Identity::parse(input), Err(want), "input {input:?}");
        }
        assert_eq!(
            Identity::parse(&long_td),
            Err(TrustDomainTooLong(256)),
            "256-byte trust domain"
        );
        assert_eq!(Identity::parse(&long_id), Err(TooLong(long_id.len())));
    }

    #[test]
    fn istio_accessors() {
        let id = Identity::parse("spiffe://cluster.local/ns/production/sa/order-service").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/production/sa/order-service");
        assert_eq!(id.namespace(), Some("production"));
        assert_eq!(id.service_account(), Some("order-service"));
        assert_eq!(
            id.principal(),
            "cluster.local/ns/production/sa/order-service"
        );
        assert!(id.is_workload());
        assert_eq!(
            Identity::from_istio("cluster.local", "production", "order-service").unwrap(),
            id
        );

        let other = Identity::parse("spiffe://cluster.local/ns/production/sa/x/extra").unwrap();
        assert_eq!(other.namespace(), None);
        let root = Identity::trust_domain_root("cluster.local").unwrap();
        assert!(!root.is_workload());
        assert_eq!(root.path(), "");
        assert_eq!(root.namespace(), None);
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,12}".prop_filter("dot segment", |s| s != "." && s != "..")
    }

    proptest! {
        #[test]
        fn parse_then_display_is_identity(
            td in "[a-z0-9._-]{1,40}",
            segments in proptest::collection::vec(segment(), 0..6),
        ) {
            let mut s = format!("spiffe://{td}");
            for seg in &segments {
                s.push('/');
                s.push_str(seg);
            }
            let id = Identity::parse(&s).unwrap();
            prop_assert_eq!(id.to_string(), s.clone());
            prop_assert_eq!(Identity::parse(&id.to_string()).unwrap(), id.clone());
            prop_assert_eq!(id.trust_domain(), td.as_str());
        }

        #[test]
        fn arbitrary_strings_never_panic_and_round_trip(s in "\\PC{0,80}") {
            if let Ok(id) = Identity::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
            }
        }
    }
}
