//! The mesh embedded whole: applications that build a `Mesh` from Istio YAML get mTLS,
//! AuthorizationPolicy, retries under a deadline, outlier detection, weighted subsets,
//! connection-pool limits and Istio metrics in-process; and the embedded stacks answer
//! the same YAML the way the sidecar does.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody};
use mesh_core::{PeerIdentity, ResponseFlags};
use mesh_proxy::{Certificates, Mesh, Settings, Sidecar, Workload};
use support::*;
use tower::{ServiceExt, service_fn};

/// Routing, resilience and pool limits for payment-service: 95/5 between v1 and v2,
/// retries on 5xx under a 5 s deadline, outlier detection capped at 50 %, and a pool of
/// one request plus one pending.
const PAYMENT: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service, namespace: production}
spec:
  hosts: [payment-service]
  http:
  - timeout: 5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: 5xx}
    route:
    - destination: {host: payment-service, subset: v1}
      weight: 95
    - destination: {host: payment-service, subset: v2}
      weight: 5
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment-service, namespace: production}
spec:
  host: payment-service
  trafficPolicy:
    connectionPool:
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 1, maxRetries: 3}
    outlierDetection: {consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

/// The application of every payment-service replica: `/slow` answers after 300 ms,
/// `/flaky` answers 503 to every other request, and every answer says whether a
/// forwarded-client-cert header reached it and who called.
fn payment_app(
    hits: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<BoxBody>,
    Response = Response<BoxBody>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let flaky = Arc::new(AtomicUsize::new(0));
    service_fn(move |req: Request<BoxBody>| {
        hits.fetch_add(1, Ordering::SeqCst);
        // The XFCC's `By` and `URI`: the mesh's own (SANITIZE_SET), never a forged one.
        let xfcc = req
            .headers()
            .get("x-forwarded-client-cert")
            .and_then(|v| v.to_str().ok())
            .map_or_else(String::new, |v| {
                let by = v.split(';').next().unwrap_or_default();
                let uri = v.rsplit_once(";URI=").map_or("", |(_, u)| u);
                format!("{by}|{uri}")
            });
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .map_or_else(String::new, |p| p.0.to_string());
        let path = req.uri().path().to_owned();
        let flaky = flaky.clone();
        async move {
            if path == "/api/v1/payments/slow" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let status = if path == "/api/v1/payments/flaky"
                && flaky.fetch_add(1, Ordering::SeqCst).is_multiple_of(2)
            {
                503
            } else {
                200
            };
            let mut res = Response::new(body::full(format!("xfcc={xfcc} peer={peer}")));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, Infallible>(res)
        }
    })
}

/// Everything the article's scenario asks of the mesh, embedded: the code between the
/// markers is all two applications write (22 lines); the rest is the test's setup
/// (a CA, listeners, the YAML) and its checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_mesh_embeds_in_a_few_lines()
-> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let world = World::new();
    let ca = Arc::new(mesh_tls::CertificateAuthority::load_dir(&world.ca_dir).unwrap());
    let (l1, l2) = (bind().await, bind().await);
    let (p1, p2) = (
        l1.local_addr().unwrap().port(),
        l2.local_addr().unwrap().port(),
    );
    let entry = service_entry(
        "payment-service",
        80,
        &[(p1, "v1", "payment-service"), (p2, "v2", "payment-service")],
    );
    let istio = world.write_config(
        "istio",
        "mesh.yaml",
        &format!("{entry}---\n{SECURITY}---\n{PAYMENT}"),
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let app = payment_app(hits.clone());
    // --- what the applications write ---
    let workload = |sa: &str| Workload::new("production", sa).label("app", sa);
    let certificates = Certificates::Issuer {
        ca: ca.clone(),
        lifetime: None,
    };
    let mut replicas = Vec::new();
    for (version, listener) in [("v1", l1), ("v2", l2)] {
        let mesh = Mesh::builder(workload("payment-service").label("version", version))
            .config_dir(&istio)
            .certificates(certificates.clone())
            .build()?;
        mesh.serve_inbound(listener, app.clone());
        replicas.push(mesh);
    }
    let order = Mesh::builder(workload("order-service"))
        .config_dir(&istio)
        .certificates(certificates.clone())
        .build()?;
    let client = order.outbound();
    let paid = call(&client, "POST", "/api/v1/payments").await?;
    let denied = call(&client, "GET", "/api/v1/payments").await?;
    let retried = call(&client, "POST", "/api/v1/payments/flaky").await?;
    // --- end of the application code ---
    assert_eq!(paid.0, 200);
    assert_eq!(
        paid.1,
        "xfcc=By=spiffe://cluster.local/ns/production/sa/payment-service|spiffe://cluster.local/ns/production/sa/order-service peer=spiffe://cluster.local/ns/production/sa/order-service"
    );
    assert_eq!(denied.0, 403);
    assert_eq!(retried.0, 200, "a 503 is retried");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "the denied GET never reached the app"
    );
    let metrics = order.telemetry().encode_metrics();
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("reporter=\"source\"")
            && l.contains("response_code=\"200\"")
            && l.contains("destination_principal=\"spiffe://cluster.local/ns/production/sa/payment-service\"")),
        "{metrics}"
    );
    for mesh in replicas.iter().chain([&order]) {
        mesh.shutdown();
    }
    Ok(())
}

/// Sends `method path` to payment-service through `client`: the status and the body.
async fn call(
    client: &mesh_proxy::Outbound,
    method: &str,
    path: &str,
) -> Result<(StatusCode, bytes::Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://payment-service{path}"))
        .body(body::empty())?;
    let res = client.clone().oneshot(req).await?;
    let status = res.status();
    Ok((status, res.into_body().collect().await?.to_bytes()))
}

async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// What one case answered: status and response flags.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: String,
    overloaded: bool,
}

/// The cases both paths run: a forged forwarded-client-cert, a denied request, a
/// retried 503, and three concurrent slow requests against a pool of one request plus
/// one pending (the third overflows with 503 `UO`).
async fn cases<F, Fut>(send: F) -> Vec<Vec<Answer>>
where
    F: Fn(&'static str, &'static str, &'static [(&'static str, &'static str)]) -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    let forged = &[(
        "x-forwarded-client-cert",
        "By=spiffe://cluster.local/ns/production/sa/order-service",
    )];
    let mut out = vec![
        vec![send("POST", "/api/v1/payments", forged).await],
        vec![send("GET", "/api/v1/payments", &[]).await],
        vec![send("POST", "/api/v1/payments/flaky", &[]).await],
    ];
    let (a, b, c) = tokio::join!(
        send("POST", "/api/v1/payments/slow", &[]),
        send("POST", "/api/v1/payments/slow", &[]),
        send("POST", "/api/v1/payments/slow", &[]),
    );
    let mut overflow = vec![a, b, c];
    overflow.sort_by_key(|a| a.status);
    out.push(overflow);
    out
}

async fn answer(res: Response<BoxBody>) -> Answer {
    let status = res.status().as_u16();
    let overloaded = res.headers().contains_key("x-envoy-overloaded")
        || mesh_core::extensions::response_flags(res.extensions())
            .contains(ResponseFlags::UPSTREAM_OVERFLOW);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    // The caller's identity reaches an embedded handler as a request extension; an
    // application behind a sidecar has no such channel, so it is left out here.
    let body = String::from_utf8_lossy(&body);
    Answer {
        status,
        body: body.split(" peer=").next().unwrap_or_default().to_owned(),
        overloaded,
    }
}

fn settings(world: &World, sa: &str, app: SocketAddr) -> Settings {
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: {sa}, labels: {{app: {sa}, version: v1}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\nrandomSeed: 7\n\
         listeners: {{inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0, app: {app}}}\n\
         limits: {{drainTimeout: 1s}}\n",
        config = world.path(&format!("istio-{sa}")).display(),
        ca = world.ca_dir.display(),
    );
    Settings::from_yaml(format!("{sa}.yaml"), &yaml).unwrap()
}

/// [`PAYMENT`] with every request on v1 (the only replica of the comparison).
fn payment_v1_only() -> String {
    PAYMENT
        .replace("weight: 95", "weight: 100")
        .replace("weight: 5", "weight: 0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_and_sidecar_answer_the_same_yaml_the_same_way() {
    let world = World::new();
    let payment_yaml = payment_v1_only();
    let ca = Arc::new(mesh_tls::CertificateAuthority::load_dir(&world.ca_dir).unwrap());

    // Embedded: payment-service (v1 only) behind Mesh::serve_inbound, order-service's
    // Mesh::outbound called in-process.
    let listener = bind().await;
    let port = listener.local_addr().unwrap().port();
    let entry = service_entry("payment-service", 80, &[(port, "v1", "payment-service")]);
    let embedded_dir = world.write_config(
        "istio-embedded",
        "mesh.yaml",
        &format!("{entry}---\n{SECURITY}---\n{payment_yaml}"),
    );
    let certificates = Certificates::Issuer { ca, lifetime: None };
    let payment = Mesh::builder(
        Workload::new("production", "payment-service")
            .label("app", "payment-service")
            .label("version", "v1"),
    )
    .config_dir(&embedded_dir)
    .certificates(certificates.clone())
    .build()
    .unwrap();
    let embedded_hits = Arc::new(AtomicUsize::new(0));
    payment.serve_inbound(listener, payment_app(embedded_hits.clone()));
    let order =
        Mesh::builder(Workload::new("production", "order-service").label("app", "order-service"))
            .config_dir(&embedded_dir)
            .certificates(certificates)
            .build()
            .unwrap();
    let client = order.outbound();
    let embedded = cases(|method, path, headers| {
        let client = client.clone();
        async move {
            let mut req = Request::builder()
                .method(method)
                .uri(format!("http://payment-service{path}"));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            answer(
                client
                    .oneshot(req.body(body::empty()).unwrap())
                    .await
                    .unwrap(),
            )
            .await
        }
    })
    .await;

    // Sidecars: the same application served over HTTP behind payment-service's sidecar,
    // called through order-service's sidecar.
    let sidecar_hits = Arc::new(AtomicUsize::new(0));
    let app_listener = bind().await;
    let app_addr = app_listener.local_addr().unwrap();
    let app = payment_app(sidecar_hits.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = app_listener.accept().await {
            let svc = app
                .clone()
                .map_request(|req: Request<hyper::body::Incoming>| req.map(body::boxed));
            tokio::spawn(
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(
                        hyper_util::rt::TokioIo::new(tcp),
                        hyper_util::service::TowerToHyperService::new(svc),
                    )
                    .into_owned(),
            );
        }
    });
    world.write_config(
        "istio-payment-service",
        "mesh.yaml",
        &format!("{SECURITY}---\n{payment_yaml}"),
    );
    let payment_sidecar = Sidecar::start(settings(&world, "payment-service", app_addr))
        .await
        .unwrap();
    let inbound = payment_sidecar.address("inbound").unwrap();
    let entry = service_entry(
        "payment-service",
        80,
        &[(inbound.port(), "v1", "payment-service")],
    );
    world.write_config(
        "istio-order-service",
        "mesh.yaml",
        &format!("{entry}---\n{SECURITY}---\n{payment_yaml}"),
    );
    let order_sidecar = Sidecar::start(settings(
        &world,
        "order-service",
        "127.0.0.1:9".parse().unwrap(),
    ))
    .await
    .unwrap();
    let outbound = order_sidecar.address("outbound").unwrap();
    let sidecar = cases(|method, path, headers| async move {
        let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "payment-service");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = sender
            .send_request(req.body(body::empty()).unwrap())
            .await
            .unwrap();
        answer(res.map(body::boxed)).await
    })
    .await;

    assert_eq!(embedded, sidecar);
    // The forged header never reached the application: the XFCC it got is the mesh's.
    assert_eq!(embedded[0][0].status, 200);
    assert_eq!(
        embedded[0][0].body,
        "xfcc=By=spiffe://cluster.local/ns/production/sa/payment-service|spiffe://cluster.local/ns/production/sa/order-service"
    );
    assert_eq!(embedded[1][0].status, 403);
    assert_eq!(embedded[2][0].status, 200, "the 503 was retried");
    let overflow: Vec<(u16, bool)> = embedded[3]
        .iter()
        .map(|a| (a.status, a.overloaded))
        .collect();
    assert_eq!(overflow, [(200, false), (200, false), (503, true)]);
    assert_eq!(
        embedded_hits.load(Ordering::SeqCst),
        sidecar_hits.load(Ordering::SeqCst)
    );
    payment_sidecar.shutdown();
    order_sidecar.shutdown();
    payment.shutdown();
    order.shutdown();
}
