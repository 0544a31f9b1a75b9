//! Every upstream a mesh has, through an in-process sidecar: plaintext services without
//! a sidecar (DestinationRule `tls: DISABLE` and auto-mTLS), Istio mTLS to a labelled
//! sidecar, TLS origination (`SIMPLE` with SNI and `subjectAltNames`, `MUTUAL` with a
//! client certificate, to rustls servers and to `openssl s_server` checking SNI and the
//! client certificate; a gateway's `MUTUAL` with `credentialName`), block-wise `tls` merging for a subset, and
//! `maxRequestsPerConnection` counted at a real upstream.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::{ProxyHandle, Settings, Sidecar};
use mesh_tls::{CertificateAuthority, IssuedSvid, LeafSpec};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use support::*;
use tokio::net::TcpListener;

fn settings(world: &World, sa: &str, app: SocketAddr) -> Settings {
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: {sa}, labels: {{app: {sa}}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0, app: {app}}}\n\
         limits: {{drainTimeout: 1s}}\n",
        config = world.path("istio").display(),
        ca = world.ca_dir.display(),
    );
    Settings::from_yaml(format!("{sa}.yaml"), &yaml).unwrap()
}

/// The calling sidecar (order-service), started on `yaml`.
async fn caller(world: &World, yaml: &str) -> (ProxyHandle, SocketAddr) {
    world.write_config("istio", "mesh.yaml", yaml);
    let order = Sidecar::start(settings(
        world,
        "order-service",
        "127.0.0.1:9".parse().unwrap(),
    ))
    .await
    .unwrap();
    let outbound = order.address("outbound").unwrap();
    (order, outbound)
}

/// A ServiceEntry for `host` (HTTP port 80) with one endpoint at `addr`; `extra` adds
/// endpoint fields (labels, serviceAccount).
fn entry(host: &str, location: &str, addr: SocketAddr, extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {host}, namespace: production}}\n\
         spec:\n  hosts: [{host}]\n  location: {location}\n  resolution: STATIC\n  ports:\n  - {{number: 80, name: http, protocol: HTTP}}\n\
         \x20 endpoints:\n  - address: {ip}\n    ports: {{http: {port}}}\n{extra}",
        ip = addr.ip(),
        port = addr.port(),
    )
}

fn rule(host: &str, traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}, namespace: production}}\n\
         spec:\n  host: {host}\n  trafficPolicy:\n{traffic_policy}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_disable_rule_sends_plaintext_even_to_an_endpoint_with_a_service_account() {
    let world = World::new();
    let legacy = App::start(Behaviour::Ok("plain")).await;
    // The serviceAccount alone would make auto-mTLS choose Istio mTLS (SR-25); the rule wins.
    let yaml = format!(
        "{}---\n{}",
        entry(
            "legacy",
            "MESH_INTERNAL",
            legacy.addr,
            "    serviceAccount: legacy\n"
        ),
        rule("legacy", "    tls: {mode: DISABLE}\n"),
    );
    let (order, outbound) = caller(&world, &yaml).await;
    assert_eq!(
        send(outbound, "GET", "legacy", "/", &[]).await,
        Ok((200, "plain".to_owned()))
    );
    order.shutdown();
    order.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mtls_sends_plaintext_and_no_workload_metadata_to_an_endpoint_without_a_sidecar() {
    let world = World::new();
    let legacy = App::start(Behaviour::Ok("plain")).await;
    let yaml = entry(
        "legacy",
        "MESH_INTERNAL",
        legacy.addr,
        "    labels: {app: legacy}\n",
    );
    let (order, outbound) = caller(&world, &yaml).await;
    assert_eq!(
        send(outbound, "GET", "legacy", "/", &[]).await,
        Ok((200, "plain".to_owned()))
    );
    assert_eq!(legacy.hits(), 1);
    // The workload's exchanged metadata goes only to mesh peers.
    let seen = legacy.last_headers.lock().unwrap()[0].clone();
    assert!(!seen.contains_key("x-envoy-peer-metadata"), "{seen:?}");
    assert!(!seen.contains_key("x-envoy-peer-metadata-id"), "{seen:?}");
    order.shutdown();
    order.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mtls_sends_istio_mtls_to_a_labelled_sidecar() {
    let world = World::new();
    let app = App::start(Behaviour::Ok("paid")).await;
    world.write_config(
        "istio",
        "mesh.yaml",
        &entry(
            "placeholder",
            "MESH_INTERNAL",
            "127.0.0.1:1".parse().unwrap(),
            "",
        ),
    );
    let payment = Sidecar::start(settings(&world, "payment-service", app.addr))
        .await
        .unwrap();
    let inbound = payment.address("inbound").unwrap();
    // No serviceAccount: only the injector's label marks the sidecar.
    let yaml = format!(
        "{}---\n{}",
        entry(
            "payment-service",
            "MESH_INTERNAL",
            inbound,
            "    labels: {app: payment-service, security.istio.io/tlsMode: istio}\n",
        ),
        // STRICT: a plaintext request would be refused by the callee.
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: production}\n\
         spec:\n  mtls: {mode: STRICT}\n",
    );
    let (order, outbound) = caller(&world, &yaml).await;
    assert_eq!(
        send(outbound, "POST", "payment-service", "/pay", &[]).await,
        Ok((200, "paid".to_owned()))
    );
    // The callee saw the caller's SPIFFE identity over mutual TLS.
    let admin = payment.address("admin").unwrap();
    let want = "source_principal=\"spiffe://cluster.local/ns/production/sa/order-service\"";
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = admin_get(admin.port(), "/stats/prometheus")
            .await
            .unwrap()
            .1;
        if metrics.contains(want) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains(want))
        .unwrap_or_else(|| panic!("no request from order-service:\n{metrics}"));
    assert!(line.contains("reporter=\"destination\""), "{line}");
    assert!(
        line.contains("connection_security_policy=\"mutual_tls\""),
        "{line}"
    );
    order.shutdown();
    order.wait().await;
    payment.shutdown();
    payment.wait().await;
}

/// A TLS upstream (rustls, HTTP/1.1) that records the SNI of each handshake and whether
/// the client presented a certificate; with `client_ca`, a client certificate signed by
/// it is required.
struct TlsUpstream {
    addr: SocketAddr,
    sni: Arc<Mutex<Vec<Option<String>>>>,
    client_certs: Arc<Mutex<Vec<bool>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsUpstream {
    async fn start(leaf: &IssuedSvid, client_ca: Option<&CertificateAuthority>) -> Self {
        let provider = mesh_tls::provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                roots.add(ca.root_der().clone()).unwrap();
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(leaf.chain_der().to_vec(), leaf.key_der())
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sni = Arc::new(Mutex::new(Vec::new()));
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (sni.clone(), client_certs.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let conn = tls.get_ref().1;
                s.lock()
                    .unwrap()
                    .push(conn.server_name().map(str::to_owned));
                c.lock().unwrap().push(conn.peer_certificates().is_some());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"tls ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            sni,
            client_certs,
            task,
        }
    }
}

/// A CA and a server certificate for `api.example.com`; the CA is written to
/// `<dir>/external-ca.pem`.
fn external_pki(world: &World) -> (CertificateAuthority, IssuedSvid, String) {
    let ca = CertificateAuthority::new("example.com").unwrap();
    let leaf = ca
        .issue_with(
            &LeafSpec::workload("example.com", "external", "api").with_dns("api.example.com"),
        )
        .unwrap();
    let path = world.path("external-ca.pem");
    std::fs::write(&path, ca.root_pem()).unwrap();
    (ca, leaf, path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_tls_origination_sends_the_sni_and_verifies_the_server() {
    let world = World::new();
    let (_ca, leaf, ca_file) = external_pki(&world);
    let upstream = TlsUpstream::start(&leaf, None).await;
    // Port-level settings replace the rule's tls block for port 80 (DR-04).
    let yaml = format!(
        "{}---\n{}",
        entry("api.example.com", "MESH_EXTERNAL", upstream.addr, ""),
        rule(
            "api.example.com",
            &format!(
                "    tls: {{mode: ISTIO_MUTUAL}}\n    portLevelSettings:\n    - port: {{number: 80}}\n      \
                 tls: {{mode: SIMPLE, caCertificates: {ca_file}, sni: api.example.com}}\n"
            ),
        ),
    );
    let (order, outbound) = caller(&world, &yaml).await;
    assert_eq!(
        send(outbound, "GET", "api.example.com", "/", &[]).await,
        Ok((200, "tls ok".to_owned()))
    );
    assert_eq!(
        *upstream.sni.lock().unwrap(),
        vec![Some("api.example.com".to_owned())]
    );
    assert_eq!(*upstream.client_certs.lock().unwrap(), vec![false]);
    order.shutdown();
    order.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_origination_presents_the_client_certificate() {
    let world = World::new();
    let (ca, leaf, ca_file) = external_pki(&world);
    let upstream = TlsUpstream::start(&leaf, Some(&ca)).await;
    let client = ca
        .issue_with(&LeafSpec::workload(
            "example.com",
            "production",
            "order-service",
        ))
        .unwrap();
    let (cert, key) = (world.path("client.pem"), world.path("client-key.pem"));
    std::fs::write(&cert, client.cert_chain_pem()).unwrap();
    std::fs::write(&key, client.key_pem()).unwrap();
    let yaml = format!(
        "{}---\n{}",
        entry("api.example.com", "MESH_EXTERNAL", upstream.addr, ""),
        rule(
            "api.example.com",
            &format!(
                "    tls:\n      mode: MUTUAL\n      caCertificates: {ca_file}\n      \
                 clientCertificate: {cert}\n      privateKey: {key}\n      \
                 subjectAltNames: [api.example.com]\n",
                cert = cert.display(),
                key = key.display(),
            ),
        ),
    );
    let (order, outbound) = caller(&world, &yaml).await;
    assert_eq!(
        send(outbound, "GET", "api.example.com", "/", &[]).await,
        Ok((200, "tls ok".to_owned()))
    );
    assert_eq!(*upstream.client_certs.lock().unwrap(), vec![true]);
    order.shutdown();
    order.wait().await;
}

/// `MUTUAL` origination to `openssl s_server`, which refuses a ClientHello without the
/// SNI it serves (`-servername_fatal`) or without a client certificate from its CA
/// (`-Verify`), and shows the client certificate it verified on its status page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_origination_to_openssl_s_server_checks_sni_and_the_client_certificate() {
    if !tool_available("openssl") {
        return;
    }
    let world = World::new();
    let (ca, leaf, ca_file) = external_pki(&world);
    let client = ca
        .issue_with(&LeafSpec::workload(
            "example.com",
            "production",
            "order-service",
        ))
        .unwrap();
    let file = |name: &str, pem: &str| {
        let path = world.path(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let (server_cert, server_key) = (
        file("server.pem", leaf.cert_chain_pem()),
        file("server-key.pem", leaf.key_pem()),
    );
    let (cert, key) = (
        file("client.pem", client.cert_chain_pem()),
        file("client-key.pem", client.key_pem()),
    );
    let port = free_port();
    let _server = KillOnDrop(
        std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
            .args(["-cert", &server_cert, "-key", &server_key])
            .args(["-cert2", &server_cert, "-key2", &server_key])
            .args(["-servername", "api.example.com", "-servername_fatal"])
            .args(["-CAfile", &ca_file, "-Verify", "1", "-verify_return_error"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let tls = |sni: &str, client: bool| {
        let files = if client {
            format!(", clientCertificate: {cert}, privateKey: {key}")
        } else {
            String::new()
        };
        format!(
            "    tls: {{mode: MUTUAL, caCertificates: {ca_file}, sni: {sni}, \
             subjectAltNames: [api.example.com]{files}}}\n"
        )
    };
    let mut yaml = String::new();
    for (host, sni, client) in [
        ("api.example.com", "api.example.com", true),
        ("wrong-sni.example.com", "other.example.com", true),
    ] {
        yaml += &format!(
            "{}---\n{}---\n",
            entry(host, "MESH_EXTERNAL", addr, ""),
            rule(host, &tls(sni, client)),
        );
    }
    let (order, outbound) = caller(&world, &yaml).await;
    // s_server may still be starting: the first attempts can be refused.
    let mut answer = Err(String::new());
    for _ in 0..50 {
        answer = send(outbound, "GET", "api.example.com", "/", &[]).await;
        if matches!(&answer, Ok((200, _))) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, page) = answer.unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Client certificate"), "{page}");
    assert!(
        page.contains("spiffe://example.com/ns/production/sa/order-service"),
        "the server verified the sidecar's client certificate: {page}"
    );
    // The server refuses another SNI: the request fails, nothing is sent in plaintext.
    let (status, body) = send(outbound, "GET", "wrong-sni.example.com", "/", &[])
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    order.shutdown();
    order.wait().await;
}

/// A gateway originating TLS with the Secret a DestinationRule's `credentialName` names,
/// from its credentials directory: `MUTUAL` presents the Secret's certificate and trusts
/// its `ca.crt`; a Secret that is missing, or a name that leaves the directory, fails
/// the connection rather than sending plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_originates_tls_with_the_credential_name_secret() {
    let world = World::new();
    let (ca, leaf, _) = external_pki(&world);
    let upstream = TlsUpstream::start(&leaf, Some(&ca)).await;
    let client = ca
        .issue_with(&LeafSpec::workload(
            "example.com",
            "istio-system",
            "ingress",
        ))
        .unwrap();
    let creds = world.path("credentials");
    let secret = creds.join("api-client");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("tls.crt"), client.cert_chain_pem()).unwrap();
    std::fs::write(secret.join("tls.key"), client.key_pem()).unwrap();
    std::fs::write(secret.join("ca.crt"), ca.root_pem()).unwrap();
    // A Secret without a client certificate, for the refusal.
    std::fs::create_dir_all(creds.join("roots-only")).unwrap();
    std::fs::write(creds.join("roots-only/ca.crt"), ca.root_pem()).unwrap();
    let route = |host: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}, namespace: production}}\n\
             spec:\n  hosts: [{host}]\n  gateways: [edge]\n  http:\n  - route:\n    - destination: {{host: {host}}}\n"
        )
    };
    let mut yaml = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: production}\n\
         spec:\n  selector: {istio: ingress}\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n"
        .to_owned();
    for (host, credential) in [
        ("api.example.com", "kubernetes://api-client"),
        ("nocert.example.com", "roots-only"),
        ("missing.example.com", "no-such-secret"),
    ] {
        yaml += &format!(
            "---\n{}---\n{}---\n{}",
            entry(host, "MESH_EXTERNAL", upstream.addr, ""),
            rule(
                host,
                &format!(
                    "    tls: {{mode: MUTUAL, credentialName: \"{credential}\", sni: api.example.com, \
                     subjectAltNames: [api.example.com]}}\n"
                ),
            ),
            route(host),
        );
    }
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let ports = Ports::new();
    let http = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: ingress, labels: {{istio: ingress}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: edge\n  credentialsDir: {creds}\n  ports:\n    80: 127.0.0.1:{http}\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        admin = ports.admin,
        creds = creds.display(),
    );
    let gateway = Proxy::start(&world, "gateway", "gateway", &settings, ports).await;
    let get = |host: &'static str| async move {
        let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
        send(addr, "GET", host, "/", &[]).await.unwrap()
    };
    assert_eq!(get("api.example.com").await, (200, "tls ok".to_owned()));
    assert_eq!(*upstream.client_certs.lock().unwrap(), vec![true]);
    assert_eq!(
        upstream
            .sni
            .lock()
            .unwrap()
            .last()
            .cloned()
            .flatten()
            .as_deref(),
        Some("api.example.com")
    );
    // MUTUAL without the Secret's certificate, and a Secret that does not exist: the
    // connection fails (503), nothing reaches the server in plaintext.
    for host in ["nocert.example.com", "missing.example.com"] {
        let (status, body) = get(host).await;
        assert_eq!(status, 503, "{host}: {body}");
    }
    assert_eq!(upstream.client_certs.lock().unwrap().len(), 1);
    let log = std::fs::read_to_string(&gateway.log).unwrap();
    assert!(log.contains("credential no-such-secret"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_expected_subject_alt_name_is_refused_with_uf() {
    let world = World::new();
    let (_ca, leaf, ca_file) = external_pki(&world);
    let upstream = TlsUpstream::start(&leaf, None).await;
    let yaml = format!(
        "{}---\n{}",
        entry("api.example.com", "MESH_EXTERNAL", upstream.addr, ""),
        rule(
            "api.example.com",
            &format!(
                "    tls: {{mode: SIMPLE, caCertificates: {ca_file}, subjectAltNames: [other.example.com]}}\n"
            ),
        ),
    );
    let (order, outbound) = caller(&world, &yaml).await;
    let (status, body) = send(outbound, "GET", "api.example.com", "/", &[])
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.ends_with("reset reason: connection failure"), "{body}");
    order.shutdown();
    order.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_crl_refuses_a_revoked_server_certificate_and_accepts_a_valid_one() {
    let world = World::new();
    let (ca, revoked, ca_file) = external_pki(&world);
    let valid = ca
        .issue_with(
            &LeafSpec::workload("example.com", "external", "api").with_dns("api.example.com"),
        )
        .unwrap();
    let crl = world.path("external-crl.pem");
    std::fs::write(
        &crl,
        ca.revocation_list_pem(&[revoked.serial()], 1, std::time::Duration::from_secs(3600))
            .unwrap(),
    )
    .unwrap();
    for (leaf, mode, want) in [
        (&revoked, "SIMPLE", 503),
        (&valid, "SIMPLE", 200),
        // With subjectAltNames the name is checked apart; revocation still applies.
        (&revoked, "SIMPLE, subjectAltNames: [api.example.com]", 503),
        (&valid, "SIMPLE, subjectAltNames: [api.example.com]", 200),
    ] {
        let upstream = TlsUpstream::start(leaf, None).await;
        let yaml = format!(
            "{}---\n{}",
            entry("api.example.com", "MESH_EXTERNAL", upstream.addr, ""),
            rule(
                "api.example.com",
                &format!(
                    "    tls: {{mode: {mode}, caCertificates: {ca_file}, caCrl: {crl}}}\n",
                    crl = crl.display()
                ),
            ),
        );
        let (order, outbound) = caller(&world, &yaml).await;
        let (status, body) = send(outbound, "GET", "api.example.com", "/", &[])
            .await
            .unwrap();
        assert_eq!(status, want, "{mode}: {body}");
        if want == 503 {
            assert!(body.ends_with("reset reason: connection failure"), "{body}");
        }
        order.shutdown();
        order.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_opens_one_connection_per_ten_requests() {
    let world = World::new();
    // A plain HTTP/1.1 upstream that counts the connections it accepts.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"ok",
                    ))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    let yaml = format!(
        "{}---\n{}",
        entry("legacy", "MESH_INTERNAL", addr, ""),
        rule(
            "legacy",
            "    connectionPool:\n      http: {maxRequestsPerConnection: 10}\n",
        ),
    );
    let (order, outbound) = caller(&world, &yaml).await;
    let client = Client::new(outbound);
    for i in 0..50 {
        assert_eq!(
            client.request("GET", "legacy", "/", &[]).await,
            Ok((200, "ok".to_owned())),
            "request {i}"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
    order.shutdown();
    order.wait().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_tls_block_replaces_the_rule_tls_block() {
    let world = World::new();
    let legacy = App::start(Behaviour::Ok("plain")).await;
    // The rule says ISTIO_MUTUAL, which a plain server cannot answer; the subset's own
    // tls block replaces it for traffic routed to the subset (DR-03).
    let yaml = format!(
        "{}---\n{}  subsets:\n  - name: plain\n    labels: {{version: v1}}\n    trafficPolicy:\n      tls: {{mode: DISABLE}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: legacy, namespace: production}}\n\
         spec:\n  hosts: [legacy]\n  http:\n  - route:\n    - destination: {{host: legacy, subset: plain}}\n",
        entry(
            "legacy",
            "MESH_INTERNAL",
            legacy.addr,
            "    labels: {version: v1}\n"
        ),
        rule("legacy", "    tls: {mode: ISTIO_MUTUAL}\n"),
    );
    let (order, outbound) = caller(&world, &yaml).await;
    assert_eq!(
        send(outbound, "GET", "legacy", "/", &[]).await,
        Ok((200, "plain".to_owned()))
    );
    order.shutdown();
    order.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_mutual_to_a_server_without_a_sidecar_fails_with_uf() {
    let world = World::new();
    let legacy = App::start(Behaviour::Ok("plain")).await;
    let yaml = format!(
        "{}---\n{}",
        entry("legacy", "MESH_INTERNAL", legacy.addr, ""),
        rule("legacy", "    tls: {mode: ISTIO_MUTUAL}\n"),
    );
    let (order, outbound) = caller(&world, &yaml).await;
    let (status, body) = send(outbound, "GET", "legacy", "/", &[]).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.ends_with("reset reason: connection failure"), "{body}");
    assert_eq!(legacy.hits(), 0);
    order.shutdown();
    order.wait().await;
}
