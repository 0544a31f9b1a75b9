//! The outbound path: plain HTTP from the application, routed and sent over mTLS to the
//! peer sidecar.
//!
//! # Layer placement
//!
//! ```text
//! headers (hop-by-hop, absolute-form) -> telemetry (reporter=source) -> respond
//!   -> unknown host? ALLOW_ANY passthrough | REGISTRY_ONLY 502
//!   -> router (VirtualService) -> per destination: deadline -> retry -> pool limits
//!     -> balancer (outlier detection) -> per endpoint: mTLS client (h2 or HTTP/1.1 by ALPN)
//! ```
//!
//! The peer's identity is verified against the endpoint's identities (ServiceEntry
//! `serviceAccount`/`subjectAltNames`); an endpoint without any accepts any identity of a
//! trusted domain. Destination services (balancer, outlier state, connection pools) are
//! kept across reloads by the router for destinations that still exist.
//!
//! # Errors
//!
//! Connection failures are `ConnectFailure` (503 `UF`), other upstream failures
//! `UpstreamReset` (503 `UC`); everything becomes a response in [`crate::respond`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::TryFutureExt;
use futures_util::future::BoxFuture;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::Endpoint;
use mesh_core::body::{self, BoxBody};
use mesh_core::error::{BoxError, ConnectFailure, ResetReason, UpstreamReset};
use mesh_core::extensions::{RoutePolicy, UpstreamHost, UpstreamPeerIdentity};
use mesh_resilience::{
    Balance, DeadlineLayer, LbPolicy, OutlierConfig, PoolLimitLayer, PoolLimits, RetryLayer,
    RetryPolicy,
};
use mesh_routing::{DestinationKey, MakeDestination, ResolvedPolicy, Router, RouterHandle, Target};
use mesh_tls::{ClientTls, SecureNaming};
use tokio::net::TcpStream;
use tower::{Layer, Service, ServiceExt};

use crate::respond;
use crate::serve::strip_hop_by_hop;
use crate::settings::OutboundMode;

/// A TLS client stream to a peer sidecar, telling hyper whether h2 was negotiated and
/// which identity the server proved (carried to every response as
/// [`UpstreamPeerIdentity`]).
pub struct MeshConn {
    io: TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    h2: bool,
    peer: Option<mesh_core::Identity>,
}

impl Connection for MeshConn {
    fn connected(&self) -> Connected {
        let mut connected = Connected::new();
        if self.h2 {
            connected = connected.negotiated_h2();
        }
        match &self.peer {
            Some(id) => connected.extra(UpstreamPeerIdentity(id.clone())),
            None => connected,
        }
    }
}

impl hyper::rt::Read for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Connects to one endpoint with mTLS, whatever the URI says.
#[derive(Clone)]
pub struct MeshConnector {
    address: SocketAddr,
    server_name: Arc<str>,
    tls: ClientTls,
    naming: SecureNaming,
    connect_timeout: Duration,
    /// Offer only `http/1.1` in ALPN (for Upgrade requests, which h2 cannot carry).
    h1_only: bool,
}

impl Service<Uri> for MeshConnector {
    type Response = MeshConn;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<MeshConn, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let connect = async {
                let tcp = TcpStream::connect(this.address).await?;
                let _ = tcp.set_nodelay(true);
                if this.h1_only {
                    // Secure naming is enforced by the verifier inside the config.
                    let slot = mesh_tls::verify::PeerSlot::new();
                    let mut config = (*this.tls.config(&this.naming, Some(slot.clone()))).clone();
                    config.alpn_protocols = vec![b"http/1.1".to_vec()];
                    let name = rustls_pki_types::ServerName::try_from(this.server_name.to_string())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                        .connect(name, tcp)
                        .await?;
                    Ok((stream, slot.get().map(|leaf| leaf.identity.clone())))
                } else {
                    let (stream, leaf) = this
                        .tls
                        .connect(tcp, &this.server_name, &this.naming)
                        .await?;
                    Ok::<_, std::io::Error>((stream, Some(leaf.identity)))
                }
            };
            let (stream, peer) = tokio::time::timeout(this.connect_timeout, connect)
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")
                })??;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(MeshConn {
                io: TokioIo::new(stream),
                h2,
                peer,
            })
        })
    }
}

/// Maps a hyper client error to mesh-core's leaf errors.
fn upstream_error(e: hyper_util::client::legacy::Error) -> BoxError {
    if e.is_connect() {
        Box::new(ConnectFailure::new(e))
    } else {
        Box::new(UpstreamReset::new(
            ResetReason::ConnectionTermination,
            true,
            Some(Box::new(e)),
        ))
    }
}

/// Rewrites the request URI to absolute form `http://<authority><path>` for hyper's
/// client, taking the authority from the URI or the Host header.
fn absolute(req: &mut Request<BoxBody>, fallback: &str) {
    let authority = req
        .uri()
        .authority()
        .cloned()
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<Authority>().ok())
        })
        .or_else(|| fallback.parse().ok());
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The service of one endpoint: a connection pool over mTLS (h2 when the peer offers
/// it), and an HTTP/1.1 pool for Upgrade requests.
#[derive(Clone)]
pub struct Upstream {
    client: Client<MeshConnector, BoxBody>,
    upgrades: Client<MeshConnector, BoxBody>,
    address: SocketAddr,
}

/// Whether `req` asks for a WebSocket upgrade (the only Upgrade that is forwarded).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11
        && req
            .headers()
            .get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Sends an Upgrade request with `client`; when (and only when) the answer is `101`,
/// splices the downstream and upstream connections together.
fn forward_upgrade<C>(
    client: &Client<C, BoxBody>,
    mut req: Request<BoxBody>,
    address: SocketAddr,
) -> BoxFuture<'static, Result<Response<BoxBody>, BoxError>>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let downstream = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let fut = client.request(req);
    Box::pin(async move {
        let mut res = fut.await.map_err(upstream_error)?;
        if res.status() == http::StatusCode::SWITCHING_PROTOCOLS
            && let Some(downstream) = downstream
        {
            let upstream = hyper::upgrade::on(&mut res);
            tokio::spawn(async move {
                let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
                    return;
                };
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                    tracing::debug!(error = %e, "upgraded connection ended");
                }
            });
        } else {
            strip_hop_by_hop(res.headers_mut());
        }
        res.extensions_mut().insert(UpstreamHost(address));
        Ok(res.map(body::boxed))
    })
}

impl Service<Request<BoxBody>> for Upstream {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let address = self.address;
        absolute(&mut req, &address.to_string());
        if is_upgrade(&req) {
            return forward_upgrade(&self.upgrades, req, address);
        }
        let fut = self.client.request(req);
        Box::pin(async move {
            let mut res = fut.await.map_err(upstream_error)?;
            strip_hop_by_hop(res.headers_mut());
            res.extensions_mut().insert(UpstreamHost(address));
            Ok(res.map(body::boxed))
        })
    }
}

/// What `/clusters` shows of one destination.
#[derive(Clone)]
pub struct DestinationState {
    /// The destination.
    pub key: DestinationKey,
    /// Its balancer (endpoints, ejection, in-flight counts).
    pub balance: Balance<Upstream>,
    /// Its pool limits.
    pub pool: PoolLimitLayer,
    target: Weak<Target>,
}

/// The live destinations, for the admin server.
#[derive(Clone, Default)]
pub struct Destinations(Arc<Mutex<HashMap<DestinationKey, DestinationState>>>);

impl Destinations {
    /// The destinations still in use, sorted by name.
    pub fn list(&self) -> Vec<DestinationState> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, d| d.target.strong_count() > 0);
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by_key(|d| d.key.to_string());
        v
    }
}

/// Builds the per-destination stacks for the router.
#[derive(Clone)]
pub struct MakeDest {
    /// Client TLS (the workload's SVID).
    pub tls: ClientTls,
    /// Upstream connect plus handshake timeout.
    pub connect_timeout: Duration,
    /// Replay limit for retried request bodies.
    pub replay_limit: usize,
    /// Idle timeout of pooled upstream connections when no DestinationRule sets one.
    pub idle_timeout: Duration,
    /// Where the destinations are listed for the admin server.
    pub destinations: Destinations,
}

/// The parts of a destination built from its traffic policy.
#[derive(Clone)]
struct Built {
    policy: Arc<ResolvedPolicy>,
    endpoints: Arc<Vec<Endpoint>>,
    balance: Balance<Upstream>,
    pool: PoolLimitLayer,
}

impl MakeDest {
    /// Balancer and pool limits for `target` under its current policy.
    fn build(&self, target: &Arc<Target>) -> Built {
        let policy = target.policy();
        let lb = policy
            .load_balancer
            .as_ref()
            .and_then(|lb| match LbPolicy::try_from(lb) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(destination = %target.key, "{e}");
                    None
                }
            })
            .unwrap_or_default();
        let outlier = policy.outlier_detection.as_ref().map(OutlierConfig::from);
        let limits = policy
            .connection_pool
            .as_ref()
            .map(PoolLimits::from)
            .unwrap_or_default();
        let tls = self.tls.clone();
        let connect_timeout = self.connect_timeout;
        let server_name: Arc<str> = target.key.host.clone();
        let dr_idle = policy.connection_pool.as_ref().is_some_and(|cp| {
            cp.tcp.as_ref().is_some_and(|t| t.idle_timeout.is_some())
                || cp.http.as_ref().is_some_and(|h| h.idle_timeout.is_some())
        });
        let idle = if dr_idle {
            limits.idle_timeout
        } else {
            self.idle_timeout
        };
        let balance = Balance::new(lb, outlier, move |ep: &Endpoint| {
            let naming = if ep.identities.is_empty() {
                SecureNaming::AnyTrusted
            } else {
                SecureNaming::OneOf(ep.identities.clone())
            };
            let connector = MeshConnector {
                address: ep.address,
                server_name: server_name.clone(),
                tls: tls.clone(),
                naming,
                connect_timeout,
                h1_only: false,
            };
            let client = Client::builder(TokioExecutor::new())
                .pool_idle_timeout(idle)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .build(connector.clone());
            let upgrades = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(MeshConnector {
                    h1_only: true,
                    ..connector
                });
            Upstream {
                client,
                upgrades,
                address: ep.address,
            }
        });
        let endpoints = target.endpoints();
        balance.update(endpoints.iter().cloned());
        let pool = PoolLimitLayer::new(limits);
        self.destinations
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                target.key.clone(),
                DestinationState {
                    key: target.key.clone(),
                    balance: balance.clone(),
                    pool: pool.clone(),
                    target: Arc::downgrade(target),
                },
            );
        Built {
            policy,
            endpoints,
            balance,
            pool,
        }
    }
}

impl MakeDestination for MakeDest {
    type Service = DestService;

    fn make(&self, target: &Arc<Target>) -> DestService {
        DestService {
            target: target.clone(),
            built: Arc::new(Mutex::new(self.build(target))),
            make: self.clone(),
        }
    }
}

/// One destination: deadline and retries from the route, pool limits, balancer.
///
/// New endpoints (reloads, DNS) are handed to the balancer, which keeps the state of
/// endpoints that remain. A changed traffic policy (load balancer, outlier detection,
/// connection pool) rebuilds the balancer and the pool limits: their state starts over.
#[derive(Clone)]
pub struct DestService {
    target: Arc<Target>,
    built: Arc<Mutex<Built>>,
    make: MakeDest,
}

impl Service<Request<BoxBody>> for DestService {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        // Endpoints and policy are published through the target on reloads and DNS
        // refreshes.
        let (balance, pool) = {
            let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
            let policy = self.target.policy();
            if !Arc::ptr_eq(&built.policy, &policy) && *built.policy != *policy {
                tracing::info!(destination = %self.target.key, "traffic policy changed");
                *built = self.make.build(&self.target);
            }
            built.policy = policy;
            let now = self.target.endpoints();
            if !Arc::ptr_eq(&built.endpoints, &now) {
                built.balance.update(now.iter().cloned());
                built.endpoints = now;
            }
            (built.balance.clone(), built.pool.clone())
        };
        let route = req
            .extensions()
            .get::<RoutePolicy>()
            .cloned()
            .unwrap_or_default();
        let retry = RetryPolicy::from_route(route.retries.as_deref(), route.timeout)
            .unwrap_or_else(|e| {
                tracing::warn!("{e}; using the default retry policy");
                RetryPolicy::istio_default()
            })
            .replay_limit(self.make.replay_limit);
        let svc = DeadlineLayer::new(route.timeout).layer(
            RetryLayer::new(retry)
                .with_retry_gate(pool.retry_gate())
                .layer(pool.layer(balance)),
        );
        Box::pin(
            svc.oneshot(req)
                .map_ok(|res: Response<_>| res.map(body::boxed)),
        )
    }
}

/// The router type of the sidecar and the gateway.
pub type MeshRouter = RouterHandle<MakeDest>;

/// The outbound service after telemetry: unknown hosts, then the router.
#[derive(Clone)]
pub struct Outbound {
    /// The routing state.
    pub handle: MeshRouter,
    router: Router<DestService>,
    passthrough: Client<HttpConnector, BoxBody>,
    mode: OutboundMode,
}

impl Outbound {
    /// The outbound service over `handle`.
    pub fn new(handle: MeshRouter, mode: OutboundMode, connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        Self {
            router: handle.router(),
            handle,
            passthrough: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .build(http),
            mode,
        }
    }
}

/// The host part of the request's authority (absolute-form URI first, then Host).
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            Some(h.parse::<Authority>().ok()?.host().to_owned())
        })?;
    Some(authority.trim_end_matches('.').to_ascii_lowercase())
}

/// Prepares a request from the application: the absolute-form target's authority wins
/// over Host (RFC 9112 §3.2.2) and becomes the Host; hop-by-hop headers go.
pub fn prepare(req: &mut Request<BoxBody>) -> Result<(), respond::BadRequest> {
    if req.headers().get_all(http::header::HOST).iter().count() > 1 {
        return Err(respond::BadRequest("duplicate Host"));
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
        return Err(respond::BadRequest("missing Host"));
    }
    strip_hop_by_hop(req.headers_mut());
    Ok(())
}

impl Service<Request<BoxBody>> for Outbound {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        if let Err(e) = prepare(&mut req) {
            return Box::pin(async move { Err(Box::new(e) as BoxError) });
        }
        let Some(host) = request_host(&req) else {
            return Box::pin(async { Err(Box::new(respond::BadRequest("no host")) as BoxError) });
        };
        let known = self.handle.snapshot().table().virtual_host(&host).is_some();
        if known {
            return Box::pin(self.router.call(req));
        }
        match self.mode {
            OutboundMode::RegistryOnly => {
                tracing::debug!(%host, "REGISTRY_ONLY: host not in the registry");
                Box::pin(async { Ok(respond::registry_only()) })
            }
            OutboundMode::AllowAny => {
                absolute(&mut req, &host);
                let fut = self.passthrough.request(req);
                Box::pin(async move {
                    let mut res = fut.await.map_err(upstream_error)?;
                    strip_hop_by_hop(res.headers_mut());
                    Ok(res.map(body::boxed))
                })
            }
        }
    }
}

/// Sends requests to the local application over plain HTTP.
#[derive(Clone)]
pub struct AppClient {
    client: Client<HttpConnector, BoxBody>,
    upgrades: Client<HttpConnector, BoxBody>,
    app: SocketAddr,
    h2: bool,
}

impl AppClient {
    /// A client for the application at `app`, speaking h2 with prior knowledge when `h2`.
    pub fn new(app: SocketAddr, h2: bool) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .http2_only(h2)
                .build(http.clone()),
            upgrades: Client::builder(TokioExecutor::new()).build(http),
            app,
            h2,
        }
    }
}

impl Service<Request<BoxBody>> for AppClient {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> Self::Future {
        let app = self.app;
        strip_hop_by_hop(req.headers_mut());
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Ok(uri) = format!("http://{app}{pq}").parse() {
            *req.uri_mut() = uri;
        }
        if is_upgrade(&req) {
            *req.version_mut() = http::Version::HTTP_11;
            return forward_upgrade(&self.upgrades, req, app);
        }
        // The request is translated to the application's protocol.
        *req.version_mut() = if self.h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let fut = self.client.request(req);
        Box::pin(async move {
            let mut res = fut.await.map_err(upstream_error)?;
            strip_hop_by_hop(res.headers_mut());
            res.extensions_mut().insert(UpstreamHost(app));
            Ok(res.map(body::boxed))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> Request<BoxBody> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(http::header::HOST, h);
        }
        b.body(body::empty()).unwrap()
    }

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

    #[test]
    fn absolute_uri_for_the_client_keeps_path_and_host() {
        let mut r = req("/pay?x=1", Some("payment-service"));
        absolute(&mut r, "127.0.0.1:1");
        assert_eq!(r.uri(), "http://payment-service/pay?x=1");
        let mut r = req("/", None);
        absolute(&mut r, "127.0.0.1:1");
        assert_eq!(r.uri(), "http://127.0.0.1:1/");
    }
}

/// The outbound listener's service: telemetry per destination service (the FQDN of the
/// virtual host the request's host selects, as Istio's `destination_service` label),
/// then [`Outbound`]. Hosts the route table does not know are recorded by authority.
#[derive(Clone)]
pub struct OutboundListener {
    telemetry: mesh_telemetry::Telemetry,
    handle: MeshRouter,
    inner: Outbound,
    by_service: Arc<std::sync::RwLock<HashMap<String, crate::inbound::HttpService>>>,
    by_authority: crate::inbound::HttpService,
}

/// Bound on distinct destination services (and authorities) in outbound metrics.
const SERVICE_LIMIT: usize = 1024;

impl OutboundListener {
    /// The outbound service over `inner`.
    pub fn new(telemetry: &mesh_telemetry::Telemetry, inner: Outbound) -> Self {
        let by_authority = Self::wrap(
            mesh_telemetry::TelemetryLayer::outbound_by_authority(telemetry, SERVICE_LIMIT),
            inner.clone(),
        );
        Self {
            telemetry: telemetry.clone(),
            handle: inner.handle.clone(),
            inner,
            by_service: Arc::default(),
            by_authority,
        }
    }

    fn wrap(layer: mesh_telemetry::TelemetryLayer, inner: Outbound) -> crate::inbound::HttpService {
        tower::util::BoxCloneSyncService::new(
            tower::ServiceBuilder::new()
                .map_response(|res: Response<_>| res.map(body::boxed))
                .layer(layer)
                .map_request(crate::inbound::boxed_request)
                .service(respond::Respond::new(inner)),
        )
    }

    fn service_for(&self, host: &str) -> crate::inbound::HttpService {
        let snapshot = self.handle.snapshot();
        let Some(vh) = snapshot.table().virtual_host(host) else {
            return self.by_authority.clone();
        };
        // The qualified name of the requested host, else the virtual host's first host.
        let fqdn = vh
            .hosts
            .iter()
            .find(|h| h.as_str() == host || h.starts_with(&format!("{host}.")))
            .or_else(|| vh.hosts.iter().find(|h| !h.starts_with('*')))
            .cloned()
            .unwrap_or_else(|| host.to_owned());
        if let Some(svc) = self
            .by_service
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fqdn)
        {
            return svc.clone();
        }
        let mut map = self.by_service.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= SERVICE_LIMIT {
            return self.by_authority.clone();
        }
        map.entry(fqdn.clone())
            .or_insert_with(|| {
                Self::wrap(
                    mesh_telemetry::TelemetryLayer::outbound(
                        &self.telemetry,
                        mesh_telemetry::DestinationService::from_host(&fqdn),
                        mesh_telemetry::Workload::unknown(),
                    ),
                    self.inner.clone(),
                )
            })
            .clone()
    }
}

impl Service<Request<BoxBody>> for OutboundListener {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        let svc = match request_host(&req) {
            Some(host) => self.service_for(&host),
            None => self.by_authority.clone(),
        };
        Box::pin(svc.oneshot(req))
    }
}
