//! `load`: one command that measures what one `mesh-proxy` hop costs next to nginx,
//! HAProxy and a bare hyper proxy (the floor), on this machine and in one run, and prints
//! the tables of `benches/load/README.md` with the ratios.
//!
//! ```text
//! cargo build --release -p mesh-proxy -p benches
//! target/release/load [--quick] [--repeats N] [--secs S] [--targets a,b,...] [--out FILE]
//! ```
//!
//! For every repeat and every target it starts fresh processes: the backend
//! (`load-backend`, 1 KiB body) and the proxy, both pinned to `--server-cpu`; the load
//! (`load-gen`, `wrk`) runs pinned to `--loadgen-cpu`. Targets: `direct` (no proxy),
//! `floor` (`load-floor`), `nginx` and `haproxy` (when installed: one worker, keep-alive
//! pools both sides), `mesh` (one sidecar's inbound hop, `benches/load/run.sh inbound`),
//! `mesh-mtls` (two sidecars, STRICT mTLS between them, `run.sh mtls`) and `mesh-plain`
//! (the same two sidecars in plaintext, `run.sh plain`). Per target it measures: the
//! unloaded round trip (`load-gen rtt`); an open loop at each `--rates` (latency from each
//! request's due time; the proxy's CPU per request and, at the first rate, its context
//! switches per request); a short window at the first rate with the system calls counted
//! (`perf stat` or `strace -c`), and for the two-sidecar targets the connections the client
//! sidecar opened; saturation (`wrk -t1 -c32`, or `load-gen closed`); and peak RSS.
//!
//! Environment: `SCHED=fifo` runs the servers and the load under `chrt -f $RT_PRIO`;
//! `KEEP_AWAKE=0` turns off the idle spinners that keep the vCPUs from halting;
//! `SYSCALLS=perf|strace|off`; `SATURATION=wrk|closed`; `MESH_PROXY_BIN`.
//! Measurement only: nothing is asserted on the figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Output, Stdio};
use std::time::Duration;

use benches::load::{
    context_switches, cpu_jiffies, cpu_micros, free_port, parse_pairs, parse_perf_csv,
    parse_strace_summary, parse_wrk, peak_rss_kib, process_tree, status_sum,
};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser};
use tokio::sync::mpsc;
use tokio::time::sleep;

/// Measures one mesh-proxy hop next to nginx, HAProxy and a bare hyper proxy.
#[derive(Parser, Clone)]
struct Args {
    /// Targets, in the order they run in each repeat.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,floor,nginx,haproxy,mesh,mesh-mtls,mesh-plain"
    )]
    targets: Vec<String>,
    /// Repeats (fresh processes each).
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Seconds of each measured window.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Seconds of load before each measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Fixed rates, requests per second; the first one also gets the system-call and
    /// context-switch counts.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<f64>,
    /// Connections of the fixed-rate load.
    #[arg(long, default_value_t = 4)]
    rate_conns: usize,
    /// Connections of the saturating load.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// Sequential requests of the unloaded round trip.
    #[arg(long, default_value_t = 10_000)]
    rtt_requests: u64,
    /// Seconds of the system-call window (at the first rate).
    #[arg(long, default_value_t = 2.0)]
    syscall_secs: f64,
    /// Response body size.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// The CPU of the load generators.
    #[arg(long, env = "LOADGEN_CPU", default_value_t = 0)]
    loadgen_cpu: u32,
    /// The CPU the backend and the proxy share.
    #[arg(long, env = "SERVER_CPU", default_value_t = 1)]
    server_cpu: u32,
    /// `other`, or `fifo` (servers and load generators under `chrt -f`).
    #[arg(long, env = "SCHED", default_value = "other")]
    sched: String,
    /// The SCHED_FIFO priority.
    #[arg(long, env = "RT_PRIO", default_value_t = 10)]
    rt_prio: u32,
    /// One SCHED_IDLE busy loop per CPU during the run (keeps the vCPUs from halting).
    #[arg(long, env = "KEEP_AWAKE", default_value_t = true, action = ArgAction::Set,
          value_parser = BoolishValueParser::new())]
    keep_awake: bool,
    /// `auto` (perf if it works, else strace), `perf`, `strace` or `off`.
    #[arg(long, env = "SYSCALLS", default_value = "auto")]
    syscalls: String,
    /// `auto` (wrk when installed), `wrk` or `closed` (load-gen's closed loop).
    #[arg(long, env = "SATURATION", default_value = "auto")]
    saturation: String,
    /// The mesh-proxy binary (default: next to this one).
    #[arg(long, env = "MESH_PROXY_BIN")]
    mesh_proxy: Option<PathBuf>,
    /// Also write the report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A short run that proves the harness works: 1 repeat, 1.5 s windows.
    #[arg(long)]
    quick: bool,
}

/// One target's figures in one repeat (CPU in µs per request, memory in MiB).
#[derive(Clone, Debug, Default)]
struct Sample {
    rtt_p50: Option<f64>,
    rtt_added: Option<f64>,
    rates: Vec<RateSample>,
    sat_cpu: Option<f64>,
    sat_backend_cpu: Option<f64>,
    sat_rps: Option<f64>,
    rss_mib: Option<f64>,
    anon_mib: Option<f64>,
    syscalls: Option<f64>,
    switches: Option<f64>,
    connects: Option<f64>,
    upstream_open: Option<f64>,
}

#[derive(Clone, Debug, Default)]
struct RateSample {
    cpu: Option<f64>,
    rps: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.quick {
        args.repeats = 1;
        args.secs = 1.5;
        args.warmup_secs = 0.5;
        args.rtt_requests = 2_000;
        args.syscall_secs = 1.0;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        tokio::select! {
            r = run(args) => match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("load: {e}");
                    ExitCode::FAILURE
                }
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("load: interrupted");
                ExitCode::from(130)
            }
        }
    })
}

/// Where the binaries and scripts are.
struct Tools {
    bin_dir: PathBuf,
    mesh_proxy: PathBuf,
    run_sh: PathBuf,
    nginx: bool,
    haproxy: bool,
    wrk: bool,
    syscalls: Syscalls,
    /// The idle spinners' PIDs.
    spinners: Vec<u32>,
}

/// Pauses the idle spinners while it lives.
struct Paused<'a>(&'a [u32]);

impl<'a> Paused<'a> {
    fn new(pids: &'a [u32]) -> Self {
        signal("-STOP", pids);
        Self(pids)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Syscalls {
    Perf,
    Strace,
    Off,
}

fn installed(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn perf_works() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map(|o| {
            o.status.success()
                && parse_perf_csv(&String::from_utf8_lossy(&o.stderr))
                    .contains_key("raw_syscalls:sys_enter")
        })
        .unwrap_or(false)
}

fn tools(args: &Args) -> Result<Tools, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let bin_dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or("no directory for this binary")?;
    for b in ["load-gen", "load-backend", "load-floor"] {
        if !bin_dir.join(b).exists() {
            return Err(format!(
                "{} not found (cargo build --release -p benches)",
                bin_dir.join(b).display()
            ));
        }
    }
    let mesh_proxy = args
        .mesh_proxy
        .clone()
        .unwrap_or_else(|| bin_dir.join("mesh-proxy"));
    let syscalls = match args.syscalls.as_str() {
        "off" => Syscalls::Off,
        "perf" => Syscalls::Perf,
        "strace" => Syscalls::Strace,
        _ if perf_works() => Syscalls::Perf,
        _ if installed("strace", "-V") => Syscalls::Strace,
        _ => Syscalls::Off,
    };
    Ok(Tools {
        bin_dir,
        mesh_proxy,
        run_sh: Path::new(env!("CARGO_MANIFEST_DIR")).join("load/run.sh"),
        nginx: installed("nginx", "-v"),
        haproxy: installed("haproxy", "-v"),
        wrk: match args.saturation.as_str() {
            "closed" => false,
            _ => installed("wrk", "-v"),
        },
        syscalls,
        spinners: Vec::new(),
    })
}

/// A process the harness started (the proxy, the backend, a spinner), with its
/// descendants ended when it is stopped or dropped.
struct Proc {
    name: String,
    child: Child,
    pid: u32,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{name}: {e}"))?;
        let pid = child.id();
        Ok(Self {
            name: name.to_string(),
            child,
            pid,
        })
    }

    fn tree(&self) -> Vec<u32> {
        process_tree(self.pid)
    }

    /// Waits up to `limit` for the process to exit: whether it did.
    async fn exited(&mut self, limit: Duration) -> bool {
        for _ in 0..(limit.as_millis() / 20).max(1) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return true;
            }
            sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn stop(mut self) {
        let tree = self.tree();
        signal("-TERM", &tree);
        if !self.exited(Duration::from_secs(3)).await {
            eprintln!("load: {} did not stop on SIGTERM; killing it", self.name);
        }
        signal("-KILL", &tree);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal("-KILL", &self.tree());
        }
    }
}

fn signal(sig: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(sig)
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `program` pinned to `cpu` (and under SCHED_FIFO when asked).
fn pinned(args: &Args, cpu: u32, program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(cpu.to_string());
    if args.sched == "fifo" {
        cmd.args(["chrt", "-f", &args.rt_prio.to_string()]);
    }
    cmd.arg(program);
    cmd
}

async fn wait_port(port: u16, proc: &mut Proc) -> Result<(), String> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Err(format!("{} exited: {status}", proc.name));
        }
        sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{} does not listen on {port}", proc.name))
}

/// The running servers of one target.
struct Setup {
    backend: Proc,
    proxy: Option<Proc>,
    /// What the load is sent to.
    target: SocketAddr,
    /// The server sidecar's inbound port (two-sidecar targets).
    server_inbound: Option<u16>,
}

impl Setup {
    fn measured(&self) -> Vec<u32> {
        self.proxy
            .as_ref()
            .map_or_else(|| self.backend.tree(), Proc::tree)
    }

    async fn stop(self) {
        if let Some(p) = self.proxy {
            p.stop().await;
        }
        self.backend.stop().await;
    }
}

fn nginx_conf(dir: &Path, listen: u16, backend: u16) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  \
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 1000000; }}\n  \
         server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n      \
         proxy_pass http://backend;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
    )
}

fn haproxy_cfg(listen: u16, backend: u16) -> String {
    format!(
        "global\n  nbthread 1\n  maxconn 4096\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  \
         option http-keep-alive\n  http-reuse always\n\
         frontend fe\n  bind 127.0.0.1:{listen}\n  default_backend be\n\
         backend be\n  server s1 127.0.0.1:{backend}\n"
    )
}

async fn start(args: &Args, tools: &Tools, target: &str, dir: &Path) -> Result<Setup, String> {
    let port = |e: std::io::Error| format!("free port: {e}");
    let backend_port = free_port().map_err(port)?;
    let mut cmd = pinned(args, args.server_cpu, &tools.bin_dir.join("load-backend"));
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{backend_port}"))
        .arg("--body-bytes")
        .arg(args.body_bytes.to_string());
    let mut backend = Proc::spawn("load-backend", cmd, &dir.join("backend.log"))?;
    wait_port(backend_port, &mut backend).await?;
    let proxy_port = free_port().map_err(port)?;
    let listen = format!("127.0.0.1:{proxy_port}");
    let backend_addr = format!("127.0.0.1:{backend_port}");
    let mut server_inbound = None;
    let proxy = match target {
        "direct" => None,
        "floor" => {
            let mut cmd = pinned(args, args.server_cpu, &tools.bin_dir.join("load-floor"));
            cmd.args(["--listen", &listen, "--upstream", &backend_addr]);
            Some(Proc::spawn("load-floor", cmd, &dir.join("floor.log"))?)
        }
        "nginx" => {
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(dir, proxy_port, backend_port))
                .map_err(|e| e.to_string())?;
            let mut cmd = pinned(args, args.server_cpu, Path::new("nginx"));
            cmd.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("nginx-error.log"))
                .arg("-c")
                .arg(&conf);
            Some(Proc::spawn("nginx", cmd, &dir.join("nginx.log"))?)
        }
        "haproxy" => {
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_cfg(proxy_port, backend_port))
                .map_err(|e| e.to_string())?;
            let mut cmd = pinned(args, args.server_cpu, Path::new("haproxy"));
            cmd.arg("-db").arg("-f").arg(&cfg);
            Some(Proc::spawn("haproxy", cmd, &dir.join("haproxy.log"))?)
        }
        "mesh" | "mesh-mtls" | "mesh-plain" => {
            if !tools.mesh_proxy.exists() {
                return Err(format!(
                    "{} not found (cargo build --release -p mesh-proxy)",
                    tools.mesh_proxy.display()
                ));
            }
            let mode = match target {
                "mesh" => "inbound",
                "mesh-mtls" => "mtls",
                _ => "plain",
            };
            let mut cmd = pinned(args, args.server_cpu, Path::new("bash"));
            cmd.arg(&tools.run_sh)
                .args([mode, &listen, &backend_addr])
                .env("MESH_PROXY_BIN", &tools.mesh_proxy)
                .env("LOAD_DIR", dir.join("mesh"))
                .env("PROXY_WORKERS", "1");
            if mode != "inbound" {
                let inbound = free_port().map_err(port)?;
                cmd.env("SERVER_INBOUND_PORT", inbound.to_string());
                server_inbound = Some(inbound);
            }
            Some(Proc::spawn(target, cmd, &dir.join("mesh-proxy.log"))?)
        }
        other => return Err(format!("unknown target {other}")),
    };
    let mut setup = Setup {
        backend,
        proxy,
        target: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
        server_inbound,
    };
    match setup.proxy.as_mut() {
        None => setup.target = SocketAddr::from(([127, 0, 0, 1], backend_port)),
        Some(p) => wait_port(proxy_port, p).await?,
    }
    if let Some(inbound) = server_inbound
        && let Some(p) = setup.proxy.as_mut()
    {
        wait_port(inbound, p).await?;
    }
    // The first request may race the configuration being read: retry for a while.
    let mut last = String::new();
    for _ in 0..50 {
        let mut cmd = loadgen(args, tools);
        cmd.arg("check")
            .arg("--target")
            .arg(setup.target.to_string())
            .arg("--body-bytes")
            .arg(args.body_bytes.to_string());
        let out = output(cmd).await?;
        if out.status.success() {
            return Ok(setup);
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        sleep(Duration::from_millis(100)).await;
    }
    setup.stop().await;
    Err(format!(
        "{target}: no good answer ({last}); logs in {}",
        dir.display()
    ))
}

fn loadgen(args: &Args, tools: &Tools) -> Command {
    pinned(args, args.loadgen_cpu, &tools.bin_dir.join("load-gen"))
}

/// Runs `cmd` to its end (off the runtime's thread).
async fn output(mut cmd: Command) -> Result<Output, String> {
    let name = format!("{:?}", cmd.get_program());
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{name}: {e}"))
}

fn pair_f64(m: &BTreeMap<String, String>, k: &str) -> Option<f64> {
    m.get(k)?.parse().ok()
}

/// Runs a `load-gen` that prints `measuring`/`done`, calling `at` on each of the two
/// lines; returns its `result` pairs.
async fn windowed(
    mut cmd: Command,
    mut at: impl FnMut(&str),
) -> Result<BTreeMap<String, String>, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("load-gen: {e}"))?;
    let out = child.stdout.take().ok_or("load-gen: no stdout")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
        child.wait()
    });
    let mut result = None;
    while let Some(line) = rx.recv().await {
        match line.as_str() {
            "measuring" | "done" => at(&line),
            l if l.starts_with("result ") => result = Some(parse_pairs(l)),
            _ => {}
        }
    }
    let status = reader
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    result.ok_or_else(|| format!("load-gen failed: {status}"))
}

/// CPU (µs) of the measured processes and of the backend, and context switches.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    proxy: f64,
    backend: f64,
    switches: u64,
}

fn snapshot(setup: &Setup) -> Snapshot {
    let measured = setup.measured();
    Snapshot {
        proxy: cpu_micros(&measured),
        backend: cpu_micros(&setup.backend.tree()),
        switches: context_switches(&measured),
    }
}

/// The fixed-rate phase at `rate`.
async fn at_rate(
    args: &Args,
    tools: &Tools,
    setup: &Setup,
    rate: f64,
) -> Result<(RateSample, Option<f64>), String> {
    let mut cmd = loadgen(args, tools);
    cmd.arg("rate")
        .args(["--target", &setup.target.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--secs", &args.secs.to_string()])
        .args(["--warmup-secs", &args.warmup_secs.to_string()])
        .args(["--conns", &args.rate_conns.to_string()]);
    let (mut before, mut after) = (Snapshot::default(), Snapshot::default());
    let result = windowed(cmd, |l| {
        if l == "measuring" {
            before = snapshot(setup);
        } else {
            after = snapshot(setup);
        }
    })
    .await?;
    let requests = pair_f64(&result, "requests").unwrap_or(0.0);
    let per = |d: f64| (requests > 0.0).then(|| d / requests);
    let proxied = setup.proxy.is_some();
    Ok((
        RateSample {
            cpu: per(after.proxy - before.proxy).filter(|_| proxied),
            rps: pair_f64(&result, "rps"),
            p50: pair_f64(&result, "p50_us"),
            p99: pair_f64(&result, "p99_us"),
            p999: pair_f64(&result, "p999_us"),
        },
        per((after.switches - before.switches) as f64),
    ))
}

/// Counts the measured processes' system calls (and the client sidecar's `connect`s)
/// over a short window at `rate`: (syscalls per request, connects per request).
async fn syscalls(
    args: &Args,
    tools: &Tools,
    setup: &Setup,
    rate: f64,
    dir: &Path,
) -> Result<(Option<f64>, Option<f64>), String> {
    let Some(proxy) = setup.proxy.as_ref() else {
        return Ok((None, None));
    };
    let pids = proxy.tree();
    let two = setup.server_inbound.is_some();
    let mut tracers = Vec::new();
    match tools.syscalls {
        Syscalls::Off => return Ok((None, None)),
        Syscalls::Perf => {
            let list = pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let mut all = Command::new("perf");
            all.args([
                "stat",
                "-x,",
                "-e",
                "raw_syscalls:sys_enter",
                "-p",
                &list,
                "-o",
            ])
            .arg(dir.join("perf-all.csv"));
            tracers.push(Proc::spawn("perf", all, &dir.join("perf.log"))?);
            if two {
                let mut connects = Command::new("perf");
                connects
                    .args(["stat", "-x,", "-e", "syscalls:sys_enter_connect", "-p"])
                    .arg(proxy.pid.to_string())
                    .arg("-o")
                    .arg(dir.join("perf-connect.csv"));
                tracers.push(Proc::spawn(
                    "perf",
                    connects,
                    &dir.join("perf-connect.log"),
                )?);
            }
        }
        Syscalls::Strace => {
            for pid in &pids {
                let mut cmd = Command::new("strace");
                cmd.args(["-c", "-f", "-q", "-p", &pid.to_string(), "-o"])
                    .arg(dir.join(format!("strace-{pid}.txt")));
                tracers.push(Proc::spawn("strace", cmd, &dir.join("strace.log"))?);
            }
        }
    }
    sleep(Duration::from_millis(300)).await;
    let mut cmd = loadgen(args, tools);
    cmd.arg("rate")
        .args(["--target", &setup.target.to_string()])
        .args(["--rate", &rate.to_string()])
        .args(["--secs", &args.syscall_secs.to_string()])
        .args(["--warmup-secs", "0"])
        .args(["--conns", &args.rate_conns.to_string()]);
    let result = windowed(cmd, |_| {}).await;
    for t in &tracers {
        signal("-INT", &[t.pid]);
    }
    for mut t in tracers {
        t.exited(Duration::from_secs(5)).await;
    }
    let requests = pair_f64(&result?, "requests").unwrap_or(0.0);
    if requests <= 0.0 {
        return Ok((None, None));
    }
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    Ok(match tools.syscalls {
        Syscalls::Perf => (
            parse_perf_csv(&read("perf-all.csv"))
                .get("raw_syscalls:sys_enter")
                .map(|n| *n as f64 / requests),
            two.then(|| {
                parse_perf_csv(&read("perf-connect.csv"))
                    .get("syscalls:sys_enter_connect")
                    .map(|n| *n as f64 / requests)
            })
            .flatten(),
        ),
        _ => {
            let total: u64 = pids
                .iter()
                .filter_map(|p| {
                    parse_strace_summary(&read(&format!("strace-{p}.txt")))
                        .get("total")
                        .copied()
                })
                .sum();
            let connects = two.then(|| {
                parse_strace_summary(&read(&format!("strace-{}.txt", proxy.pid)))
                    .get("connect")
                    .copied()
                    .unwrap_or(0) as f64
                    / requests
            });
            ((total > 0).then(|| total as f64 / requests), connects)
        }
    })
}

/// Saturation: (proxy CPU µs/request, backend CPU µs/request, requests per second).
async fn saturation(
    args: &Args,
    tools: &Tools,
    setup: &Setup,
) -> Result<(Option<f64>, Option<f64>, Option<f64>), String> {
    // A busy core does not halt: the spinners would only take turns with the servers.
    let _paused = Paused::new(&tools.spinners);
    let (before, after, requests, rps);
    if tools.wrk {
        let url = format!("http://{}/", setup.target);
        let wrk = |secs: f64| {
            let mut cmd = pinned(args, args.loadgen_cpu, Path::new("wrk"));
            cmd.args(["-t1", &format!("-c{}", args.conns)])
                .arg(format!("-d{}s", secs.ceil().max(1.0) as u64))
                .args(["--timeout", "5s", &url]);
            cmd
        };
        output(wrk(args.warmup_secs)).await?;
        before = snapshot(setup);
        let out = output(wrk(args.secs)).await?;
        after = snapshot(setup);
        let text = String::from_utf8_lossy(&out.stdout);
        let (n, r) = parse_wrk(&text).ok_or_else(|| format!("wrk: cannot read {text:?}"))?;
        (requests, rps) = (n as f64, r);
    } else {
        let mut cmd = loadgen(args, tools);
        cmd.arg("closed")
            .args(["--target", &setup.target.to_string()])
            .args(["--secs", &args.secs.to_string()])
            .args(["--warmup-secs", &args.warmup_secs.to_string()])
            .args(["--conns", &args.conns.to_string()]);
        let (mut b, mut a) = (Snapshot::default(), Snapshot::default());
        let result = windowed(cmd, |l| {
            if l == "measuring" {
                b = snapshot(setup);
            } else {
                a = snapshot(setup);
            }
        })
        .await?;
        (before, after) = (b, a);
        requests = pair_f64(&result, "requests").unwrap_or(0.0);
        rps = pair_f64(&result, "rps").unwrap_or(0.0);
    }
    if requests <= 0.0 {
        return Ok((None, None, Some(0.0)));
    }
    Ok((
        setup
            .proxy
            .is_some()
            .then(|| (after.proxy - before.proxy) / requests),
        Some((after.backend - before.backend) / requests),
        Some(rps),
    ))
}

/// Established connections from the client sidecar to the server sidecar's inbound
/// port (`/proc/net/tcp`; the client's ends have it as their remote port).
fn connections_to(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!(":{port:04X}");
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2).is_some_and(|r| r.ends_with(&remote)) && f.get(3) == Some(&"01")
        })
        .count()
}

async fn measure(args: &Args, tools: &Tools, target: &str, dir: &Path) -> Result<Sample, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let setup = start(args, tools, target, dir).await?;
    let r = measure_running(args, tools, &setup, dir).await;
    setup.stop().await;
    r
}

async fn measure_running(
    args: &Args,
    tools: &Tools,
    setup: &Setup,
    dir: &Path,
) -> Result<Sample, String> {
    let mut s = Sample::default();
    let mut cmd = loadgen(args, tools);
    cmd.arg("rtt")
        .args(["--target", &setup.target.to_string()])
        .args(["--requests", &args.rtt_requests.to_string()])
        .args(["--warmup", &(args.rtt_requests / 10).to_string()]);
    let out = output(cmd).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    s.rtt_p50 = text
        .lines()
        .find(|l| l.starts_with("result "))
        .and_then(|l| pair_f64(&parse_pairs(l), "p50_us"));
    for (i, rate) in args.rates.iter().enumerate() {
        let (r, switches) = at_rate(args, tools, setup, *rate).await?;
        if i == 0 && setup.proxy.is_some() {
            s.switches = switches;
        }
        s.rates.push(r);
    }
    if let Some(rate) = args.rates.first() {
        (s.syscalls, s.connects) = syscalls(args, tools, setup, *rate, dir).await?;
    }
    (s.sat_cpu, s.sat_backend_cpu, s.sat_rps) = saturation(args, tools, setup).await?;
    let measured = setup.measured();
    s.rss_mib = Some(peak_rss_kib(&measured) as f64 / 1024.0);
    s.anon_mib = Some(status_sum(&measured, "RssAnon") as f64 / 1024.0);
    s.upstream_open = setup.server_inbound.map(|p| connections_to(p) as f64);
    Ok(s)
}

/// Load average and how busy each CPU was over one second (spinners paused).
async fn quiet_check(spinners: &[Proc]) -> String {
    let pids: Vec<u32> = spinners.iter().map(|p| p.pid).collect();
    signal("-STOP", &pids);
    let a = cpu_jiffies();
    sleep(Duration::from_secs(1)).await;
    let b = cpu_jiffies();
    signal("-CONT", &pids);
    let busy: Vec<String> = a
        .iter()
        .zip(&b)
        .enumerate()
        .map(|(i, (x, y))| {
            let total = y.1.saturating_sub(x.1).max(1);
            format!(
                "cpu{i} {:.0} %",
                100.0 * y.0.saturating_sub(x.0) as f64 / total as f64
            )
        })
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "load average {}; busy over 1 s: {}",
        load.join(" "),
        busy.join(", ")
    )
}

fn first_line(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
            t.push_str(&String::from_utf8_lossy(&o.stderr));
            t.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    format!(
        "{cpus} × {model}, kernel {}",
        first_line("uname", "-r").trim()
    )
}

async fn run(args: Args) -> Result<(), String> {
    let mut tools = tools(&args)?;
    let mut targets: Vec<String> = Vec::new();
    for t in &args.targets {
        match t.as_str() {
            "nginx" if !tools.nginx => eprintln!("load: nginx is not installed; skipped"),
            "haproxy" if !tools.haproxy => eprintln!("load: haproxy is not installed; skipped"),
            _ => targets.push(t.clone()),
        }
    }
    let base = std::env::temp_dir().join(format!("mesh-load-{}", std::process::id()));
    let mut spinners = Vec::new();
    if args.keep_awake {
        std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        for cpu in [args.loadgen_cpu, args.server_cpu] {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &cpu.to_string(), "chrt", "-i", "0", "sh", "-c"])
                .arg("while :; do :; done");
            spinners.push(Proc::spawn(
                "spinner",
                cmd,
                &base.join(format!("spinner{cpu}.log")),
            )?);
        }
    }
    tools.spinners = spinners.iter().map(|p| p.pid).collect();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "machine: {}; started {}",
        machine(),
        first_line("date", "-u")
    );
    let _ = writeln!(
        report,
        "settings: {} repeat(s); windows {} s after {} s of warm-up; rates {:?} req/s on {} \
         connections; saturation: {} with {} connections; unloaded RTT over {} requests; \
         load on CPU {}, backend + proxy on CPU {}; scheduling {}; idle spinners {}; \
         system calls by {:?}; {} B bodies",
        args.repeats,
        args.secs,
        args.warmup_secs,
        args.rates,
        args.rate_conns,
        if tools.wrk {
            "wrk -t1"
        } else {
            "load-gen closed"
        },
        args.conns,
        args.rtt_requests,
        args.loadgen_cpu,
        args.server_cpu,
        if args.sched == "fifo" {
            format!("SCHED_FIFO {}", args.rt_prio)
        } else {
            "SCHED_OTHER".into()
        },
        if args.keep_awake { "on" } else { "off" },
        tools.syscalls,
        args.body_bytes,
    );
    let mut versions = Vec::new();
    if tools.nginx {
        versions.push(first_line("nginx", "-v"));
    }
    if tools.haproxy {
        versions.push(first_line("haproxy", "-v"));
    }
    if tools.wrk {
        versions.push(first_line("wrk", "-v"));
    }
    let _ = writeln!(report, "peers: {}", versions.join("; "));
    eprint!("{report}");
    let mut results: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for repeat in 1..=args.repeats {
        let quiet = quiet_check(&spinners).await;
        let line = format!("repeat {repeat}: before it, {quiet}");
        eprintln!("{line}");
        let _ = writeln!(report, "{line}");
        let mut this: BTreeMap<String, Sample> = BTreeMap::new();
        for target in &targets {
            let dir = base.join(format!("{repeat}-{target}"));
            eprintln!("load: repeat {repeat}: {target}");
            let s = measure(&args, &tools, target, &dir).await?;
            eprintln!("load: {target}: {s:?}");
            this.insert(target.clone(), s);
        }
        let direct = this.get("direct").and_then(|s| s.rtt_p50);
        for (target, mut s) in this {
            if target != "direct" {
                s.rtt_added = s.rtt_p50.zip(direct).map(|(p, d)| p - d);
            }
            results.entry(target).or_default().push(s);
        }
    }
    for s in spinners {
        s.stop().await;
    }
    report.push('\n');
    report.push_str(&tables(&args, &results));
    println!("\n{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("load: written to {}", out.display());
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

/// One row: its name, the figure of a sample, the digits shown, and whether ratios are
/// shown.
type Row = (String, Box<dyn Fn(&Sample) -> Option<f64>>, usize, bool);

fn rows(args: &Args, pairs: bool) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for (i, rate) in args.rates.iter().enumerate() {
        rows.push((
            format!("CPU µs/request @{rate} req/s"),
            Box::new(move |s| s.rates.get(i)?.cpu),
            1,
            true,
        ));
    }
    rows.push((
        "CPU µs/request at saturation".into(),
        Box::new(|s| s.sat_cpu),
        1,
        true,
    ));
    rows.push((
        "max req/s, proxy sharing a core with the backend".into(),
        Box::new(|s| s.sat_rps),
        0,
        true,
    ));
    rows.push((
        "added unloaded RTT p50, µs (vs direct)".into(),
        Box::new(|s| s.rtt_added),
        1,
        true,
    ));
    rows.push((
        "peak RSS (VmHWM, all processes), MiB".into(),
        Box::new(|s| s.rss_mib),
        1,
        true,
    ));
    rows.push((
        "of which anonymous (RssAnon at the end: heap, stacks), MiB".into(),
        Box::new(|s| s.anon_mib),
        1,
        false,
    ));
    if let Some(rate) = args.rates.first() {
        rows.push((
            format!("system calls per request @{rate} req/s"),
            Box::new(|s| s.syscalls),
            1,
            true,
        ));
        rows.push((
            format!("context switches (wake-ups) per request @{rate} req/s"),
            Box::new(|s| s.switches),
            2,
            true,
        ));
    }
    if pairs {
        rows.push((
            "new connections client → server sidecar per request (reuse = 1 − this)".into(),
            Box::new(|s| s.connects),
            4,
            false,
        ));
        rows.push((
            "connections client → server sidecar open after saturation".into(),
            Box::new(|s| s.upstream_open),
            0,
            false,
        ));
    }
    for (i, rate) in args.rates.iter().enumerate() {
        rows.push((
            format!("achieved req/s @{rate} req/s"),
            Box::new(move |s| s.rates.get(i)?.rps),
            0,
            false,
        ));
        rows.push((
            format!("latency p50 / p99 / p99.9 @{rate} req/s, µs"),
            Box::new(move |s| s.rates.get(i)?.p50),
            0,
            false,
        ));
    }
    rows.push((
        "unloaded RTT p50, µs".into(),
        Box::new(|s| s.rtt_p50),
        1,
        false,
    ));
    rows.push((
        "backend CPU µs/request at saturation".into(),
        Box::new(|s| s.sat_backend_cpu),
        1,
        false,
    ));
    rows
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn fmt(v: f64, digits: usize) -> String {
    if v.abs() >= 10_000.0 && digits == 0 {
        format!("{:.1} k", v / 1000.0)
    } else {
        format!("{v:.digits$}")
    }
}

/// A latency in µs, in ms from 10 ms on.
fn micros(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0} ms", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn tables(args: &Args, results: &BTreeMap<String, Vec<Sample>>) -> String {
    let mut out = String::new();
    let one = [
        ("mesh", "mesh-proxy (inbound, PERMISSIVE)"),
        ("nginx", "nginx"),
        ("haproxy", "HAProxy"),
        ("floor", "bare hyper proxy (floor)"),
        ("direct", "direct"),
    ];
    let two = [
        ("mesh-mtls", "2 × mesh-proxy, STRICT mTLS"),
        ("mesh-plain", "2 × mesh-proxy, plaintext"),
        ("floor", "bare hyper proxy (floor, 1 hop)"),
        ("nginx", "nginx (1 hop)"),
        ("direct", "direct"),
    ];
    if results.contains_key("mesh") {
        out.push_str(
            "### One hop: the sidecar's inbound listener (PERMISSIVE), default policies\n\n",
        );
        out.push_str(&table(args, results, &one, false));
    }
    if results.contains_key("mesh-mtls") || results.contains_key("mesh-plain") {
        out.push_str(
            "\n### Two sidecars: client outbound → server inbound → backend (CPU and memory of both)\n\n",
        );
        out.push_str(&table(args, results, &two, true));
    }
    if !results.contains_key("mesh")
        && !results.contains_key("mesh-mtls")
        && !results.contains_key("mesh-plain")
    {
        out.push_str(&table(args, results, &one, false));
    }
    let _ = writeln!(
        out,
        "\nCells: mean of the repeats, each repeat in brackets; (× floor, × nginx, × plaintext): \
         ratio of the means within this run. CPU is utime + stime of the proxy's processes \
         (10 ms ticks); latency at a fixed rate runs from each request's due time."
    );
    out
}

fn table(
    args: &Args,
    results: &BTreeMap<String, Vec<Sample>>,
    columns: &[(&str, &str)],
    pairs: bool,
) -> String {
    let columns: Vec<&(&str, &str)> = columns
        .iter()
        .filter(|(k, _)| results.contains_key(*k))
        .collect();
    let mut out = String::from("| figure |");
    for (_, title) in &columns {
        let _ = write!(out, " {title} |");
    }
    out.push_str("\n|---|");
    for _ in &columns {
        out.push_str("---|");
    }
    out.push('\n');
    for (name, f, digits, ratios) in rows(args, pairs) {
        let values = |k: &str| -> Vec<f64> {
            results
                .get(k)
                .map(|v| v.iter().filter_map(&f).collect())
                .unwrap_or_default()
        };
        let latency = name.starts_with("latency");
        let _ = write!(out, "| {name} |");
        for (key, _) in &columns {
            let v = values(key);
            let Some(m) = mean(&v) else {
                out.push_str(" – |");
                continue;
            };
            let mut cell = if latency {
                // p50 / p99 / p99.9 of the same rate.
                let i = args
                    .rates
                    .iter()
                    .position(|r| name.contains(&format!("@{r} ")))
                    .unwrap_or(0);
                let of = |g: fn(&RateSample) -> Option<f64>| {
                    let v: Vec<f64> = results
                        .get(*key)
                        .map(|s| s.iter().filter_map(|s| g(s.rates.get(i)?)).collect())
                        .unwrap_or_default();
                    mean(&v).map_or("–".into(), micros)
                };
                format!("{} / {} / {}", of(|r| r.p50), of(|r| r.p99), of(|r| r.p999))
            } else {
                fmt(m, digits)
            };
            if ratios && *key != "direct" {
                let mut against = Vec::new();
                let refs: &[(&str, &str)] = if *key == "mesh-mtls" {
                    &[
                        ("mesh-plain", "plaintext"),
                        ("floor", "floor"),
                        ("nginx", "nginx"),
                    ]
                } else if key.starts_with("mesh") {
                    &[("floor", "floor"), ("nginx", "nginx")]
                } else {
                    &[("floor", "floor")]
                };
                for (r, label) in refs {
                    if r != key
                        && let Some(base) = mean(&values(r)).filter(|b| b.abs() > f64::EPSILON)
                    {
                        against.push(format!("{:.2}× {label}", m / base));
                    }
                }
                if !against.is_empty() {
                    let _ = write!(cell, " ({})", against.join(", "));
                }
            }
            if v.len() > 1 && !latency {
                let each: Vec<String> = v.iter().map(|x| fmt(*x, digits)).collect();
                let _ = write!(cell, " [{}]", each.join(" / "));
            }
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}
