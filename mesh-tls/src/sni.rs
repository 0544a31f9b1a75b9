//! The server name a TLS client asks for, read from its ClientHello without consuming a
//! byte of the connection: what a proxy routes by when it passes TLS through untouched
//! (a gateway's `PASSTHROUGH` server).

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// The largest ClientHello looked at: one TLS record (16 KiB) and its header.
const MAX_HELLO: usize = 16 * 1024 + 5;

/// The SNI of the ClientHello at the start of `tcp`, which stays unread: `Ok(None)` for
/// a ClientHello without one; an error when the connection does not start with a TLS
/// ClientHello, ends first, or the hello is larger than one record. Waits for the whole
/// hello; bound the wait with a timeout.
pub async fn peek_server_name(tcp: &TcpStream) -> io::Result<Option<String>> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut seen = 0;
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if n > seen {
            seen = n;
            let mut acceptor = rustls::server::Acceptor::default();
            let mut bytes = &buf[..n];
            while !bytes.is_empty() {
                if acceptor.read_tls(&mut bytes)? == 0 {
                    break;
                }
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    return Ok(accepted.client_hello().server_name().map(str::to_owned));
                }
                Ok(None) => {}
                Err((e, _)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        if n == buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "ClientHello larger than one record",
            ));
        }
        // The rest of the hello is on its way: peeking again at once would spin.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A ClientHello for `name` from rustls, as bytes.
    fn client_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_protocol_versions(crate::PROTOCOL_VERSIONS)
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn the_name_is_read_and_every_byte_stays_for_the_next_reader() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = client_hello("secure.example.com");
        let sent = hello.clone();
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            // In two pieces: the peek waits for the whole hello.
            let (a, b) = sent.split_at(20);
            tcp.write_all(a).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tcp.write_all(b).await.unwrap();
            tcp
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        let name = peek_server_name(&tcp).await.unwrap();
        assert_eq!(name.as_deref(), Some("secure.example.com"));
        let mut read = vec![0u8; hello.len()];
        tcp.read_exact(&mut read).await.unwrap();
        assert_eq!(read, hello);
        drop(client.await.unwrap());
    }

    #[tokio::test]
    async fn plaintext_is_not_a_client_hello() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            tcp
        });
        let (tcp, _) = listener.accept().await.unwrap();
        assert!(peek_server_name(&tcp).await.is_err());
        drop(client.await.unwrap());
    }
}
