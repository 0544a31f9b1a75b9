//! The article's canary deployment: 95/5 split, `x-canary: true` to v2, and the progressive
//! rollout's switch to 100 % v2 without disturbing requests in flight.

#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::MeshConfig;
use mesh_core::error::BoxError;
use mesh_routing::{RouterHandle, Target};
use support::{CHI2_1DF_P001, Dest, Recorder, chi_square, request, routing};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

const ORDER_ENDPOINTS: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: order-service, namespace: default}
spec:
  hosts: [order-service.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {app: order-service, version: v1}, serviceAccount: order}
  - {address: 10.0.0.2, labels: {app: order-service, version: v2}, serviceAccount: order}
"#;

/// The VirtualService after the article's `kubectl patch` (merge patch replaces `http`).
const ALL_V2: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: order-service, namespace: default}
spec:
  hosts: [order-service]
  http:
  - route:
    - destination: {host: order-service, subset: v1}
      weight: 0
    - destination: {host: order-service, subset: v2}
      weight: 100
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: order-service, namespace: default}
spec:
  host: order-service
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

/// The article's canary DestinationRule and VirtualService (fixture) plus `extra`.
fn article_with(extra: &str) -> MeshConfig {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mesh-core/tests/fixtures/article/canary-order-service.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    support::config(&format!("{text}\n---\n{extra}"))
}

fn canary_config() -> MeshConfig {
    article_with(ORDER_ENDPOINTS)
}

fn all_v2_config() -> MeshConfig {
    support::config(&format!("{ALL_V2}\n---\n{ORDER_ENDPOINTS}"))
}

const V1: &str = "order-service.default.svc.cluster.local|v1|8080";
const V2: &str = "order-service.default.svc.cluster.local|v2|8080";

async fn destination_of(
    router: &mut mesh_routing::Router<Dest>,
    headers: &[(&str, &str)],
) -> String {
    let req = request("GET", "http://order-service:8080/orders", headers);
    let res = router.ready().await.unwrap().call(req).await.unwrap();
    res.headers()["x-destination"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn ten_thousand_requests_split_95_5_within_chi_square_bound() {
    let rec = Recorder::default();
    let handle = RouterHandle::with_seed(rec.make(), routing(&canary_config()), 20_240_601);
    let mut router = handle.router();
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..10_000 {
        match destination_of(&mut router, &[]).await.as_str() {
            V1 => v1 += 1,
            V2 => v2 += 1,
            other => panic!("unexpected destination {other}"),
        }
    }
    let chi = chi_square(&[v1, v2], &[0.95, 0.05]);
    assert!(chi < CHI2_1DF_P001, "v1={v1} v2={v2} chi2={chi}");
    assert!(v2 > 0 && v1 > 0);
}

#[tokio::test]
async fn canary_header_always_goes_to_v2() {
    let rec = Recorder::default();
    let handle = RouterHandle::with_seed(rec.make(), routing(&canary_config()), 1);
    let mut router = handle.router();
    for _ in 0..1_000 {
        assert_eq!(
            destination_of(&mut router, &[("x-canary", "true")]).await,
            V2
        );
    }
    // Only the exact value counts.
    let mut seen_v1 = false;
    for _ in 0..200 {
        seen_v1 |= destination_of(&mut router, &[("x-canary", "TRUE")]).await == V1;
    }
    assert!(seen_v1);
}

#[tokio::test]
async fn subsets_resolve_to_labelled_endpoints_with_identity_and_merged_policy() {
    let rec = Recorder::default();
    let handle = RouterHandle::with_seed(rec.make(), routing(&canary_config()), 1);
    let snap = handle.snapshot();
    let dests = snap.table().destinations();
    let v2 = dests
        .iter()
        .position(|k| k.subset.as_deref() == Some("v2"))
        .unwrap();
    let target = snap.target(v2).unwrap();
    let eps = target.endpoints();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].address, "10.0.0.2:8080".parse().unwrap());
    assert_eq!(
        eps[0].identities[0].as_str(),
        "spiffe://cluster.local/ns/default/sa/order"
    );
    // The rule-level connectionPool applies to subset traffic (the subset sets none).
    let pool = target.policy().connection_pool.clone().unwrap();
    assert_eq!(pool.tcp.unwrap().max_connections, Some(100));
}

/// Destination services whose v1 answers only when the gate opens.
fn gated(
    gate: Arc<Semaphore>,
    made: Arc<Mutex<Vec<String>>>,
) -> impl Fn(&Arc<Target>) -> Dest + Clone {
    move |target: &Arc<Target>| {
        let name = support::key_name(target);
        made.lock().unwrap().push(name.clone());
        let gate = Arc::clone(&gate);
        BoxCloneSyncService::new(tower::service_fn(move |_req: Request<BoxBody>| {
            let gate = Arc::clone(&gate);
            let name = name.clone();
            async move {
                if name == V1 {
                    gate.acquire().await?.forget();
                }
                let mut res = Response::new(body::empty());
                res.headers_mut().insert("x-destination", name.parse()?);
                Ok::<_, BoxError>(res)
            }
        }))
    }
}

#[tokio::test]
async fn rollout_to_v2_routes_the_next_request_to_v2_while_v1_requests_finish_on_v1() {
    let gate = Arc::new(Semaphore::new(0));
    let made = Arc::new(Mutex::new(Vec::new()));
    let handle = RouterHandle::with_seed(
        gated(Arc::clone(&gate), Arc::clone(&made)),
        routing(&canary_config()),
        3,
    );
    let mut router = handle.router();

    // Start 40 requests on the 95/5 table; those sent to v1 stay in flight.
    let mut in_flight = Vec::new();
    for _ in 0..40 {
        let fut =
            router
                .ready()
                .await
                .unwrap()
                .call(request("GET", "http://order-service:8080/", &[]));
        in_flight.push(tokio::spawn(fut));
    }
    tokio::task::yield_now().await;

    handle.update(routing(&all_v2_config()));

    // The next request, on the new snapshot, goes to v2 (and answers at once).
    for _ in 0..100 {
        assert_eq!(destination_of(&mut router, &[]).await, V2);
    }
    // Release v1: every request started before the swap completes, on its old route.
    gate.add_permits(1_000);
    let mut on_v1 = 0;
    for t in in_flight {
        let res = t.await.unwrap().unwrap();
        if res.headers()["x-destination"] == V1 {
            on_v1 += 1;
        }
    }
    assert!(
        on_v1 >= 30,
        "most of the 40 requests went to v1 before the swap: {on_v1}"
    );
    // Both destinations still exist after the weight change: their services were kept.
    let made = made.lock().unwrap().clone();
    assert_eq!(
        made.len(),
        2,
        "services made once, kept across the reload: {made:?}"
    );
}

#[tokio::test]
async fn destination_removed_by_a_reload_is_dropped_and_made_again_when_it_returns() {
    let rec = Recorder::default();
    let handle = RouterHandle::with_seed(rec.make(), routing(&canary_config()), 3);
    assert_eq!(rec.made.lock().unwrap().len(), 2);
    let only_v2 = ALL_V2.replace(
        "    - destination: {host: order-service, subset: v1}\n      weight: 0\n",
        "",
    );
    handle.update(routing(&support::config(&format!(
        "{only_v2}\n---\n{ORDER_ENDPOINTS}"
    ))));
    assert_eq!(rec.made.lock().unwrap().len(), 2, "v2 kept, nothing new");
    handle.update(routing(&canary_config()));
    let made = rec.made.lock().unwrap().clone();
    assert_eq!(
        made.len(),
        3,
        "v1 made again after it disappeared: {made:?}"
    );
    assert_eq!(made[2], V1);
}

/// A real upstream answering with its version.
async fn upstream(version: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(version),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn split_holds_on_one_keep_alive_connection_through_real_servers() {
    let v1 = upstream("v1").await;
    let v2 = upstream("v2").await;
    let se = ORDER_ENDPOINTS
        .replace(
            "address: 10.0.0.1",
            "address: 127.0.0.1, ports: {http: PORT1}",
        )
        .replace(
            "address: 10.0.0.2",
            "address: 127.0.0.1, ports: {http: PORT2}",
        )
        .replace("PORT1", &v1.port().to_string())
        .replace("PORT2", &v2.port().to_string());
    let cfg = article_with(&se);

    // Destination services forward to their (only) endpoint with a real HTTP client.
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
                let res = client.request(req).await?;
                Ok::<_, BoxError>(res.map(body::boxed))
            }
        }))
    };
    let handle = RouterHandle::with_seed(make, routing(&cfg), 99);

    // The proxy: one router per connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let h = handle.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let router = Arc::new(Mutex::new(h.router()));
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let fut = router.lock().unwrap().call(req.map(body::boxed));
                    let fut: std::pin::Pin<
                        Box<
                            dyn std::future::Future<Output = Result<Response<BoxBody>, BoxError>>
                                + Send,
                        >,
                    > = Box::pin(fut);
                    async move {
                        match fut.await {
                            Ok(res) => Ok::<_, Infallible>(res),
                            Err(_) => {
                                let mut res = Response::new(body::empty());
                                *res.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                Ok(res)
                            }
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    // One client connection, kept alive for every request.
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let n = 2_000;
    let (mut c1, mut c2) = (0, 0);
    for _ in 0..n {
        sender.ready().await.unwrap();
        let req = Request::get("/orders")
            .header("host", "order-service:8080")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let res = sender.send_request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        match &res.into_body().collect().await.unwrap().to_bytes()[..] {
            b"v1" => c1 += 1,
            b"v2" => c2 += 1,
            other => panic!("unexpected body {other:?}"),
        }
    }
    let chi = chi_square(&[c1, c2], &[0.95, 0.05]);
    assert!(chi < CHI2_1DF_P001, "v1={c1} v2={c2} chi2={chi}");
}
