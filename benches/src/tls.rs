//! The mTLS handshake workload shared by the `tls` (criterion) and `tls_counts`
//! (instruction counts) benches: one CA, a server and a client SVID, our per-connection
//! configs, and plain rustls configs with the same keys, versions, ALPN and no resumption.

use std::sync::Arc;

use mesh_core::Identity;
use mesh_tls::verify::PeerSlot;
use mesh_tls::{
    CertStore, CertificateAuthority, ClientTls, IssuedSvid, LeafSpec, SecureNaming, ServerTls,
};
use rustls::client::Resumption;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig, ServerConnection,
};
use rustls_pki_types::ServerName;

/// The trust domain of the fixture.
pub const TD: &str = "cluster.local";

/// Everything a handshake bench needs, built once.
pub struct Fixture {
    /// The client's SVID (its leaf is what identity extraction parses).
    pub client_svid: IssuedSvid,
    /// The name the client connects to (the server certificate also has this DNS SAN).
    pub name: ServerName<'static>,
    /// Our server side.
    pub server_tls: ServerTls,
    /// Our client side.
    pub client_tls: ClientTls,
    /// The identity the client expects of the server (secure naming).
    pub expected: SecureNaming,
    /// Plain rustls server config: `WebPkiClientVerifier`, same certificate and key.
    pub plain_server: Arc<ServerConfig>,
    /// Plain rustls client config: webpki server verification, same certificate and key.
    pub plain_client: Arc<ClientConfig>,
}

impl Fixture {
    /// Mints the certificates and builds both pairs of configs.
    ///
    /// # Panics
    ///
    /// If the CA cannot mint the certificates or rustls rejects them.
    pub fn new() -> Self {
        let ca = CertificateAuthority::new(TD).expect("ca");
        let server_svid = ca
            .issue_with(&LeafSpec::workload(TD, "prod", "payment").with_dns("mesh.test"))
            .expect("server svid");
        let client_svid = ca.issue("prod", "orders").expect("client svid");
        let name = ServerName::try_from("mesh.test").expect("name");
        let server_tls = ServerTls::new(CertStore::from_issued(&server_svid).expect("store"));
        let client_tls = ClientTls::new(CertStore::from_issued(&client_svid).expect("store"));
        let expected = SecureNaming::only(Identity::from_istio(TD, "prod", "payment").expect("id"));

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
        let mut plain_client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(client_svid.chain_der().to_vec(), client_svid.key_der())
            .expect("client cert");
        plain_client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        plain_client.resumption = Resumption::disabled();

        Self {
            client_svid,
            name,
            server_tls,
            client_tls,
            expected,
            plain_server: Arc::new(plain_server),
            plain_client: Arc::new(plain_client),
        }
    }

    /// One full handshake through our configs, returning both recorded peer slots.
    ///
    /// # Panics
    ///
    /// If the handshake fails.
    pub fn mesh_handshake(&self) -> ((Connection, Connection), (PeerSlot, PeerSlot)) {
        let (server_slot, client_slot) = (PeerSlot::new(), PeerSlot::new());
        let server = ServerConnection::new(self.server_tls.config(Some(server_slot.clone())))
            .expect("server conn");
        let client = ClientConnection::new(
            self.client_tls
                .config(&self.expected, Some(client_slot.clone())),
            self.name.clone(),
        )
        .expect("client conn");
        (handshake(client, server), (server_slot, client_slot))
    }

    /// One full handshake through the plain rustls configs.
    ///
    /// # Panics
    ///
    /// If the handshake fails.
    pub fn plain_handshake(&self) -> (Connection, Connection) {
        let server = ServerConnection::new(self.plain_server.clone()).expect("server conn");
        let client = ClientConnection::new(self.plain_client.clone(), self.name.clone())
            .expect("client conn");
        handshake(client, server)
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

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

/// Drives a client and a server connection through a full handshake in memory.
///
/// # Panics
///
/// If either side rejects the other.
pub fn handshake(client: ClientConnection, server: ServerConnection) -> (Connection, Connection) {
    let mut client = Connection::Client(client);
    let mut server = Connection::Server(server);
    let mut buf = Vec::with_capacity(16 * 1024);
    while client.is_handshaking() || server.is_handshaking() {
        transfer(&mut client, &mut server, &mut buf);
        transfer(&mut server, &mut client, &mut buf);
    }
    (client, server)
}
