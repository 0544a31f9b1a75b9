//! `Sidecar` and `WorkloadEntry`: loaded from files, validated with located diagnostics,
//! indexed by [`MeshConfig`].

use mesh_core::config::*;

fn load(yaml: &str) -> LoadReport {
    load_str("scope.yaml", yaml, &LoadOptions::default())
}

fn config(yaml: &str) -> MeshConfig {
    MeshConfig::from_yaml_str("scope.yaml", yaml, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e:#?}"))
        .0
}

const SIDECARS: &str = "\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress:
  - hosts: [\"./*\"]
---
apiVersion: networking.istio.io/v1beta1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  egress:
  - hosts: [\"./*\", \"istio-system/*\"]
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {name: reviews, namespace: shop}
spec:
  workloadSelector:
    labels: {app: reviews}
  egress:
  - hosts: [\"*/*\"]
";

fn labels(app: &str) -> Labels {
    Labels::from([("app".to_owned(), app.to_owned())])
}

#[test]
fn sidecars_load_from_files_and_the_most_specific_applies() {
    let report = load(SIDECARS);
    assert!(!report.has_errors(), "{:#?}", report.diagnostics);
    assert!(
        !report.warnings().any(|w| w.message.contains("skipped")),
        "{:#?}",
        report.diagnostics
    );
    let c = config(SIDECARS);
    assert_eq!(c.sidecars().len(), 3);
    let pick = |ns: &str, app: &str| {
        c.sidecar_for(ns, &labels(app), "istio-system")
            .map(|s| format!("{}/{}", s.namespace(), s.name()))
    };
    assert_eq!(pick("shop", "reviews").as_deref(), Some("shop/reviews"));
    assert_eq!(pick("shop", "ratings").as_deref(), Some("shop/default"));
    assert_eq!(
        pick("bank", "reviews").as_deref(),
        Some("istio-system/default")
    );
    let ns_default = c
        .sidecar_for("shop", &labels("ratings"), "istio-system")
        .unwrap();
    assert!(ns_default.imports("shop", "shop", "ratings.shop.svc.cluster.local"));
    assert!(ns_default.imports(
        "shop",
        "istio-system",
        "istiod.istio-system.svc.cluster.local"
    ));
    assert!(!ns_default.imports("shop", "bank", "ledger.bank.svc.cluster.local"));
    // The root namespace's default imports `./*` from each workload's own namespace.
    let mesh_default = c
        .sidecar_for("bank", &labels("teller"), "istio-system")
        .unwrap();
    assert!(mesh_default.imports("bank", "bank", "ledger.bank.svc.cluster.local"));
    assert!(!mesh_default.imports("bank", "shop", "ratings.shop.svc.cluster.local"));
    // The dump loads back with the same Sidecars.
    let again = config(&c.to_yaml().unwrap());
    assert_eq!(again.sidecars(), c.sidecars());
}

#[test]
fn egress_hosts_are_namespace_slash_dns_name_with_located_errors() {
    let bad = SIDECARS.replace(
        "[\"*/*\"]",
        "[\"reviews.shop.svc.cluster.local\", \"Shop/*\", \"*/bad_host\"]",
    );
    let report = load(&bad);
    let errors: Vec<String> = report.errors().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with(
            "scope.yaml:22:13: error: document 3, Sidecar/shop/reviews, spec.egress[0].hosts[0]: \
             `reviews.shop.svc.cluster.local` is not `namespace/dnsName`"
        ),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("spec.egress[0].hosts[1]: `Shop` is not a namespace"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("spec.egress[0].hosts[2]: `bad_host` is not a valid host"),
        "{}",
        errors[2]
    );
}

#[test]
fn sidecar_rules_follow_istio() {
    let yaml = "\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: s, namespace: shop}
spec:
  workloadSelector: {labels: {}}
  egress:
  - hosts: [\"./*\"]
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: []
  - port: {number: 80, name: http2, protocol: HTTP}
    hosts: [\"./*\"]
  ingress:
  - defaultEndpoint: 10.0.0.1:80
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
    egressProxy: {host: egress.example.com}
";
    let report = load(yaml);
    let errors: Vec<(String, String)> = report
        .errors()
        .map(|d| (d.path.clone().unwrap_or_default(), d.message.clone()))
        .collect();
    let has = |path: &str, start: &str| {
        errors
            .iter()
            .any(|(p, m)| p == path && m.starts_with(start))
    };
    assert!(
        has("spec.workloadSelector", "workloadSelector needs labels"),
        "{errors:#?}"
    );
    assert!(
        has("spec.egress[1]", "an egress listener needs hosts"),
        "{errors:#?}"
    );
    assert!(
        has(
            "spec.egress[2].port.number",
            "port 80 is used by another egress listener"
        ),
        "{errors:#?}"
    );
    assert!(
        has("spec.egress[0]", "the egress listener without a port"),
        "{errors:#?}"
    );
    assert!(
        has("spec.ingress[0]", "an ingress listener needs a port"),
        "{errors:#?}"
    );
    assert!(
        has(
            "spec.ingress[0].defaultEndpoint",
            "`10.0.0.1:80` is not a default endpoint"
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            "spec.outboundTrafficPolicy.egressProxy",
            "egressProxy is only allowed with mode ALLOW_ANY"
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            "spec.outboundTrafficPolicy.egressProxy",
            "egressProxy needs a port"
        ),
        "{errors:#?}"
    );
    // Unenforced fields load with a warning where they are written.
    assert!(report.warnings().any(|w| {
        w.path.as_deref() == Some("spec.outboundTrafficPolicy.egressProxy")
            && w.message
                .starts_with("`egressProxy` is parsed but not enforced")
    }));
}

#[test]
fn two_namespace_sidecars_without_selector_warn_and_the_oldest_applies() {
    let yaml = format!(
        "{SIDECARS}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\n\
         metadata: {{name: other, namespace: shop}}\nspec:\n  egress:\n  - hosts: [\"*/*\"]\n"
    );
    let report = load(&yaml);
    let w: Vec<String> = report.warnings().map(ToString::to_string).collect();
    assert!(
        w.iter().any(|w| w.starts_with("scope.yaml:26:")
            && w.contains("Sidecar/shop/other, metadata.name: namespace shop has several Sidecars without workloadSelector")
            && w.contains("only the oldest (Sidecar/shop/default) applies")),
        "{w:#?}"
    );
    let c = config(&yaml);
    let s = c
        .sidecar_for("shop", &labels("ratings"), "istio-system")
        .unwrap();
    assert_eq!(s.name(), "default");
}

const ENTRIES: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: shop}
spec:
  hosts: [vms.shop.internal]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  resolution: STATIC
  workloadSelector:
    labels: {app: vms}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: shop}
spec:
  address: 10.0.0.2
  labels: {app: vms, version: v2}
  serviceAccount: vms
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop}
spec:
  address: 10.0.0.1
  ports: {http: 8080}
  labels: {app: vms, version: v1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-app, namespace: shop}
spec:
  address: 10.0.0.3
  labels: {app: db}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-elsewhere, namespace: bank}
spec:
  address: 10.0.0.4
  labels: {app: vms}
";

#[test]
fn service_entries_select_workload_entries_of_their_namespace_by_labels() {
    let report = load(ENTRIES);
    assert!(!report.has_errors(), "{:#?}", report.diagnostics);
    let c = config(ENTRIES);
    assert_eq!(c.workload_entries().len(), 4);
    let se = c.service_entries_for_host("vms.shop.internal")[0];
    let addresses: Vec<&str> = se
        .spec
        .endpoints
        .iter()
        .map(|e| e.address.as_deref().unwrap())
        .collect();
    assert_eq!(addresses, ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(se.spec.endpoints[0].ports["http"], 8080);
    assert_eq!(se.spec.endpoints[1].service_account.as_deref(), Some("vms"));
    // The dump writes the entry as written and loads back to the same snapshot.
    let dump = c.to_yaml().unwrap();
    let again = config(&dump);
    assert_eq!(again.service_entries(), c.service_entries());
    assert_eq!(again.workload_entries().len(), 4);
    // The resources as written: the entry without the selected endpoints.
    let written = c.resources();
    assert_eq!(written.len(), 5);
    let se = written
        .iter()
        .find_map(|r| match r {
            AnyResource::ServiceEntry(se) => Some(se),
            _ => None,
        })
        .unwrap();
    assert!(se.spec.endpoints.is_empty());
    let rebuilt = MeshConfig::from_resources(written, &LoadOptions::default());
    assert_eq!(rebuilt.service_entries(), c.service_entries());
}

#[test]
fn an_empty_selector_selects_no_workload_entry() {
    let yaml = ENTRIES.replace("labels: {app: vms}\n---", "labels: {}\n---");
    assert_ne!(yaml, ENTRIES);
    let c = config(&yaml);
    let se = c.service_entries_for_host("vms.shop.internal")[0];
    assert!(se.spec.endpoints.is_empty());
}

#[test]
fn workload_entry_rules_follow_istio() {
    let yaml = "\
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: shop}
spec:
  address: not_an_address
  ports: {http: 70000}
  serviceAccount: spiffe://cluster.local/ns/shop/sa/vm
";
    let errors: Vec<String> = load(yaml).errors().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "scope.yaml:5:12: error: document 1, WorkloadEntry/shop/vm, spec.address: \
             `not_an_address` is not an IP address, a DNS name or a unix:// socket",
            "scope.yaml:6:17: error: document 1, WorkloadEntry/shop/vm, spec.ports.http: \
             port 70000 is out of range; ports are 1 to 65535",
            "scope.yaml:7:19: error: document 1, WorkloadEntry/shop/vm, spec.serviceAccount: \
             serviceAccount is a service account name in the entry's namespace, not a SPIFFE ID; \
             write `vm`",
        ]
    );
    let no_address = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n\
                      metadata: {name: vm}\nspec:\n  labels: {app: vm}\n";
    let e = load(no_address).errors().next().unwrap().to_string();
    assert!(e.contains("spec.address: address is required"), "{e}");
    let via_network = no_address.replace("labels: {app: vm}", "network: vpc-2");
    assert!(!load(&via_network).has_errors());
}
