//! ServiceEntry `resolution: DNS` with the real binary and a real DNS server (dnsmasq
//! on a loopback port): the name is resolved through the configured name server, and
//! resolved again when the answer's TTL runs out, so that a changed record moves the
//! traffic without a reload.
//!
//! Needs `dnsmasq` (Debian's `dnsmasq-base`): without it the test fails when `CI` is set
//! and says it skipped elsewhere.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_destinations_follow_the_record_as_its_ttl_expires() {
    if !tool_available("dnsmasq") {
        return;
    }
    let world = World::new();
    // The same port on two loopback addresses: the record says which one serves.
    let port = free_port();
    counting_app(SocketAddr::from(([127, 0, 0, 1], port)), "one").await;
    counting_app(SocketAddr::from(([127, 0, 0, 2], port)), "two").await;

    let hosts = world.path("dns-hosts");
    std::fs::write(&hosts, "127.0.0.1 db.example.internal\n").unwrap();
    let dns_port = free_port();
    let dnsmasq = KillOnDrop(
        std::process::Command::new("dnsmasq")
            .arg("--keep-in-foreground")
            .arg(format!("--port={dns_port}"))
            .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--conf-file=/dev/null"])
            .args(["--user=root", "--local-ttl=1"])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .arg(format!(
                "--pid-file={}",
                world.path("dnsmasq.pid").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: production}}
spec:
  hosts: [db.example.internal]
  location: MESH_EXTERNAL
  resolution: DNS
  ports:
  - {{number: {port}, name: http, protocol: HTTP}}
"
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let ports = Ports::new();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let settings = sidecar_settings(
        &world,
        "order-service",
        &labels(&[("app", "order-service")]),
        &config,
        ports,
        nowhere,
        &format!("dns:\n  servers: [127.0.0.1:{dns_port}]\n  refreshRate: 30s\n"),
    );
    let proxy = Proxy::start(&world, "sidecar", "order-service", &settings, ports).await;
    let host = format!("db.example.internal:{port}");
    let answer = || async {
        send(proxy.outbound(), "GET", &host, "/", &[])
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    // The first answer may take a moment (the proxy resolves in the background).
    let mut seen = String::new();
    for _ in 0..100 {
        seen = answer().await;
        if seen == "one" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, "one", "{}", proxy.output());

    // The record changes; after its 1 s TTL the next resolution moves the traffic,
    // well before the 30 s refresh rate.
    std::fs::write(&hosts, "127.0.0.2 db.example.internal\n").unwrap();
    let pid = dnsmasq.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        seen = answer().await;
        if seen == "two" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, "two", "{}", proxy.output());
    assert!(started.elapsed() < Duration::from_secs(15));
}
