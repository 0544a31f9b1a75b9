//! DestinationRule `connectionPool.tcp` with the real binary: `tcpKeepalive` on the
//! sidecar's upstream sockets (read back from the kernel's socket table) and
//! `maxConnectionDuration` retiring aged connections (counted at the application).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use support::*;

/// The payment-service ServiceEntry (its one endpoint is `app`, without a sidecar) and a
/// DestinationRule with `tcp` as its `connectionPool.tcp`.
fn mesh(app: SocketAddr, tcp: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment-service, namespace: production}}
spec:
  host: payment-service
  trafficPolicy:
    connectionPool:
      tcp: {tcp}
",
        port = app.port()
    )
}

async fn pay(proxy: &Proxy) {
    let (status, body) = send(proxy.outbound(), "GET", "payment-service", "/", &[])
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "paid"), "{}", proxy.output());
}

/// The keep-alive timer of the socket connected to `remote` in the kernel's table:
/// `Some(remaining clock ticks)` when a keep-alive timer runs, `None` when another timer
/// or none does.
fn keepalive_timer(remote: SocketAddr) -> Option<Option<u64>> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let want = format!(":{:04X}", remote.port());
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address rem_address st ... tr:tm->when
        let (rem, state, timer) = (fields.get(2)?, fields.get(3)?, fields.get(5)?);
        if !rem.ends_with(&want) || *state != "01" {
            return None;
        }
        let (kind, when) = timer.split_once(':')?;
        Some((kind == "02").then(|| u64::from_str_radix(when, 16).unwrap_or(0)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keepalive_is_set_on_upstream_connections() {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        eprintln!("SKIPPED: no /proc/net/tcp on this system");
        return;
    }
    for (tcp, expect) in [
        ("{tcpKeepalive: {time: 7s, interval: 2s, probes: 3}}", true),
        ("{maxConnections: 100}", false),
    ] {
        let world = World::new();
        let (app, _) = counting_app(SocketAddr::from(([127, 0, 0, 1], 0)), "paid").await;
        let config = world.write_config("istio", "mesh.yaml", &mesh(app, tcp));
        let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let proxy = start_sidecar(&world, "order-service", &config, Ports::new(), nowhere).await;
        pay(&proxy).await;
        // The pooled connection to the application stays open and idle.
        let timer = keepalive_timer(app).expect("the sidecar's connection to the application");
        if expect {
            // Clock ticks (100 a second) left before the first probe: at most 7 s.
            let ticks = timer.expect("a keep-alive timer");
            assert!(ticks > 0 && ticks <= 700, "{ticks}");
        } else {
            assert_eq!(timer, None, "keep-alive without tcpKeepalive");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_duration_retires_aged_connections() {
    let world = World::new();
    let (app, accepted) = counting_app(SocketAddr::from(([127, 0, 0, 1], 0)), "paid").await;
    let config = world.write_config(
        "istio",
        "mesh.yaml",
        &mesh(app, "{maxConnectionDuration: 300ms}"),
    );
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(&world, "order-service", &config, Ports::new(), nowhere).await;
    // Young: one connection serves both.
    pay(&proxy).await;
    pay(&proxy).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // Aged: the connection answers once more, then the next request opens a new one.
    tokio::time::sleep(Duration::from_millis(400)).await;
    pay(&proxy).await;
    pay(&proxy).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
