//! DestinationRule fields that shape the upstream connection and its retries, through
//! the real binary: `retryBudget` bounds the retries in flight to an always-503
//! destination, `proxyProtocol` puts a PROXY protocol header (v1 text, v2 binary) at the
//! start of each upstream connection, read by a raw TCP upstream, and `tunnel` carries
//! the traffic through an HTTP CONNECT proxy to the target.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A `MESH_EXTERNAL` service `host` on port 80 with one endpoint per address.
fn external(host: &str, endpoints: &[SocketAddr]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|a| {
            format!(
                "  - {{address: 127.0.0.1, ports: {{http: {}}}}}\n",
                a.port()
            )
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host}, namespace: production}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
{eps}---
"
    )
}

/// The calling sidecar (order-service) on `yaml`, and a client of its outbound listener.
async fn caller(world: &World, yaml: &str) -> (Proxy, Client) {
    let config = world.write_config("istio", "mesh.yaml", yaml);
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(world, "order-service", &config, Ports::new(), nowhere).await;
    let client = Client::new(proxy.outbound());
    (proxy, client)
}

/// Reads one HTTP/1.1 request head (no body) from `io`; `None` at end of stream.
async fn read_head<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A raw HTTP/1.1 upstream answering every request with 503 after `delay`; counts them.
async fn slow_503(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let hits = counted.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_head(&mut tcp, &mut buf).await.is_some() {
                    hits.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let res = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown";
                    if tcp.write_all(res).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, hits)
}

const RETRIES: &str = "    retries: {attempts: 3, retryOn: 5xx}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_bounds_the_retries_in_flight_to_a_failing_destination() {
    let world = World::new();
    let (budgeted, budgeted_hits) = slow_503(Duration::from_millis(400)).await;
    let (unbounded, unbounded_hits) = slow_503(Duration::from_millis(400)).await;
    let yaml = format!(
        "{}{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: budgeted, namespace: production}}
spec:
  host: budgeted.example.com
  trafficPolicy:
    retryBudget: {{percent: 0, minRetryConcurrency: 1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: budgeted, namespace: production}}
spec:
  hosts: [budgeted.example.com]
  http:
  - timeout: 20s
{RETRIES}    route:
    - destination: {{host: budgeted.example.com}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: unbounded, namespace: production}}
spec:
  hosts: [unbounded.example.com]
  http:
  - timeout: 20s
{RETRIES}    route:
    - destination: {{host: unbounded.example.com}}
",
        external("budgeted.example.com", &[budgeted]),
        external("unbounded.example.com", &[unbounded]),
    );
    let (_proxy, client) = caller(&world, &yaml).await;
    let client = Arc::new(client);
    for host in ["budgeted.example.com", "unbounded.example.com"] {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                client.request("GET", host, "/", &[]).await.unwrap()
            }));
        }
        for t in tasks {
            let (status, body) = t.await.unwrap();
            assert_eq!((status, body.as_str()), (503, "down"), "{host}");
        }
    }
    // Without a budget every request is tried 1 + 3 times.
    assert_eq!(unbounded_hits.load(Ordering::SeqCst), 32);
    // With a budget of one retry in flight, the eight first attempts fail together and
    // one of them (at most a couple, as responses straggle) is retried.
    let budgeted = budgeted_hits.load(Ordering::SeqCst);
    assert!(
        (9..=12).contains(&budgeted),
        "{budgeted} attempts under a budget of one concurrent retry"
    );
}
