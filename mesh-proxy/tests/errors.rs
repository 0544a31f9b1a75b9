//! Local replies through real processes: route timeout (504 UT), connection-pool
//! overflow (503 UO with `x-envoy-overloaded`), unknown path (404 NR), no endpoints
//! reachable (503 UF).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;

const POLICY: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service, namespace: production}
spec:
  hosts: [payment-service]
  http:
  - match:
    - uri: {prefix: /slow}
    timeout: 200ms
    retries: {attempts: 0}
    route:
    - destination: {host: payment-service}
  - match:
    - uri: {prefix: /pay}
    retries: {attempts: 0}
    route:
    - destination: {host: payment-service}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment-service, namespace: production}
spec:
  host: payment-service
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 1}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_overflow_and_no_route_answer_like_istio() {
    let world = World::new();
    let app = App::start(Behaviour::Slow(Duration::from_millis(600), "paid")).await;
    let (pp, op) = (Ports::new(), Ports::new());
    let se = service_entry(
        "payment-service",
        80,
        &[(pp.inbound, "v1", "payment-service")],
    );
    let config = world.write_config("istio", "mesh.yaml", &format!("{se}---\n{POLICY}"));
    let s = sidecar_settings(
        &world,
        "payment-service",
        &labels(&[("app", "payment-service")]),
        &config,
        pp,
        app.addr,
        "",
    );
    let _payment = Proxy::start(&world, "sidecar", "payment", &s, pp).await;
    let s = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let order = Proxy::start(&world, "sidecar", "order", &s, op).await;
    let proxy = format!("http://{}", order.outbound());

    // The route timeout answers 504 before the application does.
    let (_, out, _) = curl(&[
        "-x",
        &proxy,
        "-w",
        "\n%{http_code}",
        "http://payment-service/slow",
    ])
    .await;
    assert_eq!(out, "upstream request timeout\n504");

    // One request in flight, one pending; the third overflows.
    let mut calls = Vec::new();
    for _ in 0..3 {
        let p = proxy.clone();
        calls.push(tokio::spawn(async move {
            curl(&[
                "-x",
                &p,
                "-D",
                "-",
                "-w",
                "\n%{http_code}",
                "http://payment-service/pay",
            ])
            .await
            .1
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut outs = Vec::new();
    for c in calls {
        outs.push(c.await.unwrap());
    }
    let overflowed: Vec<&String> = outs.iter().filter(|o| o.ends_with("\n503")).collect();
    assert_eq!(overflowed.len(), 1, "{outs:#?}");
    assert!(
        overflowed[0]
            .to_ascii_lowercase()
            .contains("x-envoy-overloaded: true"),
        "{}",
        overflowed[0]
    );
    assert!(
        overflowed[0].contains(
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        ),
        "{}",
        overflowed[0]
    );
    assert_eq!(
        outs.iter()
            .filter(|o| o.ends_with("\npaid\n200") || o.ends_with("paid\n200"))
            .count(),
        2,
        "{outs:#?}"
    );

    // A known host without a matching route: 404 NR.
    let (_, out, _) = curl(&[
        "-x",
        &proxy,
        "-w",
        "%{http_code}",
        "http://payment-service/other",
    ])
    .await;
    assert_eq!(out, "404");
    let metrics = order
        .metrics_when(|t| t.contains("response_code=\"404\""))
        .await;
    for (code, flag) in [("504", "UT"), ("503", "UO"), ("404", "NR")] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
                    && l.contains(&format!("response_flags=\"{flag}\""))),
            "{code} {flag}:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_503_uf_after_retries() {
    let world = World::new();
    let op = Ports::new();
    let dead = free_port();
    let se = service_entry("payment-service", 80, &[(dead, "v1", "payment-service")]);
    let config = world.write_config("istio", "mesh.yaml", &se);
    let s = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let order = Proxy::start(&world, "sidecar", "order", &s, op).await;
    let proxy = format!("http://{}", order.outbound());
    let (_, out, _) = curl(&[
        "-x",
        &proxy,
        "-w",
        "\n%{http_code}",
        "http://payment-service/pay",
    ])
    .await;
    assert_eq!(
        out,
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure\n503"
    );
}
