//! The request head kept for replay.
//!
//! The first attempt goes upstream with the caller's own head; a copy is kept for the
//! attempts that may follow. The copy keeps the headers as raw bytes (every name and
//! value in order, with the values' sensitivity) in storage that the retry future takes
//! from a small per-thread pool and gives back when the request ends, so in steady state
//! keeping the copy allocates nothing. Copying bytes rather than cloning `HeaderName`s
//! and `HeaderValue`s matters for headers parsed off the wire: their first clone makes
//! the `bytes` crate move their bytes into shared storage, one allocation per name or
//! value. The names and values are rebuilt only when a retry is actually sent. Method and
//! URI are cloned (their storage is already shared), and the extensions are cloned when
//! the request has any.
//!
//! The walk over the headers that copies them also notes the headers the deadline needs
//! (`content-type` and `grpc-timeout`, VS-42), so no hashed lookup of them follows.

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use mesh_core::BoxError;

use crate::deadline::GRPC_TIMEOUT;

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

/// A copy of a request head, rebuilt for each attempt after the first.
#[derive(Default)]
pub(crate) struct HeadCopy {
    /// The URI; `None` when nothing is kept, so that nothing it shares (a read buffer)
    /// is kept alive by pooled storage.
    uri: Option<Uri>,
    /// The method (of the last request kept, once cleared).
    method: Method,
    version: Version,
    /// Empty when nothing is kept.
    extensions: Extensions,
    /// The header names and values back to back.
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

/// What the copy's walk over the headers saw of the headers the deadline needs: the
/// first value of each, the one `HeaderMap::get` returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Noticed<'a> {
    /// `content-type`.
    pub(crate) content_type: Option<&'a HeaderValue>,
    /// `grpc-timeout`.
    pub(crate) grpc_timeout: Option<&'a HeaderValue>,
}

impl Noticed<'_> {
    /// The request's `grpc-timeout`, as [`grpc_timeout`](crate::deadline::grpc_timeout)
    /// reads it.
    #[inline]
    pub(crate) fn grpc_timeout(&self) -> Option<std::time::Duration> {
        if !crate::deadline::is_grpc(self.content_type?) {
            return None;
        }
        crate::deadline::parse_grpc_timeout(self.grpc_timeout?)
    }
}

impl HeadCopy {
    /// Keeps a copy of the head made of these parts (replacing any kept before), and
    /// reports what it noticed on the way.
    #[inline]
    pub(crate) fn copy<'a>(
        &mut self,
        method: &Method,
        uri: &Uri,
        version: Version,
        headers: &'a HeaderMap,
        extensions: &Extensions,
    ) -> Noticed<'a> {
        let uri = uri.clone();
        if self.uri.is_none() {
            // Nothing to drop (pooled storage holds none): skip the drop code.
            std::mem::forget(self.uri.replace(uri));
        } else {
            self.uri = Some(uri);
        }
        if self.method != *method {
            // Storage reused for a request of the same method (most of them) keeps it.
            self.method = method.clone();
        }
        self.version = version;
        if !extensions.is_empty() || !self.extensions.is_empty() {
            self.extensions = extensions.clone();
        }
        self.bytes.clear();
        self.entries.clear();
        let mut noticed = Noticed::default();
        for (name, value) in headers {
            let name = name.as_str();
            // Both names the deadline needs are 12 bytes long: most names are passed by
            // their length alone, the others (`x-request-id`) by their first byte.
            if name.len() == 12 {
                match name.as_bytes()[0] {
                    b'c' if name == "content-type" => {
                        noticed.content_type.get_or_insert(value);
                    }
                    b'g' if name == GRPC_TIMEOUT => {
                        noticed.grpc_timeout.get_or_insert(value);
                    }
                    _ => {}
                }
            }
            let name = name.as_bytes();
            let value_bytes = value.as_bytes();
            self.bytes.extend_from_slice(name);
            self.bytes.extend_from_slice(value_bytes);
            self.entries.push(Entry {
                value_len: value_bytes.len(),
                // A header name is at most 65 535 bytes long (`http`'s limit).
                name_len: u16::try_from(name.len()).unwrap_or(u16::MAX),
                sensitive: value.is_sensitive(),
            });
        }
        noticed
    }

    /// Whether a head is kept.
    pub(crate) fn is_kept(&self) -> bool {
        self.uri.is_some()
    }

    /// The head of one more attempt. Fails only if no head is kept or a copied header no
    /// longer parses, which the copy of a valid head cannot do.
    pub(crate) fn request(&self) -> Result<http::request::Parts, BoxError> {
        let Some(uri) = &self.uri else {
            return Err("the request head kept for a retry is gone".into());
        };
        let mut headers = HeaderMap::with_capacity(self.entries.len());
        let mut rest = self.bytes.as_slice();
        for e in &self.entries {
            let (name, tail) = rest.split_at(usize::from(e.name_len));
            let (value, tail) = tail.split_at(e.value_len);
            rest = tail;
            let mut value = HeaderValue::from_bytes(value)?;
            value.set_sensitive(e.sensitive);
            headers.append(HeaderName::from_bytes(name)?, value);
        }
        let (mut head, ()) = http::Request::new(()).into_parts();
        head.method = self.method.clone();
        head.uri = uri.clone();
        head.version = self.version;
        head.headers = headers;
        if !self.extensions.is_empty() {
            head.extensions = self.extensions.clone();
        }
        Ok(head)
    }

    /// Forgets the kept head, keeping the storage for the next one.
    #[inline]
    pub(crate) fn clear(&mut self) {
        if self.uri.is_some() {
            self.uri = None;
        }
        if !self.extensions.is_empty() {
            self.extensions = Extensions::new();
        }
        self.entries.clear();
        self.bytes.clear();
    }

    /// Whether the storage is small enough to be pooled.
    pub(crate) fn poolable(&self) -> bool {
        self.entries.capacity() <= POOLED_HEADERS && self.bytes.capacity() <= POOLED_BYTES
    }

    /// How many headers were copied.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
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

    fn copy_of(head: &http::request::Parts) -> HeadCopy {
        let mut copy = HeadCopy::default();
        copy.copy(
            &head.method,
            &head.uri,
            head.version,
            &head.headers,
            &head.extensions,
        );
        copy
    }

    #[test]
    fn replayed_heads_equal_the_original_in_order_with_every_value() {
        let original = head();
        let kept = copy_of(&original);
        assert_eq!(kept.len(), original.headers.len());
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
        let kept = copy_of(&original);
        let replayed = kept.request().unwrap();
        same(&replayed, &original);
        assert!(replayed.extensions.is_empty());
    }

    #[test]
    fn a_copy_replaces_the_one_before_and_clearing_forgets_it() {
        let first = head();
        let mut second = head();
        second.method = Method::DELETE;
        second.headers = HeaderMap::new();
        second
            .headers
            .insert("x-only", HeaderValue::from_static("this"));
        let mut kept = copy_of(&first);
        kept.copy(
            &second.method,
            &second.uri,
            second.version,
            &second.headers,
            &second.extensions,
        );
        same(&kept.request().unwrap(), &second);
        assert!(kept.is_kept());
        kept.clear();
        assert!(!kept.is_kept());
        assert_eq!(kept.len(), 0);
        assert!(kept.request().is_err(), "nothing to replay once cleared");
    }

    #[test]
    fn huge_header_copies_are_not_poolable() {
        assert!(copy_of(&head()).poolable());
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
            let mut kept = copy_of(&big);
            same(&kept.request().unwrap(), &big);
            kept.clear();
            assert!(!kept.poolable(), "its storage stays large once cleared");
        }
    }

    /// A request with these headers, in this order.
    fn with_headers(headers: &[(&str, &str)]) -> http::Request<()> {
        let mut req = http::Request::new(());
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        req
    }

    fn noticed_by_the_copy(req: &http::Request<()>) -> Noticed<'_> {
        HeadCopy::default().copy(
            req.method(),
            req.uri(),
            req.version(),
            req.headers(),
            req.extensions(),
        )
    }

    #[test]
    fn the_walk_notices_the_values_a_lookup_would_find() {
        let ct = "content-type";
        let gt = "grpc-timeout";
        for headers in [
            vec![],
            vec![("x-request-id", "abc"), ("accept", "*/*")],
            vec![(ct, "application/grpc")],
            vec![(gt, "5S")],
            vec![(ct, "application/json"), (gt, "5S")],
            vec![(ct, "application/grpc"), (gt, "5S")],
            vec![
                (gt, "250m"),
                ("x-request-id", "abc"),
                (ct, "application/grpc"),
            ],
            vec![(ct, "application/grpc+proto"), (gt, "3M")],
            vec![(ct, "application/grpc-web"), (gt, "3M")],
            vec![(ct, "application/grpc;charset=utf-8"), (gt, "7u")],
            vec![(ct, "Application/gRPC"), (gt, "1S")],
            vec![(ct, "application/grpc"), (gt, "5s")],
            vec![(ct, "application/grpc"), (gt, "123456789m")],
            // Repeated headers: the first value counts, as for `HeaderMap::get`.
            vec![
                (ct, "application/grpc"),
                (ct, "application/json"),
                (gt, "1S"),
            ],
            vec![
                (ct, "application/json"),
                (ct, "application/grpc"),
                (gt, "1S"),
            ],
            vec![(ct, "application/grpc"), (gt, "1S"), (gt, "2S")],
            vec![(ct, "application/grpc"), (gt, "bad"), (gt, "2S")],
            // Other names of the same length are not mistaken for them.
            vec![("x-request-id", "application/grpc"), ("x-forwarded", "1S")],
        ] {
            let req = with_headers(&headers);
            let noticed = noticed_by_the_copy(&req);
            assert_eq!(
                noticed.content_type,
                req.headers().get(http::header::CONTENT_TYPE),
                "{headers:?}"
            );
            assert_eq!(
                noticed.grpc_timeout,
                req.headers().get(GRPC_TIMEOUT),
                "{headers:?}"
            );
            assert_eq!(
                noticed.grpc_timeout(),
                crate::deadline::grpc_timeout(&req),
                "{headers:?}"
            );
        }
        let req = with_headers(&[(ct, "application/grpc+proto"), (gt, "250m")]);
        assert_eq!(
            noticed_by_the_copy(&req).grpc_timeout(),
            Some(std::time::Duration::from_millis(250))
        );
    }
}
