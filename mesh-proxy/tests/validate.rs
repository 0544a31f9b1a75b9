//! `mesh-proxy validate` run as a process on good and bad configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mesh_proxy(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .arg("validate")
        .args(args)
        .output()
        .expect("mesh-proxy runs")
}

fn fixtures(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mesh-core/tests/fixtures")
        .join(rel)
}

fn stdout_lines(o: &Output) -> Vec<String> {
    String::from_utf8(o.stdout.clone())
        .expect("output is UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn good_directory_prints_one_summary_per_resource_and_exits_0() {
    let dir = fixtures("article");
    let out = mesh_proxy(&[dir.as_os_str()]);
    let lines = stdout_lines(&out);
    assert_eq!(out.status.code(), Some(0), "{lines:#?}");
    let summaries = [
        "Gateway default/api-gateway: 1 server",
        "VirtualService default/api-routing: 2 http routes",
        "AuthorizationPolicy production/payment-service-authz: ALLOW, 1 rule",
        "DestinationRule default/order-service: host order-service, 2 subsets",
        "VirtualService default/order-service: 2 http routes",
        "VirtualService default/payment-service: 1 http route",
        "DestinationRule default/payment-service: host payment-service, 0 subsets",
        "PeerAuthentication production/default: mode STRICT, namespace scope",
    ];
    assert_eq!(&lines[..summaries.len()], summaries);
    let canary = dir.join("canary-order-service.yaml");
    assert!(lines.contains(&format!(
        "{}:5:7: note: document 1: skipped Deployment apps/v1 order-service-v2: not an Istio resource",
        canary.display()
    )));
    // Every field of the article's YAML is enforced (its `h2UpgradePolicy: UPGRADE` too).
    assert!(!lines.iter().any(|l| l.contains("warning:")), "{lines:#?}");
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("OK: 8 resources, 0 warnings (config version "),
        "{last}"
    );
}

#[test]
fn namespace_option_sets_the_default_namespace() {
    let file = fixtures("istio-samples/virtual-service-reviews-90-10.yaml");
    let out = mesh_proxy(&[
        "--namespace".as_ref(),
        "bookinfo".as_ref(),
        file.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout_lines(&out)[0],
        "VirtualService bookinfo/reviews: 1 http route"
    );
}

#[test]
fn bad_directory_prints_every_error_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a-routes.yaml"),
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: prod
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: -1
    - destination: {host: reviews, subset: v2}
      weight: 0
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: prod
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b-policy.yaml"),
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: prod
spec:
  action: DENY
",
    )
    .unwrap();
    std::fs::write(dir.path().join("c-broken.yml"), "kind: [unclosed\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml, not read").unwrap();

    let out = mesh_proxy(&[dir.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stdout_lines(&out);
    let d = dir.path().display();
    assert_eq!(
        lines,
        [
            format!(
                "{d}/a-routes.yaml:11:15: error: document 1, VirtualService/prod/reviews, spec.http[0].route[0].weight: weight -1 is negative; weights must be 0 or more"
            ),
            format!(
                "{d}/a-routes.yaml:10:7: error: document 1, VirtualService/prod/reviews, spec.http[0].route: total destination weight is 0 across 2 destinations; give at least one destination a positive weight"
            ),
            format!(
                "{d}/b-policy.yaml:7:3: error: document 1, AuthorizationPolicy/prod/deny-all, spec: a DENY policy without rules never matches; add `rules: [{{}}]` to match every request, or add rules"
            ),
            format!(
                "{d}/c-broken.yml:1:7: error: document 1: YAML syntax error: unclosed bracket '['"
            ),
            "FAILED: 4 errors, 0 warnings".to_owned(),
        ]
    );
}

#[test]
fn missing_path_is_an_error() {
    let out = mesh_proxy(&["/nonexistent/mesh-config".as_ref()]);
    assert_eq!(out.status.code(), Some(1));
    let lines = stdout_lines(&out);
    assert!(
        lines[0].starts_with("/nonexistent/mesh-config: error: cannot read: "),
        "{lines:?}"
    );
}

#[test]
fn no_path_is_a_usage_error() {
    let out = mesh_proxy(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("<PATHS>..."));
}

const DENY_ON_PORTS: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: no-admin
  namespace: production
spec:
  selector:
    matchLabels: {app: order-service}
  action: DENY
  rules:
  - to:
    - operation:
        ports: [\"8080\", \"9090\"]
        paths: [/admin]
";

#[test]
fn deny_rule_for_a_port_the_workload_does_not_serve_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deny.yaml");
    std::fs::write(&file, DENY_ON_PORTS).unwrap();
    let out = mesh_proxy(&[
        file.as_os_str(),
        "--workload-port".as_ref(),
        "8080".as_ref(),
    ]);
    let lines = stdout_lines(&out);
    assert_eq!(out.status.code(), Some(0), "{lines:#?}");
    let want = format!(
        "{}:13:25: warning: document 1, AuthorizationPolicy/production/no-admin, \
         spec.rules[0].to[0].operation.ports[1]: DENY for port 9090, which this workload does \
         not serve (it serves 8080): this condition never matches, so the rule denies nothing \
         on it",
        file.display()
    );
    assert!(lines.contains(&want), "{lines:#?}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("OK: 1 resource, 1 warning"),
        "{lines:#?}"
    );
    // Both ports served: nothing to say.
    let out = mesh_proxy(&[
        file.as_os_str(),
        "--workload-port".as_ref(),
        "8080".as_ref(),
        "--workload-port".as_ref(),
        "9090".as_ref(),
    ]);
    assert!(
        stdout_lines(&out)
            .last()
            .unwrap()
            .starts_with("OK: 1 resource, 0 warnings")
    );
    // Without the ports the files do not say what the workload serves: no check.
    let out = mesh_proxy(&[file.as_os_str()]);
    let lines = stdout_lines(&out);
    assert!(
        !lines.iter().any(|l| l.contains("DENY for port")),
        "{lines:#?}"
    );
}
