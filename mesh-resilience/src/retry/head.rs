//! The request head kept for replay.
//!
//! The first attempt goes upstream with the caller's own head; a copy is kept for the
//! attempts that may follow. The copy's header storage comes from a small per-thread
//! pool and goes back to it when the request ends, so in steady state keeping the copy
//! allocates nothing for the header storage itself (a custom header name's bytes may still
//! be shared on their first copy, which is the `bytes` crate's doing). The request's
//! [`RequestDeadline`] is not copied when it is the only extension: the retry future
//! carries it and puts it back on each later attempt.

use std::cell::RefCell;

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use mesh_core::BoxBody;

use crate::deadline::RequestDeadline;

/// Header lists kept per thread for reuse.
const POOLED_LISTS: usize = 32;
/// Longer lists are freed rather than pooled, so one huge request does not pin memory.
const POOLED_CAPACITY: usize = 64;

type HeaderList = Vec<(HeaderName, HeaderValue)>;

thread_local! {
    static POOL: RefCell<Vec<HeaderList>> = const { RefCell::new(Vec::new()) };
}

/// The headers as a flat list (copying needs no hashing, unlike a `HeaderMap`), in
/// storage that returns to the per-thread pool when dropped.
struct PooledHeaders(HeaderList);

impl PooledHeaders {
    /// A copy of `src`, every value in order.
    fn copy(src: &HeaderMap) -> Self {
        let mut list = POOL
            .try_with(|p| p.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        list.extend(src.iter().map(|(k, v)| (k.clone(), v.clone())));
        Self(list)
    }

    /// The headers as a map again.
    fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.0.len());
        for (name, value) in &self.0 {
            map.append(name.clone(), value.clone());
        }
        map
    }
}

impl Drop for PooledHeaders {
    fn drop(&mut self) {
        let mut list = std::mem::take(&mut self.0);
        if list.capacity() > POOLED_CAPACITY {
            return;
        }
        list.clear();
        // During thread teardown the pool may be gone: the list is simply freed.
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOLED_LISTS {
                p.push(list);
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
    /// The extensions, without the [`RequestDeadline`] when that is the only one.
    extensions: Extensions,
}

impl ReplayHead {
    /// A copy of `head` for later attempts.
    pub(crate) fn copy(head: &http::request::Parts) -> Self {
        let only_deadline =
            head.extensions.len() == 1 && head.extensions.get::<RequestDeadline>().is_some();
        Self {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: PooledHeaders::copy(&head.headers),
            extensions: if only_deadline {
                Extensions::new()
            } else {
                head.extensions.clone()
            },
        }
    }

    /// A request for one more attempt, with `deadline` (the one the original request
    /// carried) put back if the copy left it out.
    pub(crate) fn request(
        &self,
        body: BoxBody,
        deadline: Option<RequestDeadline>,
    ) -> http::Request<BoxBody> {
        let mut req = http::Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.to_map();
        *req.extensions_mut() = self.extensions.clone();
        if let Some(d) = deadline
            && req.extensions().get::<RequestDeadline>().is_none()
        {
            req.extensions_mut().insert(d);
        }
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> http::request::Parts {
        let mut req = http::Request::builder()
            .method(Method::PUT)
            .uri("http://a.example/x?y=1")
            .version(Version::HTTP_2)
            .header("x-b", "1")
            .header("x-a", "2")
            .header("x-b", "3")
            .header(http::header::ACCEPT, "*/*")
            .body(())
            .unwrap();
        req.extensions_mut().insert(7u32);
        req.into_parts().0
    }

    fn same(a: &http::Request<BoxBody>, b: &http::request::Parts) {
        assert_eq!(a.method(), b.method);
        assert_eq!(a.uri(), &b.uri);
        assert_eq!(a.version(), b.version);
        let pairs = |h: &HeaderMap| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(pairs(a.headers()), pairs(&b.headers));
    }

    #[test]
    fn replayed_heads_equal_the_original_in_order_with_every_value() {
        let original = head();
        let kept = ReplayHead::copy(&original);
        for _ in 0..3 {
            let req = kept.request(mesh_core::body::empty(), None);
            same(&req, &original);
            assert_eq!(req.extensions().get::<u32>(), Some(&7));
        }
    }

    #[test]
    fn the_deadline_alone_is_carried_aside_and_put_back() {
        let mut original = head();
        original.extensions = Extensions::new();
        let deadline = RequestDeadline {
            at: tokio::time::Instant::now(),
            timeout: std::time::Duration::from_secs(5),
        };
        original.extensions.insert(deadline);
        let kept = ReplayHead::copy(&original);
        assert!(kept.extensions.is_empty());
        let req = kept.request(mesh_core::body::empty(), Some(deadline));
        same(&req, &original);
        assert_eq!(RequestDeadline::of(&req), Some(deadline));
        assert_eq!(req.extensions().len(), 1);
        // With other extensions, everything is copied and the deadline not doubled.
        original.extensions.insert(9u8);
        let kept = ReplayHead::copy(&original);
        let req = kept.request(mesh_core::body::empty(), Some(deadline));
        assert_eq!(RequestDeadline::of(&req), Some(deadline));
        assert_eq!(req.extensions().get::<u8>(), Some(&9));
    }

    #[test]
    fn header_maps_are_reused_and_come_back_empty() {
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
        assert_eq!(kept.headers.0.len(), original.headers.len());
        drop(kept);
        assert!(POOL.with_borrow(|p| p.iter().all(Vec::is_empty)));
    }

    #[test]
    fn huge_header_lists_are_freed_and_the_pool_is_bounded() {
        let mut big = head();
        for i in 0..POOLED_CAPACITY + 1 {
            big.headers.append(
                HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        let before = POOL.with_borrow(Vec::len);
        drop(ReplayHead::copy(&big));
        assert!(POOL.with_borrow(Vec::len) <= before, "not pooled");
        let small = head();
        let many: Vec<_> = (0..POOLED_LISTS + 5)
            .map(|_| ReplayHead::copy(&small))
            .collect();
        drop(many);
        assert_eq!(POOL.with_borrow(Vec::len), POOLED_LISTS);
    }
}
