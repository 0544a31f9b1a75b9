//! Small helpers for describing workloads.
//!
//! The conversions from Istio configuration to the layers' policies live next to those
//! policies: `RetryPolicy::from_route`, `OutlierConfig::from`, `LbPolicy::try_from`
//! (mesh-resilience), `PeerAuthentication::from_config` and `PolicySet::from_config`
//! (mesh-tls), `Routing::compile` (mesh-routing).

use std::collections::BTreeMap;

/// Labels of a workload, `app` and `version` set.
pub fn labels(app: &str, version: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_owned(), app.to_owned()),
        ("version".to_owned(), version.to_owned()),
    ])
}
