//! `telemetry.istio.io` Telemetry: tracing, access logging and metrics settings for the
//! mesh (root namespace, no selector), a namespace (no selector) or workloads
//! (`selector`), ISTIO.md TA-01..TA-10.
//!
//! This module holds the YAML types and the choice of the resources that apply to one
//! workload ([`telemetries_for`]); merging them and compiling their CEL expressions is
//! `mesh-telemetry`'s `policy` module.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Labels, MeshConfig, PolicyTargetReference, Resource, WorkloadSelector};

/// A Telemetry resource.
pub type Telemetry = Resource<TelemetrySpec>;

/// `spec` of a Telemetry.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TelemetrySpec {
    /// Workloads this resource applies to; none: the namespace (or, in the root
    /// namespace, the mesh).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// A single target (deprecated form of `targetRefs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// Gateways, services or service entries this resource applies to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// Tracing rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<TracingRule>,
    /// Metrics rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricsRule>,
    /// Access-logging rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<AccessLoggingRule>,
}

impl TelemetrySpec {
    /// Whether the resource is bound with `targetRef`/`targetRefs` rather than by
    /// namespace or selector.
    pub fn is_targeted(&self) -> bool {
        self.target_ref.is_some() || !self.target_refs.is_empty()
    }
}

/// The traffic direction a rule applies to (`match.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkloadMode {
    /// Both directions (the default).
    #[default]
    ClientAndServer,
    /// Outbound: the proxy as client.
    Client,
    /// Inbound: the proxy as server.
    Server,
}

impl WorkloadMode {
    /// Whether the rule applies to the client (outbound) side, or to the server side.
    pub fn covers(self, client: bool) -> bool {
        match self {
            WorkloadMode::ClientAndServer => true,
            WorkloadMode::Client => client,
            WorkloadMode::Server => !client,
        }
    }
}

/// `match` of a tracing or access-logging rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ModeSelector {
    /// Direction; default both.
    pub mode: WorkloadMode,
}

/// A provider reference (`providers[].name`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ProviderRef {
    /// Provider name from MeshConfig `extensionProviders` (or built-in).
    pub name: String,
}

/// One tracing rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TracingRule {
    /// Direction.
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<ModeSelector>,
    /// Providers (at most one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// Percentage of new traces sampled (0–100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_sampling_percentage: Option<f64>,
    /// Stop reporting spans (propagation and sampling go on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_span_reporting: Option<bool>,
    /// Tags added to spans; replaces the parent's map when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_tags: Option<BTreeMap<String, CustomTag>>,
    /// Derive the sampling decision from `x-request-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_request_id_for_trace_sampling: Option<bool>,
    /// Add Istio's own span tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_istio_tags: Option<bool>,
    /// Stop forwarding trace headers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disable_context_propagation: Option<bool>,
}

/// A custom span tag: exactly one source.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CustomTag {
    /// A fixed value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub literal: Option<LiteralTag>,
    /// An environment variable of the proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<NamedTag>,
    /// A request header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<NamedTag>,
    /// A formatter string (Envoy command operators).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub formatter: Option<LiteralTag>,
}

/// `literal` (and `formatter`) of a custom tag.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LiteralTag {
    /// The value.
    pub value: String,
}

/// `environment` and `header` of a custom tag.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NamedTag {
    /// Variable or header name.
    pub name: String,
    /// Used when the variable or header is absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_value: Option<String>,
}

/// One access-logging rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessLoggingRule {
    /// Direction.
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<ModeSelector>,
    /// Providers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// Turns access logging off (or, `false`, on again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Logs only requests for which the expression is true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<AccessLogFilter>,
}

/// `filter` of an access-logging rule.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessLogFilter {
    /// A CEL expression over request attributes.
    pub expression: String,
}

/// One metrics rule.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MetricsRule {
    /// Providers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<ProviderRef>,
    /// Overrides, applied in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<MetricsOverride>,
    /// TCP reporting interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reporting_interval: Option<super::Duration>,
}

/// One metrics override.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MetricsOverride {
    /// Which metrics and direction; none: every metric, both directions.
    #[serde(rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<MetricSelector>,
    /// Turns the matched metrics off (or, `false`, on again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Label changes, by label name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

/// `match` of a metrics override.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MetricSelector {
    /// A standard metric; default all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<IstioMetric>,
    /// A custom metric name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_metric: Option<String>,
    /// Direction; default both.
    pub mode: WorkloadMode,
}

/// Istio's standard metrics (TA-10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum IstioMetric {
    #[default]
    AllMetrics,
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    TcpOpenedConnections,
    TcpClosedConnections,
    TcpSentBytes,
    TcpReceivedBytes,
    GrpcRequestMessages,
    GrpcResponseMessages,
}

/// A label change.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TagOverride {
    /// `UPSERT` (default) or `REMOVE`.
    pub operation: TagOperation,
    /// For `UPSERT`: a CEL expression giving the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Operation of a tag override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TagOperation {
    /// Insert or replace the label.
    #[default]
    Upsert,
    /// Remove the label.
    Remove,
}

/// The Telemetry resources that apply to a workload in `namespace` with `labels`, from
/// the most general to the most specific (TA-01): the mesh's (selector-less, in the root
/// namespace), the namespace's (selector-less, in `namespace`) and the workload's (in
/// `namespace`, with a selector its labels match). Where Istio allows one resource per
/// level and several exist, the oldest (creation timestamp, then load order) is taken.
/// A resource bound with `targetRefs` is a workload-level resource of the Gateway API
/// gateways its references select ([`PolicyTargetReference::selects`]); those naming
/// services and waypoints apply to no workload here.
pub fn telemetries_for<'a>(
    config: &'a MeshConfig,
    namespace: &str,
    labels: &Labels,
) -> Vec<&'a Telemetry> {
    let all = config.telemetries();
    let oldest = |pred: &dyn Fn(&Telemetry) -> bool| {
        all.iter().filter(|t| pred(t)).min_by_key(|t| t.age_key())
    };
    let root = config.root_namespace();
    let unscoped = |t: &Telemetry| !t.spec.is_targeted() && t.spec.selector.is_none();
    let mut out = Vec::new();
    if let Some(t) = oldest(&|t| t.metadata.namespace == root && unscoped(t)) {
        out.push(t);
    }
    if namespace != root
        && let Some(t) = oldest(&|t| t.metadata.namespace == namespace && unscoped(t))
    {
        out.push(t);
    }
    if let Some(t) = oldest(&|t| {
        let ns = &t.metadata.namespace;
        if t.spec.is_targeted() {
            t.spec
                .target_ref
                .iter()
                .chain(&t.spec.target_refs)
                .any(|r| r.selects(ns, root, namespace, labels))
        } else {
            ns == namespace && t.spec.selector.as_ref().is_some_and(|s| s.matches(labels))
        }
    }) {
        out.push(t);
    }
    out
}
