//! Listeners: the accept loop shared by every listener, hyper's HTTP/1.1 + HTTP/2 server
//! with the limits of the settings, hop-by-hop and internal header handling, and
//! graceful draining.
//!
//! # Behaviour
//!
//! Each accepted TCP connection is handed to the listener's `accept` function (TLS per
//! PeerAuthentication, SNI selection, or plaintext), which returns the stream and the
//! connection's service, or `None` to drop it. The connection is served by hyper-util's
//! auto builder (HTTP/1.1 and HTTP/2, upgrades allowed) and watched by a
//! shutdown token.
//!
//! # Draining
//!
//! On shutdown the listener is closed at once (new connections are refused), HTTP/2
//! connections get GOAWAY (NO_ERROR, the last stream accepted) and HTTP/1.1 connections
//! close after their current response (`Connection: close` if its head is not sent
//! yet). Every stream that has begun is finished: its response is written to its end
//! (END_STREAM, the last chunk, all of Content-Length).
//!
//! Closing is delayed the way Envoy's `delayed_close_timeout` does it: once hyper has
//! finished a connection and shut down its write side (TLS `close_notify`, then FIN),
//! the connection task reads and discards what the client still sends until the client
//! closes too, for at most one second, and only then closes the socket. Closing a socket
//! with unread input makes the kernel answer with RST, and a client that receives RST
//! throws away what it has not read yet: without the delay, HTTP/2 clients (which keep
//! sending WINDOW_UPDATE and PING frames) lost the last DATA frames and END_STREAM of
//! responses that had been sent in full. The same delayed close follows every
//! server-side close (idle timeout, `Connection: close`), not only a drain.
//!
//! At the drain deadline the connections still open are reset (`SO_LINGER` 0, TCP RST),
//! also when the runtime drops their tasks: every request still in flight fails at the
//! client with a connection error, and a cut body never looks complete (a close-delimited
//! HTTP/1.0 body would if the connection ended with FIN). Upgraded connections
//! (WebSocket) have left the listener and are not part of its drain.
//!
//! Opening: hyper-util's protocol detection reads everything that is not the exact HTTP/2
//! preface as HTTP/1.1. The listener first holds the connection's first line back
//! ([`sniff::opening`](crate::sniff::opening)): an HTTP/1 request line or the exact
//! preface goes to hyper as it came; anything else (bytes that start like the preface
//! but are not it, a first line without an `HTTP/1.x` version) is an invalid preface
//! (RFC 9113 §3.4) and gets GOAWAY(PROTOCOL_ERROR) and a close, never an HTTP/1 answer.
//!
//! HTTP/2 connection errors are h2's: it sends `FLOW_CONTROL_ERROR` for a window
//! overflow and `FRAME_SIZE_ERROR` for DATA over the frame size, but `PROTOCOL_ERROR`
//! for control frames of a bad length, undecodable HPACK and an out-of-range
//! `SETTINGS_INITIAL_WINDOW_SIZE`, where RFC 9113 names `FRAME_SIZE_ERROR`,
//! `COMPRESSION_ERROR` and `FLOW_CONTROL_ERROR` (its frame reader maps every load
//! failure to `PROTOCOL_ERROR`). The connection ends either way; the codes are h2's to
//! change. A SETTINGS flood (CVE-2019-9515) is bounded in memory by h2, which
//! acknowledges each SETTINGS frame before it reads the next, but not in time: a client
//! that reads its ACKs keeps a connection task busy for as long as it likes. The
//! listener follows the HTTP/2 frame headers of each connection and answers a client's
//! 1001st SETTINGS frame with GOAWAY(ENHANCE_YOUR_CALM) and a close.
//!
//! Idle timeout (`limits.idleTimeout`, Envoy's downstream `idle_timeout`): a connection
//! with no request in flight for that long is closed the same graceful way (GOAWAY for
//! HTTP/2, a plain close for an idle HTTP/1.1 keep-alive connection). A request is in
//! flight from the moment hyper hands it to the service until its response body has been
//! sent or dropped, so long downloads and slow upstreams are never cut. `0s` disables it.
//!
//! Limits (settings `limits`, Envoy's names where Envoy has the knob):
//!
//! - the request target (`maxRequestTargetBytes`, 414) and the header section
//!   (`maxRequestHeaderBytes`, 431) are measured exactly ([`Checks`]) before a request
//!   reaches the service, so a head one byte over is answered here, with
//!   `Connection: close`, and forwarded to no one; the codecs' own limits sit above these
//!   (with room for separators and HPACK overhead) and answer only far larger heads;
//! - the header count (`maxHeaders`, 431, by hyper);
//! - the request-headers timeout (`requestHeadersTimeout`): hyper's header read timeout
//!   for each head, and, before it, a connection that sends no byte at all within it is
//!   closed (hyper-util's protocol detection would otherwise wait forever);
//! - the connection limit (`maxConnections`): one connection over it is accepted and
//!   closed at once and counted in [`Options::overflow`] (Envoy's
//!   `downstream_cx_overflow`), rather than left in the backlog where a client cannot tell
//!   a full proxy from a slow one;
//! - the stream limits (`streamIdleTimeout`, `requestTimeout`, body sizes): set around
//!   each call of the connection's service, so the request body is bounded where the
//!   stacks box it ([`boxed_request`](crate::stack::boxed_request)), before any layer
//!   buffers it; the rest is the client's ([`client`](crate::stack::client));
//! - HTTP/2 concurrent streams and windows.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_core::BoxError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::settings::Limits;

/// The HTTP server builder for `limits`.
pub fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // The codecs' own limits leave room for the separators they count and the exact
    // check does not (`Checks`): the exact limit is the one that answers.
    let head = limits.max_request_header_bytes + limits.max_request_target_bytes;
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.as_std())
        .max_headers(limits.max_headers)
        .max_buf_size((head + 4 * limits.max_headers + 1024).max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_header_list_size(
            u32::try_from(head + 32 * (limits.max_headers + 4)).unwrap_or(u32::MAX),
        )
        .max_pending_accept_reset_streams(Some(100));
    b
}

/// The exact request-head limits checked before a request reaches the service.
#[derive(Clone, Copy, Debug)]
pub struct Checks {
    /// Request-target bytes; 414 above.
    pub max_target: usize,
    /// Method, target, header names and values; 431 above.
    pub max_head: usize,
}

impl Checks {
    /// The checks of `limits`.
    pub fn of(limits: &Limits) -> Self {
        Self {
            max_target: limits.max_request_target_bytes,
            max_head: limits.max_request_header_bytes,
        }
    }

    /// The local reply for a request head over a limit, if it is.
    fn refuse<R>(&self, req: &http::Request<R>) -> Option<(http::StatusCode, &'static str)> {
        let uri = req.uri();
        let path = uri.path_and_query().map_or(0, |p| p.as_str().len());
        // HTTP/1 absolute form carries the scheme and authority in the target; HTTP/2
        // carries them in pseudo-headers of their own.
        let target = match (req.version(), uri.authority()) {
            (http::Version::HTTP_2 | http::Version::HTTP_3, _) | (_, None) => path,
            (_, Some(a)) => uri.scheme_str().map_or(0, |s| s.len() + 3) + a.as_str().len() + path,
        };
        if target > self.max_target {
            return Some((http::StatusCode::URI_TOO_LONG, "URI Too Long"));
        }
        let mut head = req.method().as_str().len() + target;
        for (name, value) in req.headers() {
            head += name.as_str().len() + value.len();
        }
        (head > self.max_head).then_some((
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request Header Fields Too Large",
        ))
    }
}

impl Default for Checks {
    fn default() -> Self {
        Self::of(&Limits::default())
    }
}

/// How a listener serves.
#[derive(Clone)]
pub struct Options {
    /// The HTTP server (limits included).
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    /// Cancelled to start draining.
    pub shutdown: CancellationToken,
    /// Drain deadline.
    pub drain: Duration,
    /// Connections served at once; one more is accepted and closed at once.
    pub max_connections: usize,
    /// `mesh_active_connections{listener}`.
    pub active: prometheus_client::metrics::gauge::Gauge,
    /// `mesh_downstream_cx_total{listener}`: connections accepted and served.
    pub accepted: prometheus_client::metrics::counter::Counter,
    /// `mesh_downstream_cx_overflow_total{listener}`: connections closed at once because
    /// `max_connections` were open.
    pub overflow: prometheus_client::metrics::counter::Counter,
    /// Connections with no request in flight for this long are closed; zero disables.
    pub idle_timeout: Duration,
    /// A connection that sends no byte for this long after it is accepted (and its TLS
    /// handshake done) is closed; zero disables.
    pub first_byte_timeout: Duration,
    /// Exact request-head limits.
    pub checks: Checks,
    /// Body sizes and stream timers for the request bodies of this listener.
    pub stream: crate::stack::client::StreamLimits,
}

impl Options {
    /// Options of a small operator-facing server (the admin server, `discovery`'s
    /// monitoring and webhook): at most 64 connections, drained for 100 ms, Envoy's
    /// default idle timeout (1 h).
    pub fn internal(
        builder: Arc<auto::Builder<TokioExecutor>>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            builder,
            shutdown,
            drain: Duration::from_millis(100),
            max_connections: 64,
            active: Default::default(),
            accepted: Default::default(),
            overflow: Default::default(),
            idle_timeout: Duration::from_secs(3600),
            first_byte_timeout: Duration::from_secs(10),
            checks: Checks::default(),
            stream: crate::stack::client::StreamLimits::default(),
        }
    }

    /// Options of a listener under `limits`, with its gauge and connection counters.
    pub fn of(
        limits: &Limits,
        shutdown: CancellationToken,
        active: prometheus_client::metrics::gauge::Gauge,
        accepted: prometheus_client::metrics::counter::Counter,
        overflow: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            builder: Arc::new(builder(limits)),
            shutdown,
            drain: limits.drain_timeout.as_std(),
            max_connections: limits.max_connections,
            active,
            accepted,
            overflow,
            idle_timeout: limits.idle_timeout.as_std(),
            first_byte_timeout: limits.header_read_timeout.as_std(),
            checks: Checks::of(limits),
            stream: crate::stack::client::StreamLimits::of(limits),
        }
    }
}

/// Serves connections from `listener` until `options.shutdown`, then drains for at most
/// `options.drain`.
pub async fn run<A, Fut, IO, S, B>(listener: TcpListener, options: Options, accept: A)
where
    A: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Option<(IO, S)>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let Options {
        builder,
        shutdown,
        drain,
        max_connections,
        active,
        accepted: served,
        overflow,
        idle_timeout,
        first_byte_timeout,
        checks,
        stream,
    } = options;
    let mut tasks = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        // Reap finished connection tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            () = shutdown.cancelled() => break,
            // Finished connections are reaped as they end, not at the next accept: after a
            // burst their task memory goes back at once.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    // At the connection cap a new connection is closed at once (Envoy's
                    // `downstream_cx_overflow`) rather than left waiting in the backlog,
                    // where its client could not tell a full proxy from a slow one.
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        overflow.inc();
                        tracing::debug!(%remote, max_connections, "connection limit reached; closing");
                        drop(tcp);
                        continue;
                    };
                    served.inc();
                    let _ = tcp.set_nodelay(true);
                    let shutdown = shutdown.clone();
                    let accept = accept.clone();
                    let builder = builder.clone();
                    let active = active.clone();
                    tasks.spawn(async move {
                        let _slot = slot;
                        active.inc();
                        let _gauge = GaugeGuard(active);
                        // A second handle on the socket: the protocol stack owns the
                        // first and closes it, this one decides how the close ends.
                        let socket = Socket::of(&tcp);
                        let Some((io, svc)) = accept(tcp, remote).await else {
                            return;
                        };
                        // Until the protocol has finished, dropping this task (the drain
                        // deadline, or the runtime going away) resets the connection.
                        let reset = socket.map(ResetOnDrop::new);
                        let (io, released) = Released::new(io);
                        let io = Opened::new(io, checks.max_target + OPENING_SLACK);
                        let activity = Arc::new(Activity::new());
                        let svc = Tracked {
                            inner: svc,
                            activity: activity.clone(),
                            checks,
                            stream,
                        };
                        // The HTTP connection, dropped (its IO with it) when it ends.
                        let served = async {
                            let conn = builder.serve_connection_with_upgrades(
                                TokioIo::new(io),
                                InPlace(std::sync::Mutex::new(svc)),
                            );
                            let mut conn = std::pin::pin!(conn);
                            let mut idle = std::pin::pin!(idle(activity, idle_timeout));
                            // Armed until the first byte: a connection that never sends
                            // one is closed after the request-headers timeout.
                            let mut silent = !first_byte_timeout.is_zero();
                            let first_byte = tokio::time::sleep(first_byte_timeout);
                            let mut first_byte = std::pin::pin!(first_byte);
                            let mut closing = false;
                            loop {
                                tokio::select! {
                                    ended = conn.as_mut() => break ended,
                                    () = &mut first_byte, if silent => {
                                        silent = false;
                                        if !released.has_read() {
                                            tracing::debug!(%remote, "no request within the request-headers timeout; closing");
                                            break Ok(());
                                        }
                                    }
                                    () = shutdown.cancelled(), if !closing => {
                                        closing = true;
                                        conn.as_mut().graceful_shutdown();
                                    }
                                    () = &mut idle, if !closing => {
                                        tracing::debug!(%remote, "closing idle connection");
                                        closing = true;
                                        conn.as_mut().graceful_shutdown();
                                    }
                                }
                            }
                        };
                        if let Err(e) = served.await {
                            tracing::debug!(error = %e, %remote, "connection ended with an error");
                        }
                        let socket = reset.and_then(ResetOnDrop::disarm);
                        // An upgraded connection lives on elsewhere; any other was shut
                        // down by the protocol and is closed here once the client has
                        // read everything.
                        if let Some(socket) = socket
                            && released.is_released()
                        {
                            delayed_close(socket).await;
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    // Stop accepting at once: the port refuses new connections from here on.
    drop(listener);
    // Every connection task saw the token and is closing gracefully.
    let drained =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "drain deadline passed; closing the remaining connections"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// How long a closed connection waits for the client to close its side, reading and
/// discarding what it still sends (Envoy's `delayed_close_timeout` default).
const DELAYED_CLOSE: Duration = Duration::from_secs(1);

/// A second handle on an accepted TCP socket. The connection's protocol stack (TLS,
/// HTTP) owns and closes the first; the socket itself stays open until this handle is
/// dropped too, so the connection task chooses how it ends: a delayed close after a
/// graceful end, a reset when it is cut.
struct Socket(std::net::TcpStream);

impl Socket {
    /// A handle on `tcp`'s socket; `None` if the descriptor cannot be duplicated (the
    /// connection then closes when the protocol drops it).
    fn of(tcp: &TcpStream) -> Option<Self> {
        #[cfg(unix)]
        let handle = std::os::fd::AsFd::as_fd(tcp).try_clone_to_owned();
        #[cfg(windows)]
        let handle = std::os::windows::io::AsSocket::as_socket(tcp).try_clone_to_owned();
        handle.ok().map(|h| Self(std::net::TcpStream::from(h)))
    }
}

/// Resets the connection (TCP RST) when dropped while still holding the socket: a
/// response cut by the drain deadline must never look complete to the client (a
/// close-delimited HTTP/1 body would), so the client sees "connection reset" on every
/// request still open on the connection.
struct ResetOnDrop(Option<Socket>);

impl ResetOnDrop {
    fn new(socket: Socket) -> Self {
        Self(Some(socket))
    }

    /// The protocol finished: no reset.
    fn disarm(mut self) -> Option<Socket> {
        self.0.take()
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(Socket(socket)) = self.0.take() {
            // SO_LINGER 0: the last close of the socket (this handle or the protocol's,
            // whichever goes second) sends RST instead of FIN.
            let _ = tokio::net::TcpSocket::from_std_stream(socket).set_zero_linger();
        }
    }
}

/// Closes a connection whose protocol has finished and shut down its write side: tells
/// the client (FIN) if the protocol did not, then reads and discards what the client
/// still sends until it closes too, for at most [`DELAYED_CLOSE`].
///
/// Closing a socket with unread input makes the kernel send RST, and a client that gets
/// RST discards what it has not read yet: the last DATA frames and END_STREAM of a
/// drained HTTP/2 connection (the client's WINDOW_UPDATE and PING frames keep coming),
/// the end of the last response before a pipelined HTTP/1.1 request. Waiting for the
/// client's FIN first delivers every byte the protocol wrote.
async fn delayed_close(Socket(socket): Socket) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
    if socket.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(mut socket) = TcpStream::from_std(socket) else {
        return;
    };
    let mut sink = tokio::io::sink();
    let discard = tokio::io::copy(&mut socket, &mut sink);
    let _ = tokio::time::timeout(DELAYED_CLOSE, discard).await;
}

/// Wraps a connection's IO to tell, once the HTTP connection has ended, whether the IO
/// was dropped with it or handed over to an upgrade (which then owns the socket).
/// The flag tells whether a byte was ever read from it.
struct Released<IO> {
    io: IO,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

/// Tells whether the wrapped IO is gone, and whether it was ever read from.
struct ReleasedWatch(std::sync::Weak<std::sync::atomic::AtomicBool>);

impl ReleasedWatch {
    fn is_released(&self) -> bool {
        self.0.strong_count() == 0
    }

    /// Whether the client has sent a byte (a released IO counts as having read).
    fn has_read(&self) -> bool {
        self.0
            .upgrade()
            .is_none_or(|read| read.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl<IO> Released<IO> {
    fn new(io: IO) -> (Self, ReleasedWatch) {
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watch = ReleasedWatch(Arc::downgrade(&alive));
        (Self { io, alive }, watch)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Released<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.alive.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Released<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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

/// Room in the first line for the method, the version and separators, beyond the
/// request target.
const OPENING_SLACK: usize = 64;

/// GOAWAY (last stream 0, PROTOCOL_ERROR): the answer to an invalid connection preface.
const GOAWAY_PROTOCOL_ERROR: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// GOAWAY (last stream to fill in, ENHANCE_YOUR_CALM): the answer to a control-frame flood.
const GOAWAY_ENHANCE_YOUR_CALM: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xb];

/// SETTINGS frames (not ACKs) a client may send on one HTTP/2 connection. A client sends
/// one when it connects and rarely another (a window it grows); thousands are a flood
/// (CVE-2019-9515), which h2 answers only with back-pressure.
const MAX_SETTINGS_FRAMES: usize = 1000;

/// A connection's IO until its opening is decided ([`sniff::opening`](crate::sniff::opening)):
/// the first bytes are held back until they are an HTTP/1 request line or the exact
/// HTTP/2 preface, then handed to the HTTP server as they came. Anything else is an
/// invalid preface (RFC 9113 §3.4): the client gets GOAWAY(PROTOCOL_ERROR) and the
/// server an end of input, so the connection closes without an HTTP/1 answer
/// (hyper-util's protocol detection alone reads every such opening as HTTP/1.1).
///
/// On an HTTP/2 connection it then follows the frame headers both ways
/// ([`FrameScanner`]): a client past [`MAX_SETTINGS_FRAMES`] gets
/// GOAWAY(ENHANCE_YOUR_CALM), written between two of the server's frames, and the server
/// a read error that ends the connection (when the server is in the middle of a frame,
/// the connection just ends).
struct Opened<IO> {
    io: IO,
    state: Opening,
    max_line: usize,
    h2: Option<H2Guard>,
}

/// What [`Opened`] follows on an HTTP/2 connection.
struct H2Guard {
    input: FrameScanner,
    output: FrameScanner,
    settings: usize,
    last_stream: u32,
}

impl H2Guard {
    fn new() -> Self {
        Self {
            // The client's preface comes before its first frame.
            input: FrameScanner {
                skip: crate::sniff::H2_PREFACE.len(),
                ..FrameScanner::default()
            },
            output: FrameScanner::default(),
            settings: 0,
            last_stream: 0,
        }
    }

    /// Follows bytes from the client; whether it is flooding now.
    fn read(&mut self, bytes: &[u8]) -> bool {
        let (settings, last_stream) = (&mut self.settings, &mut self.last_stream);
        self.input.feed(bytes, |head| {
            let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
            match head[3] {
                // SETTINGS without ACK.
                4 if head[4] & 1 == 0 => *settings += 1,
                // HEADERS opening a stream.
                1 => *last_stream = (*last_stream).max(stream),
                _ => {}
            }
        });
        self.settings > MAX_SETTINGS_FRAMES
    }

    /// The GOAWAY for a flood, naming the last stream the client opened.
    fn goaway(&self) -> [u8; 17] {
        let mut goaway = GOAWAY_ENHANCE_YOUR_CALM;
        goaway[9..13].copy_from_slice(&self.last_stream.to_be_bytes());
        goaway
    }
}

/// Follows HTTP/2 frame boundaries in a byte stream from the 9-octet frame headers.
#[derive(Default)]
struct FrameScanner {
    head: [u8; 9],
    have: usize,
    skip: usize,
}

impl FrameScanner {
    /// Follows `bytes`, calling `on_frame` with each frame header as it completes.
    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(&[u8; 9])) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (self.head.len() - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.head.len() {
                self.have = 0;
                self.skip = usize::from(self.head[0]) << 16
                    | usize::from(self.head[1]) << 8
                    | usize::from(self.head[2]);
                on_frame(&self.head);
            }
        }
    }

    /// Between two frames.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.skip == 0
    }
}

enum Opening {
    /// Reading the first bytes.
    Deciding(Vec<u8>),
    /// Decided: these bytes go to the reader first, from the offset.
    Replay(Vec<u8>, usize),
    /// An invalid preface: writing the GOAWAY from the offset, then end of input.
    Refusing(usize),
    /// The GOAWAY is written; reads end.
    Refused,
    /// Reads go straight through.
    Open,
    /// A flood: writing this GOAWAY from the offset, then a read error.
    Calming([u8; 17], usize),
    /// Reads fail.
    Calmed,
}

impl<IO> Opened<IO> {
    fn new(io: IO, max_line: usize) -> Self {
        Self {
            io,
            state: Opening::Deciding(Vec::new()),
            max_line,
            h2: None,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Opened<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{Poll, ready};
        let this = &mut *self;
        let before = buf.filled().len();
        loop {
            match &mut this.state {
                Opening::Open => {
                    ready!(std::pin::Pin::new(&mut this.io).poll_read(cx, buf))?;
                    break;
                }
                Opening::Replay(held, at) => {
                    let n = buf.remaining().min(held.len() - *at);
                    buf.put_slice(&held[*at..*at + n]);
                    *at += n;
                    if *at == held.len() {
                        this.state = Opening::Open;
                    }
                    break;
                }
                Opening::Refused => return Poll::Ready(Ok(())),
                Opening::Calmed => {
                    return Poll::Ready(Err(std::io::Error::other(
                        "HTTP/2 SETTINGS flood; connection closed",
                    )));
                }
                Opening::Refusing(at) => {
                    ready!(write_all(&mut this.io, cx, &GOAWAY_PROTOCOL_ERROR, at))?;
                    this.state = Opening::Refused;
                }
                Opening::Calming(goaway, at) => {
                    ready!(write_all(&mut this.io, cx, &goaway[..], at))?;
                    this.state = Opening::Calmed;
                }
                Opening::Deciding(held) => {
                    let mut chunk = [0u8; 1024];
                    let mut read = tokio::io::ReadBuf::new(&mut chunk);
                    ready!(std::pin::Pin::new(&mut this.io).poll_read(cx, &mut read))?;
                    let ended = read.filled().is_empty();
                    held.extend_from_slice(read.filled());
                    let decided = crate::sniff::opening(held, this.max_line);
                    this.state = match decided {
                        Some(crate::sniff::Opening::InvalidPreface) => {
                            tracing::debug!("invalid connection preface; GOAWAY");
                            Opening::Refusing(0)
                        }
                        // What came so far goes to the server, which decides the rest
                        // (an input that ends undecided included).
                        Some(crate::sniff::Opening::Http) => {
                            if held.starts_with(crate::sniff::H2_PREFACE) {
                                this.h2 = Some(H2Guard::new());
                            }
                            Opening::Replay(std::mem::take(held), 0)
                        }
                        None if ended && held.is_empty() => Opening::Open,
                        None if ended => Opening::Replay(std::mem::take(held), 0),
                        None => continue,
                    };
                }
            }
        }
        if let Some(guard) = &mut this.h2
            && guard.read(&buf.filled()[before..])
        {
            tracing::debug!(
                frames = guard.settings,
                "HTTP/2 SETTINGS flood; GOAWAY(ENHANCE_YOUR_CALM)"
            );
            this.state = if guard.output.at_boundary() {
                Opening::Calming(guard.goaway(), 0)
            } else {
                Opening::Calmed
            };
            this.h2 = None;
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes `bytes` from `*at` on, then flushes.
fn write_all<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    cx: &mut std::task::Context<'_>,
    bytes: &[u8],
    at: &mut usize,
) -> std::task::Poll<std::io::Result<()>> {
    use std::task::ready;
    while *at < bytes.len() {
        let n = ready!(std::pin::Pin::new(&mut *io).poll_write(cx, &bytes[*at..]))?;
        if n == 0 {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        *at += n;
    }
    std::pin::Pin::new(io).poll_flush(cx)
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Opened<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = std::task::ready!(std::pin::Pin::new(&mut this.io).poll_write(cx, buf))?;
        if let Some(guard) = &mut this.h2 {
            guard.output.feed(&buf[..written], |_| {});
        }
        std::task::Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written =
            std::task::ready!(std::pin::Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        if let Some(guard) = &mut this.h2 {
            let mut left = written;
            for b in bufs {
                let n = left.min(b.len());
                guard.output.feed(&b[..n], |_| {});
                left -= n;
                if left == 0 {
                    break;
                }
            }
        }
        std::task::Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
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

/// Requests in flight on one connection, and when the last one ended, for the idle
/// timeout. A request costs two atomic updates and a clock read; the idle timer reads
/// them when it fires instead of being woken for every request.
struct Activity {
    in_flight: AtomicUsize,
    /// When a request last ended, in nanoseconds after `opened` (0: none has).
    last_end: AtomicU64,
    opened: tokio::time::Instant,
    /// The idle timer, while it waits for the requests in flight to end.
    idle_timer: AtomicWaker,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            opened: tokio::time::Instant::now(),
            idle_timer: AtomicWaker::new(),
        }
    }

    /// When the connection has been idle for `timeout`, if no request starts before.
    fn idle_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        self.opened + Duration::from_nanos(self.last_end.load(Ordering::Acquire)) + timeout
    }
}

/// One request in flight; ends when dropped (with the response body, or with the
/// service future if the request is abandoned).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // The end time first: a timer that sees no request in flight sees it too.
        let ended = u64::try_from(activity.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        activity.last_end.fetch_max(ended, Ordering::AcqRel);
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.idle_timer.wake();
        }
    }
}

/// Resolves once the connection has had no request in flight for `timeout`; never when
/// `timeout` is zero.
async fn idle(activity: Arc<Activity>, timeout: Duration) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let timer = tokio::time::sleep(timeout);
    let mut timer = std::pin::pin!(timer);
    loop {
        std::future::poll_fn(|cx| {
            if activity.in_flight.load(Ordering::Acquire) == 0 {
                return std::task::Poll::Ready(());
            }
            activity.idle_timer.register(cx.waker());
            if activity.in_flight.load(Ordering::Acquire) == 0 {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        let deadline = activity.idle_deadline(timeout);
        if deadline <= tokio::time::Instant::now() {
            return;
        }
        // Requests that start and end before it fires only move the deadline on.
        timer.as_mut().reset(deadline);
        timer.as_mut().await;
    }
}

/// The connection's stack as hyper's service, called in place for each request. (The
/// adapter hyper-util offers clones the whole stack for every request, since hyper's
/// `call` takes `&self`.) The lock is only ever taken by the connection's own task, so it
/// is never contended. The stacks served here are ready at once (their limits act per
/// destination, below the router); one that is not is cloned and driven to readiness, as
/// that adapter does, and what its readiness check registered here wakes nobody.
struct InPlace<S>(std::sync::Mutex<S>);

impl<S, R> hyper::service::Service<http::Request<R>> for InPlace<S>
where
    S: tower::Service<http::Request<R>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures_util::future::Either<S::Future, tower::util::Oneshot<S, http::Request<R>>>;

    fn call(&self, req: http::Request<R>) -> Self::Future {
        use tower::ServiceExt as _;
        let mut svc = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match svc.poll_ready(&mut cx) {
            std::task::Poll::Ready(Ok(())) => futures_util::future::Either::Left(svc.call(req)),
            _ => futures_util::future::Either::Right(svc.clone().oneshot(req)),
        }
    }
}

/// Counts the requests in flight on one connection for the idle timeout.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    checks: Checks,
    stream: crate::stack::client::StreamLimits,
}

impl<S, R, B> tower::Service<http::Request<R>> for Tracked<S>
where
    S: tower::Service<http::Request<R>, Response = http::Response<B>>,
    B: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<R>) -> Self::Future {
        let in_flight = InFlight::start(self.activity.clone());
        if let Some((status, text)) = self.checks.refuse(&req) {
            // Refused before any layer sees it: nothing is forwarded, and an HTTP/1
            // connection closes after the answer (the body, if any, is never read; an
            // HTTP/2 stream ends on its own).
            tracing::debug!(%status, "request head over a limit");
            let close = req.version() < http::Version::HTTP_2;
            let mut res = http::Response::new(TrackedBody {
                inner: Reply::Local(Some(Bytes::from_static(text.as_bytes()))),
                _in_flight: in_flight,
            });
            *res.status_mut() = status;
            let headers = res.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            if close {
                headers.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            return Box::pin(async move { Ok(res) });
        }
        // The stacks box the request body inside this call; the listener's stream limits
        // go with it from there.
        let inner = &mut self.inner;
        let fut = crate::stack::client::DOWNSTREAM.sync_scope(self.stream, || inner.call(req));
        Box::pin(async move {
            let res = fut.await?;
            Ok(res.map(|inner| TrackedBody {
                inner: Reply::Served(inner),
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
#[pin_project::pin_project]
struct TrackedBody<B> {
    #[pin]
    inner: Reply<B>,
    _in_flight: InFlight,
}

/// The service's response body, or the text of a reply of this layer's own.
#[pin_project::pin_project(project = ReplyProj)]
enum Reply<B> {
    Served(#[pin] B),
    Local(Option<Bytes>),
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        match self.project().inner.project() {
            ReplyProj::Served(inner) => inner.poll_frame(cx),
            ReplyProj::Local(text) => {
                std::task::Poll::Ready(text.take().map(|t| Ok(http_body::Frame::data(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Reply::Served(inner) => inner.is_end_stream(),
            Reply::Local(text) => text.is_none(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Reply::Served(inner) => inner.size_hint(),
            Reply::Local(text) => {
                http_body::SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64))
            }
        }
    }
}

/// Decrements the active-connections gauge when the connection task ends.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `GET /` (answers at once) and `GET /slow` (answers after 90 s) with
    /// `limits`, returning the address.
    async fn serve(limits: &Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = Options {
            builder: Arc::new(builder(limits)),
            shutdown: CancellationToken::new(),
            drain: Duration::from_secs(1),
            max_connections: 8,
            active: Default::default(),
            accepted: Default::default(),
            overflow: Default::default(),
            idle_timeout: limits.idle_timeout.as_std(),
            first_byte_timeout: limits.header_read_timeout.as_std(),
            checks: Checks::of(limits),
            stream: Default::default(),
        };
        let svc = tower::service_fn(|req: http::Request<Incoming>| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(90)).await;
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
        });
        tokio::spawn(run(listener, options, move |tcp, _| async move {
            Some((tcp, svc))
        }));
        addr
    }

    /// A 30 s idle timeout; the header read timeout far longer, so only the idle timeout
    /// can close a connection.
    fn idle_limits() -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(30).into(),
            header_read_timeout: Duration::from_secs(3600).into(),
            ..Limits::default()
        }
    }

    /// Sends a keep-alive `GET path` and reads the whole `ok` response.
    async fn get(conn: &mut TcpStream, path: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !(got.starts_with(b"HTTP/1.1 200 ") && got.ends_with(b"\r\n\r\nok")) {
            let n = conn.read(&mut buf).await.unwrap();
            assert_ne!(
                n,
                0,
                "closed mid-response: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits (at most 10 min) for the server to close the connection without sending
    /// anything more; returns when that happened.
    async fn closed_at(conn: &mut TcpStream) -> tokio::time::Instant {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let closed = async {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => tokio::time::Instant::now(),
                Ok(n) => panic!("unexpected bytes: {:?}", &buf[..n]),
            }
        };
        tokio::time::timeout(Duration::from_secs(600), closed)
            .await
            .expect("the connection was not closed")
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        let addr = serve(&idle_limits()).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        get(&mut conn, "/").await;
        let idle_since = tokio::time::Instant::now();
        // A second request within the timeout is served on the same connection and
        // restarts the clock.
        tokio::time::sleep(Duration::from_secs(20)).await;
        get(&mut conn, "/").await;
        let idle_since_2 = tokio::time::Instant::now();
        assert!(idle_since_2 - idle_since >= Duration::from_secs(20));
        let closed = closed_at(&mut conn).await;
        let idle_for = closed - idle_since_2;
        assert!(
            idle_for >= Duration::from_secs(30) && idle_for < Duration::from_secs(31),
            "closed after {idle_for:?} idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn request_in_flight_outlives_the_idle_timeout() {
        let addr = serve(&idle_limits()).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let start = tokio::time::Instant::now();
        get(&mut conn, "/slow").await;
        assert!(start.elapsed() >= Duration::from_secs(90));
        let answered = tokio::time::Instant::now();
        let idle_for = closed_at(&mut conn).await - answered;
        assert!(
            idle_for >= Duration::from_secs(30) && idle_for < Duration::from_secs(31),
            "closed after {idle_for:?} idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_http2_connection_gets_goaway_after_the_idle_timeout() {
        let addr = serve(&idle_limits()).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let res = send
            .send_request(
                http::Request::get("http://a/")
                    .body(http_body_util::Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        drop(res);
        let answered = tokio::time::Instant::now();
        // The server's GOAWAY ends the client connection cleanly.
        let ended = tokio::time::timeout(Duration::from_secs(600), conn)
            .await
            .expect("the idle h2 connection was not closed");
        assert!(ended.unwrap().is_ok());
        let idle_for = answered.elapsed();
        assert!(
            idle_for >= Duration::from_secs(30) && idle_for < Duration::from_secs(31),
            "closed after {idle_for:?} idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_after_the_request_headers_timeout() {
        let addr = serve(&Limits::default()).await;
        let start = tokio::time::Instant::now();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let silent_for = closed_at(&mut conn).await - start;
        assert!(
            silent_for >= Duration::from_secs(10) && silent_for < Duration::from_secs(11),
            "closed after {silent_for:?}"
        );
        // One byte, then silence: the head's own timeout (hyper's) is what ends it, and
        // a connection that did send is not cut by the first-byte timer.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut conn, b"G")
            .await
            .unwrap();
        get_after_g(&mut conn).await;
    }

    /// Completes a `GET /` whose first byte was sent 5 s ago and reads the answer.
    async fn get_after_g(conn: &mut TcpStream) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tokio::time::sleep(Duration::from_secs(5)).await;
        conn.write_all(b"ET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = conn.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "), "{:?}", &buf[..n]);
    }

    #[test]
    fn frame_boundaries_are_followed_across_split_writes() {
        let settings = [0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0xff, 0xff];
        let ack = [0, 0, 0, 4, 1, 0, 0, 0, 0];
        let headers = [0, 0, 1, 1, 5, 0, 0, 0, 7, 0x82];
        let mut guard = H2Guard::new();
        let mut input = crate::sniff::H2_PREFACE.to_vec();
        for _ in 0..MAX_SETTINGS_FRAMES {
            input.extend_from_slice(&settings);
        }
        input.extend_from_slice(&ack);
        input.extend_from_slice(&headers);
        // Fed in pieces that cut frame headers and payloads.
        for piece in input.chunks(7) {
            assert!(!guard.read(piece));
        }
        assert_eq!(guard.settings, MAX_SETTINGS_FRAMES);
        assert_eq!(guard.last_stream, 7);
        assert_eq!(&guard.goaway()[9..], &[0, 0, 0, 7, 0, 0, 0, 0xb]);
        assert!(guard.read(&settings[..9]), "one more SETTINGS is a flood");
        let mut out = FrameScanner::default();
        out.feed(&settings[..4], |_| {});
        assert!(!out.at_boundary());
        out.feed(&settings[4..], |_| {});
        assert!(out.at_boundary());
    }

    #[test]
    fn request_heads_are_measured_exactly() {
        let checks = Checks {
            max_target: 10,
            max_head: 40,
        };
        let req = |target: &str, pad: usize| {
            http::Request::get(target)
                .header("x-pad", "p".repeat(pad))
                .body(())
                .unwrap()
        };
        // "GET" 3 + target + "x-pad" 5 + pad.
        assert!(checks.refuse(&req("/123456789", 22)).is_none());
        assert_eq!(
            checks.refuse(&req("/1234567890", 0)).map(|r| r.0),
            Some(http::StatusCode::URI_TOO_LONG)
        );
        assert_eq!(
            checks.refuse(&req("/123456789", 23)).map(|r| r.0),
            Some(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // Absolute form counts the scheme and authority.
        assert!(checks.refuse(&req("http://a/b", 0)).is_none());
        assert!(checks.refuse(&req("http://ab/b", 0)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_idle_timeout_never_closes() {
        let limits = Limits {
            idle_timeout: Duration::ZERO.into(),
            header_read_timeout: Duration::from_secs(3600).into(),
            ..Limits::default()
        };
        let addr = serve(&limits).await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        get(&mut conn, "/").await;
        let closed = tokio::spawn(async move { closed_at(&mut conn).await });
        assert!(closed.await.is_err(), "an idle connection was closed");
    }
}
