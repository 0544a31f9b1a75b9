//! mesh-proxy: allocations per request through the composed stacks of sidecars started
//! in-process, with the application, the sidecars and the client on one
//! current-thread runtime so that the per-thread counting allocator sees every
//! allocation a request causes (client, listeners, layers, connection tasks, app).
//!
//! ```sh
//! cargo test -p benches --bench proxy_counts --no-run    # prints the binary path
//! <binary> allocations [N]    # allocations per request of every scenario (N = 2000)
//! cargo bench -p benches --bench proxy_counts             # the same, release build
//! ```
//!
//! Run without arguments (`cargo test --benches`) it sends a few requests through every
//! scenario and checks the answers, without counting.
//!
//! Scenarios, each warmed up first (connections established, pools filled, lazily
//! built destinations and metric series in place), then `N` requests counted:
//!
//! - `direct`: client → application (the floor: client and application alone);
//! - `inbound`: client → inbound listener in plaintext (no PeerAuthentication, so
//!   PERMISSIVE) → sanitize → telemetry → authorization (no policy) → application;
//! - `outbound`: client → outbound listener → telemetry → router → deadline (no route
//!   timeout) → retry (Istio's default policy) → pool limits → balancer → mTLS (h2) →
//!   inbound sidecar → application;
//! - `outbound_vs`: the same with the article's VirtualService (`timeout: 5s`,
//!   `retries: {attempts: 3, perTryTimeout: 2s}`), so the deadline and per-try timers
//!   are armed.
//!
//! The client is the same in every scenario (hyper-util's legacy client, HTTP/1.1
//! keep-alive), so its share cancels out in the differences between rows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_proxy::{ProxyHandle, Sidecar};

const SCENARIOS: [&str; 4] = ["direct", "inbound", "outbound", "outbound_vs"];

/// The article's VirtualService for payment-service: a 5 s request timeout and three
/// attempts of at most 2 s each.
const ARTICLE_VIRTUAL_SERVICE: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service, namespace: production}
spec:
  hosts: [payment-service]
  http:
  - timeout: 5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,retriable-4xx
    route:
    - destination: {host: payment-service}
";

use benches::proxy::{app, service_entry, settings};

/// Writes `yaml` as the only file of configuration directory `name`. Every directory
/// is written before its sidecar starts and never again, so no reload runs while
/// requests are counted.
fn write_config(dir: &Path, name: &str, yaml: &str) {
    std::fs::create_dir_all(dir.join(name)).expect("config dir");
    std::fs::write(dir.join(name).join("mesh.yaml"), yaml).expect("config");
}

/// The application and three sidecars: payment-service (in front of the application)
/// and two order-service sidecars routing to it, without and with the article's
/// VirtualService.
struct Mesh {
    dir: PathBuf,
    app: SocketAddr,
    payment: ProxyHandle,
    order: ProxyHandle,
    order_vs: ProxyHandle,
}

impl Mesh {
    async fn start(dir: PathBuf) -> Self {
        mesh_tls::CertificateAuthority::new("cluster.local")
            .expect("ca")
            .write_dir(&dir.join("ca"))
            .expect("write ca");
        let app = app().await;
        write_config(&dir, "payment", &service_entry(1));
        let payment = Sidecar::start(settings(&dir, "payment-service", "payment", app))
            .await
            .expect("payment");
        let inbound = payment.address("inbound").expect("inbound");
        let no_app: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        write_config(&dir, "order", &service_entry(inbound.port()));
        let order = Sidecar::start(settings(&dir, "order-service", "order", no_app))
            .await
            .expect("order");
        write_config(
            &dir,
            "order-vs",
            &format!(
                "{}---\n{ARTICLE_VIRTUAL_SERVICE}",
                service_entry(inbound.port())
            ),
        );
        let order_vs = Sidecar::start(settings(&dir, "order-service", "order-vs", no_app))
            .await
            .expect("order with VirtualService");
        Self {
            dir,
            app,
            payment,
            order,
            order_vs,
        }
    }

    /// Where the client sends the requests of `scenario`.
    fn target(&self, scenario: &str) -> SocketAddr {
        match scenario {
            "direct" => self.app,
            "inbound" => self.payment.address("inbound").expect("inbound"),
            "outbound" => self.order.address("outbound").expect("outbound"),
            "outbound_vs" => self.order_vs.address("outbound").expect("outbound"),
            other => panic!("unknown scenario {other:?}; one of {SCENARIOS:?}"),
        }
    }

    async fn stop(self) {
        for proxy in [self.order_vs, self.order, self.payment] {
            proxy.shutdown();
            proxy.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One POST to payment-service through `target` and its whole response.
async fn request(client: &Client<HttpConnector, Full<Bytes>>, target: SocketAddr) {
    let req = Request::post(format!("http://{target}/pay"))
        .header("host", "payment-service")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let res = client.request(req).await.expect("response");
    assert_eq!(res.status(), 200, "through {target}");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"paid");
}

fn main() {
    // `cargo bench` adds `--bench`; `cargo test` runs the binary without it.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let positional: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let count = positional.first() == Some(&"allocations") || args.iter().any(|a| a == "--bench");
    let (warm_up, n): (u64, u64) = if count {
        let n = positional
            .get(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(2000);
        (200, n)
    } else {
        (3, 0)
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("mesh-proxy-counts-{}", std::process::id()));
    let mesh = rt.block_on(Mesh::start(dir));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    if count {
        println!(
            "{:<12} {:>12} {:>14}   ({n} requests per scenario)",
            "scenario", "allocations", "bytes"
        );
    }
    for scenario in SCENARIOS {
        let target = mesh.target(scenario);
        rt.block_on(async {
            for _ in 0..warm_up {
                request(&client, target).await;
            }
            // Let the connection tasks finish the last warm-up exchange.
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        if !count {
            println!("{scenario}: {warm_up} requests answered 200");
            continue;
        }
        let info = allocation_counter::measure(|| {
            rt.block_on(async {
                for _ in 0..n {
                    request(&client, target).await;
                }
            });
        });
        println!(
            "{scenario:<12} {:>12.2} {:>14.1}",
            info.count_total as f64 / n as f64,
            info.bytes_total as f64 / n as f64
        );
    }
    drop(client);
    rt.block_on(mesh.stop());
}
