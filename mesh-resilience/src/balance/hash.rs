//! Consistent hashing (`loadBalancer.consistentHash`): the request key and the table
//! it is looked up in.
//!
//! The key is hashed with XXH64 exactly as Envoy's hash policies do, so a key lands on
//! the endpoint Envoy would pick for the same endpoint set:
//!
//! - `httpHeaderName`: every value of the header, sorted, hashed as one string (one value:
//!   the value). No header: no key.
//! - `httpCookie`: the first cookie of that name in the `Cookie` headers, surrounding
//!   double quotes removed. Absent or empty with a `ttl`: a value is made from the
//!   downstream connection (remote and local address, as Envoy does), hashed, and sent to
//!   the client with `Set-Cookie: name="value"; Max-Age=ttl; Path=path; attributes;
//!   HttpOnly` (no `Max-Age` for a zero ttl: a session cookie). Absent without a `ttl`: no
//!   key.
//! - `useSourceIp`: the downstream peer's IP address (without the port) from
//!   [`ConnectionInfo`]. No connection info: no key.
//! - `httpQueryParameterName`: the first value of that parameter in the query, as
//!   written (not percent-decoded; a parameter without `=` has the empty value).
//!
//! A request without a key gets a random hash, which makes the pick random, as Envoy
//! does.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_core::ConnectionInfo;

use super::xxhash::{Xxh64, xxh64};

/// `loadBalancer.consistentHash`: what keys a request and which table maps keys to
/// endpoints. Requests with the same key go to the same endpoint while the endpoint set
/// stays the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConsistentHash {
    /// The request property that is hashed.
    pub key: HashKey,
    /// Ring hash or Maglev.
    pub algorithm: HashAlgorithm,
}

impl ConsistentHash {
    /// `key` on a ring of Envoy's default minimum size (1024).
    pub fn new(key: HashKey) -> Self {
        Self {
            key,
            algorithm: HashAlgorithm::default(),
        }
    }

    /// The same key in `algorithm`.
    #[must_use]
    pub fn with_algorithm(mut self, algorithm: HashAlgorithm) -> Self {
        self.algorithm = algorithm;
        self
    }
}

/// The request property a consistent hash is computed from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// `httpHeaderName`: the values of this header.
    Header(HeaderName),
    /// `httpCookie`: this cookie, generated when absent and a ttl is set.
    Cookie(HashCookie),
    /// `useSourceIp`: the downstream peer's IP address.
    SourceIp,
    /// `httpQueryParameterName`: this query parameter.
    QueryParameter(String),
}

/// `httpCookie`: the cookie that keys the hash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HashCookie {
    /// Cookie name.
    pub name: String,
    /// `Path` of a generated cookie; none or empty: no `Path` attribute.
    pub path: Option<String>,
    /// Lifetime of a generated cookie (whole seconds); `None`: never generated.
    pub ttl: Option<Duration>,
    /// More attributes of a generated cookie, in order: `(name, value)`; an empty value
    /// writes the name alone (`Secure`).
    pub attributes: Vec<(String, String)>,
}

impl HashCookie {
    /// `; Max-Age=…; Path=…; attributes; HttpOnly`: everything of the `Set-Cookie` value
    /// after `name="value"`, fixed per policy.
    pub(crate) fn set_cookie_tail(&self) -> Option<Box<str>> {
        let ttl = self.ttl?;
        let mut tail = String::new();
        if ttl.as_secs() != 0 {
            let _ = write!(tail, "; Max-Age={}", ttl.as_secs());
        }
        if let Some(path) = self.path.as_deref().filter(|p| !p.is_empty()) {
            let _ = write!(tail, "; Path={path}");
        }
        for (name, value) in &self.attributes {
            if value.is_empty() {
                let _ = write!(tail, "; {name}");
            } else {
                let _ = write!(tail, "; {name}={value}");
            }
        }
        tail.push_str("; HttpOnly");
        Some(tail.into_boxed_str())
    }
}

/// Why a hash table size is refused (Envoy refuses the cluster).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHashTable {
    /// The ring's minimum size is above Envoy's limit.
    #[error("minimumRingSize {0} is above the limit of {max}", max = HashAlgorithm::MAX_RING_SIZE)]
    RingTooLarge(u64),
    /// The Maglev table size is not a prime number within Envoy's limit.
    #[error("maglev tableSize {0} is not a prime number of at most {max}", max = HashAlgorithm::MAX_TABLE_SIZE)]
    TableSize(u64),
}

/// The table that maps a key's hash to an endpoint: Envoy's ring hash (ketama) or
/// Maglev, built the way Envoy builds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HashAlgorithm(Algorithm);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Algorithm {
    Ring { minimum_size: u64 },
    Maglev { table_size: u64 },
}

impl Default for HashAlgorithm {
    /// A ring of 1024 entries (Istio without `ringHash`/`maglev`).
    fn default() -> Self {
        Self(Algorithm::Ring {
            minimum_size: Self::DEFAULT_RING_SIZE,
        })
    }
}

impl HashAlgorithm {
    /// Envoy's default minimum ring size.
    pub const DEFAULT_RING_SIZE: u64 = 1024;
    /// Envoy's largest ring (8M entries).
    pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
    /// Envoy's default Maglev table size.
    pub const DEFAULT_TABLE_SIZE: u64 = 65_537;
    /// Envoy's largest Maglev table.
    pub const MAX_TABLE_SIZE: u64 = 5_000_011;

    /// A ring with at least `minimum_size` entries; `0` is the default 1024 (Istio cannot
    /// tell an explicit 0 from an absent value).
    pub fn ring_hash(minimum_size: u64) -> Result<Self, InvalidHashTable> {
        let minimum_size = if minimum_size == 0 {
            Self::DEFAULT_RING_SIZE
        } else {
            minimum_size
        };
        if minimum_size > Self::MAX_RING_SIZE {
            return Err(InvalidHashTable::RingTooLarge(minimum_size));
        }
        Ok(Self(Algorithm::Ring { minimum_size }))
    }

    /// A Maglev table of `table_size` entries, a prime; `0` is the default 65537.
    pub fn maglev(table_size: u64) -> Result<Self, InvalidHashTable> {
        let table_size = if table_size == 0 {
            Self::DEFAULT_TABLE_SIZE
        } else {
            table_size
        };
        if table_size > Self::MAX_TABLE_SIZE || !is_prime(table_size) {
            return Err(InvalidHashTable::TableSize(table_size));
        }
        Ok(Self(Algorithm::Maglev { table_size }))
    }

    /// Whether this is Maglev (else ring hash).
    pub fn is_maglev(&self) -> bool {
        matches!(self.0, Algorithm::Maglev { .. })
    }

    /// The ring's minimum size or the Maglev table's size.
    pub fn size(&self) -> u64 {
        match self.0 {
            Algorithm::Ring { minimum_size } => minimum_size,
            Algorithm::Maglev { table_size } => table_size,
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The hash of one request and the cookie to set on its response.
#[derive(Debug, Default)]
pub(crate) struct RequestHash {
    /// `None`: the request has no key.
    pub(crate) hash: Option<u64>,
    /// A generated cookie for the response.
    pub(crate) set_cookie: Option<HeaderValue>,
}

/// Hashes the key of a request (no allocation unless a cookie is generated, or a header
/// repeats more than eight times).
pub(crate) fn hash_request<B>(
    key: &HashKey,
    cookie_tail: Option<&str>,
    req: &http::Request<B>,
) -> RequestHash {
    match key {
        HashKey::Header(name) => RequestHash {
            hash: hash_header(req.headers(), name),
            set_cookie: None,
        },
        HashKey::Cookie(cookie) => hash_cookie(
            req.headers(),
            cookie,
            cookie_tail,
            req.extensions().get::<ConnectionInfo>(),
        ),
        HashKey::SourceIp => RequestHash {
            hash: req.extensions().get::<ConnectionInfo>().map(|c| {
                let mut buf = StackStr::new();
                let _ = write!(buf, "{}", c.remote.ip());
                xxh64(buf.as_bytes(), 0)
            }),
            set_cookie: None,
        },
        HashKey::QueryParameter(name) => RequestHash {
            hash: req
                .uri()
                .query()
                .and_then(|q| query_value(q, name))
                .map(|v| xxh64(v.as_bytes(), 0)),
            set_cookie: None,
        },
    }
}

fn hash_header(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let all = headers.get_all(name);
    let mut values = all.iter();
    let first = values.next()?;
    if values.next().is_none() {
        return Some(xxh64(first.as_bytes(), 0));
    }
    // Several values hash sorted, so their order does not matter (as in Envoy).
    let count = all.iter().count();
    let mut inline: [&[u8]; 8] = [&[]; 8];
    let mut spilled = Vec::new();
    let sorted: &mut [&[u8]] = if count <= inline.len() {
        for (slot, v) in inline.iter_mut().zip(all.iter()) {
            *slot = v.as_bytes();
        }
        &mut inline[..count]
    } else {
        spilled.extend(all.iter().map(HeaderValue::as_bytes));
        &mut spilled
    };
    sorted.sort_unstable();
    let mut h = Xxh64::new(0);
    for v in sorted.iter() {
        h.write(v);
    }
    Some(h.finish())
}

/// The value of the first cookie called `name`, as Envoy reads it: cookies split at `;`,
/// leading spaces of the name ignored, surrounding double quotes of the value removed.
pub(crate) fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for header in headers.get_all(http::header::COOKIE) {
        for pair in header.as_bytes().split(|b| *b == b';') {
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            let start = pair.iter().position(|b| *b != b' ').unwrap_or(eq).min(eq);
            if &pair[start..eq] != name.as_bytes() {
                continue;
            }
            let mut value = &pair[eq + 1..];
            if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
                value = &value[1..value.len() - 1];
            }
            return Some(value);
        }
    }
    None
}

fn hash_cookie(
    headers: &HeaderMap,
    cookie: &HashCookie,
    tail: Option<&str>,
    connection: Option<&ConnectionInfo>,
) -> RequestHash {
    let value = cookie_value(headers, &cookie.name).filter(|v| !v.is_empty());
    if let Some(value) = value {
        return RequestHash {
            hash: Some(xxh64(value, 0)),
            set_cookie: None,
        };
    }
    let Some(tail) = tail else {
        return RequestHash::default();
    };
    // Envoy derives the value from the downstream connection's addresses; without them
    // it hashes the empty value and sets no cookie.
    let Some(connection) = connection else {
        return RequestHash {
            hash: Some(xxh64(b"", 0)),
            set_cookie: None,
        };
    };
    let value = generated_cookie(connection.remote, connection.local);
    let set_cookie =
        HeaderValue::try_from(format!("{}=\"{}\"{tail}", cookie.name, value.as_str())).ok();
    RequestHash {
        hash: Some(xxh64(value.as_bytes(), 0)),
        set_cookie,
    }
}

/// The cookie value Envoy generates for a connection: the XXH64 of the remote and local
/// addresses written one after the other, as 16 lowercase hex digits.
pub(crate) fn generated_cookie(remote: SocketAddr, local: SocketAddr) -> StackStr {
    let mut addrs = StackStr::new();
    let _ = write!(addrs, "{remote}{local}");
    let mut hex = StackStr::new();
    let _ = write!(hex, "{:016x}", xxh64(addrs.as_bytes(), 0));
    hex
}

/// The first value of query parameter `name` (raw, not decoded).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|param| match param.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if param == name => Some(""),
            _ => None,
        })
}

/// A short string on the stack (addresses, hex digits): hashing a formatted value
/// without allocating.
pub(crate) struct StackStr {
    buf: [u8; 128],
    len: usize,
}

impl StackStr {
    fn new() -> Self {
        Self {
            buf: [0; 128],
            len: 0,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only `write_str` fills the buffer, with whole strings.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

impl fmt::Write for StackStr {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::ConnectionSecurity;

    fn req(headers: &[(&str, &str)], uri: &str) -> http::Request<()> {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn connection() -> ConnectionInfo {
        ConnectionInfo {
            remote: "10.1.2.3:45678".parse().unwrap(),
            local: "127.0.0.1:15001".parse().unwrap(),
            security: ConnectionSecurity::None,
        }
    }

    fn header_key(name: &str) -> HashKey {
        HashKey::Header(HeaderName::from_bytes(name.as_bytes()).unwrap())
    }

    #[test]
    fn a_header_hashes_its_value_and_repeated_values_in_sorted_order() {
        let key = header_key("X-User");
        let one = hash_request(&key, None, &req(&[("x-user", "alice")], "/"));
        assert_eq!(one.hash, Some(xxh64(b"alice", 0)));
        let ab = hash_request(&key, None, &req(&[("x-user", "b"), ("x-user", "a")], "/"));
        let ba = hash_request(&key, None, &req(&[("x-user", "a"), ("x-user", "b")], "/"));
        assert_eq!(ab.hash, Some(xxh64(b"ab", 0)));
        assert_eq!(ab.hash, ba.hash);
        let many: Vec<(&str, &str)> = ["j", "c", "a", "i", "b", "h", "d", "g", "e", "f"]
            .iter()
            .map(|v| ("x-user", *v))
            .collect();
        let spilled = hash_request(&key, None, &req(&many, "/"));
        assert_eq!(spilled.hash, Some(xxh64(b"abcdefghij", 0)));
        assert_eq!(hash_request(&key, None, &req(&[], "/")).hash, None);
    }

    #[test]
    fn cookies_are_read_as_envoy_reads_them() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.append(http::header::COOKIE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(
            cookie_value(&h("a=1; session=\"xyz\"; b=2"), "session"),
            Some(&b"xyz"[..])
        );
        assert_eq!(
            cookie_value(&h("sessionx=1;session=2"), "session"),
            Some(&b"2"[..])
        );
        assert_eq!(
            cookie_value(&h("flag; session="), "session"),
            Some(&b""[..])
        );
        assert_eq!(cookie_value(&h("other=1"), "session"), None);
        let mut two = h("a=1");
        two.append(http::header::COOKIE, HeaderValue::from_static("session=s2"));
        assert_eq!(cookie_value(&two, "session"), Some(&b"s2"[..]));
    }

    #[test]
    fn an_absent_cookie_with_a_ttl_is_generated_from_the_connection() {
        let cookie = HashCookie {
            name: "session".into(),
            path: Some("/".into()),
            ttl: Some(Duration::from_secs(3600)),
            attributes: vec![
                ("SameSite".into(), "Strict".into()),
                ("Secure".into(), String::new()),
            ],
        };
        let tail = cookie.set_cookie_tail();
        assert_eq!(
            tail.as_deref(),
            Some("; Max-Age=3600; Path=/; SameSite=Strict; Secure; HttpOnly")
        );
        let key = HashKey::Cookie(cookie.clone());
        let mut r = req(&[], "/");
        r.extensions_mut().insert(connection());
        let got = hash_request(&key, tail.as_deref(), &r);
        let value = generated_cookie(connection().remote, connection().local);
        assert_eq!(
            value.as_str(),
            format!("{:016x}", xxh64(b"10.1.2.3:45678127.0.0.1:15001", 0))
        );
        assert_eq!(got.hash, Some(xxh64(value.as_bytes(), 0)));
        assert_eq!(
            got.set_cookie.unwrap().to_str().unwrap(),
            format!(
                "session=\"{}\"; Max-Age=3600; Path=/; SameSite=Strict; Secure; HttpOnly",
                value.as_str()
            )
        );
        // The client sends it back: the same hash, nothing set.
        let back = req(
            &[("cookie", &format!("session=\"{}\"", value.as_str()))],
            "/",
        );
        let again = hash_request(&key, tail.as_deref(), &back);
        assert_eq!(again.hash, got.hash);
        assert!(again.set_cookie.is_none());
        // A zero ttl makes a session cookie.
        let session = HashCookie {
            ttl: Some(Duration::ZERO),
            path: None,
            attributes: Vec::new(),
            ..cookie.clone()
        };
        assert_eq!(session.set_cookie_tail().as_deref(), Some("; HttpOnly"));
        // Without a ttl nothing is generated and there is no key.
        let none = HashCookie {
            ttl: None,
            ..cookie
        };
        assert!(none.set_cookie_tail().is_none());
        let got = hash_request(&HashKey::Cookie(none), None, &r);
        assert!(got.hash.is_none() && got.set_cookie.is_none());
    }

    #[test]
    fn without_connection_info_a_generated_cookie_hashes_empty_and_sets_nothing() {
        let cookie = HashCookie {
            name: "s".into(),
            ttl: Some(Duration::from_secs(1)),
            ..HashCookie::default()
        };
        let tail = cookie.set_cookie_tail();
        let got = hash_request(&HashKey::Cookie(cookie), tail.as_deref(), &req(&[], "/"));
        assert_eq!(got.hash, Some(xxh64(b"", 0)));
        assert!(got.set_cookie.is_none());
    }

    #[test]
    fn source_ip_hashes_the_address_without_the_port() {
        let mut r = req(&[], "/");
        assert_eq!(hash_request(&HashKey::SourceIp, None, &r).hash, None);
        r.extensions_mut().insert(connection());
        assert_eq!(
            hash_request(&HashKey::SourceIp, None, &r).hash,
            Some(xxh64(b"10.1.2.3", 0))
        );
        let mut v6 = connection();
        v6.remote = "[2001:db8::1]:443".parse().unwrap();
        r.extensions_mut().insert(v6);
        assert_eq!(
            hash_request(&HashKey::SourceIp, None, &r).hash,
            Some(xxh64(b"2001:db8::1", 0))
        );
    }

    #[test]
    fn query_parameters_take_the_first_raw_value() {
        let key = HashKey::QueryParameter("user".into());
        let h = |uri: &str| hash_request(&key, None, &req(&[], uri)).hash;
        assert_eq!(h("/a?x=1&user=bob&user=eve"), Some(xxh64(b"bob", 0)));
        assert_eq!(h("/a?user=b%20c"), Some(xxh64(b"b%20c", 0)));
        assert_eq!(h("/a?user"), Some(xxh64(b"", 0)));
        assert_eq!(h("/a?username=bob"), None);
        assert_eq!(h("/a"), None);
    }

    #[test]
    fn table_sizes_follow_envoy_limits() {
        assert_eq!(HashAlgorithm::ring_hash(0).unwrap().size(), 1024);
        assert!(HashAlgorithm::ring_hash(HashAlgorithm::MAX_RING_SIZE + 1).is_err());
        assert_eq!(HashAlgorithm::maglev(0).unwrap().size(), 65_537);
        assert!(HashAlgorithm::maglev(251).unwrap().is_maglev());
        assert_eq!(
            HashAlgorithm::maglev(1000),
            Err(InvalidHashTable::TableSize(1000))
        );
        assert!(HashAlgorithm::maglev(HashAlgorithm::MAX_TABLE_SIZE).is_ok());
        assert!(HashAlgorithm::maglev(5_000_101).is_err());
    }
}
