//! `http[].match[].statPrefix` through the real binary: Envoy's per-route counters
//! (`vhost.<vh>.route.<statPrefix>.upstream_rq_*`) on the admin `/stats` text and as
//! `envoy_vhost_route_*` on `/stats/prometheus`, for blocks with a prefix only.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_prefix_blocks_count_upstream_requests_by_status() {
    let world = World::new();
    let ok = App::start(Behaviour::Ok("ok")).await;
    let failing = App::start(Behaviour::Status(500, "boom")).await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: production}}
spec:
  hosts: [reviews]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {ok}}}, labels: {{version: ok}}}}
  - {{address: 127.0.0.1, ports: {{http: {failing}}}, labels: {{version: failing}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: production}}
spec:
  host: reviews
  subsets:
  - {{name: ok, labels: {{version: ok}}}}
  - {{name: failing, labels: {{version: failing}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: production}}
spec:
  hosts: [reviews]
  http:
  - match: [{{uri: {{prefix: /ok}}, statPrefix: canary}}]
    route: [{{destination: {{host: reviews, subset: ok}}}}]
  - match: [{{uri: {{prefix: /fail}}, statPrefix: failing}}]
    route: [{{destination: {{host: reviews, subset: failing}}}}]
  - route: [{{destination: {{host: reviews, subset: ok}}}}]
",
        ok = ok.addr.port(),
        failing = failing.addr.port(),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(&world, "productpage", &config, Ports::new(), nowhere).await;
    let client = Client::new(proxy.outbound());
    for _ in 0..5 {
        let (status, _) = client.request("GET", "reviews", "/ok", &[]).await.unwrap();
        assert_eq!(status, 200);
    }
    for _ in 0..3 {
        let (status, _) = client
            .request("GET", "reviews", "/fail", &[])
            .await
            .unwrap();
        assert_eq!(status, 500);
    }
    for _ in 0..4 {
        let (status, _) = client
            .request("GET", "reviews", "/other", &[])
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(ok.hits(), 9);

    let text = proxy.admin("/stats").await;
    for line in [
        "vhost.production/reviews.route.canary.upstream_rq_total: 5",
        "vhost.production/reviews.route.canary.upstream_rq_2xx: 5",
        "vhost.production/reviews.route.canary.upstream_rq_200: 5",
        "vhost.production/reviews.route.failing.upstream_rq_total: 3",
        "vhost.production/reviews.route.failing.upstream_rq_5xx: 3",
        "vhost.production/reviews.route.failing.upstream_rq_500: 3",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\n{text}");
    }
    assert!(
        !text.contains("route.canary.upstream_rq_5xx"),
        "only what was seen\n{text}"
    );

    let prom = proxy.admin("/stats/prometheus").await;
    let tags = |route: &'static str| {
        [
            ("envoy_virtual_host", "production/reviews"),
            ("envoy_route", route),
        ]
    };
    assert_eq!(
        series_value(
            &prom,
            "envoy_vhost_route_upstream_rq_total",
            &tags("canary")
        ),
        Some(5.0),
        "{prom}"
    );
    let [vh, route] = tags("failing");
    assert_eq!(
        series_value(
            &prom,
            "envoy_vhost_route_upstream_rq",
            &[vh, route, ("envoy_response_code", "500")]
        ),
        Some(3.0),
        "{prom}"
    );
    assert_eq!(
        series_value(
            &prom,
            "envoy_vhost_route_upstream_rq",
            &[vh, route, ("envoy_response_code_class", "5")]
        ),
        Some(3.0),
        "{prom}"
    );
    assert_eq!(
        series_value(
            &prom,
            "envoy_vhost_route_upstream_rq_time_count",
            &tags("canary")
        ),
        Some(5.0),
        "{prom}"
    );
    let [vh, route] = tags("canary");
    assert_eq!(
        series_value(
            &prom,
            "envoy_vhost_route_upstream_rq_time_bucket",
            &[vh, route, ("le", "+Inf")]
        ),
        Some(5.0),
        "{prom}"
    );
    // The route without a statPrefix keeps no per-route statistics.
    assert_eq!(
        prom.matches("envoy_vhost_route_upstream_rq_total{").count(),
        2
    );

    // The whole page, Istio's families and these together, parses as Prometheus text.
    if tool_available("promtool") {
        promtool_parses(&prom).await;
    }
}

/// Runs `promtool check metrics` on `text`: it must parse. promtool's naming lints are
/// findings too; the ones Envoy's and Istio's own expositions get are allowed (a counter
/// without `_total`, a unit other than seconds, Envoy's families without `# HELP`), any
/// other line fails.
async fn promtool_parses(text: &str) {
    let page = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(page.path(), text).unwrap();
    let out = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(page.path()).unwrap())
        .output()
        .await
        .unwrap();
    let report =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !(l.contains("counter metrics should have \"_total\" suffix")
                || l.contains("use base unit \"seconds\"")
                || (l.starts_with("envoy_") && l.ends_with(" no help text")))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "promtool check metrics:\n{report}\n---\n{text}"
    );
}
