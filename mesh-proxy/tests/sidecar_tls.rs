//! The application's own TLS through the sidecar, with the real binary: curl verifies
//! `openssl s_server`'s certificate through a TCP egress listener, the connection routed
//! by the SNI of its ClientHello with VirtualService `tls` routes (`sniHosts`, port) and
//! passed through untouched, to two different upstreams; on a `tls` port and on a port
//! of no declared protocol (TLS detected from the first bytes).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::*;

/// A CA (its PEM file) and, per name, a certificate and key file signed by it.
fn pki(world: &World, names: &[&str]) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "external CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let ca_file = world.path("external-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let leaves = names
        .iter()
        .map(|name| {
            let key = KeyPair::generate().unwrap();
            let mut leaf = CertificateParams::new(vec![(*name).to_owned()]).unwrap();
            leaf.distinguished_name
                .push(rcgen::DnType::CommonName, *name);
            let leaf = leaf.signed_by(&key, &issuer).unwrap();
            let (cert, key_file) = (
                world.path(&format!("{name}.crt")),
                world.path(&format!("{name}.key")),
            );
            std::fs::write(&cert, leaf.pem()).unwrap();
            std::fs::write(&key_file, key.serialize_pem()).unwrap();
            (cert, key_file)
        })
        .collect();
    (ca_file, leaves)
}

/// `openssl s_server -www` on `port` with `cert`: its status page names the server.
fn s_server(port: u16, cert: &Path, key: &Path) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(port.to_string())
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `api.example.com` (port 443 declared `tls`, or `web` with no protocol) and two
/// backends, `blue` and `green`, each an `openssl s_server` of its own; the
/// VirtualService sends SNI `blue.example.com` to blue and `green.example.com` to green.
fn mesh(port_decl: &str, blue: u16, green: u16) -> String {
    let backend = |name: &str, port: u16| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: production}}
spec:
  hosts: [{name}.backend]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 8443, name: tls, protocol: TLS}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{tls: {port}}}}}
---
"
        )
    };
    format!(
        "{blue}{green}apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: production}}
spec:
  hosts: [api.example.com, blue.example.com, green.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {port_decl}
  endpoints:
  - {{address: 127.0.0.1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: by-sni, namespace: production}}
spec:
  hosts: [api.example.com, blue.example.com, green.example.com]
  tls:
  - match:
    - port: 443
      sniHosts: [blue.example.com]
    route:
    - destination: {{host: blue.backend, port: {{number: 8443}}}}
  - match:
    - port: 443
      sniHosts: [green.example.com]
    route:
    - destination: {{host: green.backend, port: {{number: 8443}}}}
",
        blue = backend("blue", blue),
        green = backend("green", green),
    )
}

/// curl to `https://<name>:<port>/` through the listener on `port`, trusting only `ca`.
async fn fetch(name: &str, port: u16, ca: &Path) -> (i32, String, String) {
    let resolve = format!("{name}:{port}:127.0.0.1");
    let url = format!("https://{name}:{port}/");
    let ca = ca.display().to_string();
    let mut answer = (0, String::new(), String::new());
    // openssl s_server may still be starting.
    for _ in 0..50 {
        answer = curl(&["--cacert", &ca, "--resolve", &resolve, "-sS", &url]).await;
        if answer.0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    answer
}

async fn sni_routes_to_two_upstreams(port_decl: &str) {
    if !tool_available("openssl") || !tool_available("curl") {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl or curl is missing"
        );
        eprintln!("SKIPPED: openssl or curl is missing");
        return;
    }
    let world = World::new();
    let (ca, leaves) = pki(&world, &["blue.example.com", "green.example.com"]);
    let (blue_port, green_port) = (free_port(), free_port());
    let _blue = s_server(blue_port, &leaves[0].0, &leaves[0].1);
    let _green = s_server(green_port, &leaves[1].0, &leaves[1].1);
    let config = world.write_config(
        "istio",
        "mesh.yaml",
        &mesh(port_decl, blue_port, green_port),
    );
    let ports = Ports::new();
    let listener = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: order-service, labels: {{app: order-service}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca_dir}}}\n\
         listeners:\n  inbound: 127.0.0.1:{i}\n  outbound: 127.0.0.1:{o}\n  admin: 127.0.0.1:{a}\n  app: 127.0.0.1:9\n\
         \x20 tcp:\n    127.0.0.1:{listener}: api.example.com:443\n\
         limits: {{drainTimeout: 1s}}\n",
        config = config.display(),
        ca_dir = world.ca_dir.display(),
        i = ports.inbound,
        o = ports.outbound,
        a = ports.admin,
    );
    let proxy = Proxy::start(&world, "sidecar", "order-service", &settings, ports).await;

    // Each name reaches the server holding its certificate: curl verifies it end to end,
    // so the sidecar neither terminated the TLS nor sent it to the other server.
    for name in ["blue.example.com", "green.example.com"] {
        let (code, out, err) = fetch(name, listener, &ca).await;
        assert_eq!(code, 0, "{name}: {err}\n{}", proxy.output());
        assert!(out.contains("s_server"), "{out}");
    }
    // An SNI no route takes (and no service answers) is closed.
    let (code, _, _) = curl(&[
        "--cacert",
        &ca.display().to_string(),
        "--resolve",
        &format!("other.example.com:{listener}:127.0.0.1"),
        "-sS",
        "--max-time",
        "5",
        &format!("https://other.example.com:{listener}/"),
    ])
    .await;
    assert_ne!(code, 0);

    // The passed-through connections are counted as TCP, per upstream.
    let text = proxy
        .metrics_when(|t| {
            ["blue", "green"].iter().all(|b| {
                t.lines().any(|l| {
                    l.starts_with("istio_tcp_connections_closed_total{")
                        && l.contains(&format!("destination_service=\"{b}.backend\""))
                })
            })
        })
        .await;
    for backend in ["blue", "green"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_tcp_received_bytes_total{")
                    && l.contains(&format!("destination_service=\"{backend}.backend\""))
                    && !l.ends_with(" 0")),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_routes_by_sni_to_two_upstreams_without_terminating() {
    sni_routes_to_two_upstreams("{number: 443, name: tls, protocol: TLS}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detected_tls_on_an_undeclared_port_routes_by_sni() {
    sni_routes_to_two_upstreams("{number: 443, name: web}").await;
}
