//! The embedded (proxyless) example through real requests: real mTLS handshakes with
//! certificates from the development CA, real hyper servers on loopback.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use examples::embedded::{payment_request, send, setup};
use http::{Method, StatusCode};
use mesh_core::config::{LoadOptions, MeshConfig};

#[tokio::test]
async fn payments_succeed_while_a_failing_replica_is_retried_away_and_ejected() {
    let s = setup().await.unwrap();
    s.replicas[1].failing.store(true, Ordering::Relaxed);
    for _ in 0..60 {
        let (status, _) = send(&s.order.client, payment_request(Method::POST))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    // consecutive5xxErrors: 5, then the endpoint is out of the balancer.
    assert_eq!(s.replicas[1].hits.load(Ordering::Relaxed), 5);
    let healthy =
        s.replicas[0].hits.load(Ordering::Relaxed) + s.replicas[2].hits.load(Ordering::Relaxed);
    assert_eq!(healthy, 60);
}

#[tokio::test]
async fn callee_sees_the_callers_spiffe_identity() {
    let s = setup().await.unwrap();
    let (status, body) = send(&s.order.client, payment_request(Method::POST))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("\"peer\":\"spiffe://cluster.local/ns/production/sa/order-service\""),
        "{body}"
    );
}

#[tokio::test]
async fn authorization_policy_denies_get_and_other_workloads() {
    let s = setup().await.unwrap();
    let (status, body) = send(&s.order.client, payment_request(Method::GET))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");

    let svid = s.ca.write_svid("production", "inventory-service").unwrap();
    let inventory = examples::embedded::order_service(&s.config, &svid).unwrap();
    let (status, _) = send(&inventory.client, payment_request(Method::POST))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Denied requests never reach the application.
    let hits: u64 = s
        .replicas
        .iter()
        .map(|r| r.hits.load(Ordering::Relaxed))
        .sum();
    assert_eq!(hits, 0);
}

#[tokio::test]
async fn strict_peer_authentication_refuses_plaintext() {
    let s = setup().await.unwrap();
    for r in &s.replicas {
        let tcp = tokio::net::TcpStream::connect(r.address).await.unwrap();
        assert!(examples::embedded::plaintext_refused(tcp).await);
        assert_eq!(r.hits.load(Ordering::Relaxed), 0);
    }
}

#[tokio::test]
async fn weighted_subsets_split_traffic_and_a_reload_moves_it() {
    let s = setup().await.unwrap();
    let n = 400;
    let mut v2 = 0;
    for _ in 0..n {
        let (status, body) = send(&s.order.client, payment_request(Method::POST))
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        v2 += usize::from(body.contains("\"version\":\"v2\""));
    }
    // 10 % of 400: mean 40, standard deviation 6; 5 deviations either side.
    assert!((10..=70).contains(&v2), "{v2} of {n} to v2");

    // Rewrite the weights to 0/100 and reload: everything goes to v2.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&s.config[0]).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replace("weight: 90", "weight: 0")
            .replace("weight: 10", "weight: 100");
        std::fs::write(dir.path().join(path.file_name().unwrap()), text).unwrap();
    }
    let (config, _) = MeshConfig::load(
        &[dir.path(), s.config[1].as_path()],
        &LoadOptions::default(),
    )
    .unwrap();
    s.order.mesh.update(config).unwrap();
    for _ in 0..50 {
        let (_, body) = send(&s.order.client, payment_request(Method::POST))
            .await
            .unwrap();
        assert!(body.contains("\"version\":\"v2\""), "{body}");
    }
}

#[tokio::test]
async fn both_sides_report_istio_requests_total() {
    let s = setup().await.unwrap();
    for _ in 0..3 {
        send(&s.order.client, payment_request(Method::POST))
            .await
            .unwrap();
    }
    send(&s.order.client, payment_request(Method::GET))
        .await
        .unwrap();
    let source = s.order.telemetry.encode_metrics();
    let line = |text: &str, code: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("istio_requests_total{")
                    && l.contains(&format!("response_code=\"{code}\""))
            })
            .map(str::to_owned)
    };
    let ok = line(&source, "200").unwrap();
    assert!(
        ok.contains("reporter=\"source\"") && ok.ends_with(" 3"),
        "{ok}"
    );
    assert!(line(&source, "403").unwrap().ends_with(" 1"));
    let dest: String = s
        .replicas
        .iter()
        .map(|r| r.telemetry.encode_metrics())
        .collect();
    let denied = line(&dest, "403").unwrap();
    assert!(denied.contains("reporter=\"destination\""), "{denied}");
    assert!(
        denied
            .contains("source_principal=\"spiffe://cluster.local/ns/production/sa/order-service\""),
        "{denied}"
    );
}

#[test]
fn embedded_program_runs_its_checks_and_exits_zero() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embedded"))
        .args(["--requests", "60"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all 8 checks passed"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
}
