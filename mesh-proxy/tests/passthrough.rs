//! Gateway TLS modes beyond SIMPLE and MUTUAL, with the real binary: a `PASSTHROUGH`
//! server (curl's TLS goes through the gateway unterminated, routed by SNI through a
//! VirtualService `tls` route, over Istio mTLS to the sidecar of a workload whose
//! application is `openssl s_server` with its own certificate), and an `ISTIO_MUTUAL`
//! server (mesh clients with an SVID only).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Stdio;

use support::*;

/// A CA and a server certificate for `name`: (CA PEM file, certificate file, key file).
fn app_certificate(world: &World, name: &str) -> [std::path::PathBuf; 3] {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "application CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![name.to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    let files = [
        world.path("app-ca.pem"),
        world.path("app.crt"),
        world.path("app.key"),
    ];
    std::fs::write(&files[0], ca_cert.pem()).unwrap();
    std::fs::write(&files[1], leaf.pem()).unwrap();
    std::fs::write(&files[2], key.serialize_pem()).unwrap();
    files
}

const MESH: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: production}
spec:
  selector: {istio: ingress}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: [secure.example.com]
  # No mode: PASSTHROUGH, the enum's zero value, not SIMPLE.
  - port: {number: 443, name: https, protocol: HTTPS}
    tls: {}
    hosts: [legacy.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: production}
spec:
  hosts: [secure.example.com, legacy.example.com]
  gateways: [edge]
  tls:
  - match:
    - port: 443
      sniHosts: [secure.example.com, legacy.example.com]
    route:
    - destination: {host: secure-app, port: {number: 8443}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec:
  mtls: {mode: STRICT}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_by_sni_without_terminating_tls() {
    if !tool_available("openssl") || !tool_available("curl") {
        return;
    }
    let world = World::new();
    let [ca, cert, key] = app_certificate(&world, "secure.example.com");
    let app_port = free_port();
    let _app = KillOnDrop(
        std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(app_port.to_string())
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let sidecar_ports = Ports::new();
    let yaml = format!(
        "{MESH}---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure-app, namespace: production}}
spec:
  hosts: [secure-app]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 8443, name: tls, protocol: TLS}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{tls: {inbound}}}, labels: {{app: secure-app}}, serviceAccount: secure-app}}
",
        inbound = sidecar_ports.inbound
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let app = std::net::SocketAddr::from(([127, 0, 0, 1], app_port));
    let sidecar = start_sidecar(&world, "secure-app", &config, sidecar_ports, app).await;
    let gw_ports = Ports::new();
    let https = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: istio-ingressgateway, labels: {{istio: ingress}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca_dir}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: edge\n  ports:\n    443: 127.0.0.1:{https}\n",
        config = config.display(),
        ca_dir = world.ca_dir.display(),
        admin = gw_ports.admin,
    );
    let gateway = Proxy::start(&world, "gateway", "gateway", &settings, gw_ports).await;

    // curl verifies the application's own certificate: the TLS session is end to end.
    let resolve = format!("secure.example.com:{https}:127.0.0.1");
    let url = format!("https://secure.example.com:{https}/");
    let ca = ca.display().to_string();
    let mut answer = (0, String::new(), String::new());
    // openssl s_server may still be starting.
    for _ in 0..50 {
        answer = curl(&["--cacert", &ca, "--resolve", &resolve, "-sS", &url]).await;
        if answer.0 == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, out, err) = answer;
    assert_eq!(code, 0, "{err}\n{}\n{}", gateway.output(), sidecar.output());
    assert!(out.contains("s_server"), "{out}");

    // The server without a mode passes TLS through too: the application's own
    // certificate answers (for another name, hence `-k`).
    let legacy = format!("legacy.example.com:{https}:127.0.0.1");
    let url = format!("https://legacy.example.com:{https}/");
    let (code, out, err) = curl(&["-k", "--resolve", &legacy, "-sS", &url]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("s_server"), "{out}");

    // An SNI no passthrough server covers is not served.
    let other = format!("other.example.com:{https}:127.0.0.1");
    let url = format!("https://other.example.com:{https}/");
    let (code, _, _) = curl(&["--cacert", &ca, "--resolve", &other, "-sS", &url]).await;
    assert_ne!(code, 0);

    // The gateway and the sidecar both count the connection, with each other's workload.
    let source = [
        ("reporter=\"source\""),
        ("destination_service=\"secure-app.production.svc.cluster.local\""),
        ("destination_workload=\"secure-app\""),
        ("source_workload=\"istio-ingressgateway\""),
    ];
    let text = gateway
        .metrics_when(|t| {
            t.lines().any(|l| {
                l.starts_with("istio_tcp_connections_closed_total{")
                    && source.iter().all(|s| l.contains(s))
            })
        })
        .await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_sent_bytes_total{")
                && source.iter().all(|s| l.contains(s))
                && !l.ends_with(" 0")),
        "{text}"
    );
    let destination = [
        ("reporter=\"destination\""),
        ("source_workload=\"istio-ingressgateway\""),
        ("connection_security_policy=\"mutual_tls\""),
    ];
    let text = sidecar
        .metrics_when(|t| {
            t.lines().any(|l| {
                l.starts_with("istio_tcp_connections_opened_total{")
                    && destination.iter().all(|s| l.contains(s))
            })
        })
        .await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && destination.iter().all(|s| l.contains(s))),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mutual_server_takes_mesh_clients_only() {
    use mesh_tls::{
        BuiltInIssuer, CertStore, CertificateAuthority, ClientTls, SecureNaming, UpstreamConnector,
    };
    use std::sync::Arc;
    use tower::ServiceExt;

    let world = World::new();
    let orders = App::start(Behaviour::Ok("orders")).await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: east-west, namespace: production}}
spec:
  selector: {{istio: eastwestgateway}}
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    tls: {{mode: ISTIO_MUTUAL}}
    hosts: ['*.mesh.internal']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: orders, namespace: production}}
spec:
  hosts: [orders.mesh.internal]
  gateways: [east-west]
  http:
  - route:
    - destination: {{host: orders}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: orders, namespace: production}}
spec:
  hosts: [orders]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}}}
",
        port = orders.addr.port()
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let gw_ports = Ports::new();
    let https = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: eastwest-gateway, labels: {{istio: eastwestgateway}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca_dir}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: east-west\n  ports:\n    443: 127.0.0.1:{https}\n",
        config = config.display(),
        ca_dir = world.ca_dir.display(),
        admin = gw_ports.admin,
    );
    let gateway = Proxy::start(&world, "gateway", "gateway", &settings, gw_ports).await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], https));
    let gateway_id = "spiffe://cluster.local/ns/production/sa/eastwest-gateway";

    // A workload of the mesh (its SVID from the mesh's CA) is served, and checks that the
    // server is the gateway.
    let ca = Arc::new(CertificateAuthority::load_dir(&world.ca_dir).unwrap());
    let store = CertStore::from_issuer(&BuiltInIssuer::new(ca, "production", "partner")).unwrap();
    let naming = SecureNaming::only(mesh_core::Identity::parse(gateway_id).unwrap());
    let connector =
        UpstreamConnector::istio(addr, "orders.mesh.internal", ClientTls::new(store), naming)
            .unwrap();
    let client = mesh_proxy::stack::HttpClient::upstream(
        connector,
        std::time::Duration::from_secs(5),
        mesh_proxy::stack::client::Protocol::Http1,
    );
    let req = http::Request::get("http://orders.mesh.internal/")
        .body(mesh_core::body::empty())
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200, "{}", gateway.output());
    assert_eq!(orders.hits(), 1);

    // A client without a mesh certificate is refused in the handshake.
    let (code, _, _) = curl(&[
        "-k",
        "--resolve",
        &format!("orders.mesh.internal:{https}:127.0.0.1"),
        &format!("https://orders.mesh.internal:{https}/"),
    ])
    .await;
    assert_ne!(code, 0);
    assert_eq!(orders.hits(), 1);
}
