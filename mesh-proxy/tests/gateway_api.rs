//! The Kubernetes Gateway API through the real binary: a `Gateway` of class `istio` served
//! by `mesh-proxy gateway` with an `HTTPRoute` canary (90/10 by chi-square, a header match
//! with `URLRewrite` and `RequestHeaderModifier` seen at the upstream, segment-aware
//! prefixes, direct 500s for drained and unresolvable backends), the same canary for
//! east-west traffic with a Service parent on a sidecar, a `GRPCRoute` method match, and
//! an unsupported filter rejected with its file, line and field. The YAML is in
//! `tests/testdata/gateway-api/`, in the Gateway API's documented form.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http_body_util::{BodyExt, Full};
use support::*;
use tokio::net::TcpListener;
use tonic::Status;
use tonic_prost::ProstCodec;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata/gateway-api")
        .join(name)
}

/// Copies `testdata/gateway-api/<name>` into the world's config directory.
fn copy_testdata(world: &World, name: &str) -> PathBuf {
    let yaml = std::fs::read_to_string(testdata(name)).unwrap();
    world.write_config("istio", name, &yaml)
}

/// A recording upstream: answers `"<name> <path>"` and a line `name: value` per request
/// header (sorted), and counts its requests.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn upstream(name: &'static str) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let mut lines: Vec<String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                            .collect();
                        lines.sort();
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        let body = format!("{name} {path}\n{}", lines.join("\n"));
                        async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    Upstream { addr, hits }
}

/// A ServiceEntry for the Service `host` in `production` on `port`, with plain (no
/// sidecar) endpoints on loopback.
fn service(host: &str, port: u16, protocol: &str, endpoints: &[u16]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|p| format!("  - {{address: 127.0.0.1, ports: {{web: {p}}}}}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {host}, namespace: production}}\n\
         spec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  \
         ports:\n  - {{number: {port}, name: web, protocol: {protocol}}}\n  endpoints:\n{eps}"
    )
}

/// The first word of each answer: which upstream served it.
async fn split(client: &Client, host: &str, path: &str, n: usize) -> (usize, usize) {
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..n {
        let (status, body) = client.request("GET", host, path, &[]).await.unwrap();
        assert_eq!(status, 200, "{body}");
        match body.split(' ').next() {
            Some("v1") => v1 += 1,
            Some("v2") => v2 += 1,
            other => panic!("unexpected answer {other:?}: {body}"),
        }
    }
    (v1, v2)
}

/// 90/10 within a chi-square bound (1 degree of freedom, p = 0.001).
fn assert_ninety_ten(v1: usize, v2: usize) {
    let n = (v1 + v2) as f64;
    let (e1, e2) = (n * 0.9, n * 0.1);
    let chi2 = (v1 as f64 - e1).powi(2) / e1 + (v2 as f64 - e2).powi(2) / e2;
    assert!(chi2 < 10.83, "v1={v1} v2={v2} chi2={chi2}");
    assert!(v2 > 0, "the canary got no traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_api_gateway_serves_weighted_backends_rewrites_and_direct_500s() {
    let world = World::new();
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let services = [
        service("order-v1", 8080, "HTTP", &[v1.addr.port()]),
        service("order-v2", 8080, "HTTP", &[v2.addr.port()]),
    ]
    .join("---\n");
    world.write_config("istio", "services.yaml", &services);
    let config = copy_testdata(&world, "edge.yaml");
    let ports = Ports::new();
    let http = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: edge-istio, \
         labels: {{gateway.networking.k8s.io/gateway-name: edge}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\nrandomSeed: 7\n\
         gateway:\n  name: edge\n  namespace: production\n  ports:\n    80: 127.0.0.1:{http}\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        admin = ports.admin,
    );
    let gw = Proxy::start(&world, "gateway", "edge", &settings, ports).await;
    let client = Client::new(SocketAddr::from(([127, 0, 0, 1], http)));

    // The weighted rule: 90/10, and the path is forwarded as it came.
    let (a, b) = split(&client, "api.example.com", "/api/orders/7", 400).await;
    assert_ninety_ten(a, b);
    let (_, body) = client
        .request("GET", "api.example.com", "/api/orders/7?full=1", &[])
        .await
        .unwrap();
    assert!(body.contains(" /api/orders/7?full=1\n"), "{body}");

    // The header match: always v2, the prefix rewritten, the headers modified.
    let before = v1.hits.load(Ordering::SeqCst);
    for (path, want) in [
        ("/api/orders/7?full=1", "/orders/7?full=1"),
        ("/api/orders", "/orders"),
        ("/api/orders/", "/orders/"),
    ] {
        let (status, body) = client
            .request(
                "GET",
                "api.example.com",
                path,
                &[
                    ("x-canary", "true"),
                    ("x-drop", "secret"),
                    ("x-route", "client"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let mut lines = body.lines();
        assert_eq!(lines.next(), Some(format!("v2 {want}").as_str()), "{body}");
        let headers: Vec<&str> = lines.collect();
        assert!(headers.contains(&"x-route: canary"), "{body}");
        assert!(headers.contains(&"x-added: by-gateway"), "{body}");
        assert!(!headers.iter().any(|h| h.starts_with("x-drop")), "{body}");
        assert!(
            headers.contains(&format!("x-envoy-original-path: {path}").as_str()),
            "{body}"
        );
    }
    assert_eq!(
        v1.hits.load(Ordering::SeqCst),
        before,
        "v1 saw a canary request"
    );

    // PathPrefix is segment-aware: `/api/ordersX` is not under `/api/orders`, so it
    // falls through to the weighted rule, unrewritten.
    let (status, body) = client
        .request(
            "GET",
            "api.example.com",
            "/api/ordersX",
            &[("x-canary", "true")],
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains(" /api/ordersX\n"), "{body}");
    assert!(!body.contains("x-route: canary"), "{body}");

    // Backends that all weigh 0, and a backend no Service stands for: 500 from the
    // gateway itself; nothing reaches an upstream.
    let hits = v1.hits.load(Ordering::SeqCst) + v2.hits.load(Ordering::SeqCst);
    for path in ["/drained", "/missing/1"] {
        let (status, _) = client
            .request("GET", "api.example.com", path, &[])
            .await
            .unwrap();
        assert_eq!(status, 500, "{path}\n{}", gw.output());
    }
    assert_eq!(
        v1.hits.load(Ordering::SeqCst) + v2.hits.load(Ordering::SeqCst),
        hits
    );
    // `/drained/x` is not the exact path `/drained`: the weighted rule serves it.
    let (status, _) = client
        .request("GET", "api.example.com", "/drained/x", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    // Another host is not on the listener: 404.
    let (status, _) = client
        .request("GET", "other.example.com", "/api/orders/7", &[])
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_httproute_with_a_service_parent_splits_sidecar_traffic() {
    let world = World::new();
    let (v1, v2) = (upstream("v1").await, upstream("v2").await);
    let services = [
        // Without the route, the Service's own endpoints share the traffic evenly.
        service(
            "order-service",
            80,
            "HTTP",
            &[v1.addr.port(), v2.addr.port()],
        ),
        service("order-v1", 8080, "HTTP", &[v1.addr.port()]),
        service("order-v2", 8080, "HTTP", &[v2.addr.port()]),
    ]
    .join("---\n");
    let config = world.write_config("istio", "services.yaml", &services);
    copy_testdata(&world, "mesh-canary.yaml");
    let ports = Ports::new();
    let s = sidecar_settings(
        &world,
        "api-service",
        &labels(&[("app", "api-service")]),
        &config,
        ports,
        "127.0.0.1:9".parse().unwrap(),
        "randomSeed: 11\n",
    );
    let caller = Proxy::start(&world, "sidecar", "api-service", &s, ports).await;
    let client = Client::new(caller.outbound());
    // The parentRef names port 80: the client addresses it (without capture, a Host
    // without a port addresses the outbound listener's own port).
    let (a, b) = split(&client, "order-service:80", "/orders", 400).await;
    assert_ninety_ten(a, b);
    let (a, b) = split(
        &client,
        "order-service.production.svc.cluster.local:80",
        "/orders",
        100,
    )
    .await;
    assert_eq!(a + b, 100);

    // A consumer route of `staging` (GA-11): the staging client reaches v2 only, through
    // a backend of `production` that a ReferenceGrant allows; the production client
    // above keeps the producer's 90/10.
    let before = caller.admin("/config_dump").await;
    world.write_config(
        "istio",
        "mesh-consumer.yaml",
        &std::fs::read_to_string(testdata("mesh-consumer.yaml")).unwrap(),
    );
    let staging_ports = Ports::new();
    let s = sidecar_settings(
        &world,
        "web",
        &labels(&[("app", "web")]),
        &config,
        staging_ports,
        "127.0.0.1:9".parse().unwrap(),
        "randomSeed: 5\n",
    )
    .replace("namespace: production", "namespace: staging");
    let staging = Proxy::start(&world, "sidecar", "web", &s, staging_ports).await;
    let staging_client = Client::new(staging.outbound());
    let fqdn = "order-service.production.svc.cluster.local:80";
    wait_for_reload(&caller, &before).await;
    assert_eq!(split(&staging_client, fqdn, "/orders", 50).await, (0, 50));
    let (a, b) = split(&client, "order-service:80", "/orders", 400).await;
    assert_ninety_ten(a, b);

    // Without the grant the backend cannot be resolved: 500 for staging only.
    let yaml = std::fs::read_to_string(testdata("mesh-consumer.yaml")).unwrap();
    let without_grant = &yaml[..yaml.find("---\n").unwrap()];
    let before = staging.admin("/config_dump").await;
    world.write_config("istio", "mesh-consumer.yaml", without_grant);
    wait_for_reload(&staging, &before).await;
    let (status, _) = staging_client
        .request("GET", fqdn, "/orders", &[])
        .await
        .unwrap();
    assert_eq!(status, 500, "{}", staging.output());
    let (status, _) = client
        .request("GET", "order-service:80", "/orders", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// Waits until `proxy` has loaded a configuration other than the one `before` dumps.
async fn wait_for_reload(proxy: &Proxy, before: &str) {
    let version = |dump: &str| {
        let v: serde_json::Value = serde_json::from_str(dump).unwrap();
        v["version"].as_str().unwrap().to_owned()
    };
    for _ in 0..200 {
        if version(&proxy.admin("/config_dump").await) != version(before) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the configuration was not reloaded:\n{}", proxy.output());
}

/// A gRPC server (h2c) whose every unary method answers `"<name> <path>"`.
async fn grpc_server(name: &'static str) -> SocketAddr {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Empty {}
    #[derive(Clone, PartialEq, prost::Message)]
    struct Text {
        #[prost(string, tag = "1")]
        text: String,
    }
    #[derive(Clone)]
    struct Answer(String);
    impl tonic::server::UnaryService<Empty> for Answer {
        type Response = Text;
        type Future = std::future::Ready<Result<tonic::Response<Text>, Status>>;
        fn call(&mut self, _: tonic::Request<Empty>) -> Self::Future {
            std::future::ready(Ok(tonic::Response::new(Text {
                text: self.0.clone(),
            })))
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = tower::service_fn(
        move |req: http::Request<hyper::body::Incoming>| async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<Text, Empty>::default());
            let answer = Answer(format!("{name} {}", req.uri().path()));
            Ok::<_, Infallible>(grpc.unary(answer, req).await)
        },
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .http2_only()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

async fn grpc_call(outbound: SocketAddr, authority: &str, path: &'static str) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Empty {}
    #[derive(Clone, PartialEq, prost::Message)]
    struct Text {
        #[prost(string, tag = "1")]
        text: String,
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(Empty {}),
        PathAndQuery::from_static(path),
        ProstCodec::<Empty, Text>::default(),
    )
    .await
    .unwrap()
    .into_inner()
    .text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcroute_method_match_picks_the_backend() {
    let world = World::new();
    let (v1, v2) = (grpc_server("v1").await, grpc_server("v2").await);
    let services = [
        service("payments", 9090, "GRPC", &[v1.port()]),
        service("payments-v1", 9090, "GRPC", &[v1.port()]),
        service("payments-v2", 9090, "GRPC", &[v2.port()]),
    ]
    .join("---\n");
    let config = world.write_config("istio", "services.yaml", &services);
    copy_testdata(&world, "grpc.yaml");
    let ports = Ports::new();
    let s = sidecar_settings(
        &world,
        "orders",
        &labels(&[("app", "orders")]),
        &config,
        ports,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let caller = Proxy::start(&world, "sidecar", "orders", &s, ports).await;
    let out = caller.outbound();
    for _ in 0..5 {
        assert_eq!(
            grpc_call(out, "payments:9090", "/demo.Payments/Refund").await,
            "v2 /demo.Payments/Refund",
            "{}",
            caller.output()
        );
        assert_eq!(
            grpc_call(out, "payments:9090", "/demo.Payments/Pay").await,
            "v1 /demo.Payments/Pay"
        );
        // Same method name, another service: not the match.
        assert_eq!(
            grpc_call(out, "payments:9090", "/demo.Ledger/Refund").await,
            "v1 /demo.Ledger/Refund"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_filter_is_rejected_with_file_line_and_field() {
    let file = testdata("invalid-filter.yaml");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .arg("validate")
        .arg(&file)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stdout}{stderr}");
    let expected = format!(
        "{}:17:13: error: document 1, HTTPRoute/production/orders, spec.rules[0].filters[1].type: \
         unsupported filter type `ExtensionRef` in an HTTPRoute: the route is rejected; \
         supported filters are RequestHeaderModifier, ResponseHeaderModifier, \
         RequestRedirect, URLRewrite, RequestMirror",
        file.display()
    );
    assert!(
        stdout.lines().chain(stderr.lines()).any(|l| l == expected),
        "expected\n{expected}\nin\n{stdout}{stderr}"
    );

    // A sidecar whose configuration has it does not start with it...
    let world = World::new();
    let config = copy_testdata(&world, "invalid-filter.yaml");
    let ports = Ports::new();
    let s = sidecar_settings(
        &world,
        "api-service",
        &labels(&[("app", "api-service")]),
        &config,
        ports,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    std::fs::write(world.path("api-service.yaml"), &s).unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["sidecar", "--settings"])
        .arg(world.path("api-service.yaml"))
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the sidecar exits")
        .unwrap();
    assert!(!run.status.success());
    let log =
        String::from_utf8_lossy(&run.stderr).into_owned() + &String::from_utf8_lossy(&run.stdout);
    assert!(
        log.contains("invalid-filter.yaml:17:13") && log.contains("spec.rules[0].filters[1].type"),
        "{log}"
    );
}

/// The Gateway API's definitions, reduced to what the API server needs to serve them
/// (the upstream ones carry the full schemas; `discovery` validates the objects itself).
fn gateway_api_crds() -> String {
    [
        ("Gateway", "gateways", "v1"),
        ("HTTPRoute", "httproutes", "v1"),
        ("GRPCRoute", "grpcroutes", "v1"),
        ("ReferenceGrant", "referencegrants", "v1beta1"),
    ]
    .iter()
    .map(|(kind, plural, version)| {
        format!(
            "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.gateway.networking.k8s.io
  # As the upstream definitions: the group is a protected *.k8s.io group.
  annotations: {{api-approved.kubernetes.io: \"https://github.com/kubernetes-sigs/gateway-api/pull/3328\"}}
spec:
  group: gateway.networking.k8s.io
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {singular}, listKind: {kind}List}}
  versions:
  - name: {version}
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
",
            singular = kind.to_ascii_lowercase()
        )
    })
    .collect::<Vec<_>>()
    .join("---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_watches_gateway_api_objects_and_rejects_an_unsupported_filter() {
    use mesh_core::config::{AnyResource, LoadOptions};
    use mesh_proxy::discovery::kube::{KubeSource, SourceOptions};
    use support::peers::{ApiServer, wait_for_state};

    let Some(server) = ApiServer::start() else {
        return;
    };
    let options = SourceOptions {
        max_backoff: std::time::Duration::from_secs(2),
        instance: Some("gateway-api-test".to_owned()),
        ..SourceOptions::default()
    };
    // Started before the definitions exist: those kinds are listed as empty.
    let source = KubeSource::start(server.client().await, options)
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), source.ready())
        .await
        .expect("the source is ready without the Gateway API's definitions");
    let mut rx = source.subscribe();
    server.apply(&gateway_api_crds());
    server.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        "",
    );
    server.kubectl(&["create", "namespace", "production"], "");
    server.apply(&std::fs::read_to_string(testdata("edge.yaml")).unwrap());
    let state = wait_for_state(&mut rx, "the Gateway and the HTTPRoute", |s| {
        s.resources
            .iter()
            .any(|r| matches!(r, AnyResource::HttpRoute(h) if h.metadata.name == "orders"))
            && s.resources
                .iter()
                .any(|r| matches!(r, AnyResource::KubernetesGateway(_)))
    })
    .await;
    let config = state.config(&LoadOptions::default());
    let gateway = config
        .gateway("production", "edge")
        .expect("internal gateway");
    assert_eq!(gateway.spec.servers.len(), 1);
    let vs = config.virtual_services_for_gateway("production", "edge");
    assert_eq!(vs.len(), 1);
    assert_eq!(vs[0].spec.hosts, ["api.example.com"]);

    // An unsupported filter: left out with the located message, the last good version kept.
    let bad = std::fs::read_to_string(testdata("invalid-filter.yaml")).unwrap();
    server.apply(&bad);
    let state = wait_for_state(&mut rx, "the rejection", |s| !s.rejected.is_empty()).await;
    let rejected = format!("{:?}", state.rejected);
    assert!(
        rejected.contains("spec.rules[0].filters[1].type")
            && rejected.contains("unsupported filter type `ExtensionRef`"),
        "{rejected}"
    );
    assert!(state.rejected[0].kept_last_good, "{rejected}");
}
