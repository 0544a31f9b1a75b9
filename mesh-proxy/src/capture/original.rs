//! The original destination of a redirected connection.

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination `tcp` was addressed to before a REDIRECT rule sent it to this
/// listener (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST` for IPv6, read from the
/// connection-tracking entry through socket2), or `None` when the connection was not
/// redirected: no entry (no NAT in the namespace, or a platform without it), or the
/// original destination is the listener's own address (a direct connection).
pub fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let socket = socket2::SockRef::from(tcp);
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            // An IPv4 connection on a dual-stack socket is tracked as IPv4.
            Some(_) => socket.original_dst_v4(),
            None => socket.original_dst_v6(),
        },
    }
    .ok()?
    .as_socket()?;
    let same = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
    };
    (!same(original, local)).then_some(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        assert_eq!(original_destination(&server), None);
    }
}
