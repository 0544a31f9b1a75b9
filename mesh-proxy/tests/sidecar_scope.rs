//! `Sidecar` and `WorkloadEntry` from a real API server: both kinds watched, validated
//! like files (an invalid Sidecar rejected with the object and field named), ServiceEntries
//! (and Services) selecting WorkloadEntries by label, ServiceEntries selecting ready pods,
//! and the xDS view of each proxy narrowed to what the Sidecar that applies to it imports
//! (ISTIO.md SR-32, SR-33).

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use mesh_core::config::{AnyResource, Labels, LoadOptions, MeshConfig};
use mesh_proxy::control::xds::IstioResource;
use mesh_proxy::discovery::kube::{ClusterState, KubeSource, SourceOptions};
use mesh_proxy::discovery::xds::{Catalog, View};
use prost::Message;
use support::peers::{ApiServer, wait_for_state};

const ROOT: &str = "istio-system";

const OBJECTS: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: shop}
spec:
  hosts: [vms.shop.internal]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: vms}}
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop}
spec:
  address: 10.0.0.9
  ports: {http: 8080}
  labels: {app: vms, version: v1}
  serviceAccount: vms
---
apiVersion: networking.istio.io/v1alpha3
kind: WorkloadEntry
metadata: {name: vm-legacy, namespace: shop}
spec:
  address: 10.0.0.10
  labels: {app: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec:
  selector: {app: legacy}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ledger, namespace: bank}
spec:
  hosts: [ledger.bank.internal]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ledger, namespace: bank}
spec:
  hosts: [ledger.bank.internal]
  http: [{route: [{destination: {host: ledger.bank.internal}}]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: shop}
spec:
  egress: [{hosts: [./*, istio-system/*]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: reviews, namespace: shop}
spec:
  workloadSelector: {labels: {app: reviews}}
  egress: [{hosts: [./*, bank/ledger.bank.internal]}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: istio-system}
spec:
  egress: [{hosts: [\"~/*\"]}]
";

const BAD_SIDECAR: &str = "\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: bad, namespace: shop}
spec:
  workloadSelector: {labels: {app: bad}}
  egress: [{hosts: [ledger.bank.internal]}]
";

fn options() -> SourceOptions {
    SourceOptions {
        max_backoff: Duration::from_secs(2),
        instance: Some("sidecar-scope-test".to_owned()),
        ..SourceOptions::default()
    }
}

fn has(s: &ClusterState, name: &str) -> bool {
    s.resources.iter().any(|r| r.display_name() == name)
}

fn names(view: &View) -> Vec<String> {
    view.resources
        .iter()
        .map(|any| {
            IstioResource::decode(any.value.as_slice())
                .unwrap()
                .display_name()
        })
        .collect()
}

fn labels(app: &str) -> Labels {
    Labels::from([("app".to_owned(), app.to_owned())])
}

fn endpoint_addresses(config: &MeshConfig, host: &str) -> Vec<String> {
    config.service_entries_for_host(host)[0]
        .spec
        .endpoints
        .iter()
        .filter_map(|e| e.address.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_and_workload_entries_are_watched_and_scope_each_proxys_view() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.install_istio_crds();
    for ns in ["shop", "bank", ROOT] {
        server.kubectl(&["create", "namespace", ns], "");
    }
    server.apply(OBJECTS);
    let source = KubeSource::start(server.client().await, options())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), source.ready())
        .await
        .expect("ready");
    let mut rx = source.subscribe();
    let state = wait_for_state(&mut rx, "the Sidecars and WorkloadEntries", |s| {
        has(s, "Sidecar/istio-system/default")
            && has(s, "WorkloadEntry/shop/vm-legacy")
            && has(s, "ServiceEntry/shop/kubernetes.legacy")
    })
    .await;
    assert!(state.rejected.is_empty(), "{:#?}", state.rejected);

    // The snapshot: a ServiceEntry's selector picks the WorkloadEntries of its
    // namespace, and so does the selector of a Service without pods.
    let config = state.config(&LoadOptions::default());
    assert_eq!(
        endpoint_addresses(&config, "vms.shop.internal"),
        ["10.0.0.9"]
    );
    assert_eq!(
        endpoint_addresses(&config, "legacy.shop.svc.cluster.local"),
        ["10.0.0.10"]
    );
    let vm = &config.service_entries_for_host("vms.shop.internal")[0]
        .spec
        .endpoints[0];
    assert_eq!(vm.ports["http"], 8080);
    assert_eq!(vm.service_account.as_deref(), Some("vms"));
    let pick = |ns: &str, app: &str| {
        config
            .sidecar_for(ns, &labels(app), ROOT)
            .map(|s| format!("{}/{}", s.namespace(), s.name()))
    };
    assert_eq!(pick("shop", "reviews").as_deref(), Some("shop/reviews"));
    assert_eq!(pick("shop", "ratings").as_deref(), Some("shop/default"));
    assert_eq!(
        pick("bank", "teller").as_deref(),
        Some("istio-system/default")
    );

    // What discovery sends each proxy.
    let catalog = Catalog::new(state.generation, state.resources.clone());
    let view = |ns: &str, app: &str| {
        let sidecar = catalog.sidecar_for(ns, &labels(app), ROOT);
        names(&catalog.scoped_view(ns, sidecar, ROOT))
    };
    let ratings = view("shop", "ratings");
    for expected in [
        "ServiceEntry/shop/vms",
        "ServiceEntry/shop/kubernetes.legacy",
        "WorkloadEntry/shop/vm-1",
        "WorkloadEntry/shop/vm-legacy",
        "Sidecar/shop/default",
    ] {
        assert!(
            ratings.contains(&expected.to_owned()),
            "{expected}: {ratings:?}"
        );
    }
    assert!(
        !ratings.iter().any(|n| n.ends_with("bank/ledger")),
        "{ratings:?}"
    );
    let reviews = view("shop", "reviews");
    assert!(
        reviews.contains(&"ServiceEntry/bank/ledger".to_owned()),
        "{reviews:?}"
    );
    assert!(
        reviews.contains(&"VirtualService/bank/ledger".to_owned()),
        "{reviews:?}"
    );
    // The root namespace's `~/*` imports nothing: a proxy of `bank` gets no services.
    let teller = view("bank", "teller");
    assert!(
        !teller
            .iter()
            .any(|n| n.starts_with("ServiceEntry/") || n.starts_with("VirtualService/")),
        "{teller:?}"
    );
    // A gateway is not scoped by any Sidecar: it gets everything visible to `bank`.
    let gateway = names(&catalog.view("bank", ROOT));
    assert!(
        gateway.contains(&"ServiceEntry/shop/vms".to_owned()),
        "{gateway:?}"
    );

    // An invalid Sidecar is left out, named with its field.
    server.apply(BAD_SIDECAR);
    let state = wait_for_state(&mut rx, "the rejection", |s| {
        s.rejected.iter().any(|r| r.object() == "Sidecar/shop/bad")
    })
    .await;
    let rejected = state
        .rejected
        .iter()
        .find(|r| r.object() == "Sidecar/shop/bad")
        .unwrap();
    assert!(
        rejected.message().starts_with(
            "error: Sidecar/shop/bad, spec.egress[0].hosts[0]: `ledger.bank.internal` is not \
             `namespace/dnsName`"
        ),
        "{}",
        rejected.message()
    );
    assert!(
        !state
            .resources
            .iter()
            .any(|r| matches!(r, AnyResource::Sidecar(s) if s.name() == "bad"))
    );

    // Deleting the WorkloadEntry takes the endpoint away.
    server.kubectl(&["delete", "workloadentry", "-n", "shop", "vm-1"], "");
    let state = wait_for_state(&mut rx, "the entry without its VM", |s| {
        !has(s, "WorkloadEntry/shop/vm-1")
    })
    .await;
    let config = state.config(&LoadOptions::default());
    assert!(endpoint_addresses(&config, "vms.shop.internal").is_empty());
}

/// A pod of the `shop` namespace with `labels`; its status is set apart (no kubelet
/// runs here).
fn pod(name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {labels}}}\n\
         spec:\n  serviceAccountName: vms\n  containers: [{{name: app, image: vms:1}}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_entry_selects_the_ready_pods_of_its_namespace() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.install_istio_crds();
    for ns in ["shop", "bank", ROOT] {
        server.kubectl(&["create", "namespace", ns], "");
    }
    server.apply(OBJECTS);
    server.apply(&pod(
        "vm-pod-a",
        "{app: vms, security.istio.io/tlsMode: istio}",
    ));
    server.apply(&pod("vm-pod-b", "{app: vms}"));
    server.apply(&pod("other", "{app: reviews}"));
    let status = |name: &str, ip: &str, ready: &str| {
        let patch = format!(
            "{{\"status\": {{\"podIP\": \"{ip}\", \"podIPs\": [{{\"ip\": \"{ip}\"}}], \
             \"conditions\": [{{\"type\": \"Ready\", \"status\": \"{ready}\"}}]}}}}"
        );
        server.kubectl(
            &[
                "patch",
                "pod",
                name,
                "-n",
                "shop",
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ],
            "",
        );
    };
    status("vm-pod-a", "10.244.1.5", "True");
    status("vm-pod-b", "10.244.1.6", "False");
    status("other", "10.244.1.7", "True");
    let source = KubeSource::start(server.client().await, options())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), source.ready())
        .await
        .expect("ready");
    let mut rx = source.subscribe();
    let state = wait_for_state(&mut rx, "the selected pod", |s| {
        has(s, "WorkloadEntry/shop/kubernetes-pod.vm-pod-a")
    })
    .await;
    // Only the ready pod the selector matches; not the unready one, not another app.
    assert!(!has(&state, "WorkloadEntry/shop/kubernetes-pod.vm-pod-b"));
    assert!(!has(&state, "WorkloadEntry/shop/kubernetes-pod.other"));
    let config = state.config(&LoadOptions::default());
    let mut addresses = endpoint_addresses(&config, "vms.shop.internal");
    addresses.sort();
    assert_eq!(addresses, ["10.0.0.9", "10.244.1.5"]);
    let entry = &config.service_entries_for_host("vms.shop.internal")[0];
    let pod = entry
        .spec
        .endpoints
        .iter()
        .find(|e| e.address.as_deref() == Some("10.244.1.5"))
        .unwrap();
    assert_eq!(pod.service_account.as_deref(), Some("vms"));
    assert_eq!(pod.labels["security.istio.io/tlsMode"], "istio");

    // The pod becomes ready: it joins; it is deleted: it leaves.
    status("vm-pod-b", "10.244.1.6", "True");
    wait_for_state(&mut rx, "the second pod ready", |s| {
        has(s, "WorkloadEntry/shop/kubernetes-pod.vm-pod-b")
    })
    .await;
    server.kubectl(
        &["delete", "pod", "vm-pod-a", "-n", "shop", "--wait=false"],
        "",
    );
    wait_for_state(&mut rx, "the first pod gone", |s| {
        !has(s, "WorkloadEntry/shop/kubernetes-pod.vm-pod-a")
            && has(s, "WorkloadEntry/shop/kubernetes-pod.vm-pod-b")
    })
    .await;
}
