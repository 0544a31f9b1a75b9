//! `mesh-proxy explain` run as a process on the article's YAML (`examples/sidecar/config`):
//! the three flows of the article (order-service → payment-service `POST` allowed, `GET`
//! denied, ingress gateway → payment-service denied), the canary's header and weights,
//! and what the files say about policies, TLS and authorization, with file and line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn article() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sidecar/config")
}

fn run(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .arg("explain")
        .arg(config)
        .args(["--namespace", "production"])
        .args(args)
        .output()
        .expect("mesh-proxy runs")
}

/// The JSON explanation of `args` on `config`; the process must exit 0.
fn explain(config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = run(config, &all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

/// Asserts that the located reference `v` names `kind namespace/name`, in the file
/// `file` (of the article's directory) at `line`.
fn assert_at(v: &Value, kind: &str, name: &str, file: &str, line: u64) {
    assert_eq!(v["kind"], kind, "{v:#}");
    assert_eq!(v["namespace"], "production", "{v:#}");
    assert_eq!(v["name"], name, "{v:#}");
    let path = v["file"].as_str().expect("a file");
    assert!(path.ends_with(&format!("/{file}")), "{path} is not {file}");
    assert_eq!(v["line"], line, "{v:#}");
}

const RESILIENCE: &str = "payment-service-resilience.yaml";
const AUTHZ: &str = "authorization-policy-payment.yaml";
const STRICT: &str = "peer-authentication-strict.yaml";
const CANARY: &str = "canary-order-service.yaml";
const GATEWAY: &str = "api-gateway.yaml";

fn order_to_payment(method: &str) -> Value {
    explain(
        &article(),
        &[
            "--from",
            "order-service",
            "--to",
            "payment-service:8080",
            "-X",
            method,
            "--path",
            "/api/v1/payments",
        ],
    )
}

#[test]
fn order_service_post_is_allowed_by_the_rule_of_the_article_policy() {
    let e = order_to_payment("POST");
    assert_eq!(
        e["source"]["principal"],
        "cluster.local/ns/production/sa/order-service"
    );
    assert_eq!(e["listener"]["kind"], "sidecar");
    // The route: the payment-service VirtualService, its only rule, with the outer
    // deadline and the retries (per-try timeout under the deadline).
    let route = &e["route"];
    assert_at(
        &route["virtualService"],
        "VirtualService",
        "payment-service",
        RESILIENCE,
        2,
    );
    assert_at(
        &route["rule"],
        "VirtualService",
        "payment-service",
        RESILIENCE,
        10,
    );
    assert_eq!(route["ruleIndex"], 0);
    assert_eq!(route["timeout"], "5s");
    assert_eq!(route["timeoutAt"]["line"], 10);
    assert_eq!(route["retries"]["attempts"], 3);
    assert_eq!(route["retries"]["perTryTimeout"], "2s");
    assert_eq!(
        route["retries"]["retryOn"],
        "gateway-error,connect-failure,retriable-4xx"
    );
    assert_eq!(route["retries"]["default"], false);
    assert_eq!(route["retries"]["at"]["line"], 11);
    assert_eq!(e["outcome"], "forwarded");

    let dests = e["destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 1, "{dests:#?}");
    let d = &dests[0];
    assert_eq!(d["host"], "payment-service.production.svc.cluster.local");
    assert_eq!(d["port"], 8080);
    assert_eq!(d["percent"], 100.0);
    assert_at(
        &d["destinationRule"],
        "DestinationRule",
        "payment-service",
        RESILIENCE,
        20,
    );
    // The DestinationRule's blocks, as written and as enforced (Istio's defaults filled in).
    let p = &d["policy"];
    assert_eq!(p["loadBalancer"], "LEAST_REQUEST");
    assert_eq!(p["connectionPool"]["http"]["http1MaxPendingRequests"], 100);
    assert_eq!(p["poolLimits"]["http1MaxPendingRequests"], 100);
    assert_eq!(p["poolLimits"]["maxRequestsPerConnection"], 10);
    assert_eq!(p["poolLimits"]["maxConnections"], Value::Null);
    assert_eq!(p["connectionPoolAt"]["line"], 27);
    assert_eq!(
        p["connectionPoolAt"]["field"],
        "spec.trafficPolicy.connectionPool"
    );
    assert_eq!(p["outlier"]["consecutive5xxErrors"], 5);
    assert_eq!(p["outlier"]["interval"], "30s");
    assert_eq!(p["outlier"]["baseEjectionTime"], "30s");
    assert_eq!(p["outlier"]["maxEjectionPercent"], 50);
    assert_eq!(p["outlierDetectionAt"]["line"], 31);
    // TLS: auto-mTLS on the client, STRICT on the server.
    let tls = &d["tls"];
    assert_eq!(tls["client"], "AUTO");
    assert_eq!(tls["clientTransport"], "Istio mTLS");
    assert_eq!(tls["server"], "STRICT");
    assert_at(
        &tls["serverAt"],
        "PeerAuthentication",
        "default",
        STRICT,
        10,
    );
    assert_eq!(tls["connection"], "mTLS");
    // Authorization: the ALLOW policy's first rule decides.
    let a = &d["authorization"];
    assert_eq!(a["namespace"], "production");
    assert_eq!(a["labels"]["app"], "payment-service");
    assert_eq!(
        a["principal"],
        "cluster.local/ns/production/sa/order-service"
    );
    assert_eq!(a["allowed"], true);
    assert_eq!(a["status"], 200);
    assert_eq!(a["action"], "ALLOW");
    assert_eq!(a["policy"], "production/payment-service-authz");
    assert_eq!(a["rule"], 0);
    assert_at(
        &a["at"],
        "AuthorizationPolicy",
        "payment-service-authz",
        AUTHZ,
        12,
    );
    assert_eq!(a["at"]["field"], "spec.rules[0]");
}

#[test]
fn order_service_get_is_denied_by_default_naming_the_allow_policy() {
    let e = order_to_payment("GET");
    let a = &e["destinations"][0]["authorization"];
    assert_eq!(a["allowed"], false);
    assert_eq!(a["status"], 403);
    // No rule matched: the default deny of a workload with ALLOW policies.
    assert_eq!(a["rule"], Value::Null);
    assert_eq!(a["action"], Value::Null);
    assert_eq!(a["policy"], "production/payment-service-authz");
    assert_at(
        &a["at"],
        "AuthorizationPolicy",
        "payment-service-authz",
        AUTHZ,
        2,
    );
    let reason = a["reason"].as_str().unwrap();
    assert!(reason.starts_with("denied by default"), "{reason}");
    assert_eq!(a["policies"][0]["action"], "ALLOW");
    // Routing is the same as for the POST.
    assert_eq!(e["route"]["ruleIndex"], 0);
}

#[test]
fn ingress_gateway_to_payment_service_is_denied() {
    let e = explain(
        &article(),
        &[
            "--gateway",
            "production/api-gateway",
            "--to",
            "api.example.com",
            "-X",
            "POST",
            "--path",
            "/api/v1/payments",
        ],
    );
    assert_eq!(
        e["source"]["principal"],
        "cluster.local/ns/production/sa/istio-ingressgateway"
    );
    assert_eq!(e["source"]["labels"]["istio"], "ingress");
    let l = &e["listener"];
    assert_eq!(l["kind"], "gateway");
    assert_eq!(l["name"], "production/api-gateway");
    assert_at(&l["gateway"], "Gateway", "api-gateway", GATEWAY, 2);
    assert_eq!(l["server"]["index"], 0);
    assert_eq!(l["server"]["port"], 443);
    assert_eq!(l["server"]["tlsMode"], "SIMPLE");
    assert_eq!(l["server"]["credentialName"], "api-tls-cert");
    assert_eq!(l["server"]["at"]["line"], 10);
    assert_eq!(e["request"]["port"], 443);
    // The gateway's VirtualService: the second rule (`/api/v1/payments`), its match.
    let route = &e["route"];
    assert_at(
        &route["virtualService"],
        "VirtualService",
        "api-routing",
        GATEWAY,
        20,
    );
    assert_eq!(route["ruleIndex"], 1);
    assert_eq!(route["rule"]["line"], 38);
    assert_eq!(route["matchIndex"], 0);
    assert_eq!(route["matched"]["line"], 39);
    // No `retries` on that rule: Istio's default; no timeout.
    assert_eq!(route["retries"]["default"], true);
    assert_eq!(route["retries"]["attempts"], 2);
    assert_eq!(route["timeout"], Value::Null);
    let d = &e["destinations"][0];
    assert_eq!(d["host"], "payment-service.production.svc.cluster.local");
    assert_eq!(d["port"], 8080);
    assert_eq!(d["at"]["line"], 42);
    // The DestinationRule applies to the gateway as a client too.
    assert_eq!(d["destinationRule"]["line"], 20);
    assert_eq!(d["tls"]["connection"], "mTLS");
    let a = &d["authorization"];
    assert_eq!(
        a["principal"],
        "cluster.local/ns/production/sa/istio-ingressgateway"
    );
    assert_eq!(a["allowed"], false);
    assert_eq!(a["status"], 403);
    assert_eq!(a["policy"], "production/payment-service-authz");
    assert_eq!(a["at"]["line"], 2);
}

#[test]
fn canary_header_chooses_v2() {
    let e = explain(
        &article(),
        &[
            "--from",
            "web-frontend",
            "--to",
            "order-service",
            "-H",
            "x-canary: true",
        ],
    );
    let route = &e["route"];
    assert_at(
        &route["virtualService"],
        "VirtualService",
        "order-service",
        CANARY,
        46,
    );
    assert_eq!(route["ruleIndex"], 0);
    assert_eq!(route["rule"]["line"], 54);
    assert_eq!(route["matchIndex"], 0);
    assert_eq!(route["matched"]["line"], 55);
    let dests = e["destinations"].as_array().unwrap();
    assert_eq!(dests.len(), 1, "{dests:#?}");
    assert_eq!(dests[0]["subset"], "v2");
    assert_eq!(dests[0]["percent"], 100.0);
    assert_eq!(dests[0]["subsetLabels"]["version"], "v2");
    assert_at(
        &dests[0]["subsetAt"],
        "DestinationRule",
        "order-service",
        CANARY,
        35,
    );
    // The pods of the subset: `app` and the subset's labels are what the policies see.
    assert_eq!(dests[0]["authorization"]["labels"]["version"], "v2");
    // The DestinationRule's pool (tcp.maxConnections) applies to the subset.
    assert_eq!(dests[0]["policy"]["poolLimits"]["maxConnections"], 100);
    assert_eq!(dests[0]["policy"]["connectionPoolAt"]["line"], 39);

    // Another value of the header is not a canary user.
    let e = explain(
        &article(),
        &[
            "--from",
            "web-frontend",
            "--to",
            "order-service",
            "-H",
            "x-canary: false",
        ],
    );
    assert_eq!(e["route"]["ruleIndex"], 1);
}

#[test]
fn without_the_header_the_weights_are_95_to_v1_and_5_to_v2() {
    let e = explain(
        &article(),
        &["--from", "web-frontend", "--to", "order-service"],
    );
    let route = &e["route"];
    assert_eq!(route["ruleIndex"], 1);
    assert_eq!(route["rule"]["line"], 62);
    assert_eq!(route["matched"], Value::Null);
    let dests = e["destinations"].as_array().unwrap();
    let summary: Vec<(&str, i64, f64, u64, &str)> = dests
        .iter()
        .map(|d| {
            (
                d["subset"].as_str().unwrap(),
                d["weight"].as_i64().unwrap(),
                d["percent"].as_f64().unwrap(),
                d["at"]["line"].as_u64().unwrap(),
                d["subsetLabels"]["version"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("v1", 95, 95.0, 63, "v1"), ("v2", 5, 5.0, 67, "v2")]
    );
    assert_eq!(dests[0]["subsetAt"]["line"], 32);
    assert_eq!(dests[1]["subsetAt"]["line"], 35);
}

#[test]
fn text_output_names_route_policies_and_decision_with_positions() {
    let out = run(
        &article(),
        &[
            "--from",
            "order-service",
            "--to",
            "payment-service",
            "-X",
            "POST",
            "--path",
            "/api/v1/payments",
        ],
    );
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let has = |needle: &str| {
        assert!(
            text.lines().any(|l| l.contains(needle)),
            "no line with {needle:?} in\n{text}"
        )
    };
    has("VirtualService production/payment-service (");
    has("http[0] (");
    has(&format!("{RESILIENCE}:10)"));
    has(
        "retries      3 on gateway-error,connect-failure,retriable-4xx; each try at most 2s, all within 5s",
    );
    has(&format!("{RESILIENCE}:31)"));
    has("tls server   STRICT (");
    has(&format!("{STRICT}:10)"));
    has("ALLOWED (200): allowed by rules[0] of ALLOW policy production/payment-service-authz");
    has(&format!("{AUTHZ}:12)"));
}

/// A copy of the article's directory with `extra` files added.
fn article_with(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for entry in std::fs::read_dir(article()).expect("the article's directory") {
        let path = entry.expect("a directory entry").path();
        let name = path.file_name().expect("a file name");
        std::fs::copy(&path, dir.path().join(name)).expect("copied");
    }
    for (name, text) in extra {
        std::fs::write(dir.path().join(name), text).expect("written");
    }
    dir
}

#[test]
fn a_deny_rule_decides_before_the_allow_rule_that_matches() {
    let deny = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-refunds
  namespace: production
spec:
  selector:
    matchLabels:
      app: payment-service
  action: DENY
  rules:
  - to:
    - operation:
        methods: [GET]
  - to:
    - operation:
        paths: [/api/v1/payments/refunds*]
";
    let dir = article_with(&[("zz-deny.yaml", deny)]);
    let e = explain(
        dir.path(),
        &[
            "--from",
            "order-service",
            "--to",
            "payment-service",
            "-X",
            "POST",
            "--path",
            "/api/v1/payments/refunds/7",
        ],
    );
    let a = &e["destinations"][0]["authorization"];
    assert_eq!(a["allowed"], false);
    assert_eq!(a["action"], "DENY");
    assert_eq!(a["policy"], "production/no-refunds");
    assert_eq!(a["rule"], 1);
    assert_eq!(a["at"]["line"], 15);
    assert!(a["at"]["file"].as_str().unwrap().ends_with("/zz-deny.yaml"));
    // Both policies apply; the ALLOW one alone would have allowed this request.
    let names: Vec<&str> = a["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["production/payment-service-authz", "production/no-refunds"]
    );
    let e = explain(
        dir.path(),
        &[
            "--from",
            "order-service",
            "--to",
            "payment-service",
            "-X",
            "POST",
            "--path",
            "/api/v1/payments/42",
        ],
    );
    let a = &e["destinations"][0]["authorization"];
    assert_eq!(a["allowed"], true);
    assert_eq!(a["rule"], 0);
}

const PAYMENT_ENTRY: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: payment-service
  namespace: production
spec:
  hosts: [payment-service.production.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 8080, name: http, protocol: HTTP}
  endpoints:
  - address: 127.0.0.1
    labels: {app: payment-service, version: v1}
";

#[test]
fn auto_mtls_follows_the_endpoints_and_strict_refuses_plaintext() {
    // An endpoint without a serviceAccount has no sidecar (the article's plain replica):
    // auto-mTLS sends it plaintext and the application answers, with neither
    // PeerAuthentication nor AuthorizationPolicy in the way.
    let dir = article_with(&[("zz-entry.yaml", PAYMENT_ENTRY)]);
    let args = [
        "--from",
        "order-service",
        "--to",
        "payment-service",
        "-X",
        "POST",
        "--path",
        "/api/v1/payments",
    ];
    let e = explain(dir.path(), &args);
    let d = &e["destinations"][0];
    assert_eq!(d["registered"], true);
    assert_eq!(d["endpoints"], 1);
    assert_eq!(d["port"], 8080);
    assert_eq!(d["tls"]["client"], "AUTO");
    assert_eq!(d["tls"]["clientTransport"], "plaintext");
    assert_eq!(d["tls"]["server"], "NONE");
    assert_eq!(d["tls"]["connection"], "plaintext");
    assert_eq!(d["authorization"]["principal"], Value::Null);
    assert_eq!(d["authorization"]["allowed"], true);
    let reason = d["authorization"]["reason"].as_str().unwrap();
    assert!(reason.contains("no sidecar"), "{reason}");
    // The workload's labels are the endpoint's.
    assert_eq!(d["authorization"]["labels"]["version"], "v1");
    assert!(
        d["authorization"]["labelsFrom"]
            .as_str()
            .unwrap()
            .contains("endpoint")
    );

    // With a serviceAccount the endpoint has a sidecar: Istio mTLS, and the POST passes.
    let with_sa = PAYMENT_ENTRY.replace(
        "    labels: {app: payment-service, version: v1}\n",
        "    labels: {app: payment-service, version: v1}\n    serviceAccount: payment-service\n",
    );
    let dir = article_with(&[("zz-entry.yaml", &with_sa)]);
    let e = explain(dir.path(), &args);
    let d = &e["destinations"][0];
    assert_eq!(d["tls"]["clientTransport"], "Istio mTLS");
    assert_eq!(d["tls"]["server"], "STRICT");
    assert_eq!(d["tls"]["connection"], "mTLS");
    assert_eq!(d["authorization"]["allowed"], true);
    assert_eq!(d["authorization"]["rule"], 0);
    // A GET to it is denied by the policy, as on any sidecar of the workload.
    let get: Vec<&str> = args
        .iter()
        .map(|a| if *a == "POST" { "GET" } else { a })
        .collect();
    let e = explain(dir.path(), &get);
    assert_eq!(e["destinations"][0]["authorization"]["allowed"], false);
    // Both replicas: a note for the one without a sidecar, the decision for the other.
    let two = with_sa.replace(
        "  - address: 127.0.0.1\n",
        "  - address: 127.0.0.2\n    labels: {app: payment-service, version: v1}\n  - address: 127.0.0.1\n",
    );
    let dir2 = article_with(&[("zz-entry.yaml", &two)]);
    let e = explain(dir2.path(), &args);
    let d = &e["destinations"][0];
    assert_eq!(d["endpoints"], 2);
    assert_eq!(
        d["tls"]["clientTransport"],
        "Istio mTLS to 1 of 2 endpoints (those with a sidecar), plaintext to the others"
    );
    assert_eq!(d["tls"]["connection"], "mTLS");
    assert!(
        e["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().starts_with("1 of 2 endpoints")),
        "{:#}",
        e["notes"]
    );
    // A DestinationRule `tls` replaces auto-mTLS, and is located.
    let disable = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: payment-service
spec:
  host: payment-service
  trafficPolicy:
    tls:
      mode: DISABLE
";
    let dir = article_with(&[
        ("zz-entry.yaml", &with_sa),
        ("payment-service-resilience.yaml", disable),
    ]);
    let e = explain(dir.path(), &args);
    let d = &e["destinations"][0];
    assert_eq!(d["tls"]["client"], "DISABLE");
    assert_eq!(d["tls"]["clientAt"]["line"], 8);
    assert!(
        d["tls"]["connection"]
            .as_str()
            .unwrap()
            .starts_with("refused")
    );
}

#[test]
fn an_external_dns_service_gets_plaintext_and_no_mesh_policy() {
    let entry = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
spec:
  hosts: [httpbin.org]
  location: MESH_EXTERNAL
  resolution: DNS
  ports:
  - {number: 80, name: http, protocol: HTTP}
";
    let dir = article_with(&[("zz-external.yaml", entry)]);
    let e = explain(
        dir.path(),
        &["--from", "order-service", "--to", "httpbin.org"],
    );
    // The service's default route (no VirtualService).
    assert_eq!(e["route"]["virtualHost"], "httpbin.org");
    assert_eq!(e["route"]["virtualService"], Value::Null);
    let d = &e["destinations"][0];
    assert_eq!(d["registered"], true);
    assert_eq!(d["port"], 80);
    assert_eq!(d["tls"]["clientTransport"], "plaintext");
    assert_eq!(d["tls"]["server"], "NONE");
    assert_eq!(d["tls"]["connection"], "plaintext");
    assert_eq!(d["authorization"]["allowed"], true);
}

#[test]
fn an_unknown_host_passes_through_the_sidecar_and_is_no_route_at_the_gateway() {
    let e = explain(
        &article(),
        &["--from", "order-service", "--to", "inventory"],
    );
    assert_eq!(e["route"], Value::Null);
    let outcome = e["outcome"].as_str().unwrap();
    assert!(outcome.starts_with("passthrough"), "{outcome}");
    assert_eq!(e["destinations"].as_array().unwrap().len(), 0);

    // At the gateway, a host no server owns, and a path no rule of the bound
    // VirtualService matches.
    let gateway = ["--gateway", "production/api-gateway"];
    let e = explain(
        &article(),
        &[&gateway[..], &["--to", "www.example.com"]].concat(),
    );
    let outcome = e["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with("404 NR: no server of Gateway"),
        "{outcome}"
    );
    assert_eq!(e["listener"]["server"], Value::Null);
    let e = explain(
        &article(),
        &[
            &gateway[..],
            &["--to", "api.example.com", "--path", "/admin"],
        ]
        .concat(),
    );
    let outcome = e["outcome"].as_str().unwrap();
    assert_eq!(
        outcome,
        "404 NR: no route of production/api-routing matches the request"
    );
}

#[test]
fn a_bad_configuration_exits_non_zero_with_the_loaders_diagnostics() {
    let dir = article_with(&[]);
    let canary = dir.path().join(CANARY);
    let text = std::fs::read_to_string(&canary).unwrap();
    std::fs::write(&canary, text.replace("weight: 5\n", "weight: -5\n")).unwrap();
    let out = run(
        dir.path(),
        &["--from", "web-frontend", "--to", "order-service"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let expected = format!(
        "{}:70:15: error: document 3, VirtualService/production/order-service, \
         spec.http[1].route[1].weight: weight -5 is negative",
        canary.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn a_request_without_a_sender_is_refused() {
    let out = run(&article(), &["--to", "order-service"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--from"), "{stderr}");
}

#[test]
fn the_readme_example_is_the_real_output() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let start = "$ mesh-proxy explain . --namespace production --from order-service \\\n    \
                 --to payment-service:8080 -X POST --path /api/v1/payments\n";
    let at = readme.find(start).expect("the README's explain example") + start.len();
    let shown = &readme[at..at + readme[at..].find("```").expect("end of the example")];
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .current_dir(article())
        .args([
            "explain",
            ".",
            "--namespace",
            "production",
            "--from",
            "order-service",
        ])
        .args([
            "--to",
            "payment-service:8080",
            "-X",
            "POST",
            "--path",
            "/api/v1/payments",
        ])
        .output()
        .expect("mesh-proxy runs");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), shown);
}
