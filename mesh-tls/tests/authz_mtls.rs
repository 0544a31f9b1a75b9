//! The article's payment policy, end to end: real mTLS handshakes with SVIDs from the
//! crate's CA, the PERMISSIVE accept path, hyper, the AuthzLayer and an application.
//!
//! "Only order-service can call payment-service, only `POST /api/v1/payments` and
//! `/api/v1/payments/*`."

#![allow(clippy::unwrap_used)]

mod authz_support;

use authz_support::Server;
use http::StatusCode;
use mesh_tls::authz::{Action, AuthzLayer, Operation, Policy, PolicySet, Rule, Source, Workload};

const ORDER_SERVICE: &str = "cluster.local/ns/production/sa/order-service";

fn payment_policy() -> Policy {
    Policy::new(
        "production",
        "payment-policy",
        Action::Allow,
        vec![Rule {
            from: Some(vec![Source {
                principals: vec![ORDER_SERVICE.into()],
                ..Source::default()
            }]),
            to: Some(vec![Operation {
                methods: vec!["POST".into()],
                paths: vec!["/api/v1/payments".into(), "/api/v1/payments/*".into()],
                ..Operation::default()
            }]),
            when: vec![],
        }],
    )
    .with_selector([("app", "payment-service")])
}

fn payment_workload() -> Workload {
    Workload {
        namespace: "production".into(),
        labels: [("app".to_owned(), "payment-service".to_owned())].into(),
        root_namespace: "istio-system".into(),
        ..Workload::default()
    }
}

async fn payment_server() -> Server {
    let set = PolicySet::for_workload([&payment_policy()], &payment_workload()).unwrap();
    assert_eq!(set.len(), 1);
    Server::start(AuthzLayer::new(set)).await
}

#[tokio::test]
async fn order_service_may_post_payments() {
    let server = payment_server().await;
    let mut client = server.connect_mtls("production", "order-service").await;

    assert_eq!(
        client.send("POST", "/api/v1/payments").await,
        (StatusCode::OK, "ok".into())
    );
    assert_eq!(
        client.send("POST", "/api/v1/payments/123").await,
        (StatusCode::OK, "ok".into())
    );

    let seen = server.take_seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].target, "/api/v1/payments");
    assert_eq!(seen[1].target, "/api/v1/payments/123");
    for s in &seen {
        assert_eq!(s.peer.as_ref().unwrap().principal(), ORDER_SERVICE);
        let decision = s.decision.as_ref().expect("decision in request extensions");
        assert!(decision.allowed);
        let matched = decision.policy.as_ref().unwrap();
        assert_eq!(
            (&*matched.name, matched.rule),
            ("production/payment-policy", 0)
        );
    }
}

#[tokio::test]
async fn order_service_get_is_denied_without_reaching_the_app() {
    let server = payment_server().await;
    let mut client = server.connect_mtls("production", "order-service").await;
    assert_eq!(
        client.send("GET", "/api/v1/payments").await,
        (StatusCode::FORBIDDEN, "RBAC: access denied".into())
    );
    assert_eq!(
        client.send("POST", "/api/v1/refunds").await,
        (StatusCode::FORBIDDEN, "RBAC: access denied".into())
    );
    assert!(server.take_seen().is_empty());
}

#[tokio::test]
async fn another_service_account_is_denied() {
    let server = payment_server().await;
    for (ns, sa) in [
        ("production", "inventory-service"),
        ("staging", "order-service"),
    ] {
        let mut client = server.connect_mtls(ns, sa).await;
        assert_eq!(
            client.send("POST", "/api/v1/payments").await,
            (StatusCode::FORBIDDEN, "RBAC: access denied".into()),
            "{ns}/{sa}"
        );
    }
    assert!(server.take_seen().is_empty());
}

#[tokio::test]
async fn plaintext_caller_is_denied() {
    let server = payment_server().await;
    let mut client = server.connect_plain().await;
    assert_eq!(
        client.send("POST", "/api/v1/payments").await,
        (StatusCode::FORBIDDEN, "RBAC: access denied".into())
    );
    assert!(server.take_seen().is_empty());
}

#[tokio::test]
async fn dot_segments_are_resolved_before_the_decision_and_forwarded_resolved() {
    let server = payment_server().await;
    let mut client = server.connect_mtls("production", "order-service").await;
    assert_eq!(
        client.send("POST", "/api/v1/payments/./123?x=1").await.0,
        StatusCode::OK
    );
    assert_eq!(
        client
            .send("POST", "/api/v1/payments/../../../admin")
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let seen = server.take_seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/api/v1/payments/123?x=1");
}

#[tokio::test]
async fn swapped_policies_apply_to_open_connections() {
    let server = payment_server().await;
    let mut client = server.connect_mtls("production", "order-service").await;
    assert_eq!(
        client.send("GET", "/api/v1/payments").await.0,
        StatusCode::FORBIDDEN
    );

    let mut widened = payment_policy();
    if let Some(rules) = widened.rules.as_mut() {
        rules[0].to.as_mut().unwrap()[0].methods.push("GET".into());
    }
    server
        .handle
        .store(PolicySet::for_workload([&widened], &payment_workload()).unwrap());
    assert_eq!(
        client.send("GET", "/api/v1/payments").await.0,
        StatusCode::OK
    );

    // `spec: {}` denies everything, on the same connection.
    let nothing = Policy {
        rules: None,
        ..Policy::new("production", "allow-nothing", Action::Allow, vec![])
    };
    server.handle.store(PolicySet::compile([&nothing]).unwrap());
    assert_eq!(
        client.send("POST", "/api/v1/payments").await.0,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn curl_with_an_svid_is_authorized_by_its_identity() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl not installed; skipping");
        return;
    }
    let server = payment_server().await;
    let dir = tempfile::tempdir().unwrap();
    let order = dir.path().join("order");
    let inventory = dir.path().join("inventory");
    server
        .ca
        .issue("production", "order-service")
        .unwrap()
        .write_dir(&order)
        .unwrap();
    server
        .ca
        .issue("production", "inventory-service")
        .unwrap()
        .write_dir(&inventory)
        .unwrap();

    let curl = |svid: Option<std::path::PathBuf>, method: &'static str| {
        let addr = server.addr;
        async move {
            let mut cmd = tokio::process::Command::new("curl");
            cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method]);
            let url = match &svid {
                Some(dir) => {
                    cmd.arg("--cert").arg(dir.join("cert-chain.pem"));
                    cmd.arg("--key").arg(dir.join("key.pem"));
                    // The server's SVID has only a SPIFFE URI SAN, which curl cannot check
                    // as a host name; the client certificate is what is under test.
                    cmd.arg("-k");
                    format!("https://{addr}/api/v1/payments")
                }
                None => format!("http://{addr}/api/v1/payments"),
            };
            let out = cmd.arg(url).output().await.unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    assert_eq!(curl(Some(order.clone()), "POST").await, "ok\n200");
    assert_eq!(curl(Some(order), "GET").await, "RBAC: access denied\n403");
    assert_eq!(
        curl(Some(inventory), "POST").await,
        "RBAC: access denied\n403"
    );
    assert_eq!(curl(None, "POST").await, "RBAC: access denied\n403");
}
