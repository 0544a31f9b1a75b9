//! The one HTTP client every upstream path uses: to a mesh endpoint over mTLS, to a
//! host outside the mesh (ALLOW_ANY passthrough), and to the local application.
//!
//! # Behaviour
//!
//! [`HttpClient`] sends each request on a pooled connection made by its connector
//! (hyper-util's client: h2 when the connection negotiated it, HTTP/1.1 otherwise):
//!
//! - the target is made absolute (`http://<authority><path>`) from the URI, else the
//!   `Host` header, else the client's fixed authority ([`HttpClient::to_authority`]
//!   for the local application, whose requests keep their `Host`);
//! - hop-by-hop headers are removed from the request and the response;
//! - the response carries [`UpstreamHost`] (the address the client dialled);
//! - the workload's exchanged metadata (Istio's `x-envoy-peer-metadata` headers) goes
//!   only to Istio mTLS peers, never to a plaintext or TLS-originated upstream;
//! - a WebSocket upgrade goes on a dedicated HTTP/1.1 connection and, when (and only
//!   when) the answer is `101`, the two connections are spliced together;
//! - errors become mesh-core's leaf errors: a failed connect is [`ConnectFailure`]
//!   (503 `UF`; reset reason `connection timeout` when the connect timeout passed, as
//!   Envoy's, else `connection failure`); a malformed response (a status line or header hyper cannot parse, a NUL
//!   in a header, more headers than hyper's limit, two differing `Content-Length`, or
//!   `Content-Length` with `Transfer-Encoding`) is [`UpstreamReset`] with
//!   [`ResetReason::ProtocolError`] (502 `UPE`, as Envoy's codec error), and the
//!   connection is not reused; anything else after the connect [`UpstreamReset`]
//!   (503 `UC`);
//! - with a per-connection request limit (DestinationRule
//!   `connectionPool.http.maxRequestsPerConnection`, [`HttpClient::max_requests_per_connection`]),
//!   a connection is retired once it has answered that many requests;
//! - with a stream limit (`connectionPool.http.maxConcurrentStreams`,
//!   [`HttpClient::max_concurrent_streams`]), an HTTP/2 connection carries at most that
//!   many requests at once and a request that finds every connection full opens another
//!   (Envoy's `max_concurrent_streams` of the upstream HTTP/2 options).
//! - with a PROXY protocol header (DestinationRule `proxyProtocol`,
//!   [`HttpClient::per_downstream`]), each downstream connection gets clients of its
//!   own, whose connections start with its header: a pooled connection never carries
//!   another client's requests under a header naming someone else.
//!
//! # Stream limits
//!
//! [`StreamLimits`] (settings `limits`) bound each request's bodies and waits. A
//! listener ([`serve`](crate::serve)) bounds the request body where the stacks box it
//! ([`Bounded`]), before any layer (the retry buffer) reads it; the client
//! ([`HttpClient::stream_limits`]) bounds the rest, because every HTTP path ends in it:
//!
//! - a request body over `maxRequestBodyBytes` gets 413: at once, forwarding nothing, when
//!   its `Content-Length` says so, else when the limit is crossed (the upstream request
//!   is cut, so the upstream never receives a whole request);
//! - a response over `maxResponseBodyBytes` gets 502 when its `Content-Length` says so,
//!   else the response is cut where the limit is crossed (the head went out already:
//!   the client sees a reset stream or a short body, never a complete-looking one);
//! - `streamIdleTimeout` (Envoy's `stream_idle_timeout`): no request body bytes, no
//!   response head (counted from the request's start or its last body frame) or no
//!   response body bytes for that long end the request: 408 `stream timeout` with flag
//!   `SI` while the response has not begun, a reset after;
//! - `requestTimeout` (Envoy's `request_timeout`): a request body still arriving that
//!   long after the request head came in gets 408 `request timeout` (at the listener).
//!
//! The timers live inside the boxed bodies and the response future, so bounding costs no
//! allocation; a request whose body is still to come when it reaches the client shares
//! one counter with the wait for the response head.
//!
//! # Abandoned requests
//!
//! When the proxy stops waiting for a response (route or per-try timeout, stream idle
//! timeout, the downstream gone: the response future is dropped) while the request is
//! still being written, the upstream connection is ended at once and the request body
//! let go, as Envoy resets the upstream stream. Left to itself, hyper's HTTP/1.1
//! connection task closes a cancelled connection only after flushing what it buffered,
//! which an upstream that does not read never lets it do: the task, the body it owns and
//! the downstream connection feeding that body would wait until the upstream closed.
//!
//! So every HTTP/1.1 connection of the pools carries an [`Abort`] switch ([`Abortable`]
//! wraps the connector, [`AbortableIo`] the connection). The pools run their tasks through
//! [`ConnectionExecutor`], which marks each poll of a task with a thread-local scope: the
//! connection's I/O makes itself known in its task's scope, and a request body polled
//! in that scope links its request to the connection. A response future dropped before
//! the response head, with its body unfinished or the connection's writes stalled,
//! throws the switch: the connection's next I/O call fails, hyper's task ends and drops
//! the body, and the socket is closed with a reset (`SO_LINGER` 0), which a peer that
//! never reads sees at once where a FIN would wait behind the bytes it has not read.
//! An h1 connection busy with a request is never idle in the pool, so the switch never
//! ends another request's connection. An HTTP/2 stream needs none of this: hyper resets
//! an abandoned stream with `RST_STREAM` `CANCEL`, freeing its window, and the
//! connection carries on.
//!
//! The link is the record a request with a body still to come already shares with the
//! wait for its response head (the stream idle timer's): one allocation for such a
//! request (none more under the default `streamIdleTimeout`), one per HTTP/1.1
//! connection, none for a request without a body.
//!
//! # Retiring connections after N requests
//!
//! hyper-util's pool has no such limit. Each connection of an [`UpstreamConnector`]
//! carries a [`ConnectionRequests`] counter in its connection extras, which hyper copies
//! into every response of the connection. When a response head arrives and the count
//! reaches the limit, the client poisons the connection through
//! [`capture_connection`]: hyper's pool then never hands it out again (`is_open` is
//! false) and drops it when the response finishes, which closes it. An HTTP/1.1
//! connection serves one request at a time, so exactly N requests use it; on an h2
//! connection, streams opened before the N-th response head may also finish on it
//! (Envoy counts at stream start). Counting at the response, not in a wrapper around
//! the I/O, keeps the count exact for HTTP/1.1 without parsing bytes.
//!
//! # Capping streams per HTTP/2 connection
//!
//! hyper-util's pool multiplexes every request for one authority on one HTTP/2
//! connection. Under a stream limit the client keeps shards: pools of their own, each
//! with its own connection, and a count of the streams open on it. A request takes the
//! first shard with room (a new shard, hence a new connection, when all are full) and
//! holds its place until the response body ends or is dropped. Shards stay once made;
//! their idle connections close after the idle timeout like any other.
//!
//! # Layer placement
//!
//! The innermost service: per endpoint under the balancer (outbound, gateway), after
//! authorization (inbound), or straight after routing for unknown hosts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{
    Connect, Connected, Connection, HttpConnector, capture_connection,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::{BoxError, ConnectFailure, ResetReason, UpstreamReset};
use mesh_core::extensions::{ConnectionInfo, UpstreamHost};
use mesh_tls::{
    Alpn, ConnectionOpened, ConnectionRequests, UpstreamConn, UpstreamConnector, UpstreamSecurity,
};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::headers::strip_hop_by_hop;

/// How the client's requests are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// As the connection negotiated (h2 by ALPN, else HTTP/1.1); the request's own
    /// version is translated.
    #[default]
    Negotiated,
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c to a plaintext application).
    Http2,
    /// The request's own: HTTP/2 requests go as HTTP/2 (prior knowledge on plaintext),
    /// others as HTTP/1.1 (Envoy's `use_downstream_protocol`).
    Downstream,
}

/// Per-request bounds on the bodies the client carries (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamLimits {
    /// Request body bytes; 0 is unlimited.
    pub max_request_body: u64,
    /// Response body bytes; 0 is unlimited.
    pub max_response_body: u64,
    /// Longest wait for a request body frame, the response head or a response body frame.
    pub stream_idle: Option<Duration>,
    /// Longest time from the start of a request to the end of its body.
    pub request_timeout: Option<Duration>,
}

impl StreamLimits {
    /// The stream limits of the settings' `limits` (zero durations and sizes: none).
    pub fn of(limits: &crate::settings::Limits) -> Self {
        let some = |d: Duration| (!d.is_zero()).then_some(d);
        Self {
            max_request_body: limits.max_request_body_bytes,
            max_response_body: limits.max_response_body_bytes,
            stream_idle: some(limits.stream_idle_timeout.as_std()),
            request_timeout: some(limits.request_timeout.as_std()),
        }
    }
}

tokio::task_local! {
    /// The stream limits of the listener whose service is being called: set by
    /// [`serve`](crate::serve) around each call of a connection's service, read where
    /// the request body is boxed ([`boxed_request`](super::boxed_request)), so the
    /// client's body is bounded from the edge on, before any layer buffers it.
    pub(crate) static DOWNSTREAM: StreamLimits;
}

/// The stream limits of the listener now calling its service, if any.
pub(crate) fn downstream_limits() -> Option<StreamLimits> {
    DOWNSTREAM.try_with(|l| *l).ok()
}

impl StreamLimits {
    /// Whether any bound applies to request bodies.
    pub fn bounds_requests(&self) -> bool {
        self.max_request_body > 0 || self.stream_idle.is_some() || self.request_timeout.is_some()
    }
}

/// Whether `e` is a request body's stream limit (size, idle, request timeout), which has
/// an answer of its own.
pub fn is_stream_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    use mesh_core::error::is_caused_by;
    is_caused_by::<RequestBodyTooLarge>(e)
        || is_caused_by::<StreamIdleTimeout>(e)
        || is_caused_by::<RequestTimeout>(e)
}

/// A request body over `maxRequestBodyBytes`: 413.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request body larger than the limit of {0} bytes")]
pub struct RequestBodyTooLarge(pub u64);

/// A response body over `maxResponseBodyBytes`: 502 before the head, a reset after.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("response body larger than the limit of {0} bytes")]
pub struct ResponseBodyTooLarge(pub u64);

/// Nothing moved on the stream for `streamIdleTimeout`: 408 `SI`, or a reset.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("stream timeout")]
pub struct StreamIdleTimeout;

/// The request body did not end within `requestTimeout`: 408.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request timeout")]
pub struct RequestTimeout;

/// A body under [`StreamLimits`]: counts its bytes against `max` and fails when a
/// frame takes longer than `idle`, or the body has not ended by `deadline`. The timers
/// live in the body (it is boxed where it is used), so bounding a body allocates nothing.
#[pin_project::pin_project]
pub struct Bounded<B> {
    #[pin]
    inner: B,
    max: u64,
    seen: u64,
    idle: Option<Duration>,
    /// Armed while a frame is waited for.
    #[pin]
    idle_timer: Option<tokio::time::Sleep>,
    #[pin]
    deadline: Option<tokio::time::Sleep>,
    /// The error when `max` is crossed.
    too_large: fn(u64) -> BoxError,
}

impl<B> std::fmt::Debug for Bounded<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded")
            .field("max", &self.max)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl<B> Bounded<B> {
    fn new(
        inner: B,
        max: u64,
        idle: Option<Duration>,
        deadline: Option<Duration>,
        too_large: fn(u64) -> BoxError,
    ) -> Self {
        Self {
            inner,
            max,
            seen: 0,
            idle,
            idle_timer: None,
            deadline: deadline.map(tokio::time::sleep),
            too_large,
        }
    }

    /// A downstream request body under `limits`, from now on (the request head is in).
    pub fn downstream(inner: B, limits: &StreamLimits) -> Self {
        Self::new(
            inner,
            limits.max_request_body,
            limits.stream_idle,
            limits.request_timeout,
            |max| Box::new(RequestBodyTooLarge(max)),
        )
    }

    /// A response body under `limits`.
    fn response(inner: B, limits: &StreamLimits) -> Self {
        Self::new(
            inner,
            limits.max_response_body,
            limits.stream_idle,
            None,
            |max| Box::new(ResponseBodyTooLarge(max)),
        )
    }
}

impl<B> http_body::Body for Bounded<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.seen == 0 && *this.max > 0 && this.inner.as_ref().size_hint().lower() > *this.max {
            // The declared length is over the limit already.
            return Poll::Ready(Some(Err((this.too_large)(*this.max))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                // Something arrived: the idle clock starts again at the next wait.
                this.idle_timer.set(None);
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    None => return Poll::Ready(None),
                };
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.max > 0 && *this.seen > *this.max {
                        return Poll::Ready(Some(Err((this.too_large)(*this.max))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if let Some(idle) = *this.idle {
                    if this.idle_timer.is_none() {
                        this.idle_timer.set(Some(tokio::time::sleep(idle)));
                    }
                    if let Some(timer) = this.idle_timer.as_mut().as_pin_mut()
                        && timer.poll(cx).is_ready()
                    {
                        return Poll::Ready(Some(Err(Box::new(StreamIdleTimeout))));
                    }
                }
                if let Some(deadline) = this.deadline.as_mut().as_pin_mut()
                    && deadline.poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(Box::new(RequestTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body on its way to the upstream: bounded in size, and noting when each
/// frame goes so that the wait for the response head counts from the last one. Its
/// timers are the edge's ([`Bounded`], where the listener boxed the body).
#[pin_project::pin_project]
#[derive(Debug)]
pub struct Sent {
    #[pin]
    inner: BoxBody,
    max: u64,
    seen: u64,
    /// Shared with the request's response future while a body is still to come.
    link: Option<Arc<RequestLink>>,
    /// When the request started.
    started: tokio::time::Instant,
}

impl http_body::Body for Sent {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(link) = this.link.as_ref()
            && link.connection.get().is_none()
        {
            // Polled by an HTTP/1.1 connection's task: this request is that connection's.
            if let Some(connection) = scoped_connection() {
                let _ = link.connection.set(connection);
            }
        }
        let frame = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(link) = this.link {
            let millis = u64::try_from(this.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            link.activity.store(millis, Ordering::Relaxed);
            if frame.is_none() || this.inner.is_end_stream() {
                link.body_done.store(true, Ordering::Release);
            }
        }
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            *this.seen += data.len() as u64;
            if *this.max > 0 && *this.seen > *this.max {
                return Poll::Ready(Some(Err(Box::new(RequestBodyTooLarge(*this.max)))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The body type the client's pools send.
type Outgoing = Sent;

/// A pool of the client's connections: `C`'s, aborted when their request is abandoned.
type Pool<C> = Client<Abortable<C>, Outgoing>;

thread_local! {
    /// While a pool's task is polled ([`Scoped`]): the HTTP/1.1 connection the task
    /// runs, once its I/O made itself known; read by the request body the task polls.
    static CONNECTION: std::cell::RefCell<Option<Option<Arc<Abort>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs the pools' background tasks (connections, HTTP/2 streams) on tokio, each in a
/// scope where a connection makes itself known to the request body it sends.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectionExecutor;

impl<F> hyper::rt::Executor<F> for ConnectionExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Scoped {
            fut,
            connection: None,
        });
    }
}

/// A pool task with the connection it runs (8 bytes beside the task's future: tokio
/// aligns task cells, and every HTTP/2 request spawns a task).
#[pin_project::pin_project]
struct Scoped<F> {
    #[pin]
    fut: F,
    connection: Option<Arc<Abort>>,
}

impl<F: std::future::Future> std::future::Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        /// Ends the scope even if the task panics.
        struct Leave<'a>(&'a mut Option<Arc<Abort>>, Option<Option<Arc<Abort>>>);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let outer = self.1.take();
                *self.0 = CONNECTION
                    .with(|c| std::mem::replace(&mut *c.borrow_mut(), outer))
                    .flatten();
            }
        }
        let this = self.project();
        let mine = this.connection.take();
        let outer = CONNECTION.with(|c| c.borrow_mut().replace(mine));
        let _leave = Leave(this.connection, outer);
        this.fut.poll(cx)
    }
}

/// The connection of the pool task being polled, if it made itself known.
fn scoped_connection() -> Option<Arc<Abort>> {
    CONNECTION.with(|c| c.borrow().as_ref().and_then(Clone::clone))
}

/// Makes `connection` known in the scope of the pool task being polled; whether a pool
/// task is being polled.
fn make_known(connection: &Arc<Abort>) -> bool {
    CONNECTION.with(|c| match &mut *c.borrow_mut() {
        Some(slot) => {
            if slot.is_none() {
                *slot = Some(connection.clone());
            }
            true
        }
        None => false,
    })
}

/// What a request whose body is still to come shares with the connection carrying it.
#[derive(Debug, Default)]
struct RequestLink {
    /// When a body frame last went, in milliseconds after the request started.
    activity: std::sync::atomic::AtomicU64,
    /// The body has ended.
    body_done: AtomicBool,
    /// The HTTP/1.1 connection, once its task polled the body.
    connection: std::sync::OnceLock<Arc<Abort>>,
}

/// The abort switch of one HTTP/1.1 connection.
#[derive(Debug, Default)]
pub struct Abort {
    aborted: AtomicBool,
    /// The last write or flush could not complete: the upstream is not reading.
    stalled: AtomicBool,
    /// The connection's task, woken by an abort.
    task: futures_util::task::AtomicWaker,
}

impl Abort {
    fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Aborts the connection of a request given up before its response head (dropped
/// while it is armed) if the request is still being written.
struct Abandon(Option<Arc<RequestLink>>);

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(link) = self.0.take()
            && let Some(connection) = link.connection.get()
            && (!link.body_done.load(Ordering::Acquire)
                || connection.stalled.load(Ordering::Acquire))
        {
            connection.abort();
        }
    }
}

/// A connection the client can reset, and tell whether it speaks HTTP/2.
pub trait UpstreamSocket {
    /// The TCP connection underneath.
    fn socket(&self) -> &TcpStream;
    /// Whether ALPN chose `h2`.
    fn is_h2(&self) -> bool;
}

impl UpstreamSocket for TokioIo<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.inner()
    }

    fn is_h2(&self) -> bool {
        false
    }
}

impl UpstreamSocket for UpstreamConn {
    fn socket(&self) -> &TcpStream {
        self.tcp()
    }

    fn is_h2(&self) -> bool {
        UpstreamConn::is_h2(self)
    }
}

/// A connector whose HTTP/1.1 connections can be aborted (see the module docs); `h2`
/// when the pool speaks only HTTP/2 (prior knowledge).
#[derive(Clone, Debug)]
pub struct Abortable<C> {
    inner: C,
    h2: bool,
}

impl<C> tower::Service<Uri> for Abortable<C>
where
    C: tower::Service<Uri>,
    C::Future: Unpin,
    C::Response: UpstreamSocket,
{
    type Response = AbortableIo<C::Response>;
    type Error = C::Error;
    type Future = Connecting<C::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Connecting {
            inner: self.inner.call(uri),
            h2: self.h2,
        }
    }
}

/// A connection attempt of [`Abortable`].
#[derive(Debug)]
pub struct Connecting<F> {
    inner: F,
    h2: bool,
}

impl<F, T, E> std::future::Future for Connecting<F>
where
    F: std::future::Future<Output = Result<T, E>> + Unpin,
    T: UpstreamSocket,
{
    type Output = Result<AbortableIo<T>, E>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let h2 = self.h2;
        std::pin::Pin::new(&mut self.inner)
            .poll(cx)
            .map(|r| r.map(|io| AbortableIo::new(io, h2)))
    }
}

/// A connection of [`Abortable`]: an HTTP/1.1 one carries its [`Abort`] switch; once
/// thrown, every I/O call fails and the socket closes with a reset.
#[derive(Debug)]
pub struct AbortableIo<T> {
    inner: T,
    abort: Option<Arc<Abort>>,
    /// Made known in its task's scope.
    known: bool,
}

impl<T: UpstreamSocket> AbortableIo<T> {
    fn new(inner: T, h2: bool) -> Self {
        // An HTTP/2 connection carries other streams: hyper resets an abandoned one.
        let abort = (!h2 && !inner.is_h2()).then(|| Arc::new(Abort::default()));
        Self {
            inner,
            abort,
            known: false,
        }
    }

    /// Makes the connection known to the body its task polls; fails once aborted.
    fn check(&mut self) -> std::io::Result<()> {
        let Some(abort) = &self.abort else {
            return Ok(());
        };
        if !self.known {
            self.known = make_known(abort);
        }
        if abort.aborted.load(Ordering::Acquire) {
            // A reset: a FIN would wait behind the bytes an upstream that does not
            // read has left in the socket, and the upstream would never see it.
            let _ = self.inner.socket().set_zero_linger();
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "request abandoned by the client",
            ));
        }
        Ok(())
    }

    /// One I/O call on the inner connection (`write`: a write, flush or shutdown), failed
    /// at once when aborted and, on `Pending`, waiting for an abort as well.
    fn guarded<R>(
        &mut self,
        cx: &mut Context<'_>,
        write: bool,
        io: impl FnOnce(std::pin::Pin<&mut T>, &mut Context<'_>) -> Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>>
    where
        T: Unpin,
    {
        self.check()?;
        let poll = io(std::pin::Pin::new(&mut self.inner), cx);
        self.after(cx, write, poll)
    }

    /// Notes the outcome of a write or flush (`write`) or read, and on `Pending` waits
    /// for an abort as well.
    fn after<R>(
        &self,
        cx: &mut Context<'_>,
        write: bool,
        poll: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        let Some(abort) = &self.abort else {
            return poll;
        };
        if write {
            abort.stalled.store(poll.is_pending(), Ordering::Release);
        }
        if poll.is_pending() {
            abort.task.register(cx.waker());
            if abort.aborted.load(Ordering::Acquire) {
                // Thrown meanwhile: the next call fails.
                cx.waker().wake_by_ref();
            }
        }
        poll
    }
}

impl<T: Connection> Connection for AbortableIo<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<T> hyper::rt::Read for AbortableIo<T>
where
    T: hyper::rt::Read + UpstreamSocket + Unpin,
{
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut()
            .guarded(cx, false, |io, cx| io.poll_read(cx, buf))
    }
}

impl<T> hyper::rt::Write for AbortableIo<T>
where
    T: hyper::rt::Write + UpstreamSocket + Unpin,
{
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .guarded(cx, true, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut()
            .guarded(cx, true, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut().guarded(cx, true, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.get_mut()
            .guarded(cx, true, |io, cx| io.poll_shutdown(cx))
    }
}

/// Pooled connections from one connector, with an HTTP/1.1-only pool for upgrades.
///
/// A handle: clones share the pools and settings behind one reference count, so the
/// balancer's copy of an endpoint's client for each request costs one atomic increment
/// (the parts themselves hold a dozen reference-counted pieces).
#[derive(Clone, Debug)]
pub struct HttpClient<C>(Arc<Parts<C>>);

/// What an [`HttpClient`] is made of.
#[derive(Clone, Debug)]
struct Parts<C> {
    client: Pool<C>,
    upgrades: Client<C, Outgoing>,
    /// HTTP/2 connections for HTTP/2 requests under [`Protocol::Downstream`].
    h2: Option<Pool<C>>,
    /// The address the connector dials (for [`UpstreamHost`]); `None` when it depends
    /// on the request (passthrough).
    address: Option<SocketAddr>,
    /// Every request goes to this authority (the local application), keeping its Host.
    authority: Option<Authority>,
    protocol: Protocol,
    /// Requests per connection; 0 is unlimited.
    max_requests_per_connection: u32,
    /// Age after which a connection takes no more requests.
    max_connection_duration: Option<Duration>,
    /// Whether the upstream is a mesh peer (Istio mTLS): only then does the workload's
    /// exchanged metadata go with the request.
    mesh_peer: bool,
    /// What new pools are made of: the connector and the idle timeout.
    connector: C,
    idle_timeout: Duration,
    /// Streams per HTTP/2 connection, for `client` (when it may speak HTTP/2).
    streams: Option<Arc<StreamLimit<C>>>,
    /// Streams per HTTP/2 connection, for `h2`.
    h2_streams: Option<Arc<StreamLimit<C>>>,
    /// Body sizes and stream timers.
    limits: StreamLimits,
    /// Pools per downstream connection (DestinationRule `proxyProtocol`).
    by_downstream: Option<Arc<ByDownstream<C>>>,
}

/// The (client, local) addresses of a downstream connection.
type DownstreamKey = (SocketAddr, SocketAddr);

/// Clients per downstream connection: each connection of one carries that downstream
/// connection's PROXY header, so connections are never shared between clients (Envoy
/// keys its upstream pools by the downstream addresses when the header is on).
struct ByDownstream<C> {
    clients: Mutex<HashMap<DownstreamKey, (HttpClient<C>, Instant)>>,
    /// A client unused this long is forgotten (its pooled connections have closed).
    idle: Duration,
    make: Box<dyn Fn(SocketAddr, SocketAddr) -> HttpClient<C> + Send + Sync>,
}

impl<C: Clone> ByDownstream<C> {
    /// The client of the downstream connection `key`, made on first use.
    fn client(&self, key: DownstreamKey) -> HttpClient<C> {
        let now = Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((client, used)) = clients.get_mut(&key) {
            *used = now;
            return client.clone();
        }
        // Forget clients left idle: requests in flight keep their own clone.
        let idle = self.idle;
        clients.retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
        let client = (self.make)(key.0, key.1);
        clients.insert(key, (client.clone(), now));
        client
    }
}

impl<C> std::fmt::Debug for ByDownstream<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.clients.lock().map(|c| c.len()).unwrap_or_default();
        f.debug_struct("ByDownstream").field("clients", &n).finish()
    }
}

/// Pools of one client whose HTTP/2 connections carry at most `max` streams at once.
struct StreamLimit<C> {
    max: u32,
    /// The first is the client's own pool; more are made when all are full.
    shards: Mutex<Vec<Shard<C>>>,
    /// Makes the pool of a new shard.
    make: Box<dyn Fn() -> Pool<C> + Send + Sync>,
}

struct Shard<C> {
    client: Pool<C>,
    open: Arc<AtomicU32>,
}

/// One stream's place in a shard, given back when dropped.
#[derive(Debug)]
struct OpenStream(Arc<AtomicU32>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<C> std::fmt::Debug for StreamLimit<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards = self.shards.lock().map(|s| s.len()).unwrap_or_default();
        f.debug_struct("StreamLimit")
            .field("max", &self.max)
            .field("shards", &shards)
            .finish()
    }
}

impl<C: Clone> StreamLimit<C> {
    fn new(max: u32, first: Pool<C>, make: impl Fn() -> Pool<C> + Send + Sync + 'static) -> Self {
        Self {
            max,
            shards: Mutex::new(vec![Shard {
                client: first,
                open: Arc::new(AtomicU32::new(0)),
            }]),
            make: Box::new(make),
        }
    }

    /// The pool of the first shard with room, and the place taken in it.
    fn take(&self) -> (Pool<C>, OpenStream) {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let room = shards
            .iter()
            .find(|s| s.open.load(Ordering::Acquire) < self.max);
        let shard = match room {
            Some(shard) => shard,
            None => {
                shards.push(Shard {
                    client: (self.make)(),
                    open: Arc::new(AtomicU32::new(0)),
                });
                let last = shards.len() - 1;
                &shards[last]
            }
        };
        // Counted under the lock: two requests never both take a shard's last place.
        shard.open.fetch_add(1, Ordering::AcqRel);
        (shard.client.clone(), OpenStream(shard.open.clone()))
    }
}

/// A pool of `connector`'s connections.
fn pool<C>(connector: C, idle_timeout: Duration, http2_only: bool) -> Pool<C>
where
    Abortable<C>: Connect + Clone + Send + Sync + 'static,
{
    Client::builder(ConnectionExecutor)
        .pool_idle_timeout(idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(http2_only)
        .build(Abortable {
            inner: connector,
            h2: http2_only,
        })
}

impl<C> HttpClient<C>
where
    C: Connect + Clone + Send + Sync + 'static,
    Abortable<C>: Connect + Clone + Send + Sync + 'static,
{
    /// A client over `connector` (and `upgrade_connector` for WebSocket upgrades);
    /// idle pooled connections close after `idle_timeout`.
    pub fn new(
        connector: C,
        upgrade_connector: C,
        idle_timeout: Duration,
        protocol: Protocol,
    ) -> Self {
        let client = pool(connector.clone(), idle_timeout, protocol == Protocol::Http2);
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(upgrade_connector);
        let h2 =
            (protocol == Protocol::Downstream).then(|| pool(connector.clone(), idle_timeout, true));
        Self(Arc::new(Parts {
            client,
            upgrades,
            h2,
            address: None,
            authority: None,
            protocol,
            max_requests_per_connection: 0,
            max_connection_duration: None,
            mesh_peer: false,
            connector,
            idle_timeout,
            streams: None,
            h2_streams: None,
            limits: StreamLimits::default(),
            by_downstream: None,
        }))
    }

    /// The parts, to set while the client is built (not yet shared: no copy is made).
    fn parts(&mut self) -> &mut Parts<C> {
        Arc::make_mut(&mut self.0)
    }

    /// Bounds every request's bodies and waits by `limits` (none by default).
    #[must_use]
    pub fn stream_limits(mut self, limits: StreamLimits) -> Self {
        self.parts().limits = limits;
        self
    }

    /// Sends each request through a client of its own downstream connection (by the
    /// request's [`ConnectionInfo`]), made by `make(client address, local address)` and
    /// forgotten after `idle` unused; a request without one uses this client.
    #[must_use]
    pub fn per_downstream(
        mut self,
        idle: Duration,
        make: impl Fn(SocketAddr, SocketAddr) -> HttpClient<C> + Send + Sync + 'static,
    ) -> Self {
        self.parts().by_downstream = Some(Arc::new(ByDownstream {
            clients: Mutex::new(HashMap::new()),
            idle,
            make: Box::new(make),
        }));
        self
    }

    /// Caps the streams of each HTTP/2 connection at `n` (0: no cap), opening another
    /// connection when every one is full. Requests sent as HTTP/1.1 are not affected.
    #[must_use]
    pub fn max_concurrent_streams(mut self, n: u32) -> Self {
        let parts = self.parts();
        if n == 0 {
            parts.streams = None;
            parts.h2_streams = None;
            return self;
        }
        let limit = |first: &Pool<C>, http2_only: bool| {
            let (connector, idle) = (parts.connector.clone(), parts.idle_timeout);
            Arc::new(StreamLimit::new(n, first.clone(), move || {
                pool(connector.clone(), idle, http2_only)
            }))
        };
        // An HTTP/1.1-only pool has no streams to cap.
        let streams = match parts.protocol {
            Protocol::Http1 | Protocol::Downstream => None,
            Protocol::Http2 => Some(limit(&parts.client, true)),
            Protocol::Negotiated => Some(limit(&parts.client, false)),
        };
        let h2_streams = parts.h2.as_ref().map(|h2| limit(h2, true));
        parts.streams = streams;
        parts.h2_streams = h2_streams;
        self
    }

    /// Retires a connection once it has answered `n` requests (0: never). Needs a
    /// connector whose connections carry [`ConnectionRequests`] ([`UpstreamConnector`]);
    /// with others it has no effect.
    #[must_use]
    pub fn max_requests_per_connection(mut self, n: u32) -> Self {
        self.parts().max_requests_per_connection = n;
        self
    }

    /// Retires a connection once a response completes after it has been open for `max`
    /// (`maxConnectionDuration`; with a connector whose connections carry
    /// [`ConnectionOpened`], as [`UpstreamConnector`]'s do).
    #[must_use]
    pub fn max_connection_duration(mut self, max: Option<Duration>) -> Self {
        self.parts().max_connection_duration = max;
        self
    }

    /// Records `address` as the upstream host of every response.
    #[must_use]
    pub fn at(mut self, address: SocketAddr) -> Self {
        self.parts().address = Some(address);
        self
    }

    /// Sends every request to `address` whatever its authority (the request keeps its
    /// `Host`).
    #[must_use]
    pub fn to_authority(mut self, address: SocketAddr) -> Self {
        let parts = self.parts();
        parts.authority = Authority::try_from(address.to_string()).ok();
        parts.address = Some(address);
        self
    }
}

impl HttpClient<UpstreamConnector> {
    /// The client of one endpoint over `connector`: Istio mTLS (h2 or HTTP/1.1 by ALPN),
    /// TLS origination or plaintext. To a TLS-originated or plaintext upstream, requests
    /// go as `protocol` says ([`upstream_protocol`]): HTTP/1.1 (TLS offering only
    /// `http/1.1`), HTTP/2 (h2c; TLS offering `h2` and `http/1.1`), or the request's own
    /// (TLS: HTTP/1.1). Upgrades go on HTTP/1.1-only connections.
    pub fn upstream(
        connector: UpstreamConnector,
        idle_timeout: Duration,
        protocol: Protocol,
    ) -> Self {
        let address = connector.address();
        let mesh_peer = matches!(connector.security(), UpstreamSecurity::Istio { .. });
        let tls = matches!(connector.security(), UpstreamSecurity::Originate { .. });
        let (connector, protocol) = match protocol {
            _ if mesh_peer => (connector, Protocol::Negotiated),
            Protocol::Http2 if tls => (connector.alpn(Alpn::Negotiate), Protocol::Negotiated),
            Protocol::Http2 => (connector, Protocol::Http2),
            Protocol::Downstream if !tls => (connector, Protocol::Downstream),
            _ => (connector.alpn(Alpn::Http1), Protocol::Http1),
        };
        let upgrades = connector.clone().alpn(Alpn::Http1);
        let mut client = Self::new(connector, upgrades, idle_timeout, protocol).at(address);
        client.parts().mesh_peer = mesh_peer;
        client
    }
}

impl HttpClient<HttpConnector> {
    /// A plaintext client (`TCP_NODELAY`, `connect_timeout`).
    pub fn plaintext(
        connect_timeout: Duration,
        idle_timeout: Duration,
        protocol: Protocol,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        Self::new(http.clone(), http, idle_timeout, protocol)
    }

    /// The client of a local application at `app` (h2 with prior knowledge when `h2`).
    pub fn application(app: SocketAddr, h2: bool) -> Self {
        let protocol = if h2 { Protocol::Http2 } else { Protocol::Http1 };
        // Envoy's default idle timeout of upstream connections.
        Self::plaintext(Duration::from_secs(10), Duration::from_secs(3600), protocol)
            .to_authority(app)
    }
}

/// The HTTP version of requests to a non-mesh endpoint of a destination whose service
/// port is of class `port` under the DestinationRule's `connectionPool.http` (ISTIO.md
/// PS-20, first match wins): an `http2`/`grpc` port is HTTP/2; `useClientProtocol` keeps
/// the request's version; `h2UpgradePolicy: UPGRADE` is HTTP/2 and `DO_NOT_UPGRADE`
/// HTTP/1.1; a port of no declared protocol keeps the request's version; else HTTP/1.1
/// (the mesh default `DO_NOT_UPGRADE`). Endpoints with a sidecar negotiate by ALPN.
pub fn upstream_protocol(
    port: mesh_routing::PortProtocol,
    http: Option<&mesh_core::config::HttpSettings>,
) -> Protocol {
    use mesh_core::config::H2UpgradePolicy;
    use mesh_routing::PortProtocol;
    if port == PortProtocol::Http2 {
        return Protocol::Http2;
    }
    if http.and_then(|h| h.use_client_protocol) == Some(true) {
        return Protocol::Downstream;
    }
    match http.and_then(|h| h.h2_upgrade_policy) {
        Some(H2UpgradePolicy::Upgrade) => Protocol::Http2,
        Some(H2UpgradePolicy::DoNotUpgrade) => Protocol::Http1,
        _ if port == PortProtocol::Auto => Protocol::Downstream,
        _ => Protocol::Http1,
    }
}

/// Whether `req` asks for a WebSocket upgrade (the only Upgrade that is forwarded).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req
            .headers()
            .get(http::header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Maps a hyper client error to mesh-core's leaf errors.
pub(crate) fn upstream_error(e: hyper_util::client::legacy::Error) -> BoxError {
    if e.is_connect() {
        // The connector's own timeout, or the system's on unanswered SYNs.
        let timed_out = mesh_core::error::find_cause::<std::io::Error>(&e)
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        return Box::new(if timed_out {
            ConnectFailure::timed_out(e)
        } else {
            ConnectFailure::new(e)
        });
    }
    let parse = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(hyper::Error::is_parse);
    let reason = if parse {
        ResetReason::ProtocolError
    } else {
        ResetReason::ConnectionTermination
    };
    Box::new(UpstreamReset::new(reason, true, Some(Box::new(e))))
}

/// A response head hyper accepted but a proxy must not pass on (RFC 9112 §6.1, §6.3):
/// `Content-Length` together with `Transfer-Encoding`, or `Content-Length` fields that
/// disagree (hyper refuses most of these itself; this is the same rule, checked again).
fn malformed_framing(res: &Response<hyper::body::Incoming>) -> bool {
    if res.version() >= Version::HTTP_2 {
        return false;
    }
    let headers = res.headers();
    let mut lengths = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return false;
    };
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || lengths.any(|other| other != first)
        || first.as_bytes().contains(&b',')
}

/// Rewrites the request URI to `http://<authority><path>`: `fixed` when given, else the
/// URI's authority, else the Host header.
fn absolute(req: &mut Request<BoxBody>, fixed: Option<&Authority>) {
    let authority = fixed
        .cloned()
        .or_else(|| req.uri().authority().cloned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<Authority>().ok())
        });
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// The response future of [`HttpClient`]: one allocation per request, beside the
/// request and connection state hyper allocates anyway.
pub type ResponseFuture =
    futures_util::future::BoxFuture<'static, Result<Response<BoxBody>, BoxError>>;

impl<C> tower::Service<Request<BoxBody>> for HttpClient<C>
where
    C: Connect + Clone + Send + Sync + 'static,
    Abortable<C>: Connect + Clone + Send + Sync + 'static,
{
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: hyper's pool waits for or opens a connection per request.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<BoxBody>) -> ResponseFuture {
        let this = &*self.0;
        if let Some(by) = &this.by_downstream
            && let Some(info) = req.extensions().get::<ConnectionInfo>()
        {
            return by.client((info.remote, info.local)).call(req);
        }
        let limits = this.limits;
        if limits.max_request_body > 0
            && http_body::Body::size_hint(req.body()).lower() > limits.max_request_body
        {
            // The declared length is over the limit: refused before anything is sent.
            let err: BoxError = Box::new(RequestBodyTooLarge(limits.max_request_body));
            return Box::pin(std::future::ready(Err(err)));
        }
        strip_hop_by_hop(req.headers_mut());
        if !this.mesh_peer {
            // A plaintext or TLS-originated upstream has no sidecar to read the
            // workload's metadata: it does not leave the mesh. Usually there is none to
            // remove (the inbound hop to the application took it already).
            use mesh_telemetry::exchange::{PEER_METADATA, PEER_METADATA_ID, carries_metadata};
            if carries_metadata(req.headers()) {
                req.headers_mut().remove(PEER_METADATA);
                req.headers_mut().remove(PEER_METADATA_ID);
            }
        }
        absolute(&mut req, this.authority.as_ref());
        let address = this.address;
        let upgrade = is_upgrade(&req);
        if upgrade {
            *req.version_mut() = Version::HTTP_11;
        } else {
            match this.protocol {
                Protocol::Negotiated => {}
                Protocol::Http1 => *req.version_mut() = Version::HTTP_11,
                Protocol::Http2 => *req.version_mut() = Version::HTTP_2,
                Protocol::Downstream if req.version() == Version::HTTP_2 => {}
                Protocol::Downstream => *req.version_mut() = Version::HTTP_11,
            }
            // Only HPACK reads the mark (an ALPN-negotiated connection may be HTTP/2).
            if this.protocol == Protocol::Negotiated || req.version() == Version::HTTP_2 {
                mesh_telemetry::trace::never_index_per_request_ids(req.headers_mut());
            }
        }
        let downstream = if upgrade {
            req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let started = tokio::time::Instant::now();
        // Only a request body still to come can keep the stream alive while the head is
        // waited for; an empty or ended one shares nothing (no allocation).
        let pending = {
            let body = req.body();
            !(http_body::Body::is_end_stream(body)
                || http_body::Body::size_hint(body).exact() == Some(0))
        };
        let link = pending.then(|| Arc::new(RequestLink::default()));
        let req = req.map(|inner| Sent {
            inner,
            max: limits.max_request_body,
            seen: 0,
            link: link.clone(),
            started,
        });
        let limit = this.max_requests_per_connection;
        let max_age = this.max_connection_duration;
        let mut req = req;
        let captured =
            ((limit > 0 || max_age.is_some()) && !upgrade).then(|| capture_connection(&mut req));
        let h2 = this.h2.is_some() && req.version() == Version::HTTP_2;
        let (fut, stream) = match (&this.streams, &this.h2_streams) {
            _ if upgrade => (this.upgrades.request(req), None),
            (_, Some(limit)) if h2 => {
                let (client, stream) = limit.take();
                (client.request(req), Some(stream))
            }
            (Some(limit), _) if !h2 => {
                let (client, stream) = limit.take();
                (client.request(req), Some(stream))
            }
            _ => match &this.h2 {
                Some(h2_client) if h2 => (h2_client.request(req), None),
                _ => (this.client.request(req), None),
            },
        };
        Box::pin(async move {
            // Dropped before hyper answers (a timeout, the client gone): the request is
            // abandoned.
            let mut abandon = Abandon(link);
            let res = match limits.stream_idle {
                Some(idle) => head_within(fut, idle, started, abandon.0.as_deref()).await?,
                None => fut.await,
            };
            // Answered or failed: hyper is done with the request or ends the connection.
            abandon.0 = None;
            let mut res = res.map_err(upstream_error)?;
            if limits.max_response_body > 0
                && http_body::Body::size_hint(res.body()).lower() > limits.max_response_body
            {
                return Err(Box::new(ResponseBodyTooLarge(limits.max_response_body)) as BoxError);
            }
            if malformed_framing(&res) {
                // Dropping the response unread closes its connection.
                return Err(Box::new(UpstreamReset::new(
                    ResetReason::ProtocolError,
                    true,
                    Some("response with conflicting Content-Length / Transfer-Encoding".into()),
                )) as BoxError);
            }
            let requests = res.extensions_mut().remove::<ConnectionRequests>();
            let opened = res.extensions_mut().remove::<ConnectionOpened>();
            let spent = requests.is_some_and(|r| limit > 0 && r.answered() >= limit);
            let aged = max_age
                .zip(opened)
                .is_some_and(|(max, o)| o.0.elapsed() >= max);
            if let Some(captured) = captured
                && (spent || aged)
                && let Some(connection) = captured.connection_metadata().as_ref()
            {
                // Not reused after this response; hyper's pool closes it once idle.
                connection.poison();
            }
            match downstream {
                Some(downstream) if res.status() == http::StatusCode::SWITCHING_PROTOCOLS => {
                    splice(downstream, hyper::upgrade::on(&mut res));
                }
                _ => strip_hop_by_hop(res.headers_mut()),
            }
            if let Some(address) = address {
                res.extensions_mut().insert(UpstreamHost(address));
            }
            // The stream stays open, and its place taken, until the body ends.
            Ok(match stream {
                Some(stream) => res.map(|b| {
                    body::boxed(Bounded::response(
                        mesh_resilience::body::GuardBody::new(b, Some(stream)),
                        &limits,
                    ))
                }),
                None => res.map(|b| body::boxed(Bounded::response(b, &limits))),
            })
        })
    }
}

/// Waits for `fut` (the response head) while the stream is not idle for `idle`: since
/// `started`, or since the last request body frame noted in `link`.
async fn head_within<F: std::future::Future>(
    fut: F,
    idle: Duration,
    started: tokio::time::Instant,
    link: Option<&RequestLink>,
) -> Result<F::Output, BoxError> {
    let mut fut = std::pin::pin!(fut);
    let mut deadline = started + idle;
    loop {
        if let Ok(out) = tokio::time::timeout_at(deadline, fut.as_mut()).await {
            return Ok(out);
        }
        let last = link
            .map(|l| started + Duration::from_millis(l.activity.load(Ordering::Relaxed)) + idle);
        match last {
            Some(later) if later > deadline => deadline = later,
            _ => return Err(Box::new(StreamIdleTimeout)),
        }
    }
}

/// Copies bytes both ways between an upgraded downstream and upstream connection.
fn splice(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
            return;
        };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::stack::test_request as req;
    use mesh_core::config::{H2UpgradePolicy, HttpSettings};
    use mesh_routing::PortProtocol;

    #[test]
    fn upstream_http_version_follows_istios_order() {
        let http = |use_client: Option<bool>, upgrade: Option<H2UpgradePolicy>| HttpSettings {
            use_client_protocol: use_client,
            h2_upgrade_policy: upgrade,
            ..HttpSettings::default()
        };
        let up = Some(H2UpgradePolicy::Upgrade);
        let no = Some(H2UpgradePolicy::DoNotUpgrade);
        let default = Some(H2UpgradePolicy::Default);
        for (port, settings, want) in [
            // An http2/grpc port is HTTP/2 whatever the rule says.
            (
                PortProtocol::Http2,
                Some(http(Some(true), no)),
                Protocol::Http2,
            ),
            (
                PortProtocol::Http,
                Some(http(Some(true), up)),
                Protocol::Downstream,
            ),
            (PortProtocol::Http, Some(http(None, up)), Protocol::Http2),
            (PortProtocol::Auto, Some(http(None, no)), Protocol::Http1),
            (PortProtocol::Auto, None, Protocol::Downstream),
            (PortProtocol::Http, None, Protocol::Http1),
            (
                PortProtocol::Http,
                Some(http(None, default)),
                Protocol::Http1,
            ),
        ] {
            assert_eq!(
                upstream_protocol(port, settings.as_ref()),
                want,
                "{port:?} {settings:?}"
            );
        }
    }

    #[test]
    fn absolute_uri_takes_the_host_header_and_keeps_the_path() {
        let mut r = req("/pay?x=1", Some("payment-service"));
        absolute(&mut r, None);
        assert_eq!(r.uri(), "http://payment-service/pay?x=1");
    }

    #[test]
    fn a_fixed_authority_wins_and_host_is_kept() {
        let fixed = Authority::from_static("127.0.0.1:1");
        let mut r = req("http://payment-service/pay", Some("payment-service"));
        absolute(&mut r, Some(&fixed));
        assert_eq!(r.uri(), "http://127.0.0.1:1/pay");
        assert_eq!(r.headers()[http::header::HOST], "payment-service");
        let mut r = req("/", None);
        absolute(&mut r, Some(&fixed));
        assert_eq!(r.uri(), "http://127.0.0.1:1/");
    }
}
