//! The article's security scenario with real processes: order-service's sidecar calls
//! payment-service's sidecar over mTLS; STRICT refuses plaintext; AuthorizationPolicy
//! allows only order-service's POSTs.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

struct Mesh {
    world: World,
    payment_app: App,
    payment: Proxy,
    order: Proxy,
}

async fn mesh() -> Mesh {
    let world = World::new();
    let payment_app = App::start(Behaviour::Ok("paid")).await;
    let payment_ports = Ports::new();
    let order_ports = Ports::new();
    let se = service_entry(
        "payment-service",
        80,
        &[(payment_ports.inbound, "v1", "payment-service")],
    );
    let config = world.write_config("istio", "mesh.yaml", &format!("{se}---\n{SECURITY}"));
    let payment = Proxy::start(
        &world,
        "sidecar",
        "payment-service",
        &sidecar_settings(
            &world,
            "payment-service",
            &labels(&[("app", "payment-service"), ("version", "v1")]),
            &config,
            payment_ports,
            payment_app.addr,
            "",
        ),
        payment_ports,
    )
    .await;
    let order = Proxy::start(
        &world,
        "sidecar",
        "order-service",
        &sidecar_settings(
            &world,
            "order-service",
            &labels(&[("app", "order-service"), ("version", "v1")]),
            &config,
            order_ports,
            "127.0.0.1:9".parse().unwrap(),
            "",
        ),
        order_ports,
    )
    .await;
    Mesh {
        world,
        payment_app,
        payment,
        order,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_calls_payment_over_mtls_with_both_identities_recorded() {
    let m = mesh().await;
    let proxy = format!("http://{}", m.order.outbound());
    let (code, out, err) = curl(&[
        "-x",
        &proxy,
        "-X",
        "POST",
        "-w",
        "\n%{http_code}",
        "http://payment-service/api/v1/payments",
    ])
    .await;
    assert_eq!(
        code,
        0,
        "{err}\n{}\n{}",
        m.order.output(),
        m.payment.output()
    );
    assert_eq!(
        out,
        "paid\n200",
        "{}\n{}",
        m.order.output(),
        m.payment.output()
    );
    assert_eq!(m.payment_app.hits(), 1);

    let metrics = m
        .payment
        .metrics_when(|t| t.contains("reporter=\"destination\""))
        .await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"destination\""))
        .unwrap_or_else(|| panic!("no inbound series:\n{metrics}"));
    assert!(
        line.contains("source_principal=\"spiffe://cluster.local/ns/production/sa/order-service\""),
        "{line}"
    );
    assert!(
        line.contains(
            "destination_principal=\"spiffe://cluster.local/ns/production/sa/payment-service\""
        ),
        "{line}"
    );
    assert!(
        line.contains("connection_security_policy=\"mutual_tls\""),
        "{line}"
    );
    assert!(line.contains("response_code=\"200\""), "{line}");

    let source = m
        .order
        .metrics_when(|t| t.contains("reporter=\"source\""))
        .await;
    assert!(
        source
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"source\"")
                && l.contains(
                    "source_principal=\"spiffe://cluster.local/ns/production/sa/order-service\""
                )
                && l.contains(
                    "destination_service=\"payment-service.production.svc.cluster.local\""
                )),
        "{source}"
    );

    // Access logs: the inbound side names the client it verified (the app behind it is
    // plaintext), the outbound side the server it verified (its app client is plaintext).
    let inbound = access_log_line(&m.world, "payment-service", "/api/v1/payments").await;
    assert!(
        inbound.starts_with('[') && inbound.contains("\"POST /api/v1/payments HTTP/"),
        "{inbound}"
    );
    assert!(
        inbound.ends_with(" \"spiffe://cluster.local/ns/production/sa/order-service\" \"-\""),
        "{inbound}"
    );
    let outbound = access_log_line(&m.world, "order-service", "/api/v1/payments").await;
    assert!(
        outbound.ends_with(" \"-\" \"spiffe://cluster.local/ns/production/sa/payment-service\""),
        "{outbound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_reuse_one_mtls_connection_for_many_clients() {
    let m = mesh().await;
    let accepted = |text: &str, listener: &str| {
        series_value(text, "mesh_downstream_cx_total", &[("listener", listener)]).unwrap_or(0.0)
    };
    let before = accepted(&m.payment.admin("/stats/prometheus").await, "inbound");
    // Twenty application connections, one request each, to order-service's sidecar.
    let proxy = format!("http://{}", m.order.outbound());
    for _ in 0..20 {
        let (code, out, err) = curl(&[
            "-x",
            &proxy,
            "-X",
            "POST",
            "http://payment-service/api/v1/payments",
        ])
        .await;
        assert_eq!((code, out.as_str()), (0, "paid"), "{err}");
    }
    assert_eq!(m.payment_app.hits(), 20);
    let order = m
        .order
        .metrics_when(|t| accepted(t, "outbound") >= 20.0)
        .await;
    assert_eq!(accepted(&order, "outbound"), 20.0, "{order}");
    // Between the sidecars they shared one pooled connection: one mTLS handshake.
    let payment = m.payment.admin("/stats/prometheus").await;
    assert_eq!(accepted(&payment, "inbound") - before, 1.0, "{payment}");
}

/// The access-log line of `sa`'s sidecar for `path`, once it is written (lines are written
/// at stream end, a moment after the client has its response).
async fn access_log_line(world: &World, sa: &str, path: &str) -> String {
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(world.path(&format!("{sa}-access.log"))).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| l.contains(path)) {
            return line.to_owned();
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no access-log line for {path} in {sa}'s log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_strict_inbound_is_refused_and_get_is_denied() {
    let m = mesh().await;
    // Plaintext straight to payment-service's inbound port: the connection is closed.
    let inbound = format!(
        "http://127.0.0.1:{}/api/v1/payments",
        m.payment.ports.inbound
    );
    let (code, _out, err) = curl(&["-X", "POST", &inbound]).await;
    assert_ne!(code, 0, "plaintext was accepted: {err}");
    assert_eq!(m.payment_app.hits(), 0);

    // Through the mesh, GET is not allowed by the policy.
    let proxy = format!("http://{}", m.order.outbound());
    let (_, out, _) = curl(&[
        "-x",
        &proxy,
        "-w",
        "\n%{http_code}",
        "http://payment-service/api/v1/payments",
    ])
    .await;
    assert_eq!(out, "RBAC: access denied\n403");
    assert_eq!(m.payment_app.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_service_gets_403_from_payment() {
    let m = mesh().await;
    let ports = Ports::new();
    let config = m.world.path("istio");
    let fraud = Proxy::start(
        &m.world,
        "sidecar",
        "fraud-service",
        &sidecar_settings(
            &m.world,
            "fraud-service",
            &labels(&[("app", "fraud-service")]),
            &config,
            ports,
            "127.0.0.1:9".parse().unwrap(),
            "",
        ),
        ports,
    )
    .await;
    let proxy = format!("http://{}", fraud.outbound());
    let (_, out, _) = curl(&[
        "-x",
        &proxy,
        "-X",
        "POST",
        "-w",
        "\n%{http_code}",
        "http://payment-service/api/v1/payments",
    ])
    .await;
    assert_eq!(out, "RBAC: access denied\n403");
    assert_eq!(m.payment_app.hits(), 0);
    let metrics = m
        .payment
        .metrics_when(|t| t.contains("response_code=\"403\""))
        .await;
    assert!(
        metrics.lines().any(|l| l.contains("response_code=\"403\"")
            && l.contains(
                "source_principal=\"spiffe://cluster.local/ns/production/sa/fraud-service\""
            )),
        "{metrics}"
    );
}
