//! Configuration from `discovery` over xDS: real `mesh-proxy discovery` and sidecar
//! processes, the article's order-service → payment-service path with STRICT mTLS and
//! its AuthorizationPolicy, a weight change pushed to the sidecars, `discovery` killed
//! (the sidecars keep serving) and restarted (they reconnect and follow again); and the
//! client's ACK/NACK against a gRPC server that sends an invalid object.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use mesh_proxy::control::xds::{IstioResource, NodeInfo, TYPE_URL, XdsOptions, subscribe};
use support::*;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn routes(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment-service, namespace: production}}
spec:
  host: payment-service
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  http:
  - route:
    - destination: {{host: payment-service, subset: v1}}
      weight: {v1}
    - destination: {{host: payment-service, subset: v2}}
      weight: {v2}
"
    )
}

/// `mesh-proxy discovery` serving the directory `config` on `grpc`.
async fn discovery(world: &World, config: &Path, grpc: u16, name: &str) -> DiscoveryProcess {
    let grpc = format!("127.0.0.1:{grpc}");
    let args = [
        "--config-dir".as_ref(),
        config.as_os_str(),
        "--grpc".as_ref(),
        grpc.as_ref(),
    ];
    DiscoveryProcess::start(world, name, &args).await
}

/// Sidecar settings for `sa` whose configuration comes from `discovery` at `grpc`.
fn settings_from_discovery(
    world: &World,
    sa: &str,
    version: &str,
    ports: Ports,
    app: SocketAddr,
    grpc: u16,
) -> String {
    let placeholder = world.path("unused");
    let s = sidecar_settings(
        world,
        sa,
        &labels(&[("app", sa), ("version", version)]),
        &placeholder,
        ports,
        app,
        &format!(
            "discovery:\n  address: 127.0.0.1:{grpc}\n  identity: spiffe://cluster.local/ns/istio-system/sa/mesh-discovery\n"
        ),
    );
    let line = format!("configDir: {}\n", placeholder.display());
    assert!(s.contains(&line));
    s.replace(&line, "")
}

async fn body_of(client: &Client) -> String {
    let (status, body) = client
        .request("POST", "payment-service", "/api/v1/payments", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

async fn eventually(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs}s waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_follow_discovery_and_keep_serving_while_it_is_away() {
    let world = World::new();
    let app_v1 = App::start(Behaviour::Ok("v1")).await;
    let app_v2 = App::start(Behaviour::Ok("v2")).await;
    let (p1, p2, order) = (Ports::new(), Ports::new(), Ports::new());
    let config = world.write_config(
        "istio",
        "services.yaml",
        &format!(
            "{}---\n{SECURITY}",
            service_entry(
                "payment-service",
                8080,
                &[
                    (p1.inbound, "v1", "payment-service"),
                    (p2.inbound, "v2", "payment-service")
                ]
            )
        ),
    );
    world.write_config("istio", "routes.yaml", &routes(100, 0));
    let grpc = free_port();
    let discovery = discovery(&world, &config, grpc, "discovery").await;

    let start = |sa: &'static str, version: &'static str, ports: Ports, app: SocketAddr| {
        let s = settings_from_discovery(&world, sa, version, ports, app, grpc);
        let name = format!("{sa}-{version}");
        let world = &world;
        async move { Proxy::start(world, "sidecar", &name, &s, ports).await }
    };
    let _pay1 = start("payment-service", "v1", p1, app_v1.addr).await;
    let _pay2 = start("payment-service", "v2", p2, app_v2.addr).await;
    let order_app = App::start(Behaviour::Ok("order")).await;
    let order_proxy = start("order-service", "v1", order, order_app.addr).await;
    let client = Client::new(order_proxy.outbound());

    // The whole configuration came from discovery: routes, mTLS to the sidecars, and
    // the AuthorizationPolicy at the payment sidecars.
    for _ in 0..10 {
        assert_eq!(body_of(&client).await, "v1");
    }
    let (status, _) = client
        .request("GET", "payment-service", "/api/v1/payments", &[])
        .await
        .unwrap();
    assert_eq!(status, 403, "the AuthorizationPolicy allows only POST");
    let dump = order_proxy.admin("/config_dump").await;
    assert!(dump.contains("payment-service"), "{dump}");

    // A change in the directory reaches every sidecar.
    world.write_config("istio", "routes.yaml", &routes(0, 100));
    eventually("the weight change at the order sidecar", 10, async || {
        body_of(&client).await == "v2"
    })
    .await;
    for _ in 0..10 {
        assert_eq!(body_of(&client).await, "v2");
    }
    let metrics = discovery.metrics().await;
    assert_eq!(
        series_value(&metrics, "pilot_xds", &[]),
        Some(3.0),
        "{metrics}"
    );
    assert!(
        series_value(&metrics, "pilot_xds_pushes_total", &[("type", "istio")]).unwrap() >= 6.0,
        "{metrics}"
    );

    // discovery gone: the sidecars keep the configuration in force.
    drop(discovery);
    for _ in 0..10 {
        assert_eq!(body_of(&client).await, "v2");
    }
    // A change made while it is away arrives once it is back.
    world.write_config("istio", "routes.yaml", &routes(100, 0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(body_of(&client).await, "v2", "no discovery, no change");
    let discovery = self::discovery(&world, &config, grpc, "discovery-again").await;
    eventually(
        "the sidecars to reconnect and take the change",
        30,
        async || body_of(&client).await == "v1",
    )
    .await;
    let metrics = discovery.metrics().await;
    eventually("every sidecar reconnected", 30, async || {
        series_value(&discovery.metrics().await, "pilot_xds", &[]) == Some(3.0)
    })
    .await;
    assert_eq!(
        series_value(
            &metrics,
            "pilot_total_xds_rejects_total",
            &[("type", "istio")]
        ),
        None,
        "no proxy rejected anything: {metrics}"
    );
    assert!(
        order_proxy.output().contains("discovery unreachable"),
        "{}",
        order_proxy.output()
    );
}

/// An ADS server that answers the first request with a valid object and the ACK of it
/// with an invalid one, recording every request.
#[derive(Clone)]
struct Scripted {
    requests: Arc<Mutex<Vec<DiscoveryRequest>>>,
}

type Responses =
    Pin<Box<dyn futures_util::Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send>>;
type Deltas =
    Pin<Box<dyn futures_util::Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

fn response(version: &str, nonce: &str, yaml: &str) -> DiscoveryResponse {
    let resource = IstioResource {
        kind: "VirtualService".into(),
        namespace: "production".into(),
        name: "payment-service".into(),
        version: version.into(),
        yaml: yaml.into(),
    };
    DiscoveryResponse {
        version_info: version.into(),
        resources: vec![resource.to_any()],
        type_url: TYPE_URL.into(),
        nonce: nonce.into(),
        ..DiscoveryResponse::default()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Scripted {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = Deltas;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let requests = self.requests.clone();
        tokio::spawn(async move {
            let good = routes(100, 0);
            let good = good.split("---\n").nth(1).unwrap().to_owned();
            let bad = good.replace("weight: 0", "weight: -5");
            while let Ok(Some(r)) = inbound.message().await {
                let nonce = r.response_nonce.clone();
                requests.lock().unwrap().push(r);
                let answer = match nonce.as_str() {
                    "" => response("one", "1", &good),
                    "1" => response("two", "2", &bad),
                    _ => continue,
                };
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Deltas>, tonic::Status> {
        Err(tonic::Status::unimplemented("delta"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_acks_what_it_applies_and_nacks_an_invalid_object_with_its_location() {
    let ca = Arc::new(mesh_tls::CertificateAuthority::new("cluster.local").unwrap());
    let server_store =
        mesh_tls::CertStore::from_issued(&ca.issue("istio-system", "mesh-discovery").unwrap())
            .unwrap();
    let client_store =
        mesh_tls::CertStore::from_issued(&ca.issue("production", "order-service").unwrap())
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let scripted = Scripted {
        requests: Arc::default(),
    };
    let mut routes_builder = tonic::service::Routes::builder();
    routes_builder.add_service(AggregatedDiscoveryServiceServer::new(scripted.clone()));
    let stop = CancellationToken::new();
    tokio::spawn(mesh_proxy::discovery::xds::serve(
        listener,
        mesh_tls::ServerTls::new(server_store),
        routes_builder.routes(),
        stop.clone(),
    ));

    let node = NodeInfo {
        proxy_type: "sidecar".into(),
        name: "order-service".into(),
        namespace: "production".into(),
        service_account: "order-service".into(),
        cluster_id: "Kubernetes".into(),
        domain_suffix: "cluster.local".into(),
        ..NodeInfo::default()
    };
    let server =
        mesh_core::Identity::from_istio("cluster.local", "istio-system", "mesh-discovery").unwrap();
    let options = XdsOptions::new(
        address.to_string(),
        mesh_tls::SecureNaming::only(server),
        node,
    );
    let mut updates = subscribe(
        options,
        mesh_tls::ClientTls::new(client_store),
        stop.clone(),
    );

    // The valid object arrives as an update, loaded, and is accepted.
    let update = tokio::time::timeout(Duration::from_secs(10), updates.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(update.version, "one");
    let vs = update
        .config
        .virtual_services_for_host("payment-service.production.svc.cluster.local");
    assert_eq!(vs[0].spec.http[0].route[0].weight, Some(100));
    update.verdict.accept();

    // The invalid one never reaches the caller; the client NACKs it with the diagnostic.
    let requests = scripted.requests.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let nack = loop {
        let found = requests
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.response_nonce == "2")
            .cloned();
        if let Some(r) = found {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer to the invalid object"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen = requests.lock().unwrap().clone();
    // The first request names the node in Istio's format; the ACK carries the version.
    let node = seen[0].node.as_ref().unwrap();
    assert_eq!(
        node.id,
        "sidecar~~order-service.production~production.svc.cluster.local"
    );
    assert_eq!(seen[0].type_url, TYPE_URL);
    assert_eq!(seen[1].response_nonce, "1");
    assert_eq!(seen[1].version_info, "one");
    assert!(seen[1].error_detail.is_none());
    assert_eq!(
        nack.version_info, "one",
        "a NACK names the version still held"
    );
    let detail = nack.error_detail.unwrap();
    assert!(
        detail
            .message
            .contains("VirtualService/production/payment-service")
            && detail.message.contains("spec.http[0].route[1].weight"),
        "{}",
        detail.message
    );
    assert!(
        updates.try_recv().is_err(),
        "an invalid configuration is not handed to the caller"
    );
    stop.cancel();
}
