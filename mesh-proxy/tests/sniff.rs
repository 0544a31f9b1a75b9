//! Protocol detection on the sidecar's TCP egress listeners, with the real binary: ports
//! of no declared protocol (no `protocol`, a name of no known prefix) carry HTTP/1.1
//! (curl), HTTP/2 with prior knowledge (curl `--http2-prior-knowledge`) and a
//! client-first line protocol, each handed to the HTTP stack or to opaque TCP by its
//! first bytes; a server-first protocol on the well-known port 3306 is opaque without
//! waiting for the client, and on another undeclared port once `protocolDetectionTimeout`
//! has passed.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A ServiceEntry for `host` with one port `number` named `web` (no protocol) and one
/// endpoint at `addr` without a sidecar.
fn entry(host: &str, number: u16, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host}, namespace: production}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: {number}, name: web}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{web: {port}}}}}
",
        port = addr.port()
    )
}

/// Sidecar settings with one TCP egress listener per `(local port, destination)`.
fn settings(
    world: &World,
    config: &std::path::Path,
    ports: Ports,
    tcp: &[(u16, &str)],
    detection: &str,
) -> String {
    let tcp: String = tcp
        .iter()
        .map(|(port, destination)| format!("    127.0.0.1:{port}: {destination}\n"))
        .collect();
    format!(
        "workload: {{namespace: production, serviceAccount: order-service, labels: {{app: order-service}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners:\n  inbound: 127.0.0.1:{i}\n  outbound: 127.0.0.1:{o}\n  admin: 127.0.0.1:{a}\n  app: 127.0.0.1:9\n{detection}  tcp:\n{tcp}\
         limits: {{drainTimeout: 1s}}\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        i = ports.inbound,
        o = ports.outbound,
        a = ports.admin,
    )
}

/// A line server: client-first (answers each line with `<name>: <LINE>`), or
/// server-first (greets with `HELLO <name>` before reading).
async fn line_server(name: &'static str, greets: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                if greets {
                    let _ = write.write_all(format!("HELLO {name}\n").as_bytes()).await;
                }
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = format!("{name}: {}\n", line.to_uppercase());
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Requests to catalog.example.com answered 200, over every series.
fn requests(text: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"catalog.example.com\"")
                && l.contains("response_code=\"200\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_ports_are_detected_as_http_h2c_or_opaque_tcp() {
    if !tool_available("curl") {
        assert!(std::env::var_os("CI").is_none(), "curl is missing");
        eprintln!("SKIPPED: curl is missing");
        return;
    }
    let world = World::new();
    let web = App::start(Behaviour::Ok("catalog")).await;
    let lines = line_server("echo", false).await;
    let mysql = line_server("mysql", true).await;
    let yaml = [
        entry("catalog.example.com", 9000, web.addr),
        entry("echo.example.com", 9001, lines),
        entry("db.example.com", 3306, mysql),
    ]
    .join("---\n");
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let (http_port, echo_port, db_port) = (free_port(), free_port(), free_port());
    let ports = Ports::new();
    let s = settings(
        &world,
        &config,
        ports,
        &[
            (http_port, "catalog.example.com:9000"),
            (echo_port, "echo.example.com:9001"),
            (db_port, "db.example.com:3306"),
        ],
        "",
    );
    let proxy = Proxy::start(&world, "sidecar", "order-service", &s, ports).await;

    // HTTP/1.1: served by the HTTP stack (its request metric names the service).
    let url = format!("http://catalog.example.com:{http_port}/items");
    let resolve = format!("catalog.example.com:{http_port}:127.0.0.1");
    let (code, out, err) = curl(&["-sS", "--resolve", &resolve, &url]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "catalog"),
        "{err}\n{}",
        proxy.output()
    );
    // HTTP/2 with prior knowledge on the same port.
    let (code, out, err) = curl(&[
        "-sS",
        "--http2-prior-knowledge",
        "--resolve",
        &resolve,
        &url,
    ])
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, "catalog"),
        "{err}\n{}",
        proxy.output()
    );
    assert_eq!(web.hits(), 2);
    let text = proxy.metrics_when(|t| requests(t) == 2.0).await;
    assert_eq!(requests(&text), 2.0, "{text}");

    // A client-first protocol that is not HTTP: opaque TCP to the service.
    let stream = TcpStream::connect(("127.0.0.1", echo_port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    write.write_all(b"ping\n").await.unwrap();
    let mut replies = BufReader::new(read).lines();
    let reply = tokio::time::timeout(Duration::from_secs(5), replies.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.as_deref(), Some("echo: PING"));

    // A server-first protocol on port 3306: its greeting arrives before the client
    // sends anything (detection would wait for the client).
    let stream = TcpStream::connect(("127.0.0.1", db_port)).await.unwrap();
    let (read, _write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let greeting = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("the server's greeting without a client byte")
        .unwrap();
    assert_eq!(greeting.as_deref(), Some("HELLO mysql"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_first_protocol_is_opaque_after_the_detection_timeout() {
    let world = World::new();
    let db = line_server("db", true).await;
    let config = world.write_config("istio", "mesh.yaml", &entry("db.example.com", 7777, db));
    let (with_timeout, without) = (free_port(), free_port());
    for (port, detection) in [
        (with_timeout, "  protocolDetectionTimeout: 300ms\n"),
        (without, ""),
    ] {
        let ports = Ports::new();
        let s = settings(
            &world,
            &config,
            ports,
            &[(port, "db.example.com:7777")],
            detection,
        );
        let name = format!("order-service-{port}");
        let proxy = Proxy::start(&world, "sidecar", &name, &s, ports).await;
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (read, _write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await;
        if detection.is_empty() {
            // Istio's default: detection waits for the client, which waits for the server.
            assert!(greeting.is_err(), "{greeting:?}\n{}", proxy.output());
        } else {
            let greeting = greeting
                .expect("the greeting once detection gave up")
                .unwrap();
            assert_eq!(greeting.as_deref(), Some("HELLO db"), "{}", proxy.output());
        }
    }
}
