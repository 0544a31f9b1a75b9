//! DestinationRule `connectionPool` with the real binary: `tcp.tcpKeepalive` on the
//! sidecar's upstream sockets (read back from the kernel's socket table),
//! `tcp.maxConnectionDuration` retiring aged connections (counted at the application),
//! and `http.maxConcurrentStreams` spreading streams over HTTP/2 connections (counted
//! at a real h2c server).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

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

/// What an h2c server saw: per connection, the streams open now and the most open at once.
#[derive(Default)]
struct Streams {
    /// `(open, most)` per accepted connection.
    connections: Mutex<Vec<(usize, usize)>>,
    arrived: AtomicUsize,
}

impl Streams {
    fn connections(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    fn most_per_connection(&self) -> usize {
        let c = self.connections.lock().unwrap();
        c.iter().map(|(_, most)| *most).max().unwrap_or(0)
    }
}

/// An h2c (prior knowledge) server that holds every request until `release` is notified.
async fn holding_h2c_server(release: Arc<tokio::sync::Notify>) -> (SocketAddr, Arc<Streams>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(Streams::default());
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let index = {
                let mut c = seen.connections.lock().unwrap();
                c.push((0, 0));
                c.len() - 1
            };
            let (seen, release) = (seen.clone(), release.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let (seen, release) = (seen.clone(), release.clone());
                    async move {
                        let wait = release.notified();
                        {
                            let mut c = seen.connections.lock().unwrap();
                            let (open, most) = &mut c[index];
                            *open += 1;
                            *most = (*most).max(*open);
                        }
                        seen.arrived.fetch_add(1, Ordering::SeqCst);
                        wait.await;
                        seen.connections.lock().unwrap()[index].0 -= 1;
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"paid"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, streams)
}

/// payment-service on an `http2` port (h2c to its endpoint without a sidecar), with
/// `http` as the rule's `connectionPool.http`.
fn h2_mesh(app: SocketAddr, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http2, protocol: HTTP2}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http2: {port}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment-service, namespace: production}}
spec:
  host: payment-service
  trafficPolicy:
    connectionPool:
      http: {http}
",
        port = app.port()
    )
}

/// Sends `n` requests at once through `proxy` while the server holds them; returns the
/// server's connections and most streams on one connection once all `n` arrived.
async fn concurrent_streams(http: &str, n: usize) -> (usize, usize) {
    let world = World::new();
    let release = Arc::new(tokio::sync::Notify::new());
    let (app, streams) = holding_h2c_server(release.clone()).await;
    let config = world.write_config("istio", "mesh.yaml", &h2_mesh(app, http));
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(&world, "order-service", &config, Ports::new(), nowhere).await;
    let outbound = proxy.outbound();
    let calls: Vec<_> = (0..n)
        .map(|_| tokio::spawn(send(outbound, "GET", "payment-service", "/", &[])))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while streams.arrived.load(Ordering::SeqCst) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} requests arrived\n{}",
            streams.arrived.load(Ordering::SeqCst),
            proxy.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = (streams.connections(), streams.most_per_connection());
    release.notify_waiters();
    for call in calls {
        let (status, body) = call.await.unwrap().unwrap();
        assert_eq!((status, body.as_str()), (200, "paid"));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_streams_opens_another_connection_when_one_is_full() {
    // Five streams at once, two per connection: three connections, none over two.
    let (connections, most) = concurrent_streams("{maxConcurrentStreams: 2}", 5).await;
    assert_eq!((connections, most), (3, 2));
    // Without the limit the five share one connection.
    let (connections, most) = concurrent_streams("{maxRetries: 3}", 5).await;
    assert_eq!((connections, most), (1, 5));
}
