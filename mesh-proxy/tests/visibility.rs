//! `exportTo` on a sidecar that reads its configuration from files (SR-30): a
//! VirtualService, DestinationRule or ServiceEntry that is not exported to the sidecar's
//! namespace does not apply to it, exactly as when the control plane leaves it out. A
//! DestinationRule with a `workloadSelector` applies only to the clients it selects
//! (DR-06). The workload's `Sidecar` resource sets `outboundTrafficPolicy` over the
//! proxy's setting, and a new configuration changes it without a restart.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use support::*;

/// The body `order-service` (namespace `production`) gets for `GET /` to `host`, with
/// `yaml` as its configuration; `None` when the request fails.
async fn answer(yaml: &str, host: &str) -> Option<String> {
    let world = World::new();
    let config = world.write_config("istio", "mesh.yaml", yaml);
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(&world, "order-service", &config, Ports::new(), nowhere).await;
    let client = Client::new(proxy.outbound());
    match client.request("GET", host, "/", &[]).await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

fn payment(v1: SocketAddr, v2: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: v2}}}}
",
        v1.port(),
        v2.port()
    )
}

/// A VirtualService of `namespace` sending every request for payment-service to
/// `subset`, with `export_to`, and the DestinationRule defining the subsets.
fn route(namespace: &str, subset: &str, export_to: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment-{subset}, namespace: {namespace}}}
spec:
  hosts: [payment-service.production.svc.cluster.local]
  exportTo: {export_to}
  http:
  - route:
    - destination: {{host: payment-service.production.svc.cluster.local, subset: {subset}}}
"
    )
}

fn subsets(namespace: &str, export_to: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment-service, namespace: {namespace}}}
spec:
  host: payment-service.production.svc.cluster.local
  exportTo: {export_to}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_services_and_destination_rules_not_exported_here_do_not_apply() {
    let (v1, v2) = (
        App::start(Behaviour::Ok("v1")).await,
        App::start(Behaviour::Ok("v2")).await,
    );
    let se = payment(v1.addr, v2.addr);
    let dr = subsets("production", "['*']");
    // Of two VirtualServices for one host the first loaded applies: `finance`'s, unless
    // it is not exported to `production`.
    let two = |export_to: &str| {
        format!(
            "{se}{dr}{}{}",
            route("finance", "v2", export_to),
            route("production", "v1", "['.']")
        )
    };
    assert_eq!(
        answer(&two("['.']"), "payment-service").await.as_deref(),
        Some("v1")
    );
    assert_eq!(
        answer(&two("[production]"), "payment-service")
            .await
            .as_deref(),
        Some("v2")
    );
    assert_eq!(
        answer(&two("['*']"), "payment-service").await.as_deref(),
        Some("v2")
    );
    // Subsets from a DestinationRule exported only to its own namespace are unknown to
    // `production`: the route's subset has no endpoints.
    let hidden = format!(
        "{se}{}{}",
        subsets("finance", "['.']"),
        route("production", "v1", "['*']")
    );
    assert_eq!(answer(&hidden, "payment-service").await, None);
    let shared = hidden.replace("exportTo: ['.']", "exportTo: [production]");
    assert_eq!(
        answer(&shared, "payment-service").await.as_deref(),
        Some("v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_entry_not_exported_here_is_not_a_known_host() {
    let ledger = App::start(Behaviour::Ok("ledger")).await;
    let entry = |export_to: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ledger, namespace: finance}}
spec:
  hosts: [ledger.internal]
  exportTo: {export_to}
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {}}}}}
",
            ledger.addr.port()
        )
    };
    assert_eq!(
        answer(&entry("[finance, production]"), "ledger.internal")
            .await
            .as_deref(),
        Some("ledger")
    );
    assert_eq!(answer(&entry("['.']"), "ledger.internal").await, None);
    assert_eq!(ledger.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_with_a_workload_selector_applies_to_the_clients_it_selects() {
    let (v1, v2) = (
        App::start(Behaviour::Ok("v1")).await,
        App::start(Behaviour::Ok("v2")).await,
    );
    // Both rules define subset `pick`; the selecting one makes it v2.
    let yaml = |selector: &str| {
        format!(
            "{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: everyone, namespace: production}}
spec:
  host: payment-service
  subsets:
  - {{name: pick, labels: {{version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: selected, namespace: production}}
spec:
  host: payment-service
  workloadSelector: {{matchLabels: {{app: {selector}}}}}
  subsets:
  - {{name: pick, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  http:
  - route:
    - destination: {{host: payment-service, subset: pick}}
",
            payment(v1.addr, v2.addr)
        )
    };
    assert_eq!(
        answer(&yaml("order-service"), "payment-service")
            .await
            .as_deref(),
        Some("v2")
    );
    assert_eq!(
        answer(&yaml("report-service"), "payment-service")
            .await
            .as_deref(),
        Some("v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_resource_sets_the_outbound_traffic_policy() {
    let world = World::new();
    let external = App::start(Behaviour::Ok("external")).await;
    let sidecar = |namespace: &str, mode: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default, namespace: {namespace}}}
spec:
  outboundTrafficPolicy: {{mode: {mode}}}
"
        )
    };
    let config = world.write_config(
        "istio",
        "mesh.yaml",
        &sidecar("production", "REGISTRY_ONLY"),
    );
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(&world, "order-service", &config, Ports::new(), nowhere).await;
    let client = Client::new(proxy.outbound());
    let host = external.addr.to_string();
    // The proxy's setting is ALLOW_ANY; its namespace's Sidecar says REGISTRY_ONLY.
    assert_eq!(client.request("GET", &host, "/", &[]).await.unwrap().0, 502);
    assert_eq!(external.hits(), 0);
    // A Sidecar of another namespace does not apply: the setting is back in force once
    // the configuration changes, with no restart.
    world.write_config("istio", "mesh.yaml", &sidecar("finance", "REGISTRY_ONLY"));
    let mut status = 0;
    for _ in 0..400 {
        status = client.request("GET", &host, "/", &[]).await.unwrap().0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(status, 200, "{}", proxy.output());
    assert_eq!(external.hits(), 1);
}
