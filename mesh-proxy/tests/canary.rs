//! The article's canary: 95/5 weighted split, `x-canary: true` pinned to v2, and a weight
//! change by editing the file under continuous load, then an invalid edit that changes
//! nothing.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use support::*;

fn routes(v1: u32, v2: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: order-service, namespace: production}}
spec:
  host: order-service
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: order-service, namespace: production}}
spec:
  hosts: [order-service]
  http:
  - match:
    - headers:
        x-canary: {{exact: \"true\"}}
    route:
    - destination: {{host: order-service, subset: v2}}
  - route:
    - destination: {{host: order-service, subset: v1}}
      weight: {v1}
    - destination: {{host: order-service, subset: v2}}
      weight: {v2}
"
    )
}

async fn split(client: &Client, n: usize, headers: &[(&str, &str)]) -> (usize, usize) {
    let (mut v1, mut v2) = (0, 0);
    for _ in 0..n {
        let (status, body) = client
            .request("GET", "order-service", "/orders", headers)
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        match body.as_str() {
            "v1" => v1 += 1,
            "v2" => v2 += 1,
            other => panic!("unexpected body {other:?}"),
        }
    }
    (v1, v2)
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn version(dump: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(dump).unwrap();
    v["version"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_header_pin_and_live_weight_change() {
    let world = World::new();
    let (app1, app2) = (
        App::start(Behaviour::Ok("v1")).await,
        App::start(Behaviour::Ok("v2")).await,
    );
    let (p1, p2, caller_ports) = (Ports::new(), Ports::new(), Ports::new());
    let se = service_entry(
        "order-service",
        80,
        &[
            (p1.inbound, "v1", "order-service"),
            (p2.inbound, "v2", "order-service"),
        ],
    );
    let config = world.write_config("istio", "services.yaml", &se);
    world.write_config("istio", "routes.yaml", &routes(95, "5"));
    let mut replicas = Vec::new();
    for (name, ports, app, version) in [
        ("order-v1", p1, app1.addr, "v1"),
        ("order-v2", p2, app2.addr, "v2"),
    ] {
        let s = sidecar_settings(
            &world,
            "order-service",
            &labels(&[("app", "order-service"), ("version", version)]),
            &config,
            ports,
            app,
            "",
        );
        replicas.push(Proxy::start(&world, "sidecar", name, &s, ports).await);
    }
    let s = sidecar_settings(
        &world,
        "api-service",
        &labels(&[("app", "api-service")]),
        &config,
        caller_ports,
        "127.0.0.1:9".parse().unwrap(),
        "randomSeed: 7\n",
    );
    let caller = Proxy::start(&world, "sidecar", "api-service", &s, caller_ports).await;
    let client = Client::new(caller.outbound());

    // 95/5 within a chi-square bound (1 degree of freedom, p = 0.001).
    let n = 400usize;
    let (v1, v2) = split(&client, n, &[]).await;
    let (e1, e2) = (n as f64 * 0.95, n as f64 * 0.05);
    let chi2 = (v1 as f64 - e1).powi(2) / e1 + (v2 as f64 - e2).powi(2) / e2;
    assert!(chi2 < 10.83, "v1={v1} v2={v2} chi2={chi2}");
    assert!(v2 > 0, "the canary got no traffic");

    // Canary users always reach v2.
    assert_eq!(split(&client, 50, &[("x-canary", "true")]).await, (0, 50));

    // Continuous load while the weights are edited.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let client = Client::new(caller.outbound());
        tokio::spawn(async move {
            for _ in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match client.request("GET", "order-service", "/orders", &[]).await {
                    Ok((200, _)) => {}
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let before = version(&caller.admin("/config_dump").await);
    world.write_config("istio", "routes.yaml", &routes(0, "100"));
    wait_for("the new weights", async || {
        version(&caller.admin("/config_dump").await) != before
    })
    .await;
    let after = version(&caller.admin("/config_dump").await);
    assert_eq!(
        split(&client, 50, &[]).await,
        (0, 50),
        "the new split applies at once"
    );

    // An invalid edit is rejected: same version, failure counted, traffic unchanged.
    world.write_config("istio", "routes.yaml", &routes(0, "-100"));
    wait_for("the rejected reload", async || {
        caller
            .admin("/metrics")
            .await
            .lines()
            .any(|l| l == "mesh_config_reload_failures_total 1")
    })
    .await;
    assert_eq!(version(&caller.admin("/config_dump").await), after);
    assert_eq!(split(&client, 50, &[]).await, (0, 50));
    assert!(
        caller.output().contains("routes.yaml:"),
        "the log names the file and line:\n{}",
        caller.output()
    );

    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert!(
        sent.load(Ordering::SeqCst) > 20,
        "the load ran during the edits"
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert_eq!(
        app1.hits() + app2.hits(),
        n + 150 + sent.load(Ordering::SeqCst)
    );
}
