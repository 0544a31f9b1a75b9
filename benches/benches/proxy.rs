//! mesh-proxy: one request through a pair of sidecars started in-process (application
//! → outbound listener → mTLS (h2) → inbound listener → authorization → application),
//! against the same request sent straight to the application.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_proxy::{ProxyHandle, Sidecar};

use benches::proxy::{app, service_entry, settings};

async fn mesh(dir: &std::path::Path, app: SocketAddr) -> (ProxyHandle, ProxyHandle) {
    mesh_tls::CertificateAuthority::new("cluster.local")
        .expect("ca")
        .write_dir(&dir.join("ca"))
        .expect("write ca");
    std::fs::create_dir_all(dir.join("istio")).expect("config dir");
    std::fs::write(dir.join("istio/mesh.yaml"), service_entry(1)).expect("config");
    let payment = Sidecar::start(settings(dir, "payment-service", "istio", app))
        .await
        .expect("payment");
    let inbound = payment.address("inbound").expect("inbound");
    std::fs::write(dir.join("istio/mesh.yaml"), service_entry(inbound.port())).expect("config");
    let order = Sidecar::start(settings(
        dir,
        "order-service",
        "istio",
        "127.0.0.1:9".parse().expect("addr"),
    ))
    .await
    .expect("order");
    (payment, order)
}

fn end_to_end(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("mesh-proxy-bench-{}", std::process::id()));
    let (app, (payment, order)) = rt.block_on(async {
        let app = app().await;
        (app, mesh(&dir, app).await)
    });
    let outbound = order.address("outbound").expect("outbound");
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let request = |target: SocketAddr, host: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::post(format!("http://{target}/pay"))
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .expect("request");
            let res = client.request(req).await.expect("response");
            assert_eq!(res.status(), 200);
            res.into_body().collect().await.expect("body");
        }
    };
    let mut g = c.benchmark_group("proxy");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("direct_to_app", |b| {
        b.to_async(&rt).iter(|| request(app, "payment-service"));
    });
    g.bench_function("through_two_sidecars_mtls", |b| {
        b.to_async(&rt)
            .iter(|| request(outbound, "payment-service"));
    });
    g.finish();
    rt.block_on(async {
        order.shutdown();
        order.wait().await;
        payment.shutdown();
        payment.wait().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
