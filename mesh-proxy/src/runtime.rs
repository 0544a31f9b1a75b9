//! What the sidecar and the gateway share: telemetry, the certificate store and its
//! source (directory watch or built-in issuer), and start-up errors.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use mesh_telemetry::access_log::{AccessLog, Format};
use mesh_telemetry::trace::export::{ExportConfig, OtlpExporter, SpanQueue, ZipkinExporter};
use mesh_telemetry::{MetricsRegistry, Telemetry, Workload};
use mesh_tls::{BuiltInIssuer, CertStore, CertificateAuthority};

use crate::settings::Settings;

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration directory did not load; every problem, located.
    #[error("configuration rejected:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    /// The certificate could not be loaded or issued.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else (tracing exporter, watcher).
    #[error("{0}")]
    Other(String),
}

/// Telemetry, certificates and the things that must live as long as the proxy.
pub struct Common {
    /// The settings.
    pub settings: Arc<Settings>,
    /// Metrics, latency, traces, access log.
    pub telemetry: Telemetry,
    /// The workload certificate.
    pub store: Arc<CertStore>,
    /// Flushes to run at shutdown (spans, access log).
    pub flush: Vec<BoxFuture<'static, ()>>,
    /// Values kept alive (watchers, issuer tasks).
    pub keep: Vec<Box<dyn Any + Send>>,
}

/// Builds telemetry and the certificate store from `settings` (needs a tokio runtime).
pub async fn common(settings: Arc<Settings>) -> Result<Common, StartError> {
    let identity = settings
        .identity()
        .map_err(|e| StartError::Certificate(e.to_string()))?;
    let labels = &settings.workload.labels;
    let mut workload = Workload::new(settings.workload_name(), &settings.workload.namespace)
        .with_principal(identity.clone());
    if let Some(app) = labels.get("app") {
        workload = workload.with_app(app);
    }
    if let Some(v) = labels.get("version") {
        workload = workload.with_version(v);
    }
    let metrics = MetricsRegistry::new();
    let counters = Telemetry::export_counters(&metrics);
    let dropped = metrics.proxy().access_log_dropped.clone();
    let mut builder = Telemetry::builder(workload)
        .metrics(metrics)
        .sampling(settings.tracing.sampling);
    let mut flush: Vec<BoxFuture<'static, ()>> = Vec::new();
    let service_name = format!(
        "{}.{}",
        settings.workload_name(),
        settings.workload.namespace
    );
    let queue = if let Some(url) = &settings.tracing.otlp {
        let exporter = OtlpExporter::new(url, &service_name, Duration::from_secs(10))
            .map_err(|e| StartError::Other(format!("tracing.otlp: {e}")))?;
        Some(SpanQueue::spawn(
            exporter,
            ExportConfig::default(),
            counters,
        ))
    } else if let Some(url) = &settings.tracing.zipkin {
        let exporter = ZipkinExporter::new(url, &service_name)
            .map_err(|e| StartError::Other(format!("tracing.zipkin: {e}")))?;
        Some(SpanQueue::spawn(
            exporter,
            ExportConfig::default(),
            counters,
        ))
    } else {
        None
    };
    if let Some(q) = queue {
        builder = builder.spans(q.clone());
        flush.push(Box::pin(async move { q.flush().await }));
    }
    if let Some(path) = &settings.access_log.path {
        let format = match settings.access_log.format.as_deref() {
            Some("JSON") => Format::Json,
            _ => Format::Text,
        };
        let log = if path == "-" {
            AccessLog::stdout(format, dropped)
        } else {
            AccessLog::file(
                settings.resolve(std::path::Path::new(path)),
                format,
                dropped,
            )
            .await
            .map_err(|e| StartError::Other(format!("accessLog.path {path}: {e}")))?
        };
        builder = builder.access_log(log.clone());
        flush.push(Box::pin(async move { log.flush().await }));
    }
    let telemetry = builder.build();

    let mut keep: Vec<Box<dyn Any + Send>> = Vec::new();
    let store = if let Some(dir) = &settings.svid.ca_dir {
        let ca = CertificateAuthority::load_dir(&settings.resolve(dir))
            .map_err(|e| StartError::Certificate(format!("svid.caDir: {e}")))?;
        if ca.trust_domain() != settings.trust_domain {
            return Err(StartError::Certificate(format!(
                "svid.caDir: the CA is for trust domain {}, the settings say {}",
                ca.trust_domain(),
                settings.trust_domain
            )));
        }
        let mut issuer = BuiltInIssuer::new(
            Arc::new(ca),
            &settings.workload.namespace,
            &settings.workload.service_account,
        );
        if let Some(l) = settings.svid.lifetime {
            issuer = issuer.with_ttl(l.as_std());
        }
        let store =
            CertStore::from_issuer(&issuer).map_err(|e| StartError::Certificate(e.to_string()))?;
        keep.push(Box::new(store.spawn_issuer(issuer)));
        store
    } else if let Some(dir) = &settings.svid.cert_dir {
        let dir = settings.resolve(dir);
        let store =
            CertStore::load_dir(&dir).map_err(|e| StartError::Certificate(e.to_string()))?;
        keep.push(Box::new(
            store
                .watch_dir(&dir)
                .map_err(|e| StartError::Certificate(e.to_string()))?,
        ));
        store
    } else {
        return Err(StartError::Certificate(
            "svid: set certDir or caDir".to_owned(),
        ));
    };
    if store.identity() != identity {
        tracing::warn!(
            certificate = %store.identity(),
            settings = %identity,
            "the certificate's identity differs from the settings' workload"
        );
    }
    Ok(Common {
        settings,
        telemetry,
        store,
        flush,
        keep,
    })
}

/// Binds a TCP listener.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}
