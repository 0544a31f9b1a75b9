//! HTTP/2 requests that are not well-formed (RFC 9113 §8.1-8.3), in raw frames over
//! TCP to the outbound listener (h2c): each is refused with a stream error or 400 and
//! reaches no one, which a recording upstream (itself h2c, so trailers travel) shows;
//! an invalid connection preface gets GOAWAY(PROTOCOL_ERROR) instead of an HTTP/1
//! answer; connection and stream errors carry the codes RFC 9113 names (the workspace
//! pins a patched h2 for them, `third_party/h2/PATCHES.md`); and a SETTINGS flood on one
//! TLS connection gets GOAWAY(ENHANCE_YOUR_CALM) while another connection is served.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::frames::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request as the upstream received it: path and, when its body arrived whole, the
/// trailers.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    trailers: Option<http::HeaderMap>,
    whole: bool,
}

/// An h2c upstream that records every request it receives.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let record = record.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let at = {
                                let mut seen = record.lock().unwrap();
                                seen.push(Seen {
                                    path,
                                    trailers: None,
                                    whole: false,
                                });
                                seen.len() - 1
                            };
                            if let Ok(body) = req.into_body().collect().await {
                                let mut seen = record.lock().unwrap();
                                seen[at].whole = true;
                                seen[at].trailers = body.trailers().cloned();
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// A sidecar whose service `localhost:<outbound port>` (an `http2` port) is the
/// recorder, reached over h2c.
async fn sidecar(world: &World, upstream: SocketAddr) -> Proxy {
    let ports = Ports::new();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: localhost, namespace: production}}
spec:
  hosts: [localhost]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: {outbound}, name: http2, protocol: HTTP2}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http2: {app}}}}}
",
        outbound = ports.outbound,
        app = upstream.port(),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    start_sidecar(world, "order-service", &config, ports, upstream).await
}

/// An HPACK header block of literal fields without indexing and without Huffman
/// coding: every byte the test chooses reaches the proxy's decoder as written.
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        b.push(u8::try_from(name.len()).unwrap());
        b.extend_from_slice(name.as_bytes());
        b.push(u8::try_from(value.len()).unwrap());
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// What the proxy did with stream 1.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// A response with this status (0: a status the test does not decode).
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection ended without any of those.
    Closed,
}

/// The status of a response header block the proxy encoded (HPACK static-table
/// references and plain literals; h2 writes `:status` first).
fn status_of(block: &[u8]) -> u16 {
    match block.first() {
        Some(0x88) => 200,
        Some(0x8c) => 400,
        Some(0x8d) => 404,
        Some(0x8e) => 500,
        // A literal whose name is `:status` (static index 8), value not Huffman-coded.
        Some(b) if b & 0x0f == 8 && block.get(1).is_some_and(|l| l & 0x80 == 0) => {
            let len = usize::from(block[1]);
            std::str::from_utf8(&block[2..2 + len])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// Opens an h2c connection (preface, empty SETTINGS).
async fn connect(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tcp.write_all(&hello).await.unwrap();
    tcp
}

/// Sends stream 1 as `frames` on a new connection and reads until the proxy answers it
/// (response head, reset or GOAWAY), or 10 s.
async fn exchange(addr: SocketAddr, frames: &[Vec<u8>]) -> Outcome {
    let mut tcp = connect(addr).await;
    for f in frames {
        tcp.write_all(f).await.unwrap();
    }
    let answer = async {
        while let Some((kind, flags, stream, payload)) = read_frame(&mut tcp).await {
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    let _ = tcp.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                HEADERS if stream == 1 => return Outcome::Status(status_of(&payload)),
                RST_STREAM if stream == 1 => {
                    return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                GOAWAY => {
                    return Outcome::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
                _ => {}
            }
        }
        Outcome::Closed
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("no answer to stream 1 within 10 s")
}

/// A request head: `:method` `:scheme` `:authority` `:path`, then `extra`.
fn head<'a>(
    method: &'a str,
    scheme: &'a str,
    authority: &'a str,
    path: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut fields = vec![
        (":method", method),
        (":scheme", scheme),
        (":authority", authority),
        (":path", path),
    ];
    fields.extend_from_slice(extra);
    fields
}

fn refused(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Status(400) | Outcome::Reset(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_h2_requests_are_refused_and_reach_no_one() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let proxy = sidecar(&world, upstream.addr).await;
    let addr = proxy.outbound();
    let authority = format!("localhost:{}", addr.port());
    let a = authority.as_str();
    let userinfo = format!("user:pw@{a}");

    // Well-formed, with a `host` that agrees and `te: trailers`: forwarded.
    let ok = head(
        "GET",
        "http",
        a,
        "/fine",
        &[("host", a), ("te", "trailers")],
    );
    let outcome = exchange(
        addr,
        &[frame(HEADERS, END_STREAM | END_HEADERS, 1, &block(&ok))],
    )
    .await;
    assert_eq!(outcome, Outcome::Status(200), "{}", proxy.output());
    let seen = upstream.take();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/fine");

    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("empty :path", head("GET", "http", a, "", &[])),
        (
            "userinfo in :authority",
            head("GET", "http", &userinfo, "/x", &[]),
        ),
        ("unknown :scheme", head("GET", "ftp", a, "/x", &[])),
        (
            "leading whitespace",
            head("GET", "http", a, "/x", &[("x-a", " v")]),
        ),
        (
            "trailing whitespace",
            head("GET", "http", a, "/x", &[("x-a", "v\t")]),
        ),
        (
            "host disagreeing with :authority",
            head("GET", "http", a, "/x", &[("host", "admin.internal")]),
        ),
        (
            "connection",
            head("GET", "http", a, "/x", &[("connection", "close")]),
        ),
        (
            "keep-alive",
            head("GET", "http", a, "/x", &[("keep-alive", "1")]),
        ),
        (
            "transfer-encoding",
            head("GET", "http", a, "/x", &[("transfer-encoding", "chunked")]),
        ),
        (
            "upgrade",
            head("GET", "http", a, "/x", &[("upgrade", "websocket")]),
        ),
        ("te: gzip", head("GET", "http", a, "/x", &[("te", "gzip")])),
        (
            "te: trailers, gzip",
            head("GET", "http", a, "/x", &[("te", "trailers, gzip")]),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, fields) in cases {
        let outcome = exchange(
            addr,
            &[frame(HEADERS, END_STREAM | END_HEADERS, 1, &block(&fields))],
        )
        .await;
        let seen = upstream.take();
        println!("{name}: {outcome:?}, {} forwarded", seen.len());
        if !refused(&outcome) || !seen.is_empty() {
            wrong.push(format!("{name}: {outcome:?}, forwarded {seen:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", proxy.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_that_may_not_be_forwarded_reset_the_stream() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let proxy = sidecar(&world, upstream.addr).await;
    let addr = proxy.outbound();
    let authority = format!("localhost:{}", addr.port());
    let post = head("POST", "http", &authority, "/upload", &[]);
    let with_trailers = |trailers: &[(&str, &str)]| {
        vec![
            frame(HEADERS, END_HEADERS, 1, &block(&post)),
            frame(DATA, 0, 1, b"abc"),
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &block(trailers)),
        ]
    };

    // Ordinary trailers go through.
    let outcome = exchange(addr, &with_trailers(&[("x-checksum", "900150983cd24fb0")])).await;
    assert_eq!(outcome, Outcome::Status(200), "{}", proxy.output());
    let seen = upstream.take();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].whole);
    assert_eq!(
        seen[0].trailers.as_ref().unwrap()["x-checksum"],
        "900150983cd24fb0"
    );

    for (name, trailers, want) in [
        ("content-length", vec![("content-length", "3")], None),
        ("host", vec![("host", "admin.internal")], None),
        ("connection-specific", vec![("connection", "close")], None),
        ("trailing whitespace", vec![("x-checksum", "abc ")], None),
        // A trailer section must not contain pseudo-header fields (RFC 9113 §8.1): the
        // request is malformed, a stream error of type PROTOCOL_ERROR.
        (":path", vec![(":path", "/admin")], Some(PROTOCOL_ERROR)),
        (":method", vec![(":method", "DELETE")], Some(PROTOCOL_ERROR)),
        (":status", vec![(":status", "200")], Some(PROTOCOL_ERROR)),
        (
            ":authority",
            vec![(":authority", "admin.internal")],
            Some(PROTOCOL_ERROR),
        ),
        (
            ":path after a regular field",
            vec![("x-checksum", "900150983cd24fb0"), (":path", "/admin")],
            Some(PROTOCOL_ERROR),
        ),
    ] {
        let outcome = exchange(addr, &with_trailers(&trailers)).await;
        // The request head may already be on its way: the client's answer is a 400 or a
        // reset (with the RFC's code where it names one), and the upstream never gets a
        // whole body or those trailers.
        match want {
            Some(code) => assert_eq!(outcome, Outcome::Reset(code), "{name}\n{}", proxy.output()),
            None => assert!(
                refused(&outcome) || matches!(outcome, Outcome::Reset(_)),
                "{name}: {outcome:?}\n{}",
                proxy.output()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for seen in upstream.take() {
            assert!(
                !seen.whole && seen.trailers.is_none(),
                "{name}: the upstream got the trailers: {seen:?}"
            );
        }
    }
    // The connection-level state is intact: the next request on a new connection is
    // served, trailers and all.
    let outcome = exchange(addr, &with_trailers(&[("x-checksum", "1")])).await;
    assert_eq!(outcome, Outcome::Status(200), "{}", proxy.output());
    assert_eq!(upstream.take().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_preface_gets_goaway_and_http1_still_works() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let proxy = sidecar(&world, upstream.addr).await;
    let addr = proxy.outbound();
    for opening in [
        &b"INVALID CONNECTION PREFACE\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        b"GET / HTTP/2.0\r\n\r\n",
    ] {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(opening).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
            .await
            .expect("the connection was not closed")
            .unwrap();
        // Exactly GOAWAY(last stream 0, PROTOCOL_ERROR), then the end of the connection.
        assert_eq!(
            got,
            frame(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 1]),
            "{:?}: {}",
            String::from_utf8_lossy(opening),
            String::from_utf8_lossy(&got)
        );
    }
    assert!(upstream.take().is_empty());
    // HTTP/1.1, with the empty line a client may send first, is served as before.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "\r\nGET /h1 HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n\r\n",
        addr.port()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(upstream.take().len(), 1);
}

/// An mTLS connection (a mesh SVID, ALPN `h2`) to the inbound listener of the
/// order-service sidecar at `inbound`.
async fn mtls(world: &World, inbound: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    use mesh_tls::{CertStore, CertificateAuthority, ClientTls, SecureNaming};
    let ca = CertificateAuthority::load_dir(&world.ca_dir).unwrap();
    let svid = ca.issue("production", "payment-service").unwrap();
    let client = ClientTls::new(CertStore::from_issued(&svid).unwrap());
    let naming = SecureNaming::only(
        mesh_core::Identity::parse("spiffe://cluster.local/ns/production/sa/order-service")
            .unwrap(),
    );
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("order-service").unwrap();
    client
        .connect_to(tcp, name, &naming, &[b"h2"])
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_flood_on_a_tls_listener_leaves_other_connections_served() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let proxy = sidecar(&world, upstream.addr).await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], proxy.ports.inbound));
    // One connection sends SETTINGS frames as fast as it can and reads the ACKs as fast
    // as they come, so no back-pressure slows it down.
    let tls = mtls(&world, inbound).await;
    let (mut rx, mut tx) = tokio::io::split(tls);
    let stop = tokio_util::sync::CancellationToken::new();
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut hello = PREFACE.to_vec();
            hello.extend(frame(SETTINGS, 0, 0, &[]));
            tx.write_all(&hello).await.unwrap();
            let one = frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]);
            let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1024).collect();
            while !stop.is_cancelled() && tx.write_all(&burst).await.is_ok() {}
        })
    };
    // What the flooding connection gets back: SETTINGS ACKs, then a GOAWAY.
    let drain = tokio::spawn(async move {
        let mut acks = 0usize;
        while let Some((kind, flags, _, payload)) = read_frame(&mut rx).await {
            match kind {
                SETTINGS if flags & ACK != 0 => acks += 1,
                GOAWAY => {
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    return (acks, Some(code));
                }
                _ => {}
            }
        }
        (acks, None)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile requests on another connection to the same listener are answered.
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(mtls(&world, inbound).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..5 {
        let req = http::Request::get(format!("http://order-service/during-flood-{i}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let res = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
            .await
            .expect("no answer during the flood")
            .unwrap();
        assert_eq!(res.status(), 200, "{}", proxy.output());
    }
    assert_eq!(upstream.take().len(), 5);
    // The flooding connection was told to calm down and closed.
    let (acks, goaway) = tokio::time::timeout(Duration::from_secs(30), drain)
        .await
        .expect("the flooding connection was not closed")
        .unwrap();
    stop.cancel();
    flood.abort();
    println!("{acks} SETTINGS frames acknowledged before the GOAWAY");
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "{}", proxy.output());
    assert!(acks <= 1001, "{acks} SETTINGS acknowledged");
}

/// Sends `frames` on a new connection and reads until the proxy ends it; the GOAWAY or
/// reset it sent, or `Closed` (within 10 s).
async fn error_for(addr: SocketAddr, frames: &[Vec<u8>]) -> Outcome {
    let mut tcp = connect(addr).await;
    for f in frames {
        if tcp.write_all(f).await.is_err() {
            break;
        }
    }
    let answer = async {
        while let Some((kind, _, stream, payload)) = read_frame(&mut tcp).await {
            match kind {
                RST_STREAM if stream == 1 => {
                    return Outcome::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                GOAWAY => {
                    return Outcome::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                }
                _ => {}
            }
        }
        Outcome::Closed
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("the proxy did not end the connection within 10 s")
}

const PROTOCOL_ERROR: u32 = 1;
const FLOW_CONTROL_ERROR: u32 = 3;
const FRAME_SIZE_ERROR: u32 = 6;
const COMPRESSION_ERROR: u32 = 9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_stream_errors_carry_the_code_the_rfc_names() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let proxy = sidecar(&world, upstream.addr).await;
    let addr = proxy.outbound();
    let authority = format!("localhost:{}", addr.port());
    let open = frame(
        HEADERS,
        END_HEADERS,
        1,
        &block(&head("POST", "http", &authority, "/upload", &[])),
    );
    let cases: Vec<(&str, Vec<Vec<u8>>, Outcome)> = vec![
        (
            "§4.3 an undecodable header block (index 0)",
            vec![frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x80])],
            Outcome::GoAway(COMPRESSION_ERROR),
        ),
        (
            "§4.3 a header block referring past the tables",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[0xff, 0xf0, 0x7f],
            )],
            Outcome::GoAway(COMPRESSION_ERROR),
        ),
        (
            "§4.3 a header block cut short in a literal",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[0x00, 0x05, b'x'],
            )],
            Outcome::GoAway(COMPRESSION_ERROR),
        ),
        (
            "§4.3 a Huffman string containing EOS",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[0x00, 0x84, 0xff, 0xff, 0xff, 0xff, 0x01, b'v'],
            )],
            Outcome::GoAway(COMPRESSION_ERROR),
        ),
        (
            "§4.3 a table size update above SETTINGS_HEADER_TABLE_SIZE",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &[0x3f, 0xe1, 0xff, 0x03],
            )],
            Outcome::GoAway(COMPRESSION_ERROR),
        ),
        (
            "§8.2.1 an upper-case field name (it decodes: malformed, not a compression error)",
            vec![frame(
                HEADERS,
                END_HEADERS | END_STREAM,
                1,
                &block(&head("GET", "http", &authority, "/x", &[("X-Up", "v")])),
            )],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
        (
            "§4.2 DATA over SETTINGS_MAX_FRAME_SIZE",
            vec![open.clone(), frame(DATA, 0, 1, &[b'x'; 16385])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§6.5 SETTINGS of a length not a multiple of 6",
            vec![frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§6.5 SETTINGS ACK with a payload",
            vec![frame(SETTINGS, ACK, 0, &[0, 3, 0, 0, 0, 1])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§6.7 PING of 7 octets",
            vec![frame(PING, 0, 0, &[0; 7])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§6.9 WINDOW_UPDATE of 3 octets",
            vec![frame(WINDOW_UPDATE, 0, 0, &[0, 0, 1])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§6.9 WINDOW_UPDATE of 3 octets on a stream (still a connection error)",
            vec![open.clone(), frame(WINDOW_UPDATE, 0, 1, &[0, 0, 1])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§4.2 GOAWAY of 7 octets",
            vec![frame(GOAWAY, 0, 0, &[0; 7])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§6.4 RST_STREAM of 3 octets",
            vec![open.clone(), frame(RST_STREAM, 0, 1, &[0, 0, 0])],
            Outcome::GoAway(FRAME_SIZE_ERROR),
        ),
        (
            "§6.3 PRIORITY of 4 octets (a stream error)",
            vec![open.clone(), frame(PRIORITY, 0, 1, &[0, 0, 0, 3])],
            Outcome::Reset(FRAME_SIZE_ERROR),
        ),
        (
            "§6.9.1 WINDOW_UPDATE beyond 2^31-1 on the connection",
            vec![frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes())],
            Outcome::GoAway(FLOW_CONTROL_ERROR),
        ),
        (
            "§6.5.2 SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
            vec![frame(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0])],
            Outcome::GoAway(FLOW_CONTROL_ERROR),
        ),
        (
            "§6.5.2 SETTINGS_MAX_FRAME_SIZE below 2^14 (PROTOCOL_ERROR, not FLOW_CONTROL_ERROR)",
            vec![frame(SETTINGS, 0, 0, &[0, 5, 0, 0, 0x3f, 0xff])],
            Outcome::GoAway(PROTOCOL_ERROR),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, frames, want) in cases {
        let got = error_for(addr, &frames).await;
        println!("{name}: {got:?}");
        if got != want {
            wrong.push(format!("{name}: {got:?}, the RFC names {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    // None of those requests reached the upstream whole.
    for seen in upstream.take() {
        assert!(!seen.whole, "{seen:?}");
    }
    // The proxy goes on serving.
    let fields = head("GET", "http", &authority, "/after", &[]);
    let outcome = exchange(
        addr,
        &[frame(HEADERS, END_STREAM | END_HEADERS, 1, &block(&fields))],
    )
    .await;
    assert_eq!(outcome, Outcome::Status(200), "{}", proxy.output());
}
