//! The outbound client: the caller's side of every hop.
//!
//! `telemetry (reporter=source) -> Router (VirtualService) -> per destination: deadline
//! (route timeout) -> retry (route retries) -> balancer with outlier detection
//! (DestinationRule) -> per endpoint: pooled mTLS client`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Request, Response};
use mesh_core::Endpoint;
use mesh_core::body::BoxBody;
use mesh_core::config::MeshConfig;
use mesh_core::error::BoxError;
use mesh_core::extensions::RoutePolicy;
use mesh_resilience::deadline::Deadline;
use mesh_resilience::{Balance, LbPolicy, OutlierConfig, RetryLayer, RetryPolicy};
use mesh_routing::{CompileOptions, Naming, RouterHandle, Routing, Target};
use mesh_telemetry::{RequestBody, ResponseBody, Telemetry, TelemetryLayer};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use super::connect::EndpointService;

/// The service of one destination (host, subset, port).
pub type DestinationService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

type MakeFn = Box<dyn Fn(&Arc<Target>) -> DestinationService + Send + Sync>;

/// Routing, resilience and mTLS for the requests a workload sends.
pub struct Outbound {
    handle: RouterHandle<MakeFn>,
    telemetry: Telemetry,
    options: CompileOptions,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").finish_non_exhaustive()
    }
}

impl Outbound {
    /// Compiles `config` for a workload in `namespace` that presents the certificate of
    /// `tls` and reports through `telemetry`.
    pub fn new(
        config: &MeshConfig,
        namespace: &str,
        tls: mesh_tls::ClientTls,
        telemetry: Telemetry,
    ) -> Result<Self, BoxError> {
        let options = CompileOptions {
            naming: Naming {
                namespace: namespace.to_owned(),
                ..Naming::default()
            },
            ..CompileOptions::default()
        };
        Self::with_options(config, options, tls, telemetry)
    }

    /// Like [`Outbound::new`] for any listener (a gateway's, for instance).
    pub fn with_options(
        config: &MeshConfig,
        options: CompileOptions,
        tls: mesh_tls::ClientTls,
        telemetry: Telemetry,
    ) -> Result<Self, BoxError> {
        let routing = compile(config, &options)?;
        let make: MakeFn = Box::new(move |target: &Arc<Target>| destination(target, &tls));
        Ok(Self {
            handle: RouterHandle::new(make, routing),
            telemetry,
            options,
        })
    }

    /// Swaps in a new configuration; in-flight requests finish on the old one and
    /// destinations that remain keep their endpoints' state (outlier ejections, pools).
    pub fn update(&self, config: &MeshConfig) -> Result<(), BoxError> {
        self.handle.update(compile(config, &self.options)?);
        Ok(())
    }

    /// The client service: send requests with an authority the configuration knows
    /// (`http://payment-service:8080/...`).
    pub fn client(&self) -> DestinationService {
        let router = self.handle.router();
        let svc = ServiceBuilder::new()
            .map_response(box_response::<ResponseBody<BoxBody>>)
            .layer(TelemetryLayer::outbound_by_authority(&self.telemetry, 64))
            .map_request(box_request::<RequestBody<BoxBody>>)
            .service(router);
        BoxCloneSyncService::new(svc)
    }

    /// The telemetry the client reports to.
    pub fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
}

/// Boxes a response body.
pub(crate) fn box_response<B>(res: Response<B>) -> Response<BoxBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    res.map(mesh_core::body::boxed)
}

/// Boxes a request body.
pub(crate) fn box_request<B>(req: Request<B>) -> Request<BoxBody>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    req.map(mesh_core::body::boxed)
}

fn compile(config: &MeshConfig, options: &CompileOptions) -> Result<Routing, BoxError> {
    Routing::compile(config, options).map_err(|errors| {
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        BoxError::from(text.join("; "))
    })
}

/// Builds the stack of one destination: balancer (with outlier detection when the
/// DestinationRule has it) over one pooled client per endpoint.
fn destination(target: &Arc<Target>, tls: &mesh_tls::ClientTls) -> DestinationService {
    let policy = target.policy();
    let outlier = policy.outlier_detection.as_ref().map(OutlierConfig::from);
    // An unsupported algorithm (consistent hashing) falls back to LEAST_REQUEST.
    let lb = policy
        .load_balancer
        .as_ref()
        .and_then(|lb| LbPolicy::try_from(lb).ok())
        .unwrap_or_default();
    let tls = tls.clone();
    let sni = target.key.host.clone();
    let balance = Balance::new(lb, outlier, move |ep: &Endpoint| {
        EndpointService::new(ep, tls.clone(), &sni)
    });
    let endpoints = target.endpoints();
    balance.update(endpoints.iter().cloned());
    BoxCloneSyncService::new(Destination {
        target: Arc::clone(target),
        balance,
        synced: Arc::new(Mutex::new(endpoints)),
    })
}

/// Applies the route's policy (left by the router) around the balancer, per request.
#[derive(Clone)]
struct Destination {
    target: Arc<Target>,
    balance: Balance<EndpointService>,
    synced: Arc<Mutex<Arc<Vec<Endpoint>>>>,
}

impl Destination {
    /// Pushes the target's endpoints into the balancer when they changed (reload).
    fn sync(&self) {
        let now = self.target.endpoints();
        let mut seen = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&now, &seen) {
            self.balance.update(now.iter().cloned());
            *seen = now;
        }
    }
}

impl Service<Request<BoxBody>> for Destination {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<BoxBody>) -> Self::Future {
        self.sync();
        let route = req
            .extensions()
            .get::<RoutePolicy>()
            .cloned()
            .unwrap_or_default();
        let balance = self.balance.clone();
        let retry = match RetryPolicy::from_route(route.retries.as_deref(), route.timeout) {
            Ok(r) => r,
            Err(e) => return Box::pin(std::future::ready(Err(BoxError::from(e)))),
        };
        let svc = Deadline::new(RetryLayer::new(retry).layer(balance), route.timeout)
            .map_response(box_response);
        let svc: DestinationService = BoxCloneSyncService::new(svc);
        Box::pin(svc.oneshot(req))
    }
}
