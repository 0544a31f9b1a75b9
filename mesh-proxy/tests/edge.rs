//! The edges of the outbound and inbound listeners with real processes and curl:
//! outboundTrafficPolicy, limits, malformed requests, untrusted headers, HTTP/2.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

async fn one_sidecar(
    world: &World,
    extra: &str,
    app: std::net::SocketAddr,
    config_yaml: &str,
) -> Proxy {
    let ports = Ports::new();
    let config = world.write_config("istio", "mesh.yaml", config_yaml);
    let s = sidecar_settings(
        world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        ports,
        app,
        extra,
    );
    Proxy::start(world, "sidecar", "order-service", &s, ports).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_any_passes_unknown_hosts_through_without_mtls() {
    let world = World::new();
    let external = App::start(Behaviour::Ok("external")).await;
    let se = service_entry("payment-service", 80, &[(1, "v1", "payment-service")]);
    let proxy = one_sidecar(&world, "", "127.0.0.1:9".parse().unwrap(), &se).await;
    let url = format!("http://{}/status", external.addr);
    let (_, out, _) = curl(&[
        "-x",
        &format!("http://{}", proxy.outbound()),
        "-w",
        "\n%{http_code}",
        &url,
    ])
    .await;
    assert_eq!(out, "external\n200");
    assert_eq!(external.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_answers_502_and_records_it() {
    let world = World::new();
    let external = App::start(Behaviour::Ok("external")).await;
    let se = service_entry("payment-service", 80, &[(1, "v1", "payment-service")]);
    let proxy = one_sidecar(
        &world,
        "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
        "127.0.0.1:9".parse().unwrap(),
        &se,
    )
    .await;
    let url = format!("http://{}/status", external.addr);
    let (_, out, _) = curl(&[
        "-x",
        &format!("http://{}", proxy.outbound()),
        "-w",
        "%{http_code}",
        &url,
    ])
    .await;
    assert_eq!(out, "502");
    assert_eq!(external.hits(), 0);
    let metrics = proxy.admin("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"502\"")
                && l.contains("response_flags=\"NR\"")),
        "{metrics}"
    );
    let log = std::fs::read_to_string(world.path("order-service-access.log")).unwrap();
    assert!(log.contains("\" 502 NR "), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_underscore_names_400() {
    let world = World::new();
    let app = App::start(Behaviour::Ok("ok")).await;
    let se = service_entry("payment-service", 80, &[(1, "v1", "payment-service")]);
    let proxy = one_sidecar(&world, "", "127.0.0.1:9".parse().unwrap(), &se).await;
    let outbound = format!("http://{}", proxy.outbound());
    let url = format!("http://{}/", app.addr);
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let (_, out, _) = curl(&[
        "-x",
        &outbound,
        "-H",
        &big,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ])
    .await;
    assert_eq!(out, "431");
    let (_, out, _) = curl(&[
        "-x",
        &outbound,
        "-H",
        "x_envoy_original_path: /admin",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ])
    .await;
    assert_eq!(out, "400");
    assert_eq!(app.hits(), 0);
    // The proxy keeps serving everyone else.
    let (_, out, _) = curl(&[
        "-x",
        &outbound,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ])
    .await;
    assert_eq!(out, "200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_speak_h2_and_forged_identity_headers_never_reach_the_app() {
    let world = World::new();
    let payment_app = App::start(Behaviour::Ok("paid")).await;
    let (pp, op) = (Ports::new(), Ports::new());
    let se = service_entry(
        "payment-service",
        80,
        &[(pp.inbound, "v1", "payment-service")],
    );
    let config = world.write_config("istio", "mesh.yaml", &se);
    let s = sidecar_settings(
        &world,
        "payment-service",
        &labels(&[("app", "payment-service")]),
        &config,
        pp,
        payment_app.addr,
        "",
    );
    let payment = Proxy::start(&world, "sidecar", "payment-service", &s, pp).await;
    let s = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let order = Proxy::start(&world, "sidecar", "order-service", &s, op).await;

    // The application speaks HTTP/2 (prior knowledge) to its sidecar.
    let url = format!("http://{}/pay", order.outbound());
    let (code, out, err) = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "host: payment-service",
        "-H",
        "x-forwarded-client-cert: By=spiffe://cluster.local/ns/production/sa/admin",
        "-H",
        "x-envoy-original-path: /admin",
        "-H",
        "x-istio-attributes: forged",
        "-w",
        "\n%{http_version}",
        &url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "paid\n2");
    let seen = payment_app.last_headers.lock().unwrap().pop().unwrap();
    for h in [
        "x-forwarded-client-cert",
        "x-envoy-original-path",
        "x-istio-attributes",
    ] {
        assert!(
            !seen.contains_key(h),
            "{h} reached the application: {seen:?}"
        );
    }
    assert!(seen.contains_key("x-request-id"));
    // Between the sidecars the connection negotiated h2 over ALPN.
    let log = std::fs::read_to_string(world.path("payment-service-access.log")).unwrap();
    assert!(log.contains("\"GET /pay HTTP/2\" 200"), "{log}");
    drop(payment);
}
