//! mesh-tls: full mTLS handshake through the mesh configs vs plain rustls with the same
//! key type, and identity extraction from a DER leaf.
//!
//! Handshakes run in memory (no sockets): bytes are moved between a rustls client and
//! server connection until both finish, so only TLS and verification work is measured.
//! Both sides disable resumption, as the mesh does, so every iteration is a full
//! handshake with ECDSA P-256 certificates.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::Identity;
use mesh_tls::svid::{PeerRole, check_leaf};
use mesh_tls::verify::PeerSlot;
use mesh_tls::{CertStore, CertificateAuthority, ClientTls, LeafSpec, SecureNaming, ServerTls};
use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};
use rustls_pki_types::ServerName;

const TD: &str = "cluster.local";

/// Moves every pending TLS record from `from` to `to` and lets `to` process it.
fn transfer(from: &mut Connection, to: &mut Connection, buf: &mut Vec<u8>) {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).expect("write_tls to a Vec");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read_tls from a slice");
    }
    to.process_new_packets().expect("handshake succeeds");
}

fn handshake(client: ClientConnection, server: ServerConnection) -> (Connection, Connection) {
    let mut client = Connection::Client(client);
    let mut server = Connection::Server(server);
    let mut buf = Vec::with_capacity(16 * 1024);
    while client.is_handshaking() || server.is_handshaking() {
        transfer(&mut client, &mut server, &mut buf);
        transfer(&mut server, &mut client, &mut buf);
    }
    (client, server)
}

fn handshakes(c: &mut Criterion) {
    let ca = CertificateAuthority::new(TD).expect("ca");
    let server_svid = ca
        .issue_with(&LeafSpec::workload(TD, "prod", "payment").with_dns("mesh.test"))
        .expect("server svid");
    let client_svid = ca.issue("prod", "orders").expect("client svid");
    let name = ServerName::try_from("mesh.test").expect("name");

    // Ours: a per-connection config pair whose verifiers record the peers, exactly what
    // `InboundAcceptor::accept` and `ClientTls::connect` do.
    let server_tls = ServerTls::new(CertStore::from_issued(&server_svid).expect("store"));
    let client_tls = ClientTls::new(CertStore::from_issued(&client_svid).expect("store"));
    let expected = SecureNaming::only(Identity::from_istio(TD, "prod", "payment").expect("id"));
    let mut group = c.benchmark_group("tls/handshake");
    group.bench_function("mesh", |b| {
        b.iter(|| {
            let (server_slot, client_slot) = (PeerSlot::new(), PeerSlot::new());
            let server = ServerConnection::new(server_tls.config(Some(server_slot.clone())))
                .expect("server conn");
            let client = ClientConnection::new(
                client_tls.config(&expected, Some(client_slot.clone())),
                name.clone(),
            )
            .expect("client conn");
            let done = handshake(client, server);
            let ids = (
                server_slot.get().map(|l| l.identity.clone()),
                client_slot.get().map(|l| l.identity.clone()),
            );
            assert!(ids.0.is_some() && ids.1.is_some());
            black_box((done, ids))
        })
    });

    // Ours with configs built once (isolates the per-connection config build).
    let server_cfg = server_tls.config(None);
    let client_cfg = client_tls.config(&expected, None);
    group.bench_function("mesh_shared_config", |b| {
        b.iter(|| {
            let server = ServerConnection::new(server_cfg.clone()).expect("server conn");
            let client =
                ClientConnection::new(client_cfg.clone(), name.clone()).expect("client conn");
            black_box(handshake(client, server))
        })
    });

    // The per-connection part of "mesh" alone: building the two recording configs.
    group.bench_function("mesh_config_build_only", |b| {
        b.iter(|| {
            black_box((
                server_tls.config(Some(PeerSlot::new())),
                client_tls.config(&expected, Some(PeerSlot::new())),
            ))
        })
    });

    // Plain rustls mTLS: webpki verifiers, DNS name check, same certificates and keys.
    let provider = mesh_tls::provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.root_der().clone()).expect("root");
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .expect("verifier");
    let mut plain_server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_svid.chain_der().to_vec(), server_svid.key_der())
        .expect("server cert");
    plain_server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    plain_server.session_storage = Arc::new(NoServerSessionStorage {});
    plain_server.send_tls13_tickets = 0;
    let plain_server = Arc::new(plain_server);
    let mut plain_client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(client_svid.chain_der().to_vec(), client_svid.key_der())
        .expect("client cert");
    plain_client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    plain_client.resumption = Resumption::disabled();
    let plain_client = Arc::new(plain_client);
    group.bench_function("plain_rustls", |b| {
        b.iter(|| {
            let server = ServerConnection::new(plain_server.clone()).expect("server conn");
            let client =
                ClientConnection::new(plain_client.clone(), name.clone()).expect("client conn");
            black_box(handshake(client, server))
        })
    });
    group.finish();
}

fn identity(c: &mut Criterion) {
    let ca = CertificateAuthority::new(TD).expect("ca");
    let svid = ca.issue("production", "order-service").expect("svid");
    let der = svid.leaf_der().to_vec();
    let mut group = c.benchmark_group("tls/identity");
    group.bench_function("check_leaf", |b| {
        b.iter(|| check_leaf(black_box(&der), PeerRole::Client, &[TD], None).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, handshakes, identity);
criterion_main!(benches);
