//! The `sidecar` demo, run as a user runs it (short mode): every step's expectation
//! holds and the output tells the story.

#![allow(clippy::unwrap_used)]

#[test]
fn sidecar_demo_short_mode_passes_every_step_and_exits_zero() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .arg("--short")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("All 21 expectations held."), "{stdout}");

    // Each step printed what happened.
    for want in [
        "spiffe://cluster.local/ns/production/sa/istio-ingressgateway -> spiffe://cluster.local/ns/production/sa/order-service  (mutual_tls)",
        "spiffe://cluster.local/ns/production/sa/order-service -> spiffe://cluster.local/ns/production/sa/payment-service  (mutual_tls)",
        "plaintext HTTP to payment-service's sidecar: connection closed, no answer",
        "istio-ingressgateway POST /api/v1/payments -> 403 Forbidden",
        "order-service        GET  /api/v1/payments -> 403 Forbidden RBAC: access denied",
        "order-service        POST /api/v1/payments -> 200 OK",
        "canary-order-service.yaml rewritten: v1 80 / v2 20; all 6 proxies reloaded",
        "canary-order-service.yaml rewritten: v1 0 / v2 100; all 6 proxies reloaded",
        "rollout 100%: 100.0% measured to v2",
        "success rate 100.0%",
        "ejected by: order-service-v1, order-service-v2",
        "service graph of production as Kiali draws it",
        "order-service-v2 (v2)         -> payment-service-v1 (v1)",
        "istio-ingressgateway (latest) -> payment-service-v1 (v1)",
        "SERVER  payment-service:8080/*",
        "a new handshake to payment-service presents serial",
        "replica c: plain HTTP on 127.0.0.1:",
        "payments answered by replica c over plaintext",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    // The summary has one row per expectation, all ok.
    let rows = stdout
        .lines()
        .skip_while(|l| *l != "Summary")
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|w| w.parse::<u8>().is_ok())
        })
        .count();
    assert_eq!(rows, 21, "{stdout}");
}

#[test]
fn sidecar_demo_rejects_unknown_arguments() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keep_running_serves_the_printed_curl_command_and_admin_urls() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sidecar"))
        .args(["--short", "--keep-running"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("Press Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    let curl = printed
        .iter()
        .find(|l| l.trim_start().starts_with("curl "))
        .cloned();
    let admin = printed
        .iter()
        .filter(|l| l.trim_start().starts_with("payment-service-a"))
        .find_map(|l| l.split_whitespace().find(|w| w.ends_with("/metrics")))
        .map(str::to_owned);
    let run = |args: Vec<String>| {
        std::process::Command::new("curl")
            .args(args)
            .output()
            .unwrap()
    };
    let order = curl
        .as_ref()
        .map(|c| run(c.split_whitespace().skip(1).map(str::to_owned).collect()));
    let metrics = admin.as_ref().map(|u| run(vec!["-s".into(), u.clone()]));
    child.kill().unwrap();
    child.wait().unwrap();

    let order = order.unwrap_or_else(|| panic!("no curl command in {printed:#?}"));
    let body = String::from_utf8_lossy(&order.stdout);
    assert!(order.status.success(), "{body}");
    assert!(body.contains("\"service\":\"order-service\""), "{body}");
    assert!(body.contains("\"payment_status\":200"), "{body}");
    let metrics = metrics.unwrap_or_else(|| panic!("no admin URL in {printed:#?}"));
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_requests_total{reporter=\"destination\"")),
        "{text}"
    );
}
