//! `load-gen`: the load harness's HTTP/1.1 load generator (tokio current-thread runtime:
//! run it pinned on a core of its own). Every request is `GET /` with `Host` set to the
//! target; every response body is read to its end.
//!
//! ```text
//! load-gen check  --target ADDR [--body-bytes N]          # one request: 200 and N bytes?
//! load-gen rtt    --target ADDR [--requests N] [--warmup N]
//! load-gen rate   --target ADDR --rate R [--secs S] [--warmup-secs W] [--conns C] [--spin-us U]
//! load-gen closed --target ADDR [--secs S] [--warmup-secs W] [--conns C]
//! ```
//!
//! - `rtt`: one keep-alive connection, requests one after the other: the unloaded round
//!   trip.
//! - `rate` is an **open loop**: request `i` is due at `start + i / R` and goes, round
//!   robin, to one of `C` keep-alive connections; its latency runs from its due time, so a
//!   response that comes late also delays (and is charged to) the requests queued behind
//!   it on that connection (no coordinated omission). The pacer sleeps on tokio's timer
//!   (1 ms granularity) until about `U` µs + 1 ms before a due time, then yields in a loop
//!   (which keeps polling the sockets) until it is due.
//! - `closed`: `C` connections each send their next request when the previous answer has
//!   been read: the most the target serves.
//!
//! `rate` and `closed` print `measuring` when the warm-up ends and `done` when the
//! measured window ends (the driver samples the servers' CPU at those two lines), then one
//! `result key=value ...` line: `requests` (completed within the window), `rps`,
//! `errors`, and for `rate` and `rtt` the latency percentiles `p50_us`, `p99_us`,
//! `p999_us`, `max_us` of the requests due within the window.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The load harness's HTTP/1.1 load generator.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// One request: exits 0 when the answer is 200 with `--body-bytes` bytes.
    Check {
        #[command(flatten)]
        target: Target,
        /// The body size expected.
        #[arg(long, default_value_t = 1024)]
        body_bytes: usize,
    },
    /// Sequential requests on one connection: the unloaded round trip.
    Rtt {
        #[command(flatten)]
        target: Target,
        /// Requests measured.
        #[arg(long, default_value_t = 10_000)]
        requests: u64,
        /// Requests sent first and not measured.
        #[arg(long, default_value_t = 1_000)]
        warmup: u64,
    },
    /// Open loop at a fixed rate.
    Rate {
        #[command(flatten)]
        target: Target,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        #[command(flatten)]
        window: Window,
        /// Connections the requests are spread over.
        #[arg(long, default_value_t = 4)]
        conns: usize,
        /// How long before each due time the pacer stops sleeping and polls, in µs.
        #[arg(long, default_value_t = 100)]
        spin_us: u64,
    },
    /// Closed loop: as fast as the target answers.
    Closed {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        window: Window,
        /// Connections, each with one request in flight.
        #[arg(long, default_value_t = 32)]
        conns: usize,
    },
}

#[derive(Args)]
struct Target {
    /// The server to load (`127.0.0.1:port`).
    #[arg(long)]
    target: SocketAddr,
}

#[derive(Args, Clone, Copy)]
struct Window {
    /// The measured window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Load sent before the window, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load-gen: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&rt, run(cli.mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load-gen: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mode: Mode) -> Result<(), String> {
    match mode {
        Mode::Check { target, body_bytes } => {
            let mut conn = connect(target.target).await?;
            let (status, len) = get(&mut conn, target.target).await?;
            println!("status={status} body_bytes={len}");
            if status != 200 || len != body_bytes {
                return Err(format!(
                    "{}: expected 200 with {body_bytes} bytes, got {status} with {len}",
                    target.target
                ));
            }
            Ok(())
        }
        Mode::Rtt {
            target,
            requests,
            warmup,
        } => rtt(target.target, requests, warmup).await,
        Mode::Rate {
            target,
            rate,
            window,
            conns,
            spin_us,
        } => fixed_rate(target.target, rate, window, conns, spin_us).await,
        Mode::Closed {
            target,
            window,
            conns,
        } => closed(target.target, window, conns).await,
    }
}

type Conn = SendRequest<Empty<Bytes>>;

async fn connect(target: SocketAddr) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One `GET /`, its body read: (status, body length).
/// One request due at `due`, counted in `tally`; after a failure the connection is
/// replaced. False when no new connection can be made.
async fn tallied(
    conn: &mut Conn,
    target: SocketAddr,
    tally: &RefCell<Tally>,
    due: Instant,
) -> bool {
    let ok = matches!(get(conn, target).await, Ok((200, _)));
    tally.borrow_mut().done(due, ok);
    if !ok {
        match connect(target).await {
            Ok(c) => *conn = c,
            Err(_) => return false,
        }
    }
    true
}

async fn get(conn: &mut Conn, target: SocketAddr) -> Result<(u16, usize), String> {
    conn.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get("/")
        .header(http::header::HOST, target.to_string())
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let res = conn.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body.len()))
}

fn histogram() -> Result<Histogram<u64>, String> {
    // Nanoseconds, 1 ns to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).map_err(|e| e.to_string())
}

fn percentiles(h: &Histogram<u64>) -> String {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    )
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn rtt(target: SocketAddr, requests: u64, warmup: u64) -> Result<(), String> {
    let mut conn = connect(target).await?;
    let mut h = histogram()?;
    let mut errors = 0u64;
    for i in 0..warmup + requests {
        let began = Instant::now();
        let ok = matches!(get(&mut conn, target).await, Ok((200, _)));
        let ns = began.elapsed().as_nanos() as u64;
        if !ok {
            errors += 1;
            conn = connect(target).await?;
        } else if i >= warmup {
            let _ = h.record(ns.max(1));
        }
    }
    say(&format!(
        "result requests={} errors={errors} {}",
        h.len(),
        percentiles(&h)
    ));
    Ok(())
}

/// What the connections of a `rate` or `closed` run share: the window, the latencies of
/// the requests due in it, the completions in it.
struct Tally {
    from: Instant,
    to: Instant,
    latency: Histogram<u64>,
    completed: u64,
    errors: u64,
}

impl Tally {
    /// An empty tally of `window` (after its warm-up) from `start`, shared by the
    /// connections' tasks.
    fn shared(window: Window, start: Instant) -> Result<Rc<RefCell<Self>>, String> {
        let from = start + Duration::from_secs_f64(window.warmup_secs.max(0.0));
        Ok(Rc::new(RefCell::new(Self {
            from,
            to: from + Duration::from_secs_f64(window.secs.max(0.001)),
            latency: histogram()?,
            completed: 0,
            errors: 0,
        })))
    }

    fn done(&mut self, due: Instant, ok: bool) {
        let now = Instant::now();
        if !ok {
            self.errors += 1;
        } else if now >= self.from && now < self.to {
            self.completed += 1;
        }
        if ok && due >= self.from && due < self.to {
            let _ = self
                .latency
                .record((now.duration_since(due).as_nanos() as u64).max(1));
        }
    }
}

async fn fixed_rate(
    target: SocketAddr,
    rate: f64,
    window: Window,
    conns: usize,
    spin_us: u64,
) -> Result<(), String> {
    if rate <= 0.0 || conns == 0 {
        return Err("--rate and --conns must be above 0".into());
    }
    let start = Instant::now() + Duration::from_millis(20);
    let tally = Tally::shared(window, start)?;
    let (from, to) = {
        let t = tally.borrow();
        (t.from, t.to)
    };
    let mut queues = Vec::with_capacity(conns);
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = connect(target).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
        queues.push(tx);
        let tally = tally.clone();
        tasks.push(tokio::task::spawn_local(async move {
            while let Some(due) = rx.recv().await {
                if !tallied(&mut conn, target, &tally, due).await {
                    return;
                }
            }
        }));
    }
    let interval = 1.0 / rate;
    let spin = Duration::from_micros(spin_us) + Duration::from_millis(1);
    let (mut measuring, mut i) = (false, 0u64);
    loop {
        let due = start + Duration::from_secs_f64(i as f64 * interval);
        if due >= to {
            break;
        }
        loop {
            let now = Instant::now();
            if now >= due {
                break;
            }
            if due - now > spin {
                tokio::time::sleep_until(due - spin).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        if !measuring && due >= from {
            measuring = true;
            say("measuring");
        }
        let _ = queues[(i % conns as u64) as usize].send(due);
        i += 1;
    }
    tokio::time::sleep_until(to).await;
    say("done");
    drop(queues);
    finish(tasks, &tally, true).await;
    Ok(())
}

/// Lets the connections' requests still in flight finish (or gives up after 10 s, a
/// target that is stuck), then prints the window's result line, with the latency
/// percentiles when `latency`.
async fn finish(tasks: Vec<tokio::task::JoinHandle<()>>, tally: &RefCell<Tally>, latency: bool) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        for t in tasks {
            let _ = t.await;
        }
    })
    .await;
    let t = tally.borrow();
    let secs = t.to.duration_since(t.from).as_secs_f64();
    let mut line = format!(
        "result requests={} rps={:.1} errors={}",
        t.completed,
        t.completed as f64 / secs,
        t.errors
    );
    if latency {
        line += &format!(" due={} {}", t.latency.len(), percentiles(&t.latency));
    }
    say(&line);
}

async fn closed(target: SocketAddr, window: Window, conns: usize) -> Result<(), String> {
    let start = Instant::now();
    let tally = Tally::shared(window, start)?;
    let (from, to) = {
        let t = tally.borrow();
        (t.from, t.to)
    };
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = connect(target).await?;
        let tally = tally.clone();
        tasks.push(tokio::task::spawn_local(async move {
            while Instant::now() < to {
                if !tallied(&mut conn, target, &tally, Instant::now()).await {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep_until(from).await;
    say("measuring");
    tokio::time::sleep_until(to).await;
    say("done");
    finish(tasks, &tally, false).await;
    Ok(())
}
