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
    // Istio labels a gateway's requests with the service they were routed to, not the
    // request's Host.
    let text = gw
        .metrics_when(|t| t.contains("destination_service_name=\"payment-service\""))
        .await;
    for service in ["order-service", "payment-service"] {
        assert!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"source\"")
                && l.contains(&format!(
                    "destination_service=\"{service}.production.svc.cluster.local\""
                ))
                && l.contains("destination_service_namespace=\"production\"")
                && l.contains(&format!("destination_canonical_service=\"{service}\""))
                && l.contains("response_code=\"200\"")),
            "{service} not labelled as the routed service:\n{text}"
        );
    }
    assert!(
        !text.contains("destination_service=\"api.example.com\""),
        "routed requests labelled by Host:\n{text}"
    );

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

/// PEM files of one edge CA: `simple-cert` for `simple.example.com`, `mutual-cert` for
/// `mutual.example.com` (with `ca.crt`, so clients must present a certificate from the
/// CA), and a client certificate. Returns (credentials dir, CA file).
fn two_server_credentials(world: &World) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge isolation CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let dir = world.path("credentials");
    for (secret, host, mutual) in [
        ("simple-cert", "simple.example.com", false),
        ("mutual-cert", "mutual.example.com", true),
    ] {
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let cred = dir.join(secret);
        std::fs::create_dir_all(&cred).unwrap();
        std::fs::write(cred.join("tls.crt"), leaf.pem()).unwrap();
        std::fs::write(cred.join("tls.key"), key.serialize_pem()).unwrap();
        if mutual {
            std::fs::write(cred.join("ca.crt"), ca_cert.pem()).unwrap();
        }
    }
    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(Vec::<String>::new()).unwrap();
    client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client.signed_by(&client_key, &issuer).unwrap();
    std::fs::write(world.path("client.crt"), client.pem()).unwrap();
    std::fs::write(world.path("client.key"), client_key.serialize_pem()).unwrap();
    let ca_file = world.path("edge-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    (dir, ca_file)
}

/// One HTTPS port with a `SIMPLE` server for `simple.example.com` and a `MUTUAL` server
/// for `mutual.example.com`, a plain-HTTP port for both, and routes to two services.
const TWO_SERVERS: &str = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: edge
spec:
  selector:
    istio: ingress
  servers:
  - port: {number: 443, name: https-simple, protocol: HTTPS}
    tls: {mode: SIMPLE, credentialName: simple-cert}
    hosts: [simple.example.com]
  - port: {number: 443, name: https-mutual, protocol: HTTPS}
    tls: {mode: MUTUAL, credentialName: \"kubernetes://mutual-cert\"}
    hosts: [mutual.example.com]
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [simple.example.com, mutual.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: simple
spec:
  hosts: [simple.example.com, unknown.example.com]
  gateways: [edge]
  http:
  - route:
    - destination: {host: simple-service, port: {number: 8080}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: mutual
spec:
  hosts: [mutual.example.com]
  gateways: [edge]
  http:
  - route:
    - destination: {host: mutual-service, port: {number: 8080}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: production
spec:
  mtls: {mode: STRICT}
";

/// The two-server gateway with its services: apps, sidecars, the gateway process.
struct Edge {
    world: World,
    simple_app: App,
    mutual_app: App,
    _sidecars: Vec<Proxy>,
    gateway: Proxy,
    https: u16,
    http: u16,
    ca: String,
}

impl Edge {
    async fn start() -> Self {
        let world = World::new();
        let simple_app = App::start(Behaviour::Ok("simple")).await;
        let mutual_app = App::start(Behaviour::Ok("mutual")).await;
        let (simple_ports, mutual_ports) = (Ports::new(), Ports::new());
        let yaml = format!(
            "{}---\n{}---\n{TWO_SERVERS}",
            service_entry(
                "simple-service",
                8080,
                &[(simple_ports.inbound, "v1", "simple-service")]
            ),
            service_entry(
                "mutual-service",
                8080,
                &[(mutual_ports.inbound, "v1", "mutual-service")]
            ),
        );
        let config = world.write_config("istio", "mesh.yaml", &yaml);
        let mut sidecars = Vec::new();
        for (name, ports, app) in [
            ("simple-service", simple_ports, simple_app.addr),
            ("mutual-service", mutual_ports, mutual_app.addr),
        ] {
            sidecars.push(start_sidecar(&world, name, &config, ports, app).await);
        }
        let (creds, ca) = two_server_credentials(&world);
        let gw_ports = Ports::new();
        let (https, http) = (free_port(), free_port());
        let settings = format!(
            "workload: {{namespace: production, serviceAccount: istio-ingressgateway, labels: {{istio: ingress}}}}\n\
             configDir: {config}\nsvid: {{caDir: {ca}}}\n\
             listeners: {{admin: 127.0.0.1:{admin}}}\n\
             gateway:\n  name: edge\n  credentialsDir: {creds}\n  ports:\n    443: 127.0.0.1:{https}\n    80: 127.0.0.1:{http}\n",
            config = config.display(),
            ca = world.ca_dir.display(),
            admin = gw_ports.admin,
            creds = creds.display(),
        );
        let gateway = Proxy::start(&world, "gateway", "gateway", &settings, gw_ports).await;
        Self {
            simple_app,
            mutual_app,
            _sidecars: sidecars,
            gateway,
            https,
            http,
            ca: ca.display().to_string(),
            world,
        }
    }

    fn client_cert(&self) -> [String; 4] {
        [
            "--cert".to_owned(),
            self.world.path("client.crt").display().to_string(),
            "--key".to_owned(),
            self.world.path("client.key").display().to_string(),
        ]
    }
}

/// An HTTP/2 connection over TLS with SNI `sni` to the gateway (no client certificate).
async fn h2_connect(
    port: u16,
    ca: &str,
    sni: &str,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(mesh_tls::provider())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// Status and body of a GET for `authority` on an existing HTTP/2 connection.
async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
    authority: &str,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let req = http::Request::get(format!("https://{authority}/"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    sender.ready().await.unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_on_the_tls_server_their_sni_selected() {
    if !tool_available("curl") || !tool_available("openssl") {
        return;
    }
    let edge = Edge::start().await;
    let (https, ca) = (edge.https, edge.ca.as_str());
    let simple_resolve = format!("simple.example.com:{https}:127.0.0.1");
    let mutual_resolve = format!("mutual.example.com:{https}:127.0.0.1");
    let simple_url = format!("https://simple.example.com:{https}/");
    let mutual_url = format!("https://mutual.example.com:{https}/");
    let cert = edge.client_cert();
    let cert: Vec<&str> = cert.iter().map(String::as_str).collect();

    // Each server serves its own host: SIMPLE without, MUTUAL with a client certificate.
    let (code, out, err) = curl(&[
        "--cacert",
        ca,
        "--resolve",
        &simple_resolve,
        "-w",
        " %{http_code}",
        &simple_url,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "simple 200"), "{err}");
    let mut args = vec![
        "--cacert",
        ca,
        "--resolve",
        &mutual_resolve,
        "-w",
        " %{http_code}",
    ];
    args.extend(&cert);
    args.push(&mutual_url);
    let (code, out, err) = curl(&args).await;
    assert_eq!((code, out.as_str()), (0, "mutual 200"), "{err}");
    let (code, _, _) = curl(&["--cacert", ca, "--resolve", &mutual_resolve, &mutual_url]).await;
    assert_ne!(
        code, 0,
        "MUTUAL accepted a handshake without a client certificate"
    );
    assert_eq!(edge.mutual_app.hits(), 1);

    // SNI of the SIMPLE server, no client certificate, Host of the MUTUAL server:
    // 421 over HTTP/1.1 and HTTP/2, with --resolve and with --connect-to.
    let connect_to = format!("simple.example.com:{https}:127.0.0.1:{https}");
    for version in ["--http1.1", "--http2"] {
        for target in [
            ["--resolve", &simple_resolve],
            ["--connect-to", &connect_to],
        ] {
            let (code, out, err) = curl(&[
                "--cacert",
                ca,
                version,
                target[0],
                target[1],
                "-H",
                "Host: mutual.example.com",
                "-w",
                "|%{http_code} %{http_version}",
                &simple_url,
            ])
            .await;
            let want_version = if version == "--http2" { "2" } else { "1.1" };
            assert_eq!(
                (code, out.as_str()),
                (
                    0,
                    format!("Misdirected Request|421 {want_version}").as_str()
                ),
                "{version} {}: {err}\n{}",
                target[0],
                edge.gateway.output()
            );
        }
        // A host no server of the port covers: 404, as a host without a route.
        let (code, out, err) = curl(&[
            "--cacert",
            ca,
            version,
            "--resolve",
            &simple_resolve,
            "-H",
            "Host: unknown.example.com",
            "-w",
            "%{http_code}",
            &simple_url,
        ])
        .await;
        assert_eq!((code, out.as_str()), (0, "404"), "{version}: {err}");
    }
    // The absolute-form target's authority is the host that counts (RFC 9112 §3.2.2).
    let (code, out, err) = curl(&[
        "--cacert",
        ca,
        "--http1.1",
        "--resolve",
        &simple_resolve,
        "--request-target",
        "https://mutual.example.com/",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &simple_url,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "421"), "{err}");

    // openssl: SNI simple, a raw HTTP/1.1 request for the MUTUAL host.
    let addr = format!("127.0.0.1:{https}");
    let (_, out, err) = openssl(
        &[
            "s_client",
            "-connect",
            &addr,
            "-servername",
            "simple.example.com",
            "-CAfile",
            ca,
            "-quiet",
            "-ign_eof",
        ],
        b"GET / HTTP/1.1\r\nHost: mutual.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 421 "), "{out}\n{err}");
    assert!(!out.contains("mutual"), "{out}");

    // HTTP/2 coalescing: one connection for the SIMPLE server's name; a stream for the
    // MUTUAL host is refused with 421 and the connection keeps serving its own host.
    let mut h2 = h2_connect(https, ca, "simple.example.com").await;
    assert_eq!(
        h2_get(&mut h2, "mutual.example.com").await,
        (421, "Misdirected Request".to_owned())
    );
    assert_eq!(h2_get(&mut h2, "unknown.example.com").await.0, 404);
    assert_eq!(
        h2_get(&mut h2, "simple.example.com").await,
        (200, "simple".to_owned())
    );
    assert_eq!(
        h2_get(&mut h2, &format!("MUTUAL.example.com.:{https}"))
            .await
            .0,
        421
    );

    // None of it reached the MUTUAL server's application.
    assert_eq!(edge.mutual_app.hits(), 1);
    let text = edge
        .gateway
        .metrics_when(|t| t.contains("response_code=\"421\""))
        .await;
    for code in ["421", "404"] {
        assert!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains("response_flags=\"NR\"")),
            "{code} NR not recorded:\n{text}"
        );
    }

    // Plain HTTP has no SNI: the port routes by host as before.
    let http = format!("http://127.0.0.1:{}/", edge.http);
    for (host, want) in [
        ("simple.example.com", "simple"),
        ("mutual.example.com", "mutual"),
    ] {
        let (code, out, err) = curl(&["-H", &format!("Host: {host}"), &http]).await;
        assert_eq!((code, out.as_str()), (0, want), "{err}");
    }
    assert_eq!(edge.simple_app.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_the_simple_server_never_skips_the_mutual_client_certificate() {
    if !tool_available("openssl") {
        return;
    }
    let edge = Edge::start().await;
    let addr = format!("127.0.0.1:{}", edge.https);
    let ca = edge.ca.as_str();
    for version in ["-tls1_2", "-tls1_3"] {
        let session = edge.world.path(&format!("session{version}.pem"));
        let session = session.to_str().unwrap();
        // A full handshake with the SIMPLE server; keep its session.
        let request = b"GET / HTTP/1.1\r\nHost: simple.example.com\r\nConnection: close\r\n\r\n";
        let (_, out, err) = openssl(
            &[
                "s_client",
                version,
                "-connect",
                &addr,
                "-servername",
                "simple.example.com",
                "-CAfile",
                ca,
                "-ign_eof",
                "-sess_out",
                session,
            ],
            request,
        )
        .await;
        assert!(out.contains("HTTP/1.1 200 "), "{version}: {out}\n{err}");
        // The session resumes on the server that issued it...
        let (_, out, err) = openssl(
            &[
                "s_client",
                version,
                "-connect",
                &addr,
                "-servername",
                "simple.example.com",
                "-CAfile",
                ca,
                "-ign_eof",
                "-sess_in",
                session,
            ],
            request,
        )
        .await;
        assert!(
            out.contains("Reused, TLSv1."),
            "{version}: not resumed\n{out}\n{err}"
        );
        assert!(out.contains("HTTP/1.1 200 "), "{version}: {out}\n{err}");
        // ...but offered to the MUTUAL server's name it is a new handshake that demands
        // a client certificate, and nothing is served without one.
        let (_, out, err) = openssl(
            &[
                "s_client",
                version,
                "-connect",
                &addr,
                "-servername",
                "mutual.example.com",
                "-CAfile",
                ca,
                "-ign_eof",
                "-sess_in",
                session,
            ],
            b"GET / HTTP/1.1\r\nHost: mutual.example.com\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            !out.contains("Reused,"),
            "{version}: resumed across servers\n{out}"
        );
        assert!(
            out.contains("Acceptable client certificate CA names"),
            "{version}: no certificate request\n{out}\n{err}"
        );
        assert!(
            !out.contains("HTTP/1.1"),
            "{version}: served without a certificate\n{out}"
        );
    }
    assert_eq!(edge.mutual_app.hits(), 0);
}
