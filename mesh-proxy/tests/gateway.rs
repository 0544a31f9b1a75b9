//! The article's ingress gateway with real processes and curl: HTTPS with SNI to
//! order-service and payment-service, unknown SNI refused, HTTP redirected to HTTPS.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

/// Writes `credentials/api-tls-cert/{tls.crt,tls.key}` for `api.example.com`, signed by
/// a fresh CA whose certificate is returned as a PEM file path.
fn credentials(world: &World) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["api.example.com".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "api.example.com");
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    let dir = world.path("credentials");
    let cred = dir.join("api-tls-cert");
    std::fs::create_dir_all(&cred).unwrap();
    std::fs::write(cred.join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(cred.join("tls.key"), key.serialize_pem()).unwrap();
    let ca_file = world.path("edge-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    // MUTUAL: the same server certificate, clients must chain to the edge CA.
    let mtls = dir.join("api-mtls-cert");
    std::fs::create_dir_all(&mtls).unwrap();
    std::fs::write(mtls.join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(mtls.join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(mtls.join("ca.crt"), ca_cert.pem()).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client
        .distinguished_name
        .push(rcgen::DnType::CommonName, "partner");
    client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client.signed_by(&client_key, &issuer).unwrap();
    std::fs::write(world.path("client.crt"), client.pem()).unwrap();
    std::fs::write(world.path("client.key"), client_key.serialize_pem()).unwrap();
    (dir, ca_file)
}

/// Replaces `credentials/api-tls-cert` with a certificate from a new CA, file by file
/// through renames as a Secret update would; returns the new CA's PEM file.
fn rotate_credentials(world: &World, creds: &std::path::Path) -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge test CA 2");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["api.example.com".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "api.example.com");
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    let dir = creds.join("api-tls-cert");
    for (name, text) in [("tls.key", key.serialize_pem()), ("tls.crt", leaf.pem())] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    let ca_file = world.path("edge-ca-2.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    ca_file
}

const GATEWAY: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: api-gateway
spec:
  selector:
    istio: ingress
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    tls:
      mode: SIMPLE
      credentialName: api-tls-cert
    hosts: [api.example.com]
  - port: {number: 80, name: http, protocol: HTTP}
    tls:
      httpsRedirect: true
    hosts: [api.example.com]
  - port: {number: 8443, name: https-partner, protocol: HTTPS}
    tls:
      mode: MUTUAL
      credentialName: api-mtls-cert
    hosts: [api.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: api-routing
spec:
  hosts: [api.example.com]
  gateways: [api-gateway]
  http:
  - match:
    - uri: {prefix: /api/v1/orders}
    route:
    - destination: {host: order-service, port: {number: 8080}}
  - match:
    - uri: {prefix: /api/v1/payments}
    route:
    - destination: {host: payment-service, port: {number: 8080}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: production
spec:
  mtls: {mode: STRICT}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_routes_by_sni_host_and_path_and_redirects_http() {
    let world = World::new();
    let order_app = App::start(Behaviour::Ok("orders")).await;
    let payment_app = App::start(Behaviour::Ok("payments")).await;
    let (order_ports, payment_ports) = (Ports::new(), Ports::new());
    let yaml = format!(
        "{}---\n{}---\n{GATEWAY}",
        service_entry(
            "order-service",
            8080,
            &[(order_ports.inbound, "v1", "order-service")]
        ),
        service_entry(
            "payment-service",
            8080,
            &[(payment_ports.inbound, "v1", "payment-service")]
        ),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let mut sidecars = Vec::new();
    for (name, ports, app) in [
        ("order-service", order_ports, order_app.addr),
        ("payment-service", payment_ports, payment_app.addr),
    ] {
        let s = sidecar_settings(
            &world,
            name,
            &labels(&[("app", name)]),
            &config,
            ports,
            app,
            "",
        );
        sidecars.push(Proxy::start(&world, "sidecar", name, &s, ports).await);
    }
    let (creds, edge_ca) = credentials(&world);
    let gw_ports = Ports::new();
    let (https, http, partner) = (free_port(), free_port(), free_port());
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: istio-ingressgateway, labels: {{istio: ingress}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: api-gateway\n  credentialsDir: {creds}\n  ports:\n    443: 127.0.0.1:{https}\n    80: 127.0.0.1:{http}\n    8443: 127.0.0.1:{partner}\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        admin = gw_ports.admin,
        creds = creds.display(),
    );
    let gw = Proxy::start(&world, "gateway", "gateway", &settings, gw_ports).await;

    let resolve = format!("api.example.com:{https}:127.0.0.1");
    let cacert = edge_ca.display().to_string();
    for (path, want) in [
        ("/api/v1/orders", "orders"),
        ("/api/v1/payments/42", "payments"),
    ] {
        let url = format!("https://api.example.com:{https}{path}");
        let (code, out, err) = curl(&[
            "--cacert",
            &cacert,
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_code}",
            &url,
        ])
        .await;
        assert_eq!(code, 0, "{err}\n{}", gw.output());
        assert_eq!(out, format!("{want}\n200"), "{}", gw.output());
    }
    // A path no route matches: 404 from the gateway.
    let url = format!("https://api.example.com:{https}/admin");
    let (_, out, _) = curl(&[
        "--cacert",
        &cacert,
        "--resolve",
        &resolve,
        "-w",
        "%{http_code}",
        &url,
    ])
    .await;
    assert_eq!(out, "404");

    // An SNI no server covers fails the handshake.
    let other = format!("other.example.com:{https}:127.0.0.1");
    let url = format!("https://other.example.com:{https}/api/v1/orders");
    let (code, _, _) = curl(&["--cacert", &cacert, "--resolve", &other, &url]).await;
    assert_eq!(code, 35, "curl reports an SSL connect error");

    // HTTP is redirected to HTTPS.
    let url = format!("http://127.0.0.1:{http}/api/v1/orders?id=7");
    let (_, out, _) = curl(&[
        "-H",
        "Host: api.example.com",
        "-w",
        "%{http_code} %{redirect_url}",
        &url,
    ])
    .await;
    assert_eq!(out, "301 https://api.example.com/api/v1/orders?id=7");

    // MUTUAL: a client certificate from the configured CA is required.
    let resolve = format!("api.example.com:{partner}:127.0.0.1");
    let url = format!("https://api.example.com:{partner}/api/v1/orders");
    let (cert, key) = (world.path("client.crt"), world.path("client.key"));
    let (code, out, err) = curl(&[
        "--cacert",
        &cacert,
        "--resolve",
        &resolve,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "-w",
        "\n%{http_code}",
        &url,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "orders\n200"), "{err}");
    let (code, out, _) = curl(&["--cacert", &cacert, "--resolve", &resolve, &url]).await;
    assert_ne!(code, 0, "no client certificate was accepted: {out}");
    assert_eq!(order_app.hits(), 2);
    assert_eq!(payment_app.hits(), 1);

    // The credential files are replaced: new handshakes present the new certificate.
    let new_ca = rotate_credentials(&world, &creds);
    let new_ca = new_ca.display().to_string();
    let resolve = format!("api.example.com:{https}:127.0.0.1");
    let url = format!("https://api.example.com:{https}/api/v1/orders");
    let mut rotated = false;
    for _ in 0..200 {
        let (code, out, _) = curl(&["--cacert", &new_ca, "--resolve", &resolve, &url]).await;
        if code == 0 {
            assert_eq!(out, "orders");
            rotated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        rotated,
        "the new credential was not served:\n{}",
        gw.output()
    );
    let (code, _, _) = curl(&["--cacert", &cacert, "--resolve", &resolve, &url]).await;
    assert_eq!(code, 60, "the old certificate is no longer served");
}
