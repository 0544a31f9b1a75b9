//! The admission webhooks: Istio resources checked at `kubectl apply`, sidecars injected
//! into new pods.
//!
//! [`serve_webhooks`] answers the API server's `AdmissionReview` (`admission.k8s.io/v1`)
//! requests over HTTPS (HTTP/1.1 or HTTP/2, as the server's ALPN offers) on two paths:
//!
//! - `POST /validate`: each object is validated with the same rules and the same located
//!   diagnostics as [`KubeSource`](super::kube::KubeSource) applies when it reads the
//!   object back ([`validate_object`]), so `kubectl apply` of an invalid VirtualService
//!   fails with, for example,
//!   `error: VirtualService/default/reviews, spec.http[0].route[1].weight: weight -1 is
//!   negative; weights must be 0 or more`.
//! - `POST /inject` (Istio's path, when injection is on): a Pod being created gets the
//!   sidecar ([`crate::inject`]) as a JSON patch. The webhook configuration's selectors
//!   choose the namespaces and pods (Istio's: `istio-injection=enabled`, `istio.io/rev`,
//!   the pod's `sidecar.istio.io/inject` label); the webhook itself honours the pod's
//!   `sidecar.istio.io/inject` annotation, `hostNetwork`, and never injects twice, so a
//!   reinvocation changes nothing. A pod whose injection annotations are invalid is
//!   refused with the annotation and the reason.
//!
//! # Behaviour
//!
//! - `CREATE` and `UPDATE` of a kind the mesh reads are validated; errors deny the
//!   request (HTTP 200 with `allowed: false` and the messages, one per line, as the
//!   reason); warnings are returned as admission warnings, which `kubectl` prints.
//! - `DELETE`, `CONNECT` and kinds the mesh does not read (`EnvoyFilter`, `Telemetry`,
//!   ...) are allowed: the webhook only guards what the mesh would reject. `Sidecar` and
//!   `WorkloadEntry` are read, so they are validated.
//! - On `/inject`, anything but the creation of a Pod is allowed unchanged.
//! - A body that is not an `AdmissionReview` gets HTTP 400; another path 404; another
//!   method 405. Bodies are limited to 3 MiB (the API server's own object limit is
//!   about 1.5 MiB).
//! - [`serve_webhooks`] serves like the proxy's other internal servers
//!   ([`serve::run`](crate::serve::run): at most 64 connections, the proxy's header
//!   limits, a failed accept retried); a TLS handshake that fails or takes over 10 s
//!   drops that connection only. When `shutdown` is cancelled it stops accepting and
//!   drains.
//!
//! # Choices that differ from Istio
//!
//! - The rules are the mesh's loader's, which are stricter than istiod's in the places
//!   `mesh_core::config` lists (unknown fields, `action: CUSTOM`, principals written with
//!   `spiffe://`, ...): some objects istiod's webhook admits are refused here, always with
//!   the reason and the field.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use mesh_core::config::{Kind, LoadOptions};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use k8s_openapi::api::core::v1::Pod;

use super::kube::validate_object;
use crate::inject::InjectOptions;

/// The largest request body accepted.
const MAX_BODY: usize = 3 << 20;

/// Serves the validating webhook on `listener` with `tls` until `shutdown` is
/// cancelled.
pub async fn serve_webhook(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    options: LoadOptions,
    shutdown: CancellationToken,
) {
    serve_webhooks(listener, tls, options, None, shutdown).await;
}

/// Serves the validating webhook and, with `inject`, the injection webhook on
/// `listener` with `tls` until `shutdown` is cancelled.
pub async fn serve_webhooks(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    options: LoadOptions,
    inject: Option<InjectOptions>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let options = Arc::new(options);
    let inject = inject.map(Arc::new);
    let service = tower::service_fn(move |req: Request<Incoming>| {
        let options = options.clone();
        let inject = inject.clone();
        async move { Ok::<_, Infallible>(handle(req, &options, inject.as_deref()).await) }
    });
    let builder = Arc::new(crate::serve::builder(&crate::settings::Limits::default()));
    crate::serve::run(
        listener,
        crate::serve::Options::internal(builder, shutdown),
        move |tcp, peer| {
            let acceptor = acceptor.clone();
            let service = service.clone();
            async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                match handshake {
                    Ok(Ok(stream)) => Some((stream, service)),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "webhook TLS handshake timed out");
                        None
                    }
                }
            }
        },
    )
    .await;
}

/// Longest TLS handshake of a webhook connection.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn handle(
    req: Request<Incoming>,
    options: &LoadOptions,
    inject: Option<&InjectOptions>,
) -> Response<Full<Bytes>> {
    let injecting = match (req.uri().path(), inject) {
        ("/validate", _) => None,
        ("/inject", Some(inject)) => Some(inject),
        _ if inject.is_some() => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found; the webhook serves /validate and /inject",
            );
        }
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found; the webhook serves /validate",
            );
        }
    };
    if req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only POST");
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {e}"),
            );
        }
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("not an AdmissionReview: {e}"),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("not an AdmissionReview request: {e}"),
            );
        }
    };
    let response = match injecting {
        Some(inject) => inject_request(&request, inject),
        None => review_request(&request, options),
    };
    match serde_json::to_vec(&response.into_review()) {
        Ok(json) => Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "response")),
        Err(e) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot write the response: {e}"),
        ),
    }
}

/// The answer to one admission request.
pub fn review_request(
    request: &AdmissionRequest<DynamicObject>,
    options: &LoadOptions,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if !matches!(request.operation, Operation::Create | Operation::Update)
        || Kind::from_name(&request.kind.kind).is_none()
    {
        return response;
    }
    let Some(object) = &request.object else {
        return response.deny("the request has no object");
    };
    let mut json = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return response.deny(format!("cannot read the object: {e}")),
    };
    let group_version = if request.kind.group.is_empty() {
        request.kind.version.clone()
    } else {
        format!("{}/{}", request.kind.group, request.kind.version)
    };
    json["apiVersion"] = group_version.into();
    json["kind"] = request.kind.kind.clone().into();
    // On CREATE with generateName the name is not known yet; the request's namespace
    // is the object's.
    if json["metadata"]["namespace"]
        .as_str()
        .is_none_or(str::is_empty)
        && let Some(ns) = &request.namespace
    {
        json["metadata"]["namespace"] = ns.clone().into();
    }
    match validate_object(&json, options) {
        Ok((_, warnings)) => {
            let mut response = response;
            if !warnings.is_empty() {
                response.warnings =
                    Some(warnings.iter().map(|w| w.in_object().to_string()).collect());
            }
            response
        }
        Err(errors) => {
            let message = errors
                .iter()
                .map(|d| d.in_object().to_string())
                .collect::<Vec<_>>()
                .join("\n");
            tracing::info!(
                object = %format!("{}/{}/{}", request.kind.kind, request.namespace.as_deref().unwrap_or_default(), request.name),
                "refused at admission:\n{message}"
            );
            response.deny(message)
        }
    }
}

/// The answer to one injection request: the sidecar as a JSON patch, or nothing.
pub fn inject_request(
    request: &AdmissionRequest<DynamicObject>,
    options: &InjectOptions,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if request.operation != Operation::Create
        || request.kind.kind != "Pod"
        || !request.kind.group.is_empty()
    {
        return response;
    }
    let Some(object) = &request.object else {
        return response.deny("the request has no object");
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(p) => p,
        Err(e) => return response.deny(format!("cannot read the pod: {e}")),
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let what = format!("Pod/{namespace}/{name}");
    let Some(spec) = pod.spec.as_ref() else {
        return response.deny(format!("{what}: the pod has no spec"));
    };
    if let Err(why) =
        crate::inject::injection_required(&namespace, None, &pod.metadata, spec, &options.revision)
    {
        tracing::debug!(pod = %what, "not injected: {why}");
        return response;
    }
    let mut injected = pod.clone();
    let mut meta = injected.metadata.clone();
    let mut spec = spec.clone();
    match crate::inject::inject_pod(
        &mut meta,
        &mut spec,
        &namespace,
        workload_name(&pod.metadata),
        options,
    ) {
        Ok(true) => {}
        Ok(false) => return response,
        Err(e) => {
            tracing::info!(pod = %what, "refused at injection: {e}");
            return response.deny(format!("{what}: {e}"));
        }
    }
    injected.metadata = meta;
    injected.spec = Some(spec);
    let (Ok(before), Ok(after)) = (serde_json::to_value(&pod), serde_json::to_value(&injected))
    else {
        return response.deny(format!("{what}: cannot write the injected pod"));
    };
    let patch = json_patch::diff(&before, &after);
    tracing::info!(pod = %what, "sidecar injected");
    match response.clone().with_patch(patch) {
        Ok(r) => r,
        Err(e) => response.deny(format!("{what}: cannot write the patch: {e}")),
    }
}

/// The workload a pod belongs to, for its canonical name when it has no `app` label:
/// its controller's name (a ReplicaSet's pods are `<deployment>-<hash>-<suffix>`), else
/// its own.
fn workload_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if let Some(owner) = owner {
        if owner.kind == "ReplicaSet"
            && let Some((deployment, _hash)) = owner.name.rsplit_once('-')
        {
            return deployment;
        }
        // A CronJob's Jobs are `<cronjob>-<scheduled time in minutes>`.
        if owner.kind == "Job"
            && let Some((cronjob, time)) = owner.name.rsplit_once('-')
            && !time.is_empty()
            && time.bytes().all(|b| b.is_ascii_digit())
        {
            return cronjob;
        }
        return &owner.name;
    }
    meta.name
        .as_deref()
        .or(meta
            .generate_name
            .as_deref()
            .map(|g| g.trim_end_matches('-')))
        .unwrap_or("")
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn request(operation: &str, kind: &str, weight: i64) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "networking.istio.io", "version": "v1beta1", "kind": kind},
                "resource": {"group": "networking.istio.io", "version": "v1beta1", "resource": "x"},
                "name": "reviews",
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": {
                    "apiVersion": "networking.istio.io/v1beta1",
                    "kind": kind,
                    "metadata": {"name": "reviews", "namespace": "shop"},
                    "spec": {"hosts": ["reviews"], "http": [{"route": [
                        {"destination": {"host": "reviews"}, "weight": weight}
                    ]}]}
                },
                "dryRun": false
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    #[test]
    fn invalid_objects_are_denied_with_the_located_message() {
        let r = review_request(
            &request("CREATE", "VirtualService", -1),
            &LoadOptions::default(),
        );
        assert!(!r.allowed);
        assert_eq!(r.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(
            r.result.message,
            "error: VirtualService/shop/reviews, spec.http[0].route[0].weight: \
             weight -1 is negative; weights must be 0 or more"
        );
    }

    #[test]
    fn valid_objects_deletes_and_other_kinds_are_allowed() {
        let options = LoadOptions::default();
        assert!(review_request(&request("UPDATE", "VirtualService", 100), &options).allowed);
        assert!(review_request(&request("DELETE", "VirtualService", -1), &options).allowed);
        assert!(review_request(&request("CREATE", "EnvoyFilter", -1), &options).allowed);
        // Sidecars are read, so validated: this one has a VirtualService's fields.
        assert!(!review_request(&request("CREATE", "Sidecar", 100), &options).allowed);
    }

    fn pod_review(
        operation: &str,
        labels: serde_json::Value,
        annotations: serde_json::Value,
    ) -> (serde_json::Value, AdmissionRequest<DynamicObject>) {
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "payment-service-v1-7d4b9c-",
                "namespace": "production",
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "payment-service-v1-7d4b9c", "uid": "1", "controller": true}],
            },
            "spec": {"serviceAccountName": "payment-service",
                     "containers": [{"name": "app", "image": "payment:1"}]},
        });
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "1b4b6f2a-0000-4000-8000-000000000001",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "production",
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod,
                "dryRun": false
            }
        }))
        .unwrap();
        (pod, review.try_into().unwrap())
    }

    #[test]
    fn pods_are_injected_by_a_json_patch_that_applies_to_the_pod() {
        let options = InjectOptions::default();
        let (mut pod, request) = pod_review(
            "CREATE",
            serde_json::json!({"app": "payment-service"}),
            serde_json::json!({}),
        );
        let response = inject_request(&request, &options);
        assert!(response.allowed);
        let patch: json_patch::Patch =
            serde_json::from_slice(response.patch.as_deref().unwrap()).unwrap();
        let review = serde_json::to_value(response.into_review()).unwrap();
        assert_eq!(review["response"]["patchType"], "JSONPatch");
        json_patch::patch(&mut pod, &patch).unwrap();
        let containers: Vec<&str> = pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(containers, ["app", "istio-proxy"]);
        assert_eq!(
            pod["metadata"]["labels"]["security.istio.io/tlsMode"],
            "istio"
        );
        assert_eq!(
            pod["metadata"]["labels"]["service.istio.io/canonical-name"],
            "payment-service"
        );

        // The patched pod sent again (a reinvocation) is not patched twice.
        let (_, mut again) = pod_review("CREATE", serde_json::json!({}), serde_json::json!({}));
        again.object = Some(serde_json::from_value(pod).unwrap());
        let review = serde_json::to_value(inject_request(&again, &options).into_review()).unwrap();
        assert!(review["response"]["allowed"].as_bool().unwrap());
        assert!(review["response"].get("patch").is_none(), "{review:#}");
    }

    #[test]
    fn opted_out_pods_and_other_operations_pass_and_bad_annotations_are_refused() {
        let options = InjectOptions::default();
        let unpatched = |request: &AdmissionRequest<DynamicObject>| {
            let review =
                serde_json::to_value(inject_request(request, &options).into_review()).unwrap();
            review["response"]["allowed"].as_bool().unwrap()
                && review["response"].get("patch").is_none()
        };
        let (_, r) = pod_review(
            "CREATE",
            serde_json::json!({}),
            serde_json::json!({"sidecar.istio.io/inject": "false"}),
        );
        assert!(unpatched(&r));
        let (_, r) = pod_review("UPDATE", serde_json::json!({}), serde_json::json!({}));
        assert!(unpatched(&r));
        let (_, r) = pod_review(
            "CREATE",
            serde_json::json!({}),
            serde_json::json!({"traffic.sidecar.istio.io/excludeInboundPorts": "http"}),
        );
        let response = inject_request(&r, &options);
        assert!(!response.allowed);
        assert_eq!(
            response.result.message,
            "Pod/production/payment-service-v1-7d4b9c-: annotation \
             traffic.sidecar.istio.io/excludeInboundPorts: \"http\" is not a port"
        );
    }
}
