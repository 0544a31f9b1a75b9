//! `mesh-proxy inject`: a stream of Kubernetes manifests with the sidecar injected into
//! every pod template, as `istioctl kube-inject` does.
//!
//! Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs
//! and CronJobs are injected (the pod template of each; a `List`'s items one by one);
//! any other document is written back unchanged. A template that opts out
//! (`sidecar.istio.io/inject: "false"`) or is injected already is left as it is, with a
//! note saying so. The namespace of an object without one is the one given (as
//! `kubectl apply -n` would place it). Comments are not kept.

use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::{InjectOptions, inject_pod, injection_required};

/// A manifest that could not be injected: where, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}{}: {message}", .line.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default(), .object.as_ref().map(|o| format!(": {o}")).unwrap_or_default())]
pub struct ManifestError {
    /// The input's name.
    pub file: String,
    /// Line and column, for YAML errors.
    pub line: Option<(u64, u64)>,
    /// The object (`Kind/namespace/name`, with the document's number), when known.
    pub object: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// Injects every pod template of the YAML stream `text` (named `file` in errors);
/// objects without a namespace are taken to be in `namespace`. Returns the stream and a
/// note for each template left uninjected.
pub fn inject_manifests(
    file: &str,
    text: &str,
    namespace: &str,
    options: &InjectOptions,
) -> Result<(String, Vec<String>), ManifestError> {
    let documents: Vec<Value> =
        serde_saphyr::from_str_multiple(text).map_err(|e| ManifestError {
            file: file.to_owned(),
            line: e.location().map(|l| (l.line(), l.column())),
            object: None,
            message: e.to_string().lines().next().unwrap_or_default().to_owned(),
        })?;
    let mut notes = Vec::new();
    let mut out = String::new();
    for (index, mut doc) in documents.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        inject_object(&mut doc, namespace, options, &mut notes).map_err(|(object, message)| {
            ManifestError {
                file: file.to_owned(),
                line: None,
                object: Some(format!("document {}, {object}", index + 1)),
                message,
            }
        })?;
        let yaml = serde_saphyr::to_string(&doc).map_err(|e| ManifestError {
            file: file.to_owned(),
            line: None,
            object: Some(format!("document {}", index + 1)),
            message: e.to_string(),
        })?;
        out.push_str("---\n");
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok((out, notes))
}

/// `Kind/namespace/name` of `doc`.
fn describe(doc: &Value, namespace: &str) -> String {
    let kind = doc["kind"].as_str().unwrap_or("object");
    let meta = &doc["metadata"];
    let name = meta["name"]
        .as_str()
        .or_else(|| meta["generateName"].as_str())
        .unwrap_or("");
    let ns = meta["namespace"].as_str().unwrap_or(namespace);
    format!("{kind}/{ns}/{name}")
}

fn inject_object(
    doc: &mut Value,
    namespace: &str,
    options: &InjectOptions,
    notes: &mut Vec<String>,
) -> Result<(), (String, String)> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    if (kind == "List" || kind.ends_with("List")) && doc["items"].is_array() {
        if let Some(items) = doc["items"].as_array_mut() {
            for item in items {
                inject_object(item, namespace, options, notes)?;
            }
        }
        return Ok(());
    }
    let what = describe(doc, namespace);
    let ns = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or(namespace)
        .to_owned();
    let name = doc["metadata"]["name"]
        .as_str()
        .or_else(|| doc["metadata"]["generateName"].as_str())
        .unwrap_or_default()
        .trim_end_matches('-')
        .to_owned();
    let template = match (group, kind.as_str()) {
        ("", "Pod") => {
            return inject_pod_doc(doc, &ns, &name, options, notes).map_err(|e| (what, e));
        }
        ("apps" | "extensions", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("", "ReplicationController")
        | ("batch", "Job") => doc.pointer_mut("/spec/template"),
        ("batch", "CronJob") => doc.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => return Ok(()),
    };
    let Some(template) = template else {
        return Err((what, "no pod template (spec.template)".to_owned()));
    };
    let mut parsed: PodTemplateSpec = serde_json::from_value(template.clone())
        .map_err(|e| (what.clone(), format!("the pod template: {e}")))?;
    let mut meta = parsed.metadata.take().unwrap_or_default();
    let Some(mut spec) = parsed.spec.take() else {
        return Err((what, "the pod template has no spec".to_owned()));
    };
    if let Err(why) = injection_required(&ns, None, &meta, &spec, &options.revision) {
        notes.push(format!("{what}: not injected: {why}"));
        return Ok(());
    }
    inject_pod(&mut meta, &mut spec, &ns, &name, options)
        .map_err(|e| (what.clone(), e.to_string()))?;
    parsed.metadata = Some(meta);
    parsed.spec = Some(spec);
    *template =
        serde_json::to_value(&parsed).map_err(|e| (what, format!("writing the template: {e}")))?;
    Ok(())
}

fn inject_pod_doc(
    doc: &mut Value,
    namespace: &str,
    name: &str,
    options: &InjectOptions,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let what = describe(doc, namespace);
    let mut meta: ObjectMeta =
        serde_json::from_value(doc["metadata"].clone()).map_err(|e| format!("metadata: {e}"))?;
    let mut spec: PodSpec =
        serde_json::from_value(doc["spec"].clone()).map_err(|e| format!("spec: {e}"))?;
    if let Err(why) = injection_required(namespace, None, &meta, &spec, &options.revision) {
        notes.push(format!("{what}: not injected: {why}"));
        return Ok(());
    }
    inject_pod(&mut meta, &mut spec, namespace, name, options).map_err(|e| e.to_string())?;
    doc["metadata"] = serde_json::to_value(&meta).map_err(|e| e.to_string())?;
    doc["spec"] = serde_json::to_value(&spec).map_err(|e| e.to_string())?;
    Ok(())
}
