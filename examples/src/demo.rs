//! The article's scenario, live on loopback: the story behind the `sidecar` program.
//!
//! A CA with short-lived certificates, order-service v1 and v2, payment-service (two
//! replicas, one of which starts failing), web-frontend (a mesh client), a sidecar for
//! each, and an ingress gateway with TLS. Configuration is the article's YAML in
//! `examples/sidecar/config/`, copied to a scratch directory with one generated
//! ServiceEntry (where the loopback replicas listen); the rollout rewrites the
//! VirtualService file there and reloads.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait_free::Exporter;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::body::{self, BoxBody};
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_core::error::BoxError;
use mesh_telemetry::trace::export::{ExportConfig, ExportCounters, SpanQueue, SpanRecord};
use mesh_telemetry::{Telemetry, Workload};
use mesh_tls::{
    BuiltInIssuer, CertStore, CertificateAuthority, ClientTls, LeafSpec, SecureNaming, SourceHandle,
};
use tokio::net::TcpStream;
use tower::util::BoxCloneSyncService;

use crate::embedded::Check;
use crate::local::{LocalGateway, LocalSidecar, SidecarSpec, XFCC, text};
use crate::proxyless::WorkloadId;
use crate::proxyless::connect::MeshConn;
use crate::scenario::{EntryEndpoint, service_entry_yaml};

/// How much traffic each step sends.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Requests for the canary measurement (the rollout sends this many per stage).
    pub canary_requests: usize,
    /// Requests through the failing replica's phase.
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

mod async_trait_free {
    use super::*;
    use mesh_telemetry::trace::export::{ExportFuture, ExportSpans};

    /// Keeps exported spans in memory so the demo can print one trace.
    #[derive(Clone, Debug, Default)]
    pub struct Exporter(pub Arc<Mutex<Vec<SpanRecord>>>);

    impl ExportSpans for Exporter {
        fn export(&self, batch: Vec<SpanRecord>) -> ExportFuture<'_> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(batch);
            Box::pin(std::future::ready(Ok(())))
        }
    }
}

/// Prints step headers and a progress bar (when standard error is a terminal).
#[derive(Debug)]
struct Progress {
    tty: bool,
}

impl Progress {
    fn step(&self, n: usize, title: &str) {
        println!("\n[{n}/6] {title}");
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

/// One service instance: its application and its sidecar.
#[derive(Debug)]
struct Instance {
    name: String,
    version: String,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    sidecar: LocalSidecar,
    _issuer: SourceHandle,
    _app: tokio::task::JoinHandle<()>,
}

/// Everything the story runs on.
struct World {
    ca: Arc<CertificateAuthority>,
    config_dir: PathBuf,
    _scratch: tempfile::TempDir,
    orders: Vec<Instance>,
    payments: Vec<Instance>,
    frontend: Instance,
    gateway: LocalGateway,
    _gateway_issuer: SourceHandle,
    client: Client<GatewayConnector, BoxBody>,
    plain: Client<HttpConnector, BoxBody>,
    spans: Exporter,
    queues: Vec<SpanQueue>,
}

/// Short certificate lifetimes, so that rotation is part of the run.
const SVID_TTL: Duration = Duration::from_secs(60);

fn load(dir: &Path) -> Result<MeshConfig, BoxError> {
    let options = LoadOptions {
        default_namespace: NS.into(),
        ..LoadOptions::default()
    };
    MeshConfig::load(&[dir], &options)
        .map(|(c, _)| c)
        .map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
                .into()
        })
}

fn telemetry(
    name: &str,
    app: &str,
    version: &str,
    ns: &str,
    store: &CertStore,
    spans: &SpanQueue,
) -> Telemetry {
    let mut w = Workload::new(name, ns);
    w.app = app.into();
    w.canonical_service = app.into();
    w.version = version.into();
    w.canonical_revision = version.into();
    w.principal = Some(store.identity());
    Telemetry::builder(w)
        .sampling(100.0)
        .spans(spans.clone())
        .build()
}

fn issued_store(
    ca: &Arc<CertificateAuthority>,
    ns: &str,
    sa: &str,
) -> Result<(Arc<CertStore>, SourceHandle), BoxError> {
    let issuer = BuiltInIssuer::new(ca.clone(), ns, sa).with_ttl(SVID_TTL);
    let store = CertStore::from_issuer(&issuer)?;
    let handle = store.spawn_issuer(issuer);
    Ok((store, handle))
}

/// The applications: plain HTTP on loopback, unaware of the mesh except for
/// propagating trace headers (as Istio asks applications to do).
fn app_service(
    app: &'static str,
    version: String,
    name: String,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
    outbound: Option<SocketAddr>,
    plain: Client<HttpConnector, BoxBody>,
) -> BoxCloneSyncService<Request<Incoming>, Response<BoxBody>, std::convert::Infallible> {
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Incoming>| {
        hits.fetch_add(1, Ordering::Relaxed);
        let caller = req
            .headers()
            .get(XFCC)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("URI=").nth(1))
            .unwrap_or("")
            .to_owned();
        let (failing, version, name, plain) = (
            failing.load(Ordering::Relaxed),
            version.clone(),
            name.clone(),
            plain.clone(),
        );
        async move {
            if failing {
                let mut res = Response::new(body::full("replica failing"));
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return Ok(res);
            }
            let mut json = format!(
                "{{\"service\":\"{app}\",\"version\":\"{version}\",\"replica\":\"{name}\",\"caller\":\"{caller}\""
            );
            let mut status = StatusCode::OK;
            if let Some(outbound) = outbound {
                // order-service calls payment-service through its sidecar.
                let mut call = Request::post(format!("http://{outbound}/api/v1/payments"))
                    .header("host", "payment-service:8080")
                    .header("content-type", "application/json")
                    .body(body::full("{\"amount\":\"9.99\"}"))
                    .unwrap_or_default();
                mesh_telemetry::trace::forward_trace_headers(req.headers(), call.headers_mut());
                match plain.request(call).await {
                    Ok(res) => {
                        let (s, b) = text(res)
                            .await
                            .unwrap_or((StatusCode::BAD_GATEWAY, String::new()));
                        if s != StatusCode::OK {
                            status = StatusCode::BAD_GATEWAY;
                        }
                        json.push_str(&format!(
                            ",\"payment_status\":{},\"payment\":{}",
                            s.as_u16(),
                            if b.starts_with('{') {
                                b
                            } else {
                                format!("\"{b}\"")
                            }
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

/// One application instance to start.
struct InstanceSpec {
    app: &'static str,
    version: &'static str,
    name: &'static str,
    calls_payment: bool,
}

async fn start_instance(
    world_ca: &Arc<CertificateAuthority>,
    config: &MeshConfig,
    spec: InstanceSpec,
    plain: &Client<HttpConnector, BoxBody>,
    spans: &SpanQueue,
) -> Result<Instance, BoxError> {
    let InstanceSpec {
        app,
        version,
        name,
        calls_payment,
    } = spec;
    let (store, issuer) = issued_store(world_ca, NS, app)?;
    let failing = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    // Reserve the application's port first: the sidecar forwards there, and the
    // application calls the sidecar's outbound listener.
    let app_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app_listener.local_addr()?;
    drop(app_listener);
    let workload = WorkloadId {
        namespace: NS.into(),
        labels: BTreeMap::from([
            ("app".into(), app.into()),
            ("version".into(), version.into()),
        ]),
        service_host: format!("{app}.{NS}.svc.cluster.local"),
    };
    let tel = telemetry(&format!("{app}-{version}"), app, version, NS, &store, spans);
    let sidecar = LocalSidecar::start(
        config,
        SidecarSpec {
            workload,
            app: app_addr,
            store,
            telemetry: tel,
        },
    )
    .await?;
    let svc = app_service(
        app,
        version.into(),
        name.into(),
        failing.clone(),
        hits.clone(),
        calls_payment.then_some(sidecar.outbound),
        plain.clone(),
    );
    let listener = tokio::net::TcpListener::bind(app_addr).await?;
    let app_task = tokio::spawn(async move {
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
    });
    Ok(Instance {
        name: name.into(),
        version: version.into(),
        failing,
        hits,
        sidecar,
        _issuer: issuer,
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
    type Response = MeshConn;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<MeshConn, BoxError>> + Send>>;

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
            Ok(MeshConn::Tls(Box::new(TokioIo::new(tls))))
        })
    }
}

async fn build_world(scratch: tempfile::TempDir) -> Result<World, BoxError> {
    let ca = Arc::new(CertificateAuthority::new("cluster.local")?);
    let config_dir = scratch.path().join("istio");
    std::fs::create_dir_all(&config_dir)?;
    for entry in std::fs::read_dir(crate::demo::config_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml")
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, config_dir.join(name))?;
        }
    }
    let config = load(&config_dir)?;
    let spans = Exporter::default();
    let queue_config = ExportConfig {
        interval: Duration::from_millis(200),
        ..ExportConfig::default()
    };
    let mut queues = Vec::new();
    let mut queue = || {
        let q = SpanQueue::spawn(spans.clone(), queue_config, ExportCounters::default());
        queues.push(q.clone());
        q
    };
    let plain = crate::local::plain_client();
    let spec = |app, version, name, calls_payment| InstanceSpec {
        app,
        version,
        name,
        calls_payment,
    };
    let mut orders = Vec::new();
    for v in ["v1", "v2"] {
        let s = spec("order-service", v, v, true);
        orders.push(start_instance(&ca, &config, s, &plain, &queue()).await?);
    }
    let mut payments = Vec::new();
    for r in ["a", "b"] {
        let s = spec("payment-service", "v1", r, false);
        payments.push(start_instance(&ca, &config, s, &plain, &queue()).await?);
    }
    let s = spec("web-frontend", "v1", "web", false);
    let frontend = start_instance(&ca, &config, s, &plain, &queue()).await?;

    // Where the loopback replicas listen: the only YAML the demo adds.
    let entry = |list: &[Instance], sa: &str| -> Vec<EntryEndpoint> {
        list.iter()
            .map(|i| EntryEndpoint {
                address: i.sidecar.inbound,
                labels: BTreeMap::from([
                    ("app".into(), sa.into()),
                    ("version".into(), i.version.clone()),
                ]),
                service_account: sa.into(),
            })
            .collect()
    };
    let yaml = format!(
        "{}---\n{}",
        service_entry_yaml("order-service", NS, 8080, &entry(&orders, "order-service")),
        service_entry_yaml(
            "payment-service",
            NS,
            8080,
            &entry(&payments, "payment-service")
        ),
    );
    std::fs::write(config_dir.join("zz-loopback-service-entries.yaml"), yaml)?;
    let config = load(&config_dir)?;
    for i in orders.iter().chain(&payments).chain([&frontend]) {
        i.sidecar.reload(&config)?;
    }

    let (gw_store, gw_issuer) = issued_store(&ca, "istio-system", "istio-ingressgateway")?;
    let server_cert = ca.issue_with(
        &LeafSpec::workload("cluster.local", "istio-system", "istio-ingressgateway")
            .with_dns("api.example.com"),
    )?;
    let gw_tel = telemetry(
        "istio-ingressgateway",
        "istio-ingressgateway",
        "v1",
        "istio-system",
        &gw_store,
        &queue(),
    );
    let gateway =
        LocalGateway::start(&config, NS, "api-gateway", gw_store, &server_cert, gw_tel).await?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.root_der().clone())?;
    let tls = rustls::ClientConfig::builder_with_provider(mesh_tls::provider())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = Client::builder(TokioExecutor::new()).build(GatewayConnector {
        address: gateway.address,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
    });
    Ok(World {
        ca,
        config_dir,
        _scratch: scratch,
        orders,
        payments,
        frontend,
        gateway,
        _gateway_issuer: gw_issuer,
        client,
        plain,
        spans,
        queues,
    })
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

    /// A request sent by `from`'s application through its sidecar to `host`.
    async fn via_sidecar(
        &self,
        from: &LocalSidecar,
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

    fn reload_all(&self) -> Result<(), BoxError> {
        let config = load(&self.config_dir)?;
        for i in self
            .orders
            .iter()
            .chain(&self.payments)
            .chain([&self.frontend])
        {
            i.sidecar.reload(&config)?;
        }
        self.gateway.reload(&config)
    }

    fn admin_urls(&self) -> Vec<(String, SocketAddr)> {
        let mut out = vec![("istio-ingressgateway".to_owned(), self.gateway.admin)];
        for i in self
            .orders
            .iter()
            .chain(&self.payments)
            .chain([&self.frontend])
        {
            out.push((
                format!("{}-{}", i.sidecar.spec.workload.labels["app"], i.name),
                i.sidecar.admin,
            ));
        }
        out
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

/// Whether `hits` out of `n` is within 4.5 standard deviations of `percent`.
fn within(hits: usize, n: usize, percent: f64) -> bool {
    let p = percent / 100.0;
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (hits as f64 - mean).abs() <= 4.5 * sd + 1.0
}

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

/// Runs the story; returns every check (step number, check).
pub async fn run(options: Options) -> Result<Vec<(usize, Check)>, BoxError> {
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
    };
    println!(
        "Starting: CA (SVIDs live {}s), order-service v1+v2, payment-service x2, web-frontend, a sidecar each, ingress gateway (TLS)",
        SVID_TTL.as_secs()
    );
    let world = build_world(tempfile::tempdir()?).await?;
    let mut story = Story {
        checks: Vec::new(),
        step: 0,
    };
    let c = options.concurrency;

    // 1. STRICT mTLS.
    story.step = 1;
    progress.step(
        1,
        "STRICT mTLS: every hop is mutual TLS with SPIFFE identities",
    );
    let (status, body) = world
        .via_gateway(Method::POST, "/api/v1/orders", &[])
        .await?;
    let order_caller = field(&body, "caller").unwrap_or("").to_owned();
    let payment_caller = body
        .split("\"payment\":")
        .nth(1)
        .and_then(|p| field(p, "caller"))
        .unwrap_or("")
        .to_owned();
    println!("  client --TLS (api.example.com)--> istio-ingressgateway");
    println!("  istio-ingressgateway --mTLS--> order-service    caller seen: {order_caller}");
    println!("  order-service --mTLS--> payment-service          caller seen: {payment_caller}");
    story.check(
        "order placed through gateway, order-service and payment-service",
        status == StatusCode::OK,
        format!("POST /api/v1/orders answered {status}"),
    );
    story.check(
        "identities on each hop",
        order_caller == "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway"
            && payment_caller == "spiffe://cluster.local/ns/production/sa/order-service",
        "gateway -> order-service -> payment-service carry their SPIFFE IDs".into(),
    );
    let tcp = TcpStream::connect(world.payments[0].sidecar.inbound).await?;
    let refused = crate::embedded::plaintext_refused(tcp).await;
    story.check(
        "plaintext refused",
        refused,
        format!(
            "plaintext HTTP to payment-service's sidecar: {}",
            if refused {
                "connection closed, no answer"
            } else {
                "answered!"
            }
        ),
    );

    // 2. Authorization.
    story.step = 2;
    progress.step(
        2,
        "Authorization: only order-service may POST to payment-service",
    );
    let (s1, _) = world
        .via_gateway(Method::POST, "/api/v1/payments", &[])
        .await?;
    println!("  istio-ingressgateway POST /api/v1/payments -> {s1}");
    let order = &world.orders[0].sidecar;
    let (s2, _) = world
        .via_sidecar(
            order,
            Method::GET,
            "payment-service:8080",
            "/api/v1/payments",
            &[],
        )
        .await?;
    println!("  order-service        GET  /api/v1/payments -> {s2}");
    let (s3, _) = world
        .via_sidecar(
            order,
            Method::POST,
            "payment-service:8080",
            "/api/v1/payments",
            &[],
        )
        .await?;
    println!("  order-service        POST /api/v1/payments -> {s3}");
    story.check(
        "unauthorized workload denied",
        s1 == StatusCode::FORBIDDEN,
        format!("gateway's call answered {s1}"),
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

    // 3. Canary and progressive rollout.
    story.step = 3;
    progress.step(
        3,
        "Canary: order-service v2 at 5%, then 20 -> 50 -> 100 by rewriting the VirtualService",
    );
    println!(
        "  (web-frontend calls order-service through its sidecar: the VirtualService applies to mesh callers)"
    );
    let fe = &world.frontend.sidecar;
    let n = options.canary_requests;
    let split = |replies: &[Reply]| -> (usize, usize) {
        let ok = replies
            .iter()
            .filter(|r| matches!(r, Ok((s, _)) if *s == StatusCode::OK))
            .count();
        let v2 = replies
            .iter()
            .filter(|r| matches!(r, Ok((_, b)) if field(b, "version") == Some("v2")))
            .count();
        (ok, v2)
    };
    let replies = load_run(&progress, "5% canary", n, c, |_| {
        world.via_sidecar(
            fe,
            Method::POST,
            "order-service:8080",
            "/api/v1/orders",
            &[],
        )
    })
    .await;
    let (ok, v2) = split(&replies);
    story.check(
        "5% to v2",
        ok == n && within(v2, n, 5.0),
        format!(
            "{v2}/{n} = {:.1}% to v2, {ok} ok",
            v2 as f64 * 100.0 / n as f64
        ),
    );
    let replies = load_run(&progress, "x-canary: true", 50, c, |_| {
        world.via_sidecar(
            fe,
            Method::POST,
            "order-service:8080",
            "/api/v1/orders",
            &[("x-canary", "true")],
        )
    })
    .await;
    let (ok, v2) = split(&replies);
    story.check(
        "x-canary: true goes to v2",
        ok == 50 && v2 == 50,
        format!("{v2}/50 to v2"),
    );

    // Background traffic through the whole rollout: not one request may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
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
        std::fs::write(&file, yaml)?;
        world.reload_all()?;
        println!(
            "  {CANARY_FILE} rewritten: v1 {} / v2 {weight}, reloaded",
            100 - weight
        );
        let stage = n / 2;
        let replies = load_run(&progress, &format!("rollout {weight}%"), stage, c, |_| {
            world.via_sidecar(
                fe,
                Method::POST,
                "order-service:8080",
                "/api/v1/orders",
                &[],
            )
        })
        .await;
        let (ok, v2) = split(&replies);
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
        format!("{f} failed of {s} sent in the background while the file was rewritten 3 times"),
    );
    std::fs::write(&file, original)?;
    world.reload_all()?;

    // 4. Resilience.
    story.step = 4;
    progress.step(4, "Resilience: payment-service replica b starts failing");
    let r = options.resilience_requests;
    let failing = &world.payments[1];
    let before_hits = failing.hits.load(Ordering::Relaxed);
    let flip = r / 4;
    let hits_at_flip = Arc::new(AtomicU64::new(0));
    let replies = load_run(&progress, "orders via gateway", r, c, |i| {
        if i == flip {
            hits_at_flip.store(failing.hits.load(Ordering::Relaxed), Ordering::Relaxed);
            failing.failing.store(true, Ordering::Relaxed);
            println!("  request {flip}: replica b starts answering 503");
        }
        world.via_gateway(Method::POST, "/api/v1/orders", &[])
    })
    .await;
    let _ = before_hits;
    let ok = replies
        .iter()
        .filter(|r| matches!(r, Ok((s, _)) if *s == StatusCode::OK))
        .count();
    let after_flip = failing.hits.load(Ordering::Relaxed) - hits_at_flip.load(Ordering::Relaxed);
    let answered_503 = world.payments[1].sidecar.spec.telemetry.encode_metrics();
    let b_503 = answered_503
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_code=\"503\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    let order_tel = &world
        .orders
        .iter()
        .map(|o| o.sidecar.spec.telemetry.latency().snapshot())
        .collect::<Vec<_>>();
    let p99 = order_tel
        .iter()
        .flatten()
        .filter(|s| s.destination.contains("payment-service"))
        .map(|s| s.p99)
        .fold(0.0, f64::max);
    println!(
        "  replica b answered 503 {b_503} times: each order-service sidecar (v1, v2) retried those calls on replica a \
         and ejected b after 5 consecutive 5xx (outlier detection is per caller, as in Envoy)"
    );
    story.check(
        "failing replica retried away",
        ok == r,
        format!(
            "success rate {:.1}% ({ok}/{r})",
            ok as f64 * 100.0 / r as f64
        ),
    );
    story.check("failing replica ejected", (5.0..=10.0 + c as f64).contains(&b_503) && after_flip as f64 == b_503, format!("consecutive5xxErrors: 5 per caller x 2 callers; b saw {after_flip} requests after it broke"));
    println!("  caller (order-service -> payment-service) p99: {p99:.1} ms");

    // 5. Observability.
    story.step = 5;
    progress.step(5, "Observability: Istio metrics, percentiles, one trace");
    let mut totals: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    let all_tel: Vec<&Telemetry> = world
        .orders
        .iter()
        .chain(&world.payments)
        .chain([&world.frontend])
        .map(|i| &i.sidecar.spec.telemetry)
        .chain([&world.gateway.telemetry])
        .collect();
    for t in &all_tel {
        for l in t
            .encode_metrics()
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
        {
            let label = |k: &str| {
                l.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_owned()
            };
            let v = l
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            *totals
                .entry((
                    label("reporter"),
                    label("source_workload"),
                    label("destination_service"),
                    label("response_code"),
                ))
                .or_default() += v;
        }
    }
    println!(
        "  istio_requests_total{{reporter=\"source\"}} by source_workload, destination_service, response_code:"
    );
    for ((_, src, dst, code), v) in totals.iter().filter(|((rep, ..), _)| rep == "source") {
        println!("    {src:<22} -> {dst:<48} {code}  {v}");
    }
    println!("  latency (ms) per service, as each proxy measured it:");
    println!(
        "    {:<22} {:<56} {:>6} {:>6} {:>6} {:>6}",
        "proxy", "destination", "count", "p50", "p90", "p99"
    );
    let mut n_stats = 0;
    for t in &all_tel {
        for s in t.latency().snapshot().into_iter().filter(|s| s.count > 0) {
            n_stats += 1;
            println!(
                "    {:<22} {:<56} {:>6} {:>6.1} {:>6.1} {:>6.1}",
                t.workload().name,
                s.destination,
                s.count,
                s.p50,
                s.p90,
                s.p99
            );
        }
    }
    story.check(
        "istio_requests_total by source, destination, code",
        totals.keys().any(|(r, s, d, c)| {
            r == "source" && s == "order-service-v1" && d == "payment-service" && c == "200"
        }) && totals
            .keys()
            .any(|(_, _, d, c)| d == "payment-service" && c == "403"),
        format!("{} series", totals.len()),
    );
    story.check(
        "percentiles per service",
        n_stats >= 3,
        format!("{n_stats} histograms"),
    );
    let (_, body) = world
        .via_gateway(Method::POST, "/api/v1/orders", &[("x-b3-sampled", "1")])
        .await?;
    let _ = body;
    for q in &world.queues {
        q.flush().await;
    }
    let spans = world
        .spans
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut by_trace: HashMap<u128, Vec<SpanRecord>> = HashMap::new();
    for s in spans {
        by_trace.entry(s.trace_id).or_default().push(s);
    }
    let trace = by_trace
        .into_values()
        .max_by_key(|v| (v.len(), v.iter().map(|s| s.start).max()));
    let hops = trace.as_ref().map_or(0, Vec::len);
    if let Some(mut t) = trace {
        t.sort_by_key(|s| s.start);
        println!("  one trace, {:032x}:", t[0].trace_id);
        let parents: HashMap<u64, Option<u64>> =
            t.iter().map(|s| (s.span_id, s.parent_span_id)).collect();
        for s in &t {
            let mut depth = 0;
            let mut p = s.parent_span_id;
            while let Some(id) = p {
                depth += 1;
                p = parents.get(&id).copied().flatten();
            }
            let who = s
                .attributes
                .iter()
                .find(|(k, _)| *k == "node_id" || *k == "istio.canonical_service")
                .map_or("", |(_, v)| v.as_str());
            println!(
                "    {}{:?} {:<40} {who:<28} {:>6.1} ms",
                "  ".repeat(depth),
                s.kind,
                s.name,
                s.duration.as_secs_f64() * 1000.0
            );
        }
    }
    story.check(
        "one trace across all hops",
        hops >= 5,
        format!("{hops} spans in one trace (gateway, order-service in/out, payment-service)"),
    );

    // 6. Certificate rotation during traffic.
    story.step = 6;
    progress.step(6, "Certificate rotation during traffic");
    let payment_store = world.payments[0].sidecar.spec.store.clone();
    let order_store = world.orders[0].sidecar.spec.store.clone();
    let before = (payment_store.serial(), order_store.serial());
    let rotations = Arc::new(AtomicU64::new(0));
    let replies = load_run(&progress, "orders during rotation", r, c, |i| {
        if i == r / 3 || i == 2 * r / 3 {
            payment_store.rotate_now();
            order_store.rotate_now();
            rotations.fetch_add(1, Ordering::Relaxed);
        }
        // Payment-service's healthy replica only: b is still failing (and ejected).
        world.via_sidecar(
            &world.orders[0].sidecar,
            Method::POST,
            "payment-service:8080",
            "/api/v1/payments",
            &[],
        )
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ok = replies
        .iter()
        .filter(|r| matches!(r, Ok((s, _)) if *s == StatusCode::OK))
        .count();
    let after = (payment_store.serial(), order_store.serial());
    // A new handshake sees the new certificate.
    let tcp = TcpStream::connect(world.payments[0].sidecar.inbound).await?;
    let naming = SecureNaming::only(payment_store.identity());
    let (_, seen) = ClientTls::new(order_store.clone())
        .connect(tcp, "payment-service", &naming)
        .await?;
    println!(
        "  payment-service serial {} -> {} ; order-service serial {} -> {}",
        before.0, after.0, before.1, after.1
    );
    story.check(
        "certificates rotated",
        before.0 != after.0 && before.1 != after.1 && seen.serial == after.0,
        format!("a new handshake presents serial {}", seen.serial),
    );
    story.check(
        "zero errors during rotation",
        ok == r,
        format!("{ok}/{r} requests answered 200"),
    );

    // Summary.
    println!("\nSummary");
    println!(
        "  {:<4} {:<64} {:<6} measured",
        "step", "expectation", "result"
    );
    for (step, c) in &story.checks {
        println!(
            "  {:<4} {:<64} {:<6} {}",
            step,
            c.name,
            if c.ok { "ok" } else { "FAILED" },
            c.detail
        );
    }
    if options.keep_running {
        println!(
            "\nEverything stays up. Gateway: https://{} (SNI and Host api.example.com)",
            world.gateway.address
        );
        let root = world._scratch.path().join("root-cert.pem");
        std::fs::write(&root, world.ca.root_pem())?;
        let port = world.gateway.address.port();
        println!(
            "  curl -s --cacert {} --resolve api.example.com:{port}:127.0.0.1 -X POST https://api.example.com:{port}/api/v1/orders",
            root.display()
        );
        for (name, addr) in world.admin_urls() {
            println!("  {name:<28} admin http://{addr}/metrics  http://{addr}/stats");
        }
        println!("Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    }
    Ok(story.checks)
}
