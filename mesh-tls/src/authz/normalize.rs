//! Request-path canonicalization: the one path that authorization matches and that is
//! forwarded upstream.
//!
//! [`canonicalize`] takes a request target (`path[?query][#fragment]`) and returns its
//! canonical form, or a [`PathError`] that the layer answers with `400 Bad Request`.
//! It is applied once per request; its output is both what policies match and what the
//! inner service receives, so the proxy and the backend never disagree about the path.
//!
//! Steps, in order (modes from MeshConfig `pathNormalization`, see [`PathNormalization`]):
//!
//! 1. The fragment (`#…`) is stripped (CVE-2021-39156). The query (`?…`) is kept verbatim
//!    for the backend and never takes part in path matching (CVE-2020-8595).
//! 2. Bytes outside visible ASCII (NUL, controls, space, DEL, non-ASCII) anywhere in the
//!    target, a `%` not followed by two hex digits, and `%00` are rejected (400).
//! 3. Percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; every
//!    other escape is kept, with its hex digits upper-cased (RFC 3986 §6.2.2). Decoding
//!    happens once: `%252e` stays `%252e`. `%2F`/`%5C` are decoded to `/` only by
//!    [`PathNormalization::DecodeAndMergeSlashes`], or rejected when
//!    [`NormalizeOptions::reject_escaped_slashes`] is set. A raw `\` becomes `/`.
//! 4. `;` path parameters: rejected (400) by default ([`PathParameters::Reject`]);
//!    [`PathParameters::Strip`] removes `;…` from every segment instead (and forwards the
//!    stripped path), so `/admin;x=y` and `/..;x/admin` become `/admin`.
//! 5. Dot segments are resolved (RFC 3986 §5.2.4): `/a/./b/../c` → `/a/c`; `..` never
//!    climbs above the root.
//! 6. With `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES`, runs of `/` collapse to one.
//!
//! `NONE` performs only steps 1, 2 and 4 (the validations), as Envoy with
//! `normalize_path: false`; it is offered for compatibility and is not safe with
//! path-based DENY policies.
//!
//! The default, `DEFAULT` ([`PathNormalization::Default`]), is the mesh's own choice:
//! `MERGE_SLASHES`, and 400 for `%2F`/`%5C`/`%3B` (any case), for double-encoded `%252F`,
//! `%255C`, `%252E`, and for percent-escapes that are not valid UTF-8 (overlong
//! `%C0%AF`, lone continuation bytes, truncated sequences). Whatever a backend decodes,
//! it then sees the path the policy matched. Istio's `BASE` (its `DEFAULT`) is available
//! by name: with it, `//admin` and `/a%2Fb` are kept as they are, and a backend that
//! merges slashes or decodes `%2F` can see a different path than the policy did.
//!
//! Canonicalization is idempotent, and an already-canonical target is returned borrowed,
//! without allocating.

use std::borrow::Cow;
use std::fmt;

/// MeshConfig `pathNormalization.normalization`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PathNormalization {
    /// `DEFAULT`, the mesh's own (ISTIO.md §8.7, SECURITY.md): `MERGE_SLASHES`, plus a
    /// 400 for every form a backend could decode into a different path than the one the
    /// policy matched: escaped slashes and backslashes (`%2F`, `%5C`, any case),
    /// double-encoded slashes, backslashes and dots (`%252F`, `%255C`, `%252E`), and
    /// percent-escapes that are not valid UTF-8 (overlong forms such as `%C0%AF`,
    /// stray continuation bytes, truncated sequences). Istio's `DEFAULT` is `BASE`;
    /// `BASE` stays available by name.
    #[default]
    Default,
    /// No normalization (validation only). Unsafe with path-based DENY policies.
    None,
    /// RFC 3986 normalization: unreserved escapes decoded, `\` → `/`, dot segments resolved.
    Base,
    /// `BASE` plus merging of `//` into `/`.
    MergeSlashes,
    /// `MERGE_SLASHES` plus decoding of `%2F` and `%5C` before merging.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// Parses Istio's names: `DEFAULT`, `NONE`, `BASE`, `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`.
    pub fn from_istio(name: &str) -> Option<Self> {
        Some(match name {
            "DEFAULT" => Self::Default,
            "BASE" => Self::Base,
            "NONE" => Self::None,
            "MERGE_SLASHES" => Self::MergeSlashes,
            "DECODE_AND_MERGE_SLASHES" => Self::DecodeAndMergeSlashes,
            _ => return None,
        })
    }

    /// Whether runs of `/` collapse to one.
    pub fn merges_slashes(self) -> bool {
        matches!(
            self,
            Self::Default | Self::MergeSlashes | Self::DecodeAndMergeSlashes
        )
    }

    /// The Istio name of this mode.
    pub fn as_istio(self) -> &'static str {
        match self {
            Self::Default => "DEFAULT",
            Self::None => "NONE",
            Self::Base => "BASE",
            Self::MergeSlashes => "MERGE_SLASHES",
            Self::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }
}

/// What to do with `;` path parameters (`/admin;jsessionid=1`, `/..;x/admin`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PathParameters {
    /// Reject any `;` in the path with 400 (default).
    #[default]
    Reject,
    /// Remove `;…` from every segment before dot-segment resolution, as servlet
    /// containers do, and forward the stripped path.
    Strip,
}

/// How request paths are canonicalized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NormalizeOptions {
    /// The normalization mode (default `BASE`).
    pub normalization: PathNormalization,
    /// Reject `%2F` and `%5C` (any case) with 400 instead of keeping or decoding them.
    pub reject_escaped_slashes: bool,
    /// What to do with `;` path parameters.
    pub path_parameters: PathParameters,
}

impl NormalizeOptions {
    /// Options with the given mode and the other settings at their defaults.
    pub fn new(normalization: PathNormalization) -> Self {
        Self {
            normalization,
            ..Self::default()
        }
    }
}

/// Why a request target cannot be canonicalized; answered with `400 Bad Request`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A byte outside visible ASCII (NUL, control, space, DEL or non-ASCII).
    #[error("request target contains the byte {0:#04x}, which is not allowed")]
    InvalidByte(u8),
    /// `%00`.
    #[error("request path contains an encoded NUL (%00)")]
    EncodedNul,
    /// A `%` not followed by two hexadecimal digits.
    #[error("request path contains a malformed percent-escape")]
    MalformedEscape,
    /// `%2F` or `%5C` while escaped slashes are rejected.
    #[error("request path contains an escaped slash (%2F or %5C)")]
    EscapedSlash,
    /// `%252F`, `%255C` or `%252E` under `DEFAULT`.
    #[error("request path contains a double-encoded slash, backslash or dot")]
    DoubleEncoded,
    /// Percent-escapes that do not decode to UTF-8 (overlong forms among them) under
    /// `DEFAULT`.
    #[error("request path contains percent-escapes that are not valid UTF-8")]
    InvalidUtf8,
    /// A `;` path parameter while they are rejected.
    #[error("request path contains a `;` path parameter")]
    PathParameter,
    /// The path neither starts with `/` nor is `*`.
    #[error("request path does not start with `/`")]
    NotOriginForm,
}

/// A canonical request target: the path, and the query if there was one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Canonical<'a> {
    target: Cow<'a, str>,
    path_len: usize,
}

impl<'a> Canonical<'a> {
    /// The canonical path (no query, no fragment): what policies match.
    pub fn path(&self) -> &str {
        &self.target[..self.path_len]
    }

    /// The query without the `?`, if the target had one.
    pub fn query(&self) -> Option<&str> {
        self.target.get(self.path_len + 1..)
    }

    /// The path and query as forwarded upstream.
    pub fn as_str(&self) -> &str {
        &self.target
    }

    /// Whether the canonical target differs from the input (fragment aside).
    pub fn is_rewritten(&self) -> bool {
        matches!(self.target, Cow::Owned(_))
    }

    /// The canonical path and query.
    pub fn into_inner(self) -> Cow<'a, str> {
        self.target
    }
}

impl fmt::Display for Canonical<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.target)
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_visible(b: u8) -> bool {
    (0x21..0x7f).contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Whether `path` is already canonical under `opts`, checked without allocating.
fn is_canonical(path: &[u8], opts: &NormalizeOptions) -> bool {
    let merge = opts.normalization.merges_slashes();
    let normalize = opts.normalization != PathNormalization::None;
    let mut segment_start = 1;
    for (i, &b) in path.iter().enumerate() {
        if !is_visible(b) || b == b'%' || b == b';' || (normalize && b == b'\\') {
            return false;
        }
        if i > 0 && b == b'/' {
            let segment = &path[segment_start..i];
            if (merge && segment.is_empty()) || (normalize && matches!(segment, b"." | b"..")) {
                return false;
            }
            segment_start = i + 1;
        }
    }
    let last = &path[segment_start.min(path.len())..];
    !(normalize && matches!(last, b"." | b".."))
}

/// Canonicalizes a request target (`path[?query][#fragment]`) under `opts`.
///
/// Returns the input borrowed (minus any fragment) when it is already canonical.
///
/// ```
/// use mesh_tls::authz::{canonicalize, NormalizeOptions, PathNormalization};
///
/// let base = NormalizeOptions::default();
/// let c = canonicalize("/public/./data/abc/../%78yz?q=1#frag", &base).unwrap();
/// assert_eq!(c.path(), "/public/data/xyz");
/// assert_eq!(c.as_str(), "/public/data/xyz?q=1");
///
/// let decode = NormalizeOptions::new(PathNormalization::DecodeAndMergeSlashes);
/// assert_eq!(canonicalize("/something%2F..%2Fadmin", &decode).unwrap().path(), "/admin");
/// assert!(canonicalize("/admin;x=y", &base).is_err());
/// ```
pub fn canonicalize<'a>(
    target: &'a str,
    opts: &NormalizeOptions,
) -> Result<Canonical<'a>, PathError> {
    let without_fragment = match target.find('#') {
        Some(i) => &target[..i],
        None => target,
    };
    let (path, query) = match without_fragment.find('?') {
        Some(i) => (&without_fragment[..i], Some(&without_fragment[i + 1..])),
        None => (without_fragment, None),
    };
    if let Some(&b) = query.and_then(|q| q.as_bytes().iter().find(|&&b| !is_visible(b))) {
        return Err(PathError::InvalidByte(b));
    }
    if path == "*" {
        return Ok(Canonical {
            target: Cow::Borrowed(without_fragment),
            path_len: 1,
        });
    }
    if path.is_empty() {
        let mut owned = String::with_capacity(1 + without_fragment.len());
        owned.push('/');
        owned.push_str(without_fragment);
        return Ok(Canonical {
            target: Cow::Owned(owned),
            path_len: 1,
        });
    }
    if !path.starts_with('/') {
        if let Some(&b) = path.as_bytes().iter().find(|&&b| !is_visible(b)) {
            return Err(PathError::InvalidByte(b));
        }
        return Err(PathError::NotOriginForm);
    }
    if is_canonical(path.as_bytes(), opts) {
        return Ok(Canonical {
            target: Cow::Borrowed(without_fragment),
            path_len: path.len(),
        });
    }
    let canonical_path = canonical_path(path, opts)?;
    let path_len = canonical_path.len();
    let mut owned = canonical_path;
    if let Some(q) = query {
        owned.push('?');
        owned.push_str(q);
    }
    if owned == without_fragment {
        return Ok(Canonical {
            target: Cow::Borrowed(without_fragment),
            path_len,
        });
    }
    Ok(Canonical {
        target: Cow::Owned(owned),
        path_len,
    })
}

/// Step 2–4 decoding, then segment processing. `path` starts with `/`.
fn canonical_path(path: &str, opts: &NormalizeOptions) -> Result<String, PathError> {
    let normalize = opts.normalization != PathNormalization::None;
    let decode_slashes = opts.normalization == PathNormalization::DecodeAndMergeSlashes;
    let merge = opts.normalization.merges_slashes();
    let strict = opts.normalization == PathNormalization::Default;
    // Consecutive escaped bytes of 0x80 and above, checked as UTF-8 under `DEFAULT`.
    let mut high: Vec<u8> = Vec::new();

    // Decoding pass: every byte is ASCII afterwards, so the String stays valid UTF-8.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !is_visible(b) {
            return Err(PathError::InvalidByte(b));
        }
        if strict
            && !(b == b'%'
                && bytes
                    .get(i + 1)
                    .copied()
                    .and_then(hex)
                    .is_some_and(|h| h >= 8))
        {
            if std::str::from_utf8(&high).is_err() {
                return Err(PathError::InvalidUtf8);
            }
            high.clear();
        }
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::MalformedEscape);
                };
                let v = hi << 4 | lo;
                if v == 0 {
                    return Err(PathError::EncodedNul);
                }
                let slash = v == b'/' || v == b'\\';
                if slash && (opts.reject_escaped_slashes || strict) {
                    return Err(PathError::EscapedSlash);
                }
                if strict && v == b'%' {
                    let next = |k: usize| bytes.get(i + k).map(u8::to_ascii_uppercase);
                    if matches!(
                        (next(3), next(4)),
                        (Some(b'2'), Some(b'F' | b'E')) | (Some(b'5'), Some(b'C'))
                    ) {
                        return Err(PathError::DoubleEncoded);
                    }
                }
                if strict && v == b';' {
                    // An escaped `;` becomes a path parameter in a backend that decodes
                    // before it strips parameters.
                    return Err(PathError::PathParameter);
                }
                if strict && v >= 0x80 {
                    high.push(v);
                }
                if normalize && is_unreserved(v) {
                    decoded.push(char::from(v));
                } else if slash && decode_slashes {
                    decoded.push('/');
                } else if normalize {
                    decoded.push('%');
                    decoded.push(char::from(HEX_UPPER[usize::from(hi)]));
                    decoded.push(char::from(HEX_UPPER[usize::from(lo)]));
                } else {
                    decoded.push_str(&path[i..i + 3]);
                }
                i += 3;
            }
            b'\\' if normalize => {
                decoded.push('/');
                i += 1;
            }
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }

    if std::str::from_utf8(&high).is_err() {
        return Err(PathError::InvalidUtf8);
    }

    // Segment pass: path parameters, dot segments, merged slashes.
    let mut out = String::with_capacity(decoded.len());
    let mut segments = decoded[1..].split('/').peekable();
    // Byte offsets in `out` where each kept segment starts (for `..`).
    let mut starts: Vec<usize> = Vec::new();
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        let segment = match raw.find(';') {
            Some(_) if opts.path_parameters == PathParameters::Reject => {
                return Err(PathError::PathParameter);
            }
            Some(p) => &raw[..p],
            None => raw,
        };
        if !normalize {
            out.push('/');
            out.push_str(segment);
            continue;
        }
        match segment {
            "." | ".." => {
                if segment == ".."
                    && let Some(start) = starts.pop()
                {
                    out.truncate(start);
                }
                if last {
                    // `/a/b/..` resolves to `/a/`: the trailing slash stays.
                    starts.push(out.len());
                    out.push('/');
                }
            }
            "" if merge && !last => {}
            _ => {
                starts.push(out.len());
                out.push('/');
                out.push_str(segment);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    // A merged, stripped or resolved path can leave `//` behind only as empty segments
    // that `merge` dropped already; in BASE they are kept on purpose.
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(target: &str, mode: PathNormalization) -> Result<String, PathError> {
        canonicalize(target, &NormalizeOptions::new(mode)).map(|c| c.as_str().to_owned())
    }

    #[test]
    fn base_examples_from_istio_docs() {
        use PathNormalization::Base;
        assert_eq!(
            canon("/public/./data/abc/../xyz", Base).unwrap(),
            "/public/data/xyz"
        );
        assert_eq!(canon("/%2d%2E%30%41%5f%61%7e", Base).unwrap(), "/-.0A_a~");
        assert_eq!(canon("/a%2fb", Base).unwrap(), "/a%2Fb");
        assert_eq!(canon("/a%5cb", Base).unwrap(), "/a%5Cb");
        assert_eq!(canon("/a\\b", Base).unwrap(), "/a/b");
        assert_eq!(canon("//admin", Base).unwrap(), "//admin");
        assert_eq!(
            canon("/user/profile#section1", Base).unwrap(),
            "/user/profile"
        );
        assert_eq!(canon("/protected?", Base).unwrap(), "/protected?");
        assert_eq!(canon("/a/b/..", Base).unwrap(), "/a/");
        assert_eq!(canon("/..", Base).unwrap(), "/");
        assert_eq!(canon("/../../a", Base).unwrap(), "/a");
        assert_eq!(canon("/a//../b", Base).unwrap(), "/a/b");
        assert_eq!(
            canon("/%252e%252e/admin", Base).unwrap(),
            "/%252e%252e/admin"
        );
        assert_eq!(canon("", Base).unwrap(), "/");
        assert_eq!(canon("?x", Base).unwrap(), "/?x");
        assert_eq!(canon("*", Base).unwrap(), "*");
    }

    #[test]
    fn merge_and_decode_modes() {
        use PathNormalization::*;
        assert_eq!(canon("//admin", MergeSlashes).unwrap(), "/admin");
        assert_eq!(canon("/a///b//", MergeSlashes).unwrap(), "/a/b/");
        assert_eq!(canon("/a%2fb", MergeSlashes).unwrap(), "/a%2Fb");
        assert_eq!(canon("/a%2f/b", DecodeAndMergeSlashes).unwrap(), "/a/b");
        assert_eq!(canon("/%5Cadmin", DecodeAndMergeSlashes).unwrap(), "/admin");
        assert_eq!(canon("/a/../b//c", None).unwrap(), "/a/../b//c");
        assert_eq!(canon("/a%2e", None).unwrap(), "/a%2e");
    }

    #[test]
    fn rejects_malformed_targets() {
        use PathNormalization::*;
        for mode in [None, Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(canon("/a%00b", mode), Err(PathError::EncodedNul));
            assert_eq!(canon("/a%zz", mode), Err(PathError::MalformedEscape));
            assert_eq!(canon("/a%2", mode), Err(PathError::MalformedEscape));
            assert_eq!(canon("/a\0b", mode), Err(PathError::InvalidByte(0)));
            assert_eq!(canon("/a\x7fb", mode), Err(PathError::InvalidByte(0x7f)));
            assert_eq!(canon("/a b", mode), Err(PathError::InvalidByte(b' ')));
            assert_eq!(canon("/é", mode), Err(PathError::InvalidByte(0xc3)));
            assert_eq!(canon("/ok?a\nb", mode), Err(PathError::InvalidByte(b'\n')));
            assert_eq!(canon("/admin;x=y", mode), Err(PathError::PathParameter));
            assert_eq!(
                canon("/user/..;foo=bar/admin", mode),
                Err(PathError::PathParameter)
            );
            assert_eq!(canon("admin", mode), Err(PathError::NotOriginForm));
        }
    }

    #[test]
    fn strip_mode_removes_parameters_before_dot_segments() {
        let opts = NormalizeOptions {
            path_parameters: PathParameters::Strip,
            ..NormalizeOptions::default()
        };
        let c = |t| canonicalize(t, &opts).map(|c| c.as_str().to_owned());
        assert_eq!(c("/admin;jsessionid=1").unwrap(), "/admin");
        assert_eq!(c("/user/..;foo=bar/admin").unwrap(), "/admin");
        assert_eq!(c("/a;x/.;y/b;z?q;1").unwrap(), "/a/b?q;1");
    }

    #[test]
    fn reject_escaped_slashes_wins_over_decoding() {
        let opts = NormalizeOptions {
            normalization: PathNormalization::DecodeAndMergeSlashes,
            reject_escaped_slashes: true,
            ..NormalizeOptions::default()
        };
        assert_eq!(canonicalize("/a%2Fb", &opts), Err(PathError::EscapedSlash));
        assert_eq!(canonicalize("/a%5cb", &opts), Err(PathError::EscapedSlash));
        assert!(canonicalize("/a/b", &opts).is_ok());
    }

    #[test]
    fn canonical_targets_are_borrowed() {
        let opts = NormalizeOptions::default();
        let c = canonicalize("/api/v1/payments/123?x=1#f", &opts).unwrap();
        assert!(!c.is_rewritten());
        assert_eq!(c.path(), "/api/v1/payments/123");
        assert_eq!(c.query(), Some("x=1"));
        let c = canonicalize("/api/./v1", &opts).unwrap();
        assert!(c.is_rewritten());
        assert_eq!(c.query(), Option::None);
    }

    #[test]
    fn the_default_merges_and_rejects_every_form_a_backend_could_decode_differently() {
        use PathNormalization::Default as D;
        assert_eq!(PathNormalization::default(), D);
        assert_eq!(canon("//admin", D).unwrap(), "/admin");
        assert_eq!(canon("/a//..//admin", D).unwrap(), "/admin");
        assert_eq!(canon("/a\\..\\admin", D).unwrap(), "/admin");
        assert_eq!(canon("/admin#x", D).unwrap(), "/admin");
        assert_eq!(canon("/%61dmin", D).unwrap(), "/admin");
        assert_eq!(canon("/caf%C3%A9", D).unwrap(), "/caf%C3%A9");
        assert_eq!(canon("/a*b/c", D).unwrap(), "/a*b/c");
        for (input, err) in [
            ("/admin%2fx", PathError::EscapedSlash),
            ("/x%2F..%2Fadmin", PathError::EscapedSlash),
            ("/x%5cadmin", PathError::EscapedSlash),
            ("/x%5C..%5Cadmin", PathError::EscapedSlash),
            ("/x%252F..%252Fadmin", PathError::DoubleEncoded),
            ("/x%255c..%255cadmin", PathError::DoubleEncoded),
            ("/%252e%252e/admin", PathError::DoubleEncoded),
            ("/x/..%c0%afadmin", PathError::InvalidUtf8),
            ("/%e0%80%af", PathError::InvalidUtf8),
            ("/%80admin", PathError::InvalidUtf8),
            ("/%C3", PathError::InvalidUtf8),
            ("/%C3/x", PathError::InvalidUtf8),
            ("/admin;x=y", PathError::PathParameter),
            ("/..;x/admin", PathError::PathParameter),
            ("/admin%3Bx", PathError::PathParameter),
            ("/admin%3b", PathError::PathParameter),
            ("/a%zz", PathError::MalformedEscape),
            ("/a%00", PathError::EncodedNul),
        ] {
            assert_eq!(canon(input, D), Err(err), "{input}");
        }
        // Named modes keep Istio's meaning.
        assert_eq!(
            PathNormalization::from_istio("BASE"),
            Some(PathNormalization::Base)
        );
        assert_eq!(PathNormalization::from_istio("DEFAULT"), Some(D));
    }
}
