//! Forwarding trace headers through an application: the "3-line interceptor".
//!
//! The sidecar starts a span per hop, but only the application knows that its outgoing
//! call to `payment` belongs to the incoming request from `order`. Istio asks applications
//! to copy the trace headers from the incoming request to their outgoing calls. Two layers
//! do that without touching handler code:
//!
//! - [`CaptureTraceHeadersLayer`] on the application's server stack keeps the incoming
//!   request's trace headers (`x-request-id`, `x-b3-*`, `b3`, `traceparent`, `tracestate`,
//!   `x-ot-span-context`) in a task-local for the duration of the handler;
//! - [`ForwardTraceHeadersLayer`] on the application's HTTP client copies them onto every
//!   outgoing request made from that handler's task (headers the request already sets win).
//!
//! Calls made from a task spawned by the handler do not see the task-local; use
//! [`TraceHeaders::current`] and [`TraceHeaders::apply`] there, or
//! [`super::forward_trace_headers`] with the incoming headers.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use mesh_core::body::{self, BoxBody};
//! use mesh_telemetry::trace::forward::{CaptureTraceHeadersLayer, ForwardTraceHeadersLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // The application's HTTP client (here a stub that echoes the trace id it was given).
//! let client = ServiceBuilder::new()
//!     .layer(ForwardTraceHeadersLayer)
//!     .service_fn(|req: Request<BoxBody>| async move {
//!         let id = req.headers()["x-b3-traceid"].clone();
//!         Ok::<_, std::convert::Infallible>(Response::new(body::full(id.as_bytes().to_vec())))
//!     });
//! // The application's server: its handler calls the client.
//! let app = ServiceBuilder::new()
//!     .layer(CaptureTraceHeadersLayer)
//!     .service_fn(move |_req: Request<BoxBody>| {
//!         let client = client.clone();
//!         async move { client.oneshot(Request::new(body::empty())).await }
//!     });
//! let req = Request::builder()
//!     .header("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124")
//!     .body(body::empty())
//!     .unwrap();
//! let res = app.oneshot(req).await.unwrap();
//! let seen = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
//! assert_eq!(seen, "463ac35c9f6413ad48485a3953bb6124");
//! # }
//! ```

use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use tokio::task::futures::TaskLocalFuture;
use tower_layer::Layer;
use tower_service::Service;

use super::{REQUEST_ID, b3, w3c};

static OT_SPAN_CONTEXT: HeaderName = HeaderName::from_static("x-ot-span-context");

fn names() -> [&'static HeaderName; 10] {
    [
        &REQUEST_ID,
        &b3::TRACE_ID,
        &b3::SPAN_ID,
        &b3::PARENT_SPAN_ID,
        &b3::SAMPLED,
        &b3::FLAGS,
        &b3::SINGLE,
        &w3c::TRACEPARENT,
        &w3c::TRACESTATE,
        &OT_SPAN_CONTEXT,
    ]
}

/// The trace headers of one incoming request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceHeaders(Vec<(HeaderName, HeaderValue)>);

tokio::task_local! {
    static CURRENT: TraceHeaders;
}

impl TraceHeaders {
    /// Picks the trace headers out of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        Self(
            names()
                .into_iter()
                .filter_map(|n| headers.get(n).map(|v| (n.clone(), v.clone())))
                .collect(),
        )
    }

    /// The headers captured for the current task, if a [`CaptureTraceHeadersLayer`] runs it.
    pub fn current() -> Option<Self> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Sets every captured header that `headers` does not already have.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.0 {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
    }
}

/// Server side: keeps each request's trace headers for its handler's task.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureTraceHeadersLayer;

impl<S> Layer<S> for CaptureTraceHeadersLayer {
    type Service = CaptureTraceHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CaptureTraceHeaders { inner }
    }
}

/// The service of [`CaptureTraceHeadersLayer`].
#[derive(Clone, Debug)]
pub struct CaptureTraceHeaders<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for CaptureTraceHeaders<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TaskLocalFuture<TraceHeaders, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let headers = TraceHeaders::from_headers(req.headers());
        CURRENT.scope(headers, self.inner.call(req))
    }
}

/// Client side: copies the captured trace headers onto outgoing requests.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForwardTraceHeadersLayer;

impl<S> Layer<S> for ForwardTraceHeadersLayer {
    type Service = ForwardTraceHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ForwardTraceHeaders { inner }
    }
}

/// The service of [`ForwardTraceHeadersLayer`].
#[derive(Clone, Debug)]
pub struct ForwardTraceHeaders<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for ForwardTraceHeaders<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let _ = CURRENT.try_with(|h| h.apply(req.headers_mut()));
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_keeps_headers_the_request_already_sets() {
        let mut incoming = HeaderMap::new();
        incoming.insert("x-request-id", HeaderValue::from_static("abc"));
        incoming.insert("x-b3-sampled", HeaderValue::from_static("1"));
        incoming.insert("authorization", HeaderValue::from_static("secret"));
        let captured = TraceHeaders::from_headers(&incoming);
        let mut out = HeaderMap::new();
        out.insert("x-request-id", HeaderValue::from_static("own"));
        captured.apply(&mut out);
        assert_eq!(out["x-request-id"], "own");
        assert_eq!(out["x-b3-sampled"], "1");
        assert!(
            out.get("authorization").is_none(),
            "only trace headers travel"
        );
        assert_eq!(
            TraceHeaders::current(),
            None,
            "no task-local outside a handler"
        );
    }
}
