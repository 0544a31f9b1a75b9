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

    // Addressed to the outbound listener itself, passthrough would feed the proxy its
    // own requests without end: refused at once, with HTTP/1.1 and h2c alike.
    let own = format!("http://{}/loop", proxy.outbound());
    for http in ["--http1.1", "--http2-prior-knowledge"] {
        let (code, out, err) = curl(&[http, "-w", "\n%{http_code}", &own]).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, "request loops back to this proxy\n508", "{http}");
    }
    let via_localhost = format!("http://localhost:{}/loop", proxy.ports.outbound);
    let (_, out, _) = curl(&["-w", "%{http_code}", "-o", "/dev/null", &via_localhost]).await;
    assert_eq!(out, "508");
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
    let metrics = proxy
        .metrics_when(|t| t.contains("response_code=\"502\""))
        .await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"502\"")
                && l.contains("response_flags=\"NR\"")),
        "{metrics}"
    );
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(world.path("order-service-access.log")).unwrap();
        if log.contains("\" 502 NR ") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
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
async fn peers_speak_h2_and_the_app_gets_the_meshs_client_cert_not_a_forged_one() {
    let world = World::new();
    let payment_app = App::start(Behaviour::Ok("paid")).await;
    let (pp, op) = (Ports::new(), Ports::new());
    let se = service_entry(
        "payment-service",
        80,
        &[(pp.inbound, "v1", "payment-service")],
    );
    let config = world.write_config("istio", "mesh.yaml", &se);
    let payment = start_sidecar(&world, "payment-service", &config, pp, payment_app.addr).await;
    let order = start_sidecar(
        &world,
        "order-service",
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
    )
    .await;

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
    // The XFCC the application gets is the mesh's (SANITIZE_SET), never the forged one.
    let xfcc = seen["x-forwarded-client-cert"].to_str().unwrap();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/production/sa/payment-service;Hash="),
        "{xfcc}"
    );
    assert!(
        xfcc.ends_with(";Subject=\"\";URI=spiffe://cluster.local/ns/production/sa/order-service"),
        "{xfcc}"
    );
    assert!(!xfcc.contains("sa/admin"), "{xfcc}");
    for h in ["x-envoy-original-path", "x-istio-attributes"] {
        assert!(
            !seen.contains_key(h),
            "{h} reached the application: {seen:?}"
        );
    }
    assert!(seen.contains_key("x-request-id"));
    // Between the sidecars the connection negotiated h2 over ALPN. The access log is
    // written at stream end, after the response went out: wait for the line.
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(world.path("payment-service-access.log")).unwrap();
        if log.contains("\"GET /pay HTTP/2\" 200") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(log.contains("\"GET /pay HTTP/2\" 200"), "{log}");
    drop(payment);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled_through_both_sidecars() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::new();
    let app = App::start(Behaviour::Echo).await;
    let (pp, op) = (Ports::new(), Ports::new());
    let se = service_entry("chat-service", 80, &[(pp.inbound, "v1", "chat-service")]);
    let config = world.write_config("istio", "mesh.yaml", &se);
    let _chat = start_sidecar(&world, "chat-service", &config, pp, app.addr).await;
    let order = start_sidecar(
        &world,
        "order-service",
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
    )
    .await;

    let mut tcp = tokio::net::TcpStream::connect(order.outbound())
        .await
        .unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: chat-service\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut byte))
            .await
            .expect("response head")
            .unwrap();
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 101"),
        "{head}\n{}",
        order.output()
    );
    assert!(head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"ping"[..], b"second frame"] {
        tcp.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_exact(&mut buf))
            .await
            .expect("echo")
            .unwrap();
        assert_eq!(buf, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_answered_with_200_stays_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::new();
    let app = App::start(Behaviour::Ok("plain")).await;
    let (pp, op) = (Ports::new(), Ports::new());
    let se = service_entry("chat-service", 80, &[(pp.inbound, "v1", "chat-service")]);
    let config = world.write_config("istio", "mesh.yaml", &se);
    let _chat = start_sidecar(&world, "chat-service", &config, pp, app.addr).await;
    let order = start_sidecar(
        &world,
        "order-service",
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
    )
    .await;

    let mut tcp = tokio::net::TcpStream::connect(order.outbound())
        .await
        .unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: chat-service\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\
          GET /again HTTP/1.1\r\nHost: chat-service\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut all = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_to_string(&mut all),
    )
    .await
    .expect("both answers")
    .unwrap();
    // Two ordinary HTTP responses on one connection: no tunnel was set up.
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2, "{all}");
    assert_eq!(all.matches("plain").count(), 2, "{all}");
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_application_is_reached_with_h2_prior_knowledge() {
    let world = World::new();
    let app = App::start(Behaviour::Ok("grpc-ish")).await;
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
        app.addr,
        "",
    )
    .replace("\n  app: 1", "\n  appProtocol: HTTP2\n  app: 1");
    let _payment = Proxy::start(&world, "sidecar", "payment-service", &s, pp).await;
    let order = start_sidecar(
        &world,
        "order-service",
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
    )
    .await;
    // HTTP/1.1 from the caller, h2 between the sidecars, h2 to the application.
    let (_, out, _) = curl(&[
        "-x",
        &format!("http://{}", order.outbound()),
        "-w",
        "\n%{http_code}",
        "http://payment-service/x",
    ])
    .await;
    assert_eq!(out, "grpc-ish\n200");
    assert_eq!(*app.versions.lock().unwrap(), vec![http::Version::HTTP_2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once_until_one_closes() {
    let world = World::new();
    let external = App::start(Behaviour::Ok("external")).await;
    let ports = Ports::new();
    let config = world.write_config(
        "istio",
        "mesh.yaml",
        &service_entry("payment-service", 80, &[(1, "v1", "payment-service")]),
    );
    let s = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        ports,
        "127.0.0.1:9".parse().unwrap(),
        "",
    )
    .replace(
        "  drainTimeout: 3s\n",
        "  drainTimeout: 3s\n  maxConnections: 2\n",
    );
    let proxy = Proxy::start(&world, "sidecar", "order-service", &s, ports).await;
    let idle1 = tokio::net::TcpStream::connect(proxy.outbound())
        .await
        .unwrap();
    let _idle2 = tokio::net::TcpStream::connect(proxy.outbound())
        .await
        .unwrap();
    let metrics = proxy
        .metrics_when(|t| t.contains("mesh_active_connections{listener=\"outbound\"} 2"))
        .await;
    assert!(
        metrics.contains("mesh_active_connections{listener=\"outbound\"} 2"),
        "{metrics}"
    );
    let url = format!("http://{}/", external.addr);
    let outbound = format!("http://{}", proxy.outbound());
    // A third connection is closed at once (empty reply or reset), not left waiting.
    let (code, _, _) = curl(&["-x", &outbound, "--max-time", "10", &url]).await;
    assert!(
        code == 52 || code == 56,
        "a third connection is refused while two are open (curl exit {code})"
    );
    let metrics = proxy
        .metrics_when(|t| t.contains("mesh_downstream_cx_overflow_total{listener=\"outbound\"} 1"))
        .await;
    assert!(
        metrics.contains("mesh_downstream_cx_overflow_total{listener=\"outbound\"} 1"),
        "{metrics}"
    );
    drop(idle1);
    // Served once the proxy has seen the first connection go.
    let mut served = (0, String::new(), String::new());
    for _ in 0..100 {
        served = curl(&["-x", &outbound, &url]).await;
        if served.0 == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (code, out, err) = served;
    assert_eq!((code, out.as_str()), (0, "external"), "{err}");
    // The admin server has its own budget and stays reachable.
    assert!(proxy.admin("/healthz/ready").await.contains("LIVE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_answered_404_and_never_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let world = World::new();
    let app = App::start(Behaviour::Ok("app")).await;
    let se = service_entry("payment-service", 80, &[(1, "v1", "payment-service")]);
    let proxy = one_sidecar(&world, "", app.addr, &se).await;
    let inbound = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.ports.inbound));
    let target = app.addr.to_string();
    for listener in [proxy.outbound(), inbound] {
        let mut tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 64];
        let n = tcp.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(
            head.starts_with("HTTP/1.1 404 "),
            "{listener}: {head}\n{}",
            proxy.output()
        );
    }
    assert_eq!(app.hits(), 0);
}
