//! HTTP/2 conformance of the sidecar's listeners, checked by a real conformance peer:
//! h2spec (RFC 9113 and RFC 7541 cases) against the outbound listener (h2c).
//!
//! h2spec is built from its Go module by `.ci/peers`, which this test runs when the
//! peer cache has no h2spec yet; where Go is missing the test fails under `CI` and says
//! it skipped elsewhere.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

/// Cases that fail today, and why; `always` when the case fails on every run. A case
/// failing outside this list fails the test, and so does an `always` case that starts to
/// pass (the list must then shrink).
const KNOWN_FAILURES: &[(&str, &str, bool, &str)] = &[
    (
        "http2/3.5",
        "Sends invalid connection preface",
        true,
        "the listeners tell HTTP/1.1 from h2c by the first bytes (as Envoy's AUTO codec): \
         an invalid preface is read as HTTP/1.1 and answered 400, not with a GOAWAY",
    ),
    (
        "http2/8.1.2.1",
        "Sends a HEADERS frame that contains a pseudo-header field as trailers",
        false,
        "the h2 crate does not reset a stream whose trailers carry a pseudo-header field \
         (RFC 9113 §8.1); the case passes only when the answer is sent before the trailers \
         are read",
    ),
];

/// The `(section, case)` pairs that failed in an h2spec JUnit report.
fn failures(junit: &str) -> Vec<(String, String)> {
    let doc = roxmltree::Document::parse(junit).expect("a JUnit report");
    doc.descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .filter(|case| {
            case.children()
                .any(|c| c.has_tag_name("failure") || c.has_tag_name("error"))
        })
        .map(|case| {
            let attr = |name| case.attribute(name).unwrap_or("").to_owned();
            (attr("package"), attr("classname"))
        })
        .collect()
}

/// Runs h2spec against the plaintext (h2c) listener on `port` with `:authority`
/// `localhost:<port>`; its failures.
async fn run(
    h2spec: &std::path::Path,
    world: &World,
    name: &str,
    port: u16,
) -> Vec<(String, String)> {
    let report = world.path(&format!("{name}-h2spec.xml"));
    let out = tokio::process::Command::new(h2spec)
        .args(["-h", "localhost", "-p", &port.to_string(), "-o", "5", "-j"])
        .arg(&report)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("tests,"))
        .unwrap_or("no summary");
    println!("{name}: {summary}");
    failures(&std::fs::read_to_string(&report).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_and_inbound_listeners_pass_h2spec_but_for_the_known_cases() {
    let Some(h2spec) = peers::peer("h2spec") else {
        return;
    };
    let world = World::new();
    let app = App::start(Behaviour::Ok("ok")).await;
    let ports = Ports::new();
    // h2spec's requests name `localhost:<outbound port>`: a service of the mesh whose one
    // endpoint, without a sidecar, is the application, so every case goes through the
    // whole outbound stack to an application that reads the request before answering.
    // No PeerAuthentication: the inbound listener is PERMISSIVE and takes h2c too.
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: localhost, namespace: production}}
spec:
  hosts: [localhost]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: {outbound}, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {app}}}}}
",
        outbound = ports.outbound,
        app = app.addr.port(),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let proxy = start_sidecar(&world, "order-service", &config, ports, app.addr).await;
    for (name, port) in [("outbound", ports.outbound), ("inbound", ports.inbound)] {
        let failed = run(&h2spec, &world, name, port).await;
        let unexpected: Vec<_> = failed
            .iter()
            .filter(|(s, c)| {
                !KNOWN_FAILURES
                    .iter()
                    .any(|(ks, kc, _, _)| s == ks && c == kc)
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "{name}: h2spec cases failed: {unexpected:#?}\n{}",
            proxy.output()
        );
        for (section, case, _, why) in KNOWN_FAILURES.iter().filter(|k| k.2) {
            assert!(
                failed.iter().any(|(s, c)| s == section && c == case),
                "{name}: {section} \"{case}\" passes now ({why}): remove it from the known failures"
            );
        }
    }
}
