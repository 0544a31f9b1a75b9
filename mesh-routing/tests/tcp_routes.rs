//! VirtualService `tcp` routes and the services' own TCP ports, compiled for a sidecar:
//! which destination a connection to `host:port` takes.

#![allow(clippy::unwrap_used)]

mod support;

use mesh_routing::table::DestinationKey;
use rand::SeedableRng;
use support::{chi_square, config, routing};

const MESH: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: redis, namespace: default}
spec:
  hosts: [redis.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 6379, name: tcp-redis, protocol: TCP}
  - {number: 9121, name: http-metrics, protocol: HTTP}
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 5432, name: postgres, protocol: TCP}
  - {number: 8080, name: web, protocol: HTTP}
  endpoints:
  - {address: 10.0.1.1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: redis, namespace: default}
spec:
  host: redis
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: redis, namespace: default}
spec:
  hosts: [redis]
  tcp:
  - match: [{port: 6379}]
    route:
    - {destination: {host: redis, subset: v1}, weight: 80}
    - {destination: {host: redis, subset: v2}, weight: 20}
";

fn key(host: &str, subset: Option<&str>, port: Option<u16>) -> DestinationKey {
    DestinationKey::new(host, subset, port)
}

#[test]
fn tcp_routes_split_by_weight_and_services_keep_their_tcp_ports() {
    let routing = routing(&config(MESH));
    let table = &routing.table;
    let redis = "redis.default.svc.cluster.local";

    // The VirtualService's weights, measured.
    let rule = table.tcp_rule(redis, 6379).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut counts = [0usize; 2];
    for _ in 0..10_000 {
        let dest = &table.destinations()[*rule.destinations.pick(&mut rng)];
        let i = usize::from(dest.subset.as_deref() == Some("v2"));
        counts[i] += 1;
    }
    assert!(chi_square(&counts, &[0.8, 0.2]) < 10.83, "{counts:?}");
    // Short names and the FQDN alike.
    assert!(table.tcp_rule("redis", 6379).is_some());
    // No rule for the HTTP port.
    assert!(table.tcp_rule(redis, 9121).is_none());

    // A service without a VirtualService: its TCP port goes to
    // the service on that port; its HTTP port takes no TCP rule.
    let db = "db.default.svc.cluster.local";
    let rule = table.tcp_rule(db, 5432).unwrap();
    assert_eq!(
        table.destinations()[*rule.destinations.pick(&mut rng)],
        key(db, None, Some(5432))
    );
    assert!(table.tcp_rule(db, 8080).is_none());
    assert!(table.tcp_rule("unknown.example.com", 5432).is_none());
}

#[test]
fn a_virtual_service_without_tcp_routes_leaves_the_service_its_tcp_port() {
    let yaml = MESH.replace(
        "  tcp:\n  - match: [{port: 6379}]\n    route:\n    - {destination: {host: redis, subset: v1}, weight: 80}\n    - {destination: {host: redis, subset: v2}, weight: 20}\n",
        "  http:\n  - route:\n    - destination: {host: redis, subset: v1}\n",
    );
    let routing = routing(&config(&yaml));
    let redis = "redis.default.svc.cluster.local";
    let rule = routing.table.tcp_rule(redis, 6379).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    assert_eq!(
        routing.table.destinations()[*rule.destinations.pick(&mut rng)],
        key(redis, None, Some(6379))
    );
}

#[test]
fn tls_routes_at_a_gateway_match_sni_and_port() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: default}
spec:
  selector: {istio: ingress}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    tls: {mode: PASSTHROUGH}
    hosts: ['*.example.com']
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: default}
spec:
  hosts: ['*.example.com']
  gateways: [edge]
  tls:
  - match:
    - {port: 443, sniHosts: [a.example.com]}
    route:
    - destination: {host: a, port: {number: 8443}}
  - match:
    - {port: 443, sniHosts: ['*.example.com']}
    route:
    - destination: {host: rest, port: {number: 8443}}
";
    let options = mesh_routing::CompileOptions::gateway("default", "edge");
    let routing = mesh_routing::Routing::compile(&config(yaml), &options).unwrap();
    let table = &routing.table;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut to = |sni: &str, port: u16| {
        table.tls_rule(sni, port).map(|rule| {
            table.destinations()[*rule.destinations.pick(&mut rng)]
                .host
                .to_string()
        })
    };
    assert_eq!(
        to("a.example.com", 443).as_deref(),
        Some("a.default.svc.cluster.local")
    );
    assert_eq!(
        to("A.EXAMPLE.COM", 443).as_deref(),
        Some("a.default.svc.cluster.local")
    );
    assert_eq!(
        to("b.example.com", 443).as_deref(),
        Some("rest.default.svc.cluster.local")
    );
    assert_eq!(to("a.example.com", 8443), None);
    assert_eq!(to("example.com", 443), None);
    assert_eq!(to("other.org", 443), None);
}
