//! VirtualService delegation (ISTIO.md VS-86) through the real binary: a root
//! VirtualService's `delegate` routes replaced by the delegate's routes merged with the
//! root's match, on a gateway (with a delegate in another namespace and a missing one)
//! and on a sidecar; conflicting delegate routes dropped.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use support::*;

/// A plain ServiceEntry `host` in `namespace`, port 80, with one endpoint per `(app,
/// version)`.
fn entry(host: &str, namespace: &str, endpoints: &[(&App, &str)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(app, version)| {
            format!(
                "  - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{version: {version}}}}}\n",
                app.addr.port()
            )
        })
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host}, namespace: {namespace}}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
{eps}---
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_a_cross_namespace_delegate_within_the_root_match() {
    let world = World::new();
    let shop = App::start(Behaviour::Ok("shop")).await;
    let cart = App::start(Behaviour::Ok("cart")).await;
    let admin = App::start(Behaviour::Ok("admin")).await;
    let fallback = App::start(Behaviour::Ok("fallback")).await;
    let yaml = format!(
        "{shop_se}{cart_se}{admin_se}{fallback_se}apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: production}}
spec:
  selector: {{istio: ingress}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [api.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: production}}
spec:
  hosts: [api.example.com]
  gateways: [edge]
  http:
  - name: shop
    match: [{{uri: {{prefix: /shop}}}}]
    delegate: {{name: shop, namespace: team-shop}}
  - match: [{{uri: {{prefix: /gone}}}}]
    delegate: {{name: nothing}}
  - route: [{{destination: {{host: fallback}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: team-shop}}
spec:
  http:
  - name: cart
    match: [{{uri: {{prefix: /shop/cart}}}}]
    route: [{{destination: {{host: cart}}}}]
  # Not inside the root's /shop: dropped, it must not catch /admin.
  - match: [{{uri: {{prefix: /admin}}}}]
    route: [{{destination: {{host: admin}}}}]
  - route: [{{destination: {{host: shop}}}}]
",
        shop_se = entry("shop", "team-shop", &[(&shop, "v1")]),
        cart_se = entry("cart", "team-shop", &[(&cart, "v1")]),
        admin_se = entry("admin", "team-shop", &[(&admin, "v1")]),
        fallback_se = entry("fallback", "production", &[(&fallback, "v1")]),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let ports = Ports::new();
    let http = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: istio-ingressgateway, \
         labels: {{istio: ingress}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: edge\n  ports:\n    80: 127.0.0.1:{http}\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        admin = ports.admin,
    );
    let gw = Proxy::start(&world, "gateway", "gateway", &settings, ports).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    for (path, want) in [
        ("/shop/cart/42", "cart"),
        ("/shop/items", "shop"),
        ("/shop", "shop"),
        ("/admin", "fallback"),
        ("/gone/x", "fallback"),
        ("/other", "fallback"),
    ] {
        let (status, body) = send(addr, "GET", "api.example.com", path, &[])
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, want), "{path}");
    }
    assert_eq!(admin.hits(), 0);
    let out = gw.output();
    assert!(
        out.contains("delegate VirtualService production/nothing is not defined"),
        "{out}"
    );
    assert!(out.contains("mesh.yaml"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_merges_delegate_matches_with_the_root_and_drops_conflicts() {
    let world = World::new();
    let (v1, v2, v3) = (
        App::start(Behaviour::Ok("v1")).await,
        App::start(Behaviour::Ok("v2")).await,
        App::start(Behaviour::Ok("v3")).await,
    );
    let yaml = format!(
        "{se}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: production}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: production}}
spec:
  hosts: [reviews]
  http:
  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    delegate: {{name: reviews-jason}}
  - route: [{{destination: {{host: reviews, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews-jason, namespace: production}}
spec:
  http:
  - match: [{{uri: {{prefix: /ratings}}}}]
    route: [{{destination: {{host: reviews, subset: v3}}}}]
  # Conflicts with the root's end-user match: dropped.
  - match: [{{headers: {{end-user: {{exact: bob}}}}}}]
    route: [{{destination: {{host: reviews, subset: v3}}}}]
  - route: [{{destination: {{host: reviews, subset: v2}}}}]
",
        se = entry(
            "reviews",
            "production",
            &[(&v1, "v1"), (&v2, "v2"), (&v3, "v3")]
        ),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(&world, "productpage", &config, Ports::new(), nowhere).await;
    let client = Client::new(proxy.outbound());
    for (user, path, want) in [
        (Some("jason"), "/ratings/1", "v3"),
        (Some("jason"), "/reviews/1", "v2"),
        (Some("bob"), "/reviews/1", "v1"),
        (None, "/ratings/1", "v1"),
        (None, "/", "v1"),
    ] {
        let headers: Vec<(&str, &str)> = user.map(|u| ("end-user", u)).into_iter().collect();
        let (status, body) = client
            .request("GET", "reviews", path, &headers)
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, want), "{user:?} {path}");
    }
}
