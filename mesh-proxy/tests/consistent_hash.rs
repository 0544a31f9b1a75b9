//! Session affinity through real sidecars: a DestinationRule with
//! `consistentHash: {httpHeaderName: x-user}` over three replicas sends every request of
//! a user to the same replica, on any connection, and spreads the users.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{HashMap, HashSet};

use support::*;

const AFFINITY: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: cart-service, namespace: production}
spec:
  host: cart-service
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_sticks_to_one_of_three_replicas() {
    let world = World::new();
    let apps = [
        App::start(Behaviour::Ok("replica-0")).await,
        App::start(Behaviour::Ok("replica-1")).await,
        App::start(Behaviour::Ok("replica-2")).await,
    ];
    let ports: Vec<Ports> = (0..3).map(|_| Ports::new()).collect();
    let endpoints: Vec<(u16, &str, &str)> = ports
        .iter()
        .map(|p| (p.inbound, "v1", "cart-service"))
        .collect();
    let yaml = format!(
        "{}---\n{AFFINITY}",
        service_entry("cart-service", 80, &endpoints)
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let mut replicas = Vec::new();
    for (i, (p, app)) in ports.iter().zip(&apps).enumerate() {
        let s = sidecar_settings(
            &world,
            "cart-service",
            &labels(&[("app", "cart-service"), ("version", "v1")]),
            &config,
            *p,
            app.addr,
            "",
        );
        replicas.push(Proxy::start(&world, "sidecar", &format!("cart-{i}"), &s, *p).await);
    }
    let caller_ports = Ports::new();
    let caller = start_sidecar(
        &world,
        "web-frontend",
        &config,
        caller_ports,
        "127.0.0.1:9".parse().unwrap(),
    )
    .await;
    let log = caller.output();
    assert!(
        !log.contains("consistentHash"),
        "consistentHash is enforced, not warned about: {log}"
    );

    let client = Client::new(caller.outbound());
    let mut replica_of: HashMap<String, String> = HashMap::new();
    for round in 0..4 {
        for user in 0..40 {
            let user = format!("user-{user}");
            let headers = [("x-user", user.as_str())];
            // Every other round on a fresh connection: affinity is per key, not per
            // connection.
            let (status, body) = if round % 2 == 0 {
                client
                    .request("GET", "cart-service", "/cart", &headers)
                    .await
                    .unwrap()
            } else {
                send(caller.outbound(), "GET", "cart-service", "/cart", &headers)
                    .await
                    .unwrap()
            };
            assert_eq!(status, 200, "{body}");
            let first = replica_of
                .entry(user.clone())
                .or_insert_with(|| body.clone());
            assert_eq!(*first, body, "{user} moved in round {round}");
        }
    }
    let used: HashSet<&String> = replica_of.values().collect();
    assert_eq!(
        used.len(),
        3,
        "40 users spread over the replicas: {replica_of:?}"
    );
    let hits: usize = apps.iter().map(App::hits).sum();
    assert_eq!(hits, 160);

    // A request without the key still gets an answer (a random replica).
    let (status, body) = client
        .request("GET", "cart-service", "/cart", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("replica-"), "{body}");
    drop(replicas);
}
