//! Span export: batched, bounded and off the request path.
//!
//! The request path hands a finished [`SpanRecord`] to a [`SpanQueue`] with `try_send`: a
//! full queue drops the span and counts it (`mesh_trace_spans_dropped_total`); nothing on
//! the request path ever waits for a collector. One background task collects spans into
//! batches (by size or interval) and gives each batch to an [`ExportSpans`]
//! implementation under a timeout; while an export is in flight the queue absorbs up to
//! its capacity and sheds the rest. A failed or timed-out batch is counted as dropped.
//!
//! Exporters:
//! - [`OtlpExporter`]: OTLP/HTTP protobuf (`POST /v1/traces`) through `opentelemetry-otlp`
//!   on hyper (no second TLS stack, no reqwest).
//! - [`ZipkinExporter`]: Zipkin JSON v2 (`POST /api/v2/spans`) over hyper, for an address
//!   such as `jaeger-collector:9411`. Written here because `opentelemetry-zipkin`'s default
//!   features pull OpenSSL.
//!
//! # Example
//!
//! ```
//! use mesh_telemetry::trace::export::{ExportConfig, SpanQueue, ZipkinExporter};
//! use mesh_telemetry::{MetricsRegistry, Telemetry, Workload};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let metrics = MetricsRegistry::new();
//! let queue = SpanQueue::spawn(
//!     ZipkinExporter::new("jaeger-collector:9411", "productpage").unwrap(),
//!     ExportConfig::default(),
//!     Telemetry::export_counters(&metrics),
//! );
//! let telemetry = Telemetry::builder(Workload::new("productpage-v1", "default"))
//!     .metrics(metrics)
//!     .spans(queue)
//!     .sampling(10.0) // the article's 10 %
//!     .build();
//! # drop(telemetry);
//! # }
//! ```

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::BoxError;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

/// Whether this hop was the client or the server side of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    /// Outbound: the proxy calls a service.
    Client,
    /// Inbound: the proxy receives a call for its workload.
    Server,
}

/// One finished span.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanRecord {
    /// Trace id.
    pub trace_id: u128,
    /// Whether the trace id is the 64-bit B3 form.
    pub trace_id_64: bool,
    /// Span id.
    pub span_id: u64,
    /// Parent span id.
    pub parent_span_id: Option<u64>,
    /// Operation name (Istio: `<host>:<port>/*`).
    pub name: String,
    /// Client or server.
    pub kind: SpanKind,
    /// Wall-clock start.
    pub start: SystemTime,
    /// Duration.
    pub duration: Duration,
    /// Tags (`http.method`, `http.status_code`, `response_flags`, …).
    pub attributes: Vec<(&'static str, String)>,
    /// Telemetry API custom tags, after the attributes.
    pub custom_tags: Vec<(String, String)>,
    /// Whether the request failed (5xx or a local error).
    pub error: bool,
    /// Debug-sampled.
    pub debug: bool,
}

/// A boxed export future.
pub type ExportFuture<'a> = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + 'a>>;

/// Sends batches of spans to a collector. Called by one task, one batch at a time.
pub trait ExportSpans: Send + Sync + 'static {
    /// Exports one batch.
    fn export(&self, batch: Vec<SpanRecord>) -> ExportFuture<'_>;
}

/// Queue and batching settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// Spans held while the exporter is busy; more are dropped (OTel default 2048).
    pub queue_capacity: usize,
    /// Spans per export call (OTel default 512).
    pub max_batch: usize,
    /// A partial batch is exported after this long (OTel default 5 s).
    pub interval: Duration,
    /// An export call taking longer is abandoned and its spans counted as dropped.
    pub export_timeout: Duration,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 2048,
            max_batch: 512,
            interval: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters the export task updates.
#[derive(Clone, Debug, Default)]
pub struct ExportCounters {
    /// Spans the collector accepted.
    pub exported: Counter,
    /// Spans dropped (queue full, export failed or timed out).
    pub dropped: Counter,
}

enum Msg {
    Span(Box<SpanRecord>),
    Flush(oneshot::Sender<()>),
}

/// The request path's handle to the export task; cheap to clone.
#[derive(Clone, Debug)]
pub struct SpanQueue {
    tx: mpsc::Sender<Msg>,
    counters: ExportCounters,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Span(_) => "Span",
            Self::Flush(_) => "Flush",
        })
    }
}

impl SpanQueue {
    /// Spawns the export task on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn spawn(
        exporter: impl ExportSpans,
        config: ExportConfig,
        counters: ExportCounters,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        tokio::spawn(run(Arc::new(exporter), config, counters.clone(), rx));
        Self { tx, counters }
    }

    /// Queues a span without waiting; a full queue drops it (counted).
    pub fn submit(&self, span: SpanRecord) {
        if self.tx.try_send(Msg::Span(Box::new(span))).is_err() {
            self.counters.dropped.inc();
        }
    }

    /// Exports everything queued so far and waits for that export to finish (for
    /// shutdown and tests; the request path never calls this).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The counters.
    pub fn counters(&self) -> &ExportCounters {
        &self.counters
    }
}

async fn run(
    exporter: Arc<dyn ExportSpans>,
    config: ExportConfig,
    counters: ExportCounters,
    mut rx: mpsc::Receiver<Msg>,
) {
    let max = config.max_batch.max(1);
    let mut batch: Vec<SpanRecord> = Vec::with_capacity(max);
    let mut ticker = tokio::time::interval(config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let export = |batch: Vec<SpanRecord>| {
        let exporter = exporter.clone();
        let counters = counters.clone();
        async move {
            let n = batch.len() as u64;
            match tokio::time::timeout(config.export_timeout, exporter.export(batch)).await {
                Ok(Ok(())) => {
                    counters.exported.inc_by(n);
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, spans = n, "span export failed");
                    counters.dropped.inc_by(n);
                }
                Err(_) => {
                    tracing::debug!(spans = n, "span export timed out");
                    counters.dropped.inc_by(n);
                }
            }
        }
    };
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Span(span)) => {
                    batch.push(*span);
                    if batch.len() >= max {
                        export(std::mem::replace(&mut batch, Vec::with_capacity(max))).await;
                    }
                }
                Some(Msg::Flush(done)) => {
                    if !batch.is_empty() {
                        export(std::mem::take(&mut batch)).await;
                    }
                    let _ = done.send(());
                }
                None => {
                    if !batch.is_empty() {
                        export(std::mem::take(&mut batch)).await;
                    }
                    return;
                }
            },
            _ = ticker.tick() => {
                if !batch.is_empty() {
                    export(std::mem::replace(&mut batch, Vec::with_capacity(max))).await;
                }
            }
        }
    }
}

/// Error building an exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The collector address is not a valid URI.
    #[error("invalid collector address {0:?}")]
    Address(String),
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// OTLP/HTTP protobuf exporter (`opentelemetry-otlp` over hyper).
pub struct OtlpExporter {
    inner: opentelemetry_otlp::SpanExporter,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter").finish_non_exhaustive()
    }
}

impl OtlpExporter {
    /// An exporter posting to `endpoint` (the full URL, e.g.
    /// `http://otel-collector:4318/v1/traces`), naming the resource `service_name`.
    pub fn new(
        endpoint: &str,
        service_name: &str,
        timeout: Duration,
    ) -> Result<Self, ExporterError> {
        use opentelemetry_otlp::{Protocol, WithExportConfig};
        use opentelemetry_sdk::trace::SpanExporter as _;
        let endpoint = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}/v1/traces")
        };
        let mut inner = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()?;
        inner.set_resource(
            &opentelemetry_sdk::Resource::builder_empty()
                .with_service_name(service_name.to_owned())
                .build(),
        );
        Ok(Self { inner })
    }
}

/// Converts a span to the OpenTelemetry SDK's export form.
pub fn to_span_data(span: SpanRecord) -> opentelemetry_sdk::trace::SpanData {
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind as OtelKind, Status, TraceFlags, TraceId, TraceState,
    };
    let flags = TraceFlags::SAMPLED;
    let status = if span.error {
        Status::error("")
    } else {
        Status::Unset
    };
    opentelemetry_sdk::trace::SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.trace_id.to_be_bytes()),
            SpanId::from_bytes(span.span_id.to_be_bytes()),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: span
            .parent_span_id
            .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.to_be_bytes())),
        parent_span_is_remote: span.parent_span_id.is_some(),
        span_kind: match span.kind {
            SpanKind::Client => OtelKind::Client,
            SpanKind::Server => OtelKind::Server,
        },
        name: Cow::Owned(span.name),
        start_time: span.start,
        end_time: span.start + span.duration,
        attributes: span
            .attributes
            .into_iter()
            .map(|(k, v)| opentelemetry::KeyValue::new(k, v))
            .chain(
                span.custom_tags
                    .into_iter()
                    .map(|(k, v)| opentelemetry::KeyValue::new(k, v)),
            )
            .collect(),
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status,
        instrumentation_scope: opentelemetry::InstrumentationScope::builder("mesh-telemetry")
            .build(),
    }
}

impl ExportSpans for OtlpExporter {
    fn export(&self, batch: Vec<SpanRecord>) -> ExportFuture<'_> {
        use opentelemetry_sdk::trace::SpanExporter as _;
        let data: Vec<_> = batch.into_iter().map(to_span_data).collect();
        Box::pin(async move {
            self.inner
                .export(data)
                .await
                .map_err(|e| -> BoxError { Box::new(e) })
        })
    }
}

/// Zipkin JSON v2 exporter over hyper.
#[derive(Clone, Debug)]
pub struct ZipkinExporter {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
    service_name: Arc<str>,
}

/// A non-2xx answer from a collector.
#[derive(Debug, thiserror::Error)]
#[error("collector answered {0}")]
pub struct CollectorStatus(pub http::StatusCode);

impl ZipkinExporter {
    /// An exporter posting to `address` (`jaeger-collector:9411`, or a full URL), naming
    /// the local endpoint `service_name`.
    pub fn new(address: &str, service_name: &str) -> Result<Self, ExporterError> {
        let url = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}/api/v2/spans")
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|_| ExporterError::Address(url.clone()))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_nodelay(true);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            uri,
            service_name: Arc::from(service_name),
        })
    }

    /// The Zipkin v2 JSON of a batch.
    pub fn encode(&self, batch: &[SpanRecord]) -> Vec<u8> {
        let spans: Vec<serde_json::Value> = batch
            .iter()
            .map(|s| {
                let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                let ts = micros(s.start.duration_since(UNIX_EPOCH).unwrap_or_default());
                let trace_id = if s.trace_id_64 {
                    format!("{:016x}", s.trace_id as u64)
                } else {
                    format!("{:032x}", s.trace_id)
                };
                let mut tags = serde_json::Map::new();
                for (k, v) in &s.attributes {
                    tags.insert((*k).to_owned(), serde_json::Value::String(v.clone()));
                }
                for (k, v) in &s.custom_tags {
                    tags.insert(k.clone(), serde_json::Value::String(v.clone()));
                }
                if s.error {
                    tags.insert("error".into(), serde_json::Value::String("true".into()));
                }
                let mut span = serde_json::json!({
                    "traceId": trace_id,
                    "id": format!("{:016x}", s.span_id),
                    "kind": match s.kind { SpanKind::Client => "CLIENT", SpanKind::Server => "SERVER" },
                    "name": s.name.to_ascii_lowercase(),
                    "timestamp": ts,
                    "duration": micros(s.duration).max(1),
                    "localEndpoint": { "serviceName": &*self.service_name },
                    "tags": tags,
                });
                if let Some(p) = s.parent_span_id {
                    span["parentId"] = serde_json::Value::String(format!("{p:016x}"));
                }
                if s.debug {
                    span["debug"] = serde_json::Value::Bool(true);
                }
                span
            })
            .collect();
        serde_json::to_vec(&spans).unwrap_or_else(|_| b"[]".to_vec())
    }
}

impl ExportSpans for ZipkinExporter {
    fn export(&self, batch: Vec<SpanRecord>) -> ExportFuture<'_> {
        let body = self.encode(&batch);
        Box::pin(async move {
            let req = http::Request::post(self.uri.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))?;
            let res = self.client.request(req).await?;
            let status = res.status();
            // Drain the body so the connection can be reused.
            let _ = res.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(Box::new(CollectorStatus(status)) as BoxError)
            }
        })
    }
}
