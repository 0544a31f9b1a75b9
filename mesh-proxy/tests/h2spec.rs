//! HTTP/2 conformance of every listener, checked by a real conformance peer: h2spec
//! (RFC 9113 and RFC 7541 cases) against the sidecar's outbound listener (h2c), its
//! inbound listener in PERMISSIVE mode (h2c, and mTLS), and the gateway (a TLS server
//! with a credential, and a plain h2c server).
//!
//! h2spec cannot present a client certificate, which the inbound listener requires of
//! every TLS client (STRICT and PERMISSIVE alike): for that run h2spec talks to a relay
//! in this test that opens an mTLS connection (a mesh SVID, ALPN `h2`) to the inbound
//! listener for each of h2spec's connections and passes the bytes through unchanged.
//!
//! h2spec is built from its Go module by `.ci/peers`, which this test runs when the
//! peer cache has no h2spec yet; where Go is missing the test fails under `CI` and says
//! it skipped elsewhere.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

/// Cases that fail today, and why; `always` when the case fails on every run. A case
/// failing outside this list fails the test, and so does an `always` case that starts to
/// pass (the list must then shrink).
///
/// Empty: every case passes on every listener. `http2/3.5` (an invalid preface) is
/// answered with GOAWAY by the listeners' opening check (`serve`), and `http2/8.1.2.1`
/// (a trailer block with a pseudo-header field, sent without END_STREAM) is reset by h2
/// for the missing END_STREAM. With END_STREAM the pinned h2 resets it too, with
/// `PROTOCOL_ERROR` (h2_strict.rs; `third_party/h2/PATCHES.md`).
const KNOWN_FAILURES: &[(&str, &str, bool, &str)] = &[];

/// The `(section, case)` pairs that failed in an h2spec JUnit report, or were skipped
/// (every case is meant to run).
fn failures(junit: &str) -> Vec<(String, String)> {
    let doc = roxmltree::Document::parse(junit).expect("a JUnit report");
    doc.descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .filter(|case| {
            case.children().any(|c| {
                ["failure", "error", "skipped"]
                    .iter()
                    .any(|t| c.has_tag_name(*t))
            })
        })
        .map(|case| {
            let attr = |name| case.attribute(name).unwrap_or("").to_owned();
            (attr("package"), attr("classname"))
        })
        .collect()
}

/// Runs h2spec against `port` with `:authority` `localhost:<port>` (over TLS, without
/// verifying the server, when `tls`); its failures.
async fn run(
    h2spec: &std::path::Path,
    world: &World,
    name: &str,
    port: u16,
    tls: bool,
) -> Vec<(String, String)> {
    let report = world.path(&format!("{name}-h2spec.xml"));
    let mut cmd = tokio::process::Command::new(h2spec);
    cmd.args(["-h", "localhost", "-p", &port.to_string(), "-o", "5", "-j"])
        .arg(&report);
    if tls {
        cmd.args(["-t", "-k"]);
    }
    let out = cmd.output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("tests,"))
        .unwrap_or("no summary");
    println!("{name}: {summary}");
    failures(&std::fs::read_to_string(&report).unwrap_or_default())
}

/// Checks one listener's h2spec failures against [`KNOWN_FAILURES`].
fn check(name: &str, failed: &[(String, String)], output: &str) {
    let unexpected: Vec<_> = failed
        .iter()
        .filter(|(s, c)| {
            !KNOWN_FAILURES
                .iter()
                .any(|(ks, kc, _, _)| s == ks && c == kc)
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "{name}: h2spec cases failed: {unexpected:#?}\n{output}"
    );
    for (section, case, _, why) in KNOWN_FAILURES.iter().filter(|k| k.2) {
        assert!(
            failed.iter().any(|(s, c)| s == section && c == case),
            "{name}: {section} \"{case}\" passes now ({why}): remove it from the known failures"
        );
    }
}

/// A plaintext port whose every connection is relayed over mTLS (order-service's SVID,
/// ALPN `h2`) to the inbound listener at `inbound` of the order-service sidecar.
async fn mtls_relay(world: &World, inbound: std::net::SocketAddr) -> (u16, KillTask) {
    use mesh_tls::{CertStore, CertificateAuthority, ClientTls, SecureNaming};
    let ca = CertificateAuthority::load_dir(&world.ca_dir).unwrap();
    let svid = ca.issue("production", "h2spec").unwrap();
    let client = ClientTls::new(CertStore::from_issued(&svid).unwrap());
    let naming = SecureNaming::only(
        mesh_core::Identity::parse("spiffe://cluster.local/ns/production/sa/order-service")
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut plain, _)) = listener.accept().await {
            let client = client.clone();
            let naming = naming.clone();
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
                let name = rustls_pki_types::ServerName::try_from("order-service").unwrap();
                let Ok((mut tls, _)) = client.connect_to(tcp, name, &naming, &[b"h2"]).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut plain, &mut tls).await;
            });
        }
    });
    (port, KillTask(task))
}

/// Aborts a task when dropped.
struct KillTask(tokio::task::JoinHandle<()>);

impl Drop for KillTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A gateway routing every host to `backend`, with an HTTPS server (a credential for
/// `localhost`) and a plain HTTP server; the gateway and the two ports.
async fn gateway(world: &World, backend: std::net::SocketAddr) -> (Proxy, u16, u16) {
    let ca = mesh_tls::CertificateAuthority::new("cluster.local").unwrap();
    let mut spec =
        mesh_tls::LeafSpec::workload("cluster.local", "edge", "gateway").with_dns("localhost");
    spec.uri_sans.clear();
    let server = ca.issue_with(&spec).unwrap();
    let creds = world.path("credentials");
    let secret = creds.join("edge-cert");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("tls.crt"), server.cert_chain_pem()).unwrap();
    std::fs::write(secret.join("tls.key"), server.key_pem()).unwrap();
    let (https, http) = (free_port(), free_port());
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: production}}
spec:
  hosts: [backend]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 8080, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {app}}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: production}}
spec:
  selector: {{istio: ingress}}
  servers:
  - port: {{number: {https}, name: https, protocol: HTTPS}}
    hosts: [\"*\"]
    tls: {{mode: SIMPLE, credentialName: edge-cert}}
  - port: {{number: {http}, name: http, protocol: HTTP}}
    hosts: [\"*\"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: edge, namespace: production}}
spec:
  hosts: [\"*\"]
  gateways: [edge]
  http:
  - route:
    - destination: {{host: backend, port: {{number: 8080}}}}
",
        app = backend.port(),
    );
    let dir = world.path("gateway-config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mesh.yaml"), yaml).unwrap();
    let ports = Ports::new();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: istio-ingressgateway, \
         labels: {{istio: ingress}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: edge\n  credentialsDir: {creds}\n  ports:\n\
         \x20   {https}: 127.0.0.1:{https}\n    {http}: 127.0.0.1:{http}\n",
        config = dir.display(),
        ca = world.ca_dir.display(),
        admin = ports.admin,
        creds = creds.display(),
    );
    let gw = Proxy::start(world, "gateway", "gateway", &settings, ports).await;
    (gw, https, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_passes_h2spec_but_for_the_known_cases() {
    let Some(h2spec) = peers::peer("h2spec") else {
        return;
    };
    let world = World::new();
    // A body long enough for the flow-control cases (6.9.2 wants at least 5 bytes).
    let app = App::start(Behaviour::Ok(
        "the application's answer, long enough for the flow-control cases",
    ))
    .await;
    let ports = Ports::new();
    // h2spec's requests name `localhost:<outbound port>`: a service of the mesh whose one
    // endpoint, without a sidecar, is the application, so every case goes through the
    // whole outbound stack to an application that reads the request before answering.
    // No PeerAuthentication: the inbound listener is PERMISSIVE and takes h2c too.
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: localhost, namespace: production}}
spec:
  hosts: [localhost]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: {outbound}, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {app}}}}}
",
        outbound = ports.outbound,
        app = app.addr.port(),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let proxy = start_sidecar(&world, "order-service", &config, ports, app.addr).await;
    let inbound = std::net::SocketAddr::from(([127, 0, 0, 1], ports.inbound));
    let (relay, _relay) = mtls_relay(&world, inbound).await;
    for (name, port) in [
        ("outbound", ports.outbound),
        ("inbound", ports.inbound),
        ("inbound-mtls", relay),
    ] {
        let failed = run(&h2spec, &world, name, port, false).await;
        check(name, &failed, &proxy.output());
    }
    let (gw, https, http) = gateway(&world, app.addr).await;
    for (name, port, tls) in [("gateway-tls", https, true), ("gateway-h2c", http, false)] {
        let failed = run(&h2spec, &world, name, port, tls).await;
        check(name, &failed, &gw.output());
    }
}
