//! `memory`: the resident memory of one `mesh-proxy` sidecar process, measured from outside.
//!
//! ```text
//! cargo build --release -p mesh-proxy -p benches --bin mesh-proxy --bin memory
//! target/release/memory [--conns N] [--load-secs S] [--settle-secs S] [--runs R]
//!                       [--workers W] [LABEL=]MESH_PROXY_BIN ...
//! ```
//!
//! For each binary (runs interleaved: run 1 of every binary, then run 2, ...), it writes the
//! article's Istio configuration (`examples/sidecar/config`, with the namespace's
//! PeerAuthentication PERMISSIVE so the load can be plaintext, and a ServiceEntry whose one
//! endpoint is this sidecar's own inbound listener, so outbound requests go out over mTLS and
//! come back in), starts a 1 KiB HTTP backend as the application and the sidecar (release
//! build, `sidecar --settings`), then reads `VmRSS`/`VmHWM`/`RssAnon` of the proxy from
//! `/proc/<pid>/status`:
//!
//! 1. **idle**: ready, 2 s after start;
//! 2. **load**: 32 keep-alive HTTP/1.1 connections to the inbound listener, closed loop,
//!    `--load-secs` long; peak RSS (`VmHWM`, reset through `/proc/<pid>/clear_refs` first),
//!    requests per second and the proxy's CPU per request (`utime + stime`);
//! 3. **before burst**: `--settle-secs` after the load;
//! 4. **burst**: `--conns` connections to the outbound listener and as many to the inbound,
//!    each sends one request, reads the answer and stays open, idle (keep-alive);
//! 5. **closed**: the driver closes them all and waits until the proxy's descriptors are back
//!    to their count before the burst (the proxy dropped them);
//! 6. **after**: `--settle-secs` later: does the RSS come back?
//! 7. **after one more connection** to each listener and `--settle-secs` again (a listener
//!    frees its finished connections' tasks when it accepts the next connection).
//!
//! `VmRSS` counts the pages of the binary mapped in (`RssFile`, shared with the page cache
//! and every other process running the same file) as well as the process's own memory
//! (`RssAnon`: heap, stacks, allocator caches, and the binary's relocated read-only data); all
//! three are shown. `MEMORY_SMAPS_DIR=<dir>` also keeps `/proc/<pid>/smaps` at idle and at the
//! end of the load, for the resident set per mapping.
//!
//! Prints one line per run and a table of medians and ranges per binary. Give the same binary
//! several labels with different environments by wrapping it in a script that `exec`s it (the
//! proxy is found by name among the child's descendants, so a profiler wrapper such as
//! `heaptrack` works too; the proxy is stopped with SIGTERM so the profiler finishes its file).
//! The machine must allow `2 × N + 100` open files (`ulimit -n`).
//!
//! Measurement only: nothing is asserted on the figures.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::sleep;

/// The Host the outbound requests name: a ServiceEntry whose endpoint is our own inbound.
const SELF_HOST: &str = "memory-self.production.svc.cluster.local";
const LOAD_CONNECTIONS: usize = 32;

struct Args {
    conns: usize,
    load_secs: u64,
    settle_secs: u64,
    runs: usize,
    workers: Option<u16>,
    bins: Vec<(String, PathBuf)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        conns: 2000,
        load_secs: 10,
        settle_secs: 15,
        runs: 3,
        workers: None,
        bins: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--conns" => a.conns = num("--conns")? as usize,
            "--load-secs" => a.load_secs = num("--load-secs")?,
            "--settle-secs" => a.settle_secs = num("--settle-secs")?,
            "--runs" => a.runs = num("--runs")?.max(1) as usize,
            "--workers" => a.workers = Some(num("--workers")? as u16),
            "--bench" => {} // passed by `cargo bench`
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => {
                let (label, path) = match s.split_once('=') {
                    Some((l, p)) => (l.to_string(), PathBuf::from(p)),
                    None => (
                        s.rsplit('/').next().unwrap_or(s).to_string(),
                        PathBuf::from(s),
                    ),
                };
                a.bins.push((label, path));
            }
        }
    }
    if a.bins.is_empty() {
        return Err(
            "usage: memory [--conns N] [--load-secs S] [--settle-secs S] [--runs R] \
                    [--workers W] [LABEL=]MESH_PROXY_BIN ..."
                .into(),
        );
    }
    Ok(a)
}

/// One run's figures (memory in KiB).
#[derive(Clone, Debug, Default)]
struct Sample {
    idle_rss: u64,
    idle_anon: u64,
    idle_file: u64,
    load_peak: u64,
    load_peak_anon: u64,
    load_peak_file: u64,
    load_rps: f64,
    load_cpu_us: f64,
    before_rss: u64,
    burst_rss: u64,
    burst_anon: u64,
    burst_hwm: u64,
    closed_rss: u64,
    after_rss: u64,
    after_anon: u64,
    next_rss: u64,
    next_anon: u64,
    threads: u64,
    close_wait_ms: u64,
    fds_left: usize,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("memory: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("memory: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let mut results: BTreeMap<usize, Vec<Sample>> = BTreeMap::new();
        for run in 1..=args.runs {
            for (i, (label, bin)) in args.bins.iter().enumerate() {
                match run_once(&args, bin).await {
                    Ok(s) => {
                        println!("run {run} {label}: {s:?}");
                        results.entry(i).or_default().push(s);
                    }
                    Err(e) => {
                        eprintln!("memory: run {run} {label}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
        print_table(&args, &results);
        ExitCode::SUCCESS
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Median [min – max] of one figure over the runs.
fn stat(samples: &[Sample], f: impl Fn(&Sample) -> f64, digits: usize) -> String {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let med = v[v.len() / 2];
    if v.len() == 1 {
        format!("{med:.digits$}")
    } else {
        format!(
            "{med:.digits$} [{:.digits$}–{:.digits$}]",
            v[0],
            v[v.len() - 1]
        )
    }
}

/// One row of the table: its name, the figure of a sample, the digits shown.
type Row = (&'static str, Box<dyn Fn(&Sample) -> f64>, usize);

fn print_table(args: &Args, results: &BTreeMap<usize, Vec<Sample>>) {
    println!();
    println!(
        "median [min–max] of {} runs; MiB unless named; {} idle connections per listener; \
         load: {LOAD_CONNECTIONS} connections for {} s; settle {} s",
        args.runs, args.conns, args.load_secs, args.settle_secs
    );
    let conns = args.conns;
    let rows: [Row; 18] = [
        ("(a) idle VmRSS", Box::new(|s| mib(s.idle_rss)), 1),
        ("(a) idle RssAnon", Box::new(|s| mib(s.idle_anon)), 1),
        ("(a) idle RssFile", Box::new(|s| mib(s.idle_file)), 1),
        (
            "(d) peak VmHWM, 32 conns under load",
            Box::new(|s| mib(s.load_peak)),
            1,
        ),
        (
            "(d) peak RssAnon (sampled), under load",
            Box::new(|s| mib(s.load_peak_anon)),
            1,
        ),
        (
            "(d) peak RssFile (sampled), under load",
            Box::new(|s| mib(s.load_peak_file)),
            1,
        ),
        ("(d) req/s", Box::new(|s| s.load_rps), 0),
        ("(d) proxy CPU µs/request", Box::new(|s| s.load_cpu_us), 1),
        ("before the burst VmRSS", Box::new(|s| mib(s.before_rss)), 1),
        (
            "(b) VmRSS, idle conns open",
            Box::new(|s| mib(s.burst_rss)),
            1,
        ),
        (
            "(b) RssAnon, idle conns open",
            Box::new(|s| mib(s.burst_anon)),
            1,
        ),
        ("(b) VmHWM", Box::new(|s| mib(s.burst_hwm)), 1),
        (
            "(b) KiB per connection",
            Box::new(move |s| per_conn(s, conns)),
            1,
        ),
        ("(c) VmRSS when dropped", Box::new(|s| mib(s.closed_rss)), 1),
        ("(c) VmRSS after settle", Box::new(|s| mib(s.after_rss)), 1),
        (
            "(c) RssAnon after settle",
            Box::new(|s| mib(s.after_anon)),
            1,
        ),
        (
            "(c') VmRSS, one more conn per listener",
            Box::new(|s| mib(s.next_rss)),
            1,
        ),
        (
            "(c') RssAnon, one more conn per listener",
            Box::new(|s| mib(s.next_anon)),
            1,
        ),
    ];
    let mut header = String::from("| figure |");
    let mut rule = String::from("|---|");
    for (label, _) in &args.bins {
        header.push_str(&format!(" {label} |"));
        rule.push_str("---|");
    }
    println!("{header}\n{rule}");
    for (name, f, digits) in rows.iter() {
        let mut line = format!("| {name} |");
        for i in 0..args.bins.len() {
            let s = results.get(&i).map(Vec::as_slice).unwrap_or_default();
            if s.is_empty() {
                line.push_str(" – |");
            } else {
                line.push_str(&format!(" {} |", stat(s, f, *digits)));
            }
        }
        println!("{line}");
    }
    let mut line = String::from("| proxy threads |");
    for i in 0..args.bins.len() {
        let t = results
            .get(&i)
            .and_then(|s| s.first())
            .map_or(0, |s| s.threads);
        line.push_str(&format!(" {t} |"));
    }
    println!("{line}");
}

fn per_conn(s: &Sample, conns: usize) -> f64 {
    if conns == 0 {
        return 0.0;
    }
    (s.burst_rss.saturating_sub(s.before_rss)) as f64 / (2 * conns) as f64
}

fn free_port() -> Result<u16, String> {
    let l = StdListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// The repository root (this file is `benches/memory/main.rs`).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A fresh directory with a CA, the article's config and the sidecar settings.
fn write_world(
    bin: &Path,
    inbound: u16,
    outbound: u16,
    admin: u16,
    app: SocketAddr,
) -> Result<PathBuf, String> {
    let base = std::env::temp_dir().join(format!("mesh-memory-{}-{inbound}", std::process::id()));
    let config = base.join("config");
    std::fs::create_dir_all(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    let article = repo_root().join("examples/sidecar/config");
    let entries = std::fs::read_dir(&article).map_err(|e| format!("{}: {e}", article.display()))?;
    for e in entries.flatten() {
        let name = e.file_name();
        // STRICT is replaced by PERMISSIVE below so the load can speak plaintext.
        if name.to_string_lossy().starts_with("peer-authentication") {
            continue;
        }
        std::fs::copy(e.path(), config.join(&name)).map_err(|e| format!("copy: {e}"))?;
    }
    let extra = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  \
         name: default\n  namespace: production\nspec:\n  mtls:\n    mode: PERMISSIVE\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  \
         name: memory-self\n  namespace: production\nspec:\n  hosts: [{SELF_HOST}]\n  \
         location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  \
         - {{number: 80, name: http, protocol: HTTP}}\n  endpoints:\n  \
         - address: 127.0.0.1\n    ports: {{http: {inbound}}}\n    \
         labels: {{app: order-service, version: v1}}\n    serviceAccount: order-service\n"
    );
    std::fs::write(config.join("memory-bench.yaml"), extra).map_err(|e| e.to_string())?;
    let ca = base.join("ca");
    if !ca.join("ca-key.pem").exists() {
        let st = Command::new(bin)
            .args(["ca", "init", "--trust-domain", "cluster.local", "--out"])
            .arg(&ca)
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("{} ca init: {e}", bin.display()))?;
        if !st.success() {
            return Err(format!("{} ca init: {st}", bin.display()));
        }
    }
    let settings = format!(
        "workload:\n  namespace: production\n  serviceAccount: order-service\n  labels:\n    \
         app: order-service\n    version: v1\nconfigDir: {config}\nsvid:\n  caDir: {ca}\n\
         listeners:\n  inbound: 127.0.0.1:{inbound}\n  outbound: 127.0.0.1:{outbound}\n  \
         admin: 127.0.0.1:{admin}\n  app: {app}\n",
        config = config.display(),
        ca = ca.display(),
    );
    std::fs::write(base.join("sidecar.yaml"), settings).map_err(|e| e.to_string())?;
    Ok(base)
}

/// The backend: answers every request with 1 KiB.
async fn backend() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let body = Bytes::from(vec![b'x'; 1024]);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move { Ok::<_, hyper::Error>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// `/proc/<pid>/status` fields in KiB (and `Threads`).
fn status(pid: u32) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let n = v.split_whitespace().next()?.parse().ok()?;
            Some((k.to_string(), n))
        })
        .collect()
}

/// With `MEMORY_SMAPS_DIR` set, copies `/proc/<pid>/smaps` there as `smaps-<pid>-<phase>`
/// (which mappings the resident pages belong to: the binary's text, its relocated data, the
/// heap, the thread stacks).
fn save_smaps(pid: u32, phase: &str) {
    if let Some(dir) = std::env::var_os("MEMORY_SMAPS_DIR") {
        let to = Path::new(&dir).join(format!("smaps-{pid}-{phase}"));
        if let Err(e) = std::fs::copy(format!("/proc/{pid}/smaps"), &to) {
            eprintln!("memory: {}: {e}", to.display());
        }
    }
}

fn field(s: &BTreeMap<String, u64>, k: &str) -> u64 {
    s.get(k).copied().unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The `mesh-proxy` process: `child` itself or, under a wrapper, its descendant.
fn find_proxy(child: u32) -> Option<u32> {
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm(child).starts_with("mesh-proxy") {
        return Some(child);
    }
    let mut parents: BTreeMap<u32, u32> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok());
        if let Some(ppid) = ppid {
            parents.insert(pid, ppid);
        }
    }
    parents.keys().copied().find(|&pid| {
        let mut p = pid;
        let mut depth = 0;
        while let Some(&pp) = parents.get(&p) {
            if pp == child {
                return comm(pid).starts_with("mesh-proxy");
            }
            p = pp;
            depth += 1;
            if depth > 8 {
                break;
            }
        }
        false
    })
}

async fn connect(
    addr: SocketAddr,
) -> Result<(SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>), String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((tx, task))
}

async fn get(tx: &mut SendRequest<Empty<Bytes>>, host: &str) -> Result<usize, String> {
    tx.ready().await.map_err(|e| format!("ready: {e}"))?;
    let req = Request::get("/api/v1/orders")
        .header("host", host)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    if !status.is_success() || body.len() != 1024 {
        return Err(format!(
            "{host}: status {status}, {} bytes (the backend sends 1024): {}",
            body.len(),
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(body.len())
}

struct Proxy {
    child: Child,
    pid: u32,
}

impl Proxy {
    /// SIGTERM to the proxy (a profiler around it then writes its file), then wait.
    /// `MEMORY_STOP_SIGNAL=KILL` ends it at once instead, so that what a heap profiler
    /// reports as never freed is what was live after the last measurement.
    async fn stop(mut self) {
        let signal = std::env::var("MEMORY_STOP_SIGNAL").unwrap_or_else(|_| "TERM".into());
        let _ = Command::new("kill")
            .args([format!("-{signal}"), self.pid.to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run_once(args: &Args, bin: &Path) -> Result<Sample, String> {
    let app = backend().await?;
    let (inbound, outbound, admin) = (free_port()?, free_port()?, free_port()?);
    let dir = write_world(bin, inbound, outbound, admin, app)?;
    let log = std::fs::File::create(dir.join("sidecar.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("sidecar")
        .arg("--settings")
        .arg(dir.join("sidecar.yaml"))
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    if let Some(w) = args.workers {
        cmd.arg("--worker-threads").arg(w.to_string());
    }
    let child = cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?;
    let child_pid = child.id();
    let mut proxy = Proxy {
        child,
        pid: child_pid,
    };
    let result = measure(args, &mut proxy, inbound, outbound, admin, &dir).await;
    proxy.stop().await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("memory: the sidecar's files are kept in {}", dir.display());
    }
    result
}

async fn measure(
    args: &Args,
    proxy: &mut Proxy,
    inbound: u16,
    outbound: u16,
    admin: u16,
    dir: &Path,
) -> Result<Sample, String> {
    let inbound: SocketAddr = ([127, 0, 0, 1], inbound).into();
    let outbound: SocketAddr = ([127, 0, 0, 1], outbound).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    // Ready: the admin server answers /healthz/ready with 200.
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(Some(st)) = proxy.child.try_wait() {
            return Err(format!(
                "the sidecar exited ({st}); log: {}",
                dir.join("sidecar.log").display()
            ));
        }
        if let Ok((mut tx, _t)) = connect(admin).await {
            let req = Request::get("/healthz/ready")
                .header("host", "admin")
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            if let Ok(r) = tx.send_request(req).await
                && r.status().is_success()
            {
                ready = true;
                break;
            }
        }
        sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        return Err("the sidecar did not become ready in 30 s".into());
    }
    let pid = find_proxy(proxy.child.id()).ok_or("no mesh-proxy process under the child")?;
    proxy.pid = pid;
    let mut s = Sample::default();

    // (a) idle.
    sleep(Duration::from_secs(2)).await;
    let st = status(pid);
    s.idle_rss = field(&st, "VmRSS");
    s.idle_anon = field(&st, "RssAnon");
    s.idle_file = field(&st, "RssFile");
    save_smaps(pid, "idle");

    // (d) 32 keep-alive connections under load; the peak is VmHWM after a reset.
    if args.load_secs > 0 {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut set = JoinSet::new();
        for _ in 0..LOAD_CONNECTIONS {
            let (mut tx, task) = connect(inbound).await?;
            let (stop, done) = (stop.clone(), done.clone());
            set.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    get(&mut tx, "order-service").await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                drop(tx);
                task.abort();
                Ok::<_, String>(())
            });
        }
        // Warm-up second, then count.
        sleep(Duration::from_secs(1)).await;
        let (n0, c0, t0) = (
            done.load(Ordering::Relaxed),
            cpu_ticks(pid),
            tokio::time::Instant::now(),
        );
        // RssAnon sampled every 100 ms: the peak of the process's own (not file-backed) pages.
        let t_end = t0 + Duration::from_secs(args.load_secs);
        while tokio::time::Instant::now() < t_end {
            let st = status(pid);
            s.load_peak_anon = s.load_peak_anon.max(field(&st, "RssAnon"));
            s.load_peak_file = s.load_peak_file.max(field(&st, "RssFile"));
            sleep(Duration::from_millis(100)).await;
        }
        save_smaps(pid, "load");
        let (n1, c1, elapsed) = (done.load(Ordering::Relaxed), cpu_ticks(pid), t0.elapsed());
        stop.store(true, Ordering::Relaxed);
        while let Some(r) = set.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        let n = (n1 - n0).max(1);
        s.load_rps = n as f64 / elapsed.as_secs_f64();
        s.load_cpu_us = (c1 - c0) as f64 * 1e6 / clock_ticks_per_sec() as f64 / n as f64;
        s.load_peak = field(&status(pid), "VmHWM");
    }
    sleep(Duration::from_secs(args.settle_secs)).await;
    let fds_before = fd_count(pid);
    s.before_rss = field(&status(pid), "VmRSS");
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");

    // (b) idle keep-alive connections on both listeners: one request each, then nothing.
    let mut open = Vec::with_capacity(2 * args.conns);
    for (addr, host) in [(outbound, SELF_HOST), (inbound, "order-service")] {
        let mut left = args.conns;
        while left > 0 {
            let batch = left.min(100);
            left -= batch;
            let mut set = JoinSet::new();
            for _ in 0..batch {
                set.spawn(async move {
                    let (mut tx, task) = connect(addr).await?;
                    get(&mut tx, host).await?;
                    Ok::<_, String>((tx, task))
                });
            }
            while let Some(r) = set.join_next().await {
                open.push(r.map_err(|e| e.to_string())??);
            }
        }
    }
    sleep(Duration::from_secs(2)).await;
    let st = status(pid);
    s.burst_rss = field(&st, "VmRSS");
    s.burst_anon = field(&st, "RssAnon");
    s.burst_hwm = field(&st, "VmHWM");
    s.threads = field(&st, "Threads");

    // (c) close them all; wait until the proxy has dropped them.
    for (tx, task) in open.drain(..) {
        drop(tx);
        task.abort();
    }
    // Dropped: the descriptors are back to their count before the burst, or (upstream
    // connections the burst added to the pool stay open, as they should) no longer fall for
    // 2 s.
    let t0 = tokio::time::Instant::now();
    let (mut last, mut since) = (usize::MAX, t0);
    loop {
        let n = fd_count(pid);
        if n < last {
            (last, since) = (n, tokio::time::Instant::now());
        }
        if n <= fds_before + 4
            || since.elapsed() >= Duration::from_secs(2)
            || t0.elapsed() >= Duration::from_secs(60)
        {
            break;
        }
        sleep(Duration::from_millis(50)).await;
    }
    s.close_wait_ms = since.duration_since(t0).as_millis() as u64;
    s.fds_left = fd_count(pid).saturating_sub(fds_before);
    s.closed_rss = field(&status(pid), "VmRSS");
    sleep(Duration::from_secs(args.settle_secs)).await;
    let st = status(pid);
    s.after_rss = field(&st, "VmRSS");
    s.after_anon = field(&st, "RssAnon");

    // (c') one more connection to each listener, then settle again: a listener frees the
    // tasks of its finished connections when it accepts the next one.
    for (addr, host) in [(outbound, SELF_HOST), (inbound, "order-service")] {
        let (mut tx, task) = connect(addr).await?;
        get(&mut tx, host).await?;
        drop(tx);
        task.abort();
    }
    sleep(Duration::from_secs(args.settle_secs)).await;
    let st = status(pid);
    s.next_rss = field(&st, "VmRSS");
    s.next_anon = field(&st, "RssAnon");
    Ok(s)
}
