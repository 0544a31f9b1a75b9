//! Transparent capture in real network namespaces: `mesh-proxy init` installs the
//! nftables rules in each "pod", the sidecars run as UID 1337 inside them with
//! `listeners.capture`, and unmodified `curl` calls service addresses.
//!
//! Every test makes its own namespaces (a bridge namespace and one namespace per pod,
//! joined by veth pairs; addresses exist only inside them) and deletes them when it ends.
//! They need root; without it they skip, except under CI.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{KillOnDrop, World, series_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_mesh-proxy");
const HOST: &str = "payment-service.production.svc.cluster.local";
const VIP: &str = "10.96.0.10";
const LEDGER: &str = "ledger-service.production.svc.cluster.local";
const LEDGER_VIP6: &str = "fd00:96::20";
const DB_VIP: &str = "10.96.0.30";

/// Runs a command; panics with its output when it fails.
fn run(args: &[&str]) -> String {
    let out = StdCommand::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces of one test: a bridge and pods on it, deleted when dropped.
struct Net {
    prefix: String,
    bridge: String,
    pods: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain([&self.bridge]) {
            let _ = StdCommand::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Net {
    /// A bridge namespace, or `None` (and a note, or a failure under CI) when network
    /// namespaces cannot be made here.
    fn new(test: &str) -> Option<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "mc{}x{}{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            &test[..2]
        );
        let bridge = format!("{prefix}-br");
        let made = StdCommand::new("ip")
            .args(["netns", "add", &bridge])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let tools = ["nft", "setpriv", "curl"].iter().all(|t| {
            StdCommand::new(t)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        });
        if !made || !tools {
            assert!(
                std::env::var_os("CI").is_none(),
                "capture tests need root, `ip netns`, nft, setpriv and curl under CI"
            );
            eprintln!(
                "SKIPPED {test}: cannot make network namespaces (needs root and iproute2, nftables, util-linux, curl)"
            );
            return None;
        }
        let net = Self {
            prefix,
            bridge,
            pods: Vec::new(),
        };
        run(&[
            "ip",
            "-n",
            &net.bridge,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
        ]);
        run(&["ip", "-n", &net.bridge, "link", "set", "br0", "up"]);
        Some(net)
    }

    /// A pod namespace `name` with `eth0` on the bridge, addresses `10.244.0.<n>/24`
    /// and `fd00:244::<n>/64` (plus `extra`), default routes through `eth0`.
    fn pod(&mut self, name: &str, n: u8, extra: &[&str]) -> String {
        let ns = format!("{}-{name}", self.prefix);
        run(&["ip", "netns", "add", &ns]);
        self.pods.push(ns.clone());
        let veth = format!("v{n}");
        let b = self.bridge.clone();
        run(&[
            "ip", "-n", &b, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ]);
        run(&["ip", "-n", &b, "link", "set", &veth, "master", "br0", "up"]);
        let v4 = format!("10.244.0.{n}/24");
        let v6 = format!("fd00:244::{n}/64");
        run(&["ip", "-n", &ns, "addr", "add", &v4, "dev", "eth0"]);
        run(&[
            "ip", "-n", &ns, "-6", "addr", "add", &v6, "dev", "eth0", "nodad",
        ]);
        for a in extra {
            run(&["ip", "-n", &ns, "addr", "add", a, "dev", "eth0"]);
        }
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &ns, "route", "add", "default", "dev", "eth0"]);
        run(&[
            "ip", "-n", &ns, "-6", "route", "add", "default", "dev", "eth0",
        ]);
        ns
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it opens stay there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// A listener on `addr` inside `ns`.
fn listen_in(ns: &str, addr: &str) -> tokio::net::TcpListener {
    let addr: SocketAddr = addr.parse().expect("address");
    let std = in_netns(ns, move || std::net::TcpListener::bind(addr).expect("bind"));
    std.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpListener::from_std(std).expect("tokio listener")
}

/// The requests an application saw: `METHOD path from remote xfcc=<X-Forwarded-Client-Cert>`.
type Seen = Arc<Mutex<Vec<String>>>;

/// An HTTP application on `listener` answering `METHOD path from <remote>` and
/// recording the same line with the `X-Forwarded-Client-Cert` the mesh gave it.
fn http_app(listener: tokio::net::TcpListener) -> Seen {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, remote)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let line = format!("{} {} from {remote}", req.method(), req.uri().path());
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map_or("-".into(), |v| String::from_utf8_lossy(v.as_bytes()));
                    log.lock().unwrap().push(format!("{line} xfcc={xfcc}"));
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            line,
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    seen
}

/// A TCP application on `listener` that answers each connection with `from <remote>: `
/// and then echoes what it reads.
fn tcp_echo(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        while let Ok((mut tcp, remote)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let reply = format!("from {remote}: {}", String::from_utf8_lossy(&buf[..n]));
                    if tcp.write_all(reply.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Makes the test directory readable by the proxy UID (the CA and configuration).
fn share(world: &World) {
    run(&[
        "chmod",
        "-R",
        "a+rX",
        &world.dir.path().display().to_string(),
    ]);
}

/// `mesh-proxy init ARGS` inside `ns`.
fn init(ns: &str, args: &[&str]) -> std::process::Output {
    StdCommand::new("ip")
        .args(["netns", "exec", ns, BIN, "init"])
        .args(args)
        .output()
        .expect("mesh-proxy init")
}

/// A sidecar running as UID 1337 inside a pod namespace.
struct Sidecar {
    ns: String,
    _child: KillOnDrop,
    log: PathBuf,
}

impl Sidecar {
    async fn start(world: &World, ns: &str, sa: &str, config: &Path, extra: &str) -> Self {
        let settings = format!(
            "workload:\n  namespace: production\n  serviceAccount: {sa}\n  labels:\n    app: {sa}\n    version: v1\n\
             configDir: {config}\nsvid:\n  caDir: {ca}\n  lifetime: 1h\n\
             listeners:\n  capture: true\n  app: 127.0.0.1:8080\n\
             limits:\n  drainTimeout: 1s\n{extra}",
            config = config.display(),
            ca = world.ca_dir.display(),
        );
        let file = world.path(&format!("{sa}.yaml"));
        std::fs::write(&file, settings).expect("settings");
        share(world);
        let log = world.path(&format!("{sa}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let child = StdCommand::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
            ])
            .args(["--clear-groups", BIN, "sidecar", "--settings"])
            .arg(&file)
            .env("MESH_LOG", "info,mesh_proxy=debug")
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn sidecar");
        let sidecar = Self {
            ns: ns.to_owned(),
            _child: KillOnDrop(child),
            log,
        };
        for _ in 0..400 {
            if sidecar
                .curl(&[
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15000/healthz/ready",
                ])
                .await
                .1
                == "200"
            {
                return sidecar;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("sidecar {sa} did not become ready:\n{}", sidecar.output());
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// curl inside the sidecar's namespace (as the application, UID 0).
    async fn curl(&self, args: &[&str]) -> (i32, String, String) {
        curl_in(&self.ns, args).await
    }

    /// The proxy's Prometheus metrics, once `ready` holds (or after 2 s).
    async fn metrics_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let mut text = String::new();
        for _ in 0..100 {
            text = self
                .curl(&["http://127.0.0.1:15000/stats/prometheus"])
                .await
                .1;
            if ready(&text) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        text
    }
}

/// curl with `args` inside `ns`: (exit code, stdout, stderr).
async fn curl_in(ns: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The article's PeerAuthentication and AuthorizationPolicy, and ServiceEntries giving
/// payment-service its virtual IP (as a Kubernetes ClusterIP) and ledger-service an IPv6
/// one, both served by the payment pod.
fn article_config(world: &World) -> PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sidecar/config");
    for file in [
        "peer-authentication-strict.yaml",
        "authorization-policy-payment.yaml",
    ] {
        let yaml = std::fs::read_to_string(examples.join(file)).expect("article config");
        world.write_config("istio", file, &yaml);
    }
    let entries = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http}}]
  endpoints:
  - {{address: 10.244.0.2, labels: {{app: payment-service}}, serviceAccount: payment-service}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ledger-service, namespace: production}}
spec:
  hosts: [{LEDGER}]
  addresses: [\"{LEDGER_VIP6}\"]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http}}]
  endpoints:
  - {{address: \"fd00:244::2\", labels: {{app: payment-service}}, serviceAccount: payment-service}}
"
    );
    world.write_config("istio", "services.yaml", &entries)
}

fn has_series(
    metric: &'static str,
    labels: &'static [(&'static str, &'static str)],
) -> impl Fn(&str) -> bool {
    move |text| series_value(text, metric, labels).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_curl_reaches_payment_with_mtls_authorization_and_metrics() {
    let Some(mut net) = Net::new("captured_curl") else {
        return;
    };
    let order_ns = net.pod("order", 1, &[]);
    let payment_ns = net.pod("payment", 2, &[]);
    let frontend_ns = net.pod("frontend", 3, &[]);
    for ns in [&order_ns, &payment_ns, &frontend_ns] {
        let out = init(ns, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let world = World::new();
    let config = article_config(&world);
    let payment_app = http_app(listen_in(&payment_ns, "127.0.0.1:8080"));
    let payment = Sidecar::start(&world, &payment_ns, "payment-service", &config, "").await;
    let order = Sidecar::start(&world, &order_ns, "order-service", &config, "").await;
    let frontend = Sidecar::start(&world, &frontend_ns, "web-frontend", &config, "").await;

    // The application's own call, unchanged: the name resolves to the virtual IP (as
    // kube-dns would answer) and the kernel sends the connection to the sidecar.
    let url = format!("http://{HOST}:8080/api/v1/payments");
    let resolve = format!("{HOST}:8080:{VIP}");
    let call = |ns: String, method: &'static str| {
        let (url, resolve) = (url.clone(), resolve.clone());
        async move {
            curl_in(
                &ns,
                &[
                    "-X",
                    method,
                    "--resolve",
                    &resolve,
                    "-w",
                    "\n%{http_code}",
                    &url,
                ],
            )
            .await
        }
    };
    let (code, out, err) = call(order_ns.clone(), "POST").await;
    assert_eq!(code, 0, "{err}\n{}", order.output());
    assert!(
        out.ends_with("\n200"),
        "{out}\n{}\n{}",
        order.output(),
        payment.output()
    );
    // Delivered by the payment sidecar on loopback, at the original port.
    assert!(
        out.starts_with("POST /api/v1/payments from 127.0.0.1:"),
        "{out}"
    );

    // The article's AuthorizationPolicy: GET from order-service and POST from another
    // workload are denied by the payment sidecar.
    let (_, out, _) = call(order_ns.clone(), "GET").await;
    assert!(out.ends_with("\n403"), "{out}");
    let (_, out, _) = call(frontend_ns.clone(), "POST").await;
    assert!(out.ends_with("\n403"), "{out}\n{}", frontend.output());

    // IPv6: a service with an IPv6 virtual address, served by the same pod over IPv6.
    let (code, out, err) = curl_in(
        &order_ns,
        &[
            "-X",
            "POST",
            "-g",
            "--resolve",
            &format!("{LEDGER}:8080:[{LEDGER_VIP6}]"),
            "-w",
            "\n%{http_code}",
            &format!("http://{LEDGER}:8080/api/v1/payments"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n200"), "{out}\n{}", payment.output());

    // Called by its address, the Host names no known host: the request goes to the
    // service that owns the address.
    let (_, out, err) = curl_in(
        &order_ns,
        &[
            "-X",
            "POST",
            "-w",
            "\n%{http_code}",
            &format!("http://{VIP}:8080/api/v1/payments"),
        ],
    )
    .await;
    assert!(out.ends_with("\n200"), "{out}{err}");

    // Without capture's help the application may still call its sidecar with a Host.
    let (_, out, _) = order
        .curl(&[
            "-X",
            "POST",
            "-H",
            &format!("host: {HOST}:8080"),
            "-w",
            "\n%{http_code}",
            "http://127.0.0.1:15001/api/v1/payments",
        ])
        .await;
    assert!(out.ends_with("\n200"), "{out}");

    // Exactly the allowed requests reached the application: nothing looped through
    // the sidecars (whose own connections, as UID 1337, are never captured).
    let seen = payment_app.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    // Each came over mTLS from order-service's sidecar: the application is told the
    // caller's verified identity (Istio's SANITIZE_SET X-Forwarded-Client-Cert).
    for line in &seen {
        assert!(
            line.contains(";URI=spiffe://cluster.local/ns/production/sa/order-service")
                && line.contains(
                    "xfcc=By=spiffe://cluster.local/ns/production/sa/payment-service;Hash="
                ),
            "{line}"
        );
    }

    // Istio's metrics on both proxies, with both workloads and the mTLS identity.
    let src: &[(&str, &str)] = &[
        ("reporter", "source"),
        ("source_workload", "order-service"),
        ("destination_workload", "payment-service"),
        ("destination_service", HOST),
        ("response_code", "200"),
    ];
    // Metrics are recorded at stream end, a moment after the client has its response.
    let text = order
        .metrics_when(|t| series_value(t, "istio_requests_total", src) == Some(3.0))
        .await;
    assert_eq!(
        series_value(&text, "istio_requests_total", src),
        Some(3.0),
        "{text}"
    );
    assert!(
        series_value(
            &text,
            "istio_requests_total",
            &[("destination_service", LEDGER), ("response_code", "200")]
        )
        .is_some(),
        "{text}"
    );
    let dst: &[(&str, &str)] = &[
        ("reporter", "destination"),
        ("source_workload", "order-service"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/production/sa/order-service",
        ),
        ("destination_workload", "payment-service"),
        ("connection_security_policy", "mutual_tls"),
        ("response_code", "200"),
    ];
    let denied: &[(&str, &str)] = &[
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/production/sa/web-frontend",
        ),
        ("response_code", "403"),
    ];
    let text = payment
        .metrics_when(|t| {
            series_value(t, "istio_requests_total", dst) == Some(4.0)
                && series_value(t, "istio_requests_total", denied) == Some(1.0)
        })
        .await;
    assert_eq!(
        series_value(&text, "istio_requests_total", dst),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        series_value(&text, "istio_requests_total", denied),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_ports_and_ranges_bypass_and_tcp_goes_by_address() {
    let Some(mut net) = Net::new("excluded") else {
        return;
    };
    let order_ns = net.pod("order", 1, &[]);
    let ext_ns = net.pod("ext", 9, &["10.244.0.8/24"]);
    // This pod's rules go through iptables-restore, the backend for hosts without nft;
    // applied twice, they are there once.
    let args = [
        "--backend",
        "iptables",
        "--exclude-outbound-ports",
        "9000",
        "--exclude-outbound-ip-ranges",
        "10.244.0.8/32",
    ];
    for _ in 0..2 {
        let out = init(&order_ns, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let saved = run(&[
        "ip",
        "netns",
        "exec",
        &order_ns,
        "iptables-save",
        "-t",
        "nat",
    ]);
    assert_eq!(
        saved.matches("-A OUTPUT -p tcp -j MESH_OUTPUT").count(),
        1,
        "{saved}"
    );
    assert_eq!(
        saved
            .matches("-A PREROUTING -p tcp -j MESH_INBOUND")
            .count(),
        1,
        "{saved}"
    );
    assert_eq!(
        saved.matches("--dport 9000 -j RETURN").count(),
        1,
        "{saved}"
    );
    // Servers outside the mesh, answering with the address they see.
    for addr in ["0.0.0.0:9000", "0.0.0.0:9001", "0.0.0.0:9002"] {
        http_app(listen_in(&ext_ns, addr));
    }
    tcp_echo(listen_in(&ext_ns, "0.0.0.0:5432"));
    let world = World::new();
    let config = world.write_config(
        "istio",
        "db.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ledger-db, namespace: production}}
spec:
  hosts: [ledger-db.production.svc.cluster.local]
  addresses: [{DB_VIP}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 5432, name: tcp-postgres, protocol: TCP}}]
  endpoints: [{{address: 10.244.0.9}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: production}}
spec:
  hosts: [web.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 9002, name: http}}]
  endpoints: [{{address: 10.244.0.7}}]
"
        ),
    );
    let order = Sidecar::start(&world, &order_ns, "order-service", &config, "").await;

    // (url, bypasses the sidecar)
    for (url, bypass) in [
        ("http://10.244.0.9:9000/", true),  // excluded port
        ("http://10.244.0.8:9001/", true),  // excluded range
        ("http://10.244.0.9:9001/", false), // captured, passed through as TCP
        // Captured on a port served over HTTP: read as HTTP, and with a Host that names
        // nothing, passed through to the original address (not to the Host).
        ("http://10.244.0.9:9002/", false),
    ] {
        let (code, out, err) = curl_in(
            &order_ns,
            &[
                "-H",
                "host: nowhere.invalid",
                "-w",
                "\n%{local_ip} %{local_port}",
                url,
            ],
        )
        .await;
        assert_eq!(code, 0, "{url}: {err}\n{}", order.output());
        let (body, local) = out.rsplit_once('\n').expect("two lines");
        let (ip, port) = local.split_once(' ').expect("ip and port");
        let seen = body.rsplit_once(" from ").expect("remote").1;
        assert!(seen.starts_with(&format!("{ip}:")), "{url}: {body}");
        // Bypassing, the server sees curl's own connection; captured, the sidecar's.
        assert_eq!(
            seen == format!("{ip}:{port}"),
            bypass,
            "{url}: server saw {seen}, curl was {ip}:{port}"
        );
    }
    let text = order
        .metrics_when(has_series(
            "istio_requests_total",
            &[
                ("destination_service", "nowhere.invalid"),
                ("response_code", "200"),
            ],
        ))
        .await;
    assert!(
        series_value(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("destination_service", "nowhere.invalid"),
                ("response_code", "200")
            ]
        )
        .is_some(),
        "{text}"
    );
    assert_eq!(
        series_value(
            &text,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("destination_service_name", "PassthroughCluster")
            ]
        ),
        Some(1.0),
        "{text}"
    );

    // TCP to a service's virtual address: routed by address and port to its endpoint.
    let db: SocketAddr = format!("{DB_VIP}:5432").parse().unwrap();
    let conn = in_netns(&order_ns, move || {
        std::net::TcpStream::connect_timeout(&db, Duration::from_secs(5))
    });
    let conn = conn.expect("connect to the database's virtual address");
    conn.set_nonblocking(true).unwrap();
    let mut conn = tokio::net::TcpStream::from_std(conn).unwrap();
    conn.write_all(b"SELECT 1").await.unwrap();
    let mut reply = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut reply))
        .await
        .expect("echo in time")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    assert!(
        reply.starts_with("from 10.244.0.1:") && reply.ends_with(": SELECT 1"),
        "{reply}\n{}",
        order.output()
    );
    drop(conn);
    let text = order
        .metrics_when(has_series(
            "istio_tcp_connections_opened_total",
            &[(
                "destination_service",
                "ledger-db.production.svc.cluster.local",
            )],
        ))
        .await;
    assert!(
        series_value(
            &text,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                (
                    "destination_service",
                    "ledger-db.production.svc.cluster.local"
                )
            ]
        )
        .is_some(),
        "{text}"
    );
}

#[tokio::test]
async fn init_is_idempotent_prints_its_rules_and_cleans_up() {
    let Some(mut net) = Net::new("init") else {
        return;
    };
    let ns = net.pod("pod", 1, &[]);
    let tables = || run(&["ip", "netns", "exec", &ns, "nft", "list", "tables"]);

    // --dry-run prints the script and changes nothing.
    let out = init(
        &ns,
        &[
            "--dry-run",
            "-d",
            "9090",
            "--exclude-outbound-ip-ranges",
            "10.0.0.0/8,fd00::/8",
        ],
    );
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.starts_with("table inet mesh_capture\ndelete table inet mesh_capture\n"),
        "{script}"
    );
    for line in [
        "tcp dport { 9090, 15000, 15020, 15021, 15090 } return",
        "meta skuid 1337 return",
        "ip daddr 10.0.0.0/8 return",
        "ip6 daddr fd00::/8 return",
        "meta l4proto tcp redirect to :15001",
        "meta l4proto tcp redirect to :15006",
    ] {
        assert!(script.contains(line), "{line} missing:\n{script}");
    }
    assert_eq!(tables().trim(), "");

    // Applied twice (the second time with other flags): one table, the second rules.
    assert!(init(&ns, &["-o", "7000"]).status.success());
    let out = init(&ns, &["-o", "7001"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tables().trim(), "table inet mesh_capture");
    let rules = run(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "nft",
        "list",
        "table",
        "inet",
        "mesh_capture",
    ]);
    assert!(
        rules.contains("tcp dport 7001 return") && !rules.contains("7000"),
        "{rules}"
    );

    // A bad list is refused with the option named; the rules in force stay.
    let out = init(&ns, &["--exclude-inbound-ports", "80,http"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("excludeInboundPorts: \"http\" is not a port"),
        "{err}"
    );
    assert_eq!(tables().trim(), "table inet mesh_capture");

    // Clean-up removes the table, and is harmless when there is none.
    assert!(init(&ns, &["--cleanup"]).status.success());
    assert_eq!(tables().trim(), "");
    assert!(init(&ns, &["--cleanup"]).status.success());

    // The iptables backend: its dry run prints both families' scripts; clean-up removes
    // its jumps and chains, and is harmless when there are none.
    let out = init(&ns, &["--backend", "iptables", "--dry-run", "-o", "7001"]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("# V4: iptables-restore --noflush\n*nat\n")
            && script.contains("# V6: iptables-restore --noflush\n*nat\n")
            && script.contains("-A MESH_OUTPUT -p tcp --dport 7001 -j RETURN\n"),
        "{script}"
    );
    let saved = || run(&["ip", "netns", "exec", &ns, "iptables-save", "-t", "nat"]);
    assert!(init(&ns, &["--backend", "iptables"]).status.success());
    assert!(saved().contains(":MESH_OUTPUT"), "{}", saved());
    assert!(
        init(&ns, &["--backend", "iptables", "--cleanup"])
            .status
            .success()
    );
    assert!(!saved().contains("MESH_"), "{}", saved());
    assert!(
        init(&ns, &["--backend", "iptables", "--cleanup"])
            .status
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_refuses_unknown_destinations_and_policies_see_the_original_port() {
    let Some(mut net) = Net::new("registry_only") else {
        return;
    };
    let order_ns = net.pod("order", 1, &[]);
    let payment_ns = net.pod("payment", 2, &[]);
    let ext_ns = net.pod("ext", 9, &[]);
    for ns in [&order_ns, &payment_ns] {
        assert!(init(ns, &[]).status.success());
    }
    let ext_9001 = http_app(listen_in(&ext_ns, "0.0.0.0:9001"));
    let ext_8080 = http_app(listen_in(&ext_ns, "0.0.0.0:8080"));
    let payment_app = http_app(listen_in(&payment_ns, "127.0.0.1:8080"));
    let admin_app = http_app(listen_in(&payment_ns, "127.0.0.1:9090"));
    let world = World::new();
    let config = world.write_config(
        "istio",
        "payment.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http}}]
  endpoints:
  - {{address: 10.244.0.2, labels: {{app: payment-service}}, serviceAccount: payment-service}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-admin, namespace: production}}
spec:
  hosts: [payment-admin.production.svc.cluster.local]
  addresses: [10.96.0.11]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9090, name: http-admin}}]
  endpoints:
  - {{address: 10.244.0.2, labels: {{app: payment-service}}, serviceAccount: payment-service}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: production}}
spec:
  selector: {{matchLabels: {{app: payment-service}}}}
  action: DENY
  rules:
  - to:
    - operation: {{ports: [\"9090\"]}}
"
        ),
    );
    let payment = Sidecar::start(&world, &payment_ns, "payment-service", &config, "").await;
    let order = Sidecar::start(
        &world,
        &order_ns,
        "order-service",
        &config,
        "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n",
    )
    .await;
    let code = |out: &str| out.rsplit('\n').next().unwrap_or_default().to_owned();

    // The inbound side sees the original port: the DENY rule for 9090 applies there
    // and not on 8080, although both arrive on the sidecar's 15006.
    for (host, vip, port, expected) in [
        (HOST, VIP, "8080", "200"),
        (
            "payment-admin.production.svc.cluster.local",
            "10.96.0.11",
            "9090",
            "403",
        ),
    ] {
        let (_, out, err) = curl_in(
            &order_ns,
            &[
                "-X",
                "POST",
                "--resolve",
                &format!("{host}:{port}:{vip}"),
                "-w",
                "\n%{http_code}",
                &format!("http://{host}:{port}/api/v1/payments"),
            ],
        )
        .await;
        assert_eq!(
            code(&out),
            expected,
            "port {port}: {out}{err}\n{:?} {:?}\n{}",
            payment_app.lock().unwrap(),
            admin_app.lock().unwrap(),
            payment.output()
        );
    }
    assert_eq!(payment_app.lock().unwrap().len(), 1);
    assert!(admin_app.lock().unwrap().is_empty());

    // An address no service owns, on a port no service serves over HTTP: the
    // connection is refused (Istio's BlackHoleCluster) and never reaches the server.
    let (exit, _, err) = curl_in(&order_ns, &["http://10.244.0.9:9001/"]).await;
    assert_ne!(exit, 0, "{err}\n{}", order.output());
    // On a port some service serves over HTTP, the request is read: an unknown Host
    // gets 502, a known Host goes to its service whatever the address (ISTIO.md PS-30).
    let (_, out, _) = curl_in(
        &order_ns,
        &["-w", "\n%{http_code}", "http://10.244.0.9:8080/"],
    )
    .await;
    assert_eq!(code(&out), "502", "{out}");
    let (_, out, _) = curl_in(
        &order_ns,
        &[
            "-X",
            "POST",
            "-H",
            &format!("host: {HOST}:8080"),
            "-w",
            "\n%{http_code}",
            "http://10.244.0.9:8080/api/v1/payments",
        ],
    )
    .await;
    assert_eq!(code(&out), "200", "{out}");
    assert_eq!(payment_app.lock().unwrap().len(), 2);
    assert!(ext_9001.lock().unwrap().is_empty() && ext_8080.lock().unwrap().is_empty());
}
