//! Gateway server `tls` fields through the real `mesh-proxy gateway` and the clients a
//! user has (curl, `openssl s_client`): certificates from file paths, `caCrl` (a file
//! and a Secret's `ca.crl`), `verifyCertificateSpki`/`verifyCertificateHash`,
//! `subjectAltNames`, `cipherSuites`, `maxProtocolVersion`, `bind`, and
//! `credentialNames` with an RSA and an ECDSA Secret. Pins are computed with openssl
//! the way Envoy's documentation shows.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_tls::{CertificateAuthority, IssuedSvid, LeafSpec};
use support::*;

const HOST: &str = "edge.example.com";

/// The named servers of the test Gateway, each on its own port.
const SERVERS: &[&str] = &[
    "files",
    "crl-files",
    "crl-secret",
    "spki",
    "hash",
    "san",
    "ciphers",
    "tls12",
    "bind",
    "dual",
];

/// Runs `sh -c script`; its trimmed stdout.
fn sh(script: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// A client certificate and key written as `<name>.crt` / `<name>.key`.
struct ClientCert {
    issued: IssuedSvid,
    cert: String,
    key: String,
}

impl ClientCert {
    fn new(world: &World, ca: &CertificateAuthority, name: &str, dns: Option<&str>) -> Self {
        let mut spec = LeafSpec::workload("cluster.local", "partners", name);
        if let Some(dns) = dns {
            spec = spec.with_dns(dns);
        }
        let issued = ca.issue_with(&spec).unwrap();
        Self {
            cert: write(&world.path(&format!("{name}.crt")), issued.cert_chain_pem()),
            key: write(&world.path(&format!("{name}.key")), issued.key_pem()),
            issued,
        }
    }
}

/// The gateway with every server of [`SERVERS`], one backend behind it.
struct TlsEdge {
    world: World,
    app: App,
    _sidecar: Proxy,
    gateway: Proxy,
    /// Listening port per server name.
    ports: Vec<(&'static str, u16)>,
    ca: String,
    good: ClientCert,
    revoked: ClientCert,
    other: ClientCert,
    config: PathBuf,
    yaml: String,
}

impl TlsEdge {
    async fn start() -> Self {
        let world = World::new();
        let ca = CertificateAuthority::new("cluster.local").unwrap();
        let ca_file = write(&world.path("files/ca.crt"), ca.root_pem());
        // The server's certificate (ECDSA P-256) for HOST, as files and as Secrets.
        let mut spec = LeafSpec::workload("cluster.local", "edge", "gateway").with_dns(HOST);
        spec.uri_sans.clear();
        let server = ca.issue_with(&spec).unwrap();
        let server_crt = write(&world.path("files/server.crt"), server.cert_chain_pem());
        let server_key = write(&world.path("files/server.key"), server.key_pem());
        // Clients: `good` carries the SAN `partner.example.com`, `revoked` too but its
        // serial is on the CRL, `other` chains to the same CA without the SAN.
        let good = ClientCert::new(&world, &ca, "good", Some("partner.example.com"));
        let revoked = ClientCert::new(&world, &ca, "revoked", Some("partner.example.com"));
        let other = ClientCert::new(&world, &ca, "other", None);
        let crl = ca
            .revocation_list_pem(&[revoked.issued.serial()], 1, Duration::from_secs(3600))
            .unwrap();
        let crl_file = write(&world.path("files/crl.pem"), &crl);
        let creds = world.path("credentials");
        let secret = creds.join("edge-crl");
        write(&secret.join("tls.crt"), server.cert_chain_pem());
        write(&secret.join("tls.key"), server.key_pem());
        write(&secret.join("ca.crt"), ca.root_pem());
        write(&secret.join("ca.crl"), &crl);
        // An RSA and an ECDSA Secret, made with openssl as an operator would.
        for (name, alg) in [
            ("edge-rsa", "-newkey rsa:2048"),
            ("edge-ecdsa", "-newkey ec -pkeyopt ec_paramgen_curve:P-256"),
        ] {
            let dir = creds.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            sh(&format!(
                "openssl req -x509 {alg} -nodes -days 1 -subj /CN={HOST} \
                 -addext subjectAltName=DNS:{HOST} -keyout {d}/tls.key -out {d}/tls.crt 2>/dev/null",
                d = dir.display()
            ));
        }
        // Pins of `good`: SPKI and certificate fingerprint, as Envoy's docs compute them.
        let spki = sh(&format!(
            "openssl x509 -in {} -noout -pubkey | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | openssl enc -base64",
            good.cert
        ));
        let fingerprint = sh(&format!(
            "openssl x509 -in {} -noout -fingerprint -sha256",
            good.cert
        ));
        let hash = fingerprint.rsplit('=').next().unwrap().to_owned();

        let app = App::start(Behaviour::Ok("edge")).await;
        let app_ports = Ports::new();
        let ports: Vec<(&'static str, u16)> = SERVERS.iter().map(|s| (*s, free_port())).collect();
        let port = |name: &str| ports.iter().find(|(n, _)| *n == name).unwrap().1;
        let files = format!("serverCertificate: {server_crt}, privateKey: {server_key}");
        let mutual = format!("mode: MUTUAL, {files}, caCertificates: {ca_file}");
        let tls: Vec<(&str, String)> = vec![
            ("files", format!("mode: SIMPLE, {files}")),
            ("crl-files", format!("{mutual}, caCrl: {crl_file}")),
            (
                "crl-secret",
                "mode: MUTUAL, credentialName: edge-crl".to_owned(),
            ),
            (
                "spki",
                format!("{mutual}, verifyCertificateSpki: [\"{spki}\"]"),
            ),
            (
                "hash",
                format!("{mutual}, verifyCertificateHash: [\"{hash}\"]"),
            ),
            (
                "san",
                format!("{mutual}, subjectAltNames: [partner.example.com]"),
            ),
            (
                "ciphers",
                format!(
                    "mode: SIMPLE, {files}, cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256, NO-SUCH-SUITE]"
                ),
            ),
            (
                "tls12",
                format!("mode: SIMPLE, {files}, maxProtocolVersion: TLSV1_2"),
            ),
            ("bind", format!("mode: SIMPLE, {files}")),
            (
                "dual",
                "mode: SIMPLE, credentialNames: [edge-rsa, edge-ecdsa]".to_owned(),
            ),
        ];
        let servers: String = tls
            .iter()
            .map(|(name, tls)| {
                let bind = if *name == "bind" {
                    "    bind: 127.0.0.1\n"
                } else {
                    ""
                };
                format!(
                    "  - name: {name}\n    port: {{number: {p}, name: https-{name}, protocol: HTTPS}}\n\
                     {bind}    hosts: [{HOST}]\n    tls: {{{tls}}}\n",
                    p = port(name)
                )
            })
            .collect();
        let yaml = format!(
            "{}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: edge}}\n\
             spec:\n  selector: {{istio: ingress}}\n  servers:\n{servers}---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: edge}}\n\
             spec:\n  hosts: [{HOST}]\n  gateways: [edge]\n  http:\n  - route:\n    \
             - destination: {{host: edge-service, port: {{number: 8080}}}}\n",
            service_entry(
                "edge-service",
                8080,
                &[(app_ports.inbound, "v1", "edge-service")]
            ),
        );
        let config = world.write_config("istio", "mesh.yaml", &yaml);
        let sidecar = start_sidecar(&world, "edge-service", &config, app_ports, app.addr).await;
        // Every port but `bind`'s is placed by the settings; `bind` listens where the
        // Gateway says.
        let listen: String = ports
            .iter()
            .filter(|(n, _)| *n != "bind")
            .map(|(_, p)| format!("    {p}: 127.0.0.1:{p}\n"))
            .collect();
        let gw_ports = Ports::new();
        let settings = format!(
            "workload: {{namespace: production, serviceAccount: istio-ingressgateway, labels: {{istio: ingress}}}}\n\
             configDir: {config}\nsvid: {{caDir: {ca}}}\n\
             listeners: {{admin: 127.0.0.1:{admin}}}\n\
             gateway:\n  name: edge\n  credentialsDir: {creds}\n  ports:\n{listen}",
            config = config.display(),
            ca = world.ca_dir.display(),
            admin = gw_ports.admin,
            creds = creds.display(),
        );
        let gateway = Proxy::start(&world, "gateway", "gateway", &settings, gw_ports).await;
        Self {
            world,
            app,
            _sidecar: sidecar,
            gateway,
            ports,
            ca: ca_file,
            good,
            revoked,
            other,
            config,
            yaml,
        }
    }

    fn port(&self, server: &str) -> u16 {
        self.ports.iter().find(|(n, _)| *n == server).unwrap().1
    }

    /// curl to `server` with `extra` arguments: (exit code, body and status).
    async fn curl(&self, server: &str, extra: &[&str]) -> (i32, String, String) {
        let port = self.port(server);
        let resolve = format!("{HOST}:{port}:127.0.0.1");
        let url = format!("https://{HOST}:{port}/");
        let mut args = vec![
            "--cacert",
            &self.ca,
            "--resolve",
            &resolve,
            "-w",
            " %{http_code}",
        ];
        args.extend(extra);
        args.push(&url);
        curl(&args).await
    }

    /// curl to `server` presenting `client`.
    async fn curl_as(&self, server: &str, client: &ClientCert) -> (i32, String, String) {
        self.curl(server, &["--cert", &client.cert, "--key", &client.key])
            .await
    }

    /// `openssl s_client` to `server` with `extra` arguments, sending a GET.
    async fn s_client(&self, server: &str, extra: &[&str]) -> (i32, String, String) {
        let addr = format!("127.0.0.1:{}", self.port(server));
        let mut args = vec![
            "s_client",
            "-connect",
            &addr,
            "-servername",
            HOST,
            "-CAfile",
            &self.ca,
            "-ign_eof",
        ];
        args.extend(extra);
        openssl(
            &args,
            format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
    }
}

fn tools() -> bool {
    tool_available("curl") && tool_available("openssl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_lists_pins_and_names_decide_which_clients_get_in() {
    if !tools() {
        return;
    }
    let edge = TlsEdge::start().await;
    // Certificates from file paths serve SIMPLE.
    let (code, out, err) = edge.curl("files", &[]).await;
    assert_eq!((code, out.as_str()), (0, "edge 200"), "{err}");

    // caCrl, from a file and from the Secret's `ca.crl`: the revoked client is refused,
    // the good one and one without the SAN (not revoked) get in.
    for server in ["crl-files", "crl-secret"] {
        let (code, out, err) = edge.curl_as(server, &edge.good).await;
        assert_eq!((code, out.as_str()), (0, "edge 200"), "{server}: {err}");
        let (code, out, err) = edge.curl_as(server, &edge.other).await;
        assert_eq!((code, out.as_str()), (0, "edge 200"), "{server}: {err}");
        let (code, out, _) = edge.curl_as(server, &edge.revoked).await;
        assert_ne!(code, 0, "{server} served a revoked client: {out}");
    }
    // Pins: the pinned client gets in; another client of the same CA does not.
    for server in ["spki", "hash"] {
        let (code, out, err) = edge.curl_as(server, &edge.good).await;
        assert_eq!((code, out.as_str()), (0, "edge 200"), "{server}: {err}");
        let (code, out, _) = edge.curl_as(server, &edge.other).await;
        assert_ne!(code, 0, "{server} served an unpinned client: {out}");
        let (code, _, _) = edge.curl(server, &[]).await;
        assert_ne!(code, 0, "{server} served a client without a certificate");
    }
    // subjectAltNames: a client of the same CA without the SAN is refused.
    let (code, out, err) = edge.curl_as("san", &edge.good).await;
    assert_eq!((code, out.as_str()), (0, "edge 200"), "{err}");
    let (code, out, _) = edge.curl_as("san", &edge.other).await;
    assert_ne!(code, 0, "a client without the SAN was served: {out}");
    // 1 + 2×2 + 2 + 1 requests reached the application, no refused one did.
    assert_eq!(edge.app.hits(), 8, "{}", edge.gateway.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suites_and_the_maximum_version_restrict_handshakes() {
    if !tools() {
        return;
    }
    let edge = TlsEdge::start().await;
    // A listed TLS 1.2 suite is negotiated; an unlisted one the server would otherwise
    // accept is refused.
    let (_, out, err) = edge
        .s_client(
            "ciphers",
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
        )
        .await;
    assert!(out.contains("HTTP/1.1 200 "), "{out}\n{err}");
    assert!(
        out.contains("Cipher is ECDHE-ECDSA-AES128-GCM-SHA256"),
        "{out}"
    );
    for unlisted in [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ] {
        let (code, out, _) = edge
            .s_client("ciphers", &["-tls1_2", "-cipher", unlisted])
            .await;
        assert!(code != 0 && !out.contains("HTTP/1.1"), "{unlisted}: {out}");
        // The same suite is served where cipherSuites is not set.
        let (_, out, err) = edge
            .s_client("files", &["-tls1_2", "-cipher", unlisted])
            .await;
        assert!(out.contains("HTTP/1.1 200 "), "{unlisted}: {out}\n{err}");
    }
    // TLS 1.3 suites are not restricted.
    let (_, out, err) = edge.s_client("ciphers", &["-tls1_3"]).await;
    assert!(out.contains("HTTP/1.1 200 "), "{out}\n{err}");
    // The unknown name is reported, naming the server and the field.
    let log = edge.gateway.output();
    assert!(
        log.lines().any(|l| l.contains("NO-SUCH-SUITE")
            && l.contains("tls.cipherSuites")
            && l.contains("Gateway production/edge servers[6] (ciphers)")),
        "{log}"
    );

    // maxProtocolVersion TLSV1_2: a TLS 1.3-only client is refused, TLS 1.2 served.
    let (code, out, _) = edge.s_client("tls12", &["-tls1_3"]).await;
    assert!(code != 0 && !out.contains("HTTP/1.1"), "{out}");
    let (code, _, _) = edge.curl("tls12", &["--tlsv1.3"]).await;
    assert_ne!(code, 0, "curl with TLS 1.3 minimum was served");
    let (_, out, err) = edge.s_client("tls12", &["-tls1_2"]).await;
    assert!(out.contains("Protocol  : TLSv1.2"), "{out}\n{err}");
    assert!(out.contains("HTTP/1.1 200 "), "{out}\n{err}");
    let (code, out, err) = edge.curl("tls12", &[]).await;
    assert_eq!((code, out.as_str()), (0, "edge 200"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_is_the_listen_address_and_credential_names_serve_by_key_type() {
    if !tools() {
        return;
    }
    let edge = TlsEdge::start().await;
    // `bind: 127.0.0.1` and no `gateway.ports` entry: served on 127.0.0.1 only (a
    // wildcard listener would also accept on 127.0.0.2).
    let (code, out, err) = edge.curl("bind", &[]).await;
    assert_eq!((code, out.as_str()), (0, "edge 200"), "{err}");
    let port = edge.port("bind");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.2", port))
            .await
            .is_err(),
        "the bind server accepts on 127.0.0.2"
    );

    // credentialNames [RSA, ECDSA]: ECDSA for a client that accepts it, RSA for one
    // that only verifies RSA signatures, in TLS 1.3 and 1.2.
    for (version, rsa_sigalgs) in [
        ("-tls1_3", "rsa_pss_rsae_sha256"),
        ("-tls1_2", "RSA+SHA256"),
    ] {
        let (_, out, err) = edge.s_client("dual", &[version]).await;
        assert!(out.contains("HTTP/1.1 200 "), "{version}: {out}\n{err}");
        assert!(
            out.contains("Server public key is 256 bit"),
            "{version}: {out}"
        );
        let (_, out, err) = edge
            .s_client("dual", &[version, "-sigalgs", rsa_sigalgs])
            .await;
        assert!(out.contains("HTTP/1.1 200 "), "{version}: {out}\n{err}");
        assert!(
            out.contains("Server public key is 2048 bit"),
            "{version}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_setting_stops_the_start_and_a_reload_keeps_the_servers() {
    if !tools() {
        return;
    }
    let edge = TlsEdge::start().await;
    // A reload whose caCrl file holds no CRL (the CA certificate): refused, naming the
    // server and the field; the servers keep their settings.
    let crl = edge.world.path("files/crl.pem").display().to_string();
    let bad = edge
        .yaml
        .replace(&format!("caCrl: {crl}"), &format!("caCrl: {}", edge.ca));
    assert_ne!(bad, edge.yaml);
    edge.world.write_config("istio", "mesh.yaml", &bad);
    let mut refused = String::new();
    for _ in 0..200 {
        let log = edge.gateway.output();
        if let Some(line) = log.lines().find(|l| l.contains("not reloaded")) {
            refused = line.to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        refused.contains("Gateway production/edge servers[1] (crl-files): tls.caCrl (")
            && refused.contains("no X509 CRL in the file"),
        "{}",
        edge.gateway.output()
    );
    let (code, out, err) = edge.curl_as("hash", &edge.good).await;
    assert_eq!((code, out.as_str()), (0, "edge 200"), "{err}");
    let (code, _, _) = edge.curl_as("hash", &edge.other).await;
    assert_ne!(code, 0);
    let (code, _, _) = edge.curl_as("crl-files", &edge.revoked).await;
    assert_ne!(code, 0);

    // The same pin at start: the gateway does not start, and says why.
    let one = edge.yaml.replace(
        "verifyCertificateHash: [\"",
        "verifyCertificateHash: [\"00:",
    );
    let config = edge.world.write_config("istio-bad", "mesh.yaml", &one);
    let settings = edge.world.path("gateway.yaml");
    // Its own admin port: the first gateway still runs.
    let text = std::fs::read_to_string(&settings)
        .unwrap()
        .replace(
            &edge.config.display().to_string(),
            &config.display().to_string(),
        )
        .replace(
            &format!("admin: 127.0.0.1:{}", edge.gateway.ports.admin),
            &format!("admin: 127.0.0.1:{}", Ports::new().admin),
        );
    let settings = edge.world.path("gateway-bad.yaml");
    std::fs::write(&settings, text).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["gateway", "--settings"])
            .arg(&settings)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the gateway exits")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Gateway production/edge servers[4] (hash): tls.verifyCertificateHash[0]"),
        "{text}"
    );
}
