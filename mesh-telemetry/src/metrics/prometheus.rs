//! Prometheus exposition and the proxy's own metrics.
//!
//! [`MetricsRegistry`] holds the Istio families ([`IstioMetrics`]) and [`ProxyMetrics`] and
//! renders them in the Prometheus text format 0.0.4 ([`MetricsRegistry::CONTENT_TYPE`]),
//! which `promtool check metrics` and Prometheus servers accept. Rendering happens at
//! scrape time; nothing is buffered between scrapes.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::istio::IstioMetrics;

/// The registry of every metric the crate exposes.
#[derive(Debug)]
pub struct MetricsRegistry {
    registry: Registry,
    istio: IstioMetrics,
    proxy: ProxyMetrics,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRegistry {
    /// `Content-Type` of [`MetricsRegistry::encode`]'s output.
    pub const CONTENT_TYPE: &'static str =
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

    /// A registry with the Istio and proxy families registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let istio = IstioMetrics::register(&mut registry);
        let proxy = ProxyMetrics::register(&mut registry);
        Self {
            registry,
            istio,
            proxy,
        }
    }

    /// Like [`MetricsRegistry::new`] with a bound on series per [`super::MetricsHandle`].
    pub fn with_series_limit(limit: usize) -> Self {
        let mut this = Self::new();
        this.istio = this.istio.with_series_limit(limit);
        this
    }

    /// The Istio families (to resolve handles).
    pub fn istio(&self) -> &IstioMetrics {
        &self.istio
    }

    /// The proxy's own families.
    pub fn proxy(&self) -> &ProxyMetrics {
        &self.proxy
    }

    /// Mutable access to register further metrics before serving.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Renders every metric in the Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DestinationLabel {
    destination: Arc<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

/// The proxy's own metrics, for the proxy and the other layer crates to update.
///
/// | metric | type | labels |
/// |---|---|---|
/// | `mesh_config_reloads_total` | counter | |
/// | `mesh_config_reload_failures_total` | counter | |
/// | `mesh_config_generation` | gauge | |
/// | `mesh_certificate_expiry_timestamp_seconds` | gauge | `identity` |
/// | `mesh_outlier_ejections_total` | counter | `destination` |
/// | `mesh_outlier_ejections_overflow_total` | counter | `destination` |
/// | `mesh_outlier_ejected_hosts` | gauge | `destination` |
/// | `mesh_pool_overflows_total` | counter | `destination` |
/// | `mesh_retries_total` | counter | `destination` |
/// | `mesh_active_connections` | gauge | `listener` |
/// | `mesh_downstream_cx_total` | counter | `listener` |
/// | `mesh_downstream_cx_overflow_total` | counter | `listener` |
/// | `mesh_trace_spans_exported_total` | counter | |
/// | `mesh_trace_spans_dropped_total` | counter | |
/// | `mesh_access_log_dropped_total` | counter | |
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    config_reloads: Counter,
    config_reload_failures: Counter,
    config_generation: Gauge,
    cert_expiry: Family<IdentityLabel, Gauge>,
    ejections: Family<DestinationLabel, Counter>,
    ejection_overflows: Family<DestinationLabel, Counter>,
    ejected: Family<DestinationLabel, Gauge>,
    pool_overflows: Family<DestinationLabel, Counter>,
    retries: Family<DestinationLabel, Counter>,
    active_connections: Family<ListenerLabel, Gauge>,
    downstream_cx: Family<ListenerLabel, Counter>,
    downstream_cx_overflow: Family<ListenerLabel, Counter>,
    /// Spans handed to an exporter that accepted them.
    pub spans_exported: Counter,
    /// Spans dropped: queue full, exporter failed or timed out.
    pub spans_dropped: Counter,
    /// Access-log entries dropped because the writer fell behind.
    pub access_log_dropped: Counter,
}

impl ProxyMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            config_reloads: Counter::default(),
            config_reload_failures: Counter::default(),
            config_generation: Gauge::default(),
            cert_expiry: Family::default(),
            ejections: Family::default(),
            ejection_overflows: Family::default(),
            ejected: Family::default(),
            pool_overflows: Family::default(),
            retries: Family::default(),
            active_connections: Family::default(),
            downstream_cx: Family::default(),
            downstream_cx_overflow: Family::default(),
            spans_exported: Counter::default(),
            spans_dropped: Counter::default(),
            access_log_dropped: Counter::default(),
        };
        registry.register(
            "mesh_config_reloads",
            "Configuration reloads applied",
            this.config_reloads.clone(),
        );
        registry.register(
            "mesh_config_reload_failures",
            "Configuration reloads rejected (validation failed, nothing changed)",
            this.config_reload_failures.clone(),
        );
        registry.register(
            "mesh_config_generation",
            "Generation of the configuration in force: 1 for the one loaded at start, one \
             more for each applied reload; a rejected reload leaves it unchanged",
            this.config_generation.clone(),
        );
        registry.register(
            "mesh_certificate_expiry_timestamp_seconds",
            "Expiry of the workload certificate, Unix seconds",
            this.cert_expiry.clone(),
        );
        registry.register(
            "mesh_outlier_ejections",
            "Endpoints ejected by outlier detection",
            this.ejections.clone(),
        );
        registry.register(
            "mesh_outlier_ejections_overflow",
            "Ejections skipped because maxEjectionPercent was reached",
            this.ejection_overflows.clone(),
        );
        registry.register(
            "mesh_outlier_ejected_hosts",
            "Endpoints currently ejected",
            this.ejected.clone(),
        );
        registry.register(
            "mesh_pool_overflows",
            "Requests refused by connection-pool limits (UO)",
            this.pool_overflows.clone(),
        );
        registry.register("mesh_retries", "Retry attempts sent", this.retries.clone());
        registry.register(
            "mesh_active_connections",
            "Open downstream connections",
            this.active_connections.clone(),
        );
        registry.register(
            "mesh_downstream_cx",
            "Downstream connections accepted and served, TLS or not (Envoy's downstream_cx_total)",
            this.downstream_cx.clone(),
        );
        registry.register(
            "mesh_downstream_cx_overflow",
            "Downstream connections closed at once because the listener's maxConnections were open (Envoy's downstream_cx_overflow)",
            this.downstream_cx_overflow.clone(),
        );
        registry.register(
            "mesh_trace_spans_exported",
            "Spans accepted by the trace collector",
            this.spans_exported.clone(),
        );
        registry.register(
            "mesh_trace_spans_dropped",
            "Spans dropped because the export queue was full or the collector failed",
            this.spans_dropped.clone(),
        );
        registry.register(
            "mesh_access_log_dropped",
            "Access-log entries dropped because the writer fell behind",
            this.access_log_dropped.clone(),
        );
        this
    }

    /// The configuration loaded at start is in force: `mesh_config_generation` becomes 1
    /// (it counts from there).
    pub fn config_loaded(&self) {
        if self.config_generation.get() == 0 {
            self.config_generation.set(1);
        }
    }

    /// A configuration reload was applied: `mesh_config_reloads_total` and
    /// `mesh_config_generation` move on.
    pub fn config_reloaded(&self) {
        self.config_reloads.inc();
        self.config_generation.inc();
    }

    /// A configuration reload was rejected.
    pub fn config_reload_failed(&self) {
        self.config_reload_failures.inc();
    }

    /// Sets the expiry (Unix seconds) of the certificate of `identity`.
    pub fn set_certificate_expiry(&self, identity: &str, unix_seconds: i64) {
        self.cert_expiry
            .get_or_create(&IdentityLabel {
                identity: identity.to_owned(),
            })
            .set(unix_seconds);
    }

    /// The pre-resolved counters of one destination (host and subset).
    pub fn destination(&self, destination: &str) -> DestinationMetrics {
        let l = DestinationLabel {
            destination: Arc::new(destination.to_owned()),
        };
        DestinationMetrics {
            ejections: self.ejections.get_or_create_owned(&l),
            ejection_overflows: self.ejection_overflows.get_or_create_owned(&l),
            ejected: self.ejected.get_or_create_owned(&l),
            pool_overflows: self.pool_overflows.get_or_create_owned(&l),
            retries: self.retries.get_or_create_owned(&l),
        }
    }

    /// The counter of connections a listener accepted and served (Envoy's
    /// `downstream_cx_total`). Between sidecars, the server's count is the number of
    /// connections, hence mTLS handshakes, its clients opened.
    pub fn downstream_cx(&self, listener: &str) -> Counter {
        self.downstream_cx.get_or_create_owned(&ListenerLabel {
            listener: listener.to_owned(),
        })
    }

    /// The counter of connections a listener closed at once for being over its
    /// connection limit.
    pub fn downstream_cx_overflow(&self, listener: &str) -> Counter {
        self.downstream_cx_overflow
            .get_or_create_owned(&ListenerLabel {
                listener: listener.to_owned(),
            })
    }

    /// The active-connection gauge of a listener (`inbound`, `outbound`, `gateway`, …).
    pub fn active_connections(&self, listener: &str) -> Gauge {
        self.active_connections.get_or_create_owned(&ListenerLabel {
            listener: listener.to_owned(),
        })
    }
}

/// Pre-resolved per-destination counters of [`ProxyMetrics`].
#[derive(Clone, Debug)]
pub struct DestinationMetrics {
    /// `mesh_outlier_ejections_total`.
    pub ejections: Counter,
    /// `mesh_outlier_ejections_overflow_total`.
    pub ejection_overflows: Counter,
    /// `mesh_outlier_ejected_hosts`.
    pub ejected: Gauge,
    /// `mesh_pool_overflows_total`.
    pub pool_overflows: Counter,
    /// `mesh_retries_total`.
    pub retries: Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_families_render_with_their_names() {
        let reg = MetricsRegistry::new();
        let p = reg.proxy();
        p.config_loaded();
        p.config_reloaded();
        p.config_reload_failed();
        p.set_certificate_expiry("spiffe://cluster.local/ns/a/sa/b", 1_900_000_000);
        let d = p.destination("reviews|v1");
        d.ejections.inc();
        d.ejection_overflows.inc();
        d.ejected.set(1);
        d.pool_overflows.inc_by(2);
        d.retries.inc_by(3);
        p.active_connections("inbound").set(5);
        let text = reg.encode();
        for line in [
            "mesh_config_reloads_total 1",
            "mesh_config_reload_failures_total 1",
            "mesh_config_generation 2",
            "mesh_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/a/sa/b\"} 1900000000",
            "mesh_outlier_ejections_total{destination=\"reviews|v1\"} 1",
            "mesh_outlier_ejections_overflow_total{destination=\"reviews|v1\"} 1",
            "mesh_outlier_ejected_hosts{destination=\"reviews|v1\"} 1",
            "mesh_pool_overflows_total{destination=\"reviews|v1\"} 2",
            "mesh_retries_total{destination=\"reviews|v1\"} 3",
            "mesh_active_connections{listener=\"inbound\"} 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
