//! Endpoints: one network address of a service instance, with its labels, the
//! identity the caller must see when it connects (secure naming) and whether it runs a
//! sidecar (auto-mTLS, ISTIO.md SR-23, SR-25).

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
}

impl Endpoint {
    /// An endpoint without labels or identity.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            labels: Arc::default(),
            identities: Arc::from(Vec::new()),
            tls_mode: TlsMode::Disabled,
        }
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
