//! Conversion of `PeerAuthentication` resources ([`mesh_core::config`]) into the runtime
//! [`PeerAuthenticationPolicy`] and a compiled [`PeerAuthentication`].
//!
//! # Behaviour
//!
//! Each resource keeps its namespace and name; `selector.matchLabels` becomes the
//! selector (empty: namespace- or mesh-wide), `mtls.mode` the mode (absent or `UNSET`:
//! inherit), `portLevelMtls` the per-port modes (ports outside 1..=65535 are dropped:
//! validation in `mesh-core` already rejects them). `metadata.creationTimestamp` in the
//! `YYYY-MM-DDTHH:MM:SS[.frac]Z` form orders policies (oldest wins); the position in the
//! configuration breaks ties and orders policies without timestamps.
//!
//! # Example
//!
//! ```
//! use std::collections::BTreeMap;
//! use mesh_core::config::{LoadOptions, MeshConfig};
//! use mesh_tls::{PeerAuthMode, PeerAuthentication};
//!
//! let yaml = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
//!             metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";
//! let (config, _) = MeshConfig::from_yaml_str("pa.yaml", yaml, &LoadOptions::default()).unwrap();
//! let compiled = PeerAuthentication::from_config(&config);
//! assert_eq!(compiled.for_workload("default", &BTreeMap::new()).mode(8080), PeerAuthMode::Strict);
//! ```

use std::time::{Duration, SystemTime};

use mesh_core::config::{self, MeshConfig};

use crate::peer_auth::{MtlsMode, PeerAuthentication, PeerAuthenticationPolicy};

fn mode(m: Option<&config::MutualTls>) -> MtlsMode {
    match m.and_then(|m| m.mode) {
        None | Some(config::MtlsMode::Unset) => MtlsMode::Unset,
        Some(config::MtlsMode::Disable) => MtlsMode::Disable,
        Some(config::MtlsMode::Permissive) => MtlsMode::Permissive,
        Some(config::MtlsMode::Strict) => MtlsMode::Strict,
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (the form the API server writes).
fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, clock) = s.split_once('T')?;
    let mut d = date.split('-');
    let year: i32 = d.next()?.parse().ok()?;
    let month: u8 = d.next()?.parse().ok()?;
    let day: u8 = d.next()?.parse().ok()?;
    let clock = clock.split('.').next()?;
    let mut c = clock.split(':');
    let hour: u8 = c.next()?.parse().ok()?;
    let minute: u8 = c.next()?.parse().ok()?;
    let second: u8 = c.next()?.parse().ok()?;
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    let t = time::Time::from_hms(hour, minute, second).ok()?;
    let secs = time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

impl From<&config::PeerAuthentication> for PeerAuthenticationPolicy {
    fn from(r: &config::PeerAuthentication) -> Self {
        let mut p = PeerAuthenticationPolicy::new(
            &r.metadata.namespace,
            &r.metadata.name,
            mode(r.spec.mtls.as_ref()),
        );
        if let Some(sel) = &r.spec.selector
            && !sel.match_labels.is_empty()
        {
            p = p.with_selector(sel.match_labels.clone());
        }
        for (port, m) in &r.spec.port_level_mtls {
            if let Ok(port) = u16::try_from(*port)
                && port != 0
            {
                p = p.with_port(port, mode(Some(m)));
            }
        }
        if let Some(created) = r
            .metadata
            .creation_timestamp
            .as_deref()
            .and_then(parse_timestamp)
        {
            p = p.created_at(created);
        }
        p
    }
}

impl PeerAuthentication {
    /// Compiles every PeerAuthentication of `config` (root namespace from the config).
    pub fn from_config(config: &MeshConfig) -> Self {
        let policies = config
            .peer_authentications()
            .iter()
            .enumerate()
            .map(|(i, r)| PeerAuthenticationPolicy::from(r).with_sequence(i as u64));
        PeerAuthentication::compile(config.root_namespace(), policies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_auth::PeerAuthMode;
    use mesh_core::config::LoadOptions;
    use std::collections::BTreeMap;

    fn load(yaml: &str) -> MeshConfig {
        MeshConfig::from_yaml_str("pa.yaml", yaml, &LoadOptions::default())
            .unwrap()
            .0
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn namespace_policy_overrides_mesh_policy() {
        let c = load(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n\
             ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: legacy, namespace: legacy}\nspec: {mtls: {mode: PERMISSIVE}}\n",
        );
        let pa = PeerAuthentication::from_config(&c);
        assert_eq!(
            pa.for_workload("default", &labels(&[])).mode(80),
            PeerAuthMode::Strict
        );
        assert_eq!(
            pa.for_workload("legacy", &labels(&[])).mode(80),
            PeerAuthMode::Permissive
        );
    }

    #[test]
    fn workload_selector_and_port_level_modes_apply() {
        let c = load(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: pay, namespace: default}\n\
             spec:\n  selector: {matchLabels: {app: payment}}\n  mtls: {mode: STRICT}\n  \
             portLevelMtls:\n    9090: {mode: DISABLE}\n",
        );
        let pa = PeerAuthentication::from_config(&c);
        let w = pa.for_workload("default", &labels(&[("app", "payment")]));
        assert_eq!(w.mode(8080), PeerAuthMode::Strict);
        assert_eq!(w.mode(9090), PeerAuthMode::Disable);
        let other = pa.for_workload("default", &labels(&[("app", "order")]));
        assert_eq!(other.mode(8080), PeerAuthMode::Permissive);
    }

    #[test]
    fn unset_mode_inherits_from_the_namespace() {
        let c = load(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: ns, namespace: default}\nspec: {mtls: {mode: STRICT}}\n\
             ---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: {name: w, namespace: default}\n\
             spec:\n  selector: {matchLabels: {app: a}}\n  mtls: {mode: UNSET}\n",
        );
        let pa = PeerAuthentication::from_config(&c);
        assert_eq!(
            pa.for_workload("default", &labels(&[("app", "a")])).mode(1),
            PeerAuthMode::Strict
        );
    }

    #[test]
    fn creation_timestamps_parse_in_api_server_form() {
        let t = parse_timestamp("2024-01-02T03:04:05Z").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            1_704_164_645
        );
        assert!(parse_timestamp("2024-01-02T03:04:05.123Z").is_some());
        assert!(parse_timestamp("2024-01-02 03:04:05").is_none());
        assert!(parse_timestamp("2024-13-02T03:04:05Z").is_none());
    }
}
