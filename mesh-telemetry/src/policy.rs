//! Istio's `Telemetry` API, compiled for one workload: trace sampling, span reporting and
//! custom tags, access-log enablement and filters, and metric overrides (disable, tag
//! overrides), per direction (ISTIO.md TA-01..TA-10).
//!
//! # Behaviour
//!
//! [`TelemetryPolicy::compile`] takes the resources that apply to the workload from the
//! most general to the most specific (mesh, namespace, workload:
//! [`mesh_core::config::telemetries_for`]) and merges them per direction (client =
//! outbound, server = inbound, after `match.mode`):
//!
//! - tracing merges field by field, a more specific value replacing a general one, except
//!   `customTags`, which replaces the parent's map as a whole (TA-03);
//! - access logging: the most specific rule that covers the direction decides, wholly
//!   (`disabled` and `filter`). A rule that does not say `disabled: true` turns logging
//!   on; with no rule at any level the proxy logs as its settings say;
//! - metric overrides apply in order, mesh then namespace then workload, each resource's
//!   in list order (TA-06): `disabled` sets or clears the matched metrics (TA-08), and a
//!   tag override on a label replaces an earlier one on the same label and metric.
//!
//! Expressions are CEL ([`cel_interpreter`]) over the request attributes this module
//! knows ([`ATTRIBUTES`]); an expression that does not parse, names an attribute or
//! function outside that set, or fails on a sample request, is an error located at its
//! field ([`check`]). At run time an expression that fails (a header that is absent) is
//! false for a filter and `unknown` for a label value.
//!
//! No policy (the default) leaves the layer exactly as it was: nothing here runs per
//! request.
//!
//! # Where we differ from Istio
//!
//! - `providers` are accepted and not used: spans go to the proxy's exporter, the access
//!   log where the settings say (or standard output, Istio's `envoy` provider, when the
//!   settings name none), metrics to `/metrics`.
//! - Resources bound with `targetRefs`, `reportingInterval`, `useRequestIdForTraceSampling`,
//!   `enableIstioTags`, `disableContextPropagation`, the `formatter` custom tag, custom
//!   metrics and the TCP metrics' overrides are not applied.

use std::collections::HashMap;
use std::sync::Arc;

use cel_interpreter::objects::{Key, Map};
use cel_interpreter::{Context, Program, Value as CelValue};
use cel_parser::ast::{Expr, IdedExpr};
use http::HeaderMap;
use mesh_core::config::{IstioMetric, TagOperation, Telemetry as TelemetryResource, WorkloadMode};

use crate::trace::Sampler;

/// The attributes expressions may read, by root: `request.method`, `response.code`, ...
pub const ATTRIBUTES: &[(&str, &[&str])] = &[
    (
        "request",
        &[
            "method",
            "path",
            "url_path",
            "host",
            "scheme",
            "headers",
            "id",
            "useragent",
            "referer",
            "protocol",
        ],
    ),
    ("response", &["code", "flags", "grpc_status"]),
    ("connection", &["mtls"]),
    ("source", &["principal"]),
    ("destination", &["port"]),
];

/// Functions and operators expressions may call.
const FUNCTIONS: &[&str] = &[
    "string",
    "int",
    "uint",
    "size",
    "startsWith",
    "endsWith",
    "contains",
    "has",
];

/// The HTTP metrics an override can address, in [`Metric`] order.
pub(crate) const HTTP_METRICS: usize = 6;

/// One of the HTTP standard metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Metric {
    Requests = 0,
    Duration = 1,
    RequestBytes = 2,
    ResponseBytes = 3,
    RequestMessages = 4,
    ResponseMessages = 5,
}

impl Metric {
    pub(crate) const ALL: [Metric; HTTP_METRICS] = [
        Metric::Requests,
        Metric::Duration,
        Metric::RequestBytes,
        Metric::ResponseBytes,
        Metric::RequestMessages,
        Metric::ResponseMessages,
    ];

    fn of(m: IstioMetric) -> Option<&'static [Metric]> {
        Some(match m {
            IstioMetric::AllMetrics => &Self::ALL,
            IstioMetric::RequestCount => &[Metric::Requests],
            IstioMetric::RequestDuration => &[Metric::Duration],
            IstioMetric::RequestSize => &[Metric::RequestBytes],
            IstioMetric::ResponseSize => &[Metric::ResponseBytes],
            IstioMetric::GrpcRequestMessages => &[Metric::RequestMessages],
            IstioMetric::GrpcResponseMessages => &[Metric::ResponseMessages],
            _ => return None,
        })
    }
}

/// A compiled CEL expression with its text.
#[derive(Clone)]
pub struct Expression {
    text: Arc<str>,
    program: Arc<Program>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Why an expression was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExpressionError(String);

/// What an expression must produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Bool,
    String,
}

impl Expression {
    fn compile(text: &str, want: Want) -> Result<Self, ExpressionError> {
        let invalid = |e: &dyn std::fmt::Display| {
            ExpressionError(format!("`{text}` is not a CEL expression: {e}"))
        };
        // The parser panics on some malformed input (an operator without its operand):
        // that is a rejected expression, not a crash.
        let parsed = std::panic::catch_unwind(|| {
            let ast = cel_parser::Parser::default().parse(text)?;
            Ok((ast, Program::compile(text)?))
        });
        let (ast, program) = match parsed {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(invalid(&e as &cel_parser::ParseErrors)),
            Err(_) => return Err(invalid(&"incomplete expression")),
        };
        walk(&ast).map_err(|m| ExpressionError(format!("`{text}`: {m}")))?;
        let this = Self {
            text: Arc::from(text),
            program: Arc::new(program),
        };
        // A trial on a sample request catches type errors (`response.code >= 'a'`).
        match this.program.execute(&Attributes::sample().context()) {
            Ok(CelValue::Bool(_)) if want == Want::Bool => {}
            Ok(CelValue::String(_)) if want == Want::String => {}
            // An attribute the sample does not carry (a header).
            Ok(CelValue::Null) => {}
            Ok(v) => {
                let got = match v {
                    CelValue::Bool(_) => "a bool",
                    CelValue::String(_) => "a string",
                    CelValue::Int(_) | CelValue::UInt(_) => "an integer (wrap it in string())",
                    _ => "another type",
                };
                return Err(ExpressionError(format!(
                    "`{text}` must give {}, it gives {got}",
                    match want {
                        Want::Bool => "a bool",
                        Want::String => "a string",
                    }
                )));
            }
            // A header the sample does not carry.
            Err(cel_interpreter::ExecutionError::NoSuchKey(_)) => {}
            Err(e) => {
                return Err(ExpressionError(format!(
                    "`{text}` cannot be evaluated: {e}"
                )));
            }
        }
        Ok(this)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn eval(&self, ctx: &Context<'_>) -> Option<CelValue> {
        self.program.execute(ctx).ok()
    }

    /// Evaluates a filter: false when it fails.
    pub fn matches(&self, ctx: &Context<'_>) -> bool {
        matches!(self.eval(ctx), Some(CelValue::Bool(true)))
    }

    /// Evaluates a label value: `unknown` when it fails.
    pub fn value(&self, ctx: &Context<'_>) -> Arc<str> {
        match self.eval(ctx) {
            Some(CelValue::String(s)) => Arc::from(s.as_str()),
            _ => Arc::from("unknown"),
        }
    }
}

/// Checks that only known attributes and functions are used.
fn walk(e: &IdedExpr) -> Result<(), String> {
    match &e.expr {
        Expr::Ident(name) => {
            if ATTRIBUTES.iter().any(|(root, _)| root == name) {
                Ok(())
            } else {
                Err(format!("unknown attribute `{name}`"))
            }
        }
        Expr::Select(s) => {
            if let Expr::Ident(root) = &s.operand.expr {
                let Some((_, fields)) = ATTRIBUTES.iter().find(|(r, _)| r == root) else {
                    return Err(format!("unknown attribute `{root}`"));
                };
                if !fields.contains(&s.field.as_str()) {
                    return Err(format!("unknown attribute `{root}.{}`", s.field));
                }
                return Ok(());
            }
            if let Expr::Select(inner) = &s.operand.expr
                && let Expr::Ident(root) = &inner.operand.expr
                && root == "request"
                && inner.field == "headers"
            {
                // `request.headers.x`: a header key.
                return Ok(());
            }
            Err(format!("unsupported selection `.{}`", s.field))
        }
        Expr::Call(c) => {
            let operator = c.func_name.starts_with('_')
                || c.func_name.starts_with("!_")
                || c.func_name.starts_with('@');
            if !operator && !FUNCTIONS.contains(&c.func_name.as_str()) {
                return Err(format!("unsupported function `{}`", c.func_name));
            }
            if let Some(t) = &c.target {
                walk(t)?;
            }
            c.args.iter().try_for_each(walk)
        }
        Expr::Literal(_) => Ok(()),
        Expr::List(l) => l.elements.iter().try_for_each(walk),
        _ => Err("unsupported expression form".to_owned()),
    }
}

/// The request attributes an expression reads (the subset of Envoy's that the layer
/// sees).
#[derive(Debug, Default)]
pub struct Attributes<'a> {
    /// Method.
    pub method: &'a str,
    /// Path with query.
    pub path: &'a str,
    /// Authority.
    pub host: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Request headers.
    pub headers: Option<&'a HeaderMap>,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    /// Response status, 0 when none was sent.
    pub code: u16,
    /// Response flags.
    pub flags: String,
    /// gRPC status.
    pub grpc_status: Option<u16>,
    /// Whether the downstream connection is mutual TLS.
    pub mtls: bool,
    /// The peer's SPIFFE id.
    pub principal: &'a str,
    /// Destination port.
    pub port: u16,
}

impl Attributes<'_> {
    fn sample() -> Self {
        Self {
            method: "GET",
            path: "/?a=b",
            host: "example",
            scheme: "http",
            protocol: "HTTP/1.1",
            code: 200,
            flags: "-".into(),
            port: 80,
            ..Self::default()
        }
    }

    /// The CEL context.
    pub fn context(&self) -> Context<'static> {
        fn map(entries: Vec<(&str, CelValue)>) -> CelValue {
            let m: HashMap<Key, CelValue> = entries
                .into_iter()
                .map(|(k, v)| (Key::from(k.to_owned()), v))
                .collect();
            CelValue::Map(Map { map: Arc::new(m) })
        }
        let s = |v: &str| CelValue::String(Arc::new(v.to_owned()));
        let header = |n: &str| {
            self.headers
                .and_then(|h| h.get(n))
                .and_then(|v| v.to_str().ok())
                .map_or(CelValue::Null, s)
        };
        let mut headers: HashMap<Key, CelValue> = HashMap::new();
        if let Some(h) = self.headers {
            for (k, v) in h {
                if let Ok(v) = v.to_str() {
                    headers
                        .entry(Key::from(k.as_str().to_owned()))
                        .or_insert_with(|| s(v));
                }
            }
        }
        let url_path = self.path.split('?').next().unwrap_or_default();
        let mut ctx = Context::default();
        ctx.add_variable_from_value(
            "request",
            map(vec![
                ("method", s(self.method)),
                ("path", s(self.path)),
                ("url_path", s(url_path)),
                ("host", s(self.host)),
                ("scheme", s(self.scheme)),
                ("protocol", s(self.protocol)),
                ("id", header("x-request-id")),
                ("useragent", header("user-agent")),
                ("referer", header("referer")),
                (
                    "headers",
                    CelValue::Map(Map {
                        map: Arc::new(headers),
                    }),
                ),
            ]),
        );
        ctx.add_variable_from_value(
            "response",
            map(vec![
                ("code", CelValue::Int(i64::from(self.code))),
                ("flags", s(&self.flags)),
                (
                    "grpc_status",
                    self.grpc_status
                        .map_or(CelValue::Null, |g| CelValue::Int(i64::from(g))),
                ),
            ]),
        );
        ctx.add_variable_from_value("connection", map(vec![("mtls", CelValue::Bool(self.mtls))]));
        ctx.add_variable_from_value("source", map(vec![("principal", s(self.principal))]));
        ctx.add_variable_from_value(
            "destination",
            map(vec![("port", CelValue::Int(i64::from(self.port)))]),
        );
        ctx
    }
}

/// A custom span tag's source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TagSource {
    /// A fixed value (literals, and environment variables read when compiled).
    Literal(String),
    /// A request header, or the default when absent.
    Header {
        /// Header name.
        name: http::HeaderName,
        /// Default value.
        default: Option<String>,
    },
}

/// Tracing for one direction.
#[derive(Clone, Debug, Default)]
pub struct TracingPolicy {
    /// Sampling for new traces; `None`: the proxy's setting.
    pub sampler: Option<Sampler>,
    /// Spans are not exported (propagation and sampling go on).
    pub disable_span_reporting: bool,
    /// Custom tags added to spans.
    pub custom_tags: Vec<(String, TagSource)>,
}

/// Access logging for one direction.
#[derive(Clone, Debug, Default)]
pub struct AccessLogPolicy {
    /// `None`: no rule; `Some(false)`: disabled; `Some(true)`: enabled.
    pub enabled: Option<bool>,
    /// Only requests for which this is true are logged.
    pub filter: Option<Expression>,
}

/// A label change of a metric override.
#[derive(Clone, Debug)]
pub(crate) enum TagAction {
    Remove,
    /// Index into [`MetricsPolicy::exprs`].
    Upsert(usize),
}

/// Metric overrides for one direction.
#[derive(Clone, Debug, Default)]
pub struct MetricsPolicy {
    /// Bit `Metric as u8` set: the metric is not recorded.
    pub(crate) disabled: u8,
    /// Per metric, the label changes (one per label, in first-set order).
    pub(crate) tags: [Vec<(Arc<str>, TagAction)>; HTTP_METRICS],
    /// The distinct UPSERT expressions.
    pub(crate) exprs: Vec<Expression>,
}

impl MetricsPolicy {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.disabled == 0 && self.tags.iter().all(Vec::is_empty)
    }

    /// Whether `m` is recorded.
    pub(crate) fn enabled(&self, m: Metric) -> bool {
        self.disabled & (1 << m as u8) == 0
    }
}

/// Everything for one direction.
#[derive(Clone, Debug, Default)]
pub struct DirectionPolicy {
    /// Tracing.
    pub tracing: TracingPolicy,
    /// Access logging.
    pub access_log: AccessLogPolicy,
    /// Metrics.
    pub metrics: MetricsPolicy,
}

impl DirectionPolicy {
    /// Whether finishing a request needs its attributes (a filter, an UPSERT or a header
    /// tag).
    pub(crate) fn needs_attributes(&self) -> bool {
        self.access_log.filter.is_some()
            || !self.metrics.exprs.is_empty()
            || self
                .tracing
                .custom_tags
                .iter()
                .any(|(_, t)| matches!(t, TagSource::Header { .. }))
    }
}

/// The effective Telemetry of one workload.
#[derive(Clone, Debug, Default)]
pub struct TelemetryPolicy {
    client: DirectionPolicy,
    server: DirectionPolicy,
}

/// A rejected field: its path in the resource and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `spec.accessLogging[0].filter.expression`.
    pub path: String,
    /// Why.
    pub message: String,
}

/// Checks one Telemetry resource: every expression compiles and every tag override is
/// well formed. Errors name the field.
pub fn check(t: &TelemetryResource) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut p = TelemetryPolicy::default();
    p.apply(t, &mut errors);
    errors
}

impl TelemetryPolicy {
    /// Merges `resources`, from the most general to the most specific.
    pub fn compile<'a>(
        resources: impl IntoIterator<Item = &'a TelemetryResource>,
    ) -> Result<Self, Vec<FieldError>> {
        let mut p = Self::default();
        let mut errors = Vec::new();
        for t in resources {
            p.apply(t, &mut errors);
        }
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }

    /// The policy of the client (outbound) or server (inbound) side.
    pub fn direction(&self, client: bool) -> &DirectionPolicy {
        if client { &self.client } else { &self.server }
    }

    fn apply(&mut self, t: &TelemetryResource, errors: &mut Vec<FieldError>) {
        let mut err = |path: String, message: String| errors.push(FieldError { path, message });
        for (client, d) in [(true, &mut self.client), (false, &mut self.server)] {
            for (i, rule) in t.spec.tracing.iter().enumerate() {
                let mode = rule.match_.as_ref().map(|m| m.mode).unwrap_or_default();
                if !mode.covers(client) {
                    continue;
                }
                // Report each problem once, on the first direction the rule covers.
                let first = client || mode == WorkloadMode::Server;
                if let Some(pct) = rule.random_sampling_percentage {
                    if !(0.0..=100.0).contains(&pct) {
                        if first {
                            err(
                                format!("spec.tracing[{i}].randomSamplingPercentage"),
                                format!("{pct} is not within 0–100"),
                            );
                        }
                    } else {
                        d.tracing.sampler = Some(Sampler::percent(pct));
                    }
                }
                if let Some(off) = rule.disable_span_reporting {
                    d.tracing.disable_span_reporting = off;
                }
                if let Some(tags) = &rule.custom_tags {
                    d.tracing.custom_tags.clear();
                    for (name, tag) in tags {
                        let at = format!("spec.tracing[{i}].customTags.{name}");
                        let source = if let Some(l) = &tag.literal {
                            TagSource::Literal(l.value.clone())
                        } else if let Some(e) = &tag.environment {
                            TagSource::Literal(
                                std::env::var(&e.name)
                                    .ok()
                                    .or_else(|| e.default_value.clone())
                                    .unwrap_or_default(),
                            )
                        } else if let Some(h) = &tag.header {
                            match http::HeaderName::from_bytes(h.name.as_bytes()) {
                                Ok(name) => TagSource::Header {
                                    name,
                                    default: h.default_value.clone(),
                                },
                                Err(_) => {
                                    if first {
                                        err(
                                            format!("{at}.header.name"),
                                            format!("`{}` is not a header name", h.name),
                                        );
                                    }
                                    continue;
                                }
                            }
                        } else {
                            if first {
                                err(at, "set one of literal, environment or header".into());
                            }
                            continue;
                        };
                        d.tracing.custom_tags.push((name.clone(), source));
                    }
                }
            }
            for (i, rule) in t.spec.access_logging.iter().enumerate() {
                let mode = rule.match_.as_ref().map(|m| m.mode).unwrap_or_default();
                if !mode.covers(client) {
                    continue;
                }
                d.access_log.enabled = Some(!rule.disabled.unwrap_or(false));
                d.access_log.filter = None;
                if let Some(f) = &rule.filter {
                    match Expression::compile(&f.expression, Want::Bool) {
                        Ok(e) => d.access_log.filter = Some(e),
                        Err(e) if client || mode == WorkloadMode::Server => err(
                            format!("spec.accessLogging[{i}].filter.expression"),
                            e.to_string(),
                        ),
                        Err(_) => {}
                    }
                }
            }
            for (i, rule) in t.spec.metrics.iter().enumerate() {
                for (j, o) in rule.overrides.iter().enumerate() {
                    let at = format!("spec.metrics[{i}].overrides[{j}]");
                    let sel = o.match_.clone().unwrap_or_default();
                    // Report each problem once, on the first direction the override covers.
                    let first = client || sel.mode == WorkloadMode::Server;
                    if !sel.mode.covers(client) {
                        continue;
                    }
                    if sel.custom_metric.is_some() {
                        continue;
                    }
                    let Some(metrics) = Metric::of(sel.metric.unwrap_or_default()) else {
                        // TCP metrics: not overridden.
                        continue;
                    };
                    if let Some(off) = o.disabled {
                        for m in metrics {
                            if off {
                                d.metrics.disabled |= 1 << *m as u8;
                            } else {
                                d.metrics.disabled &= !(1 << *m as u8);
                            }
                        }
                    }
                    for (label, tag) in &o.tag_overrides {
                        let tat = format!("{at}.tagOverrides.{label}");
                        let action = match (tag.operation, &tag.value) {
                            (TagOperation::Remove, Some(v)) if !v.is_empty() => {
                                if first {
                                    err(format!("{tat}.value"), "REMOVE takes no value".into());
                                }
                                continue;
                            }
                            (TagOperation::Remove, _) => TagAction::Remove,
                            (TagOperation::Upsert, None) => {
                                if first {
                                    err(tat, "UPSERT needs a value".into());
                                }
                                continue;
                            }
                            (TagOperation::Upsert, Some(v)) => {
                                let known = d.metrics.exprs.iter().position(|e| e.as_str() == v);
                                match known {
                                    Some(k) => TagAction::Upsert(k),
                                    None => match Expression::compile(v, Want::String) {
                                        Ok(e) => {
                                            d.metrics.exprs.push(e);
                                            TagAction::Upsert(d.metrics.exprs.len() - 1)
                                        }
                                        Err(e) => {
                                            if first {
                                                err(format!("{tat}.value"), e.to_string());
                                            }
                                            continue;
                                        }
                                    },
                                }
                            }
                        };
                        let label: Arc<str> = Arc::from(label.as_str());
                        for m in metrics {
                            let tags = &mut d.metrics.tags[*m as usize];
                            match tags.iter_mut().find(|(l, _)| *l == label) {
                                Some(slot) => slot.1 = action.clone(),
                                None => tags.push((label.clone(), action.clone())),
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{LoadOptions, MeshConfig, telemetries_for};

    fn load(yaml: &str) -> MeshConfig {
        MeshConfig::from_yaml_str("t.yaml", yaml, &LoadOptions::default())
            .expect("loads")
            .0
    }

    #[test]
    fn filters_evaluate_common_forms() {
        let headers = HeaderMap::new();
        let attrs = |code: u16, method: &'static str| Attributes {
            method,
            path: "/api/v1?x=1",
            host: "orders",
            code,
            mtls: true,
            headers: Some(&headers),
            ..Attributes::default()
        };
        let cases = [
            ("response.code >= 400", 404, "GET", true),
            ("response.code >= 400", 200, "GET", false),
            (
                "response.code == 200 && request.method == 'POST'",
                200,
                "POST",
                true,
            ),
            ("request.url_path == '/api/v1' || false", 500, "GET", true),
            (
                "connection.mtls && request.host == 'orders'",
                200,
                "GET",
                true,
            ),
            ("request.headers['x-missing'] == 'a'", 200, "GET", false),
        ];
        for (text, code, method, want) in cases {
            let e = Expression::compile(text, Want::Bool).expect(text);
            assert_eq!(e.matches(&attrs(code, method).context()), want, "{text}");
        }
    }

    #[test]
    fn bad_expressions_are_rejected() {
        for text in [
            "response.code >=",
            "request.nope == 'a'",
            "foo == 1",
            "response.code >= 'a'",
            "response.code",
        ] {
            assert!(Expression::compile(text, Want::Bool).is_err(), "{text}");
        }
        assert!(Expression::compile("destination.port", Want::String).is_err());
        assert!(Expression::compile("string(destination.port)", Want::String).is_ok());
        assert!(Expression::compile("request.headers['x-user']", Want::String).is_ok());
    }

    #[test]
    fn workload_overrides_namespace_overrides_mesh() {
        let c = load(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: mesh, namespace: istio-system}\n\
             spec:\n  tracing: [{randomSamplingPercentage: 10, customTags: {a: {literal: {value: x}}}}]\n  \
             metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]}]\n---\n\
             apiVersion: telemetry.istio.io/v1alpha1\nkind: Telemetry\nmetadata: {name: ns, namespace: prod}\n\
             spec:\n  tracing: [{disableSpanReporting: true}]\n---\n\
             apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: w, namespace: prod}\n\
             spec:\n  selector: {matchLabels: {app: orders}}\n  tracing: [{match: {mode: SERVER}, randomSamplingPercentage: 100}]\n  \
             metrics: [{overrides: [{match: {metric: REQUEST_COUNT, mode: SERVER}, disabled: false}]}]\n",
        );
        let labels = [("app".to_owned(), "orders".to_owned())].into();
        let ts = telemetries_for(&c, "prod", &labels);
        assert_eq!(ts.len(), 3);
        let p = TelemetryPolicy::compile(ts).expect("compiles");
        let (client, server) = (p.direction(true), p.direction(false));
        assert_eq!(client.tracing.sampler.map(|s| s.as_percent()), Some(10.0));
        assert_eq!(server.tracing.sampler.map(|s| s.as_percent()), Some(100.0));
        assert!(client.tracing.disable_span_reporting && server.tracing.disable_span_reporting);
        // customTags came from the mesh and nothing replaced them.
        assert_eq!(server.tracing.custom_tags.len(), 1);
        assert!(!client.metrics.enabled(Metric::Requests));
        assert!(server.metrics.enabled(Metric::Requests));
        // Another workload of the namespace gets only mesh + namespace.
        let other = telemetries_for(&c, "prod", &Default::default());
        assert_eq!(other.len(), 2);
    }
}
