//! The Tower layer that runs RequestAuthentication on inbound HTTP requests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use pin_project::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::Authenticator;

/// A shared, swappable [`Authenticator`]: `store` a new one on reload; requests in
/// flight finish with the one they started with.
#[derive(Clone, Debug)]
pub struct AuthnHandle(Arc<ArcSwap<Authenticator>>);

impl AuthnHandle {
    /// A handle holding `auth`.
    pub fn new(auth: Authenticator) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(auth)))
    }

    /// Replaces the rules for every service built from this handle.
    pub fn store(&self, auth: Authenticator) {
        self.0.store(Arc::new(auth));
    }

    /// The rules in force.
    pub fn load(&self) -> Arc<Authenticator> {
        self.0.load_full()
    }
}

impl Default for AuthnHandle {
    fn default() -> Self {
        Self::new(Authenticator::default())
    }
}

/// Runs RequestAuthentication: see the [module docs](super).
#[derive(Clone, Debug)]
pub struct AuthnLayer {
    handle: AuthnHandle,
}

impl AuthnLayer {
    /// A layer enforcing `auth`.
    pub fn new(auth: Authenticator) -> Self {
        Self::from_handle(AuthnHandle::new(auth))
    }

    /// A layer reading its rules from `handle`.
    pub fn from_handle(handle: AuthnHandle) -> Self {
        Self { handle }
    }

    /// The handle to swap the rules at runtime.
    pub fn handle(&self) -> AuthnHandle {
        self.handle.clone()
    }
}

impl<S> Layer<S> for AuthnLayer {
    type Service = Authn<S>;

    fn layer(&self, inner: S) -> Authn<S> {
        Authn {
            inner,
            handle: self.handle.clone(),
        }
    }
}

/// The service built by [`AuthnLayer`].
#[derive(Clone, Debug)]
pub struct Authn<S> {
    inner: S,
    handle: AuthnHandle,
}

/// The response body of [`Authn`]: the inner service's, or a local `401`.
pub type AuthnBody<B> = Either<B, Full<Bytes>>;

/// The boxed token check and call of [`AuthnFuture::Checked`].
pub type CheckedFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<AuthnBody<B>>, E>> + Send>>;

/// The future of [`Authn`]: the inner service's own future when no rule applies to the
/// workload (no allocation on that path), else the token check before it.
#[pin_project(project = AuthnFutureProj)]
pub enum AuthnFuture<F, B, E> {
    /// No RequestAuthentication applies: the inner service's future.
    Direct {
        /// The inner future.
        #[pin]
        inner: F,
    },
    /// Tokens are checked before the inner service is called.
    Checked {
        /// The check, then the call.
        fut: CheckedFuture<B, E>,
    },
}

impl<F, B, E> Future for AuthnFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<AuthnBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthnFutureProj::Direct { inner } => {
                inner.poll(cx).map(|r| r.map(|res| res.map(Either::Left)))
            }
            AuthnFutureProj::Checked { fut } => fut.as_mut().poll(cx),
        }
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`
/// (RA-06 `bypass_cors_preflight`).
fn is_cors_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(http::header::ORIGIN)
        && req
            .headers()
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

fn unauthorized<B>(realm: &str, message: &'static str) -> Response<AuthnBody<B>> {
    let mut res = Response::new(Either::Right(Full::new(Bytes::from_static(
        message.as_bytes(),
    ))));
    *res.status_mut() = StatusCode::UNAUTHORIZED;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(message.len()));
    let challenge = format!("Bearer realm=\"{realm}\", error=\"invalid_token\"");
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        h.insert(WWW_AUTHENTICATE, v);
    } else {
        h.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res.extensions_mut()
        .insert(mesh_core::extensions::LocalReply);
    res
}

/// `http://<authority><path>` of the request, for the challenge's realm (as Envoy).
fn realm<B>(req: &Request<B>) -> String {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let scheme = req.uri().scheme_str().unwrap_or("http");
    let path = req.uri().path();
    let realm = format!("{scheme}://{host}{path}");
    realm.replace(['"', '\\'], "")
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Authn<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: 'static,
{
    type Response = Response<AuthnBody<ResBody>>;
    type Error = S::Error;
    type Future = AuthnFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let auth = self.handle.load();
        if auth.is_empty() {
            // No rule: nothing to check, and no output header to strip from a preflight.
            return AuthnFuture::Direct {
                inner: self.inner.call(req),
            };
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = Box::pin(async move {
            if is_cors_preflight(&req) {
                auth.strip_outputs(req.headers_mut());
            } else if let Err(e) = auth.authenticate(&mut req).await {
                tracing::debug!(error = %e, "request rejected by RequestAuthentication");
                return Ok(unauthorized(&realm(&req), e.body()));
            }
            inner.call(req).await.map(|r| r.map(Either::Left))
        });
        AuthnFuture::Checked { fut }
    }
}
