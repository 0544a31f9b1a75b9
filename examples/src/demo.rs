//! The article's scenario, live on loopback: the story behind the `sidecar` program.
//!
//! A CA issuing short-lived SVIDs, order-service v1 and v2, payment-service (two
//! replicas, one of which starts failing, and at the end a third without a sidecar,
//! reached in plaintext by auto-mTLS), web-frontend (a mesh client), a `mesh-proxy`
//! sidecar for each ([`mesh_proxy::Sidecar`], in this process) and a `mesh-proxy`
//! ingress gateway with TLS ([`mesh_proxy::Gateway`]). Every hop between them is a real
//! connection on 127.0.0.1. Configuration is the article's YAML in
//! `examples/sidecar/config/`, copied to a scratch directory with one generated
//! ServiceEntry (where the loopback replicas listen); the proxies watch that directory,
//! and the rollout rewrites the VirtualService file there. Everything the story reports
//! about the proxies it reads from their admin servers, as an operator would.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::BoxError;
use mesh_proxy::ProxyHandle;
use mesh_proxy::{Gateway, Settings, Sidecar};
use mesh_tls::{CertStore, CertificateAuthority, ClientTls, LeafSpec, SecureNaming};
use serde_json::Value;
use tokio::net::TcpStream;
use tower::util::BoxCloneSyncService;

use crate::embedded::Check;
use crate::graph::{self, Graph, Traffic};
use crate::scenario::{EntryEndpoint, service_entry_yaml, within};

/// How much traffic each step sends.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Requests for the canary measurement (the rollout sends half as many per stage).
    pub canary_requests: usize,
    /// Requests in the resilience and rotation steps.
    pub resilience_requests: usize,
    /// Concurrent requests in flight.
    pub concurrency: usize,
    /// Keep everything up afterwards (prints admin URLs, waits for Ctrl-C).
    pub keep_running: bool,
}

impl Options {
    /// The full story (a few thousand requests).
    pub fn full() -> Self {
        Self {
            canary_requests: 1000,
            resilience_requests: 600,
            concurrency: 8,
            keep_running: false,
        }
    }

    /// A shorter run for tests.
    pub fn short() -> Self {
        Self {
            canary_requests: 300,
            resilience_requests: 200,
            concurrency: 4,
            keep_running: false,
        }
    }
}

/// The directory of the article's YAML.
pub fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("sidecar")
        .join("config")
}

const NS: &str = "production";
const CANARY_FILE: &str = "canary-order-service.yaml";
/// Short certificate lifetimes, so that rotation is part of the run.
const SVID_LIFETIME: &str = "60s";

/// Prints step headers and a progress bar (when standard error is a terminal).
#[derive(Debug)]
struct Progress {
    tty: bool,
}

impl Progress {
    fn step(&self, n: usize, title: &str) {
        println!("\n[{n}/7] {title}");
    }

    fn bar(&self, label: &str, done: usize, total: usize) {
        if !self.tty || total == 0 {
            return;
        }
        let width = 30;
        let filled = done * width / total;
        eprint!(
            "\r  {label:<28} [{}{}] {done}/{total}",
            "#".repeat(filled),
            ".".repeat(width - filled)
        );
        if done == total {
            eprint!("\r{}\r", " ".repeat(80));
        }
        let _ = std::io::stderr().flush();
    }
}

/// A plaintext HTTP/1.1 client with `TCP_NODELAY`.
pub fn plain_client() -> Client<HttpConnector, BoxBody> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Reads a whole response body as text.
pub async fn text(res: Response<Incoming>) -> Result<(StatusCode, String), BoxError> {
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

type PlainService =
    BoxCloneSyncService<Request<Incoming>, Response<BoxBody>, std::convert::Infallible>;

/// Serves `svc` in plaintext on `listener` until the task is aborted.
fn serve_plain(
    listener: tokio::net::TcpListener,
    svc: PlainService,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let svc = svc.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        TokioIo::new(tcp),
                        hyper_util::service::TowerToHyperService::new(svc),
                    )
                    .await;
            });
        }
    })
}

/// The applications: plain HTTP on loopback, unaware of the mesh except for
/// propagating trace headers (as Istio asks applications to do).
fn app_service(
    app: &'static str,
    version: &'static str,
    name: &'static str,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    outbound: Option<SocketAddr>,
    plain: Client<HttpConnector, BoxBody>,
) -> PlainService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Incoming>| {
        hits.fetch_add(1, Ordering::Relaxed);
        let (failing, plain) = (failing.load(Ordering::Relaxed), plain.clone());
        let mut call = outbound.map(|outbound| {
            // order-service calls payment-service through its sidecar.
            let mut call = Request::post(format!("http://{outbound}/api/v1/payments"))
                .header("host", "payment-service:8080")
                .header("content-type", "application/json")
                .body(body::full("{\"amount\":\"9.99\"}"))
                .unwrap_or_default();
            mesh_telemetry::trace::forward_trace_headers(req.headers(), call.headers_mut());
            call
        });
        async move {
            if failing {
                let mut res = Response::new(body::full("replica failing"));
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return Ok(res);
            }
            let mut json =
                format!("{{\"service\":\"{app}\",\"version\":\"{version}\",\"replica\":\"{name}\"");
            let mut status = StatusCode::OK;
            if let Some(call) = call.take() {
                match plain.request(call).await {
                    Ok(res) => {
                        let (s, b) = text(res)
                            .await
                            .unwrap_or((StatusCode::BAD_GATEWAY, String::new()));
                        if s != StatusCode::OK {
                            status = StatusCode::BAD_GATEWAY;
                        }
                        let payment = if b.starts_with('{') {
                            b
                        } else {
                            format!("\"{}\"", b.trim())
                        };
                        json.push_str(&format!(
                            ",\"payment_status\":{},\"payment\":{payment}",
                            s.as_u16()
                        ));
                    }
                    Err(_) => status = StatusCode::BAD_GATEWAY,
                }
            }
            json.push('}');
            let mut res = Response::new(body::full(json));
            *res.status_mut() = status;
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            Ok(res)
        }
    }))
}

/// A Zipkin v2 collector in memory: the proxies export their spans to it.
fn zipkin_collector(spans: Arc<Mutex<Vec<Value>>>) -> PlainService {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Incoming>| {
        let spans = spans.clone();
        async move {
            if let Ok(bytes) = req.into_body().collect().await.map(|b| b.to_bytes())
                && let Ok(Value::Array(batch)) = serde_json::from_slice::<Value>(&bytes)
            {
                spans
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(batch);
            }
            let mut res = Response::new(body::empty());
            *res.status_mut() = StatusCode::ACCEPTED;
            Ok(res)
        }
    }))
}

/// A free loopback port (bound, read, released).
fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One workload: its application and its sidecar.
#[derive(Debug)]
struct Instance {
    app: &'static str,
    name: &'static str,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    _proxy: ProxyHandle,
    _app: tokio::task::JoinHandle<()>,
}

impl Instance {
    fn label(&self) -> String {
        format!("{}-{}", self.app, self.name)
    }
}

/// The ports of one workload, chosen before anything starts so that the ServiceEntry
/// can name them.
#[derive(Clone, Copy, Debug)]
struct Ports {
    app: u16,
    inbound: u16,
    outbound: u16,
}

struct Spec {
    app: &'static str,
    version: &'static str,
    name: &'static str,
    calls_payment: bool,
    ports: Ports,
}

/// Everything the story runs on.
struct World {
    ca: Arc<CertificateAuthority>,
    scratch: tempfile::TempDir,
    config_dir: PathBuf,
    orders: Vec<Instance>,
    payments: Vec<Instance>,
    frontend: Instance,
    gateway: SocketAddr,
    gateway_admin: SocketAddr,
    _gateway: ProxyHandle,
    client: Client<GatewayConnector, BoxBody>,
    plain: Client<HttpConnector, BoxBody>,
    spans: Arc<Mutex<Vec<Value>>>,
    _collector: tokio::task::JoinHandle<()>,
    started: tokio::time::Instant,
    /// The generated ServiceEntry of order-service, and payment-service's endpoints.
    order_entry: String,
    payment_entries: Vec<EntryEndpoint>,
}

fn settings_yaml(world: &Paths, spec: &Spec) -> String {
    format!(
        "workload:\n  name: {app}-{version}\n  namespace: {NS}\n  serviceAccount: {app}\n  labels: {{app: {app}, version: {version}}}\n\
         configDir: {config}\n\
         svid: {{caDir: {ca}, lifetime: {SVID_LIFETIME}}}\n\
         listeners:\n  inbound: 127.0.0.1:{inbound}\n  outbound: 127.0.0.1:{outbound}\n  app: 127.0.0.1:{appport}\n  admin: 127.0.0.1:0\n\
         tracing: {{sampling: 100, zipkin: {zipkin}}}\n",
        app = spec.app,
        version = spec.version,
        config = world.config.display(),
        ca = world.ca.display(),
        inbound = spec.ports.inbound,
        outbound = spec.ports.outbound,
        appport = spec.ports.app,
        zipkin = world.zipkin,
    )
}

struct Paths {
    config: PathBuf,
    ca: PathBuf,
    settings: PathBuf,
    zipkin: String,
}

async fn start_instance(
    paths: &Paths,
    spec: Spec,
    plain: &Client<HttpConnector, BoxBody>,
) -> Result<Instance, BoxError> {
    let failing = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let outbound = SocketAddr::from(([127, 0, 0, 1], spec.ports.outbound));
    let app = app_service(
        spec.app,
        spec.version,
        spec.name,
        failing.clone(),
        hits.clone(),
        spec.calls_payment.then_some(outbound),
        plain.clone(),
    );
    let app_task = serve_plain(
        tokio::net::TcpListener::bind(("127.0.0.1", spec.ports.app)).await?,
        app,
    );
    let file = paths
        .settings
        .join(format!("{}-{}.yaml", spec.app, spec.name));
    std::fs::write(&file, settings_yaml(paths, &spec))?;
    let settings = Settings::load(&file).map_err(|e| format!("{e:?}"))?;
    let proxy = Sidecar::start(settings).await?;
    let addr = |name: &str| {
        proxy
            .address(name)
            .ok_or_else(|| BoxError::from(format!("sidecar has no {name} listener")))
    };
    Ok(Instance {
        app: spec.app,
        name: spec.name,
        failing,
        hits,
        inbound: addr("inbound")?,
        outbound: addr("outbound")?,
        admin: addr("admin")?,
        _proxy: proxy,
        _app: app_task,
    })
}

/// Connects to the gateway with TLS, trusting the mesh root, SNI `api.example.com`.
#[derive(Clone)]
struct GatewayConnector {
    address: SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

impl tower::Service<Uri> for GatewayConnector {
    type Response = GatewayConn;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<GatewayConn, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.address).await?;
            tcp.set_nodelay(true)?;
            let name = rustls::pki_types::ServerName::try_from("api.example.com")?;
            let tls = this.tls.connect(name, tcp).await?;
            Ok(GatewayConn(TokioIo::new(tls)))
        })
    }
}

/// A TLS connection to the gateway (server authentication only, as a browser's).
#[derive(Debug)]
pub struct GatewayConn(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl hyper_util::client::legacy::connect::Connection for GatewayConn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for GatewayConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for GatewayConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn build_world() -> Result<World, BoxError> {
    let scratch = tempfile::tempdir()?;
    let ca = Arc::new(CertificateAuthority::new("cluster.local")?);
    let ca_dir = scratch.path().join("ca");
    std::fs::create_dir_all(&ca_dir)?;
    ca.write_dir(&ca_dir)?;
    let config_dir = scratch.path().join("istio");
    let settings_dir = scratch.path().join("settings");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::create_dir_all(&settings_dir)?;
    for entry in std::fs::read_dir(self::config_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml")
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, config_dir.join(name))?;
        }
    }

    let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
    let collector_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let zipkin = format!("http://{}/api/v2/spans", collector_listener.local_addr()?);
    let collector = serve_plain(collector_listener, zipkin_collector(spans.clone()));
    let paths = Paths {
        config: config_dir.clone(),
        ca: ca_dir.clone(),
        settings: settings_dir.clone(),
        zipkin,
    };

    let ports = || -> Result<Ports, BoxError> {
        Ok(Ports {
            app: free_port()?,
            inbound: free_port()?,
            outbound: free_port()?,
        })
    };
    let spec = |app, version, name, calls_payment, ports| Spec {
        app,
        version,
        name,
        calls_payment,
        ports,
    };
    let specs = vec![
        spec("order-service", "v1", "v1", true, ports()?),
        spec("order-service", "v2", "v2", true, ports()?),
        spec("payment-service", "v1", "a", false, ports()?),
        spec("payment-service", "v1", "b", false, ports()?),
        spec("web-frontend", "v1", "web", false, ports()?),
    ];
    // Where the loopback replicas listen: the only YAML the demo adds to the article's.
    let entries = |app: &str| -> Vec<EntryEndpoint> {
        specs
            .iter()
            .filter(|s| s.app == app)
            .map(|s| EntryEndpoint {
                address: SocketAddr::from(([127, 0, 0, 1], s.ports.inbound)),
                labels: BTreeMap::from([
                    ("app".into(), app.into()),
                    ("version".into(), s.version.into()),
                ]),
                service_account: app.into(),
            })
            .collect()
    };
    let order_entry = service_entry_yaml("order-service", NS, 8080, &entries("order-service"));
    let payment_entries = entries("payment-service");
    write_entries(&config_dir, &order_entry, &payment_entries)?;

    let plain = plain_client();
    let mut instances = Vec::new();
    for s in specs {
        instances.push(start_instance(&paths, s, &plain).await?);
    }
    let frontend = instances.pop().ok_or("no frontend")?;
    let payments = instances.split_off(2);
    let orders = instances;

    // The gateway: its server certificate for api.example.com is the Kubernetes TLS
    // secret the article's Gateway names (`credentialName: api-tls-cert`).
    let creds = scratch.path().join("credentials").join("api-tls-cert");
    std::fs::create_dir_all(&creds)?;
    let server = ca.issue_with(
        &LeafSpec::workload("cluster.local", NS, "istio-ingressgateway")
            .with_dns("api.example.com"),
    )?;
    std::fs::write(creds.join("tls.crt"), server.cert_chain_pem())?;
    std::fs::write(creds.join("tls.key"), server.key_pem())?;
    let gw_file = settings_dir.join("gateway.yaml");
    std::fs::write(
        &gw_file,
        format!(
            "workload: {{name: istio-ingressgateway, namespace: {NS}, serviceAccount: istio-ingressgateway, labels: {{istio: ingress}}}}\n\
             configDir: {config}\nsvid: {{caDir: {ca}, lifetime: {SVID_LIFETIME}}}\n\
             listeners: {{admin: 127.0.0.1:0}}\n\
             tracing: {{sampling: 100, zipkin: {zipkin}}}\n\
             gateway:\n  name: api-gateway\n  namespace: {NS}\n  credentialsDir: {creds}\n  ports:\n    443: 127.0.0.1:0\n",
            config = config_dir.display(),
            ca = ca_dir.display(),
            zipkin = paths.zipkin,
            creds = creds
                .parent()
                .map_or(creds.clone(), Path::to_path_buf)
                .display(),
        ),
    )?;
    let gateway = Gateway::start(Settings::load(&gw_file).map_err(|e| format!("{e:?}"))?).await?;
    let gateway_addr = gateway
        .address("gateway:443")
        .ok_or("gateway has no 443 listener")?;
    let gateway_admin = gateway
        .address("admin")
        .ok_or("gateway has no admin listener")?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_der().clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(mesh_tls::provider())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = Client::builder(TokioExecutor::new()).build(GatewayConnector {
        address: gateway_addr,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
    });
    Ok(World {
        ca,
        scratch,
        config_dir,
        orders,
        payments,
        frontend,
        gateway: gateway_addr,
        gateway_admin,
        _gateway: gateway,
        client,
        plain,
        spans,
        _collector: collector,
        started: tokio::time::Instant::now(),
        order_entry,
        payment_entries,
    })
}

/// Writes the generated ServiceEntries: where the loopback replicas listen.
fn write_entries(
    config_dir: &Path,
    order_entry: &str,
    payments: &[EntryEndpoint],
) -> Result<(), BoxError> {
    let yaml = format!(
        "# Generated: where the loopback replicas listen.\n{order_entry}---\n{}",
        service_entry_yaml("payment-service", NS, 8080, payments),
    );
    std::fs::write(config_dir.join("zz-loopback-service-entries.yaml"), yaml)?;
    Ok(())
}

/// The outcome of one request: status and body.
type Reply = Result<(StatusCode, String), BoxError>;

impl World {
    async fn via_gateway(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://api.example.com{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .client
            .request(req.body(body::full("{\"item\":\"book\"}"))?)
            .await?;
        text(res).await
    }

    /// A request sent by a workload's application through its sidecar to `host`.
    async fn via_sidecar(
        &self,
        from: &Instance,
        method: Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", from.outbound))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self
            .plain
            .request(req.body(body::full("{\"amount\":\"9.99\"}"))?)
            .await?;
        text(res).await
    }

    async fn admin(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
    ) -> Result<String, BoxError> {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .body(body::empty())?;
        let (status, body) = text(self.plain.request(req).await?).await?;
        if status != StatusCode::OK {
            return Err(format!("admin {path}: {status}").into());
        }
        Ok(body)
    }

    async fn admin_json(&self, addr: SocketAddr, path: &str) -> Result<Value, BoxError> {
        Ok(serde_json::from_str(
            &self.admin(addr, Method::GET, path).await?,
        )?)
    }

    fn all(&self) -> impl Iterator<Item = &Instance> {
        self.orders
            .iter()
            .chain(&self.payments)
            .chain([&self.frontend])
    }

    fn admins(&self) -> Vec<(String, SocketAddr)> {
        let mut out = vec![("istio-ingressgateway".to_owned(), self.gateway_admin)];
        out.extend(self.all().map(|i| (i.label(), i.admin)));
        out
    }

    async fn config_versions(&self) -> Result<Vec<String>, BoxError> {
        let mut out = Vec::new();
        for (_, addr) in self.admins() {
            let dump = self.admin_json(addr, "/config_dump").await?;
            out.push(dump["version"].as_str().unwrap_or("").to_owned());
        }
        Ok(out)
    }

    /// Waits until every proxy has loaded a configuration other than `before`.
    async fn await_reload(&self, before: &[String]) -> Result<Duration, BoxError> {
        let start = tokio::time::Instant::now();
        loop {
            let now = self.config_versions().await?;
            if now.iter().zip(before).all(|(a, b)| a != b) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err("the proxies did not reload within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The `istio_requests_total` series of the proxy whose admin server is `addr`.
    async fn metrics(&self, addr: SocketAddr) -> Result<Vec<graph::Row>, BoxError> {
        let text = self.admin(addr, Method::GET, "/metrics").await?;
        Ok(graph::series(&text, "istio_requests_total"))
    }
}

fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split(&format!("\"{key}\":\""))
        .nth(1)
        .and_then(|r| r.split('"').next())
}

/// Sends `n` requests made by `make` with `concurrency` in flight; the replies in order.
async fn load_run<F, Fut>(
    progress: &Progress,
    label: &str,
    n: usize,
    concurrency: usize,
    make: F,
) -> Vec<Reply>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    use futures_util::stream::{self, StreamExt};
    let mut out = Vec::with_capacity(n);
    let mut s = stream::iter((0..n).map(&make)).buffered(concurrency.max(1));
    while let Some(r) = s.next().await {
        out.push(r);
        progress.bar(label, out.len(), n);
    }
    out
}

fn ok_count(replies: &[Reply]) -> usize {
    replies
        .iter()
        .filter(|r| matches!(r, Ok((s, _)) if *s == StatusCode::OK))
        .count()
}

/// The checks of a run, by step.
struct Story {
    checks: Vec<(usize, Check)>,
    step: usize,
}

impl Story {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        println!("  {} {name}: {detail}", if ok { "✔" } else { "✘ FAILED" });
        self.checks.push((
            self.step,
            Check {
                name: name.into(),
                ok,
                detail,
            },
        ));
    }
}

/// Builds the world; ports are chosen before the proxies bind them (the ServiceEntry
/// must name them): if another process takes one in between, starts over with fresh
/// ports.
async fn start_world() -> Result<World, BoxError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match build_world().await {
            Ok(w) => return Ok(w),
            Err(e) if attempt < 3 && e.to_string().to_lowercase().contains("address") => {
                eprintln!("starting again: {e}");
            }
            Err(e) => return Err(e),
        }
    }
}

/// The demo's mesh without the story, for tests and tools that drive it themselves:
/// the same applications, sidecars, gateway and configuration.
pub struct Running {
    world: World,
}

impl Running {
    /// Starts the mesh.
    pub async fn start() -> Result<Self, BoxError> {
        Ok(Self {
            world: start_world().await?,
        })
    }

    /// Every proxy's name and admin address (Istio metrics at `/stats/prometheus`).
    pub fn proxies(&self) -> Vec<(String, SocketAddr)> {
        self.world.admins()
    }

    /// Sends `n` orders through the gateway (`POST /api/v1/orders`), every
    /// `canary_every`-th with `x-canary: true`; their statuses.
    pub async fn orders(&self, n: usize, canary_every: usize) -> Vec<StatusCode> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let canary: &[(&str, &str)] = if canary_every > 0 && i % canary_every == 0 {
                &[("x-canary", "true")]
            } else {
                &[]
            };
            let reply = self
                .world
                .via_gateway(Method::POST, "/api/v1/orders", canary)
                .await;
            out.push(reply.map_or(StatusCode::BAD_GATEWAY, |(s, _)| s));
        }
        out
    }

    /// A request the AuthorizationPolicy denies: the gateway's `POST
    /// /api/v1/payments` (only order-service may pay); its status.
    pub async fn denied_payment(&self) -> Result<StatusCode, BoxError> {
        Ok(self
            .world
            .via_gateway(Method::POST, "/api/v1/payments", &[])
            .await?
            .0)
    }
}

/// Runs the story; returns every check (step number, check).
pub async fn run(options: Options) -> Result<Vec<(usize, Check)>, BoxError> {
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
    };
    println!(
        "Starting a CA (SVIDs live {SVID_LIFETIME}), order-service v1+v2, payment-service x2 (and later a\n\
         third replica without a sidecar), web-frontend,\n\
         a mesh-proxy sidecar for each and a mesh-proxy ingress gateway (TLS, api.example.com)"
    );
    let world = start_world().await?;
    let mut story = Story {
        checks: Vec::new(),
        step: 0,
    };
    step_mtls(&world, &progress, &mut story).await?;
    step_authz(&world, &progress, &mut story).await?;
    step_canary(&world, &progress, &mut story, options).await?;
    step_resilience(&world, &progress, &mut story, options).await?;
    step_observability(&world, &progress, &mut story).await?;
    step_rotation(&world, &progress, &mut story, options).await?;
    step_plain_replica(&world, &progress, &mut story, options).await?;

    println!("\nSummary");
    println!(
        "  {:<4} {:<52} {:<6} measured",
        "step", "expectation", "result"
    );
    for (step, c) in &story.checks {
        println!(
            "  {:<4} {:<52} {:<6} {}",
            step,
            c.name,
            if c.ok { "ok" } else { "FAILED" },
            c.detail
        );
    }
    if options.keep_running {
        keep_running(&world).await?;
    }
    Ok(story.checks)
}

async fn step_mtls(world: &World, progress: &Progress, story: &mut Story) -> Result<(), BoxError> {
    story.step = 1;
    progress.step(
        1,
        "STRICT mTLS: every hop is mutual TLS with SPIFFE identities",
    );
    let (status, body) = world
        .via_gateway(Method::POST, "/api/v1/orders", &[])
        .await?;
    println!(
        "  client --TLS, api.example.com--> istio-ingressgateway --> order-service --> payment-service"
    );
    println!("  answer: {status} {body}");
    story.check(
        "order placed end to end",
        status == StatusCode::OK,
        format!("POST /api/v1/orders answered {status}"),
    );
    // Who called whom, as each callee's sidecar recorded it.
    let mut hops = Vec::new();
    for i in world.orders.iter().chain(&world.payments) {
        for s in world.metrics(i.admin).await? {
            if s.get("reporter") == "destination" && s.get("response_code") == "200" {
                hops.push((
                    s.get("source_principal").to_owned(),
                    s.get("destination_principal").to_owned(),
                    s.get("connection_security_policy").to_owned(),
                ));
            }
        }
    }
    hops.sort();
    hops.dedup();
    for (src, dst, sec) in &hops {
        println!("  {src} -> {dst}  ({sec})");
    }
    let gw = "spiffe://cluster.local/ns/production/sa/istio-ingressgateway";
    let order = "spiffe://cluster.local/ns/production/sa/order-service";
    let payment = "spiffe://cluster.local/ns/production/sa/payment-service";
    let has = |a: &str, b: &str| {
        hops.iter()
            .any(|(s, d, sec)| s == a && d == b && sec == "mutual_tls")
    };
    story.check(
        "identities on each hop",
        has(gw, order) && has(order, payment),
        "gateway -> order-service -> payment-service, each over mutual_tls".into(),
    );
    let tcp = TcpStream::connect(world.payments[0].inbound).await?;
    let refused = crate::embedded::plaintext_refused(tcp).await;
    story.check(
        "plaintext refused",
        refused,
        format!(
            "plaintext HTTP to payment-service's sidecar: {}",
            if refused {
                "connection closed, no answer"
            } else {
                "answered"
            }
        ),
    );
    Ok(())
}

async fn step_authz(world: &World, progress: &Progress, story: &mut Story) -> Result<(), BoxError> {
    story.step = 2;
    progress.step(
        2,
        "Authorization: only order-service may POST to payment-service",
    );
    let (s1, _) = world
        .via_gateway(Method::POST, "/api/v1/payments", &[])
        .await?;
    println!("  istio-ingressgateway POST /api/v1/payments -> {s1}");
    let order = &world.orders[0];
    let host = "payment-service:8080";
    let (s2, b2) = world
        .via_sidecar(order, Method::GET, host, "/api/v1/payments", &[])
        .await?;
    println!(
        "  order-service        GET  /api/v1/payments -> {s2} {}",
        b2.trim()
    );
    let (s3, _) = world
        .via_sidecar(order, Method::POST, host, "/api/v1/payments", &[])
        .await?;
    println!("  order-service        POST /api/v1/payments -> {s3}");
    story.check(
        "unauthorized workload denied",
        s1 == StatusCode::FORBIDDEN,
        format!("the gateway's call answered {s1}"),
    );
    story.check(
        "GET denied",
        s2 == StatusCode::FORBIDDEN,
        format!("order-service's GET answered {s2}"),
    );
    story.check(
        "order-service's POST allowed",
        s3 == StatusCode::OK,
        format!("answered {s3}"),
    );
    Ok(())
}

async fn step_canary(
    world: &World,
    progress: &Progress,
    story: &mut Story,
    options: Options,
) -> Result<(), BoxError> {
    story.step = 3;
    progress.step(
        3,
        "Canary: order-service v2 at 5%, then 20 -> 50 -> 100 by rewriting the VirtualService",
    );
    println!(
        "  (web-frontend calls order-service through its sidecar: the VirtualService has no `gateways`, so it applies to mesh callers)"
    );
    let (c, n) = (options.concurrency, options.canary_requests);
    let fe = &world.frontend;
    let orders = |headers: &'static [(&'static str, &'static str)]| {
        move |_| {
            world.via_sidecar(
                fe,
                Method::POST,
                "order-service:8080",
                "/api/v1/orders",
                headers,
            )
        }
    };
    let v2_count = |replies: &[Reply]| {
        replies
            .iter()
            .filter(|r| matches!(r, Ok((_, b)) if field(b, "version") == Some("v2")))
            .count()
    };
    let replies = load_run(progress, "5% canary", n, c, orders(&[])).await;
    let (ok, v2) = (ok_count(&replies), v2_count(&replies));
    story.check(
        "5% to v2",
        ok == n && within(v2, n, 5.0),
        format!("{v2}/{n} = {:.1}% to v2", v2 as f64 * 100.0 / n as f64),
    );
    let replies = load_run(
        progress,
        "x-canary: true",
        50,
        c,
        orders(&[("x-canary", "true")]),
    )
    .await;
    let (ok, v2) = (ok_count(&replies), v2_count(&replies));
    story.check(
        "x-canary: true goes to v2",
        ok == 50 && v2 == 50,
        format!("{v2}/50 to v2"),
    );

    // Background traffic through the whole rollout: not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (failures, sent) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let background = {
        let (stop, failures, sent) = (stop.clone(), failures.clone(), sent.clone());
        let (plain, addr) = (world.plain.clone(), fe.outbound);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = Request::post(format!("http://{addr}/api/v1/orders"))
                    .header("host", "order-service:8080")
                    .body(body::empty())
                    .unwrap_or_default();
                let ok = match plain.request(req).await {
                    Ok(res) => text(res).await.is_ok_and(|(s, _)| s == StatusCode::OK),
                    Err(_) => false,
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let file = world.config_dir.join(CANARY_FILE);
    let original = std::fs::read_to_string(&file)?;
    for weight in [20u32, 50, 100] {
        let yaml = original
            .replace("weight: 95", &format!("weight: {}", 100 - weight))
            .replace("weight: 5\n", &format!("weight: {weight}\n"));
        let before = world.config_versions().await?;
        std::fs::write(&file, yaml)?;
        let took = world.await_reload(&before).await?;
        println!(
            "  {CANARY_FILE} rewritten: v1 {} / v2 {weight}; all 6 proxies reloaded in {} ms",
            100 - weight,
            took.as_millis()
        );
        let stage = n / 2;
        let replies = load_run(
            progress,
            &format!("rollout {weight}%"),
            stage,
            c,
            orders(&[]),
        )
        .await;
        let (ok, v2) = (ok_count(&replies), v2_count(&replies));
        let good = ok == stage
            && if weight == 100 {
                v2 == stage
            } else {
                within(v2, stage, f64::from(weight))
            };
        story.check(
            &format!("rollout {weight}%"),
            good,
            format!(
                "{:.1}% measured to v2 ({v2}/{stage})",
                v2 as f64 * 100.0 / stage as f64
            ),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = background.await;
    let (f, s) = (
        failures.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
    );
    story.check(
        "zero failed requests during the rollout",
        f == 0 && s > 0,
        format!("{f} failed of {s} sent in the background during 3 rewrites"),
    );
    let before = world.config_versions().await?;
    std::fs::write(&file, original)?;
    world.await_reload(&before).await?;
    Ok(())
}

async fn step_resilience(
    world: &World,
    progress: &Progress,
    story: &mut Story,
    options: Options,
) -> Result<(), BoxError> {
    story.step = 4;
    progress.step(4, "Resilience: payment-service replica b starts failing");
    let (c, r) = (options.concurrency, options.resilience_requests);
    let failing = &world.payments[1];
    let flip = r / 4;
    let hits_at_flip = Arc::new(AtomicU64::new(0));
    let replies = load_run(progress, "orders via the gateway", r, c, |i| {
        if i == flip {
            hits_at_flip.store(failing.hits.load(Ordering::Relaxed), Ordering::Relaxed);
            failing.failing.store(true, Ordering::Relaxed);
        }
        world.via_gateway(Method::POST, "/api/v1/orders", &[])
    })
    .await;
    println!("  request {flip} of {r}: replica b starts answering 503");
    let ok = ok_count(&replies);
    let after_flip = failing.hits.load(Ordering::Relaxed) - hits_at_flip.load(Ordering::Relaxed);
    // What the callers' sidecars say about replica b.
    let mut ejected_by = Vec::new();
    for o in &world.orders {
        let clusters = world.admin_json(o.admin, "/clusters?format=json").await?;
        let b = failing.inbound.to_string();
        let is_ejected = clusters["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|cl| {
                cl["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["address"] == b.as_str() && e["ejected"] == true)
            });
        if is_ejected {
            ejected_by.push(o.label());
        }
    }
    let mut p99: f64 = 0.0;
    for o in &world.orders {
        let stats = world.admin_json(o.admin, "/stats?format=json").await?;
        for s in stats.as_array().into_iter().flatten() {
            if s["destination"]
                .as_str()
                .is_some_and(|d| d.contains("payment-service"))
            {
                p99 = p99.max(s["p99"].as_f64().unwrap_or(0.0));
            }
        }
    }
    println!(
        "  replica b received {after_flip} requests after it broke; each caller retried them on replica a\n  \
         and ejected b after 5 consecutive 5xx (outlier detection is per calling proxy, as in Envoy)"
    );
    println!("  ejected by: {}", ejected_by.join(", "));
    story.check(
        "failing replica retried away",
        ok == r,
        format!(
            "success rate {:.1}% ({ok}/{r}), caller p99 {p99:.1} ms",
            ok as f64 * 100.0 / r as f64
        ),
    );
    story.check(
        "failing replica ejected",
        ejected_by.len() == world.orders.len() && after_flip <= (10 + c) as u64,
        format!(
            "b ejected by {} of {} callers after {after_flip} failures",
            ejected_by.len(),
            world.orders.len()
        ),
    );
    Ok(())
}

async fn step_observability(
    world: &World,
    progress: &Progress,
    story: &mut Story,
) -> Result<(), BoxError> {
    story.step = 5;
    progress.step(5, "Observability: Istio metrics, percentiles, one trace");
    // The service graph as Kiali draws it, from every proxy's Istio metrics: Kiali's
    // queries and rules (crate::graph) on the counters, rates over the run so far.
    let mut rows = Vec::new();
    for (_, addr) in world.admins() {
        let text = world.admin(addr, Method::GET, "/metrics").await?;
        rows.extend(graph::rows_from_exposition(&text, NS));
    }
    let seconds = world.started.elapsed().as_secs_f64().max(1.0);
    for row in &mut rows {
        row.value /= seconds;
    }
    let graph = Graph::from_rows(&rows);
    println!(
        "  service graph of {NS} as Kiali draws it (nodes: workload (app version); rate over {seconds:.0} s):"
    );
    for line in graph.to_string().lines() {
        println!("    {line}");
    }
    println!("  latency per destination (ms), from each proxy's /stats:");
    println!(
        "    {:<24} {:<52} {:>6} {:>6} {:>6} {:>6}",
        "proxy", "destination", "count", "p50", "p90", "p99"
    );
    let mut histograms = 0;
    for (name, addr) in world.admins() {
        let stats = world.admin_json(addr, "/stats?format=json").await?;
        for s in stats
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["count"].as_u64().unwrap_or(0) > 0)
        {
            histograms += 1;
            println!(
                "    {name:<24} {:<52} {:>6} {:>6.1} {:>6.1} {:>6.1}",
                s["destination"].as_str().unwrap_or(""),
                s["count"],
                s["p50"].as_f64().unwrap_or(0.0),
                s["p90"].as_f64().unwrap_or(0.0),
                s["p99"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let expected = [
        ("istio-ingressgateway", "order-service-v1"),
        ("istio-ingressgateway", "order-service-v2"),
        ("order-service-v1", "payment-service-v1"),
        ("order-service-v2", "payment-service-v1"),
    ];
    let missing: Vec<String> = expected
        .iter()
        .filter(|(from, to)| graph.edge(from, to).is_none_or(|t| t.rate <= 0.0))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    let unknown = graph
        .edges
        .keys()
        .filter(|(s, d)| s.is_unknown() || d.is_unknown())
        .count();
    story.check(
        "service graph: every edge, no unknown node",
        missing.is_empty() && unknown == 0 && graph.dropped.is_empty(),
        if missing.is_empty() {
            format!(
                "{} edges, {unknown} unknown, {} dropped",
                graph.edges.len(),
                graph.dropped.len()
            )
        } else {
            format!("missing {}", missing.join(", "))
        },
    );
    let denied = graph
        .edge("istio-ingressgateway", "payment-service-v1")
        .map_or(0.0, Traffic::error_percent);
    story.check(
        "error rate on the denied edge",
        denied >= 99.9,
        format!("istio-ingressgateway -> payment-service-v1: {denied:.0} % errors (403)"),
    );
    story.check(
        "percentiles per service",
        histograms >= 4,
        format!("{histograms} histograms"),
    );

    // One trace: the client starts it, every proxy adds its spans and exports them to
    // the Zipkin collector (batches leave every 5 s).
    let trace_id = format!("{:032x}", rand_id());
    let span_id = format!("{:016x}", rand_id() as u64);
    let (status, _) = world
        .via_gateway(
            Method::POST,
            "/api/v1/orders",
            &[
                ("x-b3-traceid", &trace_id),
                ("x-b3-spanid", &span_id),
                ("x-b3-sampled", "1"),
            ],
        )
        .await?;
    let mut trace: Vec<Value> = Vec::new();
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trace = world
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| s["traceId"].as_str() == Some(trace_id.as_str()))
            .cloned()
            .collect();
        if trace.len() >= 4 {
            break;
        }
    }
    trace.sort_by_key(|s| s["timestamp"].as_u64().unwrap_or(0));
    println!("  trace {trace_id} ({status}), exported by the proxies to a Zipkin collector:");
    let parents: HashMap<String, String> = trace
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or("").to_owned(),
                s["parentId"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for s in &trace {
        let mut depth = 0;
        let mut p = s["parentId"].as_str().unwrap_or("").to_owned();
        while let Some(next) = parents.get(&p) {
            depth += 1;
            p = next.clone();
        }
        println!(
            "    {}{:<7} {:<36} {:<34} {:>7.2} ms",
            "  ".repeat(depth),
            s["kind"].as_str().unwrap_or(""),
            s["name"].as_str().unwrap_or(""),
            s["localEndpoint"]["serviceName"].as_str().unwrap_or(""),
            s["duration"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
    let services: std::collections::BTreeSet<&str> = trace
        .iter()
        .filter_map(|s| s["localEndpoint"]["serviceName"].as_str())
        .collect();
    story.check(
        "one trace across all hops",
        services.len() >= 3 && trace.len() >= 4,
        format!(
            "{} spans from {} proxies in one trace",
            trace.len(),
            services.len()
        ),
    );
    Ok(())
}

fn rand_id() -> u128 {
    use std::hash::{BuildHasher, RandomState};
    let a = RandomState::new().hash_one(1u8);
    let b = RandomState::new().hash_one(2u8);
    (u128::from(a) << 64) | u128::from(b)
}

async fn step_rotation(
    world: &World,
    progress: &Progress,
    story: &mut Story,
    options: Options,
) -> Result<(), BoxError> {
    story.step = 6;
    progress.step(6, "Certificate rotation during traffic");
    let (c, r) = (options.concurrency, options.resilience_requests);
    let (payment, order) = (&world.payments[0], &world.orders[0]);
    let serial = |addr| async move {
        let certs = world.admin_json(addr, "/certs").await?;
        Ok::<_, BoxError>(certs["serial"].as_str().unwrap_or("").to_owned())
    };
    let before = (serial(payment.admin).await?, serial(order.admin).await?);
    let rotations = (r / 3, 2 * r / 3);
    let replies = load_run(progress, "payments during rotation", r, c, |i| async move {
        if i == rotations.0 || i == rotations.1 {
            world.admin(payment.admin, Method::POST, "/rotate").await?;
            world.admin(order.admin, Method::POST, "/rotate").await?;
        }
        world
            .via_sidecar(
                order,
                Method::POST,
                "payment-service:8080",
                "/api/v1/payments",
                &[],
            )
            .await
    })
    .await;
    let ok = ok_count(&replies);
    let after = (serial(payment.admin).await?, serial(order.admin).await?);
    println!("  payment-service serial {} -> {}", before.0, after.0);
    println!("  order-service   serial {} -> {}", before.1, after.1);
    // A new handshake sees the new certificate.
    let tcp = TcpStream::connect(payment.inbound).await?;
    let client = CertStore::from_issued(&world.ca.issue(NS, "order-service")?)?;
    let naming = SecureNaming::only(mesh_core::Identity::parse(
        "spiffe://cluster.local/ns/production/sa/payment-service",
    )?);
    let (_, seen) = ClientTls::new(client)
        .connect(tcp, "payment-service", &naming)
        .await?;
    // The SVIDs also rotate on their own at half-life; accept the serial current on
    // either side of the handshake.
    let latest = serial(payment.admin).await?;
    story.check(
        "certificates rotated",
        before.0 != after.0
            && before.1 != after.1
            && (seen.serial.to_string() == after.0 || seen.serial.to_string() == latest),
        format!(
            "a new handshake to payment-service presents serial {}",
            seen.serial
        ),
    );
    story.check(
        "zero errors during rotation",
        ok == r,
        format!("{ok}/{r} payments answered 200 across 2 rotations"),
    );
    Ok(())
}

/// A payment-service replica without a sidecar joins the ServiceEntry: no
/// `serviceAccount`, no `security.istio.io/tlsMode` label, so auto-mTLS (no `tls` in
/// the article's DestinationRule) sends it plaintext while the others keep mTLS.
async fn step_plain_replica(
    world: &World,
    progress: &Progress,
    story: &mut Story,
    options: Options,
) -> Result<(), BoxError> {
    story.step = 7;
    progress.step(
        7,
        "Plain upstreams: a payment-service replica without a sidecar",
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    // Lives as long as the demo (`--keep-running` included).
    let _replica = serve_plain(
        listener,
        app_service(
            "payment-service",
            "v1",
            "c",
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            None,
            world.plain.clone(),
        ),
    );
    let mut payments = world.payment_entries.clone();
    payments.push(EntryEndpoint {
        address,
        labels: BTreeMap::from([
            ("app".into(), "payment-service".into()),
            ("version".into(), "v1".into()),
        ]),
        service_account: String::new(),
    });
    let before = world.config_versions().await?;
    write_entries(&world.config_dir, &world.order_entry, &payments)?;
    world.await_reload(&before).await?;
    println!(
        "  replica c: plain HTTP on {address}, no sidecar, no serviceAccount; ServiceEntry rewritten, all proxies reloaded"
    );
    let (c, r) = (options.concurrency, options.resilience_requests / 2);
    let order = &world.orders[0];
    let replies = load_run(progress, "payments from order-service", r, c, |_| {
        world.via_sidecar(
            order,
            Method::POST,
            "payment-service:8080",
            "/api/v1/payments",
            &[],
        )
    })
    .await;
    let ok = ok_count(&replies);
    let by_c = replies
        .iter()
        .filter(|r| matches!(r, Ok((_, b)) if field(b, "replica") == Some("c")))
        .count();
    println!(
        "  {by_c} of {r} payments answered by replica c over plaintext, the others by the sidecars over mutual_tls"
    );
    story.check(
        "auto-mTLS reaches a replica without a sidecar",
        ok == r && by_c > 0 && by_c < r,
        format!("{ok}/{r} answered 200, {by_c} by the plain replica"),
    );
    Ok(())
}

async fn keep_running(world: &World) -> Result<(), BoxError> {
    let root = world.scratch.path().join("root-cert.pem");
    std::fs::write(&root, world.ca.root_pem())?;
    let port = world.gateway.port();
    println!(
        "\nEverything stays up. The gateway serves https://api.example.com on 127.0.0.1:{port}:"
    );
    println!(
        "  curl -s --cacert {} --resolve api.example.com:{port}:127.0.0.1 -X POST https://api.example.com:{port}/api/v1/orders",
        root.display()
    );
    println!("Admin servers (/metrics /stats /clusters /certs /config_dump; POST /rotate):");
    for (name, addr) in world.admins() {
        println!("  {name:<28} http://{addr}/metrics");
    }
    println!(
        "Istio YAML (edit it, the proxies reload): {}",
        world.config_dir.display()
    );
    println!(
        "A Prometheus configuration scraping every proxy (then Kiali and Istio's Grafana\n\
         dashboards read that Prometheus):\n"
    );
    print!("{}", graph::scrape_config(&world.admins(), 5));
    println!();
    println!("Press Ctrl-C to stop.");
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}
