//! Graceful drain under load, as a rolling restart does it: many responses are still
//! streaming when the drain starts. Every response that has begun is delivered to its
//! last byte and its end (END_STREAM, the last chunk, the full Content-Length) before
//! the connection closes; only the drain deadline cuts one, and then the client sees an
//! error, never a short body that looks complete.
//!
//! The proxies run in-process (`Sidecar::start`, `Gateway::start`) and are drained
//! through their handles many times per test, so a race at the end of the drain shows.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::Identity;
use mesh_proxy::{Gateway, ProxyHandle, Settings, Sidecar};
use mesh_tls::{CertStore, CertificateAuthority, ClientTls, SecureNaming};
use support::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bytes in one chunk the application writes.
const CHUNK: usize = 1024;
/// Chunks in one streamed response (16 KiB).
const CHUNKS: usize = 16;
/// Time between two chunks: a response takes `CHUNKS * GAP` (~0.5 s) to stream.
const GAP: Duration = Duration::from_millis(30);
/// Concurrent streams per HTTP/2 connection.
const STREAMS: usize = 50;
/// Drains per test.
const DRAINS: usize = 20;

/// Byte `offset` of the response to request `id`: every response is different, so a
/// byte out of place or from another stream is seen.
fn byte(id: usize, offset: usize) -> u8 {
    u8::try_from((id * 7919 + offset) % 251).unwrap()
}

fn expected(id: usize, chunks: usize) -> Vec<u8> {
    (0..chunks * CHUNK).map(|o| byte(id, o)).collect()
}

/// An application that answers `GET /stream/<id>?chunks=<n>&length=<0|1>` with `n`
/// chunks of `CHUNK` bytes, the first at once and then one every `GAP`, with a
/// `Content-Length` when `length=1` (else chunked on HTTP/1.1).
struct Streamer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<usize> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

impl Streamer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let id: usize = req
                            .uri()
                            .path()
                            .rsplit('/')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let chunks = query(&req, "chunks").unwrap_or(CHUNKS);
                        let length = query(&req, "length") == Some(1);
                        let gap = query(&req, "gap_ms")
                            .map_or(GAP, |ms| Duration::from_millis(u64::try_from(ms).unwrap()));
                        let stream = futures_util::stream::unfold(0, move |i| async move {
                            if i == chunks {
                                return None;
                            }
                            if i > 0 {
                                tokio::time::sleep(gap).await;
                            }
                            let chunk: Bytes = (i * CHUNK..(i + 1) * CHUNK)
                                .map(|o| byte(id, o))
                                .collect::<Vec<u8>>()
                                .into();
                            Some((Ok::<_, Infallible>(Frame::data(chunk)), i + 1))
                        });
                        let mut res = Response::builder().status(200);
                        if length {
                            res = res.header("content-length", chunks * CHUNK);
                        }
                        Ok::<_, Infallible>(res.body(StreamBody::new(stream)).unwrap())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, task }
    }
}

/// Reads a response body to its end: the bytes, and whether it ended cleanly
/// (END_STREAM, the last chunk, all of Content-Length) or with an error.
async fn read_body(mut body: Incoming) -> (Vec<u8>, Result<(), String>) {
    let mut got = Vec::new();
    loop {
        match body.frame().await {
            None => return (got, Ok(())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return (got, Err(format!("{e:?}"))),
        }
    }
}

/// What was wrong with response `id`, if anything, given what `read_body` returned.
fn check(id: usize, chunks: usize, got: &[u8], end: &Result<(), String>) -> Option<String> {
    let want = expected(id, chunks);
    match end {
        Err(e) => Some(format!(
            "stream {id}: {} of {} bytes, then {e}",
            got.len(),
            want.len()
        )),
        Ok(()) if got != want => Some(format!(
            "stream {id}: ended cleanly with {} of {} bytes{}",
            got.len(),
            want.len(),
            if got.len() == want.len() {
                " (content differs)"
            } else {
                ""
            }
        )),
        Ok(()) => None,
    }
}

fn sidecar_settings(world: &World, app: SocketAddr, drain: &str) -> Settings {
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: payment-service, labels: {{app: payment-service}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0, app: {app}}}\n\
         limits: {{drainTimeout: {drain}}}\n",
        config = world.path("istio").display(),
        ca = world.ca_dir.display(),
    );
    Settings::from_yaml("payment-service.yaml", &yaml).unwrap()
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec:
  mtls: {mode: STRICT}
";

/// A world whose mesh config requires mTLS.
fn strict_world() -> World {
    let world = World::new();
    world.write_config("istio", "mesh.yaml", STRICT);
    world
}

/// An mTLS client of the payment-service sidecar: order-service's SVID from the
/// world's CA, payment-service expected as the server.
fn order_client(world: &World) -> (ClientTls, SecureNaming) {
    let ca = CertificateAuthority::load_dir(&world.ca_dir).unwrap();
    let svid = ca.issue("production", "order-service").unwrap();
    let client = ClientTls::new(CertStore::from_issued(&svid).unwrap());
    let payment =
        Identity::parse("spiffe://cluster.local/ns/production/sa/payment-service").unwrap();
    (client, SecureNaming::only(payment))
}

/// A client's end of a connection that reads with a lag, as a client behind a slow or
/// busy link does: when the proxy closes, the last bytes it sent are often still unread
/// in the client's socket buffer, where a TCP reset would destroy them.
struct Lagging<IO> {
    io: IO,
    lag: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// How long each read of a [`Lagging`] stream waits.
const LAG: Duration = Duration::from_millis(2);

impl<IO> Lagging<IO> {
    fn new(io: IO) -> Self {
        Self { io, lag: None }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Lagging<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let lag = self
            .lag
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LAG)));
        std::task::ready!(lag.as_mut().poll(cx));
        let read = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if read.is_ready() {
            self.lag = None;
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Lagging<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Connects to `addr` with a lagging reader.
async fn connect(addr: SocketAddr) -> Lagging<TcpStream> {
    Lagging::new(TcpStream::connect(addr).await.unwrap())
}

/// An HTTP/2 connection over `io` with the protocol's default flow-control windows
/// (64 KiB, as most clients keep them), so the client keeps sending WINDOW_UPDATE
/// frames while it reads.
async fn h2_connect<IO>(
    io: IO,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    JoinHandle<Result<(), String>>,
)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake(TokioIo::new(io))
        .await
        .unwrap();
    let conn = tokio::spawn(async move { conn.await.map_err(|e| format!("{e:?}")) });
    (send, conn)
}

/// Opens `STREAMS` streams on `send` for `GET <path>/<id>?<query>` with `Host: host`
/// and waits for every response head.
async fn open_streams(
    send: &hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
    query: &str,
) -> Vec<Incoming> {
    let mut heads = Vec::new();
    for id in 0..STREAMS {
        let mut send = send.clone();
        let req = Request::get(format!("http://{host}{path}/{id}?{query}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        heads.push(tokio::spawn(async move { send.send_request(req).await }));
    }
    let mut bodies = Vec::new();
    for (id, head) in heads.into_iter().enumerate() {
        let res = head
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {id}: {e:?}"));
        assert_eq!(res.status(), 200, "stream {id}");
        bodies.push(res.into_body());
    }
    bodies
}

/// Drains `proxy` while the `STREAMS` bodies on `send` stream; returns what went wrong.
async fn drain_during_h2_streams(
    proxy: ProxyHandle,
    send: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    conn: JoinHandle<Result<(), String>>,
    host: &str,
    path: &str,
) -> Vec<String> {
    let bodies = open_streams(&send, host, path, "").await;
    drop(send);
    let readers: Vec<_> = bodies
        .into_iter()
        .map(|b| tokio::spawn(read_body(b)))
        .collect();
    // The drain starts a quarter into the bodies.
    tokio::time::sleep(GAP * 4).await;
    proxy.shutdown();
    let waited = tokio::spawn(proxy.wait());
    let mut wrong = Vec::new();
    for (id, reader) in readers.into_iter().enumerate() {
        let (got, end) = reader.await.unwrap();
        wrong.extend(check(id, CHUNKS, &got, &end));
    }
    tokio::time::timeout(Duration::from_secs(10), waited)
        .await
        .expect("the proxy did not finish draining")
        .unwrap();
    // GOAWAY (NO_ERROR) then the close: the client connection ends without an error.
    if let Err(e) = conn.await.unwrap() {
        wrong.push(format!("connection: {e}"));
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delivers_every_h2_stream_in_flight_on_the_inbound_tls_listener() {
    let world = strict_world();
    let app = Streamer::start().await;
    let (client, naming) = order_client(&world);
    let mut failed = Vec::new();
    for round in 0..DRAINS {
        let proxy = Sidecar::start(sidecar_settings(&world, app.addr, "5s"))
            .await
            .unwrap();
        let tcp = connect(proxy.address("inbound").unwrap()).await;
        let (tls, _) = client
            .connect(tcp, "payment-service", &naming)
            .await
            .unwrap();
        let (send, conn) = h2_connect(tls).await;
        let wrong = drain_during_h2_streams(proxy, send, conn, "payment-service", "/stream").await;
        if !wrong.is_empty() {
            failed.push(format!(
                "drain {round}: {} failures: {wrong:#?}",
                wrong.len()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {DRAINS} drains lost data:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// Gateway settings (one plain HTTP server on port 80, bound to 127.0.0.1:0) routing
/// `api.example.com/stream` to payment-service.
fn gateway_settings(world: &World, drain: &str) -> Settings {
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: istio-ingressgateway, labels: {{istio: ingress}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:0}}\n\
         limits: {{drainTimeout: {drain}}}\n\
         gateway:\n  name: api-gateway\n  ports:\n    80: 127.0.0.1:0\n",
        config = world.path("gateway").display(),
        ca = world.ca_dir.display(),
    );
    Settings::from_yaml("gateway.yaml", &yaml).unwrap()
}

/// The gateway's config: its Gateway and VirtualService, and payment-service at the
/// sidecar's inbound address.
fn write_gateway_config(world: &World, inbound: SocketAddr) {
    let se = service_entry(
        "payment-service",
        8080,
        &[(inbound.port(), "v1", "payment-service")],
    );
    let gateway = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: api-gateway, namespace: production}
spec:
  selector: {istio: ingress}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [api.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api-routing, namespace: production}
spec:
  hosts: [api.example.com]
  gateways: [api-gateway]
  http:
  - match:
    - uri: {prefix: /stream}
    route:
    - destination: {host: payment-service, port: {number: 8080}}
";
    world.write_config(
        "gateway",
        "mesh.yaml",
        &format!("{se}---\n{STRICT}---\n{gateway}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delivers_every_h2_stream_in_flight_on_the_gateway_http_listener() {
    let world = strict_world();
    let app = Streamer::start().await;
    let sidecar = Sidecar::start(sidecar_settings(&world, app.addr, "5s"))
        .await
        .unwrap();
    write_gateway_config(&world, sidecar.address("inbound").unwrap());
    let mut failed = Vec::new();
    for round in 0..DRAINS {
        let proxy = Gateway::start(gateway_settings(&world, "5s"))
            .await
            .unwrap();
        let tcp = connect(proxy.address("gateway:80").unwrap()).await;
        let (send, conn) = h2_connect(tcp).await;
        let wrong = drain_during_h2_streams(proxy, send, conn, "api.example.com", "/stream").await;
        if !wrong.is_empty() {
            failed.push(format!(
                "drain {round}: {} failures: {wrong:#?}",
                wrong.len()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {DRAINS} drains lost data:\n{}",
        failed.len(),
        failed.join("\n")
    );
    sidecar.shutdown();
    sidecar.wait().await;
}

/// An HTTP/1.1 connection over mTLS to the sidecar's inbound listener (ALPN
/// `http/1.1`).
async fn h1_connect(
    world: &World,
    inbound: SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    JoinHandle<Result<(), String>>,
) {
    let (client, naming) = order_client(world);
    let mut config = (*client.config(&naming, None)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = connect(inbound).await;
    let name = rustls_pki_types::ServerName::try_from("payment-service").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name.to_owned(), tcp)
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(async move { conn.await.map_err(|e| format!("{e:?}")) });
    (send, conn)
}

/// Sends `GET /stream/<id>?<query>` on `send` once it is ready; the response head.
async fn h1_get(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    id: usize,
    query: &str,
) -> Response<Incoming> {
    send.ready().await.unwrap();
    let req = Request::get(format!("/stream/{id}?{query}"))
        .header("host", "payment-service")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200, "request {id}");
    res
}

/// One HTTP/1.1 response parsed from the start of `buf`: its length on the wire, its
/// framing (`chunked` or `content-length`) and its body; `None` while incomplete.
fn parse_response(buf: &[u8]) -> Option<(usize, &'static str, Vec<u8>)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 "), "{head}");
    if let Some(length) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap())
    {
        let end = head_end + length;
        return (buf.len() >= end).then(|| (end, "content-length", buf[head_end..end].to_vec()));
    }
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut body = Vec::new();
    let mut at = head_end;
    loop {
        let line_end = at + buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&buf[at..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        at = line_end + 2;
        if buf.len() < at + size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[at..at + size]);
        at += size + 2;
        if size == 0 {
            return Some((at, "chunked", body));
        }
    }
}

/// A TLS connector for the sidecar's inbound listener with order-service's SVID,
/// offering only HTTP/1.1 (ALPN `http/1.1`).
fn h1_connector(world: &World) -> tokio_rustls::TlsConnector {
    let (client, naming) = order_client(world);
    let mut config = (*client.config(&naming, None)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// An HTTP/1.1 keep-alive connection over mTLS to the sidecar's inbound listener,
/// spoken by hand so requests can be pipelined.
async fn h1_tls(
    tls: &tokio_rustls::TlsConnector,
    inbound: SocketAddr,
) -> tokio_rustls::client::TlsStream<Lagging<TcpStream>> {
    let name = rustls_pki_types::ServerName::try_from("payment-service").unwrap();
    tls.connect(name.to_owned(), connect(inbound).await)
        .await
        .unwrap()
}

fn get(id: usize, query: &str) -> String {
    format!("GET /stream/{id}?{query} HTTP/1.1\r\nHost: payment-service\r\n\r\n")
}

/// Reads from `conn` into `buf` until `done` holds for it; panics at the end of input.
async fn read_until<IO: AsyncRead + Unpin>(
    conn: &mut IO,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    use tokio::io::AsyncReadExt;
    while !done(buf) {
        let n = conn.read_buf(buf).await.unwrap();
        assert_ne!(n, 0, "closed early: {}", String::from_utf8_lossy(buf));
    }
}

/// Keep-alive connections per drain in the HTTP/1.1 test, half of them answered
/// chunked, half with Content-Length.
const H1_CONNECTIONS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delivers_every_http1_response_in_flight_chunked_and_with_content_length() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = strict_world();
    let app = Streamer::start().await;
    let tls = h1_connector(&world);
    let mut failed = Vec::new();
    for round in 0..DRAINS {
        let proxy = Sidecar::start(sidecar_settings(&world, app.addr, "5s"))
            .await
            .unwrap();
        let inbound = proxy.address("inbound").unwrap();
        let mut opened = Vec::new();
        for id in 0..H1_CONNECTIONS {
            let tls = tls.clone();
            opened.push(tokio::spawn(async move {
                let length = id % 2;
                let mut conn = h1_tls(&tls, inbound).await;
                // A first, short exchange: the connection is kept alive.
                conn.write_all(get(id, "chunks=1").as_bytes())
                    .await
                    .unwrap();
                let mut buf = Vec::new();
                read_until(&mut conn, &mut buf, |b| parse_response(b).is_some()).await;
                let (used, _, body) = parse_response(&buf).unwrap();
                assert_eq!(body, expected(id, 1));
                buf.drain(..used);
                // Then a response that is still streaming when the drain starts, and
                // the next request right behind it, as a pipelining client sends it.
                let pipelined = format!(
                    "{}{}",
                    get(id, &format!("length={length}")),
                    get(id, "chunks=1")
                );
                conn.write_all(pipelined.as_bytes()).await.unwrap();
                read_until(&mut conn, &mut buf, |b| {
                    b.windows(4).any(|w| w == b"\r\n\r\n")
                })
                .await;
                (conn, buf)
            }));
        }
        let mut readers = Vec::new();
        for open in opened {
            let (mut conn, mut buf) = open.await.unwrap();
            readers.push(tokio::spawn(async move {
                // Everything up to the close: the close must be clean (close_notify,
                // FIN), not a reset.
                let end = loop {
                    match conn.read_buf(&mut buf).await {
                        Ok(0) => break Ok(()),
                        Ok(_) => {}
                        Err(e) => break Err(format!("{e:?}")),
                    }
                };
                (buf, end)
            }));
        }
        tokio::time::sleep(GAP * 4).await;
        proxy.shutdown();
        let waited = tokio::spawn(proxy.wait());
        let mut wrong = Vec::new();
        for (id, reader) in readers.into_iter().enumerate() {
            let (buf, end) = reader.await.unwrap();
            let want = if id % 2 == 1 {
                "content-length"
            } else {
                "chunked"
            };
            match parse_response(&buf) {
                Some((used, framing, body)) => {
                    assert_eq!(framing, want, "response {id}");
                    wrong.extend(check(id, CHUNKS, &body, &end));
                    // The pipelined request is answered in full, or not at all (the
                    // connection closes after the response in flight and the client
                    // sends it again elsewhere).
                    let rest = &buf[used..];
                    let next = parse_response(rest);
                    if !rest.is_empty()
                        && next
                            .as_ref()
                            .is_none_or(|(n, _, body)| *n != rest.len() || *body != expected(id, 1))
                    {
                        wrong.push(format!(
                            "response {id}: {} bytes after it, not one whole response",
                            rest.len()
                        ));
                    }
                }
                None => wrong.push(format!(
                    "response {id}: incomplete ({} bytes on the wire), then {end:?}",
                    buf.len()
                )),
            }
        }
        tokio::time::timeout(Duration::from_secs(10), waited)
            .await
            .expect("the proxy did not finish draining")
            .unwrap();
        if !wrong.is_empty() {
            failed.push(format!(
                "drain {round}: {} failures: {wrong:#?}",
                wrong.len()
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {DRAINS} drains lost data:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_a_streaming_body_with_an_error_the_client_sees() {
    let world = strict_world();
    let app = Streamer::start().await;
    let proxy = Sidecar::start(sidecar_settings(&world, app.addr, "1s"))
        .await
        .unwrap();
    let inbound = proxy.address("inbound").unwrap();
    // Bodies that need 16 × 250 ms = 4 s, far past the 1 s deadline.
    let slow = "gap_ms=250";
    let (client, naming) = order_client(&world);
    let tcp = connect(inbound).await;
    let (tls, _) = client
        .connect(tcp, "payment-service", &naming)
        .await
        .unwrap();
    let (send, h2_conn) = h2_connect(tls).await;
    let h2_bodies = open_streams(&send, "payment-service", "/stream", slow).await;
    let mut readers: Vec<_> = h2_bodies
        .into_iter()
        .map(|b| ("h2", tokio::spawn(read_body(b))))
        .collect();
    let mut h1 = Vec::new();
    for (id, framing) in [(0, "chunked"), (1, "content-length")] {
        let (mut send, conn) = h1_connect(&world, inbound).await;
        let res = h1_get(&mut send, id, &format!("length={id}&{slow}")).await;
        readers.push((framing, tokio::spawn(read_body(res.into_body()))));
        h1.push((send, conn));
    }
    // HTTP/1.0 through the outbound listener (plaintext, passed through to the app):
    // the body has no length and ends with the connection, so only a reset tells the
    // client it was cut.
    let mut close_delimited = TcpStream::connect(proxy.address("outbound").unwrap())
        .await
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let req = format!(
            "GET http://{app}/stream/7?{slow} HTTP/1.0\r\nHost: {app}\r\n\r\n",
            app = app.addr
        );
        close_delimited.write_all(req.as_bytes()).await.unwrap();
    }
    let mut buf = Vec::new();
    read_until(&mut close_delimited, &mut buf, |b| {
        b.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await;
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(
        !head.contains("content-length") && !head.contains("chunked"),
        "{head}"
    );
    let close_delimited = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        loop {
            match close_delimited.read_buf(&mut buf).await {
                Ok(0) => break Ok(buf.len()),
                Ok(_) => {}
                Err(e) => break Err(e.kind()),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drain_started = tokio::time::Instant::now();
    proxy.shutdown();
    let waited = tokio::spawn(proxy.wait());
    for (kind, reader) in readers {
        let (got, end) = reader.await.unwrap();
        assert!(
            end.is_err(),
            "{kind}: a body cut by the deadline ended cleanly after {} bytes",
            got.len()
        );
        assert!(got.len() < CHUNKS * CHUNK, "{kind}: the body was not cut");
    }
    assert_eq!(
        close_delimited.await.unwrap(),
        Err(std::io::ErrorKind::ConnectionReset),
        "a close-delimited body cut by the deadline must end with a reset"
    );
    let cut_after = drain_started.elapsed();
    assert!(
        cut_after >= Duration::from_secs(1) && cut_after < Duration::from_secs(3),
        "cut {cut_after:?} after the drain started"
    );
    tokio::time::timeout(Duration::from_secs(5), waited)
        .await
        .expect("the proxy did not stop at the deadline")
        .unwrap();
    let _ = h2_conn.await.unwrap();
    drop(send);
    drop(h1);
}
