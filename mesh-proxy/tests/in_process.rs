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
