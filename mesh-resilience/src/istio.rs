//! Conversions from Istio's configuration types ([`mesh_core::config`]) into this crate's
//! policies: [`RetryPolicy`] from `HTTPRetry` and the route timeout, [`OutlierConfig`]
//! from `outlierDetection`, [`PoolLimits`] from `connectionPool` and [`LbPolicy`] from
//! `loadBalancer`.
//!
//! # Behaviour
//!
//! - Retries (VS-50..VS-58): `attempts <= 0` disables retries; `retryOn` is parsed with
//!   Istio's rules (numeric codes become retriable status codes); absent `retryOn` is the
//!   default condition set; `perTryTimeout` of zero, or at least the route timeout, is
//!   ignored; `backoff` sets the base interval. A route without `retries` gets
//!   [`RetryPolicy::istio_default`].
//! - Outlier detection: unset integers keep Istio's defaults; `maxEjectionPercent: 0` is
//!   Envoy's 10 (Istio leaves the default in place); the deprecated `consecutiveErrors`
//!   counts gateway errors, as Istio translates it, when `consecutiveGatewayErrors` is
//!   absent.
//! - Pool limits (DR-20): zero or negative integers mean "not set".
//! - Load balancing (DR-10..DR-12): `LEAST_CONN` and `UNSPECIFIED` are `LEAST_REQUEST`;
//!   `PASSTHROUGH` is not supported and falls back to `LEAST_REQUEST` with an error the
//!   caller may report. `consistentHash` becomes [`LbPolicy::ConsistentHash`]: `maglev`
//!   if set, else `ringHash`, else a ring of the deprecated `minimumRingSize` (0 or
//!   absent: 1024), as Istio chooses; a ring above 8M entries or a Maglev table size
//!   that is not a prime up to 5000011 is an error (Envoy rejects the cluster).
//!   [`LbConfig`] adds slow start: `warmup` (`minimumPercent` default 10, `aggression`
//!   default 1.0), else the deprecated `warmupDurationSecs` with those defaults, only for
//!   `ROUND_ROBIN` and `LEAST_REQUEST` (Istio sets no slow start for the others).
//!   It also carries `localityLbSetting` ([`LocalityLb`]; absent: Istio's mesh default,
//!   enabled with no rules); the proxy adds where it runs ([`Origin`]).
//!
//! # Errors
//!
//! An unknown `retryOn` token is a [`RetryOnError`]; an unsupported load-balancer setting
//! is an [`UnsupportedLb`].
//!
//! # Example
//!
//! ```
//! use mesh_core::config::HttpRetry;
//! use mesh_resilience::RetryPolicy;
//!
//! let retry = HttpRetry { attempts: 3, retry_on: Some("5xx,503".into()), ..HttpRetry::default() };
//! let policy = RetryPolicy::try_from(&retry).unwrap();
//! assert_eq!(policy.attempts, 3);
//! assert_eq!(policy.retry_on.status_codes(), &[503]);
//! ```

use std::time::Duration;

use mesh_core::config::{
    ConnectionPoolSettings, ConsistentHashLb, HttpRetry, LoadBalancerSettings, OutlierDetection,
    SimpleLb,
};

use crate::balance::{
    ConsistentHash, Distribute, Failover, HashAlgorithm, HashCookie, HashKey, LbConfig, LbPolicy,
    LocalityLb, Origin, SlowStart,
};
use crate::limit::PoolLimits;
use crate::outlier::OutlierConfig;
use crate::retry::{Backoff, RetryOn, RetryOnError, RetryPolicy};

/// A `loadBalancer` setting this crate does not implement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("loadBalancer {0} is not supported; LEAST_REQUEST is used instead")]
pub struct UnsupportedLb(pub &'static str);

impl TryFrom<&HttpRetry> for RetryPolicy {
    type Error = RetryOnError;

    /// The route's `retries` without a route timeout (see [`RetryPolicy::from_route`]).
    fn try_from(retry: &HttpRetry) -> Result<Self, Self::Error> {
        RetryPolicy::from_route(Some(retry), None)
    }
}

impl RetryPolicy {
    /// The retry policy of a route with `retries` (`None`: Istio's default, VS-51) and
    /// route `timeout` (`None` or zero: none), applying VS-50..VS-58.
    pub fn from_route(
        retries: Option<&HttpRetry>,
        timeout: Option<Duration>,
    ) -> Result<Self, RetryOnError> {
        let Some(retry) = retries else {
            return Ok(RetryPolicy::istio_default());
        };
        if retry.attempts <= 0 {
            return Ok(RetryPolicy::disabled());
        }
        let attempts = u32::try_from(retry.attempts).unwrap_or(0);
        let mut policy = RetryPolicy::with_attempts(attempts);
        if let Some(on) = retry.retry_on.as_deref() {
            policy.retry_on = RetryOn::parse(on)?;
        }
        let per_try = retry.per_try_timeout.map(|d| d.as_std());
        let route = timeout.filter(|t| !t.is_zero());
        policy = policy.per_try_timeout(per_try);
        policy.per_try_timeout = policy.effective_per_try_timeout(route);
        if let Some(base) = retry.backoff.map(|d| d.as_std()).filter(|d| !d.is_zero()) {
            policy.backoff = Backoff::new(base);
        }
        if let Some(ignore) = retry.retry_ignore_previous_hosts {
            policy.retry_ignore_previous_hosts = ignore;
        }
        Ok(policy)
    }
}

fn positive_u32(v: Option<i32>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0)
}

impl From<&OutlierDetection> for OutlierConfig {
    fn from(od: &OutlierDetection) -> Self {
        let mut c = OutlierConfig::default();
        if let Some(n) = od.consecutive_5xx_errors {
            c.consecutive_5xx_errors = n;
        }
        match (od.consecutive_gateway_errors, od.consecutive_errors) {
            (Some(n), _) => c.consecutive_gateway_errors = n,
            (None, Some(n)) => {
                // Istio maps the deprecated field to gateway errors and, unless the
                // 5xx field is set, disables the 5xx counter.
                c.consecutive_gateway_errors = u32::try_from(n).unwrap_or(0);
                if od.consecutive_5xx_errors.is_none() {
                    c.consecutive_5xx_errors = 0;
                }
            }
            (None, None) => {}
        }
        if let Some(split) = od.split_external_local_origin_errors {
            c.split_external_local_origin_errors = split;
        }
        if let Some(n) = od.consecutive_local_origin_failures {
            c.consecutive_local_origin_failures = n;
        }
        if let Some(d) = od.interval.map(|d| d.as_std()).filter(|d| !d.is_zero()) {
            c.interval = d;
        }
        if let Some(d) = od
            .base_ejection_time
            .map(|d| d.as_std())
            .filter(|d| !d.is_zero())
        {
            c.base_ejection_time = d;
        }
        if let Some(p) = positive_u32(od.max_ejection_percent) {
            c.max_ejection_percent = p.min(100);
        }
        if let Some(p) = positive_u32(od.min_health_percent) {
            c.min_health_percent = p.min(100);
        }
        c
    }
}

impl From<&ConnectionPoolSettings> for PoolLimits {
    fn from(cp: &ConnectionPoolSettings) -> Self {
        let mut l = PoolLimits::default();
        if let Some(tcp) = &cp.tcp {
            if let Some(n) = positive_u32(tcp.max_connections) {
                l.max_connections = n;
            }
            if let Some(d) = tcp
                .idle_timeout
                .map(|d| d.as_std())
                .filter(|d| !d.is_zero())
            {
                l.idle_timeout = d;
            }
        }
        if let Some(http) = &cp.http {
            if let Some(n) = positive_u32(http.http1_max_pending_requests) {
                l.http1_max_pending_requests = n;
            }
            if let Some(n) = positive_u32(http.http2_max_requests) {
                l.http2_max_requests = n;
            }
            if let Some(n) = positive_u32(http.max_requests_per_connection) {
                l.max_requests_per_connection = n;
            }
            if let Some(n) = positive_u32(http.max_retries) {
                l.max_retries = n;
            }
            if let Some(d) = http
                .idle_timeout
                .map(|d| d.as_std())
                .filter(|d| !d.is_zero())
            {
                l.idle_timeout = d;
            }
        }
        l
    }
}

impl TryFrom<&LoadBalancerSettings> for LbPolicy {
    type Error = UnsupportedLb;

    fn try_from(lb: &LoadBalancerSettings) -> Result<Self, Self::Error> {
        if let Some(ch) = &lb.consistent_hash {
            return ConsistentHash::try_from(ch).map(LbPolicy::ConsistentHash);
        }
        match lb.simple {
            None | Some(SimpleLb::Unspecified | SimpleLb::LeastConn | SimpleLb::LeastRequest) => {
                Ok(LbPolicy::LeastRequest)
            }
            Some(SimpleLb::RoundRobin) => Ok(LbPolicy::RoundRobin),
            Some(SimpleLb::Random) => Ok(LbPolicy::Random),
            Some(SimpleLb::Passthrough) => Err(UnsupportedLb("PASSTHROUGH")),
        }
    }
}

impl TryFrom<&ConsistentHashLb> for ConsistentHash {
    type Error = UnsupportedLb;

    /// Validation guarantees exactly one key; the first set one is taken regardless.
    fn try_from(ch: &ConsistentHashLb) -> Result<Self, Self::Error> {
        let key = if let Some(name) = &ch.http_header_name {
            HashKey::Header(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                UnsupportedLb("consistentHash.httpHeaderName that is not a header name")
            })?)
        } else if let Some(c) = &ch.http_cookie {
            HashKey::Cookie(HashCookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: c.ttl.map(|d| d.as_std()),
                attributes: c
                    .attributes
                    .iter()
                    .map(|a| (a.name.clone(), a.value.clone().unwrap_or_default()))
                    .collect(),
            })
        } else if ch.use_source_ip == Some(true) {
            HashKey::SourceIp
        } else if let Some(name) = &ch.http_query_parameter_name {
            HashKey::QueryParameter(name.clone())
        } else {
            return Err(UnsupportedLb("consistentHash without a key"));
        };
        let algorithm = if let Some(m) = &ch.maglev {
            HashAlgorithm::maglev(m.table_size.unwrap_or(0)).map_err(|_| {
                UnsupportedLb("consistentHash.maglev.tableSize that is not a prime up to 5000011")
            })?
        } else {
            let size = match &ch.ring_hash {
                Some(r) => r.minimum_ring_size,
                None => ch.minimum_ring_size,
            };
            HashAlgorithm::ring_hash(size.unwrap_or(0))
                .map_err(|_| UnsupportedLb("consistentHash ring larger than 8388608 entries"))?
        };
        Ok(ConsistentHash { key, algorithm })
    }
}

impl TryFrom<&LoadBalancerSettings> for LbConfig {
    type Error = UnsupportedLb;

    fn try_from(lb: &LoadBalancerSettings) -> Result<Self, Self::Error> {
        let policy = LbPolicy::try_from(lb)?;
        let slow_start = match policy {
            LbPolicy::LeastRequest | LbPolicy::RoundRobin => slow_start(lb),
            _ => None,
        };
        let locality = lb
            .locality_lb_setting
            .as_ref()
            .map(LocalityLb::from)
            .unwrap_or_default();
        Ok(LbConfig {
            policy,
            slow_start,
            locality,
            origin: Origin::default(),
        })
    }
}

/// `localityLbSetting`; an unset `enabled` is Istio's mesh default (on).
impl From<&mesh_core::config::LocalityLbSetting> for LocalityLb {
    fn from(s: &mesh_core::config::LocalityLbSetting) -> Self {
        LocalityLb {
            enabled: s.enabled.unwrap_or(true),
            distribute: s
                .distribute
                .iter()
                .map(|d| Distribute {
                    from: d.from.clone(),
                    to: d.to.clone(),
                })
                .collect(),
            failover: s
                .failover
                .iter()
                .map(|f| Failover {
                    from: f.from.clone(),
                    to: f.to.clone(),
                })
                .collect(),
            failover_priority: s.failover_priority.clone(),
        }
    }
}

/// `warmup`, else the deprecated `warmupDurationSecs` (Istio's precedence).
fn slow_start(lb: &LoadBalancerSettings) -> Option<SlowStart> {
    let slow = match (&lb.warmup, lb.warmup_duration_secs) {
        (Some(w), _) => {
            let mut s = SlowStart::new(w.duration?.as_std());
            if let Some(m) = w.minimum_percent {
                s.minimum_percent = m;
            }
            if let Some(a) = w.aggression {
                s.aggression = a;
            }
            s
        }
        (None, Some(d)) => SlowStart::new(d.as_std()),
        (None, None) => return None,
    };
    slow.is_enabled().then_some(slow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::config::{
        CookieAttribute, HttpCookie, HttpSettings, Maglev, RingHash, TcpSettings,
        WarmupConfiguration,
    };

    fn d(ms: u64) -> Option<mesh_core::config::Duration> {
        Some(Duration::from_millis(ms).into())
    }

    #[test]
    fn route_without_retries_gets_istio_default() {
        let p = RetryPolicy::from_route(None, None).unwrap();
        assert_eq!(p, RetryPolicy::istio_default());
    }

    #[test]
    fn zero_or_negative_attempts_disable_retries() {
        for attempts in [0, -1] {
            let r = HttpRetry {
                attempts,
                ..HttpRetry::default()
            };
            assert!(!RetryPolicy::try_from(&r).unwrap().is_enabled());
        }
    }

    #[test]
    fn numeric_retry_on_tokens_become_status_codes() {
        let r = HttpRetry {
            attempts: 3,
            retry_on: Some("503, reset".into()),
            ..HttpRetry::default()
        };
        let p = RetryPolicy::try_from(&r).unwrap();
        assert_eq!(p.attempts, 3);
        assert_eq!(p.retry_on.status_codes(), &[503]);
        assert!(p.retry_on.contains(RetryOn::RESET));
    }

    #[test]
    fn unknown_retry_on_token_is_an_error() {
        let r = HttpRetry {
            attempts: 1,
            retry_on: Some("sometimes".into()),
            ..HttpRetry::default()
        };
        assert_eq!(
            RetryPolicy::try_from(&r),
            Err(RetryOnError("sometimes".into()))
        );
    }

    #[test]
    fn per_try_timeout_at_least_route_timeout_is_ignored() {
        let r = HttpRetry {
            attempts: 2,
            per_try_timeout: d(2000),
            ..HttpRetry::default()
        };
        let p = RetryPolicy::from_route(Some(&r), Some(Duration::from_secs(2))).unwrap();
        assert_eq!(p.per_try_timeout, None);
        let p = RetryPolicy::from_route(Some(&r), Some(Duration::from_secs(3))).unwrap();
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
        let p = RetryPolicy::from_route(Some(&r), Some(Duration::ZERO)).unwrap();
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn backoff_and_previous_hosts_are_taken_over() {
        let r = HttpRetry {
            attempts: 2,
            backoff: d(100),
            retry_ignore_previous_hosts: Some(false),
            ..HttpRetry::default()
        };
        let p = RetryPolicy::try_from(&r).unwrap();
        assert_eq!(p.backoff, Backoff::new(Duration::from_millis(100)));
        assert!(!p.retry_ignore_previous_hosts);
    }

    #[test]
    fn outlier_local_origin_split_reaches_the_detector() {
        let c = OutlierConfig::from(&OutlierDetection::default());
        assert!(!c.split_external_local_origin_errors);
        assert_eq!(c.consecutive_local_origin_failures, 5);
        let od = OutlierDetection {
            split_external_local_origin_errors: Some(true),
            consecutive_local_origin_failures: Some(2),
            ..OutlierDetection::default()
        };
        let c = OutlierConfig::from(&od);
        assert!(c.split_external_local_origin_errors);
        assert_eq!(c.consecutive_local_origin_failures, 2);
    }

    #[test]
    fn outlier_zero_max_ejection_percent_keeps_envoy_default() {
        let od = OutlierDetection {
            max_ejection_percent: Some(0),
            ..OutlierDetection::default()
        };
        assert_eq!(OutlierConfig::from(&od).max_ejection_percent, 10);
        let od = OutlierDetection {
            consecutive_5xx_errors: Some(1),
            interval: d(1000),
            base_ejection_time: d(30_000),
            max_ejection_percent: Some(50),
            ..OutlierDetection::default()
        };
        let c = OutlierConfig::from(&od);
        assert_eq!(c.consecutive_5xx_errors, 1);
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.max_ejection_percent, 50);
        assert_eq!(c.max_ejected(4), 2);
    }

    #[test]
    fn deprecated_consecutive_errors_counts_gateway_errors() {
        let od = OutlierDetection {
            consecutive_errors: Some(3),
            ..OutlierDetection::default()
        };
        let c = OutlierConfig::from(&od);
        assert_eq!(c.consecutive_gateway_errors, 3);
        assert_eq!(c.consecutive_5xx_errors, 0);
    }

    #[test]
    fn pool_zero_values_mean_unset() {
        let cp = ConnectionPoolSettings {
            tcp: Some(TcpSettings {
                max_connections: Some(0),
                ..TcpSettings::default()
            }),
            http: Some(HttpSettings {
                http1_max_pending_requests: Some(1),
                max_retries: Some(0),
                ..HttpSettings::default()
            }),
        };
        let l = PoolLimits::from(&cp);
        assert_eq!(l.max_connections, PoolLimits::default().max_connections);
        assert_eq!(l.http1_max_pending_requests, 1);
        assert_eq!(l.max_retries, PoolLimits::default().max_retries);
    }

    #[test]
    fn lb_names_map_to_policies() {
        let lb = |simple| LoadBalancerSettings {
            simple: Some(simple),
            ..LoadBalancerSettings::default()
        };
        assert_eq!(
            LbPolicy::try_from(&lb(SimpleLb::RoundRobin)),
            Ok(LbPolicy::RoundRobin)
        );
        assert_eq!(
            LbPolicy::try_from(&lb(SimpleLb::LeastConn)),
            Ok(LbPolicy::LeastRequest)
        );
        assert_eq!(
            LbPolicy::try_from(&lb(SimpleLb::Random)),
            Ok(LbPolicy::Random)
        );
        assert!(LbPolicy::try_from(&lb(SimpleLb::Passthrough)).is_err());
        let hash = LoadBalancerSettings {
            consistent_hash: Some(ConsistentHashLb::default()),
            ..LoadBalancerSettings::default()
        };
        assert!(LbPolicy::try_from(&hash).is_err());
    }

    fn hashed(ch: ConsistentHashLb) -> Result<ConsistentHash, UnsupportedLb> {
        let lb = LoadBalancerSettings {
            consistent_hash: Some(ch),
            ..LoadBalancerSettings::default()
        };
        match LbPolicy::try_from(&lb)? {
            LbPolicy::ConsistentHash(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn consistent_hash_keys_map_to_hash_keys() {
        let header = hashed(ConsistentHashLb {
            http_header_name: Some("X-User".into()),
            ..ConsistentHashLb::default()
        })
        .unwrap();
        assert_eq!(
            header.key,
            HashKey::Header(http::HeaderName::from_static("x-user"))
        );
        assert_eq!(header.algorithm, HashAlgorithm::default());
        let cookie = hashed(ConsistentHashLb {
            http_cookie: Some(HttpCookie {
                name: "session".into(),
                path: Some("/".into()),
                ttl: d(3_600_000),
                attributes: vec![
                    CookieAttribute {
                        name: "Secure".into(),
                        value: None,
                    },
                    CookieAttribute {
                        name: "SameSite".into(),
                        value: Some("Strict".into()),
                    },
                ],
            }),
            ..ConsistentHashLb::default()
        })
        .unwrap();
        assert_eq!(
            cookie.key,
            HashKey::Cookie(HashCookie {
                name: "session".into(),
                path: Some("/".into()),
                ttl: Some(Duration::from_secs(3600)),
                attributes: vec![
                    ("Secure".into(), String::new()),
                    ("SameSite".into(), "Strict".into())
                ],
            })
        );
        let ip = hashed(ConsistentHashLb {
            use_source_ip: Some(true),
            ..ConsistentHashLb::default()
        });
        assert_eq!(ip.unwrap().key, HashKey::SourceIp);
        let query = hashed(ConsistentHashLb {
            http_query_parameter_name: Some("user".into()),
            ..ConsistentHashLb::default()
        });
        assert_eq!(query.unwrap().key, HashKey::QueryParameter("user".into()));
        assert!(
            hashed(ConsistentHashLb {
                http_header_name: Some("bad header".into()),
                ..ConsistentHashLb::default()
            })
            .is_err()
        );
    }

    #[test]
    fn consistent_hash_tables_follow_istio_precedence_and_envoy_limits() {
        let key = || ConsistentHashLb {
            use_source_ip: Some(true),
            ..ConsistentHashLb::default()
        };
        let maglev = hashed(ConsistentHashLb {
            maglev: Some(Maglev { table_size: None }),
            minimum_ring_size: Some(4096),
            ..key()
        });
        assert_eq!(
            maglev.unwrap().algorithm,
            HashAlgorithm::maglev(65_537).unwrap()
        );
        let ring = hashed(ConsistentHashLb {
            ring_hash: Some(RingHash {
                minimum_ring_size: Some(2048),
            }),
            minimum_ring_size: Some(4096),
            ..key()
        });
        assert_eq!(ring.unwrap().algorithm.size(), 2048);
        let deprecated = hashed(ConsistentHashLb {
            minimum_ring_size: Some(4096),
            ..key()
        });
        assert_eq!(deprecated.unwrap().algorithm.size(), 4096);
        let zero = hashed(ConsistentHashLb {
            minimum_ring_size: Some(0),
            ..key()
        });
        assert_eq!(zero.unwrap().algorithm.size(), 1024);
        for bad in [
            ConsistentHashLb {
                maglev: Some(Maglev {
                    table_size: Some(65_536),
                }),
                ..key()
            },
            ConsistentHashLb {
                minimum_ring_size: Some(HashAlgorithm::MAX_RING_SIZE + 1),
                ..key()
            },
        ] {
            assert!(hashed(bad).is_err());
        }
    }

    #[test]
    fn warmup_wins_over_the_deprecated_window_and_applies_to_rr_and_lr_only() {
        let warmup = |simple, secs: Option<u64>, warmup: Option<WarmupConfiguration>| {
            LbConfig::try_from(&LoadBalancerSettings {
                simple,
                warmup_duration_secs: secs.map(|s| Duration::from_secs(s).into()),
                warmup,
                ..LoadBalancerSettings::default()
            })
            .unwrap()
        };
        let explicit = WarmupConfiguration {
            duration: d(60_000),
            minimum_percent: Some(30.0),
            aggression: Some(2.0),
        };
        let c = warmup(Some(SimpleLb::RoundRobin), Some(10), Some(explicit.clone()));
        assert_eq!(
            c.slow_start,
            Some(SlowStart {
                window: Duration::from_secs(60),
                minimum_percent: 30.0,
                aggression: 2.0,
            })
        );
        let c = warmup(None, Some(10), None);
        assert_eq!(c.policy, LbPolicy::LeastRequest);
        assert_eq!(c.slow_start, Some(SlowStart::new(Duration::from_secs(10))));
        let defaults = WarmupConfiguration {
            duration: d(5_000),
            ..WarmupConfiguration::default()
        };
        let c = warmup(Some(SimpleLb::LeastConn), None, Some(defaults));
        assert_eq!(c.slow_start, Some(SlowStart::new(Duration::from_secs(5))));
        assert_eq!(
            warmup(Some(SimpleLb::Random), Some(10), None).slow_start,
            None
        );
        assert_eq!(
            warmup(Some(SimpleLb::RoundRobin), Some(0), None).slow_start,
            None
        );
        assert_eq!(
            warmup(Some(SimpleLb::RoundRobin), None, None).slow_start,
            None
        );
        let hash = LbConfig::try_from(&LoadBalancerSettings {
            consistent_hash: Some(ConsistentHashLb {
                use_source_ip: Some(true),
                ..ConsistentHashLb::default()
            }),
            warmup_duration_secs: Some(Duration::from_secs(10).into()),
            ..LoadBalancerSettings::default()
        })
        .unwrap();
        assert_eq!(hash.slow_start, None);
    }
}
