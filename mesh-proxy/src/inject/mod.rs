//! Sidecar injection: a pod spec mutated as Istio's injector mutates it.
//!
//! [`inject_pod`] adds to a pod (or a pod template) what a meshed pod needs, without any
//! change to the application's containers:
//!
//! - the init container `istio-init` running `mesh-proxy init` (NET_ADMIN, NET_RAW, as
//!   root) with istio-iptables' arguments (`-p 15001 -z 15006 -u 1337 -i <ranges> -b
//!   <ports> -d 15090,15021,15020[,...]`, and `-x`, `-o`, `-q` when the pod's
//!   `traffic.sidecar.istio.io/*` annotations set them), first among the init containers;
//! - the proxy `istio-proxy` running `mesh-proxy sidecar` as UID/GID 1337: a container
//!   after the application's, or, with [`InjectOptions::native_sidecars`], an init
//!   container with `restartPolicy: Always` right after `istio-init` (Kubernetes' native
//!   sidecars, as Istio injects on current Kubernetes), so the application's own init
//!   containers are meshed too and the proxy outlives the application at shutdown;
//! - its readiness probe (`GET /healthz/ready` on 15021, period 15 s, timeout 3 s, 4
//!   failures) and startup probe (the same, every second, for up to 10 minutes);
//!   resources (Istio's 100m/128Mi requests, 2/1Gi limits, or the pod's
//!   `sidecar.istio.io/proxyCPU`, `proxyMemory`, `proxyCPULimit`, `proxyMemoryLimit`);
//!   drain on SIGTERM for ProxyConfig's `terminationDrainDuration` (5 s, or the pod's
//!   `proxy.istio.io/config`), with `terminationGracePeriodSeconds` raised to cover it;
//! - the volumes the proxy's certificate request uses: Istio's projected service-account
//!   token `istio-token` (audience `istio-ca`, 12 h) and the ConfigMap
//!   `istio-ca-root-cert` that `discovery` publishes in every namespace (and
//!   `serviceAccountName: default` when the pod names none, as the API server would);
//! - labels `security.istio.io/tlsMode: istio` (a value the pod sets is kept),
//!   `service.istio.io/canonical-name` and `service.istio.io/canonical-revision`;
//!   annotations `sidecar.istio.io/status` (what was injected, as Istio writes it),
//!   `kubectl.kubernetes.io/default-container` (the first application container) and
//!   Prometheus' `prometheus.io/scrape`, `port`, `path` unless the pod sets them.
//!
//! Injection is idempotent: a pod that carries `sidecar.istio.io/status`, or already has
//! a container named `istio-proxy`, is left as it is.
//!
//! [`injection_required`] decides, with Istio's precedence, whether a pod is injected:
//! `hostNetwork` pods and pods in `kube-system` and `kube-public` never are; the pod's
//! `sidecar.istio.io/inject` label, else its annotation (deprecated in Istio), opts out
//! (`false`; any value other than `y`, `yes`, `true`, `on`) or in; the namespace's
//! `istio-injection` label (`enabled` injects; any other value, `disabled` included,
//! does not) takes precedence over its `istio.io/rev`, which must name this revision;
//! in a namespace with neither, a pod is injected when it names this revision with its
//! own `istio.io/rev` label, or, for the default revision, when it says `inject: "true"`.
//!
//! # How the proxy is configured
//!
//! The proxy reads its settings file from the pod's own annotation `mesh-proxy/settings`,
//! written at injection and mounted with the downward API at `/etc/mesh/sidecar.yaml`:
//! who the workload is (namespace, service account, labels), the trust domain, and
//! `discovery` (address, identity, server name, token and root files). Configuration
//! and the certificate then come from `discovery`, as for the chart's gateway.
//!
//! # Choices that differ from Istio
//!
//! - The proxy's admin server listens on `0.0.0.0:15021` and answers only
//!   `/healthz/ready` and `/stats/prometheus` (`/ready`, `/metrics`) to other hosts (the
//!   kubelet, Prometheus); its other paths answer only on loopback. So one port carries
//!   what Istio spreads over 15021 (readiness), 15020 and 15090 (metrics); 15020 and
//!   15090 stay excluded from capture, as in Istio, and are not declared.
//! - The workload's labels are written into the settings at injection: a label changed
//!   later on a running pod does not reach its proxy until the pod is recreated (Istio's
//!   agent reads them through the downward API).
//! - Application probes are not rewritten to go through the proxy's status port (Istio's
//!   `rewriteAppHTTPProbe`); under STRICT mTLS an HTTP probe of a captured port must be
//!   excluded with `traffic.sidecar.istio.io/excludeInboundPorts`.
//! - Only `REDIRECT` interception is offered (`sidecar.istio.io/interceptionMode:
//!   TPROXY` is refused with an error); `NONE` injects the proxy without `istio-init`.

mod manifest;

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub use self::manifest::{ManifestError, inject_manifests};

/// Istio's name for the proxy container.
pub const PROXY_CONTAINER: &str = "istio-proxy";
/// Istio's name for the traffic-capture init container.
pub const INIT_CONTAINER: &str = "istio-init";
/// The annotation recording what was injected (Istio's).
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// The pod label and annotation that opt a pod in or out (Istio's).
pub const INJECT_LABEL: &str = "sidecar.istio.io/inject";
/// The annotation holding the proxy's settings file, mounted through the downward API.
pub const SETTINGS_ANNOTATION: &str = "mesh-proxy/settings";
/// The proxy's UID and GID (Istio's).
pub const PROXY_UID: i64 = 1337;
/// The outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// The inbound capture port.
pub const INBOUND_PORT: u16 = 15006;
/// Readiness and metrics: the admin server in an injected pod.
pub const HEALTH_PORT: u16 = 15021;

/// Istio's namespaces that are never injected.
const IGNORED_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];
/// Volume names.
const SETTINGS_VOLUME: &str = "mesh-settings";
const TOKEN_VOLUME: &str = "istio-token";
const ROOT_VOLUME: &str = "istio-ca-root-cert";

/// What the injector adds, and where the proxies find `discovery`.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    /// The proxy's image (`mesh-proxy:<version>`).
    pub image: String,
    /// Its pull policy; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// `discovery`'s namespace: its address (`mesh-discovery.<ns>.svc:15012`), SPIFFE ID
    /// and DNS name follow from it.
    pub discovery_namespace: String,
    /// `discovery`'s service account (its SPIFFE ID).
    pub discovery_service_account: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The audience of the projected token (Istio's `istio-ca`).
    pub token_audience: String,
    /// Inject the proxy as a native sidecar (init container, `restartPolicy: Always`).
    pub native_sidecars: bool,
    /// This injector's revision (`default` for the default revision).
    pub revision: String,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            image: format!("mesh-proxy:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            discovery_namespace: "istio-system".to_owned(),
            discovery_service_account: "mesh-discovery".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            token_audience: "istio-ca".to_owned(),
            native_sidecars: false,
            revision: "default".to_owned(),
        }
    }
}

/// A pod the injector cannot mesh as asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {message}")]
pub struct InjectError {
    /// The annotation at fault.
    pub annotation: String,
    /// What is wrong with it.
    pub message: String,
}

fn bad(annotation: &str, message: impl Into<String>) -> InjectError {
    InjectError {
        annotation: annotation.to_owned(),
        message: message.into(),
    }
}

/// Why a pod is not injected (`Ok(())` when it is).
pub fn injection_required(
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    meta: &ObjectMeta,
    spec: &PodSpec,
    revision: &str,
) -> Result<(), String> {
    if spec.host_network == Some(true) {
        return Err("the pod uses the host's network".to_owned());
    }
    if IGNORED_NAMESPACES.contains(&namespace) {
        return Err(format!("namespace {namespace} is never injected"));
    }
    if is_injected(meta, spec) {
        return Err("the pod is already injected".to_owned());
    }
    // The label wins over the (deprecated) annotation.
    let asked = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .or_else(|| meta.annotations.as_ref().and_then(|a| a.get(INJECT_LABEL)));
    let pod_says = match asked.map(|v| v.to_ascii_lowercase()) {
        None => None,
        Some(v) if v.is_empty() => None,
        Some(v) => Some(matches!(v.as_str(), "y" | "yes" | "true" | "on")),
    };
    if pod_says == Some(false) {
        return Err(format!("the pod says {INJECT_LABEL}: false"));
    }
    let Some(ns) = namespace_labels else {
        return Ok(());
    };
    if let Some(v) = ns.get("istio-injection") {
        return if v == "enabled" {
            Ok(())
        } else {
            Err(format!("namespace {namespace} has istio-injection={v}"))
        };
    }
    if let Some(rev) = ns.get("istio.io/rev") {
        return if rev == revision {
            Ok(())
        } else {
            Err(format!(
                "namespace {namespace} asks for revision {rev}, this is {revision}"
            ))
        };
    }
    match meta.labels.as_ref().and_then(|l| l.get("istio.io/rev")) {
        Some(rev) if rev == revision => Ok(()),
        Some(rev) => Err(format!(
            "the pod asks for revision {rev}, this is {revision}"
        )),
        None if pod_says == Some(true) && revision == "default" => Ok(()),
        None => Err(format!(
            "namespace {namespace} is not labelled istio-injection=enabled"
        )),
    }
}

/// Whether the pod already carries the sidecar.
pub fn is_injected(meta: &ObjectMeta, spec: &PodSpec) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
        || spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == PROXY_CONTAINER)
}

/// Injects the sidecar into the pod (or pod template) `meta` and `spec` of namespace
/// `namespace`; `workload` names the workload when the pod has no `app` label. Returns
/// `false`, changing nothing, when the pod is already injected.
pub fn inject_pod(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    namespace: &str,
    workload: &str,
    options: &InjectOptions,
) -> Result<bool, InjectError> {
    if is_injected(meta, spec) {
        return Ok(false);
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let capture = match annotations
        .get("sidecar.istio.io/interceptionMode")
        .map(String::as_str)
    {
        None | Some("REDIRECT") => true,
        Some("NONE") => false,
        Some(other) => {
            return Err(bad(
                "sidecar.istio.io/interceptionMode",
                format!("{other:?} is not supported; REDIRECT or NONE"),
            ));
        }
    };
    let init_args = capture_args(&annotations)?;
    let drain = drain_duration(&annotations)?;
    let resources = proxy_resources(&annotations)?;

    // Labels first: the proxy's settings carry them.
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels
        .entry("security.istio.io/tlsMode".to_owned())
        .or_insert_with(|| "istio".to_owned());
    let canonical_name = [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .iter()
    .find_map(|k| labels.get(*k).cloned())
    .unwrap_or_else(|| workload.to_owned());
    let canonical_revision = [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .iter()
    .find_map(|k| labels.get(*k).cloned())
    .unwrap_or_else(|| "latest".to_owned());
    labels.insert("service.istio.io/canonical-name".to_owned(), canonical_name);
    labels.insert(
        "service.istio.io/canonical-revision".to_owned(),
        canonical_revision,
    );
    // The projected token needs the service account named, which the API server's
    // ServiceAccount admission plugin does before webhooks are called; named here too,
    // for manifests and servers without it.
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    spec.service_account_name = Some(service_account.clone());
    let settings = settings_yaml(
        namespace,
        &service_account,
        labels,
        &drain,
        spec,
        capture,
        options,
    );

    let first_app = spec.containers.first().map(|c| c.name.clone());
    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(SETTINGS_ANNOTATION.to_owned(), settings);
    if let Some(first) = first_app {
        annotations
            .entry("kubectl.kubernetes.io/default-container".to_owned())
            .or_insert(first);
    }
    for (k, v) in [
        ("prometheus.io/scrape", "true".to_owned()),
        ("prometheus.io/port", HEALTH_PORT.to_string()),
        ("prometheus.io/path", "/stats/prometheus".to_owned()),
    ] {
        annotations.entry(k.to_owned()).or_insert(v);
    }

    let proxy = proxy_container(options, resources, options.native_sidecars);
    let mut init_containers = spec.init_containers.take().unwrap_or_default();
    let mut front = Vec::new();
    let mut injected_init = Vec::new();
    if capture {
        front.push(init_container(options, init_args));
        injected_init.push(INIT_CONTAINER);
    }
    let mut injected_containers = Vec::new();
    if options.native_sidecars {
        front.push(proxy);
        injected_init.push(PROXY_CONTAINER);
    } else {
        spec.containers.push(proxy);
        injected_containers.push(PROXY_CONTAINER);
    }
    front.append(&mut init_containers);
    if !front.is_empty() {
        spec.init_containers = Some(front);
    }
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes(options));
    let grace = drain.as_secs().saturating_add(5);
    let grace = i64::try_from(grace).unwrap_or(i64::MAX);
    if spec.termination_grace_period_seconds.unwrap_or(30) < grace {
        spec.termination_grace_period_seconds = Some(grace);
    }
    let status = serde_json::json!({
        "initContainers": injected_init,
        "containers": injected_containers,
        "volumes": [SETTINGS_VOLUME, TOKEN_VOLUME, ROOT_VOLUME],
        "imagePullSecrets": null,
        "revision": options.revision,
    });
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(STATUS_ANNOTATION.to_owned(), status.to_string());
    Ok(true)
}

/// `mesh-proxy init`'s arguments, istio-iptables' flags, from the pod's annotations.
fn capture_args(annotations: &BTreeMap<String, String>) -> Result<Vec<String>, InjectError> {
    let get = |name: &str| {
        annotations
            .get(&format!("traffic.sidecar.istio.io/{name}"))
            .map(|v| v.trim().to_owned())
    };
    let key = |name: &str| format!("traffic.sidecar.istio.io/{name}");
    let include_ranges = get("includeOutboundIPRanges").unwrap_or_else(|| "*".to_owned());
    if include_ranges != "*" {
        cidrs(&key("includeOutboundIPRanges"), &include_ranges)?;
    }
    let exclude_ranges = get("excludeOutboundIPRanges").unwrap_or_default();
    cidrs(&key("excludeOutboundIPRanges"), &exclude_ranges)?;
    let include_inbound = get("includeInboundPorts").unwrap_or_else(|| "*".to_owned());
    if include_inbound != "*" {
        ports(&key("includeInboundPorts"), &include_inbound)?;
    }
    let exclude_inbound = get("excludeInboundPorts").unwrap_or_default();
    let mut excluded: Vec<String> = vec!["15090".into(), "15021".into(), "15020".into()];
    for p in ports(&key("excludeInboundPorts"), &exclude_inbound)? {
        let p = p.to_string();
        if !excluded.contains(&p) {
            excluded.push(p);
        }
    }
    let exclude_outbound = get("excludeOutboundPorts").unwrap_or_default();
    ports(&key("excludeOutboundPorts"), &exclude_outbound)?;
    let include_outbound = get("includeOutboundPorts").unwrap_or_default();
    ports(&key("includeOutboundPorts"), &include_outbound)?;

    let mut args: Vec<String> = vec![
        "init".into(),
        "-p".into(),
        OUTBOUND_PORT.to_string(),
        "-z".into(),
        INBOUND_PORT.to_string(),
        "-u".into(),
        PROXY_UID.to_string(),
        "-i".into(),
        include_ranges,
    ];
    if !exclude_ranges.is_empty() {
        args.extend(["-x".into(), exclude_ranges]);
    }
    args.extend([
        "-b".into(),
        include_inbound,
        "-d".into(),
        excluded.join(","),
    ]);
    if !exclude_outbound.is_empty() {
        args.extend(["-o".into(), exclude_outbound]);
    }
    if !include_outbound.is_empty() {
        args.extend(["-q".into(), include_outbound]);
    }
    Ok(args)
}

/// A comma-separated list of CIDRs (empty is none).
fn cidrs(annotation: &str, value: &str) -> Result<(), InjectError> {
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (addr, len) = item.split_once('/').unwrap_or((item, ""));
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| bad(annotation, format!("{item:?} is not a CIDR")))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if !len.is_empty() && len.parse::<u8>().map_or(true, |l| l > max) {
            return Err(bad(annotation, format!("{item:?} has a bad prefix length")));
        }
    }
    Ok(())
}

/// A comma-separated list of ports (empty is none).
fn ports(annotation: &str, value: &str) -> Result<Vec<u16>, InjectError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad(annotation, format!("{p:?} is not a port"))),
        })
        .collect()
}

/// ProxyConfig's `terminationDrainDuration`: 5 s, or the pod's `proxy.istio.io/config`.
fn drain_duration(
    annotations: &BTreeMap<String, String>,
) -> Result<std::time::Duration, InjectError> {
    const KEY: &str = "proxy.istio.io/config";
    let default = std::time::Duration::from_secs(5);
    let Some(text) = annotations.get(KEY) else {
        return Ok(default);
    };
    let config: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| bad(KEY, format!("not YAML: {e}")))?;
    match config.get("terminationDrainDuration") {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::String(s)) => s
            .parse::<mesh_core::config::Duration>()
            .map(|d| d.as_std())
            .map_err(|e| bad(KEY, format!("terminationDrainDuration: {e}"))),
        Some(other) => Err(bad(
            KEY,
            format!("terminationDrainDuration: {other} is not a duration such as \"5s\""),
        )),
    }
}

/// Istio's defaults, or the pod's `sidecar.istio.io/proxy*` annotations.
fn proxy_resources(
    annotations: &BTreeMap<String, String>,
) -> Result<ResourceRequirements, InjectError> {
    let pick = |key: &str, default: &str| -> Result<Quantity, InjectError> {
        let name = format!("sidecar.istio.io/{key}");
        match annotations.get(&name).map(|v| v.trim()) {
            None => Ok(Quantity(default.to_owned())),
            Some("") => Err(bad(&name, "empty")),
            Some(v) if v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') => {
                Ok(Quantity(v.to_owned()))
            }
            Some(v) => Err(bad(&name, format!("{v:?} is not a quantity"))),
        }
    };
    let requests = BTreeMap::from([
        ("cpu".to_owned(), pick("proxyCPU", "100m")?),
        ("memory".to_owned(), pick("proxyMemory", "128Mi")?),
    ]);
    let limits = BTreeMap::from([
        ("cpu".to_owned(), pick("proxyCPULimit", "2000m")?),
        ("memory".to_owned(), pick("proxyMemoryLimit", "1024Mi")?),
    ]);
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..ResourceRequirements::default()
    })
}

/// The proxy's settings file: who the workload is and where `discovery` is.
fn settings_yaml(
    namespace: &str,
    service_account: &str,
    labels: &BTreeMap<String, String>,
    drain: &std::time::Duration,
    spec: &PodSpec,
    capture: bool,
    options: &InjectOptions,
) -> String {
    let ns = &options.discovery_namespace;
    // The application's port: the first one its containers declare.
    let app_port = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .map_or(8080, |p| p.container_port);
    let settings = serde_json::json!({
        "workload": {
            "namespace": namespace,
            "serviceAccount": service_account,
            "labels": labels,
        },
        "trustDomain": options.trust_domain,
        "discovery": {
            "address": format!("mesh-discovery.{ns}.svc:15012"),
            "identity": format!(
                "spiffe://{}/ns/{ns}/sa/{}",
                options.trust_domain, options.discovery_service_account
            ),
            "serverName": format!("mesh-discovery.{ns}.svc"),
            "tokenFile": "/var/run/secrets/tokens/istio-token",
            "rootCert": "/var/run/secrets/istio/root-cert.pem",
        },
        "listeners": {
            "inbound": format!("0.0.0.0:{INBOUND_PORT}"),
            "outbound": format!("127.0.0.1:{OUTBOUND_PORT}"),
            "app": format!("127.0.0.1:{app_port}"),
            "admin": format!("0.0.0.0:{HEALTH_PORT}"),
            // `istio-init` redirects the pod's traffic to the listeners: route by
            // original destination, deliver inbound at the original port.
            "capture": capture,
        },
        "limits": {"drainTimeout": if drain.subsec_millis() == 0 {
            format!("{}s", drain.as_secs())
        } else {
            format!("{}ms", drain.as_millis())
        }},
    });
    serde_saphyr::to_string(&settings).unwrap_or_default()
}

fn proxy_container(
    options: &InjectOptions,
    resources: ResourceRequirements,
    native: bool,
) -> Container {
    let probe = |period: i32, failures: i32, timeout: Option<i32>| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz/ready".to_owned()),
            port: IntOrString::Int(i32::from(HEALTH_PORT)),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(0),
        period_seconds: Some(period),
        timeout_seconds: timeout,
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_owned(),
            ..ObjectFieldSelector::default()
        }),
        ..EnvVarSource::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: options.image_pull_policy.clone(),
        args: Some(vec![
            "sidecar".into(),
            "--settings".into(),
            "/etc/mesh/sidecar.yaml".into(),
        ]),
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(field("metadata.name")),
                ..EnvVar::default()
            },
            EnvVar {
                name: "POD_NAMESPACE".into(),
                value_from: Some(field("metadata.namespace")),
                ..EnvVar::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http-status".into()),
            container_port: i32::from(HEALTH_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe(15, 4, Some(3))),
        startup_probe: Some(probe(1, 600, Some(3))),
        resources: Some(resources),
        restart_policy: native.then(|| "Always".to_owned()),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount(SETTINGS_VOLUME, "/etc/mesh"),
            mount(TOKEN_VOLUME, "/var/run/secrets/tokens"),
            mount(ROOT_VOLUME, "/var/run/secrets/istio"),
        ]),
        ..Container::default()
    }
}

fn init_container(options: &InjectOptions, args: Vec<String>) -> Container {
    Container {
        name: INIT_CONTAINER.to_owned(),
        image: Some(options.image.clone()),
        image_pull_policy: options.image_pull_policy.clone(),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".into())),
                ("memory".to_owned(), Quantity("40Mi".into())),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("2000m".into())),
                ("memory".to_owned(), Quantity("1024Mi".into())),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

fn volumes(options: &InjectOptions) -> Vec<Volume> {
    vec![
        Volume {
            name: SETTINGS_VOLUME.to_owned(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![DownwardAPIVolumeFile {
                    path: "sidecar.yaml".to_owned(),
                    field_ref: Some(ObjectFieldSelector {
                        field_path: format!("metadata.annotations['{SETTINGS_ANNOTATION}']"),
                        ..ObjectFieldSelector::default()
                    }),
                    ..DownwardAPIVolumeFile::default()
                }]),
                ..DownwardAPIVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(options.token_audience.clone()),
                        expiration_seconds: Some(43200),
                        path: "istio-token".to_owned(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: ROOT_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: "istio-ca-root-cert".to_owned(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(yaml: &str) -> (ObjectMeta, PodSpec) {
        let pod: Pod = serde_saphyr::from_str(yaml).unwrap();
        (pod.metadata, pod.spec.unwrap())
    }

    const APP: &str = "metadata:\n  name: payment\n  labels: {app: payment-service, version: v1}\n\
        spec:\n  serviceAccountName: payment-service\n  containers:\n  \
        - {name: app, image: payment:1, ports: [{containerPort: 8080}]}\n";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn istio_selection_precedence() {
        let (meta, spec) = pod(APP);
        let ns = |pairs: &[(&str, &str)]| labels(pairs);
        let decide = |ns_labels: &BTreeMap<String, String>, meta: &ObjectMeta| {
            injection_required("production", Some(ns_labels), meta, &spec, "default").is_ok()
        };
        assert!(decide(&ns(&[("istio-injection", "enabled")]), &meta));
        assert!(!decide(&ns(&[("istio-injection", "disabled")]), &meta));
        assert!(!decide(&ns(&[]), &meta));
        // istio-injection wins over istio.io/rev.
        assert!(!decide(
            &ns(&[("istio-injection", "disabled"), ("istio.io/rev", "default")]),
            &meta
        ));
        assert!(decide(&ns(&[("istio.io/rev", "default")]), &meta));
        assert!(!decide(&ns(&[("istio.io/rev", "canary")]), &meta));

        let with = |label: Option<&str>, annotation: Option<&str>, rev: Option<&str>| {
            let mut m = meta.clone();
            let l = m.labels.get_or_insert_with(BTreeMap::new);
            if let Some(v) = label {
                l.insert(INJECT_LABEL.into(), v.into());
            }
            if let Some(v) = rev {
                l.insert("istio.io/rev".into(), v.into());
            }
            if let Some(v) = annotation {
                m.annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(INJECT_LABEL.into(), v.into());
            }
            m
        };
        let enabled = ns(&[("istio-injection", "enabled")]);
        assert!(!decide(&enabled, &with(Some("false"), None, None)));
        assert!(!decide(&enabled, &with(None, Some("false"), None)));
        // The label wins over the annotation.
        assert!(decide(&enabled, &with(Some("true"), Some("false"), None)));
        assert!(!decide(&enabled, &with(Some("no"), Some("true"), None)));
        // Unlabelled namespace: the pod opts in by label, or names the revision.
        assert!(decide(&ns(&[]), &with(Some("true"), None, None)));
        assert!(decide(&ns(&[]), &with(None, None, Some("default"))));
        assert!(!decide(&ns(&[]), &with(None, None, Some("canary"))));
        assert!(!decide(&ns(&[]), &with(Some("true"), None, Some("canary"))));

        // Never: kube-system, host network, already injected.
        assert!(
            injection_required("kube-system", Some(&enabled), &meta, &spec, "default").is_err()
        );
        let mut host = spec.clone();
        host.host_network = Some(true);
        assert!(injection_required("production", Some(&enabled), &meta, &host, "default").is_err());
        // Without namespace labels (kube-inject, or the webhook's selectors chose).
        assert!(injection_required("production", None, &meta, &spec, "default").is_ok());
    }

    #[test]
    fn injects_istio_containers_volumes_labels_and_is_idempotent() {
        let (mut meta, mut spec) = pod(APP);
        let options = InjectOptions::default();
        assert!(inject_pod(&mut meta, &mut spec, "production", "payment", &options).unwrap());
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["security.istio.io/tlsMode"], "istio");
        assert_eq!(labels["service.istio.io/canonical-name"], "payment-service");
        assert_eq!(labels["service.istio.io/canonical-revision"], "v1");
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init[0].name, "istio-init");
        assert_eq!(
            init[0].args.as_ref().unwrap().join(" "),
            "init -p 15001 -z 15006 -u 1337 -i * -b * -d 15090,15021,15020"
        );
        let caps = init[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(caps.add.as_ref().unwrap(), &["NET_ADMIN", "NET_RAW"]);
        assert_eq!(spec.containers.len(), 2);
        let proxy = &spec.containers[1];
        assert_eq!(proxy.name, "istio-proxy");
        assert_eq!(
            proxy.security_context.as_ref().unwrap().run_as_user,
            Some(1337)
        );
        let ready = proxy
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(ready.port, IntOrString::Int(15021));
        let volumes: Vec<_> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            volumes,
            ["mesh-settings", "istio-token", "istio-ca-root-cert"]
        );
        let token = spec.volumes.as_ref().unwrap()[1]
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(token.audience.as_deref(), Some("istio-ca"));
        let annotations = meta.annotations.as_ref().unwrap();
        let status: serde_json::Value =
            serde_json::from_str(&annotations[STATUS_ANNOTATION]).unwrap();
        assert_eq!(status["initContainers"], serde_json::json!(["istio-init"]));
        assert_eq!(status["containers"], serde_json::json!(["istio-proxy"]));
        assert_eq!(
            annotations["kubectl.kubernetes.io/default-container"],
            "app"
        );

        // The settings the proxy reads are valid settings, naming the workload.
        let settings =
            crate::Settings::from_yaml("sidecar.yaml", &annotations[SETTINGS_ANNOTATION]).unwrap();
        assert_eq!(settings.workload.namespace, "production");
        assert_eq!(settings.workload.service_account, "payment-service");
        assert_eq!(settings.workload.labels["app"], "payment-service");
        let discovery = settings.discovery.unwrap();
        assert_eq!(discovery.address, "mesh-discovery.istio-system.svc:15012");
        assert_eq!(settings.listeners.admin.port(), 15021);
        assert_eq!(settings.listeners.app.port(), 8080);
        assert!(
            settings.listeners.capture,
            "istio-init redirects, so the proxy captures"
        );

        // Twice changes nothing.
        let (before_meta, before_spec) = (meta.clone(), spec.clone());
        assert!(!inject_pod(&mut meta, &mut spec, "production", "payment", &options).unwrap());
        assert_eq!((meta, spec), (before_meta, before_spec));
    }

    #[test]
    fn interception_mode_none_injects_the_proxy_without_capture() {
        let (mut meta, mut spec) = pod(APP);
        meta.annotations = Some(labels(&[("sidecar.istio.io/interceptionMode", "NONE")]));
        assert!(inject_pod(&mut meta, &mut spec, "p", "w", &InjectOptions::default()).unwrap());
        let init: Vec<_> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| &c.name)
            .collect();
        assert!(!init.iter().any(|n| *n == INIT_CONTAINER), "{init:?}");
        let annotations = meta.annotations.unwrap();
        let settings =
            crate::Settings::from_yaml("sidecar.yaml", &annotations[SETTINGS_ANNOTATION]).unwrap();
        assert!(!settings.listeners.capture);
    }

    #[test]
    fn native_sidecar_goes_first_among_init_containers() {
        let yaml = format!("{APP}  initContainers:\n  - {{name: migrate, image: m:1}}\n");
        let (mut meta, mut spec) = pod(&yaml);
        let options = InjectOptions {
            native_sidecars: true,
            ..InjectOptions::default()
        };
        inject_pod(&mut meta, &mut spec, "production", "payment", &options).unwrap();
        let init: Vec<_> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.restart_policy.as_deref()))
            .collect();
        assert_eq!(
            init,
            [
                ("istio-init", None),
                ("istio-proxy", Some("Always")),
                ("migrate", None)
            ]
        );
        assert_eq!(spec.containers.len(), 1);
    }

    #[test]
    fn annotations_become_capture_flags_resources_and_drain() {
        let yaml = APP.replace(
            "  labels:",
            "  annotations:\n    traffic.sidecar.istio.io/includeOutboundIPRanges: 10.0.0.0/8,fd00::/8\n    \
             traffic.sidecar.istio.io/excludeOutboundIPRanges: 10.96.0.1/32\n    \
             traffic.sidecar.istio.io/excludeOutboundPorts: \"5432,6379\"\n    \
             traffic.sidecar.istio.io/excludeInboundPorts: \"9090\"\n    \
             traffic.sidecar.istio.io/includeInboundPorts: \"8080,9090\"\n    \
             sidecar.istio.io/proxyMemory: 64Mi\n    \
             proxy.istio.io/config: '{terminationDrainDuration: 45s}'\n  labels:",
        );
        let (mut meta, mut spec) = pod(&yaml);
        inject_pod(
            &mut meta,
            &mut spec,
            "production",
            "payment",
            &InjectOptions::default(),
        )
        .unwrap();
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(
            init.args.as_ref().unwrap().join(" "),
            "init -p 15001 -z 15006 -u 1337 -i 10.0.0.0/8,fd00::/8 -x 10.96.0.1/32 \
             -b 8080,9090 -d 15090,15021,15020,9090 -o 5432,6379"
        );
        let proxy = &spec.containers[1];
        let requests = proxy.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["memory"], Quantity("64Mi".into()));
        assert_eq!(spec.termination_grace_period_seconds, Some(50));
        let settings = crate::Settings::from_yaml(
            "sidecar.yaml",
            &meta.annotations.as_ref().unwrap()[SETTINGS_ANNOTATION],
        )
        .unwrap();
        assert_eq!(settings.limits.drain_timeout.as_std().as_secs(), 45);
    }

    #[test]
    fn bad_annotations_are_named() {
        for (key, value, says) in [
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/33",
                "prefix",
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "http",
                "not a port",
            ),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "everything",
                "not a CIDR",
            ),
            (
                "sidecar.istio.io/interceptionMode",
                "TPROXY",
                "not supported",
            ),
            (
                "proxy.istio.io/config",
                "terminationDrainDuration: soon",
                "terminationDrainDuration",
            ),
        ] {
            let (mut meta, mut spec) = pod(APP);
            meta.annotations = Some(labels(&[(key, value)]));
            let e =
                inject_pod(&mut meta, &mut spec, "p", "w", &InjectOptions::default()).unwrap_err();
            assert_eq!(e.annotation, key);
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn manifests_inject_every_workload_kind_and_pass_others_through() {
        let stream = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 80}]\n\
            ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: production}\n\
            spec:\n  selector: {matchLabels: {app: d}}\n  template:\n    metadata: {labels: {app: d}}\n    \
            spec: {containers: [{name: d, image: d}]}\n\
            ---\napiVersion: batch/v1\nkind: CronJob\nmetadata: {name: c}\nspec:\n  schedule: '* * * * *'\n  \
            jobTemplate:\n    spec:\n      template:\n        spec: {restartPolicy: Never, containers: [{name: c, image: c}]}\n\
            ---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n  \
            spec: {containers: [{name: p, image: p}]}\n\
            ---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: opted-out}\nspec:\n  serviceName: opted-out\n  \
            selector: {matchLabels: {app: opted-out}}\n  template:\n    metadata:\n      labels: {app: opted-out, sidecar.istio.io/inject: 'false'}\n    \
            spec: {containers: [{name: app, image: app}]}\n";
        let (out, notes) =
            inject_manifests("in.yaml", stream, "default", &InjectOptions::default()).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(&out).unwrap();
        assert_eq!(docs.len(), 5);
        let source: Vec<serde_json::Value> = serde_saphyr::from_str_multiple(stream).unwrap();
        assert_eq!(docs[0], source[0]);
        assert_eq!(docs[4], source[4]);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("StatefulSet/default/opted-out: not injected"),
            "{notes:?}"
        );
        let names = |containers: &serde_json::Value| -> Vec<String> {
            containers
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            names(&docs[1]["spec"]["template"]["spec"]["containers"]),
            ["d", "istio-proxy"]
        );
        let deployment_settings = docs[1]["spec"]["template"]["metadata"]["annotations"]
            [SETTINGS_ANNOTATION]
            .as_str()
            .unwrap();
        assert!(deployment_settings.contains("namespace: production"));
        assert_eq!(
            names(&docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"]),
            ["istio-init"]
        );
        assert_eq!(
            names(&docs[3]["items"][0]["spec"]["containers"]),
            ["p", "istio-proxy"]
        );
        // Injecting the output again changes nothing.
        let (again, _) =
            inject_manifests("out.yaml", &out, "default", &InjectOptions::default()).unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn manifest_errors_name_the_file_and_object() {
        let e = inject_manifests("bad.yaml", "a: [1,\n", "default", &InjectOptions::default())
            .unwrap_err();
        assert!(e.to_string().starts_with("bad.yaml:"), "{e}");
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: x}}\n\
            spec: {containers: [{name: p, image: p}]}\n";
        let e = inject_manifests("pod.yaml", pod, "default", &InjectOptions::default())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "pod.yaml: document 1, Pod/default/p: annotation \
             traffic.sidecar.istio.io/excludeOutboundPorts: \"x\" is not a port"
        );
    }
}
