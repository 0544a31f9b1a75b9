//! curl and openssl against the inbound accept path, as an operator would try it.
//!
//! curl checks the server's hostname against its DNS SANs and knows nothing of SPIFFE
//! URI SANs, so the server certificates here carry a DNS SAN (`payment.mesh.test`) next
//! to their SPIFFE ID, and curl is pointed at 127.0.0.1 with `--resolve`. That keeps
//! full server verification on (`--cacert`, no `-k`).

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Output;

use mesh_tls::{AcceptError, CertStore, CertificateAuthority, LeafSpec, PeerAuthMode};
use support::*;
use tokio::process::Command;

const HOST: &str = "payment.mesh.test";

struct Setup {
    server: TestServer,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new(mode: PeerAuthMode) -> Self {
        let ca = CertificateAuthority::new(TD).unwrap();
        let server_svid = ca
            .issue_with(&LeafSpec::workload(TD, "prod", "payment").with_dns(HOST))
            .unwrap();
        let server = start_server(CertStore::from_issued(&server_svid).unwrap(), mode).await;
        let dir = tempfile::tempdir().unwrap();
        ca.issue("prod", "orders")
            .unwrap()
            .write_dir(dir.path())
            .unwrap();
        Self { server, dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn https_url(&self) -> String {
        format!("https://{HOST}:{}/", self.server.addr.port())
    }

    fn resolve(&self) -> String {
        format!("{HOST}:{}:127.0.0.1", self.server.addr.port())
    }

    async fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10"])
            .args(args)
            .output()
            .await
            .expect("curl is installed")
    }

    async fn curl_mtls(&self) -> Output {
        let (cert, key, ca) = (
            self.file("cert-chain.pem"),
            self.file("key.pem"),
            self.file("root-cert.pem"),
        );
        self.curl(&[
            "--cert",
            &cert,
            "--key",
            &key,
            "--cacert",
            &ca,
            "--resolve",
            &self.resolve(),
            &self.https_url(),
        ])
        .await
    }

    async fn curl_plain(&self) -> Output {
        self.curl(&[&format!("http://127.0.0.1:{}/", self.server.addr.port())])
            .await
    }

    async fn s_client(&self, with_cert: bool) -> Output {
        let mut cmd = Command::new("openssl");
        cmd.arg("s_client")
            .args([
                "-connect",
                &format!("127.0.0.1:{}", self.server.addr.port()),
            ])
            .args(["-servername", HOST, "-verify_return_error"])
            .args(["-CAfile", &self.file("root-cert.pem")]);
        if with_cert {
            cmd.args(["-cert", &self.file("cert-chain.pem")])
                .args(["-key", &self.file("key.pem")]);
        }
        // Send one request so that, with TLS 1.3, the server's verdict on the client
        // certificate (sent after the client's Finished) is read back.
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("openssl is installed");
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().unwrap();
            let req = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
            stdin.write_all(req.as_bytes()).await.unwrap();
            // Dropping stdin would make s_client close at once; keep it open until exit.
            let out =
                tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output())
                    .await
                    .expect("openssl s_client exits")
                    .unwrap();
            drop(stdin);
            out
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn curl_with_client_certificate_passes_strict() {
    let s = Setup::new(PeerAuthMode::Strict).await;
    let out = s.curl_mtls().await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "peer=spiffe://cluster.local/ns/prod/sa/orders;security=mutual_tls"
    );
}

#[tokio::test]
async fn plain_curl_is_refused_by_strict() {
    let mut s = Setup::new(PeerAuthMode::Strict).await;
    let out = s.curl_plain().await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(matches!(
        s.server.next_error().await,
        AcceptError::PlaintextRefused
    ));
}

#[tokio::test]
async fn curl_over_tls_without_client_certificate_is_refused() {
    let mut s = Setup::new(PeerAuthMode::Strict).await;
    let ca = s.file("root-cert.pem");
    let out = s
        .curl(&["--cacert", &ca, "--resolve", &s.resolve(), &s.https_url()])
        .await;
    assert!(!out.status.success(), "{}", text(&out));
    let err = s.server.next_error().await;
    assert!(err.to_string().contains("no certificates"), "{err}");
}

#[tokio::test]
async fn openssl_s_client_without_certificate_fails() {
    let mut s = Setup::new(PeerAuthMode::Strict).await;
    let out = s.s_client(false).await;
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(!all.contains("peer="), "{all}");
    // TLS 1.3: the server's `certificate_required` alert (116) reaches s_client.
    assert!(all.contains("alert certificate required"), "{all}");
    let err = s.server.next_error().await;
    assert!(err.to_string().contains("no certificates"), "{err}");
}

#[tokio::test]
async fn openssl_s_client_with_certificate_is_served() {
    let s = Setup::new(PeerAuthMode::Strict).await;
    let out = s.s_client(true).await;
    let all = text(&out);
    assert!(all.contains("Verify return code: 0 (ok)"), "{all}");
    assert!(
        all.contains("peer=spiffe://cluster.local/ns/prod/sa/orders;security=mutual_tls"),
        "{all}"
    );
}

#[tokio::test]
async fn permissive_serves_mtls_and_plaintext() {
    let s = Setup::new(PeerAuthMode::Permissive).await;
    let tls = s.curl_mtls().await;
    assert!(tls.status.success(), "{}", text(&tls));
    assert_eq!(
        String::from_utf8_lossy(&tls.stdout),
        "peer=spiffe://cluster.local/ns/prod/sa/orders;security=mutual_tls"
    );
    let plain = s.curl_plain().await;
    assert!(plain.status.success(), "{}", text(&plain));
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        "peer=-;security=none"
    );
}

#[tokio::test]
async fn permissive_still_refuses_tls_without_client_certificate() {
    let mut s = Setup::new(PeerAuthMode::Permissive).await;
    let ca = s.file("root-cert.pem");
    let out = s
        .curl(&["--cacert", &ca, "--resolve", &s.resolve(), &s.https_url()])
        .await;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(matches!(
        s.server.next_error().await,
        AcceptError::Handshake(_)
    ));
}

#[tokio::test]
async fn disable_serves_plaintext_only() {
    let s = Setup::new(PeerAuthMode::Disable).await;
    let plain = s.curl_plain().await;
    assert!(plain.status.success(), "{}", text(&plain));
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        "peer=-;security=none"
    );
    let tls = s.curl_mtls().await;
    assert!(!tls.status.success(), "{}", text(&tls));
}

#[tokio::test]
async fn port_level_mtls_decides_per_connection() {
    use mesh_tls::{MtlsMode, PeerAuthentication, PeerAuthenticationPolicy};
    use std::sync::Arc;

    let ca = CertificateAuthority::new(TD).unwrap();
    let store = support::store(&ca, "prod", "payment");
    let strict_port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = open_port.local_addr().unwrap().port();
    // Mesh-wide STRICT; the payment workload opens one port for plaintext health checks.
    let labels: mesh_core::Labels = [("app".to_owned(), "payment".to_owned())].into();
    let compiled = PeerAuthentication::compile(
        "istio-system",
        vec![
            PeerAuthenticationPolicy::new("istio-system", "default", MtlsMode::Strict),
            PeerAuthenticationPolicy::new("prod", "payment", MtlsMode::Unset)
                .with_selector(labels.clone())
                .with_port(open, MtlsMode::Disable),
        ],
    );
    let policy = Arc::new(compiled.for_workload("prod", &labels));
    let mut strict = start_server_on(strict_port, store.clone(), policy.clone());
    let open_server = start_server_on(open_port, store, policy);

    let plain = |port: u16| async move {
        Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .await
            .unwrap()
    };
    let refused = plain(strict.addr.port()).await;
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(matches!(
        strict.next_error().await,
        AcceptError::PlaintextRefused
    ));
    let served = plain(open_server.addr.port()).await;
    assert!(served.status.success(), "{}", text(&served));
    assert_eq!(
        String::from_utf8_lossy(&served.stdout),
        "peer=-;security=none"
    );
}
