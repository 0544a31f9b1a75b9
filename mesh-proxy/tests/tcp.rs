//! TCP through two sidecars, with the real binary: a line-protocol server that speaks
//! first, reached through the client sidecar's TCP listener; Istio mTLS between the
//! sidecars with the TCP metadata exchange; VirtualService `tcp` weights; an
//! AuthorizationPolicy on connection attributes; Istio's TCP metrics on both sides.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A server-first line protocol: greets with `HELLO <name>`, then answers each line
/// with `<name>: <LINE>`.
struct LineServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl LineServer {
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    if write
                        .write_all(format!("HELLO {name}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
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
        Self { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// The `echo` service (TCP port 7000) with sidecar endpoints on loopback:
/// `(port, labels)` each.
fn echo_entry(endpoints: &[(u16, &str)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(port, labels)| {
            format!(
                "  - {{address: 127.0.0.1, ports: {{tcp-echo: {port}}}, labels: {{{labels}}}, serviceAccount: echo}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: production}}
spec:
  hosts: [echo]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 7000, name: tcp-echo, protocol: TCP}}
  endpoints:
{eps}"
    )
}

fn mesh_yaml(v1: u16, v2: u16) -> String {
    let entry = echo_entry(&[
        (v1, "app: echo, version: v1"),
        (v2, "app: echo, version: v2"),
    ]);
    format!(
        "{entry}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: production}}
spec:
  host: echo
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: production}}
spec:
  hosts: [echo]
  tcp:
  - match: [{{port: 7000}}]
    route:
    - {{destination: {{host: echo, subset: v1}}, weight: 70}}
    - {{destination: {{host: echo, subset: v2}}, weight: 30}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: production}}
spec:
  mtls: {{mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: echo, namespace: production}}
spec:
  selector:
    matchLabels: {{app: echo}}
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/production/sa/order-service]
  # An HTTP-only field: on a TCP connection this rule matches nothing (AP-30).
  - from:
    - source:
        principals: [cluster.local/ns/production/sa/web-frontend]
    to:
    - operation: {{methods: [GET]}}
"
    )
}

/// Sidecar settings for workload `[name, service account, labels]`.
fn settings(
    world: &World,
    [name, sa, labels]: [&str; 3],
    config: &std::path::Path,
    ports: Ports,
    app: SocketAddr,
    tcp: Option<(u16, &str)>,
) -> String {
    let tcp = tcp.map_or(String::new(), |(port, destination)| {
        format!("  tcp:\n    127.0.0.1:{port}: {destination}\n")
    });
    format!(
        "workload:\n  name: {name}\n  namespace: production\n  serviceAccount: {sa}\n  labels: {{{labels}}}\n\
         configDir: {config}\nsvid:\n  caDir: {ca}\n\
         listeners:\n  inbound: 127.0.0.1:{i}\n  outbound: 127.0.0.1:{o}\n  admin: 127.0.0.1:{a}\n  app: {app}\n{tcp}\
         limits:\n  drainTimeout: 1s\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        i = ports.inbound,
        o = ports.outbound,
        a = ports.admin,
    )
}

/// Connects to `port`, reads the greeting, sends `line`, reads the answer, closes.
async fn exchange(port: u16, line: &str) -> (String, String) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let greeting = lines.next_line().await.unwrap().unwrap_or_default();
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    let answer = lines.next_line().await.unwrap().unwrap_or_default();
    (greeting, answer)
}

/// A server workload's sidecar (`server` as `[name, service account, labels]`, its
/// application at `app`) and a client `cart` whose TCP listener (the port returned) goes
/// to `destination`.
async fn server_and_client(
    world: &World,
    config: &std::path::Path,
    server: [&str; 3],
    server_ports: Ports,
    app: SocketAddr,
    client_ports: Ports,
    destination: &str,
) -> (Proxy, Proxy, u16) {
    let s = settings(world, server, config, server_ports, app, None);
    let server_proxy = Proxy::start(world, "sidecar", server[0], &s, server_ports).await;
    let client_port = free_port();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let s = settings(
        world,
        ["cart", "cart", "app: cart"],
        config,
        client_ports,
        nowhere,
        Some((client_port, destination)),
    );
    let client = Proxy::start(world, "sidecar", "cart", &s, client_ports).await;
    (server_proxy, client, client_port)
}

/// Checks that `proxy` counted one connection, opened and closed, with `labels`, that
/// received `received` bytes from its downstream and sent it `sent`.
async fn assert_one_connection(proxy: &Proxy, labels: &[(&str, &str)], received: f64, sent: f64) {
    let text = proxy
        .metrics_when(|t| {
            series_value(t, "istio_tcp_connections_closed_total", labels) == Some(1.0)
        })
        .await;
    for (metric, want) in [
        ("istio_tcp_connections_opened_total", 1.0),
        ("istio_tcp_connections_closed_total", 1.0),
        ("istio_tcp_received_bytes_total", received),
        ("istio_tcp_sent_bytes_total", sent),
    ] {
        assert_eq!(
            series_value(&text, metric, labels),
            Some(want),
            "{metric}\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_between_sidecars_with_weights_authorization_and_metrics() {
    let world = World::new();
    let (echo_v1, echo_v2) = (LineServer::start("v1").await, LineServer::start("v2").await);
    let (p1, p2, po, pw) = (Ports::new(), Ports::new(), Ports::new(), Ports::new());
    let config = world.write_config("istio", "mesh.yaml", &mesh_yaml(p1.inbound, p2.inbound));
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut proxies = Vec::new();
    for (name, version, ports, app) in [
        ("echo-v1", "v1", p1, echo_v1.addr),
        ("echo-v2", "v2", p2, echo_v2.addr),
    ] {
        let labels = format!("app: echo, version: {version}");
        let s = settings(&world, [name, "echo", &labels], &config, ports, app, None);
        proxies.push(Proxy::start(&world, "sidecar", name, &s, ports).await);
    }
    let (order_tcp, web_tcp) = (free_port(), free_port());
    let s = settings(
        &world,
        [
            "order-service-v1",
            "order-service",
            "app: order-service, version: v1",
        ],
        &config,
        po,
        nowhere,
        Some((order_tcp, "echo:7000")),
    );
    let order = Proxy::start(&world, "sidecar", "order-service", &s, po).await;
    let s = settings(
        &world,
        ["web-frontend", "web-frontend", "app: web-frontend"],
        &config,
        pw,
        nowhere,
        Some((web_tcp, "echo:7000")),
    );
    let web = Proxy::start(&world, "sidecar", "web-frontend", &s, pw).await;

    // The server speaks first; its greeting arrives after the sidecars' exchange.
    let (greeting, answer) = exchange(order_tcp, "ping").await;
    assert!(
        greeting.starts_with("HELLO v"),
        "{greeting:?}\n{}",
        order.output()
    );
    let version = &greeting[6..];
    assert_eq!(answer, format!("{version}: PING"));

    // Both reporters count the connection and its bytes, with the peer's workload from
    // the metadata exchange.
    let workload = format!("echo-{version}");
    let source = [
        ("reporter", "source"),
        ("source_workload", "order-service-v1"),
        ("destination_workload", workload.as_str()),
        ("destination_canonical_revision", version),
        ("destination_service", "echo.production.svc.cluster.local"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/production/sa/echo",
        ),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "tcp"),
    ];
    // Received from the client: "ping\n"; sent to it: the greeting and the answer.
    assert_one_connection(&order, &source, 5.0, 18.0).await;
    let server = if version == "v1" {
        &proxies[0]
    } else {
        &proxies[1]
    };
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "order-service-v1"),
        ("source_canonical_service", "order-service"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/production/sa/order-service",
        ),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", workload.as_str()),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "tcp"),
    ];
    assert_one_connection(server, &destination, 5.0, 18.0).await;

    // The VirtualService's 70/30 split, connection by connection.
    let mut counts = [0usize; 2];
    for i in 0..200 {
        let (greeting, answer) = exchange(order_tcp, &format!("n{i}")).await;
        let v2 = greeting == "HELLO v2";
        assert!(v2 || greeting == "HELLO v1", "{greeting:?}");
        assert_eq!(answer, format!("{}: N{i}", &greeting[6..]));
        counts[usize::from(v2)] += 1;
    }
    let expected = [140.0, 60.0];
    let chi: f64 = counts
        .iter()
        .zip(expected)
        .map(|(&o, e)| (o as f64 - e).powi(2) / e)
        .sum();
    assert!(chi < 10.83, "{counts:?}");

    // web-frontend's only rule has an HTTP-only field: inert on TCP, so its connection
    // is closed before the application sees it.
    let before = echo_v1.connections() + echo_v2.connections();
    let mut stream = TcpStream::connect(("127.0.0.1", web_tcp)).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("the denied connection is closed");
    assert!(read.is_ok_and(|n| n == 0), "{buf:?}\n{}", web.output());
    assert_eq!(echo_v1.connections() + echo_v2.connections(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_reaches_redis_server_through_two_sidecars() {
    if !tool_available("redis-server") || !tool_available("redis-cli") {
        return;
    }
    let world = World::new();
    let redis_port = free_port();
    let _redis = KillOnDrop(
        std::process::Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (pr, pc) = (Ports::new(), Ports::new());
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: redis, namespace: production}}
spec:
  hosts: [redis]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 6379, name: redis, protocol: TCP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{redis: {inbound}}}, labels: {{app: redis}}, serviceAccount: redis}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: production}}
spec:
  mtls: {{mode: STRICT}}
",
        inbound = pr.inbound
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let app = SocketAddr::from(([127, 0, 0, 1], redis_port));
    let (redis, _cart, client_port) = server_and_client(
        &world,
        &config,
        ["redis", "redis", "app: redis"],
        pr,
        app,
        pc,
        "redis:6379",
    )
    .await;

    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &client_port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    // redis-server may still be starting: the first command is retried.
    let mut set = String::new();
    for _ in 0..50 {
        set = cli(&["SET", "order:7", "paid"]);
        if set == "OK" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(set, "OK", "{}", redis.output());
    assert_eq!(cli(&["GET", "order:7"]), "paid");
    assert_eq!(cli(&["INCR", "orders"]), "1");

    let labels = [
        ("reporter", "destination"),
        ("source_workload", "cart"),
        ("destination_workload", "redis"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let text = redis
        .metrics_when(|t| {
            series_value(t, "istio_tcp_connections_closed_total", &labels).is_some_and(|n| n >= 3.0)
        })
        .await;
    assert!(
        series_value(&text, "istio_tcp_connections_closed_total", &labels)
            .is_some_and(|n| n >= 3.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_refuses_connections_is_ejected() {
    let world = World::new();
    let echo = LineServer::start("v1").await;
    let (pe, pc) = (Ports::new(), Ports::new());
    let dead = free_port();
    let entry = echo_entry(&[(pe.inbound, "app: echo"), (dead, "app: echo")]);
    let yaml = format!(
        "{entry}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: production}}
spec:
  host: echo
  trafficPolicy:
    loadBalancer: {{simple: ROUND_ROBIN}}
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 30s
      baseEjectionTime: 5m
      maxEjectionPercent: 100
"
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let (_echo_sidecar, cart, client_port) = server_and_client(
        &world,
        &config,
        ["echo-v1", "echo", "app: echo"],
        pe,
        echo.addr,
        pc,
        "echo:7000",
    )
    .await;

    // Round robin alternates until the dead endpoint's second connect failure ejects
    // it; from then on every connection reaches the live one.
    let mut results = Vec::new();
    for i in 0..12 {
        let stream = TcpStream::connect(("127.0.0.1", client_port))
            .await
            .unwrap();
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines.next_line().await.ok().flatten().unwrap_or_default();
        let _ = write.write_all(format!("n{i}\n").as_bytes()).await;
        results.push(greeting == "HELLO v1");
    }
    let failed = results.iter().filter(|ok| !**ok).count();
    assert_eq!(failed, 2, "{results:?}\n{}", cart.output());
    assert!(results[6..].iter().all(|ok| *ok), "{results:?}");
    assert_eq!(echo.connections(), 10);
}
