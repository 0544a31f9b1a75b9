//! Process lifecycle: graceful shutdown on SIGTERM and certificate rotation under load.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::*;

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec:
  mtls: {mode: STRICT}
";

async fn pair(world: &World, behaviour: Behaviour) -> (App, Proxy, Proxy) {
    let app = App::start(behaviour).await;
    let (pp, op) = (Ports::new(), Ports::new());
    let se = service_entry(
        "payment-service",
        80,
        &[(pp.inbound, "v1", "payment-service")],
    );
    let config = world.write_config("istio", "mesh.yaml", &format!("{se}---\n{STRICT}"));
    let s = sidecar_settings(
        world,
        "payment-service",
        &labels(&[("app", "payment-service")]),
        &config,
        pp,
        app.addr,
        "",
    );
    let payment = Proxy::start(world, "sidecar", "payment", &s, pp).await;
    let s = sidecar_settings(
        world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let order = Proxy::start(world, "sidecar", "order", &s, op).await;
    (app, payment, order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_long_request_refuses_new_connections_and_exits_zero() {
    let world = World::new();
    let (_app, _payment, mut order) =
        pair(&world, Behaviour::Slow(Duration::from_millis(800), "done")).await;
    let addr = order.outbound();
    let long =
        tokio::spawn(async move { send(addr, "POST", "payment-service", "/pay", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    order.terminate();

    // The listener closes at once: new connections are refused.
    let mut refused = false;
    for _ in 0..40 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the outbound port still accepts connections");

    assert_eq!(
        long.await.unwrap(),
        Ok((200, "done".to_owned())),
        "{}",
        order.output()
    );
    let status = tokio::time::timeout(Duration::from_secs(5), order.child.wait())
        .await
        .expect("exits after draining")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", order.output());
}

fn serial(certs: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(certs).unwrap();
    v["serial"].as_str().unwrap().to_owned()
}

/// Whether `sent` reaches `from + by` within 20 s (a guard against a stall, not a time
/// limit on the proxy: on a busy machine the load only needs to keep moving).
async fn progressed(sent: &AtomicUsize, from: usize, by: usize) -> bool {
    for _ in 0..2000 {
        if sent.load(Ordering::SeqCst) >= from + by {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_fails_no_request() {
    let world = World::new();
    let (app, payment, order) = pair(&world, Behaviour::Ok("paid")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let client = Client::new(order.outbound());
        load.push(tokio::spawn(async move {
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match client.request("POST", "payment-service", "/pay", &[]).await {
                    Ok((200, _)) => {}
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // The load is running before the first rotation, and goes on across each one.
    assert!(
        progressed(&sent, 0, 10).await,
        "no load before the rotations"
    );
    for round in 0..3 {
        for proxy in [&payment, &order] {
            let at_rotation = sent.load(Ordering::SeqCst);
            let before = serial(&proxy.admin("/certs").await);
            let admin = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.ports.admin));
            let (status, _) = send(admin, "POST", "localhost", "/rotate", &[])
                .await
                .unwrap();
            assert_eq!(status, 200);
            let mut rotated = false;
            for _ in 0..200 {
                if serial(&proxy.admin("/certs").await) != before {
                    rotated = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(rotated, "round {round}: the serial did not change");
            // A fresh client connection right after the rotation is served too.
            let (status, _) = send(order.outbound(), "POST", "payment-service", "/pay", &[])
                .await
                .unwrap();
            assert_eq!(status, 200);
            assert!(
                progressed(&sent, at_rotation, 5).await,
                "round {round}: the load stalled across the rotation"
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert!(sent.load(Ordering::SeqCst) > 20);
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert_eq!(app.hits(), sent.load(Ordering::SeqCst) + 6);
}
