//! The article's whole story with Kubernetes as the control plane, against a real API
//! server: Istio's CRDs and the article's YAML applied with `kubectl`, Services, Pods and
//! EndpointSlices for the workloads, `mesh-proxy discovery --kubernetes` as the only
//! holder of the CA key, and sidecars that hold no Kubernetes credentials: each gets its
//! certificate by CSR with its service-account token (`kubectl create token --audience
//! istio-ca`) and its configuration over xDS. Then traffic: the canary moved 5 → 20 → 50 →
//! 100 with the article's `kubectl patch`, a failing payment replica retried around and
//! ejected, the AuthorizationPolicy enforced on identities from the issued certificates,
//! and not one failed request.
//!
//! The API server refuses loopback addresses in EndpointSlices, so the sidecars' inbound
//! listeners bind this machine's own non-loopback address, and each pod has its own
//! EndpointSlice (each sidecar listens on its own port).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::peers::{ApiServer, host_ip};
use support::*;

const CANARY: &str = include_str!("../../examples/sidecar/config/canary-order-service.yaml");
const RESILIENCE: &str =
    include_str!("../../examples/sidecar/config/payment-service-resilience.yaml");
const AUTHZ: &str = include_str!("../../examples/sidecar/config/authorization-policy-payment.yaml");
const STRICT: &str = include_str!("../../examples/sidecar/config/peer-authentication-strict.yaml");

/// The article's patch with v2's weight `v2` (the article's own is `v2 = 100`).
fn article_patch(v2: u32) -> String {
    format!(
        r#"
{{
"spec": {{
"http": [{{
"route": [
{{"destination": {{"host": "order-service", "subset": "v1"}}, "weight": {v1}}},
{{"destination": {{"host": "order-service", "subset": "v2"}}, "weight": {v2}}}
]
}}]
}}
}}"#,
        v1 = 100 - v2
    )
}

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: production}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports:\n  - {{name: http, port: 8080, targetPort: 15006}}\n"
    )
}

/// A pod of `app` with `version`, its service account, and the sidecar label.
fn pod(name: &str, app: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: production\n  labels:\n    \
         app: {app}\n    version: {version}\n    security.istio.io/tlsMode: istio\n\
         spec:\n  serviceAccountName: {app}\n  containers:\n  - {{name: app, image: {app}:1}}\n"
    )
}

/// One EndpointSlice of `service` for pod `pod` reached at `address`.
fn slice(service: &str, pod: &str, address: SocketAddr) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {pod}\n  \
         namespace: production\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: {port}, protocol: TCP}}\nendpoints:\n\
         - addresses: [\"{ip}\"]\n  conditions: {{ready: true, serving: true, terminating: false}}\n  \
         targetRef: {{kind: Pod, name: {pod}, namespace: production}}\n",
        port = address.port(),
        ip = address.ip(),
    )
}

/// Settings of a sidecar whose certificate and configuration come from `discovery`:
/// no `configDir`, no `svid`, inbound on `ip`.
#[allow(clippy::too_many_arguments)]
fn settings(
    world: &World,
    sa: &str,
    version: &str,
    ports: Ports,
    app: SocketAddr,
    ip: IpAddr,
    grpc: u16,
    token: &std::path::Path,
    root: &std::path::Path,
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
            "randomSeed: 7\ndiscovery:\n  address: 127.0.0.1:{grpc}\n  tokenFile: {}\n  rootCert: {}\n",
            token.display(),
            root.display()
        ),
    );
    let without = [
        format!("configDir: {}\n", placeholder.display()),
        format!(
            "svid:\n  caDir: {}\n  lifetime: 1h\n",
            world.ca_dir.display()
        ),
    ];
    let mut s = s;
    for line in without {
        assert!(s.contains(&line), "{s}");
        s = s.replace(&line, "");
    }
    s.replace(
        &format!("inbound: 127.0.0.1:{}", ports.inbound),
        &format!("inbound: {ip}:{}", ports.inbound),
    )
}

/// `n` requests to order-service through `client`; (v1, v2) answers. Any other answer
/// fails the test.
async fn split(client: &Client, n: usize) -> (usize, usize) {
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..n {
        let (status, body) = client
            .request("GET", "order-service", "/orders", &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "a failed request: {body}");
        match body.as_str() {
            "order-v1" => v1 += 1,
            "order-v2" => v2 += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    (v1, v2)
}

fn config_version(dump: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(dump).unwrap();
    v["version"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_article_on_kubernetes_with_discovery_certificates_by_csr_and_zero_failed_requests() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    let world = World::new();
    let ip = host_ip();
    for ns in ["production", "istio-system"] {
        server.kubectl(&["create", "namespace", ns], "");
    }
    server.install_istio_crds();
    for sa in ["order-service", "payment-service", "frontend"] {
        server.kubectl(&["-n", "production", "create", "serviceaccount", sa], "");
    }
    // The article's Istio YAML, as written (the canary file also holds a Deployment,
    // which the API server stores and nothing runs here).
    for yaml in [CANARY, RESILIENCE, AUTHZ, STRICT] {
        server.kubectl(&["-n", "production", "apply", "-f", "-"], yaml);
    }

    let grpc = free_port();
    let grpc_address = format!("127.0.0.1:{grpc}");
    let args = [
        "--kubernetes".as_ref(),
        "--kubeconfig".as_ref(),
        server.kubeconfig.as_os_str(),
        "--grpc".as_ref(),
        grpc_address.as_ref(),
    ];
    let discovery = DiscoveryProcess::start(&world, "discovery", &args).await;

    // The mesh root, as discovery published it for the namespace's pods.
    let mut root_pem = String::new();
    for _ in 0..200 {
        let out = server.kubectl_output(
            &[
                "-n",
                "production",
                "get",
                "configmap",
                "istio-ca-root-cert",
                "-o",
                "jsonpath={.data.root-cert\\.pem}",
            ],
            "",
        );
        root_pem = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && root_pem.contains("BEGIN CERTIFICATE") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        root_pem.contains("BEGIN CERTIFICATE"),
        "no istio-ca-root-cert"
    );
    let root = world.path("root-cert.pem");
    std::fs::write(&root, &root_pem).unwrap();
    let token = |sa: &str| {
        let token = server.kubectl(
            &[
                "-n",
                "production",
                "create",
                "token",
                sa,
                "--audience",
                "istio-ca",
                "--duration",
                "1h",
            ],
            "",
        );
        let path = world.path(&format!("{sa}.token"));
        std::fs::write(&path, token.trim()).unwrap();
        path
    };
    let (order_token, payment_token, frontend_token) = (
        token("order-service"),
        token("payment-service"),
        token("frontend"),
    );

    // The workloads: applications on loopback, sidecars in front of them.
    let order_v1 = App::start(Behaviour::Ok("order-v1")).await;
    let order_v2 = App::start(Behaviour::Ok("order-v2")).await;
    let paid = App::start(Behaviour::Ok("paid")).await;
    let broken = App::start(Behaviour::Status(503, "broken")).await;
    let frontend_app = App::start(Behaviour::Ok("frontend")).await;
    let pods = [
        (
            "order-v1",
            "order-service",
            "v1",
            order_v1.addr,
            &order_token,
        ),
        (
            "order-v2",
            "order-service",
            "v2",
            order_v2.addr,
            &order_token,
        ),
        (
            "payment-a",
            "payment-service",
            "v1",
            paid.addr,
            &payment_token,
        ),
        (
            "payment-b",
            "payment-service",
            "v1",
            broken.addr,
            &payment_token,
        ),
    ];
    server.apply(&service("order-service"));
    server.apply(&service("payment-service"));
    let mut sidecars = Vec::new();
    for (name, app, version, app_addr, token) in pods {
        let ports = Ports::new();
        server.apply(&pod(name, app, version));
        server.apply(&slice(app, name, SocketAddr::new(ip, ports.inbound)));
        let s = settings(
            &world, app, version, ports, app_addr, ip, grpc, token, &root,
        );
        sidecars.push(Proxy::start(&world, "sidecar", name, &s, ports).await);
    }
    let ports = Ports::new();
    let s = settings(
        &world,
        "frontend",
        "v1",
        ports,
        frontend_app.addr,
        ip,
        grpc,
        &frontend_token,
        &root,
    );
    let frontend = Proxy::start(&world, "sidecar", "frontend", &s, ports).await;

    // Certificates came from discovery by CSR, for each pod's own service account.
    for (proxy, sa) in [(&frontend, "frontend"), (&sidecars[0], "order-service")] {
        let certs: serde_json::Value = serde_json::from_str(&proxy.admin("/certs").await).unwrap();
        assert_eq!(
            certs["identity"],
            format!("spiffe://cluster.local/ns/production/sa/{sa}"),
            "{certs}"
        );
    }

    // The canary as applied: 95/5, and `x-canary: true` always to v2.
    let client = Client::new(frontend.outbound());
    for _ in 0..10 {
        let (status, body) = client
            .request("GET", "order-service", "/orders", &[("x-canary", "true")])
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "order-v2"),
            "{}\n{}",
            frontend.admin("/config_dump").await,
            frontend.output()
        );
    }
    let (v1, v2) = split(&client, 100).await;
    assert!(v1 >= 85 && v2 <= 15, "95/5 gave {v1}/{v2}");

    // The article's rollout: 20, 50, then the article's own patch to 100. Bounds are four
    // standard deviations of 100 draws either side (a chance failure about once in
    // 15 000 runs).
    for (weight, low, high) in [(20, 4, 36), (50, 30, 70), (100, 100, 100)] {
        let before = config_version(&frontend.admin("/config_dump").await);
        server.kubectl(
            &[
                "-n",
                "production",
                "patch",
                "virtualservice",
                "order-service",
                "--type=merge",
                "-p",
                &article_patch(weight),
            ],
            "",
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while config_version(&frontend.admin("/config_dump").await) == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the patch to {weight}% did not reach the sidecar:\n{}",
                discovery.output()
            );
            // Traffic keeps flowing while the change travels.
            split(&client, 1).await;
        }
        let (_, v2) = split(&client, 100).await;
        assert!(
            (low..=high).contains(&v2),
            "{weight}% to v2 gave {v2} of 100"
        );
    }

    // Payments from order-service: one replica answers 503, the retries take the other
    // (retryOn gateway-error) and outlier detection ejects it (5 consecutive 5xx).
    let order = Client::new(sidecars[0].outbound());
    for _ in 0..40 {
        let (status, body) = order
            .request("POST", "payment-service", "/api/v1/payments", &[])
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "paid"));
    }
    let clusters = sidecars[0].admin("/clusters?format=json").await;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).unwrap();
    let ejected: Vec<String> = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["ejected"] == true)
        .map(|e| e["address"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        ejected,
        vec![format!("{ip}:{}", sidecars[3].ports.inbound)],
        "the failing replica, and only it, is ejected: {clusters}"
    );

    // The AuthorizationPolicy, on identities from the issued certificates: only
    // order-service may POST /api/v1/payments*.
    let (status, _) = order
        .request("GET", "payment-service", "/api/v1/payments", &[])
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, _) = client
        .request("POST", "payment-service", "/api/v1/payments", &[])
        .await
        .unwrap();
    assert_eq!(status, 403, "frontend is not order-service");
    assert!(paid.hits() >= 40);
}
