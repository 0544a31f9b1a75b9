//! Helpers for the process tests: a CA, test applications, `mesh-proxy` processes,
//! a small HTTP client and curl.

#![allow(dead_code)]

pub mod frames;
pub mod gateway;
pub mod peers;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// A free loopback port for a proxy process to bind right after.
///
/// Picked below Linux's ephemeral range (32768–60999), so the client connections of tests
/// running at the same time cannot take it between this check and the proxy's bind, and
/// never handed out twice by one test binary.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Test binaries of one run start at different offsets.
    let offset = (std::process::id() % 97) * 120;
    loop {
        let n = u32::try_from(NEXT.fetch_add(1, Ordering::Relaxed) % SPAN as usize)
            .expect("below SPAN");
        let port = u16::try_from(FIRST + (offset + n) % SPAN).expect("port fits");
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A workspace for one test: temp dir with a CA.
pub struct World {
    pub dir: tempfile::TempDir,
    pub ca_dir: PathBuf,
}

impl World {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        let ca = mesh_tls::CertificateAuthority::new("cluster.local").expect("ca");
        ca.write_dir(&ca_dir).expect("write ca");
        Self { dir, ca_dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `yaml` as `name` in the config directory `config`.
    pub fn write_config(&self, config: &str, name: &str, yaml: &str) -> PathBuf {
        let dir = self.path(config);
        std::fs::create_dir_all(&dir).expect("config dir");
        // Write then rename: a watcher never sees half a file.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
        dir
    }
}

/// What a test application answers.
#[derive(Clone)]
pub enum Behaviour {
    /// 200 with this body.
    Ok(&'static str),
    /// This status with this body.
    Status(u16, &'static str),
    /// 200 after this delay.
    Slow(Duration, &'static str),
    /// `101 Switching Protocols` to a WebSocket upgrade, then echoes bytes.
    Echo,
}

/// A hyper test application on 127.0.0.1:0.
pub struct App {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub last_headers: Arc<std::sync::Mutex<Vec<http::HeaderMap>>>,
    pub versions: Arc<std::sync::Mutex<Vec<http::Version>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let last_headers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (h, lh, vs) = (hits.clone(), last_headers.clone(), versions.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let b = behaviour.clone();
                let h = h.clone();
                let lh = lh.clone();
                let vs = vs.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        let b = b.clone();
                        h.fetch_add(1, Ordering::SeqCst);
                        lh.lock().unwrap().push(req.headers().clone());
                        vs.lock().unwrap().push(req.version());
                        let upgrade =
                            matches!(b, Behaviour::Echo).then(|| hyper::upgrade::on(&mut req));
                        async move {
                            if let Some(upgrade) = upgrade {
                                tokio::spawn(async move {
                                    let io = upgrade.await.expect("upgrade");
                                    let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                });
                                let res = Response::builder()
                                    .status(101)
                                    .header("connection", "upgrade")
                                    .header("upgrade", "websocket")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap();
                                return Ok::<_, std::convert::Infallible>(res);
                            }
                            let _ = req.into_body().collect().await;
                            let (status, body) = match b {
                                Behaviour::Ok(s) => (200, s),
                                Behaviour::Status(c, s) => (c, s),
                                Behaviour::Slow(d, s) => {
                                    tokio::time::sleep(d).await;
                                    (200, s)
                                }
                                Behaviour::Echo => (200, "no upgrade"),
                            };
                            let mut res = Response::new(Full::new(Bytes::from(body)));
                            *res.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            hits,
            last_headers,
            versions,
            task,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Ports of one sidecar.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub inbound: u16,
    pub outbound: u16,
    pub admin: u16,
}

impl Ports {
    pub fn new() -> Self {
        Self {
            inbound: free_port(),
            outbound: free_port(),
            admin: free_port(),
        }
    }
}

/// Settings YAML for a sidecar of `sa` with `labels`, app at `app`.
pub fn sidecar_settings(
    world: &World,
    sa: &str,
    labels: &BTreeMap<&str, &str>,
    config: &Path,
    ports: Ports,
    app: SocketAddr,
    extra: &str,
) -> String {
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: {v}\n"))
        .collect();
    format!(
        "workload:\n  namespace: production\n  serviceAccount: {sa}\n  labels:\n{labels}\
         configDir: {config}\nsvid:\n  caDir: {ca}\n  lifetime: 1h\n\
         listeners:\n  inbound: 127.0.0.1:{i}\n  outbound: 127.0.0.1:{o}\n  admin: 127.0.0.1:{a}\n  app: {app}\n\
         accessLog:\n  path: {log}\n\
         limits:\n  drainTimeout: 3s\n{extra}",
        config = config.display(),
        ca = world.ca_dir.display(),
        i = ports.inbound,
        o = ports.outbound,
        a = ports.admin,
        log = world.path(&format!("{sa}-access.log")).display(),
    )
}

/// Starts a sidecar for service account `sa` (labels `app: <sa>`, no extra settings)
/// whose application is at `app`; its settings and log files are named after `sa`.
pub async fn start_sidecar(
    world: &World,
    sa: &str,
    config: &Path,
    ports: Ports,
    app: SocketAddr,
) -> Proxy {
    let s = sidecar_settings(world, sa, &labels(&[("app", sa)]), config, ports, app, "");
    Proxy::start(world, "sidecar", sa, &s, ports).await
}

/// A running `mesh-proxy` process.
pub struct Proxy {
    pub child: Child,
    pub ports: Ports,
    pub log: PathBuf,
}

impl Proxy {
    /// Starts `mesh-proxy <kind> --settings <file>` and waits until the admin server
    /// answers ready.
    pub async fn start(
        world: &World,
        kind: &str,
        name: &str,
        settings: &str,
        ports: Ports,
    ) -> Self {
        let file = world.path(&format!("{name}.yaml"));
        std::fs::write(&file, settings).expect("settings");
        let log = world.path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args([kind, "--settings"])
            .arg(&file)
            .env("MESH_LOG", "info")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mesh-proxy");
        let mut proxy = Self { child, ports, log };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&mut self) {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("mesh-proxy exited with {status}:\n{}", self.output());
            }
            if let Ok((200, _)) = admin_get(self.ports.admin, "/healthz/ready").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("mesh-proxy did not become ready:\n{}", self.output());
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn admin(&self, path: &str) -> String {
        admin_get(self.ports.admin, path).await.expect("admin").1
    }

    /// `/stats/prometheus` once `ready` holds for it (metrics are recorded at stream end,
    /// which can come a moment after the client has its response), or after 2 s.
    pub async fn metrics_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let mut text = String::new();
        for _ in 0..200 {
            text = self.admin("/stats/prometheus").await;
            if ready(&text) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        text
    }

    pub fn outbound(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.outbound))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("pid");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

/// A `mesh-proxy discovery` process with `args` (besides the world's CA and a monitoring
/// port), killed when dropped; started once its `/ready` answers 200.
pub struct DiscoveryProcess {
    child: Child,
    log: PathBuf,
    monitoring: u16,
}

impl DiscoveryProcess {
    pub async fn start(world: &World, name: &str, args: &[&std::ffi::OsStr]) -> Self {
        let monitoring = free_port();
        let log = world.path(&format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .arg("discovery")
            .args(args)
            .arg("--ca-dir")
            .arg(&world.ca_dir)
            .args(["--monitoring", &format!("127.0.0.1:{monitoring}")])
            .env("MESH_LOG", "info")
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mesh-proxy discovery");
        let mut d = Self {
            child,
            log,
            monitoring,
        };
        for _ in 0..600 {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("discovery exited with {status}:\n{}", d.output());
            }
            if let Ok((200, _)) = admin_get(monitoring, "/ready").await {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("discovery did not become ready:\n{}", d.output());
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        admin_get(self.monitoring, "/metrics")
            .await
            .expect("metrics")
            .1
    }
}

/// GET on the admin port: (status, body).
pub async fn admin_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    send(addr, "GET", "localhost", path, &[]).await
}

/// One HTTP/1.1 request on a new connection to `addr` with `Host: host`.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A keep-alive client for load loops (HTTP/1.1 to one address).
pub struct Client {
    inner: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    addr: SocketAddr,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build(hyper_util::client::legacy::connect::HttpConnector::new()),
            addr,
        }
    }

    /// Sends a request for `host` + `path` to the proxy (origin-form with Host).
    pub async fn request(
        &self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String), String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let res = self.inner.request(req).await.map_err(|e| e.to_string())?;
        let status = res.status().as_u16();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Runs curl with `args`; returns (exit code, stdout, stderr).
pub async fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl is installed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A ServiceEntry document for `host` in `production` with endpoints
/// `(inbound port, version, service account)`. The `serviceAccount` makes auto-mTLS
/// use Istio mTLS to these sidecars, without a `security.istio.io/tlsMode` label (SR-25).
pub fn service_entry(host: &str, port: u16, endpoints: &[(u16, &str, &str)]) -> String {
    let mut eps = String::new();
    for (p, version, sa) in endpoints {
        eps.push_str(&format!(
            "  - address: 127.0.0.1\n    ports: {{http: {p}}}\n    labels: {{app: {host}, version: {version}}}\n    serviceAccount: {sa}\n"
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {host}\n  namespace: production\n\
         spec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {{number: {port}, name: http, protocol: HTTP}}\n  endpoints:\n{eps}"
    )
}

/// The article's STRICT PeerAuthentication and payment-service AuthorizationPolicy.
pub const SECURITY: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: production
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: payment-service-authz
  namespace: production
spec:
  selector:
    matchLabels:
      app: payment-service
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/production/sa/order-service\"]
    to:
    - operation:
        methods: [\"POST\"]
        paths: [\"/api/v1/payments\", \"/api/v1/payments/*\"]
";

pub fn labels<'a>(pairs: &[(&'a str, &'a str)]) -> BTreeMap<&'a str, &'a str> {
    pairs.iter().copied().collect()
}

/// Whether the command-line tool `name` can run. When it cannot, a test fails under CI
/// (env `CI` set) and otherwise says that it skipped.
pub fn tool_available(name: &str) -> bool {
    let found = std::process::Command::new(name)
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is required under CI but was not found on PATH"
        );
        eprintln!("SKIPPED: {name} not found on PATH");
    }
    found
}

/// Runs `openssl` with `args`, writing `stdin` and then closing it; returns (exit code, stdout, stderr).
pub async fn openssl(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl is installed");
    let mut input = child.stdin.take().expect("stdin");
    // openssl may exit before reading its input (a refused handshake): what it printed
    // and its exit code tell what happened, not the write.
    if let Err(e) = input.write_all(stdin).await {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    // With `s_client -ign_eof` the reply is still read after stdin ends.
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("openssl finished within 10 s")
        .expect("openssl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of the series of `metric` (Prometheus text) whose line holds every label of
/// `labels`.
pub fn series_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// A child process (a real server a test starts) killed when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP/1.1 application on `addr` (port 0: any) answering every request with `body`;
/// its address and the number of connections it accepted.
pub async fn counting_app(addr: SocketAddr, body: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(addr).await.expect("bind app");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        body.as_bytes(),
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}
