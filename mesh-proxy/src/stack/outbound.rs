//! The outbound stack: requests a workload sends, routed by VirtualService and sent to
//! the chosen endpoint over mTLS.
//!
//! # Layer placement
//!
//! ```text
//! sanitize (`_` names refused) -> host resolved once (absolute-form authority, else Host)
//!   -> telemetry (reporter=source, destination_service = the virtual host's FQDN)
//!   -> respond (errors become Istio's local replies)
//!   -> prepare (absolute-form authority becomes Host, hop-by-hop headers go)
//!   -> known host: router (VirtualService) -> per route and destination (see
//!      [`destination`](super::destination)) ...
//!   -> unknown host: ALLOW_ANY passthrough in plaintext, in the client's HTTP version
//!      (508 `NR` when addressed to this stack's own listener, which would loop) |
//!      REGISTRY_ONLY 502 `NR`
//! ```
//!
//! On a captured connection (transparent capture) the listener puts the connection's
//! [`OriginalDestination`] on every request: a Host the route table does not know is
//! then routed to the service that owns the original address, and a passthrough goes
//! to the original address (Istio's `PassthroughCluster`), not to the Host.
//!
//! The request's host is looked up once per request, on the snapshot the router then
//! routes it on. Hosts the route table does not know are recorded by authority, with a
//! bound on distinct authorities.
//!
//! # Errors
//!
//! None reach the caller: every failure is answered as Istio does ([`crate::respond`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use mesh_core::body::BoxBody;
use mesh_core::error::BoxError;
use mesh_routing::{Router, RouterHandle, Snapshot};
use mesh_telemetry::{DestinationService, Telemetry, TelemetryLayer, Workload};
use pin_project::pin_project;
use tower::{Layer, Service};

use super::client::{HttpClient, Protocol};
use super::destination::{MakeDest, RouteService};
use super::headers::{Sanitize, strip_hop_by_hop};
use super::{HttpService, RouteFuture, boxed_request};
use crate::respond::{self, BadRequest, Respond};

/// The router of the outbound and gateway stacks.
pub type MeshRouter = RouterHandle<MakeDest>;

/// What to do with hosts the route table does not know (Istio's
/// `outboundTrafficPolicy.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    /// Forward in plaintext to the host the request names (Istio's default).
    #[default]
    AllowAny,
    /// Answer 502 with flag `NR` (Istio's `BlackHoleCluster`).
    RegistryOnly,
}

/// The `outboundTrafficPolicy.mode` in force, shared by the stacks that read it: the
/// workload's `Sidecar` resource sets it, and may change it on an update, over the
/// proxy's own setting. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct OutboundPolicy(Arc<std::sync::atomic::AtomicBool>);

impl OutboundPolicy {
    /// A policy starting at `mode`.
    pub fn new(mode: OutboundMode) -> Self {
        let policy = Self::default();
        policy.set(mode);
        policy
    }

    /// The mode in force.
    pub fn mode(&self) -> OutboundMode {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) {
            OutboundMode::RegistryOnly
        } else {
            OutboundMode::AllowAny
        }
    }

    /// Puts `mode` in force for every holder.
    pub fn set(&self, mode: OutboundMode) {
        self.0.store(
            mode == OutboundMode::RegistryOnly,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl From<OutboundMode> for OutboundPolicy {
    fn from(mode: OutboundMode) -> Self {
        Self::new(mode)
    }
}

/// Where a captured connection was addressed before it was redirected to the outbound
/// listener (transparent capture), as a request extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    /// The address and port the application connected to.
    pub address: SocketAddr,
    /// The host of the service that owns the address, if one does: requests whose Host
    /// names no known host are routed to it.
    pub service: Option<Arc<str>>,
}

/// Bound on distinct destination services (and authorities) in outbound metrics.
const SERVICE_LIMIT: usize = 1024;

/// The host part of the request's authority (absolute-form URI first, then Host),
/// lower-cased and without a trailing dot; borrowed when it already is.
pub fn request_host<B>(req: &Request<B>) -> Option<Cow<'_, str>> {
    let host = match req.uri().authority() {
        Some(a) => a.host(),
        None => {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            host_of(h)?
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// The host of a `Host` header value (IPv6 literals keep their brackets), or `None`
/// when the value is not an authority.
fn host_of(value: &str) -> Option<&str> {
    if value.starts_with('[') {
        let end = value.find(']')?;
        return Some(&value[..=end]);
    }
    let host = value.rsplit_once(':').map_or(value, |(h, _)| h);
    (!host.is_empty() && Authority::try_from(value).is_ok()).then_some(host)
}

/// Prepares a request from the application: the absolute-form target's authority wins
/// over Host (RFC 9112 §3.2.2) and becomes the Host; hop-by-hop headers go.
pub fn prepare(req: &mut Request<BoxBody>) -> Result<(), BadRequest> {
    if req.headers().get_all(http::header::HOST).iter().count() > 1 {
        return Err(BadRequest("duplicate Host"));
    }
    if let Some(authority) = req.uri().authority().cloned() {
        if let Ok(v) = http::HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(http::header::HOST, v);
        }
        // Route on origin-form from here on; the authority lives in Host.
        if let Some(pq) = req.uri().path_and_query().cloned()
            && let Ok(uri) = Uri::builder().path_and_query(pq).build()
        {
            *req.uri_mut() = uri;
        }
    } else if req.version() <= http::Version::HTTP_11
        && !req.headers().contains_key(http::header::HOST)
    {
        return Err(BadRequest("missing Host"));
    }
    strip_hop_by_hop(req.headers_mut());
    Ok(())
}

/// The outbound stack (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    forward: Forward,
    telemetry: Telemetry,
    by_service: Arc<ArcSwap<HashMap<Arc<str>, TelemetryLayer>>>,
    by_authority: TelemetryLayer,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("mode", &self.forward.mode.mode())
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// The outbound stack over `router`, reporting to `telemetry`; unknown hosts are
    /// handled as `mode` says (an [`OutboundMode`], or an [`OutboundPolicy`] that can
    /// change).
    pub fn new(
        router: &MeshRouter,
        telemetry: &Telemetry,
        mode: impl Into<OutboundPolicy>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            forward: Forward {
                router: router.router(),
                // Istio's PassthroughCluster keeps the client's protocol (h2c stays h2c).
                passthrough: HttpClient::plaintext(
                    connect_timeout,
                    idle_timeout,
                    Protocol::Downstream,
                ),
                mode: mode.into(),
                resolved: None,
                listener: None,
            },
            telemetry: telemetry.clone(),
            by_service: Arc::default(),
            by_authority: TelemetryLayer::outbound_by_authority(telemetry, SERVICE_LIMIT),
        }
    }

    /// Bounds the bodies and waits of passthrough requests by `limits`.
    #[must_use]
    pub fn stream_limits(mut self, limits: super::client::StreamLimits) -> Self {
        self.forward.passthrough = self.forward.passthrough.stream_limits(limits);
        self
    }

    /// Serving the listener at `address`: a passthrough request addressed to it is
    /// answered 508 instead of being sent back to the listener.
    #[must_use]
    pub fn on_listener(mut self, address: SocketAddr) -> Self {
        self.forward.listener = Some(address);
        self
    }

    /// The outbound stack as the listener's boxed service.
    pub fn boxed(self) -> HttpService {
        tower::util::BoxCloneSyncService::new(Sanitize::new(self, false))
    }

    /// The telemetry layer for requests to virtual host `vh` of `snapshot` named `host`:
    /// `destination_service` is the qualified name of the requested host, else the
    /// virtual host's first host.
    fn layer_for(
        &self,
        snapshot: &Snapshot<RouteService>,
        vh: usize,
        host: &str,
    ) -> TelemetryLayer {
        let Some(vh) = snapshot.table().virtual_hosts().get(vh) else {
            return self.by_authority.clone();
        };
        let fqdn = vh
            .hosts
            .iter()
            .find(|h| {
                h.as_str() == host
                    || (h.len() > host.len()
                        && h.starts_with(host)
                        && h.as_bytes()[host.len()] == b'.')
            })
            .or_else(|| vh.hosts.iter().find(|h| !h.starts_with('*')))
            .map_or(host, String::as_str);
        if let Some(layer) = self.by_service.load().get(fqdn) {
            return layer.clone();
        }
        let mut added = None;
        self.by_service.rcu(|map| {
            let mut map = HashMap::clone(map);
            if map.len() < SERVICE_LIMIT {
                let layer = map.entry(Arc::from(fqdn)).or_insert_with(|| {
                    TelemetryLayer::outbound(
                        &self.telemetry,
                        DestinationService::from_host(fqdn),
                        Workload::unknown(),
                    )
                });
                added = Some(layer.clone());
            }
            map
        });
        added.unwrap_or_else(|| self.by_authority.clone())
    }
}

/// The per-request service: telemetry around the local replies around [`Forward`].
type Recorded = mesh_telemetry::TelemetryService<
    tower::util::MapRequest<
        Respond<Forward>,
        fn(Request<mesh_telemetry::RequestBody<BoxBody>>) -> Request<BoxBody>,
    >,
>;
type RecordedFuture = <Recorded as Service<Request<BoxBody>>>::Future;
type RecordedResponse = <Recorded as Service<Request<BoxBody>>>::Response;

impl<B> Service<Request<B>> for Outbound
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: the destination, and so the service whose readiness matters, is
    /// known only per request; the router's response future waits for it.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        use futures_util::TryFutureExt;
        let req = boxed_request(req);
        let snapshot = self.forward.router.snapshot();
        let host = request_host(&req);
        let by_address = || {
            let service = req
                .extensions()
                .get::<OriginalDestination>()?
                .service
                .as_deref()?;
            Some((snapshot.table().virtual_host_index(service)?, service))
        };
        let vh = host
            .as_deref()
            .and_then(|h| Some((snapshot.table().virtual_host_index(h)?, h)))
            .or_else(by_address);
        let (layer, resolved) = match vh {
            Some((index, h)) => (self.layer_for(&snapshot, index, h), Some((snapshot, index))),
            None => (self.by_authority.clone(), None),
        };
        drop(host);
        let forward = Forward {
            resolved,
            ..self.forward.clone()
        };
        let mut svc: Recorded = layer.layer(tower::util::MapRequest::new(
            Respond::new(forward),
            boxed_request as fn(_) -> _,
        ));
        ResponseFuture {
            inner: svc
                .call(req)
                .map_ok(super::boxed_response as fn(_) -> Response<BoxBody>),
        }
    }
}

/// The response future of [`Outbound`].
#[pin_project]
pub struct ResponseFuture {
    #[pin]
    inner: futures_util::future::MapOk<RecordedFuture, fn(RecordedResponse) -> Response<BoxBody>>,
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<BoxBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

/// After telemetry: prepare the request, then the router for known hosts, the
/// passthrough or a 502 for others.
#[derive(Clone)]
struct Forward {
    router: Router<RouteService>,
    passthrough: HttpClient<HttpConnector>,
    mode: OutboundPolicy,
    /// The snapshot the host was resolved on and its virtual host, when known.
    resolved: Option<(Arc<Snapshot<RouteService>>, usize)>,
    /// The listener this stack serves, when it has one: passthrough to it would loop.
    listener: Option<SocketAddr>,
}

/// Whether the request's authority (`Host`, after [`prepare`]) is `listener` itself: its
/// port, and its address, a loopback or unspecified address, or `localhost`.
fn addresses(req: &Request<BoxBody>, listener: SocketAddr) -> bool {
    let Some(authority) = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<Authority>().ok())
    else {
        return false;
    };
    if authority.port_u16().unwrap_or(80) != listener.port() {
        return false;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip == listener.ip() || ip.is_loopback() || ip.is_unspecified(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// `uri`'s path and query, absolute-form towards `address`.
fn to_address(uri: &Uri, address: SocketAddr) -> Option<Uri> {
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let address = SocketAddr::new(address.ip().to_canonical(), address.port());
    Uri::builder()
        .scheme("http")
        .authority(address.to_string())
        .path_and_query(path)
        .build()
        .ok()
}

impl Service<Request<BoxBody>> for Forward {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> RouteFuture {
        if let Err(e) = prepare(&mut req) {
            return RouteFuture::local(Err(Box::new(e)));
        }
        if let Some((snapshot, index)) = self.resolved.take() {
            return RouteFuture::Routed(self.router.dispatch(req, snapshot, Some(index)));
        }
        if request_host(&req).is_none() {
            return RouteFuture::local(Err(Box::new(BadRequest("no host"))));
        }
        let original = req
            .extensions()
            .get::<OriginalDestination>()
            .map(|o| o.address);
        match self.mode.mode() {
            OutboundMode::RegistryOnly => {
                tracing::debug!("REGISTRY_ONLY: host not in the registry");
                RouteFuture::local(Ok(respond::registry_only()))
            }
            OutboundMode::AllowAny if original.is_some() => {
                // Captured: to the address the application connected to, Host kept.
                if let Some(address) = original
                    && let Some(uri) = to_address(req.uri(), address)
                {
                    *req.uri_mut() = uri;
                }
                RouteFuture::Passthrough(self.passthrough.call(req))
            }
            OutboundMode::AllowAny if self.listener.is_some_and(|l| addresses(&req, l)) => {
                tracing::debug!("passthrough to this proxy's own listener refused");
                RouteFuture::local(Ok(respond::loop_detected()))
            }
            OutboundMode::AllowAny => RouteFuture::Passthrough(self.passthrough.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::test_request as req;

    #[test]
    fn absolute_form_authority_wins_over_host() {
        let mut r = req("http://payment-service:8080/pay?x=1", Some("evil.example"));
        prepare(&mut r).unwrap();
        assert_eq!(r.headers()[http::header::HOST], "payment-service:8080");
        assert_eq!(r.uri(), "/pay?x=1");
        assert_eq!(request_host(&r).as_deref(), Some("payment-service"));
    }

    #[test]
    fn origin_form_uses_host_without_port_and_trailing_dot() {
        let r = req("/pay", Some("Payment-Service.:80"));
        assert_eq!(request_host(&r).as_deref(), Some("payment-service"));
        let r = req("/pay", Some("[::1]:80"));
        assert_eq!(request_host(&r).as_deref(), Some("[::1]"));
        let r = req("/pay", Some("payment-service"));
        assert!(matches!(
            request_host(&r),
            Some(Cow::Borrowed("payment-service"))
        ));
    }

    #[test]
    fn a_passthrough_to_the_own_listener_is_recognised() {
        let listener: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        for (host, loops) in [
            ("127.0.0.1:15001", true),
            ("localhost:15001", true),
            ("LOCALHOST:15001", true),
            ("0.0.0.0:15001", true),
            ("[::1]:15001", true),
            ("127.0.0.2:15001", true),
            ("127.0.0.1:15002", false),
            ("127.0.0.1", false),
            ("10.0.0.7:15001", false),
            ("payment-service:15001", false),
        ] {
            let r = req("/", Some(host));
            assert_eq!(addresses(&r, listener), loops, "{host}");
        }
    }

    #[test]
    fn captured_passthrough_targets_the_original_address() {
        let uri: Uri = "/pay?x=1".parse().unwrap();
        let v4 = to_address(&uri, "10.0.0.7:8080".parse().unwrap()).unwrap();
        assert_eq!(v4, "http://10.0.0.7:8080/pay?x=1");
        let mapped = to_address(&uri, "[::ffff:10.0.0.7]:80".parse().unwrap()).unwrap();
        assert_eq!(mapped, "http://10.0.0.7:80/pay?x=1");
        let v6 = to_address(&"/".parse().unwrap(), "[fd00::7]:80".parse().unwrap()).unwrap();
        assert_eq!(v6, "http://[fd00::7]:80/");
    }

    #[test]
    fn missing_or_duplicate_host_is_a_bad_request() {
        let mut r = req("/pay", None);
        assert!(prepare(&mut r).is_err());
        let mut r = req("/pay", Some("a"));
        r.headers_mut()
            .append(http::header::HOST, http::HeaderValue::from_static("b"));
        assert!(prepare(&mut r).is_err());
    }
}
