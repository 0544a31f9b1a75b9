//! Certificates by CSR against a real Kubernetes API server: `discovery`'s certificate
//! service (TokenReview with audience `istio-ca`) behind a real tonic TLS server, and the
//! sidecar's client with its rotation.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::Identity;
use mesh_proxy::control::certificates::{CaClientOptions, CertificateClient};
use mesh_proxy::discovery::ca::{CaOptions, CertificateService};
use mesh_proxy::proto::istio::v1::auth::IstioCertificateRequest;
use mesh_proxy::proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_tls::svid::{PeerRole, check_leaf};
use mesh_tls::{CertStore, CertificateAuthority, StoreEvent, TrustBundle, WorkloadKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use support::peers::ApiServer;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Server, ServerTlsConfig};

const TD: &str = "cluster.local";
/// The name on `discovery`'s serving certificate.
const DISCOVERY_NAME: &str = "discovery.istio-system.svc";

/// `discovery`'s certificate service on 127.0.0.1:0 over TLS, with a serving certificate
/// from the CA itself; client certificates are optional, as on port 15012.
async fn serve(ca: Arc<CertificateAuthority>, client: kube::Client) -> SocketAddr {
    let spec = ca
        .workload_spec("istio-system", "discovery", Duration::from_secs(3600))
        .unwrap()
        .with_dns(DISCOVERY_NAME);
    let serving = ca.issue_with(&spec).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            serving.cert_chain_pem(),
            serving.key_pem(),
        ))
        .client_ca_root(Certificate::from_pem(ca.root_pem()))
        .client_auth_optional(true);
    let service = CertificateService::new(ca, client, CaOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(service.into_service())
            .serve_with_incoming(incoming),
    );
    addr
}

/// A raw gRPC client trusting `root_pem`, optionally presenting a client certificate.
async fn grpc(
    addr: SocketAddr,
    root_pem: &str,
    identity: Option<tonic::transport::Identity>,
) -> IstioCertificateServiceClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(DISCOVERY_NAME);
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    IstioCertificateServiceClient::new(channel)
}

fn request(
    csr: String,
    token: Option<&str>,
    ttl_secs: i64,
) -> tonic::Request<IstioCertificateRequest> {
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl_secs,
        metadata: None,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn identity(ns: &str, sa: &str) -> Identity {
    Identity::from_istio(TD, ns, sa).unwrap()
}

fn create_service_accounts(api: &ApiServer, ns: &str, names: &[&str]) {
    api.kubectl(&["create", "namespace", ns], "");
    for name in names {
        api.kubectl(&["create", "serviceaccount", name, "-n", ns], "");
    }
}

fn token(api: &ApiServer, ns: &str, sa: &str, audience: &str) -> String {
    api.kubectl(
        &["create", "token", sa, "-n", ns, "--audience", audience],
        "",
    )
    .trim()
    .to_owned()
}

fn certs(chain: &[String]) -> Vec<CertificateDer<'static>> {
    chain
        .iter()
        .flat_map(|pem| CertificateDer::pem_slice_iter(pem.as_bytes()).map(Result::unwrap))
        .collect()
}

fn validity_secs(leaf: &CertificateDer<'_>) -> u64 {
    let leaf = check_leaf(leaf, PeerRole::Client, &[TD], None).unwrap();
    leaf.not_after
        .duration_since(leaf.not_before)
        .unwrap()
        .as_secs()
}

/// `openssl verify` of the leaf through the intermediates to the root, as a relying party
/// outside the mesh checks it.
fn openssl_verify(dir: &Path, chain: &[String]) {
    let (leaf, rest) = chain.split_first().unwrap();
    let (root, intermediates) = rest.split_last().unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf).unwrap();
    std::fs::write(dir.join("root.pem"), root).unwrap();
    std::fs::write(dir.join("intermediates.pem"), intermediates.concat()).unwrap();
    let mut cmd = Command::new("openssl");
    cmd.arg("verify")
        .arg("-purpose")
        .arg("sslclient")
        .arg("-CAfile")
        .arg(dir.join("root.pem"));
    if !intermediates.is_empty() {
        cmd.arg("-untrusted").arg(dir.join("intermediates.pem"));
    }
    let out = cmd.arg(dir.join("leaf.pem")).output().unwrap();
    assert!(
        out.status.success(),
        "openssl verify failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- Service-account tokens re-signed with the API server's own key ---------------------

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn b64url_decode(text: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let values: Vec<u32> = text
        .bytes()
        .map(|c| A.iter().position(|a| *a == c).unwrap() as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in values.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, v)| n | v << (18 - 6 * i));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// An ASN.1 DER ECDSA signature (`SEQUENCE { r, s }`) as JWS's fixed `r || s` (ES256).
fn der_to_jws(der: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 2; // SEQUENCE tag and (short) length
    for _ in 0..2 {
        assert_eq!(der[i], 0x02);
        let len = der[i + 1] as usize;
        let int = &der[i + 2..i + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}

/// `token` with its times moved so that it expires at `exp`, signed again with the API
/// server's service-account key: TokenRequest refuses lifetimes under ten minutes, so an
/// expired token cannot be asked for, and waiting for one is not a test.
fn resign(api: &ApiServer, token: &str, iat: u64, exp: u64) -> String {
    let mut parts = token.split('.');
    let header = parts.next().unwrap();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&b64url_decode(parts.next().unwrap())).unwrap();
    claims["iat"] = iat.into();
    claims["nbf"] = iat.into();
    claims["exp"] = exp.into();
    let signing_input = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
    let key_pem = std::fs::read_to_string(api.dir().join("pki/sa.key")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let der = rcgen::SigningKey::sign(&key, signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64url(&der_to_jws(&der)))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// --- Tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn only_a_valid_istio_ca_token_gets_a_certificate_for_its_own_service_account() {
    let Some(api) = ApiServer::start() else {
        return;
    };
    create_service_accounts(&api, "shop", &["orders", "payments"]);
    let ca = Arc::new(CertificateAuthority::new(TD).unwrap());
    let addr = serve(ca.clone(), api.client().await).await;
    let mut client = grpc(addr, ca.root_pem(), None).await;
    let key = WorkloadKey::generate().unwrap();
    let own_csr = key.csr_pem(&identity("shop", "orders")).unwrap();

    let valid = token(&api, "shop", "orders", "istio-ca");
    let other_audience = token(&api, "shop", "orders", "other");
    let now = unix_now();
    let expired = resign(&api, &valid, now - 7200, now - 3600);
    // The same re-signing with a future expiry is accepted, so the expired token is
    // refused for its expiry and nothing else.
    let resigned_fresh = resign(&api, &valid, now - 60, now + 3600);

    // The valid token: a 24 h certificate for shop/orders, chained leaf then root.
    let answer = client
        .create_certificate(request(own_csr.clone(), Some(&valid), 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.cert_chain.len(), 2, "{:?}", answer.cert_chain);
    assert!(answer.cert_chain.iter().all(|pem| pem.ends_with('\n')));
    let chain = certs(&answer.cert_chain);
    assert_eq!(&chain[1], ca.root_der(), "the root comes last");
    let leaf = check_leaf(&chain[0], PeerRole::Client, &[TD], Some(UnixTime::now())).unwrap();
    assert_eq!(leaf.identity, identity("shop", "orders"));
    assert_eq!(validity_secs(&chain[0]), 24 * 3600);
    let bundle = TrustBundle::new(vec![ca.root_der().clone()], vec![TD.into()]).unwrap();
    bundle
        .verify_client(&chain[0], &[], UnixTime::now())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    openssl_verify(dir.path(), &answer.cert_chain);
    // Only the CSR's public key is used: the certificate pairs with the caller's key.
    mesh_tls::svid::SvidFiles {
        chain: vec![chain[0].clone()],
        key: key.key_der(),
        roots: vec![ca.root_der().clone()],
    }
    .certified_key(&mesh_tls::provider())
    .unwrap();

    let answer = client
        .create_certificate(request(own_csr.clone(), Some(&resigned_fresh), 3600))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validity_secs(&certs(&answer.cert_chain)[0]), 3600);

    // A CSR asking for another service account's identity gets the caller's (CA-04).
    let foreign_csr = key
        .csr_pem_with(&[
            identity("shop", "payments").as_str(),
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        ])
        .unwrap();
    let answer = client
        .create_certificate(request(foreign_csr, Some(&valid), 0))
        .await
        .unwrap()
        .into_inner();
    let leaf = check_leaf(&certs(&answer.cert_chain)[0], PeerRole::Server, &[TD], None).unwrap();
    assert_eq!(leaf.identity, identity("shop", "orders"));

    // Asking for another identity through Istio's impersonation metadata is refused.
    let mut impersonating = request(own_csr.clone(), Some(&valid), 0);
    impersonating.get_mut().metadata = Some(prost_types::Struct {
        fields: [(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(
                    identity("shop", "payments").as_str().to_owned(),
                )),
            },
        )]
        .into_iter()
        .collect(),
    });
    let err = client.create_certificate(impersonating).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // Expired, wrong audience, garbage, none: Unauthenticated.
    for (what, token) in [
        ("expired", Some(expired.as_str())),
        ("audience other", Some(other_audience.as_str())),
        ("garbage", Some("not-a-token")),
        ("no token", None),
    ] {
        let err = client
            .create_certificate(request(own_csr.clone(), token, 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err}");
        assert_eq!(err.message(), "request authenticate failure", "{what}");
    }

    // A CSR that is not one, or whose signature does not verify: InvalidArgument.
    let mut tampered = own_csr.clone().into_bytes();
    let body_at = own_csr.find('\n').unwrap() + 40;
    tampered[body_at] = if tampered[body_at] == b'A' {
        b'B'
    } else {
        b'A'
    };
    for (what, csr) in [
        ("garbage", "not a csr".to_owned()),
        ("a certificate", ca.root_pem().to_owned()),
        ("tampered", String::from_utf8(tampered).unwrap()),
    ] {
        let err = client
            .create_certificate(request(csr, Some(&valid), 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
    }

    // More than 90 days: InvalidArgument; exactly 90 days is granted.
    let ninety_days = 90 * 24 * 3600;
    let err = client
        .create_certificate(request(own_csr.clone(), Some(&valid), ninety_days + 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let answer = client
        .create_certificate(request(own_csr.clone(), Some(&valid), ninety_days))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        validity_secs(&certs(&answer.cert_chain)[0]),
        ninety_days as u64
    );

    // A token of a service account that no longer exists is refused by the review, once
    // the API server's service-account cache has seen the deletion.
    let payments = token(&api, "shop", "payments", "istio-ca");
    client
        .create_certificate(request(own_csr.clone(), Some(&payments), 0))
        .await
        .unwrap();
    api.kubectl(&["delete", "serviceaccount", "payments", "-n", "shop"], "");
    let mut last = None;
    for _ in 0..100 {
        match client
            .create_certificate(request(own_csr.clone(), Some(&payments), 0))
            .await
        {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(err) => {
                last = Some(err);
                break;
            }
        }
    }
    let err = last.expect("a deleted service account's token still gets certificates");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
}

#[tokio::test]
async fn a_valid_mesh_client_certificate_renews_its_own_identity_without_a_token() {
    let Some(api) = ApiServer::start() else {
        return;
    };
    let ca = Arc::new(CertificateAuthority::new(TD).unwrap());
    let other = CertificateAuthority::new(TD).unwrap();
    let addr = serve(ca.clone(), api.client().await).await;
    let key = WorkloadKey::generate().unwrap();
    // The CSR asks for something else; the certificate presented decides.
    let csr = key.csr_pem(&identity("shop", "payments")).unwrap();

    let current = ca.issue("shop", "orders").unwrap();
    let mut client = grpc(
        addr,
        ca.root_pem(),
        Some(tonic::transport::Identity::from_pem(
            current.cert_chain_pem(),
            current.key_pem(),
        )),
    )
    .await;
    let answer = client
        .create_certificate(request(csr.clone(), None, 0))
        .await
        .unwrap()
        .into_inner();
    let leaf = check_leaf(&certs(&answer.cert_chain)[0], PeerRole::Client, &[TD], None).unwrap();
    assert_eq!(leaf.identity, identity("shop", "orders"));
    assert_ne!(&leaf.serial, current.serial());

    // A certificate from another CA does not get through the handshake's verification;
    // without one, there is no credential at all.
    let foreign = other.issue("shop", "orders").unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.root_pem()))
        .domain_name(DISCOVERY_NAME)
        .identity(tonic::transport::Identity::from_pem(
            foreign.cert_chain_pem(),
            foreign.key_pem(),
        ));
    let refused = match Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => IstioCertificateServiceClient::new(channel)
            .create_certificate(request(csr.clone(), None, 0))
            .await
            .is_err(),
    };
    assert!(refused, "a foreign client certificate renewed");
    let mut anonymous = grpc(addr, ca.root_pem(), None).await;
    let err = anonymous
        .create_certificate(request(csr, None, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
}

/// Istio's plug-in CA made as an operator makes it: an offline root and an intermediate
/// with openssl (RSA, the key in PKCS#1 as older tooling writes it).
fn plugin_cacerts(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        "root-key.pem",
    ]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "root-key.pem",
        "-subj",
        "/O=Istio/CN=Root CA",
        "-days",
        "3650",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "root-cert.pem",
    ]);
    run(&["genrsa", "-traditional", "-out", "ca-key.pem", "2048"]);
    run(&[
        "req",
        "-new",
        "-key",
        "ca-key.pem",
        "-subj",
        "/O=Istio/CN=Intermediate CA/L=cluster1",
        "-out",
        "ca.csr",
    ]);
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,digitalSignature,keyCertSign,cRLSign\nsubjectAltName=DNS:istiod.istio-system.svc\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-key.pem",
        "-CAcreateserial",
        "-days",
        "730",
        "-extfile",
        "ca.ext",
        "-out",
        "ca-cert.pem",
    ]);
    let chain = [
        std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap(),
        std::fs::read_to_string(dir.join("root-cert.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    // Only the four files of the `cacerts` Secret stay.
    for extra in ["root-key.pem", "ca.csr", "ca.ext", "root-cert.srl"] {
        let _ = std::fs::remove_file(dir.join(extra));
    }
}

#[tokio::test]
async fn plugged_in_cacerts_issue_leaves_that_chain_through_the_intermediate_to_the_root() {
    let Some(api) = ApiServer::start() else {
        return;
    };
    create_service_accounts(&api, "shop", &["orders"]);
    let dir = tempfile::tempdir().unwrap();
    let cacerts = dir.path().join("cacerts");
    std::fs::create_dir(&cacerts).unwrap();
    plugin_cacerts(&cacerts);
    let ca = Arc::new(CertificateAuthority::load_plugin(&cacerts, TD).unwrap());
    let root = mesh_tls::svid::read_certs(&cacerts.join("root-cert.pem")).unwrap();
    let intermediate = mesh_tls::svid::read_certs(&cacerts.join("ca-cert.pem")).unwrap();
    assert_eq!(ca.root_der(), &root[0]);
    assert_eq!(ca.intermediates_der(), intermediate.as_slice());

    let addr = serve(ca.clone(), api.client().await).await;
    let valid = token(&api, "shop", "orders", "istio-ca");
    let key = WorkloadKey::generate().unwrap();
    let mut client = grpc(addr, ca.root_pem(), None).await;
    let answer = client
        .create_certificate(request(
            key.csr_pem(&identity("shop", "orders")).unwrap(),
            Some(&valid),
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    // Leaf, intermediate, root: the root is not repeated although cert-chain.pem has it.
    let chain = certs(&answer.cert_chain);
    assert_eq!(chain.len(), 3, "{:?}", answer.cert_chain);
    assert_eq!(chain[1], intermediate[0]);
    assert_eq!(chain[2], root[0]);
    openssl_verify(dir.path(), &answer.cert_chain);
    let bundle = TrustBundle::new(root.clone(), vec![TD.into()]).unwrap();
    bundle
        .verify_client(&chain[0], &chain[1..2], UnixTime::now())
        .unwrap();
    // Without the intermediate the leaf does not verify: it is signed by the intermediate.
    assert!(
        bundle
            .verify_client(&chain[0], &[], UnixTime::now())
            .is_err()
    );

    // The sidecar's client against the same server: a store serving a certificate that
    // chains through the intermediate.
    let token_file = dir.path().join("istio-token");
    std::fs::write(&token_file, &valid).unwrap();
    let root_file = cacerts.join("root-cert.pem");
    let options = CaClientOptions::new(
        format!("https://{addr}"),
        &root_file,
        identity("shop", "orders"),
    )
    .server_name(DISCOVERY_NAME)
    .token_file(&token_file);
    let store = CertificateClient::new(options).store().await.unwrap();
    assert_eq!(store.identity(), identity("shop", "orders"));
    assert_eq!(
        store.current().certified_key.cert.len(),
        2,
        "leaf and intermediate"
    );
}

#[tokio::test]
async fn the_client_refuses_a_server_that_is_not_discovery_and_reports_refusals() {
    let Some(api) = ApiServer::start() else {
        return;
    };
    create_service_accounts(&api, "shop", &["orders"]);
    let ca = Arc::new(CertificateAuthority::new(TD).unwrap());
    let addr = serve(ca.clone(), api.client().await).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("istio-token");
    std::fs::write(&token_file, token(&api, "shop", "orders", "other")).unwrap();
    let root_file = dir.path().join("root-cert.pem");
    std::fs::write(&root_file, ca.root_pem()).unwrap();
    let options = |name: &str| {
        CaClientOptions::new(addr.to_string(), &root_file, identity("shop", "orders"))
            .server_name(name)
            .token_file(&token_file)
    };

    // The serving certificate does not carry this name: the handshake fails, so the
    // token never reaches the service (which would answer Unauthenticated).
    let err = CertificateClient::new(options("istiod.istio-system.svc"))
        .fetch()
        .await
        .unwrap_err();
    let code = err.status().map(tonic::Status::code);
    assert!(code.is_none() || code == Some(Code::Unavailable), "{err}");

    // The wrong audience: the service's Unauthenticated comes back as it is.
    let err = CertificateClient::new(options(DISCOVERY_NAME))
        .fetch()
        .await
        .unwrap_err();
    assert_eq!(
        err.status().map(tonic::Status::code),
        Some(Code::Unauthenticated),
        "{err}"
    );

    // A token for another service account: the certificate would name it, and the
    // client refuses it rather than serve someone else's identity.
    api.kubectl(&["create", "serviceaccount", "payments", "-n", "shop"], "");
    std::fs::write(&token_file, token(&api, "shop", "payments", "istio-ca")).unwrap();
    let err = CertificateClient::new(options(DISCOVERY_NAME))
        .fetch()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
}

/// The sidecar's rotation on tokio's paused clock. The API server and the certificate
/// service run on their own runtime in real time; the client's runtime is paused, so its
/// timers move only when it has nothing else to do.
#[test]
fn rotation_renews_at_half_life_and_retries_while_keeping_the_current_certificate() {
    let Some(api) = ApiServer::start() else {
        return;
    };
    create_service_accounts(&api, "shop", &["orders"]);
    let ca = Arc::new(CertificateAuthority::new(TD).unwrap());
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = server_rt.block_on(async { serve(ca.clone(), api.client().await).await });

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("istio-token");
    let valid = token(&api, "shop", "orders", "istio-ca");
    std::fs::write(&token_file, &valid).unwrap();
    let root_file: PathBuf = dir.path().join("root-cert.pem");
    std::fs::write(&root_file, ca.root_pem()).unwrap();
    let lifetime = Duration::from_secs(3600);
    let options = CaClientOptions::new(
        format!("https://{addr}"),
        &root_file,
        identity("shop", "orders"),
    )
    .server_name(DISCOVERY_NAME)
    .token_file(&token_file)
    .ttl(lifetime)
    // A time limit would fire at once on a paused clock while real I/O is pending.
    .request_timeout(None)
    .retry(Duration::from_secs(10), Duration::from_secs(60));

    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    client_rt.block_on(async {
        let client = CertificateClient::new(options).with_seed(3);
        let first = client.fetch().await.unwrap();
        assert_eq!(
            first
                .leaf
                .not_after
                .duration_since(first.leaf.not_before)
                .unwrap(),
            lifetime
        );
        let store = CertStore::new(first.files).unwrap();
        let first_serial = store.serial();
        let mut events = store.subscribe();
        let start = tokio::time::Instant::now();
        let rotation = client.spawn_rotation(store.clone());
        let mut status = rotation.status();

        // Renewal is due at expire − lifetime × (0.5 ± 0.01): 29:24 to 30:36 after issue.
        let due = status
            .wait_for(|s| s.next_attempt.is_some())
            .await
            .unwrap()
            .next_attempt
            .unwrap();
        let after = due - start;
        assert!(
            after >= Duration::from_secs(1764 - 2) && after <= Duration::from_secs(1836),
            "renewal scheduled {after:?} after issue"
        );
        tokio::time::sleep_until(due - Duration::from_secs(1)).await;
        assert_eq!(store.serial(), first_serial, "renewed early");
        assert!(events.try_recv().is_err());

        // At the due point a new key and certificate are fetched and swapped in (with the
        // trust bundle, re-read from the root-cert file).
        let serial = loop {
            match events.recv().await.unwrap() {
                StoreEvent::Rotated { serial } => break serial,
                StoreEvent::BundleChanged { roots } => assert_eq!(roots, 1),
                other @ StoreEvent::Rejected { .. } => panic!("{other:?}"),
            }
        };
        assert_ne!(serial, first_serial);
        assert_eq!(store.serial(), serial);
        assert_eq!(store.identity(), identity("shop", "orders"));
        let renewed_at = tokio::time::Instant::now();
        assert!(renewed_at >= due);
        assert_eq!(status.borrow().renewals, 1);

        // The token goes bad: the next renewal fails, the certificate in the store stays,
        // and retries follow with back-off until the token is good again.
        std::fs::write(&token_file, "not-a-token").unwrap();
        let failed = status.wait_for(|s| s.failures >= 2).await.unwrap().clone();
        let error = failed.last_error.unwrap();
        assert!(error.contains("Unauthenticated"), "{error}");
        assert_eq!(store.serial(), serial, "the current certificate is kept");
        let retry_gap = status.borrow().next_attempt.unwrap() - tokio::time::Instant::now();
        assert!(
            retry_gap >= Duration::from_secs(10) && retry_gap <= Duration::from_secs(20),
            "second retry in {retry_gap:?}"
        );
        std::fs::write(&token_file, &valid).unwrap();
        status.wait_for(|s| s.renewals == 2).await.unwrap();
        assert_eq!(status.borrow().failures, 0);
        assert_ne!(store.serial(), serial);

        // `rotate_now` renews at once.
        let before = store.serial();
        let now = tokio::time::Instant::now();
        store.rotate_now();
        status.wait_for(|s| s.renewals == 3).await.unwrap();
        assert_ne!(store.serial(), before);
        assert_eq!(
            tokio::time::Instant::now(),
            now,
            "no wait for a forced renewal"
        );
        drop(rotation);
    });
    drop(server_rt);
}
