//! AuthorizationPolicy at the ingress gateway: policies that select the gateway's
//! workload by `selector`, or by `targetRefs` naming its Gateway API Gateway, judge each
//! request before it is routed; `remoteIpBlocks` reads the client from
//! `X-Forwarded-For` past `gatewayTopology.numTrustedProxies`.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use support::gateway::plain_gateway;
use support::*;

/// The status of `GET path` for `api.example.com` with `X-Forwarded-For: xff`.
async fn status(gw: SocketAddr, path: &str, xff: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = xff.map(|x| ("x-forwarded-for", x)).into_iter().collect();
    Client::new(gw)
        .request("GET", "api.example.com", path, &headers)
        .await
        .unwrap()
        .0
}

const DENY_RANGE: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: block-range, namespace: production}
spec:
  selector: {matchLabels: {istio: ingress}}
  action: DENY
  rules:
  - from:
    - source: {remoteIpBlocks: [203.0.113.0/24]}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_ip_blocks_read_the_client_behind_trusted_proxies() {
    let world = World::new();
    let backend = App::start(Behaviour::Ok("backend")).await;
    // One trusted proxy in front: the client is the last X-Forwarded-For entry it wrote.
    let (_gw, addr) = plain_gateway(
        &world,
        backend.addr,
        "",
        DENY_RANGE,
        "gatewayTopology: {numTrustedProxies: 1}\n",
    )
    .await;
    assert_eq!(status(addr, "/", Some("203.0.113.7")).await, 403);
    assert_eq!(
        status(addr, "/", Some("203.0.113.7, 198.51.100.1")).await,
        200
    );
    assert_eq!(
        status(addr, "/", Some("198.51.100.1, 203.0.113.7")).await,
        403
    );
    // No entry: the peer itself (loopback) is the client.
    assert_eq!(status(addr, "/", None).await, 200);
    assert_eq!(backend.hits(), 2);

    // Trusting no proxy, a client cannot name its address: the peer is the client.
    let world = World::new();
    let (_gw, addr) = plain_gateway(&world, backend.addr, "", DENY_RANGE, "").await;
    assert_eq!(status(addr, "/", Some("203.0.113.7")).await, 200);
    let not_range = DENY_RANGE.replace(
        "remoteIpBlocks: [203.0.113.0/24]",
        "notRemoteIpBlocks: [203.0.113.0/24]",
    );
    let world = World::new();
    let (_gw, addr) = plain_gateway(&world, backend.addr, "", &not_range, "").await;
    assert_eq!(status(addr, "/", None).await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_refs_bind_a_policy_to_the_gateway_they_name() {
    let policy = |target: &str| {
        format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: production}}
spec:
  targetRefs:
  - {target}
  action: DENY
  rules:
  - to:
    - operation: {{paths: [/admin]}}
"
        )
    };
    let backend = App::start(Behaviour::Ok("backend")).await;
    let cases = [
        (
            "{group: gateway.networking.k8s.io, kind: Gateway, name: edge}",
            403,
        ),
        (
            "{group: gateway.networking.k8s.io, kind: Gateway, name: other}",
            200,
        ),
        // Services are the waypoints' targets; a gateway ignores them.
        ("{group: '', kind: Service, name: backend}", 200),
    ];
    for (target, expected) in cases {
        let world = World::new();
        let (gw, addr) = plain_gateway(&world, backend.addr, "", &policy(target), "").await;
        assert_eq!(
            status(addr, "/admin", None).await,
            expected,
            "{target}\n{}",
            gw.output()
        );
        assert_eq!(status(addr, "/", None).await, 200, "{target}");
    }
}
