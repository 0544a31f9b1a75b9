//! The bookinfo ingress gateway end to end: a real hyper server running the router, a
//! real upstream, and curl as the client.

#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use mesh_core::body::{self, BoxBody};
use mesh_core::error::{BoxError, NoRoute};
use mesh_routing::{CompileOptions, RouterHandle, Routing, ServicePort, Target, WorkloadEntry};
use support::{Dest, fixtures};
use tokio::net::TcpListener;
use tower::Service;
use tower::util::BoxCloneSyncService;

async fn upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let text = format!(
                            "productpage saw {} host={}",
                            req.uri(),
                            req.headers()["host"].to_str().unwrap()
                        );
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(text),
                        )))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Turns routing errors into Istio's answers (the proxy owns the real mapping).
fn respond(result: Result<Response<BoxBody>, BoxError>) -> Response<BoxBody> {
    result.unwrap_or_else(|err| {
        let mut res = Response::new(body::empty());
        *res.status_mut() = if mesh_core::is_caused_by::<NoRoute>(err.as_ref()) {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        res
    })
}

fn curl(args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_bookinfo_gateway() {
    let pp = upstream().await;
    let cfg = fixtures(&["istio-samples/bookinfo-gateway.yaml"]);
    let mut routing = Routing::compile(
        &cfg,
        &CompileOptions::gateway("default", "bookinfo-gateway"),
    )
    .unwrap();
    routing.registry.insert_static(
        "productpage.default.svc.cluster.local",
        ServicePort::new(9080, "http"),
        vec![WorkloadEntry::new("127.0.0.1").with_port("http", pp.port())],
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<BoxBody>();
    let make = move |target: &Arc<Target>| -> Dest {
        let target = Arc::clone(target);
        let client = client.clone();
        BoxCloneSyncService::new(tower::service_fn(move |mut req: Request<BoxBody>| {
            let ep = target.endpoints()[0].address;
            let client = client.clone();
            async move {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                *req.uri_mut() = format!("http://{ep}{pq}").parse()?;
                Ok::<_, BoxError>(client.request(req).await?.map(body::boxed))
            }
        }))
    };
    let handle = RouterHandle::new(make, routing);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let router = Arc::new(Mutex::new(handle.router()));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let fut = router.lock().unwrap().call(req.map(body::boxed));
                    let fut: std::pin::Pin<
                        Box<
                            dyn std::future::Future<Output = Result<Response<BoxBody>, BoxError>>
                                + Send,
                        >,
                    > = Box::pin(fut);
                    async move { Ok::<_, Infallible>(respond(fut.await)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let base = format!("http://{gw}");
    let results = tokio::task::spawn_blocking(move || {
        (
            curl(&[
                "-H",
                "Host: bookinfo.example.com",
                &format!("{base}/productpage?u=normal"),
            ]),
            curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{base}/api/v1/products/1"),
            ]),
            curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{base}/admin"),
            ]),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        results.0,
        "productpage saw /productpage?u=normal host=bookinfo.example.com"
    );
    assert_eq!(results.1, "200");
    assert_eq!(results.2, "404", "paths the gateway does not route are NR");
}
