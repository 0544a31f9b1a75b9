//! [`KubeSource`]: the mesh's configuration read from the Kubernetes API.
//!
//! Watches every namespace for Istio's resources (`networking.istio.io/v1`:
//! VirtualService, DestinationRule, Gateway, ServiceEntry, WorkloadEntry, Sidecar;
//! `security.istio.io/v1`: PeerAuthentication, AuthorizationPolicy,
//! RequestAuthentication; `telemetry.istio.io/v1`: Telemetry), and for Services, EndpointSlices, Pods and Namespaces, and publishes a [`ClusterState`] after every settled change: the valid
//! Istio objects plus one ServiceEntry per Service made by the [`registry`] module.
//!
//! # Behaviour
//!
//! - One watch per kind (kube-rs `watcher`, list then watch, relisting when the watch
//!   expires). The API server converts every stored version to the one watched, so
//!   objects applied as `v1alpha3` or `v1beta1` are read too.
//! - Each Istio object is validated on its own with the file loader's rules
//!   ([`validate_object`]); its diagnostics name the object (`Kind/namespace/name`) and
//!   the field path instead of a file and a line ([`Diagnostic::in_object`]).
//! - An invalid object is left out on its own: the last valid version of the same object,
//!   if there was one, stays in the state, and the rejection is reported once per
//!   version of the object: a tracing warning, the metrics
//!   `mesh_discovery_rejected_objects` (gauge, by kind) and `mesh_discovery_rejections`
//!   (counter, by kind) ([`KubeSource::register_metrics`]), a Kubernetes Event of type
//!   `Warning`, reason `Rejected`, on the object, and [`ClusterState::rejected`]. A later
//!   valid version replaces the kept one and clears the rejection; deleting the object
//!   removes both.
//! - A kind whose CustomResourceDefinition is not installed does not stop the source: its
//!   list fails, is logged and retried with exponential backoff (up to
//!   [`SourceOptions::max_backoff`]), and counts as listed (empty) for [`KubeSource::ready`].
//!   Any other watch error is retried the same way; the other kinds keep flowing.
//! - Changes are debounced: a state is published [`SourceOptions::debounce`] after the
//!   last change of a burst (at most [`SourceOptions::max_delay`] after the first), and
//!   only when its content differs from the previous state. The first state is published
//!   once every kind has been listed, and [`KubeSource::ready`] returns from then on.
//! - Dropping the [`KubeSource`] stops every watch.
//!
//! # Choices that differ from Istio
//!
//! - A ServiceEntry's `workloadSelector` selects the WorkloadEntries and the ready pods
//!   of its namespace, as in istiod: each selected pod is sent as a WorkloadEntry
//!   (`kubernetes-pod.<name>`, [`registry::selected_pods`]) and each proxy's snapshot
//!   does the selecting (see [`MeshConfig`]). The selector of a Service without
//!   endpoints selects WorkloadEntries only; a Service's pods reach it through its
//!   EndpointSlices, as in Istio.
//! - istiod skips an invalid object that reached the API server (its webhook off or
//!   bypassed) and keeps nothing of it; here the object's last valid version keeps
//!   serving, so a bad `kubectl patch` cannot take a route away.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use mesh_core::config::{AnyResource, Diagnostic, Kind, Labels, LoadOptions, MeshConfig, load_str};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::registry::{self, PodInfo, Pods, RegistryOptions};

/// Settings of a [`KubeSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// The cluster's DNS domain suffix (`cluster.local`).
    pub domain_suffix: String,
    /// The trust domain of workload identities (`cluster.local`).
    pub trust_domain: String,
    /// The mesh root namespace (`istio-system`).
    pub root_namespace: String,
    /// Quiet time after a change before a state is published (75 ms).
    pub debounce: Duration,
    /// Longest delay of a state after the first change of a burst (1 s).
    pub max_delay: Duration,
    /// Longest wait between retries of a failing watch (30 s).
    pub max_backoff: Duration,
    /// The reporting instance written in Events (the pod's name), if known.
    pub instance: Option<String>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            domain_suffix: "cluster.local".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            root_namespace: "istio-system".to_owned(),
            debounce: Duration::from_millis(75),
            max_delay: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            instance: None,
        }
    }
}

impl SourceOptions {
    /// The load options objects are validated with.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            root_namespace: self.root_namespace.clone(),
            ..LoadOptions::default()
        }
    }

    fn registry(&self) -> RegistryOptions {
        RegistryOptions {
            domain_suffix: self.domain_suffix.clone(),
            trust_domain: self.trust_domain.clone(),
        }
    }
}

/// A copy of `object` without `metadata.managedFields` (server-side apply bookkeeping,
/// often the largest part of an object, never read here).
fn without_managed_fields<K: kube::Resource + Clone>(object: &K) -> K {
    let mut object = object.clone();
    object.meta_mut().managed_fields = None;
    object
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The API server could not be reached.
    #[error("cannot reach the Kubernetes API server: {0}")]
    Connect(#[source] kube::Error),
}

/// One Istio object left out because it is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its kind (`VirtualService`).
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The rejected version (`metadata.resourceVersion`).
    pub resource_version: Option<String>,
    /// The errors, each naming the object and the field.
    pub errors: Vec<Diagnostic>,
    /// Whether an earlier valid version of the object is kept in its place.
    pub kept_last_good: bool,
}

impl Rejected {
    /// `Kind/namespace/name`.
    pub fn object(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    /// The errors, one per line, as
    /// `error: VirtualService/default/reviews, spec.http[0].route[1].weight: ...`.
    pub fn message(&self) -> String {
        self.errors
            .iter()
            .map(|d| d.in_object().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What the cluster holds, as the mesh's configuration model sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterState {
    /// Counts published states: 0 before the first, then 1, 2, ...
    pub generation: u64,
    /// Every valid Istio object (the last valid version of an object whose current one is
    /// rejected), sorted by kind, namespace and name, then the ServiceEntries made from
    /// Services, sorted by namespace and name.
    pub resources: Vec<AnyResource>,
    /// The objects left out, sorted by kind, namespace and name.
    pub rejected: Vec<Rejected>,
    /// Namespaces and their labels.
    pub namespaces: BTreeMap<String, Labels>,
}

impl ClusterState {
    /// The snapshot the proxy compiles.
    pub fn config(&self, options: &LoadOptions) -> MeshConfig {
        MeshConfig::from_resources(self.resources.clone(), options)
    }

    fn same_content(&self, other: &ClusterState) -> bool {
        self.resources == other.resources
            && self.rejected == other.rejected
            && self.namespaces == other.namespaces
    }
}

/// Validates one Istio object read from the API (its JSON form, with `apiVersion`,
/// `kind`, `metadata` and `spec`) with the loader's rules; the resource and its
/// warnings, or its errors. Diagnostics name the object `Kind/namespace/name` as their
/// file, so [`Diagnostic::in_object`] renders them without a line.
pub fn validate_object(
    object: &serde_json::Value,
    options: &LoadOptions,
) -> Result<(AnyResource, Vec<Diagnostic>), Vec<Diagnostic>> {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let kind = text(&object["kind"]);
    let meta = &object["metadata"];
    let namespace = match text(&meta["namespace"]) {
        ns if ns.is_empty() => options.default_namespace.clone(),
        ns => ns,
    };
    let label = format!("{kind}/{namespace}/{}", text(&meta["name"]));
    let mut metadata = serde_json::Map::new();
    if let Some(m) = meta.as_object() {
        for (k, v) in m {
            match k.as_str() {
                // Large and useless to validation.
                "managedFields" => {}
                "annotations" => {
                    let mut a = v.as_object().cloned().unwrap_or_default();
                    a.remove("kubectl.kubernetes.io/last-applied-configuration");
                    if !a.is_empty() {
                        metadata.insert(k.clone(), serde_json::Value::Object(a));
                    }
                }
                _ => {
                    metadata.insert(k.clone(), v.clone());
                }
            }
        }
    }
    // The loader needs apiVersion and kind before spec; a JSON map is sorted by key.
    let mut doc = serde_json::Map::new();
    doc.insert("apiVersion".to_owned(), object["apiVersion"].clone());
    doc.insert("kind".to_owned(), object["kind"].clone());
    doc.insert("metadata".to_owned(), serde_json::Value::Object(metadata));
    if let Some(spec) = object.get("spec") {
        doc.insert("spec".to_owned(), spec.clone());
    }
    let yaml = match serde_saphyr::to_string(&serde_json::Value::Object(doc)) {
        Ok(y) => y,
        Err(e) => {
            return Err(vec![Diagnostic {
                resource: Some(label.clone()),
                ..Diagnostic::file_error(&label, format!("cannot be read as YAML: {e}"))
            }]);
        }
    };
    let report = load_str(&label, &yaml, options);
    let (errors, warnings): (Vec<_>, Vec<_>) = report
        .diagnostics
        .iter()
        .cloned()
        .partition(Diagnostic::is_error);
    if !errors.is_empty() {
        return Err(errors);
    }
    // Telemetry's CEL expressions are checked where they are compiled.
    if let Some(AnyResource::Telemetry(t)) = report.resources.first() {
        let errors: Vec<Diagnostic> = mesh_telemetry::policy::check(t)
            .into_iter()
            .filter_map(|e| report.error_at(0, &e.path, e.message))
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
    }
    match report.resources.into_iter().next() {
        Some(r) => Ok((r, warnings)),
        None => Err(vec![Diagnostic {
            resource: Some(label.clone()),
            ..Diagnostic::file_error(
                &label,
                format!(
                    "not a kind the mesh reads: {}",
                    warnings
                        .iter()
                        .map(|w| w.message.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        }]),
    }
}

/// The watched Istio kinds: (kind, group, plural).
const ISTIO_KINDS: [(Kind, &str, &str); 10] = [
    (
        Kind::VirtualService,
        "networking.istio.io",
        "virtualservices",
    ),
    (
        Kind::DestinationRule,
        "networking.istio.io",
        "destinationrules",
    ),
    (Kind::Gateway, "networking.istio.io", "gateways"),
    (Kind::ServiceEntry, "networking.istio.io", "serviceentries"),
    (
        Kind::WorkloadEntry,
        "networking.istio.io",
        "workloadentries",
    ),
    (Kind::Sidecar, "networking.istio.io", "sidecars"),
    (
        Kind::PeerAuthentication,
        "security.istio.io",
        "peerauthentications",
    ),
    (
        Kind::AuthorizationPolicy,
        "security.istio.io",
        "authorizationpolicies",
    ),
    (
        Kind::RequestAuthentication,
        "security.istio.io",
        "requestauthentications",
    ),
    (Kind::Telemetry, "telemetry.istio.io", "telemetries"),
];

/// The watched Kubernetes Gateway API kinds (`gateway.networking.k8s.io`): (kind,
/// version, plural). Like Istio's, a kind whose definition is not installed is listed as
/// empty and retried.
const GATEWAY_API_KINDS: [(Kind, &str, &str); 4] = [
    (Kind::KubernetesGateway, "v1", "gateways"),
    (Kind::HttpRoute, "v1", "httproutes"),
    (Kind::GrpcRoute, "v1", "grpcroutes"),
    (Kind::ReferenceGrant, "v1beta1", "referencegrants"),
];

/// The metrics of a source.
#[derive(Debug, Clone, Default)]
struct Metrics {
    rejected_objects: Family<Vec<(String, String)>, Gauge>,
    rejections: Family<Vec<(String, String)>, Counter>,
}

type Key = (String, String);

#[derive(Debug, Default)]
struct IstioEntry {
    good: Option<AnyResource>,
    rejected: Option<Rejected>,
}

#[derive(Debug, Default)]
struct Store {
    istio: BTreeMap<(Kind, String, String), IstioEntry>,
    services: BTreeMap<Key, Service>,
    slices: BTreeMap<Key, EndpointSlice>,
    pods: Pods,
    namespaces: BTreeMap<String, Labels>,
}

struct Shared {
    store: Mutex<Store>,
    changed: Notify,
    /// One flag per watch: its first list is done.
    listed: Mutex<Vec<bool>>,
    options: SourceOptions,
    load: LoadOptions,
    metrics: Metrics,
    recorder: Recorder,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_listed(&self, watch: usize) {
        let mut listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = listed.get_mut(watch) {
            *l = true;
        }
        drop(listed);
        self.changed.notify_one();
    }

    fn all_listed(&self) -> bool {
        self.listed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .all(|l| *l)
    }
}

/// The Kubernetes source of the mesh's configuration (see the module docs).
pub struct KubeSource {
    state: watch::Receiver<Arc<ClusterState>>,
    ready: watch::Receiver<bool>,
    metrics: Metrics,
    _stop: DropGuard,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("generation", &self.state.borrow().generation)
            .field("ready", &*self.ready.borrow())
            .finish()
    }
}

impl KubeSource {
    /// Checks that the API server answers, then starts the watches and the publisher.
    pub async fn start(
        client: kube::Client,
        options: SourceOptions,
    ) -> Result<KubeSource, KubeError> {
        let version = client
            .apiserver_version()
            .await
            .map_err(KubeError::Connect)?;
        tracing::info!(
            server = %format!("{}.{}", version.major, version.minor),
            "watching the Kubernetes API"
        );
        let reporter = Reporter {
            controller: "mesh-discovery".to_owned(),
            instance: options.instance.clone(),
        };
        let watches = ISTIO_KINDS.len() + GATEWAY_API_KINDS.len() + 4;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: Notify::new(),
            listed: Mutex::new(vec![false; watches]),
            load: options.load_options(),
            options,
            metrics: Metrics::default(),
            recorder: Recorder::new(client.clone(), reporter),
        });
        let stop = CancellationToken::new();
        let (state_tx, state) = watch::channel(Arc::new(ClusterState::default()));
        let (ready_tx, ready) = watch::channel(false);

        let mut index = 0;
        for (kind, group, plural) in ISTIO_KINDS {
            let gvk = GroupVersionKind::gvk(group, "v1", kind.as_str());
            let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let sink = IstioSink {
                kind,
                resource: ar,
                seen: None,
            };
            spawn_watch(&stop, shared.clone(), index, api, sink);
            index += 1;
        }
        for (kind, version, plural) in GATEWAY_API_KINDS {
            let gvk =
                GroupVersionKind::gvk(mesh_core::config::GATEWAY_API_GROUP, version, kind.as_str());
            let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let sink = IstioSink {
                kind,
                resource: ar,
                seen: None,
            };
            spawn_watch(&stop, shared.clone(), index, api, sink);
            index += 1;
        }
        spawn_watch(
            &stop,
            shared.clone(),
            index,
            Api::<Service>::all(client.clone()),
            MirrorSink::new(
                "Service",
                |s: &mut Store| &mut s.services,
                without_managed_fields::<Service>,
            ),
        );
        spawn_watch(
            &stop,
            shared.clone(),
            index + 1,
            Api::<EndpointSlice>::all(client.clone()),
            MirrorSink::new(
                "EndpointSlice",
                |s: &mut Store| &mut s.slices,
                without_managed_fields::<EndpointSlice>,
            ),
        );
        spawn_watch(
            &stop,
            shared.clone(),
            index + 2,
            Api::<Pod>::all(client.clone()),
            MirrorSink::new(
                "Pod",
                |s: &mut Store| &mut s.pods,
                |p: &Pod| PodInfo::from(p),
            ),
        );
        spawn_watch(
            &stop,
            shared.clone(),
            index + 3,
            Api::<Namespace>::all(client),
            NamespaceSink { seen: None },
        );
        let metrics = shared.metrics.clone();
        tokio::spawn(until_stopped(
            stop.clone(),
            publish(shared, state_tx, ready_tx),
        ));
        Ok(KubeSource {
            state,
            ready,
            metrics,
            _stop: stop.drop_guard(),
        })
    }

    /// The published states: a new value after each settled change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.state.clone()
    }

    /// Returns once every kind has been listed and the first state is published.
    pub async fn ready(&self) {
        let mut ready = self.ready.clone();
        // The sender lives as long as the publisher, which lives as long as `self`.
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Registers `mesh_discovery_rejected_objects` and `mesh_discovery_rejections`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "mesh_discovery_rejected_objects",
            "Istio objects currently left out because they are invalid",
            self.metrics.rejected_objects.clone(),
        );
        registry.register(
            "mesh_discovery_rejections",
            "Versions of Istio objects rejected as invalid",
            self.metrics.rejections.clone(),
        );
    }
}

async fn until_stopped(stop: CancellationToken, task: impl Future<Output = ()>) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = task => {}
    }
}

/// What a watch does with its events; called with the store locked only inside.
trait Sink<K>: Send + 'static {
    /// The kind, for logs.
    fn kind(&self) -> &str;
    /// A (re)list starts.
    fn init(&mut self);
    /// An object was listed (`initial`) or added or changed.
    fn apply(&mut self, shared: &Shared, object: K, initial: bool);
    /// An object was deleted.
    fn delete(&mut self, shared: &Shared, object: K);
    /// A (re)list ended: objects not listed are gone.
    fn init_done(&mut self, shared: &Shared);
}

fn spawn_watch<K, S>(
    stop: &CancellationToken,
    shared: Arc<Shared>,
    index: usize,
    api: Api<K>,
    sink: S,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    S: Sink<K>,
{
    tokio::spawn(until_stopped(
        stop.clone(),
        run_watch(shared, index, api, sink),
    ));
}

async fn run_watch<K, S>(shared: Arc<Shared>, index: usize, api: Api<K>, mut sink: S)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    S: Sink<K>,
{
    let stream = watcher(api, watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    let first = Duration::from_millis(500);
    let mut backoff = first;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                backoff = first;
                match event {
                    watcher::Event::Init => sink.init(),
                    watcher::Event::InitApply(o) => sink.apply(&shared, o, true),
                    watcher::Event::InitDone => {
                        sink.init_done(&shared);
                        shared.mark_listed(index);
                    }
                    watcher::Event::Apply(o) => sink.apply(&shared, o, false),
                    watcher::Event::Delete(o) => sink.delete(&shared, o),
                }
                shared.changed.notify_one();
            }
            Err(e) => {
                if is_not_found(&e) {
                    tracing::warn!(
                        kind = sink.kind(),
                        retry_in = ?backoff,
                        "cannot list {}: its CustomResourceDefinition is not installed; retrying",
                        sink.kind()
                    );
                    // No definition, no objects: this kind is listed, empty.
                    shared.mark_listed(index);
                } else {
                    tracing::warn!(kind = sink.kind(), error = %e, retry_in = ?backoff, "watch failed; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.options.max_backoff);
            }
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

fn key_of<K: Resource>(o: &K) -> Key {
    let m = o.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// Keeps a map of one kind of Kubernetes object (or what the registry needs of it).
struct MirrorSink<K, V, M> {
    kind: &'static str,
    map: fn(&mut Store) -> &mut M,
    convert: fn(&K) -> V,
    seen: Option<HashSet<Key>>,
}

impl<K, V, M> MirrorSink<K, V, M> {
    fn new(kind: &'static str, map: fn(&mut Store) -> &mut M, convert: fn(&K) -> V) -> Self {
        MirrorSink {
            kind,
            map,
            convert,
            seen: None,
        }
    }
}

trait MapLike<V> {
    fn put(&mut self, key: Key, value: V);
    fn take(&mut self, key: &Key);
    fn keep(&mut self, keys: &HashSet<Key>);
}

impl<V> MapLike<V> for BTreeMap<Key, V> {
    fn put(&mut self, key: Key, value: V) {
        self.insert(key, value);
    }
    fn take(&mut self, key: &Key) {
        self.remove(key);
    }
    fn keep(&mut self, keys: &HashSet<Key>) {
        self.retain(|k, _| keys.contains(k));
    }
}

impl<V> MapLike<V> for HashMap<Key, V> {
    fn put(&mut self, key: Key, value: V) {
        self.insert(key, value);
    }
    fn take(&mut self, key: &Key) {
        self.remove(key);
    }
    fn keep(&mut self, keys: &HashSet<Key>) {
        self.retain(|k, _| keys.contains(k));
    }
}

impl<K, V, M> Sink<K> for MirrorSink<K, V, M>
where
    K: Resource + Send + 'static,
    V: Send + 'static,
    M: MapLike<V> + 'static,
{
    fn kind(&self) -> &str {
        self.kind
    }
    fn init(&mut self) {
        self.seen = Some(HashSet::new());
    }
    fn apply(&mut self, shared: &Shared, object: K, initial: bool) {
        let key = key_of(&object);
        if initial && let Some(seen) = &mut self.seen {
            seen.insert(key.clone());
        }
        let value = (self.convert)(&object);
        (self.map)(&mut shared.store()).put(key, value);
    }
    fn delete(&mut self, shared: &Shared, object: K) {
        (self.map)(&mut shared.store()).take(&key_of(&object));
    }
    fn init_done(&mut self, shared: &Shared) {
        if let Some(seen) = self.seen.take() {
            (self.map)(&mut shared.store()).keep(&seen);
        }
    }
}

struct NamespaceSink {
    seen: Option<HashSet<String>>,
}

impl Sink<Namespace> for NamespaceSink {
    fn kind(&self) -> &str {
        "Namespace"
    }
    fn init(&mut self) {
        self.seen = Some(HashSet::new());
    }
    fn apply(&mut self, shared: &Shared, ns: Namespace, initial: bool) {
        let name = ns.name_any();
        if initial && let Some(seen) = &mut self.seen {
            seen.insert(name.clone());
        }
        let labels = ns.metadata.labels.unwrap_or_default();
        shared.store().namespaces.insert(name, labels);
    }
    fn delete(&mut self, shared: &Shared, ns: Namespace) {
        shared.store().namespaces.remove(&ns.name_any());
    }
    fn init_done(&mut self, shared: &Shared) {
        if let Some(seen) = self.seen.take() {
            shared.store().namespaces.retain(|n, _| seen.contains(n));
        }
    }
}

/// Validates Istio objects of one kind and keeps their last good versions.
struct IstioSink {
    kind: Kind,
    resource: ApiResource,
    seen: Option<HashSet<Key>>,
}

impl Sink<DynamicObject> for IstioSink {
    fn kind(&self) -> &str {
        self.kind.as_str()
    }

    fn init(&mut self) {
        self.seen = Some(HashSet::new());
    }

    fn apply(&mut self, shared: &Shared, object: DynamicObject, initial: bool) {
        let (namespace, name) = key_of(&object);
        if initial && let Some(seen) = &mut self.seen {
            seen.insert((namespace.clone(), name.clone()));
        }
        let version = object.metadata.resource_version.clone();
        let json = match serde_json::to_value(&object) {
            Ok(mut v) => {
                // The watch may leave out the type; the API resource knows it.
                v["apiVersion"] = self.resource.api_version.clone().into();
                v["kind"] = self.resource.kind.clone().into();
                v
            }
            Err(e) => {
                tracing::warn!(kind = self.kind.as_str(), %namespace, %name, error = %e, "cannot read object");
                return;
            }
        };
        let outcome = validate_object(&json, &shared.load);
        let key = (self.kind, namespace.clone(), name.clone());
        let mut store = shared.store();
        let entry = store.istio.entry(key).or_default();
        match outcome {
            Ok((resource, warnings)) => {
                for w in &warnings {
                    tracing::debug!("{}", w.in_object());
                }
                entry.good = Some(resource);
                entry.rejected = None;
            }
            Err(errors) => {
                let again = entry
                    .rejected
                    .as_ref()
                    .is_some_and(|r| r.resource_version == version && r.errors == errors);
                let rejected = Rejected {
                    kind: self.kind.as_str().to_owned(),
                    namespace,
                    name,
                    resource_version: version,
                    errors,
                    kept_last_good: entry.good.is_some(),
                };
                entry.rejected = Some(rejected.clone());
                drop(store);
                if !again {
                    report(shared, &rejected, object.object_ref(&self.resource));
                }
            }
        }
    }

    fn delete(&mut self, shared: &Shared, object: DynamicObject) {
        let (namespace, name) = key_of(&object);
        shared.store().istio.remove(&(self.kind, namespace, name));
    }

    fn init_done(&mut self, shared: &Shared) {
        if let Some(seen) = self.seen.take() {
            let kind = self.kind;
            shared
                .store()
                .istio
                .retain(|(k, ns, n), _| *k != kind || seen.contains(&(ns.clone(), n.clone())));
        }
    }
}

/// Reports a rejection: log, counter, and a Kubernetes Event on the object.
fn report(
    shared: &Shared,
    rejected: &Rejected,
    reference: k8s_openapi::api::core::v1::ObjectReference,
) {
    let message = rejected.message();
    tracing::warn!(
        object = %rejected.object(),
        kept_last_good = rejected.kept_last_good,
        "rejected an invalid object:\n{message}"
    );
    shared
        .metrics
        .rejections
        .get_or_create(&vec![("kind".to_owned(), rejected.kind.clone())])
        .inc();
    let note = if rejected.kept_last_good {
        format!("{message}\n(the last valid version stays in use)")
    } else {
        message
    };
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "Rejected".to_owned(),
        note: Some(truncate(note, 1024)),
        action: "Validate".to_owned(),
        secondary: None,
    };
    let recorder = shared.recorder.clone();
    let object = rejected.object();
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(%object, error = %e, "cannot record the rejection as an Event");
        }
    });
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max.saturating_sub(3);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
    s
}

/// Publishes a state after each settled change, once every watch has listed.
async fn publish(
    shared: Arc<Shared>,
    tx: watch::Sender<Arc<ClusterState>>,
    ready: watch::Sender<bool>,
) {
    let mut last = ClusterState::default();
    loop {
        shared.changed.notified().await;
        let first = Instant::now();
        loop {
            let quiet = Instant::now() + shared.options.debounce;
            let deadline = quiet.min(first + shared.options.max_delay);
            tokio::select! {
                () = shared.changed.notified() => {
                    if Instant::now() >= first + shared.options.max_delay {
                        break;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !shared.all_listed() {
            continue;
        }
        let mut state = build(&shared);
        if *ready.borrow() && state.same_content(&last) {
            continue;
        }
        state.generation = last.generation + 1;
        update_gauges(&shared.metrics, &state);
        last = state.clone();
        tracing::debug!(
            generation = state.generation,
            resources = state.resources.len(),
            rejected = state.rejected.len(),
            "cluster state"
        );
        tx.send_replace(Arc::new(state));
        ready.send_replace(true);
    }
}

fn build(shared: &Shared) -> ClusterState {
    let store = shared.store();
    let mut resources: Vec<AnyResource> = Vec::new();
    let mut rejected = Vec::new();
    for entry in store.istio.values() {
        if let Some(good) = &entry.good {
            resources.push(good.clone());
        }
        if let Some(r) = &entry.rejected {
            rejected.push(r.clone());
        }
    }
    let entries = registry::service_entries(
        store.services.values(),
        store.slices.values(),
        &store.pods,
        &shared.options.registry(),
    );
    // Pods that users' ServiceEntries select, as WorkloadEntries.
    let selected = registry::selected_pods(
        resources.iter().filter_map(|r| match r {
            AnyResource::ServiceEntry(se) => Some(se),
            _ => None,
        }),
        &store.pods,
    );
    resources.extend(selected.into_iter().map(AnyResource::WorkloadEntry));
    resources.extend(entries.into_iter().map(AnyResource::ServiceEntry));
    ClusterState {
        generation: 0,
        resources,
        rejected,
        namespaces: store.namespaces.clone(),
    }
}

fn update_gauges(metrics: &Metrics, state: &ClusterState) {
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for (kind, _, _) in ISTIO_KINDS {
        counts.insert(kind.as_str(), 0);
    }
    for (kind, _, _) in GATEWAY_API_KINDS {
        counts.insert(kind.as_str(), 0);
    }
    for r in &state.rejected {
        *counts.entry(r.kind.as_str()).or_default() += 1;
    }
    let kinds: BTreeSet<&str> = counts.keys().copied().collect();
    for kind in kinds {
        metrics
            .rejected_objects
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .set(counts[kind]);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn object(weight: i64) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {
                "name": "reviews",
                "namespace": "shop",
                "uid": "0a1b",
                "resourceVersion": "42",
                "generation": 3,
                "creationTimestamp": "2026-01-02T03:04:05Z",
                "managedFields": [{"manager": "kubectl", "operation": "Update"}],
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{}}"
                }
            },
            "spec": {
                "hosts": ["reviews"],
                "http": [{"route": [
                    {"destination": {"host": "reviews"}, "weight": weight}
                ]}]
            },
            "status": {"observedGeneration": 3}
        })
    }

    #[test]
    fn objects_from_the_api_validate_with_their_kubernetes_metadata() {
        let (resource, _) = validate_object(&object(100), &LoadOptions::default()).unwrap();
        assert_eq!(resource.display_name(), "VirtualService/shop/reviews");
        assert!(resource.metadata().annotations.is_empty());
        assert_eq!(
            resource.metadata().creation_timestamp.as_deref(),
            Some("2026-01-02T03:04:05Z")
        );
    }

    #[test]
    fn errors_name_the_object_and_the_field() {
        let errors = validate_object(&object(-1), &LoadOptions::default()).unwrap_err();
        assert_eq!(
            errors[0].in_object().to_string(),
            "error: VirtualService/shop/reviews, spec.http[0].route[0].weight: \
             weight -1 is negative; weights must be 0 or more"
        );
        let mut unknown = object(100);
        unknown["spec"]["htttp"] = serde_json::json!([]);
        let errors = validate_object(&unknown, &LoadOptions::default()).unwrap_err();
        let message = errors[0].in_object().to_string();
        assert!(
            message.starts_with("error: VirtualService/shop/reviews, spec"),
            "{message}"
        );
        assert!(message.contains("htttp"), "{message}");
    }

    #[test]
    fn kinds_the_mesh_does_not_read_are_refused_with_the_reason() {
        let mut filter = object(100);
        filter["kind"] = "EnvoyFilter".into();
        let errors = validate_object(&filter, &LoadOptions::default()).unwrap_err();
        assert!(
            errors[0]
                .in_object()
                .to_string()
                .contains("not a kind the mesh reads"),
            "{}",
            errors[0].in_object()
        );
    }

    #[test]
    fn long_event_notes_are_cut_on_a_character_boundary() {
        let s = truncate("é".repeat(600), 1024);
        assert!(s.len() <= 1024);
        assert!(s.ends_with("..."));
        assert_eq!(truncate("short".to_owned(), 1024), "short");
    }
}
