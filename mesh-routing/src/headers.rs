//! Header operations of a route or destination (VS-83): `set` overwrites, `add`
//! appends another value, `remove` deletes.
//!
//! Operations run in Envoy's order: removals first, then `set`, then `add`. Setting
//! `host`/`:authority` is not a header operation: the configuration translation turns it
//! into an authority rewrite (see [`crate::rewrite::Rewrite`]); other pseudo-headers are
//! dropped there.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Header operations on a request or a response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOps {
    /// Overwrite (or add) these headers.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append these values, keeping existing ones.
    pub add: Vec<(HeaderName, HeaderValue)>,
    /// Delete these headers.
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the operations to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// Appends `other`'s operations after this one's (route level first, then destination).
    pub fn extend(&mut self, other: &HeaderOps) {
        self.set.extend(other.set.iter().cloned());
        self.add.extend(other.add.iter().cloned());
        self.remove.extend(other.remove.iter().cloned());
    }
}

/// The request and response operations of a route or destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    /// Applied to the request before it is forwarded.
    pub request: HeaderOps,
    /// Applied to the response before it is returned.
    pub response: HeaderOps,
}

impl Headers {
    /// Whether neither side has operations.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    #[test]
    fn set_overwrites_add_appends_remove_deletes() {
        let ops = HeaderOps {
            set: vec![(HeaderName::from_static("x-set"), hv("new"))],
            add: vec![(HeaderName::from_static("x-add"), hv("two"))],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        let mut h = HeaderMap::new();
        h.insert("x-set", hv("old"));
        h.append("x-set", hv("older"));
        h.insert("x-add", hv("one"));
        h.insert("x-gone", hv("bye"));
        ops.apply(&mut h);
        assert_eq!(h.get_all("x-set").iter().collect::<Vec<_>>(), vec!["new"]);
        assert_eq!(
            h.get_all("x-add").iter().collect::<Vec<_>>(),
            vec!["one", "two"]
        );
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn removal_runs_before_set_so_a_header_can_be_replaced() {
        let ops = HeaderOps {
            set: vec![(HeaderName::from_static("x-a"), hv("kept"))],
            add: vec![],
            remove: vec![HeaderName::from_static("x-a")],
        };
        let mut h = HeaderMap::new();
        h.insert("x-a", hv("old"));
        ops.apply(&mut h);
        assert_eq!(h.get("x-a").unwrap(), "kept");
    }

    #[test]
    fn add_creates_a_missing_header() {
        let ops = HeaderOps {
            add: vec![(HeaderName::from_static("x-new"), hv("1"))],
            ..HeaderOps::default()
        };
        let mut h = HeaderMap::new();
        ops.apply(&mut h);
        assert_eq!(h.get("x-new").unwrap(), "1");
    }
}
