//! mesh-proxy's stacks embedded in-process ([`mesh_proxy::Mesh`]) around a no-op
//! application: what one request costs in the library itself, without listeners for
//! the application or a client process.
//!
//! - `stack/inbound`: the inbound stack called directly (sanitize → telemetry →
//!   respond → AuthorizationPolicy, the article's, allowing the caller → no-op), with
//!   the caller's identity already in the request as a TLS accept leaves it;
//! - `stack/outbound_inbound`: order-service's outbound stack (telemetry → router →
//!   deadline 5 s → retries → pool limits → balancer with outlier detection) → mTLS
//!   over h2 on loopback → payment-service's inbound stack (`Mesh::serve_inbound`) →
//!   no-op.
//!
//! ```sh
//! cargo bench -p benches --bench stack                          # criterion
//! cargo test -p benches --bench stack --no-run                  # prints the binary path
//! <binary> allocations [N]                                      # allocations per request
//! ```
//!
//! Everything runs on one current-thread runtime, so the per-thread counting allocator
//! sees every allocation of a request (both stacks, the connection tasks, hyper, rustls).
//! Run by `cargo test --benches`, it sends a few requests through each and checks them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody};
use mesh_core::extensions::{ConnectionInfo, ConnectionSecurity};
use mesh_core::{Identity, PeerIdentity};
use mesh_proxy::stack::HttpService;
use mesh_proxy::{Certificates, Mesh, Outbound, Workload};
use tower::{ServiceExt, service_fn};

/// The article's payment-service policy: STRICT mTLS, only order-service may POST,
/// retries under a 5 s deadline, outlier detection and pool limits.
const ISTIO: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-service, namespace: production}
spec:
  selector: {matchLabels: {app: payment-service}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/production/sa/order-service]}}]
    to: [{operation: {methods: [POST], paths: [/api/v1/payments*]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service, namespace: production}
spec:
  hosts: [payment-service]
  http:
  - timeout: 5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"gateway-error,connect-failure\"}
    route: [{destination: {host: payment-service}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment-service, namespace: production}
spec:
  host: payment-service
  trafficPolicy:
    connectionPool: {http: {http1MaxPendingRequests: 1024, http2MaxRequests: 1024}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50}
";

struct World {
    payment: Mesh,
    order: Mesh,
    inbound: HttpService,
    outbound: Outbound,
    _dir: tempfile::TempDir,
}

fn noop() -> impl tower::Service<
    Request<BoxBody>,
    Response = Response<BoxBody>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(|_req: Request<BoxBody>| async { Ok(Response::new(body::full("paid"))) })
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Arc::new(mesh_tls::CertificateAuthority::new("cluster.local").expect("ca"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let entry = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: payment-service, namespace: production}}\n\
         spec:\n  hosts: [payment-service]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n\
         \x20 endpoints:\n  - address: 127.0.0.1\n    ports: {{http: {port}}}\n    serviceAccount: payment-service\n"
    );
    std::fs::write(dir.path().join("mesh.yaml"), format!("{entry}---\n{ISTIO}")).expect("yaml");
    let certificates = Certificates::Issuer { ca, lifetime: None };
    let build = |sa: &str| {
        Mesh::builder(Workload::new("production", sa).label("app", sa))
            .config_dir(dir.path())
            .certificates(certificates.clone())
            .build()
            .expect("mesh")
    };
    let payment = build("payment-service");
    payment.serve_inbound(listener, noop());
    let order = build("order-service");
    World {
        inbound: payment.inbound(noop()),
        outbound: order.outbound(),
        payment,
        order,
        _dir: dir,
    }
}

/// A POST as the inbound stack receives it after order-service's mTLS handshake.
fn inbound_request() -> Request<BoxBody> {
    let mut req = Request::post("/api/v1/payments")
        .header("host", "payment-service")
        .body(body::empty())
        .expect("request");
    let caller =
        Identity::parse("spiffe://cluster.local/ns/production/sa/order-service").expect("identity");
    req.extensions_mut().insert(PeerIdentity(caller));
    let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
    req.extensions_mut().insert(ConnectionInfo {
        remote: addr(40_000),
        local: addr(8080),
        security: ConnectionSecurity::MutualTls,
    });
    req
}

async fn inbound(w: &World) {
    let res = w
        .inbound
        .clone()
        .oneshot(inbound_request())
        .await
        .expect("inbound");
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.expect("body");
}

async fn outbound(w: &World) {
    let req = Request::post("http://payment-service/api/v1/payments")
        .body(body::empty())
        .expect("request");
    let res = w.outbound.clone().oneshot(req).await.expect("outbound");
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.expect("body");
}

fn main() {
    // `cargo bench` adds `--bench`; `cargo test` runs the binary without it.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let w = rt.block_on(world());
    let allocations = args.first().map(String::as_str) == Some("allocations");
    if allocations {
        let n: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(2000);
        println!(
            "{:<18} {:>12} {:>12}   ({n} requests)",
            "scenario", "allocations", "bytes"
        );
        for name in ["inbound", "outbound_inbound"] {
            rt.block_on(async {
                for _ in 0..200 {
                    if name == "inbound" {
                        inbound(&w).await
                    } else {
                        outbound(&w).await
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
            let info = allocation_counter::measure(|| {
                rt.block_on(async {
                    for _ in 0..n {
                        if name == "inbound" {
                            inbound(&w).await
                        } else {
                            outbound(&w).await
                        }
                    }
                });
            });
            println!(
                "{name:<18} {:>12.2} {:>12.1}",
                info.count_total as f64 / n as f64,
                info.bytes_total as f64 / n as f64
            );
        }
    } else if args.iter().any(|a| a == "--bench") {
        let mut c = Criterion::default().configure_from_args();
        let mut g = c.benchmark_group("stack");
        g.measurement_time(Duration::from_secs(3));
        g.bench_function("inbound", |b| b.to_async(&rt).iter(|| inbound(&w)));
        g.bench_function("outbound_inbound", |b| {
            b.to_async(&rt).iter(|| outbound(&w))
        });
        g.finish();
        c.final_summary();
    } else {
        rt.block_on(async {
            for _ in 0..3 {
                inbound(&w).await;
                outbound(&w).await;
            }
        });
        println!("stack: inbound and outbound_inbound answered 200");
    }
    w.payment.shutdown();
    w.order.shutdown();
}
