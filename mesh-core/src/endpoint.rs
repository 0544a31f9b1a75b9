//! Endpoints: one network address of a service instance, with its labels, the
//! identity the caller must see when it connects (secure naming) and whether it runs a
//! sidecar (auto-mTLS, ISTIO.md SR-23, SR-25), and where it runs: its locality, network
//! and load-balancing weight (ServiceEntry `endpoints[]`, WorkloadEntry).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::identity::Identity;

/// Labels of an endpoint (`version: v1`, `app: payment-service`).
pub type Labels = BTreeMap<String, String>;

/// The endpoint label that says whether an instance accepts Istio mTLS (SR-23): the
/// injector sets it to `istio` on every pod with a sidecar.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Whether an endpoint accepts Istio mTLS, which decides the transport when no
/// DestinationRule sets `tls` (auto-mTLS, DR-50, SR-23).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// A sidecar (`security.istio.io/tlsMode: istio`): Istio mTLS.
    Istio,
    /// No sidecar: plaintext.
    #[default]
    Disabled,
}

impl TlsMode {
    /// The mode of an instance with `labels`: the `security.istio.io/tlsMode` label when
    /// present, else `fallback` (Istio: `istio` for a ServiceEntry/WorkloadEntry
    /// endpoint with a `serviceAccount`, disabled otherwise; SR-25).
    pub fn from_labels(labels: &Labels, fallback: TlsMode) -> Self {
        match labels.get(TLS_MODE_LABEL) {
            Some(v) if v == "istio" => TlsMode::Istio,
            Some(_) => TlsMode::Disabled,
            None => fallback,
        }
    }
}

/// Where an instance (or the proxy itself) runs: Istio's `region/zone/subzone`. Empty
/// parts are unknown; Istio compares them as they are (an empty zone equals an empty
/// zone).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    pub region: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// `topology.istio.io/subzone`.
    pub subzone: String,
}

/// The label of an endpoint's region, as Istio adds it to endpoint and proxy labels.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The label of an endpoint's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The label of an endpoint's subzone.
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// The label of an endpoint's network.
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

impl Locality {
    /// Reads `region/zone/subzone`; missing parts stay empty and anything after a third
    /// `/` belongs to the subzone.
    pub fn parse(text: &str) -> Self {
        let mut parts = text.trim().splitn(3, '/');
        let mut next = || parts.next().unwrap_or_default().to_owned();
        Self {
            region: next(),
            zone: next(),
            subzone: next(),
        }
    }

    /// Whether no part is known.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }

    /// Whether this locality matches `pattern` as Istio matches `distribute` keys:
    /// `region`, `region/zone` or `region/zone/subzone`, where a part may be `*` and
    /// missing parts match anything.
    pub fn matches(&self, pattern: &str) -> bool {
        let mine = [&self.region, &self.zone, &self.subzone];
        pattern
            .trim()
            .split('/')
            .zip(mine)
            .all(|(want, have)| want == "*" || want == have)
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

/// One upstream instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// The instance's labels; DestinationRule subsets select on them.
    pub labels: Arc<Labels>,
    /// The identities the instance may present; empty means plaintext (no mTLS).
    pub identities: Arc<[Identity]>,
    /// Whether the instance runs a sidecar (auto-mTLS); [`TlsMode::Disabled`] unless set.
    pub tls_mode: TlsMode,
    /// Where the instance runs (locality-aware balancing).
    pub locality: Arc<Locality>,
    /// The instance's network; `None` is the proxy's own (reachable directly).
    pub network: Option<Arc<str>>,
    /// Load-balancing weight within its locality, at least 1.
    pub weight: u32,
}

impl Endpoint {
    /// An endpoint without labels or identity.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            labels: Arc::default(),
            identities: Arc::from(Vec::new()),
            tls_mode: TlsMode::Disabled,
            locality: Arc::default(),
            network: None,
            weight: 1,
        }
    }

    /// Sets the locality.
    #[must_use]
    pub fn with_locality(mut self, locality: Locality) -> Self {
        self.locality = Arc::new(locality);
        self
    }

    /// Sets the network.
    #[must_use]
    pub fn with_network(mut self, network: impl Into<Arc<str>>) -> Self {
        self.network = Some(network.into());
        self
    }

    /// Sets the load-balancing weight; 0 counts as 1, as Istio sends it to Envoy.
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// The value of `label` for this endpoint as Istio sees it: its own label, else for
    /// the topology labels its locality or network.
    pub fn label(&self, label: &str) -> Option<&str> {
        if let Some(v) = self.labels.get(label) {
            return Some(v);
        }
        let v = match label {
            REGION_LABEL => &self.locality.region,
            ZONE_LABEL => &self.locality.zone,
            SUBZONE_LABEL => &self.locality.subzone,
            NETWORK_LABEL => return self.network.as_deref(),
            _ => return None,
        };
        Some(v.as_str()).filter(|v| !v.is_empty())
    }

    /// Sets whether the instance runs a sidecar.
    #[must_use]
    pub fn with_tls_mode(mut self, mode: TlsMode) -> Self {
        self.tls_mode = mode;
        self
    }

    /// Sets the labels.
    #[must_use]
    pub fn with_labels(mut self, labels: Labels) -> Self {
        self.labels = Arc::new(labels);
        self
    }

    /// Sets the one identity the endpoint must present.
    #[must_use]
    pub fn with_identity(mut self, identity: Identity) -> Self {
        self.identities = Arc::from(vec![identity]);
        self
    }

    /// Whether every `(key, value)` of `selector` is among the endpoint's labels.
    pub fn matches(&self, selector: &Labels) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_mode_label_wins_over_the_fallback() {
        let istio = Labels::from([(TLS_MODE_LABEL.into(), "istio".into())]);
        let off = Labels::from([(TLS_MODE_LABEL.into(), "disabled".into())]);
        assert_eq!(
            TlsMode::from_labels(&istio, TlsMode::Disabled),
            TlsMode::Istio
        );
        assert_eq!(
            TlsMode::from_labels(&off, TlsMode::Istio),
            TlsMode::Disabled
        );
        assert_eq!(
            TlsMode::from_labels(&Labels::new(), TlsMode::Istio),
            TlsMode::Istio
        );
        assert_eq!(
            TlsMode::from_labels(&Labels::new(), TlsMode::Disabled),
            TlsMode::Disabled
        );
    }

    #[test]
    fn localities_parse_and_match_patterns() {
        let l = Locality::parse("us-east/1a/rack-3");
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
            ("us-east", "1a", "rack-3")
        );
        assert_eq!(Locality::parse("eu").zone, "");
        assert!(Locality::parse("").is_empty());
        for yes in [
            "*",
            "us-east",
            "us-east/*",
            "us-east/1a",
            "us-east/1a/rack-3",
            "*/1a/*",
        ] {
            assert!(l.matches(yes), "{yes}");
        }
        for no in ["eu", "us-east/1b", "us-east/1a/rack-4"] {
            assert!(!l.matches(no), "{no}");
        }
        let ep = Endpoint::new("127.0.0.1:80".parse().unwrap())
            .with_locality(l)
            .with_network("net-1")
            .with_weight(0);
        assert_eq!(ep.weight, 1);
        assert_eq!(ep.label(ZONE_LABEL), Some("1a"));
        assert_eq!(ep.label(NETWORK_LABEL), Some("net-1"));
        assert_eq!(ep.label("app"), None);
    }

    #[test]
    fn subset_selection_needs_every_label() {
        let ep = Endpoint::new("127.0.0.1:80".parse().unwrap()).with_labels(Labels::from([
            ("app".into(), "payment".into()),
            ("version".into(), "v1".into()),
        ]));
        assert!(ep.matches(&Labels::new()));
        assert!(ep.matches(&Labels::from([("version".into(), "v1".into())])));
        assert!(!ep.matches(&Labels::from([("version".into(), "v2".into())])));
        assert!(!ep.matches(&Labels::from([("zone".into(), "a".into())])));
    }
}
