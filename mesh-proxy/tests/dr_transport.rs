//! DestinationRule fields that shape the upstream connection and its retries, through
//! the real binary: `retryBudget` bounds the retries in flight to an always-503
//! destination, `proxyProtocol` puts a PROXY protocol header (v1 text, v2 binary) at the
//! start of each upstream connection (HTTP, pooled per downstream connection, and TCP),
//! read by raw TCP upstreams, and `tunnel` carries the traffic, TLS origination
//! included, through an HTTP CONNECT proxy to the target; a proxy refusing the tunnel
//! fails the request with 503.

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

/// What a PROXY-protocol upstream read at the start of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    version: u8,
    source: SocketAddr,
    destination: SocketAddr,
}

/// Parses a PROXY protocol header (v1 or v2, TCP over IPv4) from the start of `tcp`.
async fn read_proxy_header(tcp: &mut TcpStream) -> Seen {
    let mut first = [0u8; 12];
    tcp.read_exact(&mut first).await.unwrap();
    if &first == b"\r\n\r\n\0\r\nQUIT\n" {
        let mut fixed = [0u8; 4];
        tcp.read_exact(&mut fixed).await.unwrap();
        assert_eq!(fixed[0], 0x21, "version 2, command PROXY");
        assert_eq!(fixed[1], 0x11, "TCP over IPv4");
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        let mut rest = vec![0u8; len];
        tcp.read_exact(&mut rest).await.unwrap();
        let ip = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        return Seen {
            version: 2,
            source: SocketAddr::from((ip(&rest[0..4]), port(&rest[8..10]))),
            destination: SocketAddr::from((ip(&rest[4..8]), port(&rest[10..12]))),
        };
    }
    assert_eq!(
        &first[..6],
        b"PROXY ",
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    let mut line = first.to_vec();
    while !line.ends_with(b"\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        line.push(b[0]);
        assert!(line.len() <= 107, "a v1 header is at most 107 bytes");
    }
    let line = String::from_utf8(line).unwrap();
    let f: Vec<&str> = line.trim_end().split(' ').collect();
    assert_eq!(&f[..2], &["PROXY", "TCP4"], "{line}");
    Seen {
        version: 1,
        source: format!("{}:{}", f[2], f[4]).parse().unwrap(),
        destination: format!("{}:{}", f[3], f[5]).parse().unwrap(),
    }
}

/// A raw TCP upstream that reads a PROXY header on each connection, then answers every
/// HTTP/1.1 request on it with 200 and the header's source address.
async fn proxy_protocol_upstream() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let header = read_proxy_header(&mut tcp).await;
                let body = header.source.to_string();
                record.lock().unwrap().push(header);
                let mut buf = Vec::new();
                while read_head(&mut tcp, &mut buf).await.is_some() {
                    let res = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(res.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// One downstream connection to `proxy`: its local address and a request sender.
async fn downstream(
    proxy: SocketAddr,
) -> (
    SocketAddr,
    hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
) {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    (local, sender)
}

async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    host: &str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    sender.ready().await.unwrap();
    let req = http::Request::get("/")
        .header("host", host)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_name_each_downstream_client() {
    let world = World::new();
    let (v1, seen_v1) = proxy_protocol_upstream().await;
    let (v2, seen_v2) = proxy_protocol_upstream().await;
    let mut yaml = external("pp1.example.com", &[v1]) + &external("pp2.example.com", &[v2]);
    for (host, version) in [("pp1.example.com", "V1"), ("pp2.example.com", "V2")] {
        yaml.push_str(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: production}}
spec:
  host: {host}
  trafficPolicy:
    proxyProtocol: {{version: {version}}}
---
"
        ));
    }
    let (proxy, _) = caller(&world, &yaml).await;
    for (host, version, seen) in [
        ("pp1.example.com", 1, &seen_v1),
        ("pp2.example.com", 2, &seen_v2),
    ] {
        // Two downstream connections, two requests each.
        let (a, mut to_a) = downstream(proxy.outbound()).await;
        let (b, mut to_b) = downstream(proxy.outbound()).await;
        for _ in 0..2 {
            assert_eq!(get(&mut to_a, host).await, (200, a.to_string()), "{host}");
            assert_eq!(get(&mut to_b, host).await, (200, b.to_string()), "{host}");
        }
        // One upstream connection per downstream connection, each with its header.
        let mut got = seen.lock().unwrap().clone();
        got.sort_by_key(|s| s.source);
        let mut want = vec![
            Seen {
                version,
                source: a,
                destination: proxy.outbound(),
            },
            Seen {
                version,
                source: b,
                destination: proxy.outbound(),
            },
        ];
        want.sort_by_key(|s| s.source);
        assert_eq!(got, want, "{host}");
    }
}

/// A small HTTP CONNECT proxy: answers `answer` to each CONNECT and, on 200, splices the
/// connection to the requested target. Records the targets asked for.
async fn connect_proxy(answer: u16) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let record = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(head) = read_head(&mut tcp, &mut buf).await else {
                    return;
                };
                let line = head.lines().next().unwrap_or_default().to_owned();
                record.lock().unwrap().push(line.clone());
                let target = match line.split(' ').collect::<Vec<_>>()[..] {
                    ["CONNECT", target, "HTTP/1.1"] => target.to_owned(),
                    _ => {
                        let _ = tcp
                            .write_all(
                                b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        return;
                    }
                };
                if answer != 200 {
                    let res = format!("HTTP/1.1 {answer} Refused\r\ncontent-length: 0\r\n\r\n");
                    let _ = tcp.write_all(res.as_bytes()).await;
                    return;
                }
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = tcp
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                // Nothing may follow the CONNECT head before the tunnel opens.
                assert!(buf.is_empty());
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
            });
        }
    });
    (addr, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_requests_through_a_connect_proxy_to_the_target() {
    let world = World::new();
    let target = App::start(Behaviour::Ok("reached the target")).await;
    let (open, asked_open) = connect_proxy(200).await;
    let (refusing, asked_refusing) = connect_proxy(403).await;
    let mut yaml =
        external("egress.example.com", &[open]) + &external("closed.example.com", &[refusing]);
    for host in ["egress.example.com", "closed.example.com"] {
        yaml.push_str(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: production}}
spec:
  host: {host}
  trafficPolicy:
    tunnel: {{protocol: CONNECT, targetHost: 127.0.0.1, targetPort: {port}}}
---
",
            port = target.addr.port()
        ));
    }
    let (_proxy, client) = caller(&world, &yaml).await;
    for _ in 0..3 {
        let (status, body) = client
            .request("GET", "egress.example.com", "/", &[])
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "reached the target"));
    }
    assert_eq!(target.hits(), 3);
    // The requests share one pooled connection, hence one tunnel.
    let want = format!("CONNECT 127.0.0.1:{} HTTP/1.1", target.addr.port());
    assert_eq!(*asked_open.lock().unwrap(), vec![want.clone()]);

    // A proxy refusing the tunnel: the request fails as a connect failure.
    let (status, _) = client
        .request("GET", "closed.example.com", "/", &[])
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(target.hits(), 3);
    assert!(asked_refusing.lock().unwrap().contains(&want));
}

/// A rustls HTTP/1.1 upstream for `api.example.com` (certificate from a fresh CA written
/// to `<world>/external-ca.pem`); answers `tls ok` and records each handshake's SNI.
async fn tls_upstream(world: &World) -> (SocketAddr, String, Arc<Mutex<Vec<Option<String>>>>) {
    use mesh_tls::{CertificateAuthority, LeafSpec};
    let ca = CertificateAuthority::new("example.com").unwrap();
    let leaf = ca
        .issue_with(
            &LeafSpec::workload("example.com", "external", "api").with_dns("api.example.com"),
        )
        .unwrap();
    let ca_file = world.path("external-ca.pem");
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(mesh_tls::provider())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.chain_der().to_vec(), leaf.key_der())
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sni = Arc::new(Mutex::new(Vec::new()));
    let record = sni.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            record
                .lock()
                .unwrap()
                .push(tls.get_ref().1.server_name().map(str::to_owned));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_head(&mut tls, &mut buf).await.is_some() {
                    let res = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\ntls ok";
                    if tls.write_all(res).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, ca_file.display().to_string(), sni)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_runs_inside_the_tunnel() {
    let world = World::new();
    let (target, ca_file, sni) = tls_upstream(&world).await;
    let (proxy_addr, asked) = connect_proxy(200).await;
    let yaml = format!(
        "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: production}}
spec:
  host: api.example.com
  trafficPolicy:
    tunnel: {{targetHost: 127.0.0.1, targetPort: {port}}}
    tls: {{mode: SIMPLE, caCertificates: {ca_file}, sni: api.example.com}}
",
        external("api.example.com", &[proxy_addr]),
        port = target.port(),
    );
    let (_proxy, client) = caller(&world, &yaml).await;
    let (status, body) = client
        .request("GET", "api.example.com", "/", &[])
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "tls ok"));
    // The proxy saw only the CONNECT; the TLS handshake (with SNI) reached the target.
    assert_eq!(
        *asked.lock().unwrap(),
        vec![format!("CONNECT 127.0.0.1:{} HTTP/1.1", target.port())]
    );
    assert_eq!(
        *sni.lock().unwrap(),
        vec![Some("api.example.com".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_carry_the_proxy_header_too() {
    let world = World::new();
    // A raw TCP server: reads the PROXY header, then reports the source it names.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let db = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let seen = read_proxy_header(&mut tcp).await;
                let line = format!("v{} {} {}\n", seen.version, seen.source, seen.destination);
                let _ = tcp.write_all(line.as_bytes()).await;
            });
        }
    });
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: production}}
spec:
  hosts: [db.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 5432, name: tcp-db, protocol: TCP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{tcp-db: {port}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: production}}
spec:
  host: db.example.com
  trafficPolicy:
    proxyProtocol: {{version: V2}}
",
        port = db.port()
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let ports = Ports::new();
    let tcp_port = free_port();
    let s = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        ports,
        "127.0.0.1:9".parse().unwrap(),
        "",
    )
    .replacen(
        "listeners:\n",
        &format!("listeners:\n  tcp:\n    127.0.0.1:{tcp_port}: db.example.com:5432\n"),
        1,
    );
    let _proxy = Proxy::start(&world, "sidecar", "order-service", &s, ports).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let mut line = String::new();
    tcp.read_to_string(&mut line).await.unwrap();
    assert_eq!(line, format!("v2 {local} 127.0.0.1:{tcp_port}\n"));
}
