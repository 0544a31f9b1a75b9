//! Real mTLS handshakes over loopback: who is accepted, who is refused, and why.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use mesh_core::Identity;
use mesh_tls::verify::rustls_error;
use mesh_tls::{
    AcceptError, CertStore, CertificateAuthority, ClientTls, LeafSpec, PeerAuthMode, SecureNaming,
    SvidError, SvidFiles, svid_error,
};
use rustls::{CertificateError, HandshakeKind};
use support::*;

fn ca() -> CertificateAuthority {
    CertificateAuthority::new(TD).unwrap()
}

/// The SVID reason the server gave for refusing a handshake.
fn reason(err: &AcceptError) -> &SvidError {
    match err {
        AcceptError::Handshake(io) => {
            svid_error(io).unwrap_or_else(|| panic!("no SVID reason in {io}"))
        }
        other => panic!("expected a handshake failure, got {other}"),
    }
}

async fn refused_client_cert(spec: LeafSpec) -> AcceptError {
    let ca = ca();
    let mut server = start_server(store(&ca, "prod", "payment"), PeerAuthMode::Strict).await;
    let bad = ca.issue_with(&spec).unwrap();
    let result = raw_request(&raw_client(&ca, Some(&bad)), server.addr).await;
    assert!(
        result.is_err(),
        "request with a bad certificate succeeded: {result:?}"
    );
    server.next_error().await
}

#[tokio::test]
async fn valid_mtls_sees_both_identities() {
    let ca = ca();
    let server = start_server(store(&ca, "prod", "payment"), PeerAuthMode::Strict).await;
    let client = ClientTls::new(store(&ca, "prod", "orders"));
    let payment = Identity::from_istio(TD, "prod", "payment").unwrap();
    let mut conn = connect(&client, server.addr, &SecureNaming::only(payment.clone()))
        .await
        .unwrap();
    assert_eq!(conn.server.identity, payment);
    assert_eq!(conn.server.serial, server.store.serial());
    assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(
        conn.get().await.unwrap(),
        "peer=spiffe://cluster.local/ns/prod/sa/orders;security=mutual_tls"
    );
    // Every request on the connection carries the identity, not just the first.
    assert_eq!(conn.get().await.unwrap(), conn.get().await.unwrap());
}

#[tokio::test]
async fn strict_refuses_a_client_without_certificate() {
    let ca = ca();
    let mut server = start_server(store(&ca, "prod", "payment"), PeerAuthMode::Strict).await;
    assert!(
        raw_request(&raw_client(&ca, None), server.addr)
            .await
            .is_err()
    );
    let err = server.next_error().await;
    let AcceptError::Handshake(io) = &err else {
        panic!("{err}")
    };
    assert_eq!(
        rustls_error(io),
        Some(&rustls::Error::NoCertificatesPresented),
        "{err}"
    );
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let ca = ca();
    let other = CertificateAuthority::new("other.local").unwrap();
    let mut server = start_server(store(&ca, "prod", "payment"), PeerAuthMode::Strict).await;
    // A well-formed workload of other.local that trusts our server.
    let svid = other.issue("prod", "orders").unwrap();
    let mut files = svid.files();
    files.roots.push(ca.root_der().clone());
    let client_store = CertStore::with_aliases(files, vec![TD.into()]).unwrap();
    let client = ClientTls::new(client_store);
    let conn = connect(&client, server.addr, &SecureNaming::AnyTrusted).await;
    if let Ok(mut conn) = conn {
        assert!(conn.get().await.is_err());
    }
    let err = server.next_error().await;
    match reason(&err) {
        SvidError::UntrustedDomain(id) => assert_eq!(id.trust_domain(), "other.local"),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn our_ca_signing_another_trust_domain_is_refused() {
    let err = refused_client_cert(LeafSpec::workload("other.local", "prod", "orders")).await;
    assert!(
        matches!(reason(&err), SvidError::UntrustedDomain(_)),
        "{err}"
    );
    assert!(err.to_string().contains("other.local"), "{err}");
}

#[tokio::test]
async fn client_with_another_ca_of_the_same_domain_is_refused_by_the_chain_check() {
    let ca = ca();
    let impostor = CertificateAuthority::new(TD).unwrap();
    let mut server = start_server(store(&ca, "prod", "payment"), PeerAuthMode::Strict).await;
    let bad = impostor.issue("prod", "orders").unwrap();
    assert!(
        raw_request(&raw_client(&ca, Some(&bad)), server.addr)
            .await
            .is_err()
    );
    let err = server.next_error().await;
    let AcceptError::Handshake(io) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            rustls_error(io),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature | CertificateError::UnknownIssuer
            ))
        ),
        "{err}"
    );
}

#[tokio::test]
async fn two_uri_sans_are_refused() {
    let mut spec = LeafSpec::workload(TD, "prod", "orders");
    spec.uri_sans
        .push("spiffe://cluster.local/ns/prod/sa/admin".into());
    let err = refused_client_cert(spec).await;
    assert!(
        matches!(reason(&err), SvidError::MultipleUriSans(2)),
        "{err}"
    );
    assert!(err.to_string().contains("2 URI SANs"), "{err}");
}

#[tokio::test]
async fn ca_leaf_is_refused() {
    let mut spec = LeafSpec::workload(TD, "prod", "orders");
    spec.is_ca = true;
    let err = refused_client_cert(spec).await;
    assert!(matches!(reason(&err), SvidError::IsCa), "{err}");
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let mut spec = LeafSpec::workload(TD, "prod", "orders");
    let now = time::OffsetDateTime::now_utc();
    spec.not_before = now - time::Duration::days(2);
    spec.not_after = now - time::Duration::days(1);
    let err = refused_client_cert(spec).await;
    assert!(matches!(reason(&err), SvidError::Expired(_)), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused() {
    let mut spec = LeafSpec::workload(TD, "prod", "orders");
    let now = time::OffsetDateTime::now_utc();
    spec.not_before = now + time::Duration::hours(1);
    spec.not_after = now + time::Duration::days(1);
    let err = refused_client_cert(spec).await;
    assert!(matches!(reason(&err), SvidError::NotYetValid(_)), "{err}");
}

#[tokio::test]
async fn email_only_extended_key_usage_is_refused() {
    let mut spec = LeafSpec::workload(TD, "prod", "orders");
    spec.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::EmailProtection];
    let err = refused_client_cert(spec).await;
    assert!(
        matches!(reason(&err), SvidError::ExtendedKeyUsage(_)),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_server_identity_fails_secure_naming() {
    let ca = ca();
    // The listener is "evil", the client wants "payment".
    let server = start_server(store(&ca, "prod", "evil"), PeerAuthMode::Strict).await;
    let client = ClientTls::new(store(&ca, "prod", "orders"));
    let payment = Identity::from_istio(TD, "prod", "payment").unwrap();
    let err = connect(&client, server.addr, &SecureNaming::only(payment))
        .await
        .err()
        .expect("secure naming must fail the handshake");
    match svid_error(&err) {
        Some(SvidError::UnexpectedServer { got, expected }) => {
            assert!(
                err.to_string()
                    .contains("is not among the identities expected"),
                "{err}"
            );
            assert_eq!(got.service_account(), Some("evil"));
            assert_eq!(expected, "spiffe://cluster.local/ns/prod/sa/payment");
        }
        other => panic!("{other:?} from {err}"),
    }
}

#[tokio::test]
async fn tls12_client_gets_mtls_too() {
    let ca = ca();
    let server = start_server(store(&ca, "prod", "payment"), PeerAuthMode::Strict).await;
    let client_store = store(&ca, "prod", "orders");
    // Build with TLS 1.2 only, keeping our verifier and client certificate resolver.
    let verifier = mesh_tls::verify::SpiffeServerVerifier::new(
        client_store.bundle_handle(),
        client_store.provider().clone(),
        SecureNaming::AnyTrusted,
    );
    let mut tls12 = rustls::ClientConfig::builder_with_provider(client_store.provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(client_store.clone());
    tls12.alpn_protocols = vec![b"http/1.1".to_vec()];
    let body = raw_request(
        &tokio_rustls::TlsConnector::from(Arc::new(tls12)),
        server.addr,
    )
    .await
    .unwrap();
    assert_eq!(
        body,
        "peer=spiffe://cluster.local/ns/prod/sa/orders;security=mutual_tls"
    );
}

#[tokio::test]
async fn every_connection_is_a_full_handshake_and_a_bundle_change_applies_at_once() {
    let ca = ca();
    let next = CertificateAuthority::new(TD).unwrap();
    let server_store = store(&ca, "prod", "payment");
    let mut server = start_server(server_store.clone(), PeerAuthMode::Strict).await;
    let client = ClientTls::new(store(&ca, "prod", "orders"));
    // One client config reused for every connection, as a pool would.
    let config = client.config(&SecureNaming::AnyTrusted, None);
    let connector = tokio_rustls::TlsConnector::from(config);
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("mesh.test").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
    }
    // The server stops trusting the client's CA: the very next handshake is refused,
    // no resumed session can skip the check.
    server_store
        .set_trust_roots(vec![next.root_der().clone()])
        .unwrap();
    let body = raw_request(&connector, server.addr).await;
    assert!(body.is_err(), "{body:?}");
    let err = server.next_error().await;
    assert!(matches!(err, AcceptError::Handshake(_)), "{err}");
}

#[tokio::test]
async fn store_refuses_files_whose_key_does_not_match() {
    let ca = ca();
    let a = ca.issue("prod", "a").unwrap();
    let b = ca.issue("prod", "b").unwrap();
    let files = SvidFiles::from_pem(a.cert_chain_pem(), b.key_pem(), a.root_cert_pem()).unwrap();
    let err = CertStore::new(files).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let ca = ca();
    let acceptor = mesh_tls::InboundAcceptor::new(store(&ca, "prod", "payment"))
        .with_handshake_timeout(std::time::Duration::from_secs(10));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let started = tokio::time::Instant::now();
    let err = acceptor
        .accept(tcp, PeerAuthMode::Permissive)
        .await
        .unwrap_err();
    assert!(matches!(err, AcceptError::Timeout), "{err}");
    assert_eq!(started.elapsed(), std::time::Duration::from_secs(10));
}

/// A server presenting a certificate that breaks the SVID rules, built with plain rustls
/// because the store would refuse to serve it.
async fn bad_server(ca: &CertificateAuthority, spec: LeafSpec) -> std::net::SocketAddr {
    let svid = ca.issue_with(&spec).unwrap();
    let good = store(ca, "prod", "payment");
    let verifier =
        mesh_tls::verify::SpiffeClientVerifier::new(good.bundle_handle(), good.provider().clone());
    let config = rustls::ServerConfig::builder_with_provider(good.provider().clone())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(svid.chain_der().to_vec(), svid.key_der())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    addr
}

#[tokio::test]
async fn client_refuses_a_server_certificate_that_is_not_an_svid() {
    let ca = ca();
    let client = ClientTls::new(store(&ca, "prod", "orders"));

    let mut two = LeafSpec::workload(TD, "prod", "payment");
    two.uri_sans
        .push("spiffe://cluster.local/ns/prod/sa/admin".into());
    let mut ca_leaf = LeafSpec::workload(TD, "prod", "payment");
    ca_leaf.is_ca = true;
    let mut client_only = LeafSpec::workload(TD, "prod", "payment");
    client_only.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];

    for (spec, want) in [
        (two, "2 URI SANs"),
        (ca_leaf, "is a CA"),
        (client_only, "lacks id-kp-serverAuth"),
    ] {
        let addr = bad_server(&ca, spec).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let err = client
            .connect(tcp, "mesh.test", &SecureNaming::AnyTrusted)
            .await
            .expect_err("the client must refuse the server");
        assert!(svid_error(&err).is_some(), "{err}");
        assert!(err.to_string().contains(want), "want {want:?} in {err}");
    }
}

#[tokio::test]
async fn trust_domain_alias_admits_the_other_domain() {
    let ca = ca();
    let other = CertificateAuthority::new("other.local").unwrap();
    // The server trusts both roots and, as an alias (Istio's trustDomainAliases),
    // the other trust domain.
    let mut files = ca.issue("prod", "payment").unwrap().files();
    files.roots.push(other.root_der().clone());
    let server_store = CertStore::with_aliases(files, vec!["other.local".into()]).unwrap();
    let server = start_server(server_store, PeerAuthMode::Strict).await;
    let mut client_files = other.issue("legacy", "orders").unwrap().files();
    client_files.roots.push(ca.root_der().clone());
    let client = ClientTls::new(CertStore::with_aliases(client_files, vec![TD.into()]).unwrap());
    let mut conn = connect(&client, server.addr, &SecureNaming::AnyTrusted)
        .await
        .unwrap();
    assert_eq!(
        conn.get().await.unwrap(),
        "peer=spiffe://other.local/ns/legacy/sa/orders;security=mutual_tls"
    );
}
