//! The request head kept for replay.
//!
//! The first attempt goes upstream with the caller's own head; a copy is kept for the
//! attempts that may follow. The copy keeps the headers as raw bytes (every name and
//! value in order, with the values' sensitivity) in storage taken from a small
//! per-thread pool and given back when the request ends, so in steady state keeping the
//! copy allocates nothing, and the retry future holds only a pointer to it. Copying bytes
//! rather than cloning `HeaderName`s and `HeaderValue`s matters for headers parsed off
//! the wire: their first clone makes the `bytes` crate move their bytes into shared
//! storage, one allocation per name or value. The names and values are rebuilt only when
//! a retry is actually sent. Method and URI are cloned (their storage is already
//! shared), and the extensions are cloned when the request has any.

use std::cell::RefCell;

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use mesh_core::BoxError;

/// Copies kept per thread for reuse.
const POOLED_COPIES: usize = 32;
/// Copies of more headers than this are freed rather than pooled, so one huge request
/// does not pin memory.
const POOLED_HEADERS: usize = 64;
/// Likewise for the bytes of the names and values.
const POOLED_BYTES: usize = 16 * 1024;

/// One header of a copy: its name's and value's lengths in `bytes`.
#[derive(Clone, Copy)]
struct Entry {
    value_len: usize,
    name_len: u16,
    sensitive: bool,
}

/// A copy of a head; its storage is reused through the per-thread pool.
#[derive(Default)]
struct Stored {
    /// Method, URI, version and extensions; `None` while pooled, so that nothing they
    /// share (a read buffer behind the URI) is kept alive by the pool.
    fields: Option<(Method, Uri, Version, Extensions)>,
    /// The header names and values back to back.
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

thread_local! {
    /// Boxed: the retry future holds a pointer, and a pooled copy keeps its box.
    #[allow(clippy::vec_box)]
    static POOL: RefCell<Vec<Box<Stored>>> = const { RefCell::new(Vec::new()) };
}

/// The head of a request, kept to build the attempts after the first.
pub(crate) struct ReplayHead(Option<Box<Stored>>);

impl ReplayHead {
    /// A copy of `head` for later attempts.
    pub(crate) fn copy(head: &http::request::Parts) -> Self {
        let mut stored = POOL
            .try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        let extensions = if head.extensions.is_empty() {
            Extensions::new()
        } else {
            head.extensions.clone()
        };
        stored.fields = Some((
            head.method.clone(),
            head.uri.clone(),
            head.version,
            extensions,
        ));
        stored.entries.reserve(head.headers.len());
        for (name, value) in &head.headers {
            let name = name.as_str().as_bytes();
            let value_bytes = value.as_bytes();
            stored.bytes.extend_from_slice(name);
            stored.bytes.extend_from_slice(value_bytes);
            stored.entries.push(Entry {
                value_len: value_bytes.len(),
                // A header name is at most 65 535 bytes long (`http`'s limit).
                name_len: u16::try_from(name.len()).unwrap_or(u16::MAX),
                sensitive: value.is_sensitive(),
            });
        }
        Self(Some(stored))
    }

    /// The head of one more attempt. Fails only if a copied header no longer parses,
    /// which the copy of a valid head cannot do.
    pub(crate) fn request(&self) -> Result<http::request::Parts, BoxError> {
        let Some(Stored {
            fields: Some((method, uri, version, extensions)),
            bytes,
            entries,
        }) = self.0.as_deref()
        else {
            return Err("the request head kept for a retry is gone".into());
        };
        let mut headers = HeaderMap::with_capacity(entries.len());
        let mut rest = bytes.as_slice();
        for e in entries {
            let (name, tail) = rest.split_at(usize::from(e.name_len));
            let (value, tail) = tail.split_at(e.value_len);
            rest = tail;
            let mut value = HeaderValue::from_bytes(value)?;
            value.set_sensitive(e.sensitive);
            headers.append(HeaderName::from_bytes(name)?, value);
        }
        let (mut head, ()) = http::Request::new(()).into_parts();
        head.method = method.clone();
        head.uri = uri.clone();
        head.version = *version;
        head.headers = headers;
        head.extensions = extensions.clone();
        Ok(head)
    }

    /// How many headers were copied.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.entries.len())
    }
}

impl Drop for ReplayHead {
    fn drop(&mut self) {
        let Some(mut stored) = self.0.take() else {
            return;
        };
        if stored.entries.capacity() > POOLED_HEADERS || stored.bytes.capacity() > POOLED_BYTES {
            return;
        }
        stored.fields = None;
        stored.entries.clear();
        stored.bytes.clear();
        // During thread teardown the pool may be gone: the storage is simply freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOLED_COPIES {
                p.push(stored);
            }
        });
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
        let replayed = kept.request().unwrap();
        same(&replayed, &original);
        assert!(replayed.extensions.is_empty());
    }

    #[test]
    fn storage_is_reused_and_comes_back_empty() {
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
        assert_eq!(kept.len(), original.headers.len());
        drop(kept);
        assert!(POOL.with_borrow(|p| {
            p.iter()
                .all(|s| s.fields.is_none() && s.entries.is_empty() && s.bytes.is_empty())
        }));
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
        let many: Vec<_> = (0..POOLED_COPIES + 5)
            .map(|_| ReplayHead::copy(&small))
            .collect();
        drop(many);
        assert_eq!(POOL.with_borrow(Vec::len), POOLED_COPIES);
    }
}
