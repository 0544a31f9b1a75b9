//! Retries and outlier ejection with real processes: failing replicas are retried away
//! and ejected, capped by maxEjectionPercent, while the caller sees only successes.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

const POLICY: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service, namespace: production}
spec:
  hosts: [payment-service]
  http:
  - timeout: 5s
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,retriable-4xx
    route:
    - destination: {host: payment-service}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment-service, namespace: production}
spec:
  host: payment-service
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_replicas_are_retried_away_and_at_most_half_ejected() {
    let world = World::new();
    let good = App::start(Behaviour::Ok("paid")).await;
    let mut bad = Vec::new();
    for _ in 0..3 {
        bad.push(App::start(Behaviour::Status(503, "unavailable")).await);
    }
    let ports: Vec<Ports> = (0..4).map(|_| Ports::new()).collect();
    let endpoints: Vec<(u16, &str, &str)> = ports
        .iter()
        .map(|p| (p.inbound, "v1", "payment-service"))
        .collect();
    let yaml = format!(
        "{}---\n{POLICY}",
        service_entry("payment-service", 80, &endpoints)
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let apps = std::iter::once(good.addr).chain(bad.iter().map(|a| a.addr));
    let mut replicas = Vec::new();
    for (i, (p, app)) in ports.iter().zip(apps).enumerate() {
        let s = sidecar_settings(
            &world,
            "payment-service",
            &labels(&[("app", "payment-service"), ("version", "v1")]),
            &config,
            *p,
            app,
            "",
        );
        replicas.push(Proxy::start(&world, "sidecar", &format!("payment-{i}"), &s, *p).await);
    }
    let caller_ports = Ports::new();
    let s = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        caller_ports,
        "127.0.0.1:9".parse().unwrap(),
        "randomSeed: 3\n",
    );
    let caller = Proxy::start(&world, "sidecar", "order-service", &s, caller_ports).await;
    let client = Client::new(caller.outbound());

    for i in 0..40 {
        let (status, body) = client
            .request("POST", "payment-service", "/pay", &[])
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "paid"), "request {i}");
    }
    assert_eq!(good.hits(), 40);

    let clusters: serde_json::Value =
        serde_json::from_str(&caller.admin("/clusters?format=json").await).unwrap();
    let payment = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .unwrap()
                .ends_with("|payment-service.production.svc.cluster.local")
        })
        .unwrap_or_else(|| panic!("{clusters}"));
    let listed = payment["endpoints"].as_array().unwrap();
    assert_eq!(listed.len(), 4);
    let ejected: Vec<&str> = listed
        .iter()
        .filter(|e| e["ejected"] == true)
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        ejected.len(),
        2,
        "maxEjectionPercent 50 of 4 hosts: {payment}"
    );
    let good_addr = format!("127.0.0.1:{}", ports[0].inbound);
    assert!(!ejected.contains(&good_addr.as_str()));
    assert_eq!(payment["ejected"], 2);

    let text = caller.admin("/clusters").await;
    assert_eq!(
        text.matches("health_flags::/failed_outlier_check").count(),
        2,
        "{text}"
    );
    let metrics = caller.admin("/stats/prometheus").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_outlier_ejected_hosts{")
                && l.contains("payment-service")
                && l.ends_with(" 2")),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_outlier_ejections_overflow_total{") && !l.ends_with(" 0")),
        "the third failing host hit the cap: {metrics}"
    );
    // A reload that keeps the destination keeps its outlier state.
    let before = caller.admin("/config_dump").await;
    world.write_config(
        "istio",
        "other.yaml",
        &service_entry("fraud-service", 80, &[(1, "v1", "fraud-service")]),
    );
    let mut reloaded = false;
    for _ in 0..200 {
        if caller.admin("/config_dump").await != before {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(reloaded, "{}", caller.output());
    let text = caller.admin("/clusters").await;
    assert_eq!(
        text.matches("health_flags::/failed_outlier_check").count(),
        2,
        "{text}"
    );

    // A changed DestinationRule policy applies to the kept destination: without
    // outlierDetection nothing is ejected any more.
    let yaml = format!(
        "{}---\n{}",
        service_entry("payment-service", 80, &endpoints),
        POLICY.split("---").next().unwrap()
    );
    world.write_config("istio", "mesh.yaml", &yaml);
    let mut cleared = false;
    for _ in 0..200 {
        let _ = client.request("POST", "payment-service", "/pay", &[]).await;
        let json: serde_json::Value =
            serde_json::from_str(&caller.admin("/clusters?format=json").await).unwrap();
        let c = json["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["name"]
                    .as_str()
                    .unwrap()
                    .ends_with("|payment-service.production.svc.cluster.local")
            })
            .cloned()
            .unwrap();
        if c["outlier_detection"] == false && c["ejected"] == 0 {
            cleared = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(cleared, "{}", caller.admin("/clusters?format=json").await);

    // Every 503 the caller never saw was a retried attempt.
    let bad_hits: usize = bad.iter().map(App::hits).sum();
    assert!(bad_hits >= 3, "each failing replica was tried: {bad_hits}");
}
