//! Real HTTP/1.1 upstreams on 127.0.0.1:0 and a hyper client per endpoint.

#![allow(dead_code, reason = "each test file uses a part of the support module")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::error::ConnectFailure;
use mesh_core::{BoxBody, BoxError, Endpoint};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What a test upstream saw.
#[derive(Default)]
pub struct Seen {
    /// Requests received.
    pub requests: AtomicUsize,
    /// Requests being handled now.
    pub in_flight: AtomicUsize,
    /// The most requests handled at once.
    pub max_in_flight: AtomicUsize,
    /// `x-envoy-attempt-count` values received.
    pub attempts: std::sync::Mutex<Vec<String>>,
}

/// A running upstream.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
    /// Requests wait for a permit before answering when the upstream is gated.
    pub gate: Arc<Semaphore>,
}

/// Starts an HTTP/1.1 upstream answering `status`; with `gated`, each request waits for
/// a permit of [`Upstream::gate`] first.
pub async fn upstream(status: u16, gated: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Seen::default());
    let gate = Arc::new(Semaphore::new(if gated {
        0
    } else {
        Semaphore::MAX_PERMITS
    }));
    let (s, g) = (seen.clone(), gate.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (s, g) = (s.clone(), g.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let (s, g) = (s.clone(), g.clone());
                    async move {
                        s.requests.fetch_add(1, Ordering::SeqCst);
                        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
                        if let Some(v) = req.headers().get("x-envoy-attempt-count") {
                            s.attempts
                                .lock()
                                .expect("lock")
                                .push(v.to_str().unwrap_or("").to_owned());
                        }
                        let permit = g.acquire().await.expect("gate");
                        permit.forget();
                        s.in_flight.fetch_sub(1, Ordering::SeqCst);
                        let res = hyper::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from_static(b"hello")))
                            .expect("response");
                        Ok::<_, Infallible>(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Upstream { addr, seen, gate }
}

/// An address where nothing listens (connections are refused).
pub async fn refusing_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// The per-endpoint service: a hyper client sending to the endpoint's address; connect
/// errors become [`ConnectFailure`].
pub fn endpoint_service(
    client: Client<HttpConnector, BoxBody>,
) -> impl Fn(
    &Endpoint,
) -> tower::util::BoxCloneSyncService<
    http::Request<BoxBody>,
    http::Response<Incoming>,
    BoxError,
> + Send
+ Sync
+ 'static {
    move |ep: &Endpoint| {
        let client = client.clone();
        let addr = ep.address;
        tower::util::BoxCloneSyncService::new(tower::service_fn(
            move |mut req: http::Request<BoxBody>| {
                let client = client.clone();
                let path = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                *req.uri_mut() = format!("http://{addr}{path}").parse().expect("uri");
                async move {
                    client.request(req).await.map_err(|e| -> BoxError {
                        if e.is_connect() {
                            Box::new(ConnectFailure::new(e))
                        } else {
                            Box::new(e)
                        }
                    })
                }
            },
        ))
    }
}

/// A plain hyper client (no pooling limits of its own).
pub fn client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new()).build_http()
}
