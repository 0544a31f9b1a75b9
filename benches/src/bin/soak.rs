//! Soak run: a steady request rate through two sidecars with STRICT mTLS between them,
//! for a bounded time, with configuration reloads and certificate rotations during it.
//! Reports, per window and in total: requests, errors, latency percentiles, and the
//! resident memory of both sidecars.
//!
//! ```sh
//! cargo build --release -p mesh-proxy -p benches --bin mesh-proxy --bin soak
//! target/release/soak --minutes 10 --rate 200
//! ```
//!
//! Options: `--minutes N` (10), `--rate R` requests per second (200), `--window S`
//! seconds per report line (30), `--reload-every S` (60: the configuration file changes
//! and both sidecars get SIGHUP), `--rotate-every S` (90: both rotate their certificate
//! through the admin `POST /rotate`), `--bin PATH` (`target/release/mesh-proxy`).
//! Exits 1 when a request failed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use benches::load::{free_port, serve_body};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;

struct Options {
    minutes: u64,
    rate: u32,
    window: u64,
    reload_every: u64,
    rotate_every: u64,
    bin: PathBuf,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        minutes: 10,
        rate: 200,
        window: 30,
        reload_every: 60,
        rotate_every: 90,
        bin: PathBuf::from("target/release/mesh-proxy"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--minutes" => o.minutes = number()?,
            "--rate" => o.rate = u32::try_from(number()?).map_err(|e| e.to_string())?,
            "--window" => o.window = number()?.max(1),
            "--reload-every" => o.reload_every = number()?.max(1),
            "--rotate-every" => o.rotate_every = number()?.max(1),
            "--bin" => o.bin = PathBuf::from(value),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.rate == 0 {
        return Err("--rate must be above 0".into());
    }
    Ok(o)
}

/// The mesh configuration: STRICT mTLS, the backend behind the server sidecar, and a
/// route whose timeout changes on every reload (`generation`).
fn mesh_yaml(server_inbound: u16, generation: u64) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: load}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: load}}
spec:
  hosts: [backend.load.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {server_inbound}}}, labels: {{app: backend}}, serviceAccount: backend}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: backend, namespace: load}}
spec:
  host: backend.load.svc.cluster.local
  trafficPolicy:
    connectionPool: {{http: {{maxRequestsPerConnection: 1000}}}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: backend, namespace: load}}
spec:
  hosts: [\"127.0.0.1\"]
  http:
  - timeout: {timeout}s
    retries: {{attempts: 2, perTryTimeout: 2s}}
    route:
    - destination: {{host: backend.load.svc.cluster.local, port: {{number: 80}}}}
",
        timeout = 5 + generation % 2,
    )
}

fn settings(
    account: &str,
    config: &Path,
    inbound: u16,
    app: SocketAddr,
    outbound: u16,
    admin: u16,
) -> String {
    format!(
        "workload: {{namespace: load, serviceAccount: {account}, labels: {{app: {account}}}}}
configDir: {config}
svid: {{caDir: ca}}
listeners:
  inbound: 127.0.0.1:{inbound}
  app: {app}
  outbound: 127.0.0.1:{outbound}
  admin: 127.0.0.1:{admin}
",
        config = config.display()
    )
}

/// A sidecar process, killed when dropped.
struct Sidecar {
    child: Child,
    admin: u16,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        settings: &str,
        admin: u16,
    ) -> Result<Self, String> {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, settings).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .args(["sidecar", "--worker-threads", "1", "--settings"])
            .arg(&file)
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        Ok(Self { child, admin })
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }
}

async fn admin(
    client: &Client<HttpConnector, Empty<Bytes>>,
    port: u16,
    method: &str,
    path: &str,
) -> Option<(u16, String)> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .body(Empty::new())
        .ok()?;
    let res = client.request(req).await.ok()?;
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Latencies (µs) and failures of one window.
#[derive(Default)]
struct Window {
    micros: Vec<u32>,
    errors: u64,
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(micros: &mut [u32]) -> String {
    micros.sort_unstable();
    format!(
        "{:>7} {:>7} {:>7} {:>8}",
        percentile(micros, 50.0),
        percentile(micros, 90.0),
        percentile(micros, 99.0),
        micros.last().copied().unwrap_or(0)
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run() -> Result<u64, String> {
    let o = options()?;
    let dir = tempfile_dir()?;
    let status = Command::new(&o.bin)
        .args(["ca", "init", "--trust-domain", "cluster.local", "--out"])
        .arg(dir.join("ca"))
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", o.bin.display()))?;
    if !status.success() {
        return Err("mesh-proxy ca init failed".into());
    }
    // The backend: 200 with a small body.
    let backend = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let backend_addr = backend.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(serve_body(backend, Bytes::from_static(b"ok")));
    let (server_inbound, client_outbound) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let (server_admin, client_admin) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let config = dir.join("istio");
    std::fs::create_dir_all(&config).map_err(|e| e.to_string())?;
    let mesh = config.join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(server_inbound, 0)).map_err(|e| e.to_string())?;
    let nowhere: SocketAddr = ([127, 0, 0, 1], 9).into();
    let server = Sidecar::start(
        &o.bin,
        &dir,
        "backend",
        &settings(
            "backend",
            &config,
            server_inbound,
            backend_addr,
            free_port().map_err(|e| e.to_string())?,
            server_admin,
        ),
        server_admin,
    )?;
    let client = Sidecar::start(
        &o.bin,
        &dir,
        "client",
        &settings(
            "client",
            &config,
            free_port().map_err(|e| e.to_string())?,
            nowhere,
            client_outbound,
            client_admin,
        ),
        client_admin,
    )?;
    let control: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    for sidecar in [&server, &client] {
        let mut ready = false;
        for _ in 0..400 {
            if matches!(
                admin(&control, sidecar.admin, "GET", "/healthz/ready").await,
                Some((200, _))
            ) {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !ready {
            return Err(format!(
                "a sidecar did not become ready; logs in {}",
                dir.display()
            ));
        }
    }

    let load: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let window = Arc::new(Mutex::new(Window::default()));
    let all = Arc::new(Mutex::new(Window::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs(o.minutes * 60);
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / o.rate);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut next_window = start + Duration::from_secs(o.window);
    let mut next_reload = start + Duration::from_secs(o.reload_every);
    let mut next_rotate = start + Duration::from_secs(o.rotate_every);
    let (mut reloads, mut rotations, mut rss_first, mut rss_last) = (0u64, 0u64, None, (0, 0));
    println!(
        "{:>5} {:>7} {:>6} {:>7} {:>7} {:>7} {:>8} {:>10} {:>10}",
        "t(s)", "reqs", "errors", "p50µs", "p90µs", "p99µs", "maxµs", "rss cli KiB", "rss srv KiB"
    );
    let uri = format!("http://127.0.0.1:{client_outbound}/soak");
    while Instant::now() < end {
        ticks.tick().await;
        let (load, uri, in_window, in_all) =
            (load.clone(), uri.clone(), window.clone(), all.clone());
        tokio::spawn(async move {
            let began = Instant::now();
            let ok = match Request::get(uri.as_str()).body(Empty::new()) {
                Ok(req) => match load.request(req).await {
                    Ok(res) => res.status() == 200 && res.into_body().collect().await.is_ok(),
                    Err(_) => false,
                },
                Err(_) => false,
            };
            let micros = u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX);
            for w in [&in_window, &in_all] {
                let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                if ok {
                    w.micros.push(micros);
                } else {
                    w.errors += 1;
                }
            }
        });
        let now = Instant::now();
        if now >= next_reload {
            next_reload += Duration::from_secs(o.reload_every);
            reloads += 1;
            let _ = std::fs::write(&mesh, mesh_yaml(server_inbound, reloads));
            server.signal("-HUP");
            client.signal("-HUP");
        }
        if now >= next_rotate {
            next_rotate += Duration::from_secs(o.rotate_every);
            rotations += 1;
            for port in [server_admin, client_admin] {
                let control = control.clone();
                tokio::spawn(async move { admin(&control, port, "POST", "/rotate").await });
            }
        }
        if now >= next_window {
            next_window += Duration::from_secs(o.window);
            let mut w = std::mem::take(&mut *window.lock().unwrap_or_else(|e| e.into_inner()));
            let rss = (client.rss_kib(), server.rss_kib());
            // The first window warms up: RSS is compared from the second one on.
            if rss_first.is_none() && now.duration_since(start) > Duration::from_secs(o.window) {
                rss_first = Some(rss);
            }
            rss_last = rss;
            println!(
                "{:>5} {:>7} {:>6} {} {:>10} {:>10}",
                now.duration_since(start).as_secs(),
                w.micros.len() as u64 + w.errors,
                w.errors,
                summary(&mut w.micros),
                rss.0,
                rss.1
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut total = std::mem::take(&mut *all.lock().unwrap_or_else(|e| e.into_inner()));
    let requests = total.micros.len() as u64 + total.errors;
    println!(
        "total: {requests} requests, {} errors, {reloads} reloads, {rotations} certificate rotations; latency µs p50 p90 p99 max: {}",
        total.errors,
        summary(&mut total.micros)
    );
    if let Some(first) = rss_first {
        println!(
            "RSS KiB after warm-up -> at the end: client {} -> {}, server {} -> {}",
            first.0, rss_last.0, first.1, rss_last.1
        );
    }
    for (name, port) in [("client", client_admin), ("server", server_admin)] {
        if let Some((_, text)) = admin(&control, port, "GET", "/stats/prometheus").await {
            let reloaded = text
                .lines()
                .find(|l| l.starts_with("mesh_config_reloads_total"))
                .unwrap_or("mesh_config_reloads_total ?");
            println!("{name}: {reloaded}");
        }
    }
    Ok(total.errors)
}

fn tempfile_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir().join(format!("mesh-soak-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    Ok(base)
}
