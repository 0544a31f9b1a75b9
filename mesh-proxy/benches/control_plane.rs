//! The control plane at scale: one `mesh-proxy discovery` on a real Kubernetes API server
//! and N `mesh-proxy sidecar` processes following it over xDS, each with its certificate
//! by CSR (a `kubectl create token --audience istio-ca` token of its own service account).
//!
//! Measured and printed as a table:
//!
//! - the watches the API server holds (`apiserver_longrunning_requests{verb="WATCH"}`
//!   summed, from its `/metrics`, read with `kubectl get --raw` as the admin user):
//!   before `discovery`, with one sidecar and with N, and the kinds `discovery` watches;
//! - resident memory (`VmRSS`) of `discovery` (before the workloads' objects, with them,
//!   with one sidecar, with N) and of a sidecar (the median), idle;
//! - for K `kubectl patch virtualservice order-service --type=merge` (weights alternating),
//!   the time from starting `kubectl` to each sidecar serving the new configuration: to
//!   the first sidecar and to every sidecar (p50 and p99 over the patches), and to
//!   `kubectl` returning; and the CPU time `discovery` and the sidecars spend per push.
//!   A sidecar serves the new configuration when its admin `/config_dump` shows a new
//!   `version` (polled every 50 ms, only sidecars not yet updated, which gives the upper
//!   bound in the table); the moment is read from the sidecar's own log line
//!   `configuration updated version=<that version>` (microseconds, the same clock), so
//!   the polling neither rounds the figure nor competes for the CPU much.
//!
//! ```text
//! cargo bench -p mesh-proxy --bench control_plane            # N = 50, K = 20
//! cargo bench -p mesh-proxy --bench control_plane -- 100 40  # N = 100, K = 40
//! ```
//!
//! Without arguments (`cargo test --benches`, which does not pass `--bench`) it runs N = 3,
//! K = 2 and checks that every push arrives. Without the Go-built peers (kube-apiserver,
//! etcd, kubectl) it fails when `CI` is set and says SKIPPED otherwise.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/peers.rs"]
#[allow(dead_code)]
mod peers;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::future::join_all;
use peers::{ApiServer, host_ip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Wall-clock time, to compare with the timestamps in the processes' logs.
type WallClock = std::time::SystemTime;

const CANARY: &str = include_str!("../../examples/sidecar/config/canary-order-service.yaml");
const AUTHZ: &str = include_str!("../../examples/sidecar/config/authorization-policy-payment.yaml");
const STRICT: &str = include_str!("../../examples/sidecar/config/peer-authentication-strict.yaml");

/// The namespace of the simulated workloads.
const NS: &str = "production";
/// How often a sidecar not yet showing the new version is asked again.
const POLL: Duration = Duration::from_millis(50);
/// The longest a push may take before the run fails.
const PUSH_LIMIT: Duration = Duration::from_secs(60);

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs the binary without it.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let full = args.iter().any(|a| a == "--bench") || !numbers.is_empty();
    let (sidecars, patches) = if full {
        (
            numbers.first().copied().unwrap_or(50),
            numbers.get(1).copied().unwrap_or(20),
        )
    } else {
        (3, 2)
    };
    assert!(
        sidecars >= 2 && patches >= 1,
        "at least 2 sidecars and 1 patch"
    );
    let Some(api) = ApiServer::start() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(&api, sidecars, patches));
    if full {
        print!("{}", report.table());
    } else {
        println!(
            "control_plane: {sidecars} sidecars followed {patches} patches (every push arrived; \
             slowest {:.0} ms); watches {} with 1 sidecar, {} with {sidecars}",
            ms(*report.to_all.iter().max().unwrap()),
            report.watches_one.longrunning,
            report.watches_all.longrunning,
        );
    }
    drop(runtime);
    drop(api);
}

/// What one run measured.
struct Report {
    sidecars: usize,
    patches: usize,
    objects: usize,
    watches_before: Watches,
    watches_one: Watches,
    watches_all: Watches,
    discovery_rss_empty: u64,
    discovery_rss_objects: u64,
    discovery_rss_one: u64,
    discovery_rss_all: u64,
    sidecar_rss: Vec<u64>,
    to_first: Vec<Duration>,
    to_all: Vec<Duration>,
    polled_all: Vec<Duration>,
    kubectl: Vec<Duration>,
    discovery_cpu: Duration,
    sidecars_cpu: Duration,
}

impl Report {
    fn table(&self) -> String {
        let n = self.sidecars;
        let k = self.patches;
        let mib = |kb: u64| format!("{:.1} MiB", kb as f64 / 1024.0);
        let mut sidecar_rss = self.sidecar_rss.clone();
        sidecar_rss.sort_unstable();
        let rows: Vec<(String, String)> = vec![
            (
                "WATCH requests open on the API server: before discovery (its own loopback informers)".into(),
                self.watches_before.longrunning.to_string(),
            ),
            (
                "  discovery + 1 sidecar".into(),
                self.watches_one.longrunning.to_string(),
            ),
            (
                format!("  discovery + {n} sidecars"),
                self.watches_all.longrunning.to_string(),
            ),
            (
                "  added by discovery, by resource".into(),
                self.watches_all.added_since(&self.watches_before),
            ),
            (
                "discovery VmRSS: article objects only".into(),
                mib(self.discovery_rss_empty),
            ),
            (
                format!("  + {} workload objects ({n} × SA, Service, Pod, EndpointSlice)", self.objects),
                mib(self.discovery_rss_objects),
            ),
            ("  + 1 sidecar connected".into(), mib(self.discovery_rss_one)),
            (
                format!("  + {n} sidecars connected"),
                mib(self.discovery_rss_all),
            ),
            (
                format!("sidecar VmRSS, idle: median [min–max] of {n}"),
                format!(
                    "{} [{} – {}]",
                    mib(percentile(&sidecar_rss, 50)),
                    mib(sidecar_rss[0]),
                    mib(sidecar_rss[n - 1])
                ),
            ),
            (
                format!("patch → kubectl returns: p50 / p99 of {k}"),
                pair(&self.kubectl),
            ),
            (
                format!("patch → first sidecar serving it: p50 / p99 of {k}"),
                pair(&self.to_first),
            ),
            (
                format!("patch → all {n} sidecars serving it: p50 / p99 of {k}"),
                pair(&self.to_all),
            ),
            (
                format!("  the same seen by polling `/config_dump` every {} ms", POLL.as_millis()),
                pair(&self.polled_all),
            ),
            (
                "discovery CPU per push (user + system, over the patches)".into(),
                format!("{:.1} ms", ms(self.discovery_cpu) / k as f64),
            ),
            (
                "sidecar CPU per push, incl. the admin polls (mean)".into(),
                format!("{:.2} ms", ms(self.sidecars_cpu) / (k * n) as f64),
            ),
        ];
        let mut out = String::from("\n| what | measured |\n|---|---|\n");
        for (what, value) in rows {
            out.push_str(&format!("| {what} | {value} |\n"));
        }
        out
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn percentile<T: Copy>(sorted: &[T], p: usize) -> T {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn pair(values: &[Duration]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    format!(
        "{:.0} ms / {:.0} ms",
        ms(percentile(&sorted, 50)),
        ms(percentile(&sorted, 99))
    )
}

async fn run(api: &ApiServer, n: usize, k: usize) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let kubectl = peers::peer("kubectl").unwrap();
    let ip = host_ip();
    let bin = Path::new(env!("CARGO_BIN_EXE_mesh-proxy"));

    // Istio's definitions and the article's objects.
    api.install_istio_crds();
    for ns in [NS, "istio-system"] {
        api.kubectl(&["create", "namespace", ns], "");
    }
    for yaml in [CANARY, AUTHZ, STRICT] {
        api.apply(yaml);
    }
    let watches_before = watches(api);

    // `discovery`, with a CA from `mesh-proxy ca init`.
    let ca_dir = dir.path().join("ca");
    let out = std::process::Command::new(bin)
        .args(["ca", "init", "--out"])
        .arg(&ca_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "ca init: {out:?}");
    let grpc = SocketAddr::new(ip, free_port(ip));
    let monitoring = free_port(IpAddr::from([127, 0, 0, 1]));
    let mut discovery = spawn(
        Command::new(bin)
            .arg("discovery")
            .arg("--kubernetes")
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .args(["--grpc", &grpc.to_string()])
            .args(["--monitoring", &format!("127.0.0.1:{monitoring}")]),
        &dir.path().join("discovery.log"),
    );
    wait_ready(
        &mut discovery,
        monitoring,
        "/ready",
        &dir.path().join("discovery.log"),
    )
    .await;
    settle().await;
    let discovery_pid = discovery.id().unwrap();
    let discovery_rss_empty = rss(discovery_pid);

    // The workloads: a service account, a Service, a Pod and an EndpointSlice each; the
    // pod's address is this machine's (the API server refuses loopback), the port its
    // sidecar's inbound listener.
    let ports: Vec<Ports> = (0..n).map(|_| Ports::new(ip)).collect();
    let accounts: String = (0..n)
        .map(|i| format!("---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: svc-{i}, namespace: {NS}}}\n"))
        .collect();
    api.apply(&accounts);
    let workloads: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| workload(i, ip, p.inbound))
        .collect();
    api.apply(&workloads);
    settle().await;
    let discovery_rss_objects = rss(discovery_pid);

    // One sidecar, then the others.
    let root_cert = ca_dir.join("root-cert.pem");
    let mut sidecars = Vec::with_capacity(n);
    sidecars.push(start_sidecar(
        api,
        bin,
        dir.path(),
        0,
        ports[0],
        grpc,
        &root_cert,
    ));
    wait_ready(
        &mut sidecars[0],
        ports[0].admin,
        "/healthz/ready",
        &sidecar_log(dir.path(), 0),
    )
    .await;
    settle().await;
    let watches_one = watches(api);
    let discovery_rss_one = rss(discovery_pid);
    for (i, p) in ports.iter().enumerate().skip(1) {
        sidecars.push(start_sidecar(api, bin, dir.path(), i, *p, grpc, &root_cert));
    }
    for (i, (child, p)) in sidecars.iter_mut().zip(&ports).enumerate() {
        wait_ready(
            child,
            p.admin,
            "/healthz/ready",
            &sidecar_log(dir.path(), i),
        )
        .await;
    }
    settle().await;
    let watches_all = watches(api);
    let discovery_rss_all = rss(discovery_pid);
    let pids: Vec<u32> = sidecars.iter().map(|c| c.id().unwrap()).collect();
    let sidecar_rss: Vec<u64> = pids.iter().map(|pid| rss(*pid)).collect();

    // Every sidecar holds the article's VirtualService.
    for p in &ports {
        let dump = config_dump(p.admin).await.unwrap();
        assert!(
            dump["resources"].as_array().unwrap().iter().any(|r| {
                r["kind"] == "VirtualService"
                    && r["namespace"] == "default"
                    && r["name"] == "order-service"
            }),
            "the sidecar at admin port {} lacks order-service: {dump}",
            p.admin
        );
    }

    // The patches.
    let (mut to_first, mut to_all, mut polled_all, mut kubectl_times) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let cpu_discovery = cpu(discovery_pid);
    let cpu_sidecars: Vec<Duration> = pids.iter().map(|pid| cpu(*pid)).collect();
    for patch in 0..k {
        let before = join_all(ports.iter().map(|p| version(p.admin))).await;
        assert!(
            before.iter().all(Option::is_some),
            "a sidecar is not answering"
        );
        let v2 = if patch % 2 == 0 { 80 } else { 20 };
        let body = format!(
            r#"{{"spec":{{"http":[{{"route":[{{"destination":{{"host":"order-service","subset":"v1"}},"weight":{}}},{{"destination":{{"host":"order-service","subset":"v2"}},"weight":{v2}}}]}}]}}}}"#,
            100 - v2
        );
        let start = Instant::now();
        let wall_start = WallClock::now();
        let mut patching = Command::new(&kubectl);
        patching
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .args([
                "patch",
                "virtualservice",
                "order-service",
                "--type=merge",
                "-p",
                &body,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let patching = async move {
            let out = patching.output().await.unwrap();
            assert!(out.status.success(), "kubectl patch: {out:?}");
            start.elapsed()
        };
        let (returned, (versions, polled)) =
            tokio::join!(patching, arrivals(&ports, &before, start));
        kubectl_times.push(returned);
        polled_all.push(*polled.iter().max().unwrap());
        let applied: Vec<Duration> = versions
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let log = sidecar_log(dir.path(), i);
                let at = updated_at(&log, v)
                    .unwrap_or_else(|| panic!("{} does not log version {v}", log.display()));
                at.duration_since(wall_start).unwrap_or_else(|_| {
                    panic!("{} logs version {v} before the patch", log.display())
                })
            })
            .collect();
        to_first.push(*applied.iter().min().unwrap());
        to_all.push(*applied.iter().max().unwrap());
        // The next patch starts from a quiet system.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let discovery_cpu = cpu(discovery_pid) - cpu_discovery;
    let sidecars_cpu = pids
        .iter()
        .zip(cpu_sidecars)
        .map(|(pid, before)| cpu(*pid) - before)
        .sum();

    drop(sidecars);
    drop(discovery);
    Report {
        sidecars: n,
        patches: k,
        objects: 4 * n,
        watches_before,
        watches_one,
        watches_all,
        discovery_rss_empty,
        discovery_rss_objects,
        discovery_rss_one,
        discovery_rss_all,
        sidecar_rss,
        to_first,
        to_all,
        polled_all,
        kubectl: kubectl_times,
        discovery_cpu,
        sidecars_cpu,
    }
}

/// For each sidecar, the first version its `/config_dump` shows other than `before`, and
/// the time from `start` to that answer.
async fn arrivals(
    ports: &[Ports],
    before: &[Option<String>],
    start: Instant,
) -> (Vec<String>, Vec<Duration>) {
    let mut arrived: Vec<Option<(String, Duration)>> = vec![None; ports.len()];
    loop {
        let pending: Vec<usize> = (0..ports.len()).filter(|i| arrived[*i].is_none()).collect();
        if pending.is_empty() {
            return arrived.into_iter().map(Option::unwrap).unzip();
        }
        assert!(
            start.elapsed() < PUSH_LIMIT,
            "{} of {} sidecars did not receive the patch within {PUSH_LIMIT:?}",
            pending.len(),
            ports.len()
        );
        let seen = join_all(pending.iter().map(|i| async move {
            let v = version(ports[*i].admin).await;
            (*i, v, start.elapsed())
        }))
        .await;
        for (i, v, at) in seen {
            if let Some(v) = v.filter(|v| Some(v) != before[i].as_ref()) {
                arrived[i] = Some((v, at));
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// When the sidecar logging to `log` last swapped in configuration `version`: the
/// timestamp of its last `configuration updated version="<version>"` line (the weights
/// alternate, so a version comes back every other patch).
fn updated_at(log: &Path, version: &str) -> Option<WallClock> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("configuration updated") && l.contains(version))?;
    // The line starts with the RFC 3339 timestamp, possibly inside colour escapes.
    let at = line.find("20")?;
    parse_utc(line.get(at..at + 27)?)
}

/// `2026-01-02T03:04:05.123456Z` (tracing's format: UTC, microseconds) as a wall-clock time.
fn parse_utc(text: &str) -> Option<WallClock> {
    let num = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, us) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..26)?);
    // Days since 1970-01-01 of a civil date (proleptic Gregorian).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    Some(
        WallClock::UNIX_EPOCH
            + Duration::from_secs(secs)
            + Duration::from_micros(u64::try_from(us).ok()?),
    )
}

/// The objects of workload `i`: its Service (port 80 to the sidecar's inbound port), one
/// ready Pod (labels `app`, `version: v1`, Istio's mTLS label) and its EndpointSlice.
fn workload(i: usize, ip: IpAddr, port: u16) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: {NS}}}
spec:
  selector: {{app: svc-{i}}}
  ports:
  - {{name: http, port: 80, targetPort: {port}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: svc-{i}-0
  namespace: {NS}
  labels: {{app: svc-{i}, version: v1, security.istio.io/tlsMode: istio}}
spec:
  serviceAccountName: svc-{i}
  containers:
  - {{name: app, image: "svc:1.0.0"}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-a
  namespace: {NS}
  labels: {{kubernetes.io/service-name: svc-{i}}}
addressType: IPv4
ports:
- {{name: http, port: {port}, protocol: TCP}}
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true, serving: true, terminating: false}}
  targetRef: {{kind: Pod, name: svc-{i}-0, namespace: {NS}}}
"#
    )
}

#[derive(Clone, Copy)]
struct Ports {
    inbound: u16,
    outbound: u16,
    admin: u16,
}

impl Ports {
    fn new(ip: IpAddr) -> Self {
        let lo = IpAddr::from([127, 0, 0, 1]);
        Self {
            inbound: free_port(ip),
            outbound: free_port(lo),
            admin: free_port(lo),
        }
    }
}

/// A port free on `ip` now, below the ephemeral range (where the sidecars' own
/// connections to `discovery` take their source ports) and from a counter, so that two
/// calls do not return the same port.
fn free_port(ip: IpAddr) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Runs at the same time start at different offsets.
    let offset = (std::process::id() % 20) as u16 * 600;
    loop {
        let port = FIRST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

fn sidecar_log(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("svc-{i}.log"))
}

/// Sidecar `i`: its token, settings without `svid` (so its certificate comes by CSR) and
/// its process.
fn start_sidecar(
    api: &ApiServer,
    bin: &Path,
    dir: &Path,
    i: usize,
    ports: Ports,
    grpc: SocketAddr,
    root_cert: &Path,
) -> Child {
    let name = format!("svc-{i}");
    let token = api.kubectl(
        &["create", "token", &name, "-n", NS, "--audience", "istio-ca"],
        "",
    );
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, token.trim()).unwrap();
    let settings = format!(
        "workload:\n  namespace: {NS}\n  serviceAccount: {name}\n  labels:\n    app: {name}\n    version: v1\n\
         discovery:\n  address: {grpc}\n  tokenFile: {token}\n  rootCert: {root}\n\
         listeners:\n  inbound: {ip}:{i}\n  outbound: 127.0.0.1:{o}\n  admin: 127.0.0.1:{a}\n  app: 127.0.0.1:9\n",
        token = token_file.display(),
        root = root_cert.display(),
        ip = grpc.ip(),
        i = ports.inbound,
        o = ports.outbound,
        a = ports.admin,
    );
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, settings).unwrap();
    spawn(
        Command::new(bin)
            .arg("sidecar")
            .arg("--settings")
            .arg(&file),
        &sidecar_log(dir, i),
    )
}

fn spawn(command: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    command
        .env("MESH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits until `GET path` on `127.0.0.1:port` answers 200; panics with the log if the
/// process exits or does not get there within a minute.
async fn wait_ready(child: &mut Child, port: u16, path: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some((200, _)) = get(port, path).await {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{} exited with {status}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "not ready within a minute:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Idle time for watches to be opened and caches to fill before a reading.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// One HTTP/1.1 `GET` on a new connection: the status and the body.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}

async fn config_dump(admin: u16) -> Option<serde_json::Value> {
    let (status, body) = get(admin, "/config_dump").await?;
    if status != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// The configuration version a sidecar serves.
async fn version(admin: u16) -> Option<String> {
    config_dump(admin).await?["version"]
        .as_str()
        .map(str::to_owned)
}

/// The API server's open WATCH requests: in all, and by resource (`group/resource`).
#[derive(Clone, Default)]
struct Watches {
    longrunning: u64,
    by_resource: std::collections::BTreeMap<String, u64>,
}

impl Watches {
    /// The resources watched more in `self` than in `before`.
    fn added_since(&self, before: &Watches) -> String {
        let added: Vec<String> = self
            .by_resource
            .iter()
            .filter_map(|(r, n)| {
                let more = n.saturating_sub(before.by_resource.get(r).copied().unwrap_or(0));
                (more > 0).then(|| format!("{r} {more}"))
            })
            .collect();
        added.join(", ")
    }
}

fn watches(api: &ApiServer) -> Watches {
    let text = api.kubectl(&["get", "--raw", "/metrics"], "");
    let mut w = Watches::default();
    for line in text.lines() {
        if !(line.starts_with("apiserver_longrunning_requests{") && line.contains("verb=\"WATCH\""))
        {
            continue;
        }
        let label = |name: &str| -> String {
            let key = format!("{name}=\"");
            line.find(&key)
                .map(|at| &line[at + key.len()..])
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        w.longrunning += value;
        let group = label("group");
        let resource = if group.is_empty() {
            label("resource")
        } else {
            format!("{group}/{}", label("resource"))
        };
        *w.by_resource.entry(resource).or_default() += value;
    }
    w
}

/// `VmRSS` of `pid`, in KiB.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// User plus system CPU time of `pid` so far.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}
