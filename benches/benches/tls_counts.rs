//! mesh-tls: a fixed workload for instruction counting of the mTLS handshake.
//!
//! `cargo bench -p benches --bench tls_counts -- OP N` runs `OP` `N` times. Operations:
//!
//! - `mesh`: a full in-memory mTLS handshake through `ServerTls`/`ClientTls` with
//!   per-connection recording configs, SPIFFE verification of both certificates, secure
//!   naming, and the peer identities read from the slots (what the inbound acceptor and
//!   `ClientTls::connect` do).
//! - `plain`: the same handshake through plain rustls configs (`WebPkiClientVerifier`,
//!   the default server verifier with a DNS name check), same ECDSA P-256 keys.
//! - `check_leaf`: SPIFFE identity extraction and SVID checks from a DER leaf.
//!
//! Setup (CA, keys, configs) is the same for every `N`, so under
//! `valgrind --tool=callgrind` the difference between the instruction totals of two
//! values of `N`, divided by the difference of the `N`s, is the instruction count of one
//! operation, independent of machine load. `OP` `list` prints the operations.

use std::hint::black_box;
use std::sync::Arc;

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
const OPS: &[&str] = &["mesh", "plain", "check_leaf"];

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

/// Drives both connections over in-memory buffers until neither is handshaking.
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

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let op = args.first().map(String::as_str).unwrap_or("list");
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    if !OPS.contains(&op) {
        println!("operations: {}", OPS.join(" "));
        return;
    }

    let ca = CertificateAuthority::new(TD).expect("ca");
    let server_svid = ca
        .issue_with(&LeafSpec::workload(TD, "prod", "payment").with_dns("mesh.test"))
        .expect("server svid");
    let client_svid = ca.issue("prod", "orders").expect("client svid");
    let name = ServerName::try_from("mesh.test").expect("name");

    // Ours.
    let server_tls = ServerTls::new(CertStore::from_issued(&server_svid).expect("store"));
    let client_tls = ClientTls::new(CertStore::from_issued(&client_svid).expect("store"));
    let expected = SecureNaming::only(Identity::from_istio(TD, "prod", "payment").expect("id"));

    // Plain rustls mTLS with the same certificates, keys, versions, ALPN and no resumption.
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

    let leaf = client_svid.leaf_der().to_vec();

    for _ in 0..n {
        match op {
            "mesh" => {
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
                assert!(ids.0.is_some() && ids.1.is_some(), "both peers recorded");
                black_box((done, ids));
            }
            "plain" => {
                let server = ServerConnection::new(plain_server.clone()).expect("server conn");
                let client =
                    ClientConnection::new(plain_client.clone(), name.clone()).expect("client conn");
                black_box(handshake(client, server));
            }
            "check_leaf" => {
                black_box(
                    check_leaf(black_box(&leaf), PeerRole::Client, &[TD], None).expect("valid"),
                );
            }
            _ => unreachable!("checked against OPS"),
        }
    }
    println!("{op}: {n} runs");
}
