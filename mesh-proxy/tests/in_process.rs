//! The library API: two sidecars started in-process with `Sidecar::start` on port 0,
//! addresses read from the handles, shut down through the handle.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use mesh_proxy::{Settings, Sidecar};
use support::*;

fn settings(world: &World, sa: &str, app: std::net::SocketAddr) -> Settings {
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: {sa}, labels: {{app: {sa}}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0, app: {app}}}\n\
         limits: {{drainTimeout: 1s}}\n",
        config = world.path("istio").display(),
        ca = world.ca_dir.display(),
    );
    Settings::from_yaml(format!("{sa}.yaml"), &yaml).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_start_in_process_and_shut_down_through_the_handle() {
    let world = World::new();
    let app = App::start(Behaviour::Ok("paid")).await;
    world.write_config(
        "istio",
        "mesh.yaml",
        &service_entry("placeholder", 80, &[(1, "v1", "x")]),
    );
    let payment = Sidecar::start(settings(&world, "payment-service", app.addr))
        .await
        .unwrap();
    let inbound = payment.address("inbound").unwrap();
    world.write_config(
        "istio",
        "mesh.yaml",
        &service_entry(
            "payment-service",
            80,
            &[(inbound.port(), "v1", "payment-service")],
        ),
    );
    let order = Sidecar::start(settings(
        &world,
        "order-service",
        "127.0.0.1:9".parse().unwrap(),
    ))
    .await
    .unwrap();
    let outbound = order.address("outbound").unwrap();
    assert_eq!(
        send(outbound, "POST", "payment-service", "/pay", &[]).await,
        Ok((200, "paid".to_owned()))
    );

    // The admin API of the calling sidecar.
    let admin = order.address("admin").unwrap();
    let get = |path: &'static str| async move { admin_get(admin.port(), path).await.unwrap() };
    let (status, stats) = get("/stats").await;
    assert_eq!(status, 200);
    assert!(stats.contains("payment-service"), "{stats}");
    let (_, certs) = get("/certs").await;
    let certs: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(
        certs["identity"],
        "spiffe://cluster.local/ns/production/sa/order-service"
    );
    let (_, dump) = get("/config_dump").await;
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["resources"][0]["kind"], "ServiceEntry");
    assert_eq!(dump["resources"][0]["name"], "payment-service");
    let (_, clusters) = get("/clusters").await;
    assert!(
        clusters.contains(&format!("::{inbound}::health_flags::healthy")),
        "{clusters}"
    );
    assert_eq!(get("/nothing").await.0, 404);
    let (status, _) = send(admin, "DELETE", "localhost", "/certs", &[])
        .await
        .unwrap();
    assert_eq!(status, 405);

    order.shutdown();
    order.wait().await;
    assert!(tokio::net::TcpStream::connect(outbound).await.is_err());
    payment.shutdown();
    payment.wait().await;
    assert!(tokio::net::TcpStream::connect(inbound).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn idle_downstream_connection_is_closed_after_limits_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::new();
    world.write_config(
        "istio",
        "mesh.yaml",
        &service_entry("placeholder", 80, &[(1, "v1", "x")]),
    );
    let yaml = format!(
        "workload: {{namespace: production, serviceAccount: order-service, labels: {{app: order-service}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{inbound: 127.0.0.1:0, outbound: 127.0.0.1:0, admin: 127.0.0.1:0, app: 127.0.0.1:9}}\n\
         limits: {{idleTimeout: 30s, headerReadTimeout: 1h, drainTimeout: 1s}}\n",
        config = world.path("istio").display(),
        ca = world.ca_dir.display(),
    );
    let sidecar = Sidecar::start(Settings::from_yaml("order-service.yaml", &yaml).unwrap())
        .await
        .unwrap();
    let outbound = sidecar.address("outbound").unwrap();
    let mut conn = tokio::net::TcpStream::connect(outbound).await.unwrap();
    // One request on a keep-alive connection, then silence.
    conn.write_all(b"GET / HTTP/1.1\r\nHost: placeholder\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    let answered = tokio::time::Instant::now();
    // Drain the rest of the response body, then wait for the close.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(600), async {
        while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        tokio::time::Instant::now()
    })
    .await
    .expect("the idle connection was not closed");
    let idle_for = closed - answered;
    assert!(
        idle_for >= std::time::Duration::from_secs(30)
            && idle_for < std::time::Duration::from_secs(31),
        "closed after {idle_for:?}"
    );
    sidecar.shutdown();
    sidecar.wait().await;
}
