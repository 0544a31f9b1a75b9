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

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::LoadOptions;
    use mesh_tls::PeerAuthMode;

    fn config(yaml: &str) -> MeshConfig {
        MeshConfig::from_yaml_str("t.yaml", yaml, &LoadOptions::default())
            .unwrap()
            .0
    }

    #[test]
    fn route_without_retries_gets_istio_default_policy() {
        assert_eq!(retry_policy(None).unwrap(), RetryPolicy::istio_default());
    }

    #[test]
    fn route_retries_map_field_for_field() {
        let c = config(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: p}\nspec:\n  hosts: [p]\n  http:\n  - retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"gateway-error,503\", backoff: 50ms, retryIgnorePreviousHosts: false}\n    route: [{destination: {host: p}}]\n",
        );
        let r = c.virtual_services()[0].spec.http[0].retries.as_ref();
        let p = retry_policy(r).unwrap();
        assert_eq!(p.attempts, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(p.retry_on, RetryOn::parse("gateway-error,503").unwrap());
        assert_eq!(p.backoff, Backoff::new(Duration::from_millis(50)));
        assert!(!p.retry_ignore_previous_hosts);
    }

    #[test]
    fn zero_max_ejection_percent_keeps_envoys_default() {
        let o = config::OutlierDetection {
            max_ejection_percent: Some(0),
            consecutive_5xx_errors: Some(7),
            ..Default::default()
        };
        let c = outlier_config(&o);
        assert_eq!(c.max_ejection_percent, 10);
        assert_eq!(c.consecutive_5xx_errors, 7);
        assert_eq!(c.interval, OutlierConfig::default().interval);
    }

    #[test]
    fn deprecated_consecutive_errors_counts_gateway_errors() {
        let o = config::OutlierDetection {
            consecutive_errors: Some(4),
            ..Default::default()
        };
        assert_eq!(outlier_config(&o).consecutive_gateway_errors, 4);
    }

    #[test]
    fn load_balancer_defaults_to_least_request() {
        assert_eq!(lb_policy(None), LbPolicy::LeastRequest);
        let rr = config::LoadBalancerSettings {
            simple: Some(config::SimpleLb::RoundRobin),
            ..Default::default()
        };
        assert_eq!(lb_policy(Some(&rr)), LbPolicy::RoundRobin);
    }

    #[test]
    fn workload_peer_authentication_overrides_namespace_strict() {
        let c = config(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: prod}\nspec: {mtls: {mode: STRICT}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: legacy, namespace: prod}\nspec:\n  selector: {matchLabels: {app: legacy}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {9090: {mode: DISABLE}}\n",
        );
        let pa = peer_authentication(&c);
        assert_eq!(
            pa.for_workload("prod", &labels("orders", "v1")).mode(8080),
            PeerAuthMode::Strict
        );
        let legacy = pa.for_workload("prod", &labels("legacy", "v1"));
        assert_eq!(legacy.mode(8080), PeerAuthMode::Permissive);
        assert_eq!(legacy.mode(9090), PeerAuthMode::Disable);
        assert_eq!(
            pa.for_workload("other", &labels("x", "v1")).mode(8080),
            PeerAuthMode::Permissive
        );
    }
}
