//! A sidecar and an ingress gateway assembled in-process from the [`proxyless`]
//! composition, for the loopback demo: each workload's application listens in plaintext
//! on loopback, and its sidecar owns the mTLS inbound listener, the plaintext outbound
//! listener the application calls, and a small admin server.
//!
//! [`proxyless`]: crate::proxyless

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use mesh_core::PeerIdentity;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::MeshConfig;
use mesh_core::error::BoxError;
use mesh_core::flags::ResponseFlags;
use mesh_routing::{CompileOptions, Naming};
use mesh_telemetry::{Telemetry, classify_error};
use mesh_tls::{CertStore, ClientTls, InboundAcceptor, IssuedSvid};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::proxyless::{
    AppService, DestinationService, InboundPolicy, Outbound, WorkloadId, inbound,
};

/// Istio's header carrying the caller's identity to the application.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Who a sidecar speaks for and where its application listens.
#[derive(Clone, Debug)]
pub struct SidecarSpec {
    /// The workload's identity facts.
    pub workload: WorkloadId,
    /// Where the application listens (plaintext, loopback).
    pub app: SocketAddr,
    /// The workload's certificate store.
    pub store: Arc<CertStore>,
    /// Its telemetry (shared by inbound and outbound, as in a proxy).
    pub telemetry: Telemetry,
}

/// A running sidecar.
#[derive(Debug)]
pub struct LocalSidecar {
    /// The mTLS inbound listener (peers connect here).
    pub inbound: SocketAddr,
    /// The plaintext outbound listener (the application sends here, `Host` = destination).
    pub outbound: SocketAddr,
    /// The admin server (`/metrics`, `/stats`, `/ready`).
    pub admin: SocketAddr,
    /// The spec it was started with.
    pub spec: SidecarSpec,
    policy: InboundPolicy,
    client: Arc<Outbound>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for LocalSidecar {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl LocalSidecar {
    /// Starts the three listeners on `127.0.0.1:0`.
    pub async fn start(config: &MeshConfig, spec: SidecarSpec) -> Result<Self, BoxError> {
        let policy = InboundPolicy::new(config, &spec.workload)?;
        let client = Arc::new(Outbound::new(
            config,
            &spec.workload.namespace,
            ClientTls::new(spec.store.clone()),
            spec.telemetry.clone(),
        )?);
        let in_listener = TcpListener::bind("127.0.0.1:0").await?;
        let inbound_addr = in_listener.local_addr()?;
        let app = forward_to_app(spec.app, spec.store.clone());
        let mut tasks = vec![inbound::serve(
            in_listener,
            InboundAcceptor::new(spec.store.clone()),
            policy.clone(),
            &spec.telemetry,
            &spec.workload.service_host,
            app,
        )];
        let (outbound, t) = serve_plain(outbound_service(client.client())).await?;
        tasks.push(t);
        let (admin, t) = serve_plain(admin_service(spec.telemetry.clone())).await?;
        tasks.push(t);
        Ok(Self {
            inbound: inbound_addr,
            outbound,
            admin,
            spec,
            policy,
            client,
            tasks,
        })
    }

    /// Applies a new configuration to both directions.
    pub fn reload(&self, config: &MeshConfig) -> Result<(), BoxError> {
        self.policy.update(config, &self.spec.workload)?;
        self.client.update(config)
    }
}

/// A running ingress gateway: TLS `SIMPLE` termination, then the outbound path with the
/// VirtualServices bound to the Gateway.
#[derive(Debug)]
pub struct LocalGateway {
    /// The HTTPS listener.
    pub address: SocketAddr,
    /// The admin server.
    pub admin: SocketAddr,
    /// Its telemetry.
    pub telemetry: Telemetry,
    client: Arc<Outbound>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for LocalGateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl LocalGateway {
    /// Starts the gateway `namespace/name` of `config`, presenting `server_cert` to
    /// clients and the workload certificate of `store` to the mesh.
    pub async fn start(
        config: &MeshConfig,
        namespace: &str,
        name: &str,
        store: Arc<CertStore>,
        server_cert: &IssuedSvid,
        telemetry: Telemetry,
    ) -> Result<Self, BoxError> {
        let mut options = CompileOptions::gateway(namespace, name);
        options.naming = Naming {
            namespace: namespace.to_owned(),
            ..Naming::default()
        };
        let client = Arc::new(Outbound::with_options(
            config,
            options,
            ClientTls::new(store),
            telemetry.clone(),
        )?);
        let tls = rustls::ServerConfig::builder_with_provider(mesh_tls::provider())
            .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)?
            .with_no_client_auth()
            .with_single_cert(server_cert.chain_der().to_vec(), server_cert.key_der())?;
        let mut tls = tls;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let svc = outbound_service(client.client());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, svc) = (acceptor.clone(), svc.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_io(TokioIo::new(tls), svc).await;
                    }
                });
            }
        });
        let (admin, t) = serve_plain(admin_service(telemetry.clone())).await?;
        Ok(Self {
            address,
            admin,
            telemetry,
            client,
            tasks: vec![task, t],
        })
    }

    /// Applies a new configuration.
    pub fn reload(&self, config: &MeshConfig) -> Result<(), BoxError> {
        self.client.update(config)
    }
}

type PlainService = BoxCloneSyncService<Request<Incoming>, Response<BoxBody>, Infallible>;

fn serve_io<I>(
    io: I,
    svc: PlainService,
) -> Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    Box::pin(async move {
        auto::Builder::new(TokioExecutor::new())
            .serve_connection(io, TowerToHyperService::new(svc))
            .await
    })
}

/// Serves `svc` in plaintext on a new `127.0.0.1:0` listener.
pub async fn serve_plain(svc: PlainService) -> Result<(SocketAddr, JoinHandle<()>), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(serve_io(TokioIo::new(tcp), svc.clone()));
        }
    });
    Ok((addr, task))
}

/// The answer the proxy gives for a local error: Istio's status and response flag.
pub fn error_response(err: &BoxError) -> Response<BoxBody> {
    let (status, flags) = classify_error(err);
    let mut res = Response::new(body::full(err.to_string()));
    *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    if flags != ResponseFlags::NONE
        && let Ok(v) = HeaderValue::from_str(&flags.to_string())
    {
        res.headers_mut().insert("x-envoy-response-flags", v);
    }
    res
}

/// The outbound listener's service: the request's `Host` names the destination.
fn outbound_service(client: DestinationService) -> PlainService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Incoming>| {
        let client = client.clone();
        async move {
            let (mut parts, b) = req.into_parts();
            if let Some(host) = parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
            {
                let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                if let Ok(uri) = format!("http://{host}{pq}").parse::<Uri>() {
                    parts.uri = uri;
                }
            }
            let req = Request::from_parts(parts, body::boxed(b));
            Ok::<_, Infallible>(match call(client, req).await {
                Ok(res) => res,
                Err(e) => error_response(&e),
            })
        }
    }))
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// Calls `client` once; boxed so that callers' futures have a concrete type.
pub fn call(
    client: DestinationService,
    req: Request<BoxBody>,
) -> BoxFuture<Result<Response<BoxBody>, BoxError>> {
    Box::pin(client.oneshot(req))
}

/// The inbound path's last hop: the local application, in plaintext on loopback, with
/// the caller's identity in `x-forwarded-client-cert` (as Istio's sidecar sets it).
fn forward_to_app(app: SocketAddr, store: Arc<CertStore>) -> AppService {
    let client = plain_client();
    BoxCloneSyncService::new(tower::service_fn(move |mut req: Request<BoxBody>| {
        let client = client.clone();
        let me = store.identity();
        async move {
            req.headers_mut().remove(XFCC);
            if let Some(peer) = req.extensions().get::<PeerIdentity>()
                && let Ok(v) = HeaderValue::from_str(&format!("By={me};URI={}", peer.0))
            {
                req.headers_mut().insert(XFCC, v);
            }
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            *req.uri_mut() = format!("http://{app}{pq}").parse()?;
            // The hop to the application is HTTP/1.1 whatever the peer spoke.
            *req.version_mut() = http::Version::HTTP_11;
            let res = client.request(req).await?;
            Ok::<_, BoxError>(res.map(body::boxed))
        }
    }))
}

/// A plaintext HTTP/1.1 client with `TCP_NODELAY`.
pub fn plain_client() -> Client<HttpConnector, BoxBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A small admin server: `/metrics` (Prometheus), `/stats` (percentiles), `/ready`.
fn admin_service(telemetry: Telemetry) -> PlainService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Incoming>| {
        let body: String = match req.uri().path() {
            "/metrics" => telemetry.encode_metrics(),
            "/stats" => telemetry.latency().render_text(),
            "/ready" => "LIVE\n".into(),
            _ => "admin: /metrics /stats /ready\n".into(),
        };
        std::future::ready(Ok::<_, Infallible>(Response::new(body::full(Bytes::from(
            body,
        )))))
    }))
}

/// Reads a whole response body as text.
pub async fn text(res: Response<Incoming>) -> Result<(StatusCode, String), BoxError> {
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}
