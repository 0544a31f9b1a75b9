//! Broken upstreams behind the real binary: a fault-injecting TCP upstream (reset after
//! accept, hang, close mid-body, garbage and malformed responses, accept-and-never-read),
//! an HTTP/2 upstream that never reads a stream, a refused port, a full listen backlog
//! and a flapping endpoint, each met with Envoy's answer and flag (502 `UPE`, 503
//! `UF`/`URX`/`UC`/`UH`, 504 `UT`) in the response and the access log. Every upstream
//! counts what reached it, so nothing is lost or sent more often than the retry policy
//! allows, and a request the proxy gives up on leaves no connection open behind it.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};

/// What the fault upstream does with each connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Answers `200 ok` to every request (keep-alive).
    Ok,
    /// Resets the connection (TCP RST) as soon as it is accepted.
    Reset,
    /// Reads the request and never answers.
    Hang,
    /// Reads the request, sends a head promising 1000 bytes, 7 of them, and closes.
    MidBody,
    /// Reads the request, writes these bytes and closes.
    Respond(&'static [u8]),
    /// Reads the request, writes the first bytes, waits a moment, writes the rest and
    /// closes.
    RespondInTwo(&'static [u8], &'static [u8]),
    /// Accepts and never reads; notes when the proxy ends the connection (a reset, or a
    /// FIN with nothing unread before it: what a peer that never reads can see).
    NeverRead,
}

/// A fault-injecting upstream on 127.0.0.1:0 counting connections and request heads.
struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// Connections the proxy ended while the upstream held them ([`Fault::NeverRead`]).
    ended: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request head and its `Content-Length` body; `false` at the end of input.
async fn read_request(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < end + length {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..end + length);
    true
}

impl Upstream {
    async fn start(fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let (c, r, e) = (connections.clone(), requests.clone(), ended.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, e) = (r.clone(), e.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    match fault {
                        Fault::Reset => {
                            let _ = tcp.set_zero_linger();
                            drop(tcp);
                        }
                        Fault::NeverRead => {
                            // Readiness is only looked at, never cleared by a read: it
                            // stays readable once bytes arrived, and gains "read closed"
                            // when the proxy ends the connection.
                            loop {
                                match tcp.ready(Interest::READABLE | Interest::ERROR).await {
                                    Ok(r) if !(r.is_read_closed() || r.is_error()) => {
                                        tokio::time::sleep(Duration::from_millis(20)).await;
                                    }
                                    _ => break,
                                }
                            }
                            e.fetch_add(1, Ordering::SeqCst);
                        }
                        Fault::Ok => {
                            while read_request(&mut tcp, &mut buf).await {
                                r.fetch_add(1, Ordering::SeqCst);
                                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                                if tcp.write_all(ok).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Fault::RespondInTwo(first, rest) => {
                            if !read_request(&mut tcp, &mut buf).await {
                                return;
                            }
                            r.fetch_add(1, Ordering::SeqCst);
                            let _ = tcp.write_all(first).await;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            let _ = tcp.write_all(rest).await;
                            let _ = tcp.shutdown().await;
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                tcp.read_to_end(&mut buf),
                            )
                            .await;
                        }
                        Fault::Hang | Fault::MidBody | Fault::Respond(_) => {
                            if !read_request(&mut tcp, &mut buf).await {
                                return;
                            }
                            r.fetch_add(1, Ordering::SeqCst);
                            let answer: &[u8] = match fault {
                                Fault::Hang => {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                    return;
                                }
                                Fault::MidBody => {
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial"
                                }
                                Fault::Respond(bytes) => bytes,
                                _ => unreachable!(),
                            };
                            let _ = tcp.write_all(answer).await;
                            let _ = tcp.shutdown().await;
                            // Let the proxy read it all before the socket goes.
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                tcp.read_to_end(&mut buf),
                            )
                            .await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            requests,
            ended,
            task,
        }
    }

    /// Waits until the proxy has ended `n` connections (20 s at most: a guard against
    /// hanging, not a time limit on the proxy); the count reached.
    async fn ended(&self, n: usize) -> usize {
        for _ in 0..2000 {
            if self.ended.load(Ordering::SeqCst) >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.ended.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A ServiceEntry for `host` (port 80) with plaintext endpoints at `ports`, and its
/// VirtualService with `route` (timeout, retries) added to the route.
fn destination(host: &str, ports: &[u16], route: &str) -> String {
    let endpoints: String = ports
        .iter()
        .map(|p| format!("  - {{address: 127.0.0.1, ports: {{http: {p}}}}}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host}, namespace: production}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}, namespace: production}}
spec:
  hosts: [{host}]
  http:
  - route:
    - destination: {{host: {host}}}
{route}---
"
    )
}

/// A sidecar (order-service) on the configuration `yaml`, written in one file.
async fn caller(world: &World, yaml: &[String]) -> Proxy {
    caller_with(world, yaml, "").await
}

/// A sidecar (order-service) on `yaml` with more `limits` lines (indented by two).
async fn caller_with(world: &World, yaml: &[String], limits: &str) -> Proxy {
    let config = world.write_config("istio", "mesh.yaml", &yaml.concat());
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ports = Ports::new();
    let settings = sidecar_settings(
        world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        ports,
        nowhere,
        limits,
    );
    Proxy::start(world, "sidecar", "order-service", &settings, ports).await
}

/// Writes `request` and reads until the proxy closes (or 20 s).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn get(host: &str) -> Vec<u8> {
    format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Waits for an access-log line of `host` with `status` and `flags` (Envoy's TEXT
/// format: `... "<host>" ... <status> <flags> ...`).
async fn logged(world: &World, host: &str, status: u16, flags: &str) -> bool {
    let needle = format!("\" {status} {flags} ");
    for _ in 0..300 {
        let log =
            std::fs::read_to_string(world.path("order-service-access.log")).unwrap_or_default();
        if log.lines().any(|l| l.contains(&needle) && l.contains(host)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_responses_are_502_upe_and_retried_only_as_the_policy_says() {
    let world = World::new();
    let cases: &[(&str, &[u8])] = &[
        ("garbage", b"garbage\r\n\r\n"),
        (
            "two-lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        ),
        (
            "length-and-chunked",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        ("bad-status", b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok"),
        ("nul-header", b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 2\r\n\r\nok"),
        ("too-many-headers", TOO_MANY),
    ];
    let mut upstreams = Vec::new();
    let mut yaml = String::new();
    for (name, bytes) in cases {
        let up = Upstream::start(Fault::Respond(bytes)).await;
        // Retries on 5xx and resets: a protocol error is the upstream's answer, so it is
        // retried as a reset would be; 1 retry allowed.
        yaml.push_str(&destination(
            name,
            &[up.addr.port()],
            "    retries: {attempts: 1, retryOn: reset}\n",
        ));
        upstreams.push(up);
    }
    let proxy = caller(&world, &[yaml]).await;
    let mut failures = Vec::new();
    for ((name, _), up) in cases.iter().zip(&upstreams) {
        let answer = raw(proxy.outbound(), &get(name)).await;
        if status(&answer) != 502
            || !answer.contains("reset reason: protocol error")
            || !logged(&world, name, 502, "URX,UPE").await
        {
            failures.push(format!("{name}: {answer:?}"));
        }
        // The first attempt and the one retry the policy allows; nothing more.
        if up.requests() != 2 {
            failures.push(format!(
                "{name}: the upstream saw {} requests",
                up.requests()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{failures:#?}\n{}",
        std::fs::read_to_string(world.path("order-service-access.log")).unwrap_or_default()
    );
}

/// A response head with 200 headers (hyper's limit is 100).
const TOO_MANY: &[u8] = {
    const LINE: &[u8] = b"X-H: v\r\n";
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\n";
    const TAIL: &[u8] = b"Content-Length: 0\r\n\r\n";
    const N: usize = 200;
    const LEN: usize = HEAD.len() + LINE.len() * N + TAIL.len();
    const BYTES: [u8; LEN] = {
        let mut out = [0u8; LEN];
        let mut i = 0;
        while i < HEAD.len() {
            out[i] = HEAD[i];
            i += 1;
        }
        let mut n = 0;
        while n < N {
            let mut j = 0;
            while j < LINE.len() {
                out[HEAD.len() + n * LINE.len() + j] = LINE[j];
                j += 1;
            }
            n += 1;
        }
        let mut k = 0;
        while k < TAIL.len() {
            out[HEAD.len() + N * LINE.len() + k] = TAIL[k];
            k += 1;
        }
        out
    };
    &BYTES
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_hangs_cut_bodies_and_refused_ports_get_envoys_answers() {
    let world = World::new();
    let reset = Upstream::start(Fault::Reset).await;
    let hang = Upstream::start(Fault::Hang).await;
    let mid = Upstream::start(Fault::MidBody).await;
    let refused = free_port();
    let proxy = caller(
        &world,
        &[
            destination(
                "reset",
                &[reset.addr.port()],
                "    retries: {attempts: 2, retryOn: reset}\n",
            ),
            destination("hang", &[hang.addr.port()], "    timeout: 1s\n"),
            destination("mid", &[mid.addr.port()], ""),
            destination(
                "refused",
                &[refused],
                "    retries: {attempts: 2, retryOn: connect-failure}\n",
            ),
        ],
    )
    .await;
    let out = proxy.outbound();

    // Reset after accept: each attempt is a new connection, reset; 1 + 2 retries. The
    // RST can reach the proxy while its connect is still being completed (a connection
    // failure, `UF`) or after (a connection termination, `UC`); both are 503 and retried.
    let answer = raw(out, &get("reset")).await;
    assert_eq!(status(&answer), 503, "{answer}");
    let flags = if answer.ends_with("reset reason: connection failure") {
        "UF,URX"
    } else {
        assert!(
            answer.ends_with("reset reason: connection termination"),
            "{answer}"
        );
        "UC,URX"
    };
    assert!(
        logged(&world, "reset", 503, flags).await,
        "{}",
        proxy.output()
    );
    assert_eq!(reset.connections(), 3);

    // No answer: the route timeout ends it, 504 UT; one request, no retry.
    let answer = raw(out, &get("hang")).await;
    assert_eq!(status(&answer), 504, "{answer}");
    assert!(answer.ends_with("upstream request timeout"), "{answer}");
    assert!(logged(&world, "hang", 504, "UT").await);
    assert_eq!(hang.requests(), 1);

    // Closed mid-body: the head went out, so the client gets it and a body that ends
    // early (never a complete-looking response).
    let answer = raw(out, &get("mid")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(body.len() < 1000, "{answer}");
    assert_eq!(mid.requests(), 1);

    // Refused port: 503 UF, retried twice, then URX.
    let answer = raw(out, &get("refused")).await;
    assert_eq!(status(&answer), 503, "{answer}");
    assert!(
        answer.contains("reset reason: connection failure"),
        "{answer}"
    );
    assert!(
        logged(&world, "refused", 503, "UF,URX").await,
        "{}",
        proxy.output()
    );
}

/// Sends a 16 MiB POST to `host` (with `Connection: close` when `close`) and reads the
/// answer while the upload goes on; the answer, and whether the proxy then closed the
/// connection (read to its end or reset; the 20 s are a guard against hanging).
async fn upload_to(addr: SocketAddr, host: &str, close: bool) -> (String, bool) {
    let body = vec![b'a'; 16 << 20];
    let connection = if close { "Connection: close\r\n" } else { "" };
    let head = format!(
        "POST /x HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n{connection}\r\n",
        body.len()
    );
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // The upload goes on while the answer is read: the proxy stops reading it.
    let upload = tokio::spawn(async move {
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        // Held open: the proxy, not the client, must end the connection.
        std::future::pending::<()>().await;
    });
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    upload.abort();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_reads_is_cut_off_at_the_timeout_and_nothing_stays_open() {
    let world = World::new();
    let deaf = Upstream::start(Fault::NeverRead).await;
    let ok = Upstream::start(Fault::Ok).await;
    let proxy = caller(
        &world,
        &[
            destination("deaf", &[deaf.addr.port()], "    timeout: 1s\n"),
            destination("ok", &[ok.addr.port()], ""),
        ],
    )
    .await;
    let out = proxy.outbound();
    // Accept-and-never-read, with a body larger than the socket buffers hold: the route
    // timeout answers 504 UT while the request is still being written. The proxy then
    // resets the upstream connection and lets go of the body, so the client's
    // connection closes after the answer: asked to (`Connection: close`), or because the
    // rest of the body is not going to be read. Twice: each request had a connection of
    // its own, and none is left open at the upstream.
    for round in 1..=2 {
        let (answer, closed) = upload_to(out, "deaf", round == 1).await;
        let head = &answer[..answer.len().min(300)];
        assert_eq!(status(&answer), 504, "round {round}: {head}");
        assert!(answer.ends_with("upstream request timeout"), "{head}");
        assert!(
            closed,
            "round {round}: the client's connection stayed open after the 504"
        );
        assert!(logged(&world, "deaf", 504, "UT").await);
        assert_eq!(
            deaf.ended(round).await,
            round,
            "round {round}: the upstream connection was not ended\n{}",
            proxy.output()
        );
        assert_eq!(deaf.connections(), round);
    }
    // Another route on a fresh connection is served as ever.
    let answer = raw(out, &get("ok")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(ok.requests(), 1);
}

/// An HTTP/2 upstream (h2c, prior knowledge) in raw frames: on each connection it never
/// answers the first stream nor grants it more than the initial 65,535-byte window, and
/// answers every later stream with an empty `200`. It records the RST_STREAM frames it
/// receives (stream, error code) and counts connections.
struct H2Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    resets: Arc<std::sync::Mutex<Vec<(u32, u32)>>>,
    answered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl H2Upstream {
    async fn start() -> Self {
        use support::frames::{
            ACK, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, RST_STREAM, SETTINGS, read_frame,
            write_frame,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(std::sync::Mutex::new(Vec::new()));
        let answered = Arc::new(AtomicUsize::new(0));
        let (c, r, a) = (connections.clone(), resets.clone(), answered.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, a) = (r.clone(), a.clone());
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    if tcp.read_exact(&mut preface).await.is_err() {
                        return;
                    }
                    write_frame(&mut tcp, SETTINGS, 0, 0, &[]).await;
                    let mut first = None;
                    while let Some((kind, flags, stream, payload)) = read_frame(&mut tcp).await {
                        match kind {
                            SETTINGS if flags & ACK == 0 => {
                                write_frame(&mut tcp, SETTINGS, ACK, 0, &[]).await;
                            }
                            PING if flags & ACK == 0 => {
                                write_frame(&mut tcp, PING, ACK, 0, &payload).await;
                            }
                            HEADERS if first.is_none() => first = Some(stream),
                            HEADERS => {
                                // `:status: 200` (static table index 8), END_HEADERS and
                                // END_STREAM.
                                write_frame(
                                    &mut tcp,
                                    HEADERS,
                                    END_HEADERS | END_STREAM,
                                    stream,
                                    &[0x88],
                                )
                                .await;
                                a.fetch_add(1, Ordering::SeqCst);
                            }
                            RST_STREAM if payload.len() == 4 => {
                                let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                                r.lock().unwrap().push((stream, code));
                            }
                            GOAWAY => return,
                            _ => {}
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            resets,
            answered,
            task,
        }
    }

    /// The RST_STREAM frames received so far, once there are `n` (or after 20 s: a
    /// guard against hanging).
    async fn resets(&self, n: usize) -> Vec<(u32, u32)> {
        for _ in 0..2000 {
            if self.resets.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.resets.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_that_is_never_read_is_cancelled_and_its_connection_kept() {
    let world = World::new();
    let up = H2Upstream::start().await;
    // An `HTTP2` port: requests go as HTTP/2 with prior knowledge.
    let yaml = destination("h2deaf", &[up.addr.port()], "    timeout: 1s\n")
        .replace(
            "{number: 80, name: http, protocol: HTTP}",
            "{number: 80, name: http2, protocol: HTTP2}",
        )
        .replace("ports: {http:", "ports: {http2:");
    let proxy = caller(&world, &[yaml]).await;
    let out = proxy.outbound();
    // The first stream is never read: the upload stops at the window, the route timeout
    // answers 504 UT, the stream is reset with CANCEL and the body let go, so the
    // client's connection closes.
    let (answer, closed) = upload_to(out, "h2deaf", true).await;
    let head = &answer[..answer.len().min(300)];
    assert_eq!(status(&answer), 504, "{head}\n{}", proxy.output());
    assert!(answer.ends_with("upstream request timeout"), "{head}");
    assert!(closed, "the client's connection stayed open after the 504");
    assert!(logged(&world, "h2deaf", 504, "UT").await);
    // RST_STREAM on stream 1 with CANCEL (0x8).
    assert_eq!(up.resets(1).await, vec![(1, 0x8)]);
    // The connection stays for other streams: the next request is stream 3 on it.
    let answer = raw(out, &get("h2deaf")).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(up.answered.load(Ordering::SeqCst), 1);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

/// A listener with a backlog of 1 that never accepts, its accept queue filled: a further
/// connect does not complete (Linux drops the SYN); the listener and the connections
/// that filled it.
async fn full_backlog() -> (TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    // On loopback a connect the queue has room for completes at once; one that has not
    // completed in 500 ms had its SYN dropped (the first retransmission is after 1 s).
    while let Ok(tcp) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
    {
        queued.push(tcp.unwrap());
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    (listener, queued)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listen_backlog_is_a_connect_timeout_503_uf_retried_then_ejected() {
    let world = World::new();
    let (listener, queued) = full_backlog().await;
    let port = listener.local_addr().unwrap().port();
    // No retry policy on the route: Istio's default (2 retries on connect-failure, …).
    // Local-origin failures counted on their own, three eject the endpoint.
    let mut yaml = destination("backlog", &[port], "");
    yaml.push_str(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: backlog, namespace: production}
spec:
  host: backlog
  trafficPolicy:
    connectionPool: {tcp: {connectTimeout: 200ms}}
    outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3, consecutive5xxErrors: 0, interval: 1s, baseEjectionTime: 10m, maxEjectionPercent: 100}
",
    );
    let proxy = caller(&world, &[yaml]).await;
    // Each attempt's connect times out: a connection failure, 503 UF with Envoy's reset
    // reason, retried twice, then URX.
    let answer = raw(proxy.outbound(), &get("backlog")).await;
    assert_eq!(status(&answer), 503, "{answer}\n{}", proxy.output());
    assert!(
        answer.ends_with(
            "upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
        ),
        "{answer}"
    );
    assert!(
        logged(&world, "backlog", 503, "UF,URX").await,
        "{}",
        std::fs::read_to_string(world.path("order-service-access.log")).unwrap_or_default()
    );
    // The three timeouts were local-origin failures: the endpoint is ejected, and the
    // next request finds no healthy upstream.
    let answer = raw(proxy.outbound(), &get("backlog")).await;
    assert_eq!(status(&answer), 503, "{answer}");
    assert!(answer.ends_with("no healthy upstream"), "{answer}");
    assert!(logged(&world, "backlog", 503, "UH").await);
    // Nothing of the proxy's reached the upstream: its queue holds only the connections
    // that filled it, and none of them carried a byte.
    let fillers: Vec<SocketAddr> = queued.iter().map(|t| t.local_addr().unwrap()).collect();
    let mut accepted = Vec::new();
    while let Ok(Ok((mut tcp, peer))) =
        tokio::time::timeout(Duration::from_millis(200), listener.accept()).await
    {
        let mut byte = [0u8; 1];
        let sent = matches!(
            tokio::time::timeout(Duration::from_millis(50), tcp.read(&mut byte)).await,
            Ok(Ok(n)) if n > 0
        );
        accepted.push((peer, sent));
    }
    assert_eq!(
        accepted,
        fillers.iter().map(|a| (*a, false)).collect::<Vec<_>>(),
        "connections accepted after the requests (fillers: {fillers:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_with_a_full_backlog_is_retried_around_and_ejected() {
    let world = World::new();
    let good = Upstream::start(Fault::Ok).await;
    let (listener, _queued) = full_backlog().await;
    let full = listener.local_addr().unwrap().port();
    // Istio's default retries (connect-failure) go to another endpoint; one local-origin
    // failure ejects.
    let mut yaml = destination("pair", &[good.addr.port(), full], "");
    yaml.push_str(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pair, namespace: production}
spec:
  host: pair
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {connectTimeout: 200ms}}
    outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 1, interval: 1s, baseEjectionTime: 10m, maxEjectionPercent: 100}
",
    );
    let proxy = caller(&world, &[yaml]).await;
    for i in 0..10 {
        let answer = raw(proxy.outbound(), &get("pair")).await;
        assert_eq!(
            status(&answer),
            200,
            "request {i}: {answer}\n{}",
            proxy.output()
        );
    }
    // Every request reached the good endpoint once; the full one was ejected after its
    // one connect timeout.
    assert_eq!(good.requests(), 10);
    let metrics = proxy
        .metrics_when(|t| t.contains("mesh_outlier_ejections_total"))
        .await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_outlier_ejections_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_endpoint_is_ejected_and_every_request_is_answered_once() {
    let world = World::new();
    let good = Upstream::start(Fault::Ok).await;
    let bad = Upstream::start(Fault::Respond(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    ))
    .await;
    let mut yaml = destination(
        "flaky",
        &[good.addr.port(), bad.addr.port()],
        "    retries: {attempts: 2, retryOn: 5xx}\n",
    );
    yaml.push_str(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: flaky, namespace: production}
spec:
  host: flaky
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 10m, maxEjectionPercent: 100}
",
    );
    let proxy = caller(&world, &[yaml]).await;
    for i in 0..20 {
        let request = format!(
            "POST /pay/{i} HTTP/1.1\r\nHost: flaky\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        );
        let answer = raw(proxy.outbound(), request.as_bytes()).await;
        assert_eq!(
            status(&answer),
            200,
            "request {i}: {answer}\n{}",
            proxy.output()
        );
    }
    // Each request reached the good endpoint exactly once; the bad one answered one
    // request (its first 5xx ejected it) and was not tried again.
    assert_eq!(good.requests(), 20);
    assert_eq!(bad.requests(), 1);
    let metrics = proxy
        .metrics_when(|t| t.contains("mesh_outlier_ejections_total"))
        .await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_outlier_ejections_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
}

/// Writes `head` and the first `sent` bytes of a body, then stalls; returns the answer
/// (read until the proxy closes, or 30 s).
async fn stalled_upload(addr: SocketAddr, head: &str, sent: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(sent).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_and_silent_upstreams_meet_the_stream_idle_timeout() {
    let world = World::new();
    let ok = Upstream::start(Fault::Ok).await;
    let hang = Upstream::start(Fault::Hang).await;
    let proxy = caller_with(
        &world,
        &[
            destination("ok", &[ok.addr.port()], ""),
            destination("hang", &[hang.addr.port()], ""),
        ],
        "  streamIdleTimeout: 500ms\n",
    )
    .await;
    let out = proxy.outbound();
    // A body that stops half-way: 408, and the upstream never gets a whole request.
    let answer = stalled_upload(
        out,
        "POST /x HTTP/1.1\r\nHost: ok\r\nContent-Length: 10\r\n\r\n",
        b"12345",
    )
    .await;
    assert_eq!(status(&answer), 408, "{answer}\n{}", proxy.output());
    assert!(answer.ends_with("stream timeout"), "{answer}");
    assert!(logged(&world, "\"ok\"", 408, "SI").await);
    assert_eq!(ok.requests(), 0);
    // An upstream that never answers, with no route timeout: 408 SI as well.
    let answer = raw(out, &get("hang")).await;
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(logged(&world, "\"hang\"", 408, "SI").await);
    assert_eq!(hang.requests(), 1);
    // A request that keeps moving is served.
    let answer = raw(out, &get("ok")).await;
    assert_eq!(status(&answer), 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_still_arriving_at_the_request_timeout_gets_408() {
    let world = World::new();
    let ok = Upstream::start(Fault::Ok).await;
    let proxy = caller_with(
        &world,
        &[destination("ok", &[ok.addr.port()], "")],
        "  requestTimeout: 1s\n",
    )
    .await;
    // One byte every 100 ms, never idle, never done in time.
    let mut tcp = TcpStream::connect(proxy.outbound()).await.unwrap();
    tcp.write_all(b"POST /x HTTP/1.1\r\nHost: ok\r\nContent-Length: 1000\r\n\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..1000 {
            if wr.write_all(b"a").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut out)).await;
    trickle.abort();
    let answer = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(status(&answer), 408, "{answer}\n{}", proxy.output());
    assert!(answer.ends_with("request timeout"), "{answer}");
    assert_eq!(ok.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_size_limits_get_413_or_502_or_are_cut() {
    let world = World::new();
    let ok = Upstream::start(Fault::Ok).await;
    let declared = Upstream::start(Fault::Respond(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    ))
    .await;
    let (first, rest) = CHUNKED_100.split_at(CHUNKED_100.len() / 2);
    let chunked = Upstream::start(Fault::RespondInTwo(first, rest)).await;
    let proxy = caller_with(
        &world,
        &[
            destination("ok", &[ok.addr.port()], ""),
            destination("declared", &[declared.addr.port()], ""),
            destination("chunked", &[chunked.addr.port()], ""),
        ],
        "  maxRequestBodyBytes: 1000\n  maxResponseBodyBytes: 50\n",
    )
    .await;
    let out = proxy.outbound();
    let post = |length: usize, chunked: bool| {
        let body = "b".repeat(length);
        if chunked {
            format!(
                "POST /x HTTP/1.1\r\nHost: ok\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{length:x}\r\n{body}\r\n0\r\n\r\n"
            )
        } else {
            format!(
                "POST /x HTTP/1.1\r\nHost: ok\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{body}"
            )
        }
    };
    // At the limit: forwarded.
    let answer = raw(out, post(1000, false).as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}\n{}", proxy.output());
    assert_eq!(ok.requests(), 1);
    // Over it, declared or chunked: 413 and nothing forwarded whole.
    for chunked in [false, true] {
        let answer = raw(out, post(1001, chunked).as_bytes()).await;
        assert_eq!(status(&answer), 413, "chunked {chunked}: {answer}");
        assert_eq!(ok.requests(), 1, "chunked {chunked}");
    }
    // A response declaring more than the limit: 502 before its head goes out.
    let answer = raw(out, &get("declared")).await;
    assert_eq!(status(&answer), 502, "{answer}");
    // A chunked response crossing the limit in its second half: its head went out with
    // the first half, and the body is cut before its end (no last chunk). Had the whole
    // response arrived at once, the head might not have been written yet: then nothing
    // is, which is as incomplete.
    let answer = raw(out, &get("chunked")).await;
    assert!(matches!(status(&answer), 200 | 0), "{answer}");
    assert!(!answer.ends_with("0\r\n\r\n"), "{answer}");
    assert!(!answer.contains("0123456789\r\n0\r\n"), "{answer}");
}

/// A chunked response of 100 bytes in 10-byte chunks.
const CHUNKED_100: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
a\r\n0123456789\r\na\r\n0123456789\r\na\r\n0123456789\r\na\r\n0123456789\r\na\r\n0123456789\r\n\
a\r\n0123456789\r\na\r\n0123456789\r\na\r\n0123456789\r\na\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n";
