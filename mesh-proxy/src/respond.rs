//! The one place where errors become HTTP responses: Istio's status codes, body texts,
//! headers and response flags.
//!
//! | cause (leaf error in the chain)          | status | body                                   | flag |
//! |------------------------------------------|--------|----------------------------------------|------|
//! | `NoRoute`                                | 404    | empty                                  | NR   |
//! | `Misdirected` (gateway: host of another TLS server) | 421 | `Misdirected Request`        | NR   |
//! | `ClusterNotFound`                        | 503    | empty                                  | NC   |
//! | `NoHealthyUpstream`                      | 503    | `no healthy upstream`                  | UH   |
//! | `DeadlineExceeded`, `PerTryTimeout`      | 504    | `upstream request timeout`             | UT   |
//! | `Overflow` (+ `x-envoy-overloaded: true`)| 503    | `upstream connect error or disconnect/reset before headers. reset reason: overflow` | UO |
//! | `ConnectFailure`                         | 503    | `… reset reason: connection failure`, or `connection timeout` after the connect timeout | UF |
//! | `UpstreamReset`                          | 503    | `… reset reason: <reason>`             | UC/UR|
//! | `UpstreamReset` (malformed response)     | 502    | `… reset reason: protocol error`       | UPE  |
//! | host unknown under `REGISTRY_ONLY`       | 502    | empty                                  | NR   |
//! | malformed request                        | 400    | `Bad Request`                          | DPE  |
//! | `RequestBodyTooLarge` (`maxRequestBodyBytes`) | 413 | `Payload Too Large`                  | -    |
//! | `StreamIdleTimeout` (`streamIdleTimeout`) | 408   | `stream timeout`                       | SI   |
//! | `RequestTimeout` (`requestTimeout`)      | 408    | `request timeout`                      | -    |
//! | `ResponseBodyTooLarge` (`maxResponseBodyBytes`) | 502 | `response body too large`          | -    |
//! | anything else                            | 500    | empty                                  | -    |
//!
//! When the retries of the route ran out on the error (`RetriesExhausted`), `URX` is
//! added to the flag, as Envoy does (`UF,URX`).
//!
//! Authorization denials (403 `RBAC: access denied`) are answered by the authorization
//! layer itself with the same body. Oversized heads (431) and bodies (413) are answered
//! by the HTTP codec or [`payload_too_large`].
//!
//! The flags are put in the response extensions so that the telemetry layer, when it
//! sits outside, records them.
//!
//! # Example
//!
//! ```
//! use mesh_core::error::{BoxError, NoHealthyUpstream};
//! let err: BoxError = Box::new(NoHealthyUpstream);
//! let res = mesh_proxy::respond::error_response(&err);
//! assert_eq!(res.status(), 503);
//! ```

use http::{HeaderValue, Response, StatusCode, header};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::{
    BoxError, ClusterNotFound, ConnectFailure, NoRoute, ResetReason, UpstreamReset, find_cause,
    is_caused_by,
};
use mesh_core::extensions::{LocalReply, add_response_flags};
use mesh_core::{Outcome, ResponseFlags};

use crate::stack::client::{
    RequestBodyTooLarge, RequestTimeout, ResponseBodyTooLarge, StreamIdleTimeout,
};

/// Body of an overflow (`UO`) answer.
pub const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

fn reply(status: StatusCode, text: String, flags: ResponseFlags) -> Response<BoxBody> {
    let has_body = !text.is_empty();
    let mut res = Response::new(if has_body {
        body::full(text)
    } else {
        body::empty()
    });
    *res.status_mut() = status;
    if has_body {
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    add_response_flags(res.extensions_mut(), flags);
    res.extensions_mut().insert(LocalReply);
    res
}

/// The gRPC status of a local reply with HTTP `status` (gRPC's HTTP-to-gRPC mapping, as
/// Envoy applies it to its local replies).
pub fn grpc_status_for(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// `grpc-message` escaping: bytes outside printable ASCII, and `%`, percent-encoded.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// A local reply re-formed for a gRPC caller, as Envoy does: HTTP 200, trailers-only
/// (`content-type: application/grpc`, `grpc-status` from the HTTP status, `grpc-message`
/// from the body), no body; the response flags and other extensions stay.
pub async fn grpc_reply(res: Response<BoxBody>) -> Response<BoxBody> {
    use http_body_util::BodyExt;
    let (mut parts, body) = res.into_parts();
    let text = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let status = grpc_status_for(parts.status);
    parts.status = StatusCode::OK;
    parts.headers.clear();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert("grpc-status", HeaderValue::from(status));
    let message = percent_encoding::percent_encode(&text, GRPC_MESSAGE).to_string();
    if let Ok(v) = HeaderValue::from_str(&message)
        && !message.is_empty()
    {
        parts.headers.insert("grpc-message", v);
    }
    Response::from_parts(parts, body::empty())
}

/// Whether `req` is a gRPC call (`content-type: application/grpc…`).
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The response for an error from the proxy's stacks.
pub fn error_response(err: &BoxError) -> Response<BoxBody> {
    let e: &(dyn std::error::Error + 'static) = err.as_ref();
    if is_caused_by::<NoRoute>(e) {
        return reply(
            StatusCode::NOT_FOUND,
            String::new(),
            ResponseFlags::NO_ROUTE_FOUND,
        );
    }
    if is_caused_by::<Misdirected>(e) {
        return misdirected();
    }
    if is_caused_by::<ClusterNotFound>(e) {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            String::new(),
            ResponseFlags::NO_CLUSTER_FOUND,
        );
    }
    if let Some(bad) = find_cause::<BadRequest>(e) {
        return bad_request(bad.0);
    }
    if is_caused_by::<RequestBodyTooLarge>(e) {
        return payload_too_large();
    }
    if is_caused_by::<StreamIdleTimeout>(e) {
        return reply(
            StatusCode::REQUEST_TIMEOUT,
            "stream timeout".into(),
            ResponseFlags::STREAM_IDLE_TIMEOUT,
        );
    }
    if is_caused_by::<RequestTimeout>(e) {
        return reply(
            StatusCode::REQUEST_TIMEOUT,
            "request timeout".into(),
            ResponseFlags::NONE,
        );
    }
    if is_caused_by::<ResponseBodyTooLarge>(e) {
        return reply(
            StatusCode::BAD_GATEWAY,
            "response body too large".into(),
            ResponseFlags::NONE,
        );
    }
    let outcome = Outcome::from_error(err);
    let mut flags = outcome.response_flags();
    // The retries ran out on this error: Envoy adds `URX` to the last attempt's flag.
    if is_caused_by::<mesh_resilience::retry::RetriesExhausted>(e) {
        flags.insert(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
    }
    match outcome {
        Outcome::Overflow => {
            let mut res = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                OVERFLOW_BODY.into(),
                ResponseFlags::UPSTREAM_OVERFLOW,
            );
            res.headers_mut()
                .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
            res
        }
        Outcome::DeadlineExceeded | Outcome::PerTryTimeout => reply(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout".into(),
            flags,
        ),
        Outcome::NoHealthyUpstream => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream".into(),
            flags,
        ),
        Outcome::ConnectFailure => {
            let text = find_cause::<ConnectFailure>(e)
                .map_or_else(|| ConnectFailure::bare().to_string(), ToString::to_string);
            reply(StatusCode::SERVICE_UNAVAILABLE, text, flags)
        }
        Outcome::Reset { reason, .. } => {
            let text = find_cause::<UpstreamReset>(e)
                .map(ToString::to_string)
                .unwrap_or_default();
            // Envoy answers an upstream codec protocol error with 502, other resets 503.
            let status = if reason == ResetReason::ProtocolError {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, text, flags)
        }
        Outcome::Response { .. } | Outcome::LocalError => {
            tracing::debug!(error = %err, "local error");
            reply(StatusCode::INTERNAL_SERVER_ERROR, String::new(), flags)
        }
    }
}

/// A request on a TLS connection for a host that another server of the gateway port
/// serves, with other TLS settings (answered 421, flag `NR`: there is no route for it on
/// the connection it arrived on).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("misdirected request: the host is served by another TLS server of this port")]
pub struct Misdirected;

/// 421 Misdirected Request (RFC 9110 §15.5.20): the client retries on a new connection
/// whose SNI names the host.
pub fn misdirected() -> Response<BoxBody> {
    reply(
        StatusCode::MISDIRECTED_REQUEST,
        "Misdirected Request".into(),
        ResponseFlags::NO_ROUTE_FOUND,
    )
}

/// A request the proxy refuses as malformed (answered 400, flag `DPE`).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("bad request: {0}")]
pub struct BadRequest(pub &'static str);

/// 400 for a malformed request.
pub fn bad_request(why: &'static str) -> Response<BoxBody> {
    tracing::debug!(reason = why, "bad request");
    let mut res = reply(
        StatusCode::BAD_REQUEST,
        "Bad Request".into(),
        ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
    );
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// 413 for a body over the configured limit.
pub fn payload_too_large() -> Response<BoxBody> {
    reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Payload Too Large".into(),
        ResponseFlags::NONE,
    )
}

/// 502 for a host the registry does not know under `outboundTrafficPolicy: REGISTRY_ONLY`
/// (Istio's `BlackHoleCluster`).
pub fn registry_only() -> Response<BoxBody> {
    reply(
        StatusCode::BAD_GATEWAY,
        String::new(),
        ResponseFlags::NO_ROUTE_FOUND,
    )
}

/// 508 for a passthrough request addressed to the listener it arrived on: forwarding it
/// would send it back to this proxy, over and over.
pub fn loop_detected() -> Response<BoxBody> {
    reply(
        StatusCode::LOOP_DETECTED,
        "request loops back to this proxy".into(),
        ResponseFlags::NO_ROUTE_FOUND,
    )
}

/// 301 to the HTTPS URL of the request (Gateway `httpsRedirect`).
pub fn https_redirect(host: &str, path_and_query: &str) -> Response<BoxBody> {
    let mut res = reply(
        StatusCode::MOVED_PERMANENTLY,
        String::new(),
        ResponseFlags::NONE,
    );
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{path_and_query}")) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    // A redirect is routing's answer, not an error to re-form for gRPC callers.
    res.extensions_mut().remove::<LocalReply>();
    res
}

/// Turns errors of the inner service into responses (see [`error_response`]); placed
/// inside the telemetry layer so that the recorded status is the one sent. A gRPC
/// caller gets every local reply ([`LocalReply`]: these, an AuthorizationPolicy's 403,
/// …) as a gRPC status ([`grpc_reply`]).
#[derive(Clone, Debug)]
pub struct Respond<S> {
    inner: S,
}

impl<S> Respond<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Respond<S>
where
    S: tower::Service<http::Request<B>, Response = Response<BoxBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = RespondFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        // A service that cannot become ready is answered per request instead.
        match self.inner.poll_ready(cx) {
            std::task::Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                tracing::warn!(error = %e, "service failed");
                std::task::Poll::Ready(Err(e))
            }
            other => other.map_err(Into::into),
        }
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let grpc = is_grpc(&req);
        RespondFuture {
            inner: self.inner.call(req),
            grpc,
            reforming: None,
        }
    }
}

/// The response future of [`Respond`].
#[pin_project::pin_project]
pub struct RespondFuture<F> {
    #[pin]
    inner: F,
    grpc: bool,
    /// A local reply being re-formed for a gRPC caller (one allocation, gRPC only).
    reforming: Option<futures_util::future::BoxFuture<'static, Response<BoxBody>>>,
}

impl<F> std::fmt::Debug for RespondFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespondFuture")
            .field("grpc", &self.grpc)
            .finish_non_exhaustive()
    }
}

impl<F, E> std::future::Future for RespondFuture<F>
where
    F: std::future::Future<Output = Result<Response<BoxBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<BoxBody>, BoxError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(reforming) = this.reforming.as_mut() {
                return reforming.as_mut().poll(cx).map(Ok);
            }
            let res = match std::task::ready!(this.inner.as_mut().poll(cx)) {
                Ok(res) => res,
                Err(e) => error_response(&e.into()),
            };
            let reform = *this.grpc
                && res.extensions().get::<LocalReply>().is_some()
                && !res.headers().contains_key("grpc-status");
            if !reform {
                return std::task::Poll::Ready(Ok(res));
            }
            *this.reforming = Some(Box::pin(grpc_reply(res)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use mesh_core::error::{DeadlineExceeded, NoHealthyUpstream, Overflow, PerTryTimeout};

    async fn text(res: Response<BoxBody>) -> String {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn flags(res: &Response<BoxBody>) -> String {
        mesh_core::extensions::response_flags(res.extensions()).to_string()
    }

    #[tokio::test]
    async fn grpc_callers_get_local_replies_as_grpc_statuses() {
        use tower::ServiceExt;
        let grpc = |content_type: &'static str| {
            http::Request::post("/demo.Payments/Pay")
                .header(header::CONTENT_TYPE, content_type)
                .body(())
                .unwrap()
        };
        // An error becomes a trailers-only UNAVAILABLE with Envoy's text, flags kept.
        let failing = Respond::new(tower::service_fn(|_req: http::Request<()>| async {
            Err::<Response<BoxBody>, BoxError>(Box::new(NoHealthyUpstream))
        }));
        let res = failing
            .clone()
            .oneshot(grpc("application/grpc+proto"))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(res.headers()["grpc-message"], "no healthy upstream");
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(flags(&res), "UH");
        assert_eq!(text(res).await, "");
        // The same error for an HTTP caller stays HTTP.
        let res = failing.oneshot(grpc("application/json")).await.unwrap();
        assert_eq!(res.status(), 503);

        // A local reply made by another layer (an AuthorizationPolicy's 403), escaped.
        let denied = Respond::new(tower::service_fn(|_req: http::Request<()>| async {
            let mut res = reply(
                StatusCode::FORBIDDEN,
                "RBAC: access denied 100%\n".into(),
                ResponseFlags::NONE,
            );
            res.extensions_mut().insert(LocalReply);
            Ok::<_, BoxError>(res)
        }));
        let res = denied.oneshot(grpc("application/grpc")).await.unwrap();
        assert_eq!(res.headers()["grpc-status"], "7");
        assert_eq!(
            res.headers()["grpc-message"],
            "RBAC: access denied 100%25%0A"
        );
        // The application's own answers are never touched.
        let app = Respond::new(tower::service_fn(|_req: http::Request<()>| async {
            let mut res = Response::new(body::full("teapot"));
            *res.status_mut() = StatusCode::IM_A_TEAPOT;
            Ok::<_, BoxError>(res)
        }));
        let res = app.oneshot(grpc("application/grpc")).await.unwrap();
        assert_eq!(res.status(), 418);
        for (http, grpc) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
            (504, 14),
            (500, 2),
        ] {
            assert_eq!(
                grpc_status_for(StatusCode::from_u16(http).unwrap()),
                grpc,
                "{http}"
            );
        }
    }

    #[tokio::test]
    async fn each_error_gets_istios_status_body_and_flag() {
        let cases: Vec<(BoxError, u16, &str, &str)> = vec![
            (Box::new(NoRoute), 404, "", "NR"),
            (Box::new(ClusterNotFound("x".into())), 503, "", "NC"),
            (Box::new(Misdirected), 421, "Misdirected Request", "NR"),
            (
                Box::new(NoHealthyUpstream),
                503,
                "no healthy upstream",
                "UH",
            ),
            (
                Box::new(DeadlineExceeded),
                504,
                "upstream request timeout",
                "UT",
            ),
            (
                Box::new(PerTryTimeout),
                504,
                "upstream request timeout",
                "UT",
            ),
            (Box::new(Overflow), 503, OVERFLOW_BODY, "UO"),
            (
                Box::new(ConnectFailure::bare()),
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                "UF",
            ),
            (
                Box::new(UpstreamReset::new(
                    ResetReason::ConnectionTermination,
                    true,
                    None,
                )),
                503,
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                "UC",
            ),
            (
                Box::new(UpstreamReset::new(ResetReason::ProtocolError, true, None)),
                502,
                "upstream connect error or disconnect/reset before headers. reset reason: protocol error",
                "UPE",
            ),
            (
                Box::new(BadRequest("missing host")),
                400,
                "Bad Request",
                "DPE",
            ),
        ];
        for (err, status, body, flag) in cases {
            let res = error_response(&err);
            assert_eq!(res.status(), status, "{err}");
            assert_eq!(flags(&res), flag, "{err}");
            assert_eq!(text(res).await, body);
        }
    }

    #[test]
    fn overflow_sets_overloaded_header() {
        let res = error_response(&(Box::new(Overflow) as BoxError));
        assert_eq!(res.headers()["x-envoy-overloaded"], "true");
    }

    #[tokio::test]
    async fn registry_only_is_502_and_redirect_is_301() {
        let res = registry_only();
        assert_eq!(res.status(), 502);
        let res = https_redirect("api.example.com", "/a?b=1");
        assert_eq!(res.status(), 301);
        assert_eq!(res.headers()["location"], "https://api.example.com/a?b=1");
    }

    #[test]
    fn unknown_local_error_is_500() {
        let err: BoxError = "boom".into();
        assert_eq!(error_response(&err).status(), 500);
    }
}
