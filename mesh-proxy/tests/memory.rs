//! The memory of a burst of connections goes back once they close.
//!
//! A sidecar sees bursts: a client opens thousands of keep-alive connections, sends a
//! request on each and leaves them idle, then closes them all. Each open connection
//! holds buffers and its task; after the close the process's own resident memory
//! (`RssAnon`: heap and allocator caches, not the binary's mapped pages) must come back
//! rather than stay at the burst's peak, as it would with an allocator that keeps freed
//! pages (glibc's malloc keeps them between live chunks). The binary's default allocator,
//! jemalloc with its background purging thread, returns them while the proxy idles.
//!
//! What is asserted is a bound, not a speed: the connections must visibly take memory
//! (so the measurement sees them), and after they close at least half of it must be
//! returned within a minute. `benches/memory` measures the same burst with figures per
//! allocator (BENCHMARKS.md, "Memory").

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connections in the burst. The test holds the client ends and the proxy the server
/// ends, so each process needs this many descriptors and some: the test raises its soft
/// limit to the hard one (the proxy inherits it) and, where even that is too low, opens
/// as many as fit.
const BURST: usize = 2000;

/// Raises this process's descriptor limit to its maximum; the connections that fit in it.
fn burst_that_fits() -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    let soft = match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(_) => limit.current,
    };
    // `None` is unlimited; keep 200 descriptors for everything else.
    let fits = soft.map_or(BURST, |n| {
        usize::try_from(n).unwrap_or(BURST).saturating_sub(200)
    });
    if fits < BURST {
        eprintln!("a descriptor limit of {soft:?}: a burst of {fits} connections");
    }
    fits.min(BURST)
}

/// The process's own resident memory, in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Opens a connection to `addr` and gets one answer on it; the connection stays open.
async fn one_request(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /burst HTTP/1.1\r\nHost: payment-service\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"ok") {
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_of_a_burst_of_idle_connections_comes_back_after_they_close() {
    if !std::path::Path::new("/proc/self/status").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "/proc is required under CI"
        );
        eprintln!("SKIPPED: no /proc on this system");
        return;
    }
    let burst_size = burst_that_fits();
    let world = World::new();
    let app = App::start(Behaviour::Ok("ok")).await;
    let ports = Ports::new();
    // No PeerAuthentication: the inbound listener is PERMISSIVE and takes plain HTTP.
    let config = world.write_config("istio", "mesh.yaml", "");
    let proxy = start_sidecar(&world, "payment-service", &config, ports, app.addr).await;
    let pid = proxy.child.id().unwrap();
    let inbound = SocketAddr::from(([127, 0, 0, 1], ports.inbound));

    // Warm up, so that what one connection's path allocates once is in the baseline.
    for _ in 0..20 {
        drop(one_request(inbound).await);
    }
    let idle = |t: &str| {
        series_value(t, "mesh_active_connections", &[("listener", "inbound")]) == Some(0.0)
    };
    proxy.metrics_when(idle).await;
    let base = rss_anon_kib(pid);

    let mut burst = Vec::with_capacity(burst_size);
    for _ in 0..burst_size {
        burst.push(one_request(inbound).await);
    }
    let open = rss_anon_kib(pid);
    let grown = open.saturating_sub(base);
    // At least 4 KiB per open connection, or this test measures nothing.
    assert!(
        grown >= 4 * burst_size as u64,
        "{burst_size} open connections took {grown} KiB over {base} KiB"
    );

    drop(burst);
    let text = proxy.metrics_when(idle).await;
    assert!(idle(&text), "the proxy still holds connections:\n{text}");
    // Poll for up to a minute, with one short connection a second as light traffic.
    let bound = base + grown / 2;
    let mut now = rss_anon_kib(pid);
    for _ in 0..60 {
        if now <= bound {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(one_request(inbound).await);
        now = rss_anon_kib(pid);
    }
    eprintln!("RssAnon: {base} KiB idle, {open} KiB open, {now} KiB after the close");
    assert!(
        now <= bound,
        "RssAnon {base} KiB idle, {open} KiB with {burst_size} connections open, still {now} KiB \
         a minute after they closed (bound {bound} KiB)"
    );
    // Every request of the burst reached the application.
    assert!(app.hits() >= 20 + burst_size, "{} hits", app.hits());
}
