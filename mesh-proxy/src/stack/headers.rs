//! Request and response headers at the stacks' edges: hop-by-hop removal (RFC 9110
//! §7.6.1), identity and proxy-internal headers a client must not set, and header names
//! with `_`.
//!
//! # Layer placement
//!
//! [`Sanitize`] is the outermost layer of every stack that faces a client (outbound,
//! inbound, gateway); [`strip_hop_by_hop`] runs again in the HTTP client on the way out
//! and on every response.

use http::header::{self, HeaderMap, HeaderName};
use mesh_core::BoxError;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies must not forward.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those named in `Connection`. `Upgrade` is kept
/// (and `Connection: upgrade` re-added) only for a WebSocket upgrade request; `Upgrade:
/// h2c` is never forwarded (h2c smuggling). `TE: trailers` survives.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in named {
        if name != header::UPGRADE || !websocket {
            headers.remove(&name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if websocket {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

/// Removes identity and proxy-internal headers a client must not be able to set
/// (SECURITY.md §2.2): `x-forwarded-client-cert`, `x-envoy-*` (the metadata exchange's
/// `x-envoy-peer-metadata` and `x-envoy-peer-metadata-id` among them), `x-istio-*`,
/// `l5d-client-id`.
pub fn strip_untrusted(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k == "x-forwarded-client-cert"
                || k == "l5d-client-id"
                || k.starts_with("x-envoy-")
                || k.starts_with("x-istio-")
        })
        .cloned()
        .collect();
    for k in doomed {
        headers.remove(k);
    }
}

/// Rejects header names containing `_` (SECURITY.md: upstreams treat `_` as `-`).
pub fn has_underscore_header(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| k.as_str().contains('_'))
}

/// Checks and cleans request headers before the rest of the stack: header names with
/// `_` are refused (400), `CONNECT` requests get 404 `NR` (no route allows them), and, at
/// the edges that face untrusted clients, identity and internal headers are removed.
#[derive(Clone, Debug)]
pub struct Sanitize<S> {
    inner: S,
    strip_untrusted: bool,
    peer_metadata: bool,
}

impl<S> Sanitize<S> {
    /// Wraps `inner`; `strip_untrusted` at the gateway (and the inbound listener, which
    /// uses [`Sanitize::inbound`]).
    pub fn new(inner: S, strip_untrusted: bool) -> Self {
        Self {
            inner,
            strip_untrusted,
            peer_metadata: false,
        }
    }

    /// The inbound listener's sanitizing: before the untrusted headers go, the peer's
    /// metadata (`x-envoy-peer-metadata`) is kept as a request extension when the
    /// connection's verified identity vouches for it
    /// ([`mesh_telemetry::exchange::take_request`]), for the telemetry layer.
    pub fn inbound(inner: S) -> Self {
        Self {
            inner,
            strip_untrusted: true,
            peer_metadata: true,
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Sanitize<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<mesh_core::body::BoxBody>,
            Error = BoxError,
        >,
{
    type Response = http::Response<mesh_core::body::BoxBody>;
    type Error = BoxError;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<Self::Response, BoxError>>,
        S::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        use futures_util::future::Either;
        if has_underscore_header(req.headers()) {
            return Either::Left(std::future::ready(Ok(crate::respond::bad_request(
                "header name with underscore",
            ))));
        }
        if req.method() == http::Method::CONNECT {
            // No route allows CONNECT (Istio enables only WebSocket upgrades): Envoy's
            // answer is 404 `NR`; nothing is forwarded.
            let no_route: mesh_core::error::BoxError = Box::new(mesh_core::error::NoRoute);
            return Either::Left(std::future::ready(Ok(crate::respond::error_response(
                &no_route,
            ))));
        }
        if self.peer_metadata {
            mesh_telemetry::exchange::take_request(&mut req);
        }
        if self.strip_untrusted {
            strip_untrusted(req.headers_mut());
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "h2c"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn websocket_upgrade_is_kept() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn identity_and_internal_headers_from_outside_are_removed() {
        let mut h = map(&[
            ("x-forwarded-client-cert", "By=spiffe://x"),
            ("x-envoy-original-path", "/public"),
            ("x-envoy-max-retries", "100"),
            ("x-istio-attributes", "a"),
            (
                "x-envoy-peer-metadata",
                "ChgKBE5BTUUSEBoOZm9yZ2VkLXdvcmtsb2Fk",
            ),
            ("x-envoy-peer-metadata-id", "sidecar~~forged"),
            ("x-request-id", "keep"),
        ]);
        strip_untrusted(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }

    #[test]
    fn underscore_headers_are_detected() {
        assert!(has_underscore_header(&map(&[("x_envoy_path", "/")])));
        assert!(!has_underscore_header(&map(&[("x-envoy-path", "/")])));
    }
}
