//! The README stays true to the code: its embedding example is the doc test of
//! this crate, it lists every field that is parsed but not enforced, and the commands
//! it names exist.

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The first fenced `rust` block of the README.
fn readme_example(readme: &str) -> String {
    let start = readme.find("```rust\n").unwrap() + "```rust\n".len();
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].to_owned()
}

/// The doc test of `src/lib.rs` without its hidden lines.
fn doctest_example(lib: &str) -> String {
    let body: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .skip_while(|l| *l != "```")
        .skip(1)
        .take_while(|l| *l != "```")
        .filter(|l| !l.starts_with("# ") && *l != "#")
        .collect();
    body.join("\n") + "\n"
}

#[test]
fn readme_embedding_example_is_the_crate_doc_test() {
    let readme = read("../README.md");
    let lib = read("src/lib.rs");
    assert_eq!(readme_example(&readme), doctest_example(&lib));
}

#[test]
fn readme_lists_every_field_that_is_not_enforced() {
    let readme = read("../README.md");
    for n in mesh_core::config::NOT_ENFORCED {
        assert!(
            readme.contains(&format!("`{}`", n.pattern)),
            "README misses {}",
            n.pattern
        );
        assert!(
            readme.contains(n.effect),
            "README misses the effect of {}",
            n.pattern
        );
    }
}

#[test]
fn readme_commands_name_existing_targets() {
    let readme = read("../README.md");
    for cmd in [
        "cargo run -p examples --bin sidecar",
        "cargo test --workspace",
        "cargo run -p examples --bin embedded",
        "cargo bench -p benches",
    ] {
        assert!(readme.contains(cmd), "{cmd}");
    }
    let manifest = read("Cargo.toml");
    assert!(manifest.contains("name = \"sidecar\"") && manifest.contains("name = \"embedded\""));
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/README.md")
            .exists()
    );
}

/// Every key of the README's settings table, with a value of its type.
const SETTINGS_SAMPLE: &str = "
workload:
  name: payment-service-v1
  namespace: production
  serviceAccount: payment-service
  labels: {app: payment-service, version: v1}
  serviceHost: payment-service.production.svc.cluster.local
  locality: us-east1/us-east1-b
  network: network-1
trustDomain: cluster.local
clusterId: Kubernetes
configDir: istio
discovery:
  address: mesh-discovery.istio-system.svc:15012
  identity: spiffe://cluster.local/ns/istio-system/sa/mesh-discovery
  serverName: mesh-discovery.istio-system.svc
  tokenFile: /var/run/secrets/tokens/istio-token
  rootCert: /var/run/secrets/istio/root-cert.pem
svid:
  certDir: certs
  caDir: ca
  lifetime: 24h
listeners:
  inbound: 0.0.0.0:15006
  app: 127.0.0.1:8080
  appProtocol: HTTP
  outbound: 127.0.0.1:15001
  admin: 127.0.0.1:15000
  protocolDetectionTimeout: 1s
  tcp:
    127.0.0.1:6379: redis.data:6379
  capture: false
dns:
  servers: [127.0.0.1:53]
  refreshRate: 60s
tracing:
  sampling: 1
  otlp: http://127.0.0.1:4318/v1/traces
  zipkin: http://127.0.0.1:9411/api/v2/spans
accessLog:
  path: \"-\"
  format: TEXT
pathNormalization: BASE
gatewayTopology:
  numTrustedProxies: 1
  forwardClientCertDetails: SANITIZE_SET
  untrustedHeaders: [x-user-id]
limits:
  maxRequestTargetBytes: 8192
  maxRequestHeaderBytes: 61440
  maxHeaders: 100
  requestHeadersTimeout: 10s
  streamIdleTimeout: 5m
  requestTimeout: 0s
  maxRequestBodyBytes: 0
  maxResponseBodyBytes: 0
  idleTimeout: 1h
  http2MaxConcurrentStreams: 100
  drainTimeout: 5s
  maxRetryBodyBytes: 65536
  connectTimeout: 10s
  maxConnections: 10000
outboundTrafficPolicy:
  mode: ALLOW_ANY
randomSeed: 7
gateway:
  name: api-gateway
  namespace: production
  credentialsDir: credentials
  ports:
    443: 0.0.0.0:8443
";

/// Dotted key paths of a YAML mapping's leaves (maps under `labels` and `ports` are
/// values, not keys).
fn leaf_keys(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    match v.as_object() {
        // Maps whose keys are data, not settings: labels, gateway ports, TCP egress.
        Some(map)
            if !prefix.ends_with("labels")
                && !prefix.ends_with("ports")
                && prefix != "listeners.tcp" =>
        {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(&p, v, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn readme_settings_reference_matches_the_proxy_parser() {
    // The sample parses with the proxy's parser, which rejects unknown keys; certDir and
    // caDir, otlp and zipkin, configDir and discovery exclude each other, so each part is
    // checked on its own.
    let discovery = SETTINGS_SAMPLE
        .lines()
        .skip_while(|l| !l.starts_with("discovery:"))
        .take_while(|l| !l.starts_with("svid:"))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    assert!(discovery.contains("address:"), "{discovery}");
    let local = SETTINGS_SAMPLE.replace(&discovery, "");
    let files = local
        .replace("  caDir: ca\n  lifetime: 24h\n", "")
        .replace("  zipkin: http://127.0.0.1:9411/api/v2/spans\n", "");
    let issuer = local
        .replace("  certDir: certs\n", "")
        .replace("  otlp: http://127.0.0.1:4318/v1/traces\n", "");
    let control_plane = files
        .replace("configDir: istio\n", &discovery)
        .replace("svid:\n  certDir: certs\n", "");
    for sample in [files, issuer, control_plane] {
        mesh_proxy::Settings::from_yaml("sample.yaml", &sample).unwrap();
    }
    let value: serde_json::Value = serde_saphyr::from_str(SETTINGS_SAMPLE).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &value, &mut keys);

    let readme = read("../README.md");
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("### Settings reference"))
        .take_while(|l| !l.starts_with("## Istio resources"))
        .filter(|l| l.starts_with("| `"))
        .collect();
    let documented: String = table
        .iter()
        .map(|l| l.split('|').nth(1).unwrap_or(""))
        .collect();
    for key in &keys {
        assert!(
            documented.contains(&format!("`{key}`")),
            "README does not document `{key}`"
        );
    }
    for row in &table {
        let cell = row.split('|').nth(1).unwrap_or("");
        for key in cell.split('`').skip(1).step_by(2) {
            assert!(
                keys.iter().any(|k| k == key),
                "README documents `{key}`, which the sample lacks"
            );
        }
    }
}
