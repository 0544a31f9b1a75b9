//! Protocol selection for a port, as Istio's sidecars make it (ISTIO.md §9): the port's
//! declared protocol, else detection from the connection's first bytes.
//!
//! # Behaviour
//!
//! [`declared`] reads the class of the service port (`appProtocol`, else the port-name
//! prefix, [`PortProtocol`]): `http`/`http2`/`grpc` ports are HTTP, `tls`/`https` ports
//! are TLS routed by SNI (on a sidecar `https` means the application's own TLS, PS-06),
//! `tcp`, `mongo`, `redis`, `mysql` are opaque TCP. A port of no declared protocol is
//! detected, except on the well-known server-first ports 25, 53, 3306 and 27017, which
//! are opaque TCP (PS-04).
//!
//! [`detect`] peeks at the connection, consuming nothing, until the first bytes decide
//! ([`classify`]):
//!
//! - an HTTP/1.1 request line (`METHOD SP target SP HTTP/1.1 CRLF`) or the HTTP/2
//!   connection preface (`PRI * HTTP/2.0…`, h2c with prior knowledge) is HTTP. Which of
//!   the two it is, the HTTP listener itself tells from the same bytes (hyper-util's
//!   server in [`serve`](crate::serve)); HTTP/1.0 is not HTTP here and passes as TCP, as
//!   in Istio without `PILOT_HTTP10` (PS-22);
//! - a TLS record header carrying a ClientHello (`16 03 0x .. .. 01`) is TLS;
//! - anything else, a connection that ends before deciding, and a request line longer
//!   than 8 KiB is opaque TCP (PS-10).
//!
//! Detection needs the client to speak first. Istio's `protocolDetectionTimeout`
//! defaults to none (ISTIO.md §8 item 8, PS-15): a server-first protocol on a port of no
//! declared protocol waits for the client as it does in Istio (PS-17). With a timeout, a
//! connection whose client has sent nothing that decides by then is opaque TCP.
//!
//! [`Egress`] puts this in front of a TCP egress listener (`listeners.tcp`): HTTP is
//! served by the outbound HTTP stack on that connection, TLS is routed by the SNI of
//! its ClientHello through VirtualService `tls` routes and passed through untouched
//! (as a gateway's `PASSTHROUGH` server), opaque TCP by the service's `tcp` routes.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_routing::PortProtocol;
use tokio::net::TcpStream;

use crate::Mesh;
use crate::stack::HttpService;
use crate::stack::tcp::TcpOutbound;

/// What a connection is handed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.1 or HTTP/2 with prior knowledge: the HTTP stack.
    Http,
    /// A TLS ClientHello: routed by its SNI, not terminated.
    Tls,
    /// Anything else: opaque bytes.
    Opaque,
}

/// Ports whose protocols speak first from the server: never detected (PS-04).
const SERVER_FIRST_PORTS: [u16; 4] = [25, 53, 3306, 27017];

/// The longest request line looked at before giving up on HTTP.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The handling of port `port` whose class is `protocol` (`None`: no such port in the
/// registry); `None` when it is detected.
pub fn declared(protocol: Option<PortProtocol>, port: u16) -> Option<Detected> {
    match protocol {
        Some(PortProtocol::Http | PortProtocol::Http2) => Some(Detected::Http),
        Some(PortProtocol::Tls) => Some(Detected::Tls),
        Some(PortProtocol::Tcp) => Some(Detected::Opaque),
        Some(PortProtocol::Auto) | None if SERVER_FIRST_PORTS.contains(&port) => {
            Some(Detected::Opaque)
        }
        Some(PortProtocol::Auto) | None => None,
    }
}

/// What the first bytes of a connection say; `None` while they do not decide yet.
pub fn classify(prefix: &[u8]) -> Option<Detected> {
    let first = *prefix.first()?;
    if first == 0x16 {
        return tls_hello(prefix);
    }
    let preface = &H2_PREFACE[..prefix.len().min(H2_PREFACE.len())];
    if prefix.starts_with(preface) {
        return (prefix.len() >= H2_PREFACE.len()).then_some(Detected::Http);
    }
    http1_request_line(prefix)
}

/// How an HTTP listener's connection opens ([`opening`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// An HTTP/1 request line or the exact HTTP/2 connection preface: the HTTP server
    /// takes it from here (and answers a malformed HTTP/1 request with 400).
    Http,
    /// Neither: an invalid HTTP/2 connection preface (RFC 9113 §3.4), a connection
    /// error of type PROTOCOL_ERROR.
    InvalidPreface,
}

/// What the first bytes of a connection to an HTTP listener (HTTP/1.1 and h2 with prior
/// knowledge on one port) say; `None` while they do not decide yet.
///
/// Bytes that start like the preface (`PRI `) must be the whole preface. Otherwise the
/// first line (after the empty lines RFC 9112 §2.2 lets a server skip) must end in an
/// HTTP/1 version (`HTTP/1.` and a digit): a line that does not is no HTTP/1 request,
/// and the only other protocol such a listener speaks is HTTP/2, so it is read as an
/// invalid preface. A first line longer than `max_line` is left to the HTTP server
/// (which answers 414 or 400).
pub fn opening(prefix: &[u8], max_line: usize) -> Option<Opening> {
    let start = prefix.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let p = &prefix[start..];
    let n = p.len().min(H2_PREFACE.len());
    if p[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Opening::Http);
    }
    if p.starts_with(b"PRI ") {
        return Some(Opening::InvalidPreface);
    }
    let Some(end) = p.iter().position(|&b| b == b'\n') else {
        return (p.len() > max_line).then_some(Opening::Http);
    };
    let line = p[..end].strip_suffix(b"\r").unwrap_or(&p[..end]);
    let http1 = line.len() >= 9 && {
        let (head, version) = line.split_at(line.len() - 9);
        !head.is_empty() && version.starts_with(b" HTTP/1.") && version[8].is_ascii_digit()
    };
    Some(if http1 {
        Opening::Http
    } else {
        Opening::InvalidPreface
    })
}

/// A TLS record header (`16 03 0x`, length) and the handshake type ClientHello (1).
fn tls_hello(prefix: &[u8]) -> Option<Detected> {
    let expect: [fn(u8) -> bool; 6] = [
        |b| b == 0x16,
        |b| b == 0x03,
        |b| b <= 0x04,
        |_| true,
        |_| true,
        |b| b == 0x01,
    ];
    for (i, ok) in expect.iter().enumerate() {
        match prefix.get(i) {
            None => return None,
            Some(&b) if !ok(b) => return Some(Detected::Opaque),
            Some(_) => {}
        }
    }
    Some(Detected::Tls)
}

/// `METHOD SP request-target SP HTTP/1.1 CRLF`, as Envoy's HTTP inspector accepts it.
fn http1_request_line(prefix: &[u8]) -> Option<Detected> {
    const VERSION: &[u8] = b"HTTP/1.1\r\n";
    let is_token = |b: u8| b.is_ascii_uppercase() || b == b'-' || b == b'_';
    // The method: one or more upper-case token characters, then a space.
    let method_end = match prefix.iter().position(|&b| !is_token(b)) {
        None if prefix.len() > 32 => return Some(Detected::Opaque),
        None => return None,
        Some(0) => return Some(Detected::Opaque),
        Some(i) if prefix[i] != b' ' => return Some(Detected::Opaque),
        Some(i) => i,
    };
    let rest = &prefix[method_end + 1..];
    // The target: visible characters up to the next space.
    let target_end = match rest.iter().position(|&b| !b.is_ascii_graphic()) {
        None if prefix.len() > MAX_REQUEST_LINE => return Some(Detected::Opaque),
        None => return None,
        Some(0) => return Some(Detected::Opaque),
        Some(i) if rest[i] != b' ' => return Some(Detected::Opaque),
        Some(i) => i,
    };
    let version = &rest[target_end + 1..];
    let seen = &VERSION[..version.len().min(VERSION.len())];
    if !version.starts_with(seen) {
        return Some(Detected::Opaque);
    }
    (version.len() >= VERSION.len()).then_some(Detected::Http)
}

/// Peeks at `tcp` until its first bytes decide what it carries (see the module docs);
/// with `timeout`, a connection undecided by then is [`Detected::Opaque`]. Nothing is
/// consumed.
pub async fn detect(tcp: &TcpStream, timeout: Option<Duration>) -> Detected {
    let peeking = async {
        let mut buf = vec![0u8; MAX_REQUEST_LINE + 1];
        let mut seen = 0;
        loop {
            let n = match tcp.peek(&mut buf).await {
                Ok(0) | Err(_) => return Detected::Opaque,
                Ok(n) => n,
            };
            if n > seen {
                seen = n;
                if let Some(detected) = classify(&buf[..n]) {
                    return detected;
                }
            }
            if n == buf.len() {
                return Detected::Opaque;
            }
            // The client closed its side with the bytes still undecided: nothing more
            // will decide them (peeking alone would see the same bytes forever).
            match tcp.ready(tokio::io::Interest::READABLE).await {
                Ok(ready) if !ready.is_read_closed() => {}
                _ => return Detected::Opaque,
            }
            // More is on its way: peeking again at once would spin.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    match timeout {
        Some(t) => tokio::time::timeout(t, peeking)
            .await
            .unwrap_or(Detected::Opaque),
        None => peeking.await,
    }
}

/// How long a TLS connection has to send its whole ClientHello once detected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP egress listener for one service port (`listeners.tcp`): each connection goes
/// where its port's protocol, or its first bytes, say (see the module docs).
#[derive(Clone)]
pub struct Egress {
    tcp: TcpOutbound,
    http: HttpService,
    mesh: Mesh,
    host: String,
    port: u16,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// Connections to `host:port` accepted on `listener`; a port of no declared protocol
    /// waits for its client's first bytes as long as it takes (Istio's default, see
    /// [`detection_timeout`](Self::detection_timeout)).
    pub fn new(mesh: &Mesh, host: &str, port: u16, listener: Option<SocketAddr>) -> Self {
        let outbound = mesh.outbound();
        let http = match listener {
            Some(address) => outbound.on_listener(address).boxed(),
            None => outbound.boxed(),
        };
        let host = mesh
            .router()
            .snapshot()
            .table()
            .naming()
            .qualify(host, &mesh.workload().namespace);
        Self {
            tcp: mesh.tcp_outbound(&host, port),
            http,
            mesh: mesh.clone(),
            host,
            port,
            timeout: None,
        }
    }

    /// Waits at most `timeout` for the first bytes of a connection to a port of no
    /// declared protocol, then takes it as opaque TCP (`None` or zero: no limit).
    #[must_use]
    pub fn detection_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// The accept function of [`serve::run`](crate::serve::run): HTTP connections are
    /// returned to be served by the outbound HTTP stack; TLS and opaque TCP connections
    /// are proxied on a task of their own and `None` is returned.
    pub async fn accept(
        self,
        tcp: TcpStream,
        remote: SocketAddr,
    ) -> Option<(
        TcpStream,
        impl tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<mesh_core::body::BoxBody>,
            Error = mesh_core::BoxError,
            Future = impl Send + 'static,
        > + Clone
        + Send
        + 'static,
    )> {
        let protocol = self
            .mesh
            .router()
            .snapshot()
            .table()
            .port_protocol(&self.host, self.port);
        let detected = match declared(protocol, self.port) {
            Some(declared) => declared,
            None => detect(&tcp, self.timeout).await,
        };
        tracing::debug!(host = %self.host, port = self.port, %remote, ?detected, "egress connection");
        match detected {
            Detected::Http => {
                let local = tcp.local_addr().ok()?;
                let ctx = mesh_tls::ConnectionContext::plaintext(remote, local);
                Some((tcp, crate::stack::inbound::per_connection(self.http, ctx)))
            }
            Detected::Tls => {
                tokio::spawn(proxy_by_sni(self.tcp, tcp));
                None
            }
            Detected::Opaque => {
                tokio::spawn(async move { self.tcp.proxy(tcp).await });
                None
            }
        }
    }
}

/// Proxies a TLS connection, untouched, by the SNI of its ClientHello through the
/// service's VirtualService `tls` routes; without a usable SNI it goes by its port, as
/// the listener's TCP chain would take it.
pub(crate) async fn proxy_by_sni(outbound: TcpOutbound, tcp: TcpStream) {
    let sni = tokio::time::timeout(HELLO_TIMEOUT, mesh_tls::sni::peek_server_name(&tcp)).await;
    match sni {
        Ok(Ok(Some(sni))) => outbound.proxy_tls(tcp, &sni).await,
        _ => outbound.proxy(tcp).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A ClientHello from rustls for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(mesh_tls::provider())
            .with_protocol_versions(mesh_tls::PROTOCOL_VERSIONS)
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// Every prefix of `bytes` shorter than `decided_at` is undecided; from there on,
    /// every prefix says `want`.
    fn decides(bytes: &[u8], decided_at: usize, want: Detected) {
        for n in 0..decided_at {
            assert_eq!(classify(&bytes[..n]), None, "{:?}", &bytes[..n]);
        }
        for n in decided_at..=bytes.len() {
            assert_eq!(classify(&bytes[..n]), Some(want), "{:?}", &bytes[..n]);
        }
    }

    #[test]
    fn http1_is_decided_at_the_end_of_the_request_line() {
        let req = b"GET /pay?x=1 HTTP/1.1\r\nHost: payment-service\r\n\r\n";
        decides(req, b"GET /pay?x=1 HTTP/1.1\r\n".len(), Detected::Http);
        let req = b"POST http://a/b HTTP/1.1\r\n";
        decides(req, req.len(), Detected::Http);
    }

    #[test]
    fn the_h2_preface_is_http() {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        decides(&bytes, H2_PREFACE.len(), Detected::Http);
    }

    #[test]
    fn an_http_listener_takes_http1_lines_and_the_exact_preface_only() {
        let max = 64;
        assert_eq!(opening(b"GET / HTTP/1.1\r\n", max), Some(Opening::Http));
        assert_eq!(
            opening(b"\r\nget /a b HTTP/1.0\n", max),
            Some(Opening::Http)
        );
        assert_eq!(opening(b"GET / HTTP/1.1", max), None);
        assert_eq!(opening(H2_PREFACE, max), Some(Opening::Http));
        assert_eq!(opening(&H2_PREFACE[..23], max), None);
        assert_eq!(
            opening(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", max),
            Some(Opening::InvalidPreface)
        );
        assert_eq!(
            opening(b"INVALID CONNECTION PREFACE\r\n\r\n", max),
            Some(Opening::InvalidPreface)
        );
        assert_eq!(
            opening(b"GET / HTTP/2.0\r\n", max),
            Some(Opening::InvalidPreface)
        );
        assert_eq!(
            opening(b"\x00\x00\x00\x04\n", max),
            Some(Opening::InvalidPreface)
        );
        // A line too long to judge is the HTTP server's (414).
        assert_eq!(opening(&[b'a'; 65], max), Some(Opening::Http));
        assert_eq!(opening(b"\r\n", max), None);
    }

    #[test]
    fn a_client_hello_is_tls() {
        let hello = client_hello("api.example.com");
        decides(&hello, 6, Detected::Tls);
    }

    #[test]
    fn other_protocols_are_opaque_as_soon_as_a_byte_disagrees() {
        // Redis' inline and RESP commands, a PostgreSQL startup message, HTTP/1.0,
        // a lower-case method, a TLS record that is not a handshake.
        for (bytes, decided_at) in [
            (&b"*1\r\n$4\r\nPING\r\n"[..], 1),
            (b"PING\r\n", 5),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 1),
            (b"GET / HTTP/1.0\r\n", 14),
            (b"get / HTTP/1.1\r\n", 1),
            (b"\x17\x03\x03\x00\x10", 1),
            (b"\x16\x03\x01\x00\x10\x02", 6),
        ] {
            decides(bytes, decided_at, Detected::Opaque);
        }
    }

    #[test]
    fn declared_protocols_skip_detection_and_server_first_ports_are_tcp() {
        assert_eq!(declared(Some(PortProtocol::Http), 80), Some(Detected::Http));
        assert_eq!(
            declared(Some(PortProtocol::Http2), 80),
            Some(Detected::Http)
        );
        assert_eq!(declared(Some(PortProtocol::Tls), 443), Some(Detected::Tls));
        assert_eq!(
            declared(Some(PortProtocol::Tcp), 6379),
            Some(Detected::Opaque)
        );
        assert_eq!(declared(Some(PortProtocol::Auto), 8080), None);
        assert_eq!(declared(None, 8080), None);
        assert_eq!(
            declared(Some(PortProtocol::Auto), 3306),
            Some(Detected::Opaque)
        );
        assert_eq!(declared(None, 27017), Some(Detected::Opaque));
    }

    /// A connected pair: the accepted side and the client.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    #[tokio::test]
    async fn split_reads_are_waited_for_and_nothing_is_consumed() {
        for (bytes, want) in [
            (
                b"GET /pay HTTP/1.1\r\nHost: p\r\n\r\n".to_vec(),
                Detected::Http,
            ),
            (H2_PREFACE.to_vec(), Detected::Http),
            (client_hello("api.example.com"), Detected::Tls),
            (b"*1\r\n$4\r\nPING\r\n".to_vec(), Detected::Opaque),
        ] {
            let (mut server, mut client) = pair().await;
            let sent = bytes.clone();
            let writer = tokio::spawn(async move {
                // One byte, then the rest: the first read never decides alone unless
                // the first byte already disagrees with every protocol.
                client.write_all(&sent[..1]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
                client.write_all(&sent[1..]).await.unwrap();
                client
            });
            assert_eq!(detect(&server, None).await, want);
            let mut read = vec![0u8; bytes.len()];
            server.read_exact(&mut read).await.unwrap();
            assert_eq!(read, bytes, "every byte stays for the next reader");
            drop(writer.await.unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        // A server-first protocol: the client waits for the server's greeting.
        let (server, client) = pair().await;
        let start = tokio::time::Instant::now();
        let detected = detect(&server, Some(Duration::from_secs(5))).await;
        assert_eq!(detected, Detected::Opaque);
        assert!(start.elapsed() >= Duration::from_secs(5));
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_detection_waits_for_the_client() {
        let (server, client) = pair().await;
        let waiting = tokio::time::timeout(Duration::from_secs(3600), detect(&server, None));
        assert!(waiting.await.is_err(), "decided without a byte");
        drop(client);
    }

    #[tokio::test]
    async fn a_connection_that_ends_undecided_is_opaque() {
        let (server, mut client) = pair().await;
        // Half a request line, then the end.
        client.write_all(b"GET /pa").await.unwrap();
        client.shutdown().await.unwrap();
        drop(client);
        let detected = tokio::time::timeout(Duration::from_secs(5), detect(&server, None)).await;
        assert_eq!(detected, Ok(Detected::Opaque));
    }
}
