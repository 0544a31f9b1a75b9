//! The Helm chart in `deploy/helm/mesh`: `helm lint`, and `helm template` applied with
//! `kubectl apply --dry-run=server` to a real API server (every object is admitted by
//! the server's own validation), with and without Istio's CRDs, the webhooks and the
//! gateway.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::peers::{ApiServer, peer};

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/mesh")
}

fn helm(helm: &PathBuf, args: &[&str]) -> String {
    let out = Command::new(helm).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "helm {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kinds(manifest: &str) -> Vec<String> {
    manifest
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_chart_lints_and_every_object_is_admitted_by_the_api_server() {
    let Some(helm_bin) = peer("helm") else { return };
    let Some(server) = ApiServer::start() else {
        return;
    };
    let chart = chart();
    let chart = chart.to_str().unwrap();
    helm(&helm_bin, &["lint", "--strict", chart]);

    server.kubectl(&["create", "namespace", "istio-system"], "");
    let full = helm(
        &helm_bin,
        &["template", "mesh", chart, "--namespace", "istio-system"],
    );
    let kinds_full = kinds(&full);
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "ConfigMap",
    ] {
        assert!(
            kinds_full.iter().any(|k| k == kind),
            "no {kind} in:\n{full}"
        );
    }
    // discovery serves injection on the webhook port, with the MutatingWebhookConfiguration
    // it keeps; the default revision answers Istio's four selectors.
    for arg in [
        "--webhook=0.0.0.0:15017",
        "--inject",
        "--injector-config=mesh-sidecar-injector-istio-system",
        "--proxy-image=mesh-proxy:0.1.0",
    ] {
        assert!(full.contains(&format!("- {arg}\n")), "no {arg} in:\n{full}");
    }
    for webhook in ["rev.namespace", "rev.object", "namespace", "object"] {
        assert!(
            full.contains(&format!(
                "- name: {webhook}.injection.mesh.istio-system.svc\n"
            )),
            "{full}"
        );
    }
    // Injection alone still opens the webhook port; a revision drops the default
    // revision's selectors.
    let canary = helm(
        &helm_bin,
        &[
            "template",
            "mesh",
            chart,
            "--namespace",
            "istio-system",
            "--set",
            "webhook.enabled=false,injection.revision=canary,injection.failurePolicy=Ignore",
        ],
    );
    assert!(canary.contains("- --webhook=0.0.0.0:15017\n"), "{canary}");
    assert!(canary.contains("failurePolicy: Ignore"), "{canary}");
    assert!(canary.contains("- name: rev.namespace.injection.mesh.istio-system.svc"));
    assert!(!canary.contains("- name: namespace.injection.mesh.istio-system.svc"));
    assert!(
        !kinds(&canary)
            .iter()
            .any(|k| k == "ValidatingWebhookConfiguration")
    );

    // The CRDs first (the server must know them before objects of their kinds).
    let out = server.kubectl(&["apply", "--dry-run=server", "-f", "-"], &full);
    for line in out.lines() {
        assert!(line.ends_with("(server dry run)"), "{out}");
    }
    assert_eq!(out.lines().count(), kinds_full.len(), "{out}");

    // With Istio's own CRDs installed already, the chart leaves them alone.
    let without = helm(
        &helm_bin,
        &[
            "template",
            "mesh",
            chart,
            "--namespace",
            "istio-system",
            "--set",
            "crds.install=false,gateway.enabled=false,webhook.enabled=false,injection.enabled=false",
        ],
    );
    let kinds_without = kinds(&without);
    assert!(
        !kinds_without
            .iter()
            .any(|k| k == "CustomResourceDefinition")
    );
    for kind in [
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ] {
        assert!(!kinds_without.iter().any(|k| k == kind), "{without}");
    }
    assert!(!without.contains("--webhook=") && !without.contains("--inject"));
    let out = server.kubectl(&["apply", "--dry-run=server", "-f", "-"], &without);
    assert_eq!(out.lines().count(), kinds_without.len(), "{out}");
}
