//! Pieces shared by the load harness (`load`, `load-gen`, `load-backend`, `load-floor`;
//! see `benches/load/README.md`) and the soak run: the backend's HTTP service, free
//! loopback ports, what `/proc` says about a process tree, and the parsers of the tools'
//! outputs (`wrk`, `perf stat -x,`, `strace -c`).

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `serve` on a listener bound to `addr`, on a current-thread runtime (one thread,
/// as every server of the harness); `name` prefixes the error printed when the runtime or
/// the listener cannot be made.
pub fn serve_on<F, Fut>(name: &str, addr: std::net::SocketAddr, serve: F) -> std::process::ExitCode
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                serve(listener).await;
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{name}: {addr}: {e}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// Serves every connection accepted on `listener` (HTTP/1.1 or HTTP/2 with prior
/// knowledge, `TCP_NODELAY`): every request is answered `200` with `body`.
pub async fn serve_body(listener: TcpListener, body: Bytes) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// `pid` and all its descendants alive now (from the parent ids in `/proc/*/stat`).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(stat) = read_stat(p) {
                parents.push((p, stat.ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// The fields of `/proc/<pid>/stat` the harness uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    /// Parent process id.
    pub ppid: u32,
    /// User plus system CPU time of the whole process (all its threads), in clock ticks.
    pub cpu_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat` (the command name may hold spaces and
/// parentheses: fields are counted after its last `)`).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

/// `/proc/<pid>/stat`, parsed.
pub fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second of `/proc/<pid>/stat` (Linux's `USER_HZ`).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) of the processes, in µs.
pub fn cpu_micros(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|p| read_stat(*p))
        .map(|s| s.cpu_ticks)
        .sum();
    ticks as f64 * 1e6 / TICKS_PER_SECOND
}

/// The numeric fields of a `/proc/.../status` text (`VmHWM: 1234 kB` -> 1234).
pub fn parse_status(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_string(), v.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

fn status(path: &str) -> BTreeMap<String, u64> {
    parse_status(&std::fs::read_to_string(path).unwrap_or_default())
}

/// Context switches (voluntary + involuntary) of every thread of the processes: the
/// number of times their threads went to sleep or were preempted.
pub fn context_switches(pids: &[u32]) -> u64 {
    let mut sum = 0;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let s = status(&format!("{}/status", task.path().display()));
            sum += s.get("voluntary_ctxt_switches").copied().unwrap_or(0)
                + s.get("nonvoluntary_ctxt_switches").copied().unwrap_or(0);
        }
    }
    sum
}

/// Peak resident set (`VmHWM`) summed over the processes, in KiB. Pages shared between
/// them (nginx's master and worker, the binary's pages of two sidecars) are counted once
/// per process.
pub fn peak_rss_kib(pids: &[u32]) -> u64 {
    status_sum(pids, "VmHWM")
}

/// A `/proc/<pid>/status` field (in KiB for the memory ones) summed over the processes.
pub fn status_sum(pids: &[u32], field: &str) -> u64 {
    pids.iter()
        .map(|p| {
            status(&format!("/proc/{p}/status"))
                .get(field)
                .copied()
                .unwrap_or(0)
        })
        .sum()
}

/// Busy and total jiffies of each CPU (`/proc/stat`), to compute how busy the machine is.
pub fn cpu_jiffies() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle (3) and iowait (4) are not busy.
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Parses `wrk`'s report: (requests completed, requests per second).
pub fn parse_wrk(text: &str) -> Option<(u64, f64)> {
    let requests = text.lines().find_map(|l| {
        let l = l.trim();
        let (n, rest) = l.split_once(' ')?;
        rest.starts_with("requests in").then(|| n.parse().ok())?
    })?;
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    Some((requests, rate))
}

/// Parses the CSV of `perf stat -x,`: count per event (`<not counted>` and
/// `<not supported>` are left out).
pub fn parse_perf_csv(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let count = f.first()?.trim().parse().ok()?;
            Some((f.get(2)?.trim().to_string(), count))
        })
        .collect()
}

/// Parses the table of `strace -c` (fixed-width columns: `% time`, `seconds`,
/// `usecs/call`, `calls`, `errors`, `syscall`): calls per system call, and `total`.
pub fn parse_strace_summary(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            l.get(..6)?.trim().parse::<f64>().ok()?;
            let calls = l.get(31..40)?.trim().parse().ok()?;
            let name = l.split_whitespace().last()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

/// Parses `key=value` pairs separated by spaces.
pub fn parse_pairs(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_name_holding_spaces_and_parentheses() {
        let text = "4242 (tokio (rt) 1) S 17 4242 17 0 -1 4194304 900 0 0 0 \
                    250 31 7 9 20 0 3 0 123 456789 1000 18446744073709551615";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                ppid: 17,
                cpu_ticks: 281
            })
        );
        assert_eq!(parse_stat("4242 (cut"), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let s = parse_status(
            "Name:\tnginx\nVmHWM:\t   12992 kB\nvoluntary_ctxt_switches:\t51\nState:\tS (sleeping)\n",
        );
        assert_eq!(s.get("VmHWM"), Some(&12992));
        assert_eq!(s.get("voluntary_ctxt_switches"), Some(&51));
        assert_eq!(s.get("State"), None);
    }

    #[test]
    fn wrk_report() {
        let text = "Running 5s test @ http://127.0.0.1:18083/\n  1 threads and 32 connections\n  \
                    Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.05ms  \
                    200.00us   5.00ms   90.00%\n  152718 requests in 5.00s, 170.13MB read\n\
                    Requests/sec:  30541.93\nTransfer/sec:     34.02MB\n";
        assert_eq!(parse_wrk(text), Some((152_718, 30_541.93)));
        assert_eq!(parse_wrk("unable to connect to 127.0.0.1:1"), None);
    }

    #[test]
    fn perf_csv() {
        let text = "# started on Sun Dec  6 09:30:00 2026\n\n48211,,raw_syscalls:sys_enter,2003318211,100.00,,\n\
                    <not counted>,,syscalls:sys_enter_connect,0,100.00,,\n3,,syscalls:sys_enter_accept4,2003318211,100.00,,\n";
        let m = parse_perf_csv(text);
        assert_eq!(m.get("raw_syscalls:sys_enter"), Some(&48211));
        assert_eq!(m.get("syscalls:sys_enter_accept4"), Some(&3));
        assert_eq!(m.get("syscalls:sys_enter_connect"), None);
    }

    #[test]
    fn strace_summary() {
        let text = "% time     seconds  usecs/call     calls    errors syscall\n\
                    ------ ----------- ----------- --------- --------- ----------------\n \
                    61.20    0.012000           5      2001           epoll_wait\n \
                    20.00    0.004000           2      2000       998 recvfrom\n  \
                    0.10    0.000020          20         1           connect\n\
                    ------ ----------- ----------- --------- --------- ----------------\n\
                    100.00    0.019600           3      6002       998 total\n";
        let m = parse_strace_summary(text);
        assert_eq!(m.get("epoll_wait"), Some(&2001));
        assert_eq!(m.get("recvfrom"), Some(&2000));
        assert_eq!(m.get("connect"), Some(&1));
        assert_eq!(m.get("total"), Some(&6002));
    }

    #[test]
    fn key_value_pairs() {
        let m = parse_pairs("result requests=5000 p50_us=61.2 errors=0");
        assert_eq!(m.get("requests").map(String::as_str), Some("5000"));
        assert_eq!(m.get("p50_us").map(String::as_str), Some("61.2"));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn the_tree_of_this_process_starts_with_it() {
        let me = std::process::id();
        assert_eq!(process_tree(me).first(), Some(&me));
        assert!(cpu_micros(&[me]) >= 0.0);
        assert!(peak_rss_kib(&[me]) > 0);
        assert!(context_switches(&[me]) > 0);
    }
}
