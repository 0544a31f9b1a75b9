//! Compiling AuthorizationPolicies from a loaded configuration for one workload, and
//! enforcing them through the layer.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_core::{ConnectionInfo, ConnectionSecurity, Identity, PeerIdentity};
use mesh_tls::authz::{Action, AuthzDecision, AuthzLayer, Policy, PolicySet};
use tower::{ServiceBuilder, ServiceExt};

const YAML: &str = r#"
# The article's policy.
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: payment-service-authz
  namespace: production
spec:
  selector:
    matchLabels:
      app: payment-service
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/production/sa/order-service"]
    to:
    - operation:
        methods: ["POST"]
        paths: ["/api/v1/payments", "/api/v1/payments/*"]
---
# Mesh-wide: nobody reaches /debug.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-debug
  namespace: istio-system
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/debug/{**}"]
---
# Dry-run: would deny the inventory service.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-inventory
  namespace: production
  annotations:
    istio.io/dry-run: "true"
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["*/sa/inventory-service"]
---
# Audit every payment call.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-payments
  namespace: production
spec:
  action: AUDIT
  rules:
  - to:
    - operation:
        paths: ["/api/v1/payments*"]
---
# Another workload's policy: not applied to payment-service.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: orders-open
  namespace: production
spec:
  selector:
    matchLabels:
      app: order-service
  rules:
  - {}
---
# Another namespace: not applied.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: staging-open
  namespace: staging
spec:
  rules:
  - {}
"#;

fn payment_labels() -> BTreeMap<String, String> {
    [("app".to_owned(), "payment-service".to_owned())].into()
}

fn load() -> MeshConfig {
    MeshConfig::from_yaml_str("policies.yaml", YAML, &LoadOptions::default())
        .unwrap()
        .0
}

async fn call(
    set: PolicySet,
    method: &str,
    path: &str,
    sa: Option<&str>,
) -> (StatusCode, AuthzDecision) {
    let svc = ServiceBuilder::new()
        .layer(AuthzLayer::new(set))
        .service_fn(|_req: Request<Empty<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        });
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "payment")
        .body(Empty::new())
        .unwrap();
    if let Some(sa) = sa {
        let id = Identity::from_istio("cluster.local", "production", sa).unwrap();
        req.extensions_mut().insert(PeerIdentity(id));
    }
    req.extensions_mut().insert(ConnectionInfo {
        remote: "10.0.0.1:5000".parse().unwrap(),
        local: "10.0.0.2:8080".parse().unwrap(),
        security: if sa.is_some() {
            ConnectionSecurity::MutualTls
        } else {
            ConnectionSecurity::None
        },
    });
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let decision = res
        .extensions()
        .get::<AuthzDecision>()
        .cloned()
        .expect("decision on the response");
    let _ = res.into_body().collect().await.unwrap();
    (status, decision)
}

#[test]
fn the_article_policy_converts_field_for_field() {
    let config = load();
    let article = config
        .authorization_policies()
        .iter()
        .find(|p| p.metadata.name == "payment-service-authz")
        .unwrap();
    let policy = Policy::try_from(article).unwrap();
    assert_eq!(policy.action, Action::Allow);
    assert_eq!(policy.selector, Some(payment_labels()));
    let rules = policy.rules.unwrap();
    let from = rules[0].from.as_ref().unwrap();
    assert_eq!(
        from[0].principals,
        ["cluster.local/ns/production/sa/order-service"]
    );
    let to = rules[0].to.as_ref().unwrap();
    assert_eq!(to[0].methods, ["POST"]);
    assert_eq!(to[0].paths, ["/api/v1/payments", "/api/v1/payments/*"]);
}

#[test]
fn only_the_workloads_policies_are_compiled() {
    let config = load();
    let set = PolicySet::from_config(&config, "production", &payment_labels()).unwrap();
    // article ALLOW + mesh-wide DENY + AUDIT; the dry-run one is not enforced.
    assert_eq!(set.len(), 3);
    let orders = PolicySet::from_config(
        &config,
        "production",
        &[("app".to_owned(), "order-service".to_owned())].into(),
    )
    .unwrap();
    assert_eq!(orders.len(), 3, "orders-open + deny-debug + audit-payments");
}

#[tokio::test]
async fn config_policies_decide_through_the_layer() {
    let config = load();
    let set = || PolicySet::from_config(&config, "production", &payment_labels()).unwrap();

    let (status, d) = call(set(), "POST", "/api/v1/payments/7", Some("order-service")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&*d.policy.unwrap().name, "production/payment-service-authz");
    assert_eq!(&*d.audit.unwrap().name, "production/audit-payments");
    assert!(d.dry_run.unwrap().allowed);

    let (status, d) = call(set(), "POST", "/debug/pprof/heap", Some("order-service")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(&*d.policy.unwrap().name, "istio-system/deny-debug");

    let (status, d) = call(set(), "POST", "/api/v1/payments", Some("inventory-service")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(d.policy, None, "denied for want of a matching ALLOW");
    let shadow = d.dry_run.unwrap();
    assert!(!shadow.allowed);
    assert_eq!(&*shadow.policy.unwrap().name, "production/deny-inventory");

    let (status, _) = call(set(), "POST", "/api/v1/payments", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[test]
fn custom_policies_in_config_are_refused() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: production}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
"#;
    // Whether the loader or the compiler refuses it, it never becomes enforceable.
    match MeshConfig::from_yaml_str("custom.yaml", yaml, &LoadOptions::default()) {
        Err(errors) => assert!(!errors.is_empty()),
        Ok((config, _)) => {
            let err = PolicySet::from_config(&config, "production", &BTreeMap::new()).unwrap_err();
            assert!(err.to_string().contains("CUSTOM"), "{err}");
        }
    }
}
