//! The proxyless scenario behind the `embedded` program: order-service calls
//! payment-service with the mesh's layers in its own process, no sidecar.
//!
//! [`order_service`] is the part an application writes; [`run`] starts three
//! payment-service replicas (v1-a, v1-b which fails, v2), sends traffic and checks what
//! the layers did.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_core::error::BoxError;
use mesh_proxy::{Certificates, Mesh, Outbound, Workload};
use mesh_telemetry::Telemetry;
use tower::ServiceExt;

use crate::scenario::{
    DevCa, EntryEndpoint, Replica, ReplicaSpec, service_entry_yaml, start_replica,
};

/// The order-service side of the example: what a Rust developer writes to embed the mesh.
#[derive(Debug)]
pub struct OrderService {
    /// The outbound client (`http://payment-service:8080/...`).
    pub client: Outbound,
    /// The mesh (configuration reload, certificates, shutdown).
    pub mesh: Mesh,
    /// Istio metrics and latency of the calls.
    pub telemetry: Telemetry,
}

/// Builds order-service's mesh from Istio YAML and its SVID directory.
pub fn order_service(config: &[PathBuf], svid_dir: &Path) -> Result<OrderService, BoxError> {
    order_service_as("order-service", config, svid_dir)
}

/// Builds the mesh of `service_account` in `production`.
pub fn order_service_as(
    service_account: &str,
    config: &[PathBuf],
    svid_dir: &Path,
) -> Result<OrderService, BoxError> {
    // The same Istio YAML a sidecar reads, Istio's SVID files (reloaded when they
    // change), and the workload's identity: the mesh compiles routing with weighted
    // subsets, deadlines, retries, pool limits, outlier detection and mTLS from them.
    let mut builder =
        Mesh::builder(Workload::new("production", service_account).label("app", service_account))
            .certificates(Certificates::Dir(svid_dir.to_owned()));
    for path in config {
        builder = builder.config_dir(path);
    }
    let mesh = builder.build()?;
    // Reload the YAML when it changes, as the sidecar does.
    mesh.watch()?;
    Ok(OrderService {
        client: mesh.outbound(),
        telemetry: mesh.telemetry().clone(),
        mesh,
    })
}

/// A POST of a payment, as order-service sends it.
pub fn payment_request(method: http::Method) -> Request<BoxBody> {
    Request::builder()
        .method(method)
        .uri("http://payment-service:8080/api/v1/payments")
        .header("content-type", "application/json")
        .body(body::full("{\"order\":42,\"amount\":\"9.99\"}"))
        .unwrap_or_else(|_| Request::new(body::empty()))
}

/// Sends `req` through `client`; the status and the body.
pub async fn send(
    client: &Outbound,
    req: Request<BoxBody>,
) -> Result<(StatusCode, String), BoxError> {
    let res = client.clone().oneshot(req).await?;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Everything [`run`] starts, kept alive together.
#[derive(Debug)]
pub struct Setup {
    /// payment-service v1-a, v1-b, v2.
    pub replicas: Vec<Replica>,
    /// order-service.
    pub order: OrderService,
    /// The CA.
    pub ca: DevCa,
    /// The configuration paths (YAML directory and the generated ServiceEntry).
    pub config: Vec<PathBuf>,
    /// Scratch directory (SVIDs, generated ServiceEntry).
    pub dir: tempfile::TempDir,
}

/// The directory of the example's Istio YAML.
pub fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("embedded")
        .join("config")
}

/// Starts the CA, the three payment-service replicas and order-service.
pub async fn setup() -> Result<Setup, BoxError> {
    let dir = tempfile::tempdir()?;
    let ca = DevCa::new(&dir.path().join("svid"))?;
    let yaml = config_dir();
    let (inbound_config, _) =
        MeshConfig::load(&[&yaml], &LoadOptions::default()).map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })?;
    let payment_svid = ca.write_svid("production", "payment-service")?;
    let mut replicas = Vec::new();
    for (version, name) in [("v1", "v1-a"), ("v1", "v1-b"), ("v2", "v2")] {
        let spec = ReplicaSpec {
            app: "payment-service".into(),
            version: version.into(),
            name: name.into(),
            namespace: "production".into(),
            svid_dir: payment_svid.clone(),
        };
        replicas.push(start_replica(&inbound_config, spec).await?);
    }
    let endpoints: Vec<EntryEndpoint> = replicas
        .iter()
        .map(|r| EntryEndpoint {
            address: r.address,
            labels: std::collections::BTreeMap::from([
                ("app".to_owned(), "payment-service".to_owned()),
                ("version".to_owned(), r.version.clone()),
            ]),
            service_account: "payment-service".into(),
        })
        .collect();
    let generated = dir.path().join("endpoints");
    std::fs::create_dir_all(&generated)?;
    std::fs::write(
        generated.join("payment-service-entry.yaml"),
        service_entry_yaml("payment-service", "production", 8080, &endpoints),
    )?;
    let config = vec![yaml, generated];
    let order = order_service(&config, &ca.write_svid("production", "order-service")?)?;
    Ok(Setup {
        replicas,
        order,
        ca,
        config,
        dir,
    })
}

/// One expectation of the run and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was expected.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// What was measured.
    pub detail: String,
}

fn check(out: &mut Vec<Check>, name: &str, ok: bool, detail: String) {
    println!("  [{}] {name}: {detail}", if ok { "ok" } else { "FAILED" });
    out.push(Check {
        name: name.into(),
        ok,
        detail,
    });
}

/// Runs the scenario with `requests` payments and returns the checks.
pub async fn run(requests: usize) -> Result<Vec<Check>, BoxError> {
    let s = setup().await?;
    let mut checks = Vec::new();
    let client = &s.order.client;
    let failing = &s.replicas[1];
    failing.failing.store(true, Ordering::Relaxed);
    println!("order-service -> payment-service: {requests} POSTs, replica v1-b answering 503");

    let (mut ok, mut v2) = (0usize, 0usize);
    let mut peers = std::collections::BTreeSet::new();
    for _ in 0..requests {
        let (status, body) = send(client, payment_request(http::Method::POST)).await?;
        if status == StatusCode::OK {
            ok += 1;
            v2 += usize::from(body.contains("\"version\":\"v2\""));
            if let Some(p) = body
                .split("\"peer\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            {
                peers.insert(p.to_owned());
            }
        }
    }
    check(
        &mut checks,
        "every payment succeeded (retries)",
        ok == requests,
        format!("{ok}/{requests} answered 200"),
    );
    let share = v2 as f64 * 100.0 / requests.max(1) as f64;
    check(
        &mut checks,
        "weighted subsets 90/10",
        crate::scenario::within(v2, requests, 10.0),
        format!("{share:.1}% of payments went to v2"),
    );
    let failing_hits = failing.hits.load(Ordering::Relaxed);
    check(
        &mut checks,
        "failing replica ejected",
        (5..=10).contains(&failing_hits),
        format!(
            "v1-b answered {failing_hits} requests with 503 (consecutive5xxErrors: 5), then was ejected"
        ),
    );
    check(
        &mut checks,
        "payment-service saw order-service's identity",
        peers.len() == 1 && peers.contains("spiffe://cluster.local/ns/production/sa/order-service"),
        format!("{peers:?}"),
    );

    let (status, _) = send(client, payment_request(http::Method::GET)).await?;
    check(
        &mut checks,
        "GET denied by AuthorizationPolicy",
        status == StatusCode::FORBIDDEN,
        format!("GET answered {status}"),
    );

    let other = order_service_as(
        "inventory-service",
        &s.config,
        &s.ca.write_svid("production", "inventory-service")?,
    )?;
    let (status, _) = send(&other.client, payment_request(http::Method::POST)).await?;
    check(
        &mut checks,
        "POST from another workload denied",
        status == StatusCode::FORBIDDEN,
        format!("inventory-service's POST answered {status}"),
    );

    let plain = tokio::net::TcpStream::connect(s.replicas[0].address).await?;
    let refused = plaintext_refused(plain).await;
    check(
        &mut checks,
        "plaintext refused (STRICT)",
        refused,
        format!("plaintext HTTP to v1-a refused: {refused}"),
    );

    let metrics = s.order.telemetry.encode_metrics();
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    println!("order-service's istio_requests_total:");
    for l in &lines {
        println!("    {l}");
    }
    check(
        &mut checks,
        "istio_requests_total reported",
        lines.iter().any(|l| l.contains("response_code=\"200\""))
            && lines.iter().any(|l| l.contains("response_code=\"403\"")),
        format!("{} series", lines.len()),
    );
    Ok(checks)
}

/// Sends a plaintext HTTP request on `tcp`; true when the server closes without an answer.
pub async fn plaintext_refused(tcp: tokio::net::TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tcp;
    let _ = tcp
        .write_all(
            b"POST /api/v1/payments HTTP/1.1\r\nhost: payment-service\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => !buf[..n].starts_with(b"HTTP/"),
        Err(_) => false,
    }
}
