//! The Tower layer that enforces a [`PolicySet`] on inbound HTTP requests.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use mesh_core::extensions::{AuthzDecision, ConnectionInfo, ConnectionSecurity, PeerIdentity};
use pin_project::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::matcher::{PolicySet, RequestAttributes, ServerName};
use super::normalize::{NormalizeOptions, canonicalize};

/// The body of a denied request (Istio's, AP-06).
pub const DENIED_BODY: &str = "RBAC: access denied";

/// A shared, swappable [`PolicySet`]: `store` a new snapshot on reload; requests in
/// flight finish with the snapshot they started with.
#[derive(Clone, Debug)]
pub struct PolicyHandle(Arc<ArcSwap<PolicySet>>);

impl PolicyHandle {
    /// A handle holding `policies`.
    pub fn new(policies: PolicySet) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(policies)))
    }

    /// Replaces the policy set for every service built from this handle's layer.
    pub fn store(&self, policies: PolicySet) {
        self.0.store(Arc::new(policies));
    }

    /// The current policy set.
    pub fn load(&self) -> Arc<PolicySet> {
        self.0.load_full()
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Settings {
    normalize: NormalizeOptions,
    trusted_proxies: usize,
}

/// Enforces AuthorizationPolicy on HTTP requests: see the [module docs](super).
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    policies: PolicyHandle,
    settings: Settings,
}

impl AuthzLayer {
    /// A layer enforcing `policies`, with `BASE` path normalization and no trusted proxies.
    pub fn new(policies: PolicySet) -> Self {
        Self::from_handle(PolicyHandle::new(policies))
    }

    /// A layer reading its policies from `handle`.
    pub fn from_handle(handle: PolicyHandle) -> Self {
        Self {
            policies: handle,
            settings: Settings::default(),
        }
    }

    /// Sets how request paths are canonicalized (MeshConfig `pathNormalization`).
    pub fn normalization(mut self, options: NormalizeOptions) -> Self {
        self.settings.normalize = options;
        self
    }

    /// Sets how many proxies in front of this one are trusted to append to
    /// `X-Forwarded-For` (MeshConfig `gatewayTopology.numTrustedProxies`). With `n > 0`,
    /// `remote.ip` is the `n`-th address from the right of `X-Forwarded-For`; with 0 (the
    /// default) it is the peer address.
    pub fn trusted_proxies(mut self, n: usize) -> Self {
        self.settings.trusted_proxies = n;
        self
    }

    /// The handle to swap this layer's policies at runtime.
    pub fn handle(&self) -> PolicyHandle {
        self.policies.clone()
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = Authz<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authz {
            inner,
            policies: self.policies.clone(),
            settings: self.settings,
        }
    }
}

/// The service built by [`AuthzLayer`].
#[derive(Clone, Debug)]
pub struct Authz<S> {
    inner: S,
    policies: PolicyHandle,
    settings: Settings,
}

/// The client IP from `X-Forwarded-For`, trusting `n` proxies (the peer is the first).
fn forwarded_client(headers: &HeaderMap, n: usize) -> Option<IpAddr> {
    if n == 0 {
        return None;
    }
    let entry = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|v| v.to_str().unwrap_or("").rsplit(','))
        .nth(n - 1)?;
    entry.trim().parse().ok()
}

/// Why a request is malformed (AP-44 and host validation).
fn malformed(req: &Request<impl Sized>) -> bool {
    // AP-44: a method with lower-case letters is rejected. (Whitespace in header names
    // cannot reach here: `http::HeaderName` rejects it and hyper answers 400.)
    if req
        .method()
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase())
    {
        return true;
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => true,
        (Some(h), None) => !h.as_bytes().iter().all(|b| (0x21..0x7f).contains(b)),
        (None, None) => false,
    }
}

fn local_response<B>(status: StatusCode, text: &'static str) -> Response<AuthzBody<B>> {
    let mut res = Response::new(AuthzBody::local(text));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(text.len()));
    res
}

/// Why a request is answered locally.
enum Reject {
    BadRequest,
    Forbidden(Box<AuthzDecision>),
}

impl<S> Authz<S> {
    /// Canonicalizes the path (rewriting the URI) and decides; `Err` is the local reply.
    fn check<B>(&self, req: &mut Request<B>) -> Result<AuthzDecision, Reject> {
        let bad_request = || Reject::BadRequest;
        if malformed(req) {
            return Err(bad_request());
        }
        if req.method() != Method::CONNECT {
            let target = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
            let canonical = canonicalize(target, &self.settings.normalize).map_err(|e| {
                tracing::debug!(error = %e, "rejecting request path");
                bad_request()
            })?;
            if canonical.is_rewritten() || req.uri().path_and_query().is_none() {
                let pq = PathAndQuery::try_from(canonical.as_str()).map_err(|_| bad_request())?;
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                parts.path_and_query = Some(pq);
                *req.uri_mut() = Uri::from_parts(parts).map_err(|_| bad_request())?;
            }
        }
        let path = if req.method() == Method::CONNECT {
            ""
        } else {
            req.uri().path()
        };
        let host = match req.uri().authority() {
            Some(a) => Some(a.as_str()),
            None => req.headers().get(HOST).and_then(|h| h.to_str().ok()),
        };
        let connection = req.extensions().get::<ConnectionInfo>();
        let server_name = match connection {
            Some(c) if c.security == ConnectionSecurity::None => ServerName::Known(None),
            _ => ServerName::Unknown,
        };
        let attrs = RequestAttributes {
            method: req.method().as_str(),
            path,
            host,
            headers: req.headers(),
            peer: req.extensions().get::<PeerIdentity>().map(|p| &p.0),
            connection,
            remote_ip: forwarded_client(req.headers(), self.settings.trusted_proxies),
            server_name,
        };
        let decision = self.policies.0.load().evaluate(&attrs);
        if decision.allowed {
            Ok(decision)
        } else {
            tracing::debug!(policy = ?decision.policy, "request denied by authorization policy");
            Err(Reject::Forbidden(Box::new(decision)))
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Authz<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<AuthzBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.check(&mut req) {
            Ok(decision) => {
                req.extensions_mut().insert(decision.clone());
                ResponseFuture::Inner {
                    future: self.inner.call(req),
                    decision: Some(decision),
                }
            }
            Err(Reject::BadRequest) => ResponseFuture::Local {
                response: Some(local_response(StatusCode::BAD_REQUEST, "Bad Request")),
            },
            Err(Reject::Forbidden(decision)) => {
                let mut response = local_response(StatusCode::FORBIDDEN, DENIED_BODY);
                response.extensions_mut().insert(*decision);
                ResponseFuture::Local {
                    response: Some(response),
                }
            }
        }
    }
}

/// The future of [`Authz`].
#[pin_project(project = ResponseFutureProj)]
#[derive(Debug)]
pub enum ResponseFuture<F, B> {
    /// Allowed: waiting for the inner service.
    Inner {
        /// The inner service's future.
        #[pin]
        future: F,
        /// Attached to the response when it arrives.
        decision: Option<AuthzDecision>,
    },
    /// Denied or malformed: answered locally.
    Local {
        /// The local reply, taken on the first poll.
        response: Option<Response<AuthzBody<B>>>,
    },
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<AuthzBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Inner { future, decision } => {
                let mut res = ready!(future.poll(cx))?.map(AuthzBody::inner);
                if let Some(d) = decision.take() {
                    res.extensions_mut().insert(d);
                }
                Poll::Ready(Ok(res))
            }
            ResponseFutureProj::Local { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

/// The response body of [`Authz`]: the inner service's body, or a local reply.
#[pin_project(project = AuthzBodyProj)]
#[derive(Debug)]
pub enum AuthzBody<B> {
    /// The inner service's body.
    Inner {
        /// The body.
        #[pin]
        body: B,
    },
    /// A local reply (403 or 400).
    Local {
        /// The bytes not yet sent.
        data: Option<Bytes>,
    },
}

impl<B> AuthzBody<B> {
    fn inner(body: B) -> Self {
        Self::Inner { body }
    }

    fn local(text: &'static str) -> Self {
        Self::Local {
            data: Some(Bytes::from_static(text.as_bytes())),
        }
    }
}

impl<B> Body for AuthzBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            AuthzBodyProj::Inner { body } => body.poll_frame(cx),
            AuthzBodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body } => body.is_end_stream(),
            Self::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
