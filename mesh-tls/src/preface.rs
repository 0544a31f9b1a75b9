//! What an upstream connection starts with before its own protocol: a PROXY protocol
//! header (DestinationRule `proxyProtocol`) and an HTTP tunnel (DestinationRule
//! `tunnel`), both written by [`UpstreamConnector`](crate::UpstreamConnector) right after
//! the TCP connect, before any TLS handshake.
//!
//! # PROXY protocol
//!
//! [`ProxyHeader`] encodes the header of the HAProxy PROXY protocol that Envoy's
//! `proxy_protocol` upstream transport socket sends: version 1, one text line
//! (`PROXY TCP4 <src> <dst> <sport> <dport>\r\n`), or version 2, the 12-byte signature,
//! command `PROXY` over TCP and the two addresses in binary. The addresses are the
//! downstream connection's: the client's address and the address it connected to. When
//! one is IPv4 and the other IPv6, the IPv4 address is written IPv4-mapped so that both
//! fit one family.
//!
//! # Tunnel
//!
//! [`Tunnel`] opens an HTTP/1.1 tunnel on the connection: `CONNECT host:port HTTP/1.1`,
//! and then waits for the proxy's response head. A 2xx opens the tunnel; any other status, or a head over 16 KiB, fails the
//! connection. Bytes the proxy sends after its head are not expected before the client
//! speaks (TLS and HTTP/1.1 start from the client) and fail the connection, so nothing
//! read is ever lost.
//!
//! A `POST` tunnel is refused: over HTTP/1.1 the tunnelled bytes would have to travel as
//! a chunked request body and a chunked response body, which this connector does not
//! frame; the connection fails with an error saying so rather than send bytes a proxy
//! would misread.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The PROXY protocol version of DestinationRule `proxyProtocol.version`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    /// Text header (Istio's default).
    #[default]
    V1,
    /// Binary header.
    V2,
}

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY protocol header for one downstream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProxyHeader {
    /// The version written.
    pub version: ProxyVersion,
    /// The downstream client's address.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

fn mapped(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

impl ProxyHeader {
    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (src, dst) = (self.source.ip(), self.destination.ip());
        let (sport, dport) = (self.source.port(), self.destination.port());
        match self.version {
            ProxyVersion::V1 => match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n").into_bytes()
                }
                _ => format!(
                    "PROXY TCP6 {} {} {sport} {dport}\r\n",
                    mapped(src),
                    mapped(dst)
                )
                .into_bytes(),
            },
            ProxyVersion::V2 => {
                let mut out = Vec::with_capacity(16 + 36);
                out.extend_from_slice(&V2_SIGNATURE);
                // Version 2, command PROXY.
                out.push(0x21);
                match (src, dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        // AF_INET, STREAM.
                        out.push(0x11);
                        out.extend_from_slice(&12u16.to_be_bytes());
                        out.extend_from_slice(&s.octets());
                        out.extend_from_slice(&d.octets());
                    }
                    _ => {
                        // AF_INET6, STREAM.
                        out.push(0x21);
                        out.extend_from_slice(&36u16.to_be_bytes());
                        out.extend_from_slice(&mapped(src).octets());
                        out.extend_from_slice(&mapped(dst).octets());
                    }
                }
                out.extend_from_slice(&sport.to_be_bytes());
                out.extend_from_slice(&dport.to_be_bytes());
                out
            }
        }
    }
}

/// The method of an HTTP tunnel (DestinationRule `tunnel.protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelMethod {
    /// `CONNECT host:port` (the default).
    #[default]
    Connect,
    /// `POST` (refused, see the module docs).
    Post,
}

/// An HTTP/1.1 tunnel through the endpoint (an egress proxy) to `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// CONNECT or POST.
    pub method: TunnelMethod,
    /// `targetHost`.
    pub host: String,
    /// `targetPort`.
    pub port: u16,
}

/// The longest proxy response head read.
const MAX_HEAD: usize = 16 * 1024;

impl Tunnel {
    /// The target as an authority (`[v6]:port` for IPv6 literals).
    fn authority(&self) -> String {
        match self.host.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]:{}", self.port),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }

    /// The request head that opens a CONNECT tunnel.
    pub fn request(&self) -> String {
        let authority = self.authority();
        format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n")
    }

    /// Opens the tunnel on `io`: sends the request and reads the response head.
    pub async fn open<IO: AsyncRead + AsyncWrite + Unpin>(&self, io: &mut IO) -> io::Result<()> {
        if self.method == TunnelMethod::Post {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "tunnel protocol POST is not supported (use CONNECT)",
            ));
        }
        io.write_all(self.request().as_bytes()).await?;
        io.flush().await?;
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        // Byte by byte: nothing after the head may be consumed here.
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "tunnel proxy response head over 16 KiB",
                ));
            }
            if io.read(&mut byte).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tunnel proxy closed the connection before answering",
                ));
            }
            head.push(byte[0]);
        }
        let status = parse_status(&head).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "tunnel proxy sent a malformed response",
            )
        })?;
        if !(200..300).contains(&status) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("tunnel proxy answered {status} to {}", self.authority()),
            ));
        }
        Ok(())
    }
}

/// The status code of an HTTP/1.x response head.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: ProxyVersion, src: &str, dst: &str) -> Vec<u8> {
        ProxyHeader {
            version,
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
        .encode()
    }

    #[test]
    fn v1_is_one_text_line() {
        assert_eq!(
            header(ProxyVersion::V1, "10.0.0.1:56324", "10.0.0.2:443"),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 56324 443\r\n"
        );
        assert_eq!(
            header(ProxyVersion::V1, "[2001:db8::1]:1000", "[::1]:80"),
            b"PROXY TCP6 2001:db8::1 ::1 1000 80\r\n"
        );
        // Mixed families: the IPv4 side is IPv4-mapped.
        assert_eq!(
            header(ProxyVersion::V1, "10.0.0.1:1", "[::1]:2"),
            b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n"
        );
    }

    #[test]
    fn v2_is_the_signature_then_binary_addresses() {
        let h = header(ProxyVersion::V2, "10.0.0.1:56324", "10.0.0.2:443");
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2]);
        want.extend_from_slice(&56324u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, want);
        let h = header(ProxyVersion::V2, "[2001:db8::1]:1000", "[::1]:80");
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(
            &h[16..32],
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&h[48..52], &[0x03, 0xe8, 0, 80]);
    }

    #[test]
    fn tunnel_requests() {
        let t = Tunnel {
            method: TunnelMethod::Connect,
            host: "api.example.com".into(),
            port: 443,
        };
        assert_eq!(
            t.request(),
            "CONNECT api.example.com:443 HTTP/1.1\r\nhost: api.example.com:443\r\n\r\n"
        );
        let t = Tunnel {
            method: TunnelMethod::Connect,
            host: "2001:db8::1".into(),
            port: 8443,
        };
        assert_eq!(
            t.request(),
            "CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nhost: [2001:db8::1]:8443\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_post_tunnel_is_refused_before_anything_is_sent() {
        let t = Tunnel {
            method: TunnelMethod::Post,
            host: "target".into(),
            port: 80,
        };
        let (mut client, mut server) = tokio::io::duplex(1024);
        let err = t.open(&mut client).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        drop(client);
        let mut sent = Vec::new();
        server.read_to_end(&mut sent).await.unwrap();
        assert!(sent.is_empty());
    }

    #[tokio::test]
    async fn a_tunnel_opens_on_2xx_only() {
        let t = Tunnel {
            method: TunnelMethod::Connect,
            host: "target".into(),
            port: 80,
        };
        for (answer, ok) in [
            (&b"HTTP/1.1 200 Connection established\r\n\r\n"[..], true),
            (
                b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
                false,
            ),
            (b"garbage\r\n\r\n", false),
            (b"HTTP/1.1 200 OK\r\n", false),
        ] {
            let (mut client, mut server) = tokio::io::duplex(1024);
            server.write_all(answer).await.unwrap();
            drop(server.shutdown().await);
            let got = t.open(&mut client).await;
            assert_eq!(
                got.is_ok(),
                ok,
                "{}: {got:?}",
                String::from_utf8_lossy(answer)
            );
        }
    }
}
