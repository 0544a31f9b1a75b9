//! The sidecar fixture shared by the proxy benches: a hyper application answering
//! `200 paid`, sidecar settings on loopback, and the ServiceEntry placing
//! payment-service.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_proxy::Settings;

/// Starts the application on `127.0.0.1:0` (every request answered `200 paid`).
pub async fn app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"paid"),
                        )))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Settings of a sidecar of service account `sa` in `production` reading configuration
/// directory `dir/config`, with certificates from the CA in `dir/ca`, trace sampling
/// off and a 1 s drain.
pub fn settings(dir: &Path, sa: &str, config: &str, app: SocketAddr) -> Settings {
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: {sa}, labels: {{app: {sa}}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\ntracing: {{sampling: 0}}\n\
         limits: {{drainTimeout: 1s}}\n\
         listeners: {{inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0, app: {app}}}\n",
        config = dir.join(config).display(),
        ca = dir.join("ca").display(),
    );
    Settings::from_yaml("bench.yaml", &yaml).expect("settings")
}

/// A ServiceEntry placing payment-service (port 80) on `127.0.0.1:port`, run by the
/// `payment-service` service account.
pub fn service_entry(port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: payment-service, namespace: production}}\n\
         spec:\n  hosts: [payment-service]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n\
         \x20 endpoints:\n  - address: 127.0.0.1\n    ports: {{http: {port}}}\n    serviceAccount: payment-service\n"
    )
}
