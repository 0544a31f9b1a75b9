//! The request head kept for replay.
//!
//! The first attempt goes upstream with the caller's own head; a copy is kept for the
//! attempts that may follow. The copy keeps the headers as raw bytes (every name and
//! value in order, with the values' sensitivity) in storage taken from a small
//! per-thread pool and given back when the request ends, so in steady state keeping the
//! copy allocates nothing. Copying bytes rather than cloning `HeaderName`s and
//! `HeaderValue`s matters for headers parsed off the wire: their first clone makes the
//! `bytes` crate move their bytes into shared storage, one allocation per name or value.
//! The names and values are rebuilt only when a retry is actually sent. Method and URI
//! are cloned (their storage is already shared), and the extensions are cloned when the
//! request has any.

use std::cell::RefCell;

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use mesh_core::BoxError;

/// Header copies kept per thread for reuse.
const POOLED_LISTS: usize = 32;
/// Copies of more headers than this are freed rather than pooled, so one huge request
/// does not pin memory.
const POOLED_HEADERS: usize = 64;
/// Likewise for the bytes of the names and values.
const POOLED_BYTES: usize = 16 * 1024;

/// One header of a [`RawHeaders`]: its name's and value's lengths in `bytes`.
#[derive(Clone, Copy)]
struct Entry {
    value_len: usize,
    name_len: u16,
    sensitive: bool,
}

/// Headers as raw bytes: the names and values back to back, and their lengths.
#[derive(Default)]
struct RawHeaders {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

thread_local! {
    static POOL: RefCell<Vec<RawHeaders>> = const { RefCell::new(Vec::new()) };
}

/// A copy of a request's headers in storage that returns to the per-thread pool when
/// dropped.
struct PooledHeaders(RawHeaders);

impl PooledHeaders {
    /// A copy of `src`, every value in order.
    fn copy(src: &HeaderMap) -> Self {
        let mut raw = POOL
            .try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        raw.entries.reserve(src.len());
        for (name, value) in src {
            let name = name.as_str().as_bytes();
            let value_bytes = value.as_bytes();
            raw.bytes.extend_from_slice(name);
            raw.bytes.extend_from_slice(value_bytes);
            raw.entries.push(Entry {
                value_len: value_bytes.len(),
                // A header name is at most 65 535 bytes long (`http`'s limit).
                name_len: u16::try_from(name.len()).unwrap_or(u16::MAX),
                sensitive: value.is_sensitive(),
            });
        }
        Self(raw)
    }

    /// The headers as a map again.
    fn to_map(&self) -> Result<HeaderMap, BoxError> {
        let mut map = HeaderMap::with_capacity(self.0.entries.len());
        let mut rest = self.0.bytes.as_slice();
        for e in &self.0.entries {
            let (name, tail) = rest.split_at(usize::from(e.name_len));
            let (value, tail) = tail.split_at(e.value_len);
            rest = tail;
            let mut value = HeaderValue::from_bytes(value)?;
            value.set_sensitive(e.sensitive);
            map.append(HeaderName::from_bytes(name)?, value);
        }
        Ok(map)
    }

    /// How many headers were copied.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.entries.len()
    }
}

impl Drop for PooledHeaders {
    fn drop(&mut self) {
        let mut raw = std::mem::take(&mut self.0);
        if raw.entries.capacity() > POOLED_HEADERS || raw.bytes.capacity() > POOLED_BYTES {
            return;
        }
        raw.entries.clear();
        raw.bytes.clear();
        // During thread teardown the pool may be gone: the storage is simply freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOLED_LISTS {
                p.push(raw);
            }
        });
    }
}

/// The head of a request, kept to build the attempts after the first.
pub(crate) struct ReplayHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: PooledHeaders,
    extensions: Extensions,
}

impl ReplayHead {
    /// A copy of `head` for later attempts.
    pub(crate) fn copy(head: &http::request::Parts) -> Self {
        Self {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: PooledHeaders::copy(&head.headers),
            extensions: if head.extensions.is_empty() {
                Extensions::new()
            } else {
                head.extensions.clone()
            },
        }
    }

    /// The head of one more attempt. Fails only if a copied header no longer parses,
    /// which the copy of a valid head cannot do.
    pub(crate) fn request(&self) -> Result<http::request::Parts, BoxError> {
        let (mut head, ()) = http::Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = self.uri.clone();
        head.version = self.version;
        head.headers = self.headers.to_map()?;
        head.extensions = self.extensions.clone();
        Ok(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> http::request::Parts {
        let mut secret = HeaderValue::from_static("Bearer x");
        secret.set_sensitive(true);
        let mut req = http::Request::builder()
            .method(Method::PUT)
            .uri("http://a.example/x?y=1")
            .version(Version::HTTP_2)
            .header("x-b", "1")
            .header("x-a", "2")
            .header("x-b", "3")
            .header(http::header::ACCEPT, "*/*")
            .header("x-empty", "")
            .header(http::header::AUTHORIZATION, secret)
            .header("x-obs", HeaderValue::from_bytes(b"caf\xc3\xa9\t!").unwrap())
            .body(())
            .unwrap();
        req.extensions_mut().insert(7u32);
        req.into_parts().0
    }

    fn pairs(h: &HeaderMap) -> Vec<(HeaderName, HeaderValue, bool)> {
        h.iter()
            .map(|(k, v)| (k.clone(), v.clone(), v.is_sensitive()))
            .collect()
    }

    fn same(a: &http::request::Parts, b: &http::request::Parts) {
        assert_eq!(a.method, b.method);
        assert_eq!(a.uri, b.uri);
        assert_eq!(a.version, b.version);
        assert_eq!(pairs(&a.headers), pairs(&b.headers));
    }

    #[test]
    fn replayed_heads_equal_the_original_in_order_with_every_value() {
        let original = head();
        let kept = ReplayHead::copy(&original);
        for _ in 0..3 {
            let replayed = kept.request().unwrap();
            same(&replayed, &original);
            assert_eq!(replayed.extensions.get::<u32>(), Some(&7));
        }
        // Standard names come back as the standard ones.
        let replayed = kept.request().unwrap();
        let accept = replayed.headers.keys().find(|k| *k == http::header::ACCEPT);
        assert_eq!(accept.map(HeaderName::as_str), Some("accept"));
    }

    #[test]
    fn a_head_without_extensions_is_copied_without_any() {
        let mut original = head();
        original.extensions = Extensions::new();
        let kept = ReplayHead::copy(&original);
        assert!(kept.extensions.is_empty());
        let replayed = kept.request().unwrap();
        same(&replayed, &original);
        assert!(replayed.extensions.is_empty());
    }

    #[test]
    fn header_storage_is_reused_and_comes_back_empty() {
        let original = head();
        drop(ReplayHead::copy(&original));
        let pooled = POOL.with_borrow(Vec::len);
        assert!(pooled >= 1);
        let kept = ReplayHead::copy(&original);
        assert_eq!(
            POOL.with_borrow(Vec::len),
            pooled - 1,
            "taken from the pool"
        );
        assert_eq!(kept.headers.len(), original.headers.len());
        drop(kept);
        assert!(POOL.with_borrow(|p| p.iter().all(|r| r.entries.is_empty() && r.bytes.is_empty())));
    }

    #[test]
    fn huge_header_copies_are_freed_and_the_pool_is_bounded() {
        let mut many_headers = head();
        for i in 0..POOLED_HEADERS + 1 {
            many_headers.headers.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        let mut long_value = head();
        long_value.headers.insert(
            http::header::COOKIE,
            HeaderValue::from_bytes(&vec![b'c'; POOLED_BYTES + 1]).unwrap(),
        );
        for big in [many_headers, long_value] {
            let before = POOL.with_borrow(Vec::len);
            let kept = ReplayHead::copy(&big);
            same(&kept.request().unwrap(), &big);
            drop(kept);
            assert!(POOL.with_borrow(Vec::len) <= before, "not pooled");
        }
        let small = head();
        let many: Vec<_> = (0..POOLED_LISTS + 5)
            .map(|_| ReplayHead::copy(&small))
            .collect();
        drop(many);
        assert_eq!(POOL.with_borrow(Vec::len), POOLED_LISTS);
    }
}
