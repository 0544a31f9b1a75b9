//! Istio's metadata exchange between sidecars: both reporters label the peer's
//! workload, app, version, canonical service and cluster; metadata is believed only
//! from an mTLS peer of the namespace it claims; the application never sees it.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use mesh_core::body;
use mesh_proxy::stack::HttpClient;
use mesh_proxy::stack::client::Protocol;
use mesh_proxy::{ProxyHandle, Settings, Sidecar};
use mesh_telemetry::exchange::{LocalMetadata, NodeMetadata};
use mesh_tls::{
    BuiltInIssuer, CertStore, CertificateAuthority, ClientTls, SecureNaming, UpstreamConnector,
};
use support::*;
use tower::ServiceExt;

fn settings(
    world: &World,
    sa: &str,
    labels: &str,
    cluster: &str,
    app: std::net::SocketAddr,
) -> Settings {
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: {sa}, labels: {{{labels}}}}}\n\
         clusterId: {cluster}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0, app: {app}}}\n\
         limits: {{drainTimeout: 1s}}\n",
        config = world.path("istio").display(),
        ca = world.ca_dir.display(),
    );
    Settings::from_yaml(format!("{sa}.yaml"), &yaml).unwrap()
}

/// The `istio_requests_total` line of `reporter` once it exists.
async fn series(proxy: &ProxyHandle, reporter: &str) -> String {
    let admin = proxy.address("admin").unwrap();
    for _ in 0..100 {
        let (_, text) = admin_get(admin.port(), "/metrics").await.unwrap();
        if let Some(line) = text.lines().find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("reporter=\"{reporter}\""))
        }) {
            return line.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no {reporter} series");
}

fn assert_labels(line: &str, labels: &[(&str, &str)]) {
    for (k, v) in labels {
        assert!(line.contains(&format!("{k}=\"{v}\"")), "{k}={v} in {line}");
    }
}

struct Pair {
    world: World,
    app: App,
    payment: ProxyHandle,
    order: ProxyHandle,
}

async fn pair() -> Pair {
    let world = World::new();
    let app = App::start(Behaviour::Ok("paid")).await;
    world.write_config(
        "istio",
        "mesh.yaml",
        &service_entry("placeholder", 80, &[(1, "v1", "x")]),
    );
    let payment = Sidecar::start(settings(
        &world,
        "payment-service",
        "app: payment, version: v2, service.istio.io/canonical-name: payments, service.istio.io/canonical-revision: r7",
        "west",
        app.addr,
    ))
    .await
    .unwrap();
    let inbound = payment.address("inbound").unwrap();
    world.write_config(
        "istio",
        "mesh.yaml",
        &service_entry(
            "payment-service",
            80,
            &[(inbound.port(), "v1", "payment-service")],
        ),
    );
    let order = Sidecar::start(settings(
        &world,
        "order-service",
        "app: orders, version: v1",
        "east",
        "127.0.0.1:9".parse().unwrap(),
    ))
    .await
    .unwrap();
    Pair {
        world,
        app,
        payment,
        order,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_reporters_label_the_peer_from_exchanged_metadata() {
    let p = pair().await;
    let outbound = p.order.address("outbound").unwrap();
    assert_eq!(
        send(outbound, "POST", "payment-service", "/pay", &[]).await,
        Ok((200, "paid".to_owned()))
    );
    let inbound = series(&p.payment, "destination").await;
    assert_labels(
        &inbound,
        &[
            ("source_workload", "orders"),
            ("source_workload_namespace", "production"),
            ("source_app", "orders"),
            ("source_version", "v1"),
            ("source_canonical_service", "orders"),
            ("source_canonical_revision", "v1"),
            ("source_cluster", "east"),
            ("destination_workload", "payment"),
            ("destination_app", "payment"),
            ("destination_version", "v2"),
            ("destination_canonical_service", "payments"),
            ("destination_canonical_revision", "r7"),
            ("destination_cluster", "west"),
        ],
    );
    let outbound_line = series(&p.order, "source").await;
    assert_labels(
        &outbound_line,
        &[
            ("source_workload", "orders"),
            ("source_cluster", "east"),
            ("source_canonical_service", "orders"),
            ("destination_workload", "payment"),
            ("destination_workload_namespace", "production"),
            ("destination_app", "payment"),
            ("destination_version", "v2"),
            ("destination_canonical_service", "payments"),
            ("destination_canonical_revision", "r7"),
            ("destination_cluster", "west"),
        ],
    );
    for line in [&inbound, &outbound_line] {
        for side in ["source", "destination"] {
            for label in ["workload", "app", "version", "canonical_service", "cluster"] {
                assert!(
                    !line.contains(&format!("{side}_{label}=\"unknown\"")),
                    "{side}_{label} unknown in {line}"
                );
            }
        }
    }
    // Neither application saw the exchange's headers.
    let seen = p.app.last_headers.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for h in &seen {
        assert!(!h.contains_key("x-envoy-peer-metadata"), "{h:?}");
        assert!(!h.contains_key("x-envoy-peer-metadata-id"), "{h:?}");
    }
    let metrics = admin_get(p.order.address("admin").unwrap().port(), "/metrics")
        .await
        .unwrap()
        .1;
    assert!(
        metrics.contains(&format!(
            "istio_build{{component=\"proxy\",tag=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    p.order.shutdown();
    p.payment.shutdown();
    p.order.wait().await;
    p.payment.wait().await;
    drop(p.world);
}

/// A client holding an SVID of `namespace`/`sa` from the world's CA, talking mTLS to
/// `addr` as Istio's sidecars do.
fn mtls_client(
    world: &World,
    namespace: &str,
    sa: &str,
    addr: std::net::SocketAddr,
) -> HttpClient<UpstreamConnector> {
    let ca = Arc::new(CertificateAuthority::load_dir(&world.ca_dir).unwrap());
    let store = CertStore::from_issuer(&BuiltInIssuer::new(ca, namespace, sa)).unwrap();
    let connector = UpstreamConnector::istio(
        addr,
        "payment-service",
        ClientTls::new(store),
        SecureNaming::AnyTrusted,
    )
    .unwrap();
    HttpClient::upstream(connector, Duration::from_secs(5), Protocol::Http1)
}

/// The metadata an Istio sidecar (Envoy) of workload `reviews-v3` sends, built from
/// Istio's documented node metadata fields.
fn istio_metadata(namespace: &str) -> (String, String) {
    let node = NodeMetadata {
        name: "reviews-v3-7d9c6b5f4-x2x9q".into(),
        namespace: namespace.into(),
        workload_name: "reviews-v3".into(),
        cluster_id: "Kubernetes".into(),
        owner: format!("kubernetes://apis/apps/v1/namespaces/{namespace}/deployments/reviews-v3"),
        labels: [
            ("app", "reviews"),
            ("version", "v3"),
            ("service.istio.io/canonical-name", "reviews"),
            ("service.istio.io/canonical-revision", "v3"),
            ("pod-template-hash", "7d9c6b5f4"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    };
    (
        node.encode(),
        format!(
            "sidecar~10.1.2.3~reviews-v3-7d9c6b5f4-x2x9q.{namespace}~{namespace}.svc.cluster.local"
        ),
    )
}

fn with_metadata(value: &str, id: &str) -> Request<body::BoxBody> {
    Request::post("http://payment-service/pay")
        .header("x-envoy-peer-metadata", value)
        .header("x-envoy-peer-metadata-id", id)
        .body(body::empty())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_peer_metadata_over_mtls_labels_inbound_metrics() {
    let p = pair().await;
    let inbound = p.payment.address("inbound").unwrap();
    let (value, id) = istio_metadata("production");
    let res = mtls_client(&p.world, "production", "reviews", inbound)
        .oneshot(with_metadata(&value, &id))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Our sidecar answers with its own metadata, in Istio's format.
    let answer = res.headers()["x-envoy-peer-metadata"].as_bytes().to_vec();
    let node = NodeMetadata::decode(&answer).unwrap();
    assert_eq!(node.workload_name, "payment");
    assert_eq!(node.cluster_id, "west");
    assert_eq!(node.labels["service.istio.io/canonical-name"], "payments");
    assert!(res.headers().contains_key("x-envoy-peer-metadata-id"));
    let line = series(&p.payment, "destination").await;
    assert_labels(
        &line,
        &[
            ("source_workload", "reviews-v3"),
            ("source_workload_namespace", "production"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/production/sa/reviews",
            ),
            ("source_app", "reviews"),
            ("source_version", "v3"),
            ("source_canonical_service", "reviews"),
            ("source_canonical_revision", "v3"),
            ("source_cluster", "Kubernetes"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    let seen = p.app.last_headers.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|h| !h.contains_key("x-envoy-peer-metadata"))
    );
    p.order.shutdown();
    p.payment.shutdown();
    p.order.wait().await;
    p.payment.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_metadata_is_ignored_over_plaintext_and_from_another_namespace() {
    let p = pair().await;
    let inbound = p.payment.address("inbound").unwrap();
    // A workload of `jobs` claiming to be reviews-v3 of `production`.
    let (value, id) = istio_metadata("production");
    let res = mtls_client(&p.world, "jobs", "batch", inbound)
        .oneshot(with_metadata(&value, &id))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key("x-envoy-peer-metadata"));
    // The request is recorded when its response body ends.
    http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    // Plaintext (PERMISSIVE accepts it): the metadata is not believed.
    let (status, _) = send(
        inbound,
        "POST",
        "payment-service",
        "/pay",
        &[
            ("x-envoy-peer-metadata", &value),
            ("x-envoy-peer-metadata-id", &id),
        ],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let admin = p.payment.address("admin").unwrap();
    // The server records a request once it has sent the last byte, which can be just
    // after the client has read it: scrape until both are there (at most 5 s).
    let destination_series = |text: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\"")
            })
            .count()
    };
    let mut text = String::new();
    for _ in 0..250 {
        text = admin_get(admin.port(), "/metrics").await.unwrap().1;
        if destination_series(&text) >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\"")
        })
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in &lines {
        assert_labels(
            line,
            &[
                ("source_workload", "unknown"),
                ("source_app", "unknown"),
                ("source_canonical_service", "unknown"),
                ("source_cluster", "unknown"),
            ],
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("source_workload_namespace=\"jobs\""))
    );
    let seen = p.app.last_headers.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(|h| !h.contains_key("x-envoy-peer-metadata")
            && !h.contains_key("x-envoy-peer-metadata-id"))
    );
    p.order.shutdown();
    p.payment.shutdown();
    p.order.wait().await;
    p.payment.wait().await;
}

#[test]
fn local_metadata_round_trips_through_headers() {
    let local = LocalMetadata::new(&NodeMetadata::new("w", "ns", "c"), "id");
    let mut h = http::HeaderMap::new();
    local.insert(&mut h);
    assert_eq!(h["x-envoy-peer-metadata-id"], "id");
}
