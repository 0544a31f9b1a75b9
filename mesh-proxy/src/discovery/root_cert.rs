//! The mesh root certificate in every namespace (ISTIO.md CA-22).
//!
//! # Behaviour
//!
//! [`publish`] keeps a ConfigMap `istio-ca-root-cert` with the key `root-cert.pem` in
//! every namespace that is not terminating, as istiod does: pods mount it to trust
//! `discovery` before they hold a certificate (sidecar settings `discovery.rootCert`).
//! Each namespace is checked when it appears or changes and whenever the watch is
//! listed again; a ConfigMap with other contents is replaced, and one left alone is
//! not rewritten. Failures are logged and retried on the next event; they never stop
//! the rest of `discovery`.
//!
//! The ConfigMap carries the label `istio.io/config: "true"`, as istiod's does.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

/// The ConfigMap's name (Istio's).
pub const CONFIG_MAP: &str = "istio-ca-root-cert";
/// The key holding the PEM root (Istio's).
pub const KEY: &str = "root-cert.pem";

/// Keeps `root_pem` published in every namespace until `shutdown`.
pub async fn publish(client: kube::Client, root_pem: String, shutdown: CancellationToken) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut events = watcher::watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.next() => match event {
                Some(e) => e,
                None => return,
            },
        };
        let ns = match event {
            Ok(Event::Apply(ns) | Event::InitApply(ns)) => ns,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching namespaces");
                continue;
            }
        };
        let terminating = ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Terminating");
        let Some(name) = ns.metadata.name else {
            continue;
        };
        if terminating {
            continue;
        }
        if let Err(e) = ensure(&client, &name, &root_pem).await {
            tracing::warn!(namespace = %name, error = %e, "cannot publish the root certificate");
        }
    }
}

/// Creates or corrects the ConfigMap in `namespace`.
async fn ensure(client: &kube::Client, namespace: &str, root_pem: &str) -> kube::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let data = BTreeMap::from([(KEY.to_owned(), root_pem.to_owned())]);
    match api.get_opt(CONFIG_MAP).await? {
        Some(existing) if existing.data.as_ref() == Some(&data) => Ok(()),
        Some(mut existing) => {
            existing.data = Some(data);
            api.replace(CONFIG_MAP, &PostParams::default(), &existing)
                .await
                .map(|_| ())
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(CONFIG_MAP.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "istio.io/config".to_owned(),
                        "true".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => Ok(()),
                // Another replica made it first.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}
