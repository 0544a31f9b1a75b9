//! VirtualService delegation (VS-86): a root VirtualService's HTTP route with
//! `delegate: {name, namespace}` stands for the HTTP routes of another VirtualService,
//! the delegate, each narrowed by the root route's matches.
//!
//! # Behaviour (Istio's `mergeVirtualServicesIfNeeded`)
//!
//! - A delegate is a VirtualService without `hosts`; a VirtualService with hosts is never
//!   a delegate, so a root cannot delegate to another root, and delegation is one level.
//!   `delegate.namespace` defaults to the root's namespace. The delegate must be exported
//!   to the root's namespace (`exportTo`, SR-30).
//! - A route whose delegate is missing or not exported is dropped; the rest of the root
//!   stays (`mesh-core` validation warns at the route).
//! - Each delegate route is merged with the root route: every match block of the
//!   delegate must be conflict-free with at least one block of the root, and yields one
//!   merged block per root block it does not conflict with (the root block's conditions
//!   fill what the delegate block leaves unset; headers, withoutHeaders, queryParams and
//!   sourceLabels are the union, the delegate's entry winning). A delegate route with a
//!   block that conflicts with every root block is dropped. With no root blocks the
//!   delegate's blocks stand; with no delegate blocks the root's.
//! - Two string matches conflict unless one is unset, or the delegate's is an exact or
//!   prefix inside the root's (root exact: the same exact; root prefix: an exact or
//!   prefix starting with it). A regex on either side conflicts with any other match.
//!   `ignoreUriCase` must agree; ports, when both are set, must be equal; a root
//!   `sourceNamespace` must be repeated; `sourceLabels` must not disagree; a delegate's
//!   `gateways` must be among the root's.
//! - The delegate route inherits, when it does not set them, the root route's `rewrite`,
//!   `timeout`, `retries`, `fault`, `mirror`, `mirrorPercent(age)`, `corsPolicy` and
//!   `headers`; its name becomes `<root>-<delegate>` when both are named. Names of match
//!   blocks are joined the same way.
//! - The delegate's own `gateways`, `tcp` and `tls` are ignored: the root decides where
//!   the routes apply.

use mesh_core::config::{self, HttpMatchRequest, HttpRoute, MeshConfig, VirtualService};

/// The delegate VirtualService `route` names, from `root_namespace`: a VirtualService
/// without hosts, exported to the root's namespace.
pub(crate) fn find<'c>(
    config: &'c MeshConfig,
    delegate: &config::Delegate,
    root_namespace: &str,
) -> Option<&'c VirtualService> {
    let namespace = delegate
        .namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(root_namespace);
    config.virtual_services().iter().find(|vs| {
        vs.metadata.name == delegate.name
            && vs.metadata.namespace == namespace
            && vs.spec.hosts.is_empty()
            && config::exported(&vs.spec.export_to, namespace, root_namespace)
    })
}

/// The delegate route `leaf` merged into the root route `root`, or `None` when one of
/// its match blocks conflicts with every block of the root.
pub(crate) fn merge_route(root: &HttpRoute, leaf: &HttpRoute) -> Option<HttpRoute> {
    let matches = merge_matches(&root.matches, &leaf.matches)?;
    let mut out = leaf.clone();
    out.matches = matches;
    out.name = join_names(root.name.as_deref(), leaf.name.as_deref());
    fn inherit<T: Clone>(field: &mut Option<T>, root: &Option<T>) {
        if field.is_none() {
            field.clone_from(root);
        }
    }
    inherit(&mut out.rewrite, &root.rewrite);
    inherit(&mut out.timeout, &root.timeout);
    inherit(&mut out.retries, &root.retries);
    inherit(&mut out.fault, &root.fault);
    inherit(&mut out.mirror, &root.mirror);
    inherit(&mut out.mirror_percent, &root.mirror_percent);
    inherit(&mut out.mirror_percentage, &root.mirror_percentage);
    inherit(&mut out.cors_policy, &root.cors_policy);
    inherit(&mut out.headers, &root.headers);
    Some(out)
}

/// `root-leaf` when both are named, else whichever is.
fn join_names(root: Option<&str>, leaf: Option<&str>) -> Option<String> {
    let root = root.filter(|s| !s.is_empty());
    match (root, leaf.filter(|s| !s.is_empty())) {
        (Some(r), Some(l)) => Some(format!("{r}-{l}")),
        (None, Some(l)) => Some(l.to_owned()),
        (r, None) => r.map(str::to_owned),
    }
}

fn merge_matches(
    root: &[HttpMatchRequest],
    leaf: &[HttpMatchRequest],
) -> Option<Vec<HttpMatchRequest>> {
    if root.is_empty() {
        return Some(leaf.to_vec());
    }
    if leaf.is_empty() {
        return Some(root.to_vec());
    }
    let mut out = Vec::new();
    for sub in leaf {
        let before = out.len();
        for r in root {
            if !conflicts(r, sub) {
                out.push(merge_match(r, sub));
            }
        }
        if out.len() == before {
            return None;
        }
    }
    Some(out)
}

fn merge_match(root: &HttpMatchRequest, leaf: &HttpMatchRequest) -> HttpMatchRequest {
    let mut out = leaf.clone();
    out.name = join_names(root.name.as_deref(), leaf.name.as_deref());
    for (field, from) in [
        (&mut out.uri, &root.uri),
        (&mut out.scheme, &root.scheme),
        (&mut out.method, &root.method),
        (&mut out.authority, &root.authority),
    ] {
        if field.is_none() {
            field.clone_from(from);
        }
    }
    for (field, from, own) in [
        (&mut out.headers, &root.headers, &leaf.headers),
        (
            &mut out.without_headers,
            &root.without_headers,
            &leaf.without_headers,
        ),
        (
            &mut out.query_params,
            &root.query_params,
            &leaf.query_params,
        ),
    ] {
        *field = from.clone();
        field.extend(own.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    if out.port.is_none_or(|p| p == 0) {
        out.port = root.port;
    }
    out.source_labels = root.source_labels.clone();
    out.source_labels.extend(
        leaf.source_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    if out.source_namespace.as_deref().is_none_or(str::is_empty) {
        out.source_namespace.clone_from(&root.source_namespace);
    }
    if out.gateways.is_empty() {
        out.gateways.clone_from(&root.gateways);
    }
    out
}

fn conflicts(root: &HttpMatchRequest, leaf: &HttpMatchRequest) -> bool {
    let pairs = [
        (&root.uri, &leaf.uri),
        (&root.scheme, &leaf.scheme),
        (&root.method, &leaf.method),
        (&root.authority, &leaf.authority),
    ];
    if pairs
        .iter()
        .any(|(r, l)| string_conflict(r.as_ref(), l.as_ref()))
    {
        return true;
    }
    for (roots, leaves) in [
        (&root.headers, &leaf.headers),
        (&root.without_headers, &leaf.without_headers),
        (&root.query_params, &leaf.query_params),
    ] {
        if leaves
            .iter()
            .any(|(k, l)| string_conflict(roots.get(k), Some(l)))
        {
            return true;
        }
    }
    if root.ignore_uri_case != leaf.ignore_uri_case {
        return true;
    }
    if let (Some(r), Some(l)) = (root.port, leaf.port)
        && r > 0
        && l > 0
        && r != l
    {
        return true;
    }
    if let Some(ns) = root.source_namespace.as_deref().filter(|s| !s.is_empty())
        && leaf.source_namespace.as_deref() != Some(ns)
    {
        return true;
    }
    if leaf
        .source_labels
        .iter()
        .any(|(k, v)| root.source_labels.get(k).is_some_and(|r| r != v))
    {
        return true;
    }
    !root.gateways.is_empty()
        && !leaf.gateways.is_empty()
        && (root.gateways.len() < leaf.gateways.len()
            || leaf.gateways.iter().any(|g| !root.gateways.contains(g)))
}

/// The `exact`, `prefix` and `regex` of a string match, empty when not that kind (as
/// protobuf getters read them).
fn parts(m: &config::StringMatch) -> (&str, &str, &str) {
    match m {
        config::StringMatch::Exact(s) => (s, "", ""),
        config::StringMatch::Prefix(s) => ("", s, ""),
        config::StringMatch::Regex(s) => ("", "", s),
        config::StringMatch::Present => ("", "", ""),
    }
}

fn string_conflict(root: Option<&config::StringMatch>, leaf: Option<&config::StringMatch>) -> bool {
    let (Some(root), Some(leaf)) = (root, leaf) else {
        return false;
    };
    let (r_exact, r_prefix, r_regex) = parts(root);
    let (l_exact, l_prefix, l_regex) = parts(leaf);
    let r_any = !(r_exact.is_empty() && r_prefix.is_empty() && r_regex.is_empty());
    let l_any = !(l_exact.is_empty() && l_prefix.is_empty() && l_regex.is_empty());
    if (!r_regex.is_empty() && l_any) || (!l_regex.is_empty() && r_any) {
        return true;
    }
    if !r_exact.is_empty() {
        return !l_prefix.is_empty() || l_exact != r_exact;
    }
    if !r_prefix.is_empty() {
        if !l_prefix.is_empty() {
            return !l_prefix.starts_with(r_prefix);
        }
        if !l_exact.is_empty() {
            return !l_exact.starts_with(r_prefix);
        }
    }
    // Anything else (a root presence match, a regex against a presence match) is not
    // known to be a subset.
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::StringMatch::{Exact, Prefix, Regex};

    fn uri(m: config::StringMatch) -> HttpMatchRequest {
        HttpMatchRequest {
            uri: Some(m),
            ..HttpMatchRequest::default()
        }
    }

    #[test]
    fn a_delegate_prefix_inside_the_root_prefix_merges() {
        let root = [uri(Prefix("/shop".into()))];
        let leaf = [uri(Prefix("/shop/cart".into()))];
        let merged = merge_matches(&root, &leaf).unwrap();
        assert_eq!(merged, vec![uri(Prefix("/shop/cart".into()))]);
    }

    #[test]
    fn a_delegate_prefix_outside_the_root_conflicts() {
        let root = [uri(Prefix("/shop".into()))];
        assert!(merge_matches(&root, &[uri(Prefix("/admin".into()))]).is_none());
        assert!(merge_matches(&root, &[uri(Exact("/sho".into()))]).is_none());
        assert!(merge_matches(&root, &[uri(Regex("/shop.*".into()))]).is_none());
        let exact = [uri(Exact("/a".into()))];
        assert!(merge_matches(&exact, &[uri(Prefix("/a".into()))]).is_none());
        assert!(merge_matches(&exact, &[uri(Exact("/a".into()))]).is_some());
    }

    #[test]
    fn root_conditions_fill_what_the_delegate_leaves_unset() {
        let mut root = uri(Prefix("/shop".into()));
        root.headers.insert("x-env".into(), Exact("prod".into()));
        root.port = Some(8080);
        let mut leaf = HttpMatchRequest::default();
        leaf.headers.insert("x-user".into(), Exact("a".into()));
        let merged = merge_matches(&[root], &[leaf]).unwrap();
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].uri, Some(Prefix("/shop".into())));
        assert_eq!(merged[0].headers.len(), 2);
        assert_eq!(merged[0].port, Some(8080));
    }

    #[test]
    fn a_delegate_block_merges_with_every_root_block_it_fits() {
        let root = [uri(Prefix("/a".into())), uri(Prefix("/b".into()))];
        let leaf = [HttpMatchRequest {
            method: Some(Exact("GET".into())),
            ..HttpMatchRequest::default()
        }];
        assert_eq!(merge_matches(&root, &leaf).unwrap().len(), 2);
    }

    #[test]
    fn the_delegate_route_inherits_unset_root_fields() {
        let root = HttpRoute {
            name: Some("root".into()),
            timeout: Some(config::Duration::from_std(std::time::Duration::from_secs(
                3,
            ))),
            ..HttpRoute::default()
        };
        let leaf = HttpRoute {
            name: Some("leaf".into()),
            ..HttpRoute::default()
        };
        let merged = merge_route(&root, &leaf).unwrap();
        assert_eq!(merged.name.as_deref(), Some("root-leaf"));
        assert_eq!(merged.timeout, root.timeout);
    }
}
