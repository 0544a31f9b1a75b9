//! Istio configuration to the runtime policies of the layer crates.
//!
//! The layer crates take policies built in code; these functions read the same policies
//! out of a loaded [`MeshConfig`], with Istio's defaults for absent fields.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_core::config::{self, MeshConfig};
use mesh_resilience::{Backoff, LbPolicy, OutlierConfig, RetryOn, RetryPolicy};
use mesh_tls::{MtlsMode, PeerAuthentication, PeerAuthenticationPolicy};

/// The retry policy of a route: Istio's default when the route has no `retries`
/// block (VS-51), otherwise its fields with defaults for the absent ones.
///
/// A `retryOn` token that the retry layer does not know is an error.
pub fn retry_policy(retries: Option<&config::HttpRetry>) -> Result<RetryPolicy, String> {
    let Some(r) = retries else {
        return Ok(RetryPolicy::istio_default());
    };
    let mut policy = RetryPolicy::with_attempts(u32::try_from(r.attempts).unwrap_or(0))
        .per_try_timeout(r.per_try_timeout.map(Duration::from));
    if let Some(on) = r.retry_on.as_deref() {
        policy = policy.retry_on(RetryOn::parse(on).map_err(|e| e.to_string())?);
    }
    if let Some(ignore) = r.retry_ignore_previous_hosts {
        policy.retry_ignore_previous_hosts = ignore;
    }
    if let Some(base) = r.backoff {
        policy.backoff = Backoff::new(base.into());
    }
    Ok(policy)
}

/// Outlier detection settings of a DestinationRule block; Istio's defaults for absent
/// fields, `maxEjectionPercent: 0` read as Envoy's default of 10 (as Istio leaves it).
pub fn outlier_config(o: &config::OutlierDetection) -> OutlierConfig {
    let d = OutlierConfig::default();
    let pct =
        |v: Option<i32>, default: u32| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(default);
    OutlierConfig {
        consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(d.consecutive_5xx_errors),
        consecutive_gateway_errors: o
            .consecutive_gateway_errors
            .or_else(|| o.consecutive_errors.and_then(|v| u32::try_from(v).ok()))
            .unwrap_or(d.consecutive_gateway_errors),
        split_external_local_origin_errors: o
            .split_external_local_origin_errors
            .unwrap_or(d.split_external_local_origin_errors),
        consecutive_local_origin_failures: o
            .consecutive_local_origin_failures
            .unwrap_or(d.consecutive_local_origin_failures),
        interval: o.interval.map_or(d.interval, Duration::from),
        base_ejection_time: o
            .base_ejection_time
            .map_or(d.base_ejection_time, Duration::from),
        max_ejection_percent: match pct(o.max_ejection_percent, d.max_ejection_percent) {
            0 => d.max_ejection_percent,
            p => p,
        },
        min_health_percent: pct(o.min_health_percent, d.min_health_percent),
        always_eject_one_host: false,
    }
}

/// The load-balancing algorithm of a DestinationRule block (`LEAST_REQUEST` by default).
pub fn lb_policy(lb: Option<&config::LoadBalancerSettings>) -> LbPolicy {
    match lb.and_then(|lb| lb.simple.as_ref()) {
        Some(config::SimpleLb::RoundRobin) => LbPolicy::RoundRobin,
        Some(config::SimpleLb::Random) => LbPolicy::Random,
        _ => LbPolicy::LeastRequest,
    }
}

fn mtls_mode(mode: Option<&config::MtlsMode>) -> MtlsMode {
    match mode {
        Some(config::MtlsMode::Strict) => MtlsMode::Strict,
        Some(config::MtlsMode::Permissive) => MtlsMode::Permissive,
        Some(config::MtlsMode::Disable) => MtlsMode::Disable,
        Some(config::MtlsMode::Unset) | None => MtlsMode::Unset,
    }
}

/// Every PeerAuthentication of `config`, compiled (resolve one workload with
/// [`PeerAuthentication::for_workload`]).
pub fn peer_authentication(config: &MeshConfig) -> PeerAuthentication {
    let policies = config
        .peer_authentications()
        .iter()
        .enumerate()
        .map(|(i, pa)| {
            let spec = &pa.spec;
            let mut p = PeerAuthenticationPolicy::new(
                &pa.metadata.namespace,
                &pa.metadata.name,
                mtls_mode(spec.mtls.as_ref().and_then(|m| m.mode.as_ref())),
            )
            .with_sequence(i as u64);
            if let Some(sel) = &spec.selector {
                p = p.with_selector(sel.match_labels.clone());
            }
            for (port, m) in &spec.port_level_mtls {
                if let Ok(port) = u16::try_from(*port) {
                    p = p.with_port(port, mtls_mode(m.mode.as_ref()));
                }
            }
            p
        })
        .collect::<Vec<_>>();
    PeerAuthentication::compile(config.root_namespace(), policies)
}

/// Labels of a workload, `app` and `version` set.
pub fn labels(app: &str, version: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_owned(), app.to_owned()),
        ("version".to_owned(), version.to_owned()),
    ])
}
