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
    res.extensions_mut()
        .insert(mesh_core::extensions::LocalReply);
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
            request_auth: req.extensions().get::<crate::authn::RequestAuth>(),
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

    /// The inner service's body, or `Err` with the local reply. A caller that boxes
    /// bodies can then pass the inner one on as it is instead of boxing this wrapper.
    pub fn into_inner(self) -> Result<B, Self> {
        match self {
            Self::Inner { body } => Ok(body),
            local @ Self::Local { .. } => Err(local),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Action, Operation, Policy, Rule};
    use tokio_test::{assert_pending, assert_ready_ok};
    use tower_test::mock;

    fn deny_admin() -> PolicySet {
        let p = Policy::new(
            "ns",
            "deny-admin",
            Action::Deny,
            vec![Rule {
                to: Some(vec![Operation {
                    paths: vec!["/admin".into()],
                    ..Operation::default()
                }]),
                ..Rule::default()
            }],
        );
        PolicySet::compile([&p]).unwrap()
    }

    type Mock = mock::Mock<Request<()>, Response<http_body_util::Empty<Bytes>>>;
    type Handle = mock::Handle<Request<()>, Response<http_body_util::Empty<Bytes>>>;

    fn service(set: PolicySet) -> (mock::Spawn<Authz<Mock>>, Handle) {
        let (mock, handle) = mock::pair();
        (mock::Spawn::new(AuthzLayer::new(set).layer(mock)), handle)
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    #[tokio::test]
    async fn readiness_is_forwarded() {
        let (mut svc, mut handle) = service(deny_admin());
        handle.allow(0);
        assert_pending!(svc.poll_ready());
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
    }

    #[tokio::test]
    async fn denied_requests_never_reach_the_inner_service() {
        let (mut svc, mut handle) = service(deny_admin());
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
        let res = svc.call(get("/admin")).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let decision = res.extensions().get::<AuthzDecision>().unwrap();
        assert!(!decision.allowed);
        assert_eq!(&*decision.policy.as_ref().unwrap().name, "ns/deny-admin");
        assert_eq!(res.headers()[CONTENT_TYPE], "text/plain");
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap();
        assert_eq!(body.to_bytes(), DENIED_BODY.as_bytes());
        assert!(handle.poll_request().is_pending());
    }

    #[tokio::test]
    async fn allowed_requests_carry_the_decision_both_ways() {
        let (mut svc, mut handle) = service(deny_admin());
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(get("/public/./x?q=1"));
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.uri(), "/public/x?q=1");
        assert!(req.extensions().get::<AuthzDecision>().unwrap().allowed);
        send.send_response(Response::new(http_body_util::Empty::new()));
        let res = fut.await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(res.extensions().get::<AuthzDecision>().unwrap().allowed);
    }

    #[tokio::test]
    async fn inner_errors_pass_through() {
        let (mut svc, mut handle) = service(PolicySet::allow_all());
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(get("/"));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(std::io::Error::other("boom"));
        let err = fut.await.unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }

    #[tokio::test]
    async fn without_policies_requests_pass_unchanged() {
        let (mut svc, mut handle) = service(PolicySet::allow_all());
        handle.allow(1);
        assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(Request::post("http://example.com/a/b?x").body(()).unwrap());
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.uri(), "http://example.com/a/b?x");
        send.send_response(Response::new(http_body_util::Empty::new()));
        assert_eq!(fut.await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn malformed_paths_and_methods_are_answered_with_400() {
        let (mut svc, mut handle) = service(PolicySet::allow_all());
        for req in [
            get("/a;b"),
            get("/a%zz"),
            Request::builder().method("get").uri("/").body(()).unwrap(),
        ] {
            handle.allow(1);
            assert_ready_ok!(svc.poll_ready());
            let res = svc.call(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        }
        assert!(handle.poll_request().is_pending());
    }

    #[test]
    fn forwarded_client_counts_trusted_hops_from_the_right() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().unwrap());
        h.append("x-forwarded-for", "3.3.3.3".parse().unwrap());
        assert_eq!(forwarded_client(&h, 0), None);
        assert_eq!(forwarded_client(&h, 1), Some("3.3.3.3".parse().unwrap()));
        assert_eq!(forwarded_client(&h, 2), Some("2.2.2.2".parse().unwrap()));
        assert_eq!(forwarded_client(&h, 3), Some("1.1.1.1".parse().unwrap()));
        assert_eq!(forwarded_client(&h, 4), None);
    }
}
