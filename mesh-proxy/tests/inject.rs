//! Sidecar injection against a real API server: the chart's MutatingWebhookConfiguration
//! calling `mesh-proxy discovery`'s `/inject`, with the article's `kubectl label
//! namespace production istio-injection=enabled`; opting out; injecting twice; a webhook
//! that is down; and `mesh-proxy inject -f` output accepted by the server.
//!
//! No controller manager runs, so nothing turns Deployments into pods: the tests create
//! the pods a ReplicaSet would (the Deployment's template, `generateName`), and check
//! that the Deployment itself is stored unchanged.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::peers::{ApiServer, peer};
use support::{DiscoveryProcess, World, free_port};

const CANARY: &str = include_str!("../../examples/sidecar/config/canary-order-service.yaml");
const INJECTOR: &str = "mesh-sidecar-injector-istio-system";

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/mesh")
}

/// The chart's MutatingWebhookConfiguration with `values`, calling `url` instead of the
/// `mesh-discovery` Service (nothing routes Service addresses here).
fn injector_config(helm: &PathBuf, values: &str, url: &str) -> String {
    let out = Command::new(helm)
        .args(["template", "mesh"])
        .arg(chart())
        .args([
            "--namespace",
            "istio-system",
            "--show-only",
            "templates/injector.yaml",
            "--set",
            values,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let service = "    service:\n      name: mesh-discovery\n      namespace: istio-system\n      \
                   path: /inject\n      port: 443\n";
    assert_eq!(rendered.matches(service).count(), 4, "{rendered}");
    rendered.replace(service, &format!("    url: {url}\n"))
}

/// The pod a ReplicaSet of `deployment` would create in `namespace`.
fn pod_of(deployment: &Value, namespace: &str) -> Value {
    let template = &deployment["spec"]["template"];
    let mut metadata = template["metadata"].clone();
    metadata["generateName"] =
        format!("{}-", deployment["metadata"]["name"].as_str().unwrap()).into();
    metadata["namespace"] = namespace.into();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template["spec"],
    })
}

fn deployments(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(yaml).unwrap();
    docs.into_iter()
        .filter(|d| d["kind"] == "Deployment")
        .collect()
}

/// The article's workloads: order-service v2 from the canary file as written, and v1 and
/// payment-service v1 of the same shape.
fn article_deployments() -> Vec<Value> {
    let mut all = deployments(CANARY);
    assert_eq!(all.len(), 1);
    for (name, app, version) in [
        ("order-service-v1", "order-service", "v1"),
        ("payment-service-v1", "payment-service", "v1"),
    ] {
        all.push(serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": app, "version": version}},
                "template": {
                    "metadata": {"labels": {"app": app, "version": version}},
                    "spec": {
                        "serviceAccountName": app,
                        "containers": [{
                            "name": app,
                            "image": format!("{app}:1.0.0"),
                            "ports": [{"containerPort": 8080}],
                        }],
                    },
                },
            },
        }));
    }
    all
}

/// Creates `pod` (JSON), or with `dry_run` only has the server admit it; the pod as the
/// server stored (or would store) it, or kubectl's error.
fn create(server: &ApiServer, pod: &Value, dry_run: bool) -> Result<Value, String> {
    let mut args = vec!["create", "-o", "json", "-f", "-"];
    if dry_run {
        args.push("--dry-run=server");
    }
    let out = server.kubectl_output(&args, &pod.to_string());
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn injected(pod: &Value) -> bool {
    let spec = &pod["spec"];
    names(&spec["containers"])
        .iter()
        .chain(names(&spec["initContainers"]).iter())
        .any(|n| n == "istio-proxy")
}

/// A bare pod in `namespace` with `labels` and `annotations`.
fn bare_pod(namespace: &str, labels: Value, annotations: Value) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "bare-", "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    })
}

/// Retries `f` for up to 30 s until it returns `Some` (the API server takes a webhook
/// configuration or a namespace label up within a few seconds).
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..120 {
        if let Some(t) = f() {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelling_the_namespace_makes_the_next_pods_come_out_injected() {
    let Some(helm) = peer("helm") else { return };
    let Some(server) = ApiServer::start() else {
        return;
    };
    let world = World::new();
    for ns in ["istio-system", "production", "staging"] {
        server.kubectl(&["create", "namespace", ns], "");
    }
    for sa in ["order-service", "payment-service"] {
        server.kubectl(&["-n", "production", "create", "serviceaccount", sa], "");
    }
    server.install_istio_crds();

    // The chart's injector configuration, without a caBundle: discovery sets it.
    let webhook = free_port();
    server.apply(&injector_config(
        &helm,
        "injection.enabled=true",
        &format!("https://localhost:{webhook}/inject"),
    ));
    let grpc = format!("127.0.0.1:{}", free_port());
    let webhook_addr = format!("127.0.0.1:{webhook}");
    let args = [
        "--kubernetes".as_ref(),
        "--kubeconfig".as_ref(),
        server.kubeconfig.as_os_str(),
        "--grpc".as_ref(),
        grpc.as_ref(),
        "--webhook".as_ref(),
        webhook_addr.as_ref(),
        "--dns-name".as_ref(),
        "localhost".as_ref(),
        "--inject".as_ref(),
        "--injector-config".as_ref(),
        INJECTOR.as_ref(),
        "--proxy-image".as_ref(),
        "registry.example/mesh-proxy:test".as_ref(),
    ];
    let discovery = DiscoveryProcess::start(&world, "discovery", &args).await;
    let root = std::fs::read_to_string(world.ca_dir.join("root-cert.pem")).unwrap();
    eventually("discovery to set the caBundle of all four webhooks", || {
        let out = server.kubectl(
            &[
                "get",
                "mutatingwebhookconfiguration",
                INJECTOR,
                "-o",
                "json",
            ],
            "",
        );
        let config: Value = serde_json::from_str(&out).unwrap();
        let webhooks = config["webhooks"].as_array().unwrap().clone();
        assert_eq!(webhooks.len(), 4);
        webhooks
            .iter()
            .all(|w| {
                w["clientConfig"]["caBundle"]
                    .as_str()
                    .is_some_and(|b| !b.is_empty())
            })
            .then_some(())
    })
    .await;
    let config = server.kubectl(
        &[
            "get",
            "mutatingwebhookconfiguration",
            INJECTOR,
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ],
        "",
    );
    let bundle = serde_json::to_value(k8s_openapi::ByteString(root.into_bytes())).unwrap();
    assert_eq!(
        config,
        bundle.as_str().unwrap(),
        "the caBundle is the mesh root"
    );

    // The webhook answers: a pod that opts in by label in an unlabelled namespace.
    let opted_in = bare_pod(
        "staging",
        serde_json::json!({"sidecar.istio.io/inject": "true"}),
        serde_json::json!({}),
    );
    let mut last = Err(String::new());
    for _ in 0..120 {
        last = create(&server, &opted_in, true);
        if last.as_ref().is_ok_and(injected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        last.as_ref().is_ok_and(injected),
        "the injector was not called: {last:#?}\ndiscovery:\n{}",
        discovery.output()
    );

    // Before the label: production's pods come out as they went in.
    let articles = article_deployments();
    let before = create(&server, &pod_of(&articles[0], "production"), false).unwrap();
    assert!(!injected(&before), "{before:#}");

    // The article's step.
    server.kubectl(
        &[
            "label",
            "namespace",
            "production",
            "istio-injection=enabled",
        ],
        "",
    );
    eventually("the namespace label to take effect", || {
        create(&server, &pod_of(&articles[0], "production"), true)
            .ok()
            .filter(injected)
    })
    .await;

    // The Deployments are stored as written; the pods they make carry the sidecar.
    let mut pods = Vec::new();
    for deployment in &articles {
        let mut d = deployment.clone();
        d["metadata"]["namespace"] = "production".into();
        server.apply(&d.to_string());
        let name = d["metadata"]["name"].as_str().unwrap();
        let stored: Value = serde_json::from_str(&server.kubectl(
            &["-n", "production", "get", "deployment", name, "-o", "json"],
            "",
        ))
        .unwrap();
        assert!(!injected(&stored["spec"]["template"]), "{stored:#}");
        let pod = create(&server, &pod_of(deployment, "production"), false).unwrap();
        pods.push(pod["metadata"]["name"].as_str().unwrap().to_owned());
    }
    for (pod_name, deployment) in pods.iter().zip(&articles) {
        let pod: Value = serde_json::from_str(&server.kubectl(
            &["-n", "production", "get", "pod", pod_name, "-o", "json"],
            "",
        ))
        .unwrap();
        let app = deployment["spec"]["template"]["metadata"]["labels"]["app"]
            .as_str()
            .unwrap();
        let spec = &pod["spec"];
        let labels = &pod["metadata"]["labels"];
        assert_eq!(labels["security.istio.io/tlsMode"], "istio");
        assert_eq!(labels["service.istio.io/canonical-name"], app);
        // The API server is 1.33 or later: native sidecars, after the capture container.
        assert_eq!(
            names(&spec["initContainers"]),
            ["istio-init", "istio-proxy"],
            "{pod:#}"
        );
        let init = &spec["initContainers"][0];
        assert_eq!(
            init["securityContext"]["capabilities"]["add"],
            serde_json::json!(["NET_ADMIN", "NET_RAW"])
        );
        assert_eq!(init["args"][0], "init");
        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["image"], "registry.example/mesh-proxy:test");
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
        assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15021);
        assert_eq!(names(&spec["containers"]), [app]);
        let token = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "istio-token")
            .unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "istio-ca"
        );
        let annotations = &pod["metadata"]["annotations"];
        let status: Value =
            serde_json::from_str(annotations["sidecar.istio.io/status"].as_str().unwrap()).unwrap();
        assert_eq!(status["revision"], "default");
        // The proxy's settings name the pod's identity and discovery.
        let settings = mesh_proxy::Settings::from_yaml(
            "sidecar.yaml",
            annotations["mesh-proxy/settings"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(settings.workload.namespace, "production");
        let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
        assert_eq!(settings.workload.service_account, sa);
        assert_eq!(
            settings.discovery.unwrap().address,
            "mesh-discovery.istio-system.svc:15012"
        );
    }

    // Opting out, by label (the webhook is not called) and by annotation (it declines).
    for (labels, annotations) in [
        (
            serde_json::json!({"sidecar.istio.io/inject": "false"}),
            serde_json::json!({}),
        ),
        (
            serde_json::json!({}),
            serde_json::json!({"sidecar.istio.io/inject": "false"}),
        ),
    ] {
        let pod = create(&server, &bare_pod("production", labels, annotations), false).unwrap();
        assert!(!injected(&pod), "{pod:#}");
    }
    // An unlabelled namespace is left alone.
    let pod = create(
        &server,
        &bare_pod("staging", serde_json::json!({}), serde_json::json!({})),
        false,
    )
    .unwrap();
    assert!(!injected(&pod), "{pod:#}");

    // Injecting twice changes nothing: an injected pod created again is stored as it is,
    // and `mesh-proxy inject -f` writes it back unchanged.
    let first: Value = serde_json::from_str(&server.kubectl(
        &["-n", "production", "get", "pod", &pods[0], "-o", "json"],
        "",
    ))
    .unwrap();
    let mut again = first.clone();
    again.as_object_mut().unwrap().remove("status");
    let meta = again["metadata"].as_object_mut().unwrap();
    for field in [
        "name",
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
    ] {
        meta.remove(field);
    }
    let second = create(&server, &again, false).unwrap();
    assert_eq!(second["spec"], first["spec"]);
    assert_eq!(second["metadata"]["labels"], first["metadata"]["labels"]);
    assert_eq!(
        second["metadata"]["annotations"],
        first["metadata"]["annotations"]
    );
    let out = inject_cli(&["-f", "-"], &again.to_string());
    let rewritten: Value = serde_saphyr::from_str(&out).unwrap();
    assert_eq!(rewritten, again);

    assert!(
        discovery.output().contains("sidecar injected"),
        "{}",
        discovery.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_fails_as_its_failure_policy_says() {
    let Some(helm) = peer("helm") else { return };
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.kubectl(&["create", "namespace", "production"], "");
    server.kubectl(
        &[
            "label",
            "namespace",
            "production",
            "istio-injection=enabled",
        ],
        "",
    );
    // Nothing listens on the webhook's port.
    let url = format!("https://localhost:{}/inject", free_port());
    let pod = bare_pod("production", serde_json::json!({}), serde_json::json!({}));

    server.apply(&injector_config(
        &helm,
        "injection.failurePolicy=Fail",
        &url,
    ));
    let refused = eventually("Fail to refuse the pod", || {
        create(&server, &pod, true).err()
    })
    .await;
    assert!(
        refused.contains("failed calling webhook")
            && refused.contains("namespace.injection.mesh.istio-system.svc"),
        "{refused}"
    );
    let out = server.kubectl(&["-n", "production", "get", "pods", "-o", "name"], "");
    assert_eq!(out.trim(), "", "no pod was stored");

    server.apply(&injector_config(
        &helm,
        "injection.failurePolicy=Ignore",
        &url,
    ));
    let admitted = eventually("Ignore to admit the pod", || {
        create(&server, &pod, false).ok()
    })
    .await;
    assert!(!injected(&admitted), "{admitted:#}");
    assert_eq!(names(&admitted["spec"]["containers"]), ["app"]);
}

/// `mesh-proxy inject` with `args`, `stdin` as its input; its standard output.
fn inject_cli(args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .arg("inject")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mesh-proxy inject {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A StatefulSet, a Job, a CronJob, a DaemonSet and a Pod with an init container and two
/// application containers, beside a Service and a ConfigMap that pass through.
const WORKLOADS: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: ledger
spec:
  clusterIP: None
  selector: {app: ledger}
  ports:
  - {name: tcp-ledger, port: 5432}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: ledger
spec:
  serviceName: ledger
  replicas: 3
  selector:
    matchLabels: {app: ledger}
  template:
    metadata:
      labels: {app: ledger, version: v1}
      annotations:
        traffic.sidecar.istio.io/excludeInboundPorts: "9187"
    spec:
      containers:
      - name: ledger
        image: ledger:1
        ports: [{containerPort: 5432}, {containerPort: 9187}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: settle-payments
spec:
  template:
    metadata:
      annotations:
        traffic.sidecar.istio.io/excludeOutboundIPRanges: "10.96.0.1/32"
    spec:
      restartPolicy: Never
      containers:
      - name: settle
        image: settle:1
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly-report
spec:
  schedule: "0 2 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
          - name: report
            image: report:1
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: node-agent
spec:
  selector:
    matchLabels: {app: node-agent}
  template:
    metadata:
      labels: {app: node-agent}
    spec:
      containers:
      - name: agent
        image: agent:1
---
apiVersion: v1
kind: Pod
metadata:
  name: checkout
  labels: {app: checkout, version: v3}
spec:
  serviceAccountName: default
  initContainers:
  - name: migrate
    image: checkout-migrate:3
  containers:
  - name: checkout
    image: checkout:3
    ports: [{containerPort: 8080}]
  - name: log-shipper
    image: shipper:1
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: checkout
data:
  greeting: hello
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_f_output_is_accepted_by_the_api_server() {
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.kubectl(&["create", "namespace", "production"], "");
    server.install_istio_crds();
    let input = format!("{CANARY}\n---\n{WORKLOADS}");

    for native in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("workloads.yaml");
        std::fs::write(&source, &input).unwrap();
        let output = dir.path().join("injected.yaml");
        let mut args = vec![
            "-f",
            source.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "-n",
            "production",
        ];
        if native {
            args.push("--native-sidecars");
        }
        assert_eq!(inject_cli(&args, ""), "");
        let injected_yaml = std::fs::read_to_string(&output).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_str_multiple(&injected_yaml).unwrap();
        let source_docs: Vec<Value> = serde_saphyr::from_str_multiple(&input).unwrap();
        assert_eq!(docs.len(), source_docs.len());

        let out = server.kubectl(
            &[
                "-n",
                "production",
                "apply",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                "-",
            ],
            &injected_yaml,
        );
        let admitted: Value = serde_json::from_str(&out).unwrap();
        let items = admitted["items"].as_array().unwrap();
        assert_eq!(items.len(), docs.len(), "{out}");
        for (item, source) in items.iter().zip(&source_docs) {
            let template = match item["kind"].as_str().unwrap() {
                "Pod" => item.clone(),
                "CronJob" => item["spec"]["jobTemplate"]["spec"]["template"].clone(),
                "Deployment" | "StatefulSet" | "Job" | "DaemonSet" => {
                    item["spec"]["template"].clone()
                }
                _ => {
                    // Passed through: what the server admitted is what went in.
                    assert_eq!(item["metadata"]["name"], source["metadata"]["name"]);
                    assert!(!item.to_string().contains("istio-proxy"));
                    continue;
                }
            };
            assert!(injected(&template), "{item:#}");
            let init = names(&template["spec"]["initContainers"]);
            assert_eq!(init[0], "istio-init", "{item:#}");
            if native {
                assert_eq!(init[1], "istio-proxy");
            } else {
                assert_eq!(
                    names(&template["spec"]["containers"]).last().unwrap(),
                    "istio-proxy"
                );
            }
        }
        // The pod's own containers are kept, in order, around the injected ones.
        let pod = items.iter().find(|i| i["kind"] == "Pod").unwrap();
        let (init, containers) = (
            names(&pod["spec"]["initContainers"]),
            names(&pod["spec"]["containers"]),
        );
        if native {
            assert_eq!(init, ["istio-init", "istio-proxy", "migrate"]);
            assert_eq!(containers, ["checkout", "log-shipper"]);
        } else {
            assert_eq!(init, ["istio-init", "migrate"]);
            assert_eq!(containers, ["checkout", "log-shipper", "istio-proxy"]);
        }
        // The annotations reached istio-init's flags.
        let statefulset = items.iter().find(|i| i["kind"] == "StatefulSet").unwrap();
        let args = statefulset["spec"]["template"]["spec"]["initContainers"][0]["args"].to_string();
        assert!(args.contains(r#""-d","15090,15021,15020,9187""#), "{args}");
        let job = items.iter().find(|i| i["kind"] == "Job").unwrap();
        let args = job["spec"]["template"]["spec"]["initContainers"][0]["args"].to_string();
        assert!(args.contains(r#""-x","10.96.0.1/32""#), "{args}");
    }

    // Bad input names the file and the object.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations:\n    \
         traffic.sidecar.istio.io/excludeOutboundPorts: http\nspec:\n  containers: [{name: p, image: p}]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["inject", "-f"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml: document 1, Pod/default/p: annotation traffic.sidecar.istio.io/excludeOutboundPorts: \"http\" is not a port"),
        "{stderr}"
    );
}

/// The admin server where an injected pod puts it (`0.0.0.0:15021`): the kubelet's probe
/// and Prometheus reach readiness and metrics from the pod network, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_port_serves_probes_and_metrics_to_the_pod_network_and_nothing_else() {
    let world = World::new();
    let config = world.path("config");
    std::fs::create_dir_all(&config).unwrap();
    let ports = support::Ports::new();
    let app = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let settings = support::sidecar_settings(
        &world,
        "payment-service",
        &support::labels(&[("app", "payment-service")]),
        &config,
        ports,
        app,
        "",
    );
    let loopback_admin = format!("admin: 127.0.0.1:{}", ports.admin);
    assert!(settings.contains(&loopback_admin));
    let settings = settings.replace(&loopback_admin, &format!("admin: 0.0.0.0:{}", ports.admin));
    let _proxy =
        support::Proxy::start(&world, "sidecar", "payment-service", &settings, ports).await;

    let pod_ip = std::net::SocketAddr::new(support::peers::host_ip(), ports.admin);
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], ports.admin));
    for path in ["/healthz/ready", "/stats/prometheus"] {
        let (status, _) = support::send(pod_ip, "GET", "pod", path, &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}");
    }
    for (method, path) in [
        ("GET", "/config_dump"),
        ("GET", "/certs"),
        ("POST", "/rotate"),
    ] {
        let (status, _) = support::send(pod_ip, method, "pod", path, &[])
            .await
            .unwrap();
        assert_eq!(status, 404, "{method} {path} from the pod network");
        let (status, _) = support::send(loopback, method, "localhost", path, &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "{method} {path} on loopback");
    }
}
