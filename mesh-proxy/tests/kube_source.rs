//! The Kubernetes source against a real API server: Istio objects applied and patched
//! with `kubectl`, invalid versions rejected with the last good one kept, and Services,
//! EndpointSlices and Pods turned into ServiceEntries with labels and identities.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::config::{
    AnyResource, LoadOptions, MeshConfig, ServiceEntry, VirtualService, WorkloadEntry,
};
use mesh_proxy::discovery::kube::{ClusterState, KubeSource, SourceOptions};
use support::peers::{ApiServer, wait_for_state};

const CANARY: &str = include_str!("../../examples/sidecar/config/canary-order-service.yaml");
const RESILIENCE: &str =
    include_str!("../../examples/sidecar/config/payment-service-resilience.yaml");
const AUTHZ: &str = include_str!("../../examples/sidecar/config/authorization-policy-payment.yaml");
const STRICT: &str = include_str!("../../examples/sidecar/config/peer-authentication-strict.yaml");
const GATEWAY: &str = include_str!("../../examples/sidecar/config/api-gateway.yaml");

/// The article's patch, as written there.
const ARTICLE_PATCH: &str = r#"
{
"spec": {
"http": [{
"route": [
{"destination": {"host": "order-service", "subset": "v1"}, "weight": 0},
{"destination": {"host": "order-service", "subset": "v2"}, "weight": 100}
]
}]
}
}"#;

fn options() -> SourceOptions {
    SourceOptions {
        // A kind without its definition is retried quickly in tests.
        max_backoff: Duration::from_secs(2),
        instance: Some("kube-source-test".to_owned()),
        ..SourceOptions::default()
    }
}

/// The state written out as one YAML stream and loaded again, as sidecars receive it:
/// no errors, and the same resources.
fn reloads(s: &ClusterState) {
    let mut yaml = String::new();
    for r in &s.resources {
        yaml.push_str("---\n");
        yaml.push_str(&serde_saphyr::to_string(r).unwrap());
    }
    let (config, _) = MeshConfig::from_yaml_str("state.yaml", &yaml, &LoadOptions::default())
        .unwrap_or_else(|errors| panic!("{yaml}\n{errors:#?}"));
    assert_eq!(
        config.to_yaml().unwrap(),
        s.config(&LoadOptions::default()).to_yaml().unwrap()
    );
}

fn virtual_service<'a>(s: &'a ClusterState, ns: &str, name: &str) -> Option<&'a VirtualService> {
    s.resources.iter().find_map(|r| match r {
        AnyResource::VirtualService(v) if v.metadata.namespace == ns && v.metadata.name == name => {
            Some(v)
        }
        _ => None,
    })
}

/// The weights of the last HTTP route of a VirtualService.
fn weights(s: &ClusterState, ns: &str, name: &str) -> Option<Vec<Option<i32>>> {
    let vs = virtual_service(s, ns, name)?;
    let http = vs.spec.http.last()?;
    Some(http.route.iter().map(|r| r.weight).collect())
}

fn entry<'a>(s: &'a ClusterState, host: &str) -> Option<&'a ServiceEntry> {
    s.resources.iter().find_map(|r| match r {
        AnyResource::ServiceEntry(e) if e.spec.hosts.iter().any(|h| h == host) => Some(e),
        _ => None,
    })
}

fn endpoints<'a>(s: &'a ClusterState, host: &str) -> Vec<&'a WorkloadEntry> {
    entry(s, host)
        .map(|e| e.spec.endpoints.iter().collect())
        .unwrap_or_default()
}

fn addresses(s: &ClusterState, host: &str) -> Vec<String> {
    endpoints(s, host)
        .iter()
        .filter_map(|e| e.address.clone())
        .collect()
}

/// A RequestAuthentication, read like the other security kinds.
const TELEMETRY: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: errors-only
  namespace: production
spec:
  accessLogging:
  - filter:
      expression: response.code >= 400
";

const JWT: &str = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: payment-jwt
  namespace: production
spec:
  selector:
    matchLabels:
      app: payment-service
  jwtRules:
  - issuer: https://issuer.example.com
    jwksUri: https://issuer.example.com/jwks.json
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_objects_follow_kubectl_and_invalid_versions_keep_the_last_good_one() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    // Started before the definitions exist: the source lists those kinds as empty and
    // retries.
    let source = KubeSource::start(server.client().await, options())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), source.ready())
        .await
        .expect("the source is ready without Istio's definitions");
    let mut rx = source.subscribe();
    assert!(rx.borrow().generation >= 1);
    let mut registry = prometheus_client::registry::Registry::default();
    source.register_metrics(&mut registry);

    server.install_istio_crds();
    server.kubectl(&["create", "namespace", "production"], "");
    for yaml in [CANARY, RESILIENCE, AUTHZ, STRICT, GATEWAY, JWT, TELEMETRY] {
        server.apply(yaml);
    }
    let state = wait_for_state(&mut rx, "the article's resources", |s| {
        weights(s, "default", "order-service") == Some(vec![Some(95), Some(5)])
            && s.resources.len() >= 9
            && s.resources
                .iter()
                .any(|r| r.metadata().name == "payment-jwt")
            && s.resources
                .iter()
                .any(|r| r.metadata().name == "errors-only")
    })
    .await;
    let mut kinds: Vec<String> = state
        .resources
        .iter()
        .map(|r| {
            format!(
                "{}/{}/{}",
                r.kind(),
                r.metadata().namespace,
                r.metadata().name
            )
        })
        .collect();
    kinds.sort();
    for expected in [
        "AuthorizationPolicy/production/payment-service-authz",
        "DestinationRule/default/order-service",
        "DestinationRule/default/payment-service",
        "Gateway/default/api-gateway",
        "PeerAuthentication/production/default",
        "RequestAuthentication/production/payment-jwt",
        "Telemetry/production/errors-only",
        "VirtualService/default/order-service",
        "VirtualService/default/payment-service",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} missing from {kinds:?}"
        );
    }
    assert!(state.rejected.is_empty(), "{:?}", state.rejected);
    reloads(&state);
    // The state compiles into the snapshot the proxy uses; hosts are qualified.
    let config = state.config(&LoadOptions::default());
    assert_eq!(
        config
            .virtual_services_for_host("order-service.default.svc.cluster.local")
            .len(),
        1
    );
    assert!(
        config
            .subset("order-service.default.svc.cluster.local", "default", "v2")
            .is_some()
    );

    // The article's command, as written.
    server.kubectl(
        &[
            "patch",
            "virtualservice",
            "order-service",
            "--type=merge",
            "-p",
            ARTICLE_PATCH,
        ],
        "",
    );
    let before = wait_for_state(&mut rx, "the patched weights", |s| {
        weights(s, "default", "order-service") == Some(vec![Some(0), Some(100)])
    })
    .await;

    // A negative weight reaches the API server (the definitions leave the spec open) and
    // is rejected here, with the last good version kept.
    let bad = ARTICLE_PATCH.replace("\"weight\": 0", "\"weight\": -5");
    server.kubectl(
        &[
            "patch",
            "virtualservice",
            "order-service",
            "--type=merge",
            "-p",
            &bad,
        ],
        "",
    );
    let state = wait_for_state(&mut rx, "the rejection", |s| !s.rejected.is_empty()).await;
    assert!(state.generation > before.generation);
    let rejected = &state.rejected[0];
    assert_eq!(rejected.object(), "VirtualService/default/order-service");
    assert!(rejected.kept_last_good);
    assert_eq!(
        rejected.message(),
        "error: VirtualService/default/order-service, spec.http[0].route[0].weight: \
         weight -5 is negative; weights must be 0 or more"
    );
    assert_eq!(
        weights(&state, "default", "order-service"),
        Some(vec![Some(0), Some(100)]),
        "the last good version stays"
    );
    reloads(&state);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("mesh_discovery_rejected_objects{kind=\"VirtualService\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("mesh_discovery_rejections_total{kind=\"VirtualService\"} 1"),
        "{text}"
    );

    // The rejection is an Event on the object.
    let event = wait_for_event(&server, "order-service").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["involvedObject"]["kind"], "VirtualService");
    assert!(
        event["message"]
            .as_str()
            .unwrap()
            .contains("spec.http[0].route[0].weight: weight -5 is negative"),
        "{event}"
    );

    // A valid version replaces the kept one and clears the rejection.
    let good = ARTICLE_PATCH
        .replace("\"weight\": 0", "\"weight\": 20")
        .replace("\"weight\": 100", "\"weight\": 80");
    server.kubectl(
        &[
            "patch",
            "virtualservice",
            "order-service",
            "--type=merge",
            "-p",
            &good,
        ],
        "",
    );
    wait_for_state(&mut rx, "the fixed weights", |s| {
        weights(s, "default", "order-service") == Some(vec![Some(20), Some(80)])
            && s.rejected.is_empty()
    })
    .await;

    // An object that was never valid is left out on its own; the others stay.
    server.apply(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: ratings, namespace: production}\n\
         spec:\n  host: ratings\n  trafficPolicy:\n    loadBalancer: {simple: FASTEST}\n",
    );
    let state = wait_for_state(&mut rx, "the never-valid rule", |s| !s.rejected.is_empty()).await;
    let rejected = &state.rejected[0];
    assert_eq!(rejected.object(), "DestinationRule/production/ratings");
    assert!(!rejected.kept_last_good);
    assert!(
        rejected.message().starts_with(
            "error: DestinationRule/production/ratings, spec.trafficPolicy.loadBalancer.simple: "
        ),
        "{}",
        rejected.message()
    );
    assert!(
        !state
            .resources
            .iter()
            .any(|r| r.metadata().name == "ratings")
    );
    assert!(virtual_service(&state, "default", "order-service").is_some());

    // Deleting objects removes them, rejected or not.
    server.kubectl(&["delete", "dr", "ratings", "-n", "production"], "");
    server.kubectl(&["delete", "vs", "order-service"], "");
    wait_for_state(&mut rx, "the deletions", |s| {
        s.rejected.is_empty() && virtual_service(s, "default", "order-service").is_none()
    })
    .await;
}

/// The Warning Event about `name`, once it exists.
async fn wait_for_event(server: &ApiServer, name: &str) -> serde_json::Value {
    for _ in 0..120 {
        let out = server.kubectl(
            &[
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                &format!("involvedObject.name={name},reason=Rejected"),
                "-o",
                "json",
            ],
            "",
        );
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(e) = list["items"].as_array().and_then(|i| i.first()) {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("no Rejected event about {name}");
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: order-service
  namespace: production
spec:
  selector: {app: order-service}
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - name: grpc-status
    port: 9090
    appProtocol: grpc
"#;

fn pod(name: &str, version: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: production
  labels: {{app: order-service, version: {version}, security.istio.io/tlsMode: istio}}
spec:
  serviceAccountName: order-service
  containers:
  - name: app
    image: order-service:1.0.0
"#
    )
}

/// An EndpointSlice of order-service with endpoints `(address, pod, terminating)`. The
/// API server refuses loopback addresses in EndpointSlices, so pod addresses are taken
/// from a pod network range; nothing connects to them here.
fn slice(endpoints: &[(&str, &str, bool)]) -> String {
    let mut eps = String::new();
    for (address, pod, terminating) in endpoints {
        let conditions = if *terminating {
            "{ready: false, serving: true, terminating: true}"
        } else {
            "{ready: true, serving: true, terminating: false}"
        };
        eps.push_str(&format!(
            "- addresses: [\"{address}\"]\n  conditions: {conditions}\n  nodeName: node-a\n  \
             targetRef: {{kind: Pod, name: {pod}, namespace: production}}\n"
        ));
    }
    format!(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: order-service-abcde
  namespace: production
  labels: {{kubernetes.io/service-name: order-service}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: grpc-status, port: 9091, protocol: TCP}}
endpoints:
{eps}"#
    )
}

const HOST: &str = "order-service.production.svc.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_endpoint_slices_become_entries_with_labels_and_identity() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.kubectl(&["create", "namespace", "production"], "");
    server.apply(SERVICE);
    for (name, version) in [
        ("order-v1-a", "v1"),
        ("order-v1-b", "v1"),
        ("order-v2-a", "v2"),
    ] {
        server.apply(&pod(name, version));
    }
    server.apply(&slice(&[("10.244.0.11", "order-v1-a", false)]));

    let source = KubeSource::start(server.client().await, options())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), source.ready())
        .await
        .expect("ready");
    let mut rx = source.subscribe();
    let state = wait_for_state(&mut rx, "the service's entry", |s| {
        addresses(s, HOST) == ["10.244.0.11"]
    })
    .await;
    assert!(state.namespaces.contains_key("production"));
    let se = entry(&state, HOST).unwrap();
    assert_eq!(se.metadata.namespace, "production");
    let ports: Vec<_> = se
        .spec
        .ports
        .iter()
        .map(|p| (p.number, p.name.as_str(), p.protocol.as_str()))
        .collect();
    assert_eq!(ports, [(80, "http", "HTTP"), (9090, "grpc-status", "GRPC")]);
    assert_eq!(se.spec.addresses.len(), 1, "the cluster IP");
    let ep = endpoints(&state, HOST)[0];
    assert_eq!(
        ep.ports,
        [("grpc-status".to_owned(), 9091), ("http".to_owned(), 8080)].into()
    );
    assert_eq!(ep.labels["version"], "v1");
    assert_eq!(ep.labels["security.istio.io/tlsMode"], "istio");
    assert_eq!(ep.service_account.as_deref(), Some("order-service"));
    assert_eq!(
        se.spec.subject_alt_names,
        ["spiffe://cluster.local/ns/production/sa/order-service"]
    );
    // The snapshot resolves the service by host, and the router's registry compiled from
    // it reaches the pod's port with the pod's identity over Istio mTLS.
    let config = state.config(&LoadOptions::default());
    assert_eq!(config.service_entries_for_host(HOST).len(), 1);
    let registry =
        mesh_routing::compile::registry(&config, &mesh_routing::CompileOptions::default());
    let service = registry.service(HOST).unwrap();
    let port = service.port(80).unwrap().clone();
    let v1 = [("version".to_owned(), "v1".to_owned())].into();
    let eps = service.static_endpoints(&port, &v1);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].address, "10.244.0.11:8080".parse().unwrap());
    assert_eq!(
        eps[0].identities[0].to_string(),
        "spiffe://cluster.local/ns/production/sa/order-service"
    );
    assert_eq!(eps[0].tls_mode, mesh_core::TlsMode::Istio);
    let v2 = [("version".to_owned(), "v2".to_owned())].into();
    assert!(service.static_endpoints(&port, &v2).is_empty());

    // Scaled up, then down.
    server.apply(&slice(&[
        ("10.244.0.11", "order-v1-a", false),
        ("10.244.0.12", "order-v1-b", false),
        ("10.244.0.13", "order-v2-a", false),
    ]));
    let state = wait_for_state(&mut rx, "three endpoints", |s| {
        addresses(s, HOST).len() == 3
    })
    .await;
    let v2: Vec<_> = endpoints(&state, HOST)
        .iter()
        .filter(|e| e.labels.get("version").map(String::as_str) == Some("v2"))
        .filter_map(|e| e.address.clone())
        .collect();
    assert_eq!(v2, ["10.244.0.13"]);
    reloads(&state);
    server.apply(&slice(&[
        ("10.244.0.12", "order-v1-b", false),
        ("10.244.0.13", "order-v2-a", false),
    ]));
    wait_for_state(&mut rx, "two endpoints", |s| {
        addresses(s, HOST) == ["10.244.0.12", "10.244.0.13"]
    })
    .await;

    // Relabelling a pod moves its endpoint to the other subset.
    server.kubectl(
        &[
            "label",
            "pod",
            "order-v1-b",
            "-n",
            "production",
            "version=v2",
            "--overwrite",
        ],
        "",
    );
    wait_for_state(&mut rx, "the relabelled endpoint", |s| {
        endpoints(s, HOST).iter().any(|e| {
            e.address.as_deref() == Some("10.244.0.12")
                && e.labels.get("version").map(String::as_str) == Some("v2")
        })
    })
    .await;

    // A terminating endpoint is not sent.
    server.apply(&slice(&[
        ("10.244.0.12", "order-v1-b", false),
        ("10.244.0.13", "order-v2-a", true),
    ]));
    wait_for_state(&mut rx, "the terminating endpoint gone", |s| {
        addresses(s, HOST) == ["10.244.0.12"]
    })
    .await;

    // Headless and ExternalName Services are read too; deleting the Service removes its
    // entry.
    server.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: search, namespace: production}\n\
         spec:\n  type: ExternalName\n  externalName: search.example.com\n  ports:\n  - {name: https, port: 443}\n",
    );
    server.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: production}\n\
         spec:\n  clusterIP: None\n  selector: {app: db}\n  ports:\n  - {name: tcp-pg, port: 5432}\n",
    );
    let state = wait_for_state(&mut rx, "the other services", |s| {
        entry(s, "search.production.svc.cluster.local").is_some()
            && entry(s, "db.production.svc.cluster.local").is_some()
    })
    .await;
    let search = entry(&state, "search.production.svc.cluster.local").unwrap();
    assert_eq!(
        search.spec.endpoints[0].address.as_deref(),
        Some("search.example.com")
    );
    let db = entry(&state, "db.production.svc.cluster.local").unwrap();
    assert!(db.spec.addresses.is_empty());
    assert_eq!(db.spec.ports[0].protocol, "TCP");
    reloads(&state);
    server.kubectl(
        &["delete", "service", "order-service", "-n", "production"],
        "",
    );
    wait_for_state(&mut rx, "the entry gone", |s| entry(s, HOST).is_none()).await;
}

/// A server certificate for 127.0.0.1 and the PEM of the CA that signed it.
fn webhook_tls() -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "webhook test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (Arc::new(config), ca_cert.pem())
}

/// `bytes` in base64, as the API writes byte fields (`caBundle`).
fn base64(bytes: &[u8]) -> String {
    let value = serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).unwrap();
    value.as_str().unwrap().to_owned()
}

const REVIEWS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
    metadata: {name: reviews, namespace: default}\n\
    spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 90\n\
    \x20   - destination: {host: reviews, subset: v2}\n      weight: 10\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_refuses_invalid_objects_at_kubectl_apply_with_the_located_message() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.install_istio_crds();
    let (tls, ca) = webhook_tls();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(mesh_proxy::discovery::webhook::serve_webhook(
        listener,
        tls,
        LoadOptions::default(),
        shutdown.clone(),
    ));
    server.apply(&format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata:
  name: mesh-validation
webhooks:
- name: validation.mesh.example.com
  clientConfig:
    url: https://127.0.0.1:{port}/validate
    caBundle: {ca}
  rules:
  - apiGroups: [networking.istio.io, security.istio.io, telemetry.istio.io]
    apiVersions: ["*"]
    operations: [CREATE, UPDATE]
    resources: ["*"]
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
"#,
        ca = base64(ca.as_bytes())
    ));
    let invalid = REVIEWS.replace("weight: 10", "weight: -1");
    // The API server takes the configuration up within a few seconds.
    let mut refused = None;
    for _ in 0..120 {
        let out = server.kubectl_output(&["apply", "--dry-run=server", "-f", "-"], &invalid);
        if !out.status.success() {
            refused = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let refused = refused.expect("the invalid VirtualService is refused");
    assert!(
        refused.contains(
            "denied the request: error: VirtualService/default/reviews, \
             spec.http[0].route[1].weight: weight -1 is negative; weights must be 0 or more"
        ),
        "{refused}"
    );
    let out = server.kubectl_output(&["apply", "-f", "-"], &invalid);
    assert!(!out.status.success());
    let out = server.kubectl_output(&["get", "vs", "reviews"], "");
    assert!(!out.status.success(), "the invalid object was not stored");

    // A valid one is accepted, with the loader's warnings shown by kubectl.
    let out = server.kubectl_output(&["apply", "-f", "-"], REVIEWS);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Warning: warning: VirtualService/default/reviews, "),
        "{stderr}"
    );
    server.kubectl(&["get", "vs", "reviews"], "");

    // A Telemetry filter the proxy cannot evaluate is refused at its field.
    let bad = TELEMETRY
        .replace("response.code >= 400", "response.nope >= 400")
        .replace("namespace: production", "namespace: default");
    let out = server.kubectl_output(&["apply", "-f", "-"], &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Telemetry/default/errors-only, spec.accessLogging[0].filter.expression")
            && stderr.contains("unknown attribute `response.nope`"),
        "{stderr}"
    );
    shutdown.cancel();
    serving.await.unwrap();
}
