//! The MeshConfig snapshot: host qualification, lookups by host, namespace and workload
//! labels, "oldest wins" ordering, replacement of duplicates and content versions.

use mesh_core::config::*;

fn load(yaml: &str) -> (MeshConfig, LoadReport) {
    MeshConfig::from_yaml_str("mesh.yaml", yaml, &LoadOptions::default()).unwrap_or_else(|e| {
        panic!(
            "{}",
            e.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn dr(name: &str, ns: &str, host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  host: \"{host}\"\n  subsets:\n  - name: {name}\n    labels: {{rule: {name}}}\n---\n"
    )
}

#[test]
fn short_hosts_are_qualified_with_the_resource_namespace() {
    assert_eq!(
        qualify_host("order-service", "production"),
        "order-service.production.svc.cluster.local"
    );
    assert_eq!(
        qualify_host("reviews.prod.svc.cluster.local", "default"),
        "reviews.prod.svc.cluster.local"
    );
    assert_eq!(qualify_host("*.example.com", "default"), "*.example.com");
    assert_eq!(qualify_host("10.0.0.1", "default"), "10.0.0.1");
    assert_eq!(qualify_host("::1", "default"), "::1");
    let (config, _) = load(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: orders, namespace: production}
spec:
  hosts: [order-service]
  http:
  - route:
    - destination: {host: order-service}
",
    );
    assert_eq!(
        config
            .virtual_services_for_host("order-service.production.svc.cluster.local")
            .len(),
        1
    );
    assert!(
        config
            .virtual_services_for_host("order-service.default.svc.cluster.local")
            .is_empty()
    );
}

#[test]
fn default_namespace_comes_from_the_load_options() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default}\nspec: {mtls: {mode: STRICT}}\n";
    let options = LoadOptions {
        default_namespace: "payments".to_owned(),
        ..LoadOptions::default()
    };
    let (config, _) = MeshConfig::from_yaml_str("pa.yaml", yaml, &options).unwrap();
    assert_eq!(config.peer_authentications()[0].namespace(), "payments");
}

#[test]
fn destination_rule_lookup_prefers_client_namespace_then_host_namespace_then_root() {
    let yaml = [
        dr("in-root", "istio-system", "reviews.prod.svc.cluster.local"),
        dr("in-host-ns", "prod", "reviews"),
        dr("in-client-ns", "web", "reviews.prod.svc.cluster.local"),
        dr("wildcard", "prod", "*.prod.svc.cluster.local"),
    ]
    .concat();
    let (config, _) = load(&yaml);
    let host = "reviews.prod.svc.cluster.local";
    assert_eq!(
        config.destination_rule_for(host, "web").unwrap().name(),
        "in-client-ns"
    );
    assert_eq!(
        config.destination_rule_for(host, "other").unwrap().name(),
        "in-host-ns"
    );
    assert_eq!(
        config.destination_rule_for(host, "prod").unwrap().name(),
        "in-host-ns"
    );
    // Only the wildcard covers other hosts of the namespace.
    assert_eq!(
        config
            .destination_rule_for("ratings.prod.svc.cluster.local", "web")
            .unwrap()
            .name(),
        "wildcard"
    );
    assert!(
        config
            .destination_rule_for("ratings.other.svc.cluster.local", "web")
            .is_none()
    );
    assert_eq!(
        config.subset(host, "web", "in-client-ns").unwrap().labels,
        labels(&[("rule", "in-client-ns")])
    );
    assert!(
        config.subset(host, "web", "in-host-ns").is_none(),
        "subsets come from the chosen rule only"
    );
    assert_eq!(config.destination_rules_in("prod").len(), 2);
}

#[test]
fn virtual_services_for_host_list_exact_before_wildcards_most_specific_first() {
    let vs = |name: &str, host: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [\"{host}\"]\n  gateways: [edge]\n  http:\n  - route:\n    - destination: {{host: backend}}\n---\n"
        )
    };
    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge}\nspec:\n  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n";
    let yaml = [
        vs("any", "*"),
        vs("example", "*.example.com"),
        vs("api", "api.example.com"),
        vs("deep", "*.api.example.com"),
        gw.to_owned(),
    ]
    .concat();
    let (config, report) = load(&yaml);
    assert_eq!(report.warnings().count(), 0, "{:?}", report.diagnostics);
    let names = |host: &str| -> Vec<String> {
        config
            .virtual_services_for_host(host)
            .iter()
            .map(|v| v.name().to_owned())
            .collect()
    };
    assert_eq!(names("api.example.com"), ["api", "example", "any"]);
    assert_eq!(names("v1.api.example.com"), ["deep", "example", "any"]);
    assert_eq!(
        names("example.com"),
        ["any"],
        "*.example.com does not cover example.com"
    );
    assert_eq!(
        config.virtual_services_for_gateway("default", "edge").len(),
        4
    );
    assert!(
        config
            .virtual_services_for_gateway("other", "edge")
            .is_empty()
    );
}

#[test]
fn peer_authentications_are_ordered_oldest_first_with_load_order_as_tiebreak() {
    let pa = |name: &str, ts: Option<&str>| {
        let ts = ts
            .map(|t| format!("\n  creationTimestamp: \"{t}\""))
            .unwrap_or_default();
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: prod{ts}\nspec:\n  mtls: {{mode: STRICT}}\n---\n"
        )
    };
    let yaml = [
        pa("no-time-1", None),
        pa("newer", Some("2024-06-01T00:00:00Z")),
        pa("older", Some("2023-01-01T00:00:00Z")),
        pa("no-time-2", None),
        pa("older-twin", Some("2023-01-01T00:00:00Z")),
        // 2022-12-31T23:00:00Z: older than all, although its text sorts later.
        pa("oldest-by-offset", Some("2023-01-01T02:00:00+03:00")),
        pa("fraction-later", Some("2023-01-01T00:00:00.5Z")),
    ]
    .concat();
    let (config, report) = load(&yaml);
    let order: Vec<&str> = config
        .peer_authentications()
        .iter()
        .map(|p| p.name())
        .collect();
    assert_eq!(
        order,
        [
            "oldest-by-offset",
            "older",
            "older-twin",
            "fraction-later",
            "newer",
            "no-time-1",
            "no-time-2"
        ]
    );
    // Six of the seven namespace-wide policies are ignored, and each says so.
    let ignored: Vec<&str> = report
        .warnings()
        .filter(|w| {
            w.message
                .contains("only the oldest (PeerAuthentication/prod/oldest-by-offset) applies")
        })
        .map(|w| w.resource.as_deref().unwrap())
        .collect();
    assert_eq!(ignored.len(), 6, "{ignored:?}");
    assert_eq!(
        config
            .peer_authentications_for("prod", &Labels::new())
            .len(),
        7
    );
}

#[test]
fn peer_authentication_scope_follows_namespace_and_selector() {
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ignored-root-selector, namespace: istio-system}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: data}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: PERMISSIVE}
";
    let (config, _) = load(yaml);
    let names = |ns: &str, l: &Labels| -> Vec<String> {
        config
            .peer_authentications_for(ns, l)
            .iter()
            .map(|p| p.name().to_owned())
            .collect()
    };
    assert_eq!(names("data", &labels(&[("app", "db")])), ["mesh", "db"]);
    assert_eq!(names("data", &labels(&[("app", "web")])), ["mesh"]);
    assert_eq!(names("web", &labels(&[("app", "db")])), ["mesh"]);
}

#[test]
fn authorization_policies_include_root_namespace_policies() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: [/debug]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-selects-db, namespace: istio-system}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-allow, namespace: shop}
spec:
  rules: [{from: [{source: {namespaces: [shop]}}]}]
";
    let (config, _) = load(yaml);
    let names = |ns: &str, l: &Labels| -> Vec<String> {
        config
            .authorization_policies_for(ns, l)
            .iter()
            .map(|p| p.name().to_owned())
            .collect()
    };
    assert_eq!(
        names("shop", &labels(&[("app", "web")])),
        ["ns-allow", "mesh-deny"]
    );
    assert_eq!(
        names("data", &labels(&[("app", "db")])),
        ["mesh-deny", "root-selects-db"]
    );
    assert_eq!(config.root_namespace(), "istio-system");
}

#[test]
fn a_later_definition_of_the_same_resource_replaces_the_earlier_one() {
    let yaml = [
        dr("reviews", "prod", "reviews"),
        dr("reviews", "prod", "reviews.other.svc.cluster.local"),
    ]
    .concat();
    let (config, report) = load(&yaml);
    assert_eq!(config.destination_rules().len(), 1);
    assert_eq!(
        config.destination_rules()[0].spec.host,
        "reviews.other.svc.cluster.local"
    );
    let w = report.warnings().next().unwrap();
    assert_eq!(w.document, Some(2));
    assert_eq!(w.line_column(), Some((15, 3)));
    assert!(
        w.message
            .contains("replaces the one in mesh.yaml document 1"),
        "{w}"
    );
}

#[test]
fn content_version_changes_with_the_content_and_only_then() {
    let a = dr("reviews", "prod", "reviews");
    let b = dr("reviews", "prod", "ratings");
    let (c1, _) = load(&a);
    let (c2, _) = load(&a);
    let (c3, _) = load(&b);
    assert_eq!(c1.version(), c2.version());
    assert_ne!(c1.version(), c3.version());
}

#[test]
fn every_kind_loads_under_every_api_version_istio_serves_and_no_other() {
    for kind in Kind::ALL {
        for api_version in kind.api_versions() {
            let yaml = format!("apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: x}}\n");
            let report = load_str("k.yaml", &yaml, &LoadOptions::default());
            assert_eq!(report.resources.len(), 1, "{kind} {api_version}");
            assert_eq!(report.resources[0].kind(), kind);
            assert_eq!(report.resources[0].api_version(), *api_version);
        }
        let wrong = if kind.api_versions()[0].starts_with("security") {
            "networking.istio.io/v1"
        } else {
            "security.istio.io/v1"
        };
        let yaml = format!("apiVersion: {wrong}\nkind: {kind}\nmetadata: {{name: x}}\n");
        let report = load_str("k.yaml", &yaml, &LoadOptions::default());
        assert!(
            report.resources.is_empty() && report.has_errors(),
            "{kind} under {wrong}"
        );
    }
}

#[test]
fn other_istio_kinds_and_other_gateway_api_kinds_are_skipped_with_a_diagnostic() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: EnvoyFilter
metadata: {name: default}
spec: {configPatches: []}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: k8s-route}
spec: {parentRefs: [{name: edge}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: b}
";
    let report = load_str("mixed.yaml", yaml, &LoadOptions::default());
    assert!(report.resources.is_empty());
    let d: Vec<String> = report.diagnostics.iter().map(ToString::to_string).collect();
    assert_eq!(
        d,
        [
            "mixed.yaml:2:7: warning: document 1: skipped EnvoyFilter networking.istio.io/v1 default: this Istio kind is not supported and has no effect",
            "mixed.yaml:7:7: warning: document 2: skipped TCPRoute gateway.networking.k8s.io/v1alpha2 k8s-route: this Gateway API kind is not supported and has no effect",
            "mixed.yaml:12:7: note: document 3: skipped ConfigMap v1 settings: not an Istio resource",
        ]
    );
}

#[test]
fn kubernetes_metadata_and_status_are_tolerated() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: prod
  uid: 0b9b3c1e-1111-2222-3333-444455556666
  resourceVersion: \"981\"
  generation: 2
  creationTimestamp: \"2024-02-03T04:05:06Z\"
  managedFields: [{manager: kubectl, operation: Update}]
  ownerReferences: []
  finalizers: []
spec:
  host: reviews
status:
  observedGeneration: 2
";
    let (config, report) = load(yaml);
    assert_eq!(report.diagnostics.len(), 0);
    assert_eq!(
        config.destination_rules()[0]
            .metadata
            .creation_timestamp
            .as_deref(),
        Some("2024-02-03T04:05:06Z")
    );
}

#[test]
fn checks_outside_the_loader_can_report_located_errors() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: prod}
spec:
  hosts: [r]
  http:
  - timeout: 30s
    route:
    - destination: {host: r}
";
    let report = load_str("vs.yaml", yaml, &LoadOptions::default());
    assert_eq!(report.location_of(0, "spec.http[0].timeout"), Some((7, 14)));
    let e = report
        .error_at(
            0,
            "spec.http[0].retries",
            "example: retries are required here",
        )
        .unwrap();
    assert_eq!(
        e.to_string(),
        "vs.yaml:7:5: error: document 1, VirtualService/prod/r, spec.http[0].retries: example: retries are required here"
    );
    assert!(report.error_at(1, "spec", "no such resource").is_none());
}

#[test]
fn a_kubernetes_configmap_mount_loads_each_file_once() {
    // kubelet's layout: files are symlinks through `..data` to a timestamped directory.
    let root = std::env::temp_dir().join(format!("mesh-config-mount-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let stamped = root.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&stamped).unwrap();
    std::fs::write(
        stamped.join("peer-authentication.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.000000001", root.join("..data")).unwrap();
    std::os::unix::fs::symlink(
        "..data/peer-authentication.yaml",
        root.join("peer-authentication.yaml"),
    )
    .unwrap();

    let report = load_paths(&[&root], &LoadOptions::default());
    assert!(report.diagnostics.is_empty(), "{:?}", report.diagnostics);
    assert_eq!(report.resources.len(), 1);
    assert!(
        report.resources[0]
            .origin()
            .file
            .ends_with("peer-authentication.yaml")
    );
    std::fs::remove_dir_all(&root).unwrap();
}
