//! Endpoints: one network address of a service instance, with its labels and the
//! identity the caller must see when it connects (secure naming).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::identity::Identity;

/// Labels of an endpoint (`version: v1`, `app: payment-service`).
pub type Labels = BTreeMap<String, String>;

/// One upstream instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// The instance's labels; DestinationRule subsets select on them.
    pub labels: Arc<Labels>,
    /// The identities the instance may present; empty means plaintext (no mTLS).
    pub identities: Arc<[Identity]>,
}

impl Endpoint {
    /// An endpoint without labels or identity.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            labels: Arc::default(),
            identities: Arc::from(Vec::new()),
        }
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
