//! gRPC through the real sidecar binary, with a tonic client and a tonic server: unary,
//! server streaming and an error status through two sidecars; h2c to a plaintext gRPC
//! server without a sidecar (a `GRPC` port is HTTP/2 upstream); Istio's local replies
//! as gRPC statuses; `grpc-timeout` as the request's deadline; gRPC labels and message
//! counters in the metrics.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use http::uri::PathAndQuery;
use support::*;
use tokio::net::TcpListener;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct PayRequest {
    #[prost(string, tag = "1")]
    order: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PayReply {
    #[prost(string, tag = "1")]
    text: String,
}

type Codec = ProstCodec<PayReply, PayRequest>;
type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// `/demo.Payments/Pay`: one reply naming the server.
#[derive(Clone)]
struct Pay(&'static str);

impl tonic::server::UnaryService<PayRequest> for Pay {
    type Response = PayReply;
    type Future = BoxFuture<Result<tonic::Response<PayReply>, Status>>;

    fn call(&mut self, req: tonic::Request<PayRequest>) -> Self::Future {
        let name = self.0;
        Box::pin(async move {
            let order = req.into_inner().order;
            if order == "missing" {
                return Err(Status::not_found("no such order"));
            }
            if order == "slow" {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(tonic::Response::new(PayReply {
                text: format!("{name} paid {order}"),
            }))
        })
    }
}

/// `/demo.Payments/Receipts`: `count` replies.
#[derive(Clone)]
struct Receipts;

impl tonic::server::ServerStreamingService<PayRequest> for Receipts {
    type Response = PayReply;
    type ResponseStream = Pin<Box<dyn Stream<Item = Result<PayReply, Status>> + Send>>;
    type Future = BoxFuture<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, req: tonic::Request<PayRequest>) -> Self::Future {
        Box::pin(async move {
            let req = req.into_inner();
            let items: Vec<Result<PayReply, Status>> = (0..req.count)
                .map(|i| {
                    Ok(PayReply {
                        text: format!("receipt {i} for {}", req.order),
                    })
                })
                .collect();
            let stream: Self::ResponseStream = Box::pin(futures_util::stream::iter(items));
            Ok(tonic::Response::new(stream))
        })
    }
}

/// A gRPC server speaking h2c on a loopback port, without tonic's transport (so that
/// only the proxies act on `grpc-timeout`).
async fn grpc_server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = tower::service_fn(
        move |req: http::Request<hyper::body::Incoming>| async move {
            let mut grpc = tonic::server::Grpc::new(Codec::default());
            let res = match req.uri().path() {
                "/demo.Payments/Pay" => grpc.unary(Pay(name), req).await,
                "/demo.Payments/Receipts" => grpc.server_streaming(Receipts, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok::<_, Infallible>(res)
        },
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .http2_only()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

/// A tonic client sending to the sidecar's outbound listener for `authority`.
async fn client(
    outbound: SocketAddr,
    authority: &str,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn pay(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    order: &str,
    timeout: Option<Duration>,
) -> Result<String, Status> {
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(PayRequest {
        order: order.into(),
        count: 0,
    });
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let codec = ProstCodec::<PayRequest, PayReply>::default();
    grpc.unary(req, PathAndQuery::from_static("/demo.Payments/Pay"), codec)
        .await
        .map(|r| r.into_inner().text)
}

fn grpc_entry(host: &str, port: u16, endpoint: u16, service_account: Option<&str>) -> String {
    let sa = service_account.map_or(String::new(), |sa| format!(", serviceAccount: {sa}"));
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host}, namespace: production}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {port}, name: grpc, protocol: GRPC}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{grpc: {endpoint}}}, labels: {{app: {host}, version: v1}}{sa}}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_sidecars_and_to_plain_h2c_servers() {
    let world = World::new();
    let payments_app = grpc_server("payments").await;
    let ledger = grpc_server("ledger").await;
    let (pp, po) = (Ports::new(), Ports::new());
    let closed = free_port();
    let yaml = [
        grpc_entry("payments", 9090, pp.inbound, Some("payments")),
        // No sidecar: auto-mTLS sends plaintext, and the GRPC port makes it h2c.
        grpc_entry("ledger", 9091, ledger.port(), None),
        // Nothing listens there.
        grpc_entry("broken", 9092, closed, None),
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec:
  mtls: {mode: STRICT}
"
        .to_owned(),
    ]
    .join("---\n");
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let s = sidecar_settings(
        &world,
        "payments",
        &labels(&[("app", "payments"), ("version", "v1")]),
        &config,
        pp,
        payments_app,
        "",
    )
    .replace("  app: 127.0.0.1", "  appProtocol: HTTP2\n  app: 127.0.0.1");
    let payments = Proxy::start(&world, "sidecar", "payments", &s, pp).await;
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let orders = start_sidecar(&world, "orders", &config, po, nowhere).await;

    // Unary through two sidecars (h2 over Istio mTLS between them).
    let mut grpc = client(orders.outbound(), "payments:9090").await;
    assert_eq!(
        pay(&mut grpc, "o-1", None).await.unwrap(),
        "payments paid o-1",
        "{}",
        orders.output()
    );
    // Server streaming.
    grpc.ready().await.unwrap();
    let codec = ProstCodec::<PayRequest, PayReply>::default();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(PayRequest {
                order: "o-2".into(),
                count: 3,
            }),
            PathAndQuery::from_static("/demo.Payments/Receipts"),
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    let mut receipts = Vec::new();
    while let Some(r) = stream.message().await.unwrap() {
        receipts.push(r.text);
    }
    assert_eq!(
        receipts,
        [
            "receipt 0 for o-2",
            "receipt 1 for o-2",
            "receipt 2 for o-2"
        ]
    );
    // An error status from the server passes through.
    let err = pay(&mut grpc, "missing", None).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "no such order")
    );

    // Both sidecars label the calls as gRPC with their status; the stream's messages
    // are counted.
    let streamed = [
        ("reporter", "source"),
        ("request_protocol", "grpc"),
        ("grpc_response_status", "0"),
        ("destination_workload", "payments"),
    ];
    let text = orders
        .metrics_when(|t| series_value(t, "istio_response_messages_total", &streamed) == Some(4.0))
        .await;
    assert_eq!(
        series_value(&text, "istio_requests_total", &streamed),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        series_value(&text, "istio_request_messages_total", &streamed),
        Some(2.0)
    );
    assert_eq!(
        series_value(&text, "istio_response_messages_total", &streamed),
        Some(4.0)
    );
    let not_found = [
        ("reporter", "destination"),
        ("request_protocol", "grpc"),
        ("grpc_response_status", "5"),
        ("response_code", "200"),
        ("source_workload", "orders"),
    ];
    let text = payments
        .metrics_when(|t| series_value(t, "istio_requests_total", &not_found) == Some(1.0))
        .await;
    assert_eq!(
        series_value(&text, "istio_requests_total", &not_found),
        Some(1.0),
        "{text}"
    );

    // A plaintext gRPC server without a sidecar: h2c upstream because the port is GRPC.
    let mut ledger_client = client(orders.outbound(), "ledger:9091").await;
    assert_eq!(
        pay(&mut ledger_client, "o-3", None).await.unwrap(),
        "ledger paid o-3",
        "{}",
        orders.output()
    );

    // Istio's local replies reach a gRPC caller as gRPC statuses: no connection is
    // UNAVAILABLE with Envoy's reason.
    let mut broken = client(orders.outbound(), "broken:9092").await;
    let err = pay(&mut broken, "o-4", None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().starts_with("upstream connect error"),
        "{err:?}"
    );
    let uf = [
        ("reporter", "source"),
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("grpc_response_status", "14"),
        // Istio's default retries (connect-failure, 2 attempts) ran out: Envoy adds URX.
        ("response_flags", "UF,URX"),
    ];
    let text = orders
        .metrics_when(|t| series_value(t, "istio_requests_total", &uf).is_some())
        .await;
    assert!(
        series_value(&text, "istio_requests_total", &uf).is_some(),
        "{text}"
    );

    // `grpc-timeout` is the request's deadline (no route timeout caps it): the proxy
    // gives up after 300 ms, as a gRPC UNAVAILABLE with Envoy's timeout reason. (Sent by
    // a plain HTTP/2 client: tonic's own client would give up at the same moment.)
    let tcp = tokio::net::TcpStream::connect(orders.outbound())
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut frame = vec![0u8];
    let message = prost::Message::encode_to_vec(&PayRequest {
        order: "slow".into(),
        count: 0,
    });
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = http::Request::post("http://payments:9090/demo.Payments/Pay")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let started = tokio::time::Instant::now();
    let res = h2.send_request(req).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["grpc-status"], "14", "{res:?}");
    assert_eq!(res.headers()["grpc-message"], "upstream request timeout");
    assert_eq!(res.headers()["content-type"], "application/grpc");
    // A host the mesh does not know goes through as it came: an h2c call stays h2c to
    // the h2c-only server (ALLOW_ANY passthrough).
    let mut frame = vec![0u8];
    let message = prost::Message::encode_to_vec(&PayRequest {
        order: "o-5".into(),
        count: 0,
    });
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = http::Request::post(format!("http://{ledger}/demo.Payments/Pay"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let res = h2.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap();
    assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
    let reply: PayReply = prost::Message::decode(&body.to_bytes()[5..]).unwrap();
    assert_eq!(reply.text, "ledger paid o-5");

    let ut = [
        ("reporter", "source"),
        ("grpc_response_status", "14"),
        ("response_flags", "UT"),
    ];
    let text = orders
        .metrics_when(|t| series_value(t, "istio_requests_total", &ut).is_some())
        .await;
    assert!(
        series_value(&text, "istio_requests_total", &ut).is_some(),
        "{text}"
    );
}
