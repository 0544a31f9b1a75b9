//! Property tests: weighted picks, matching and rewriting hold for arbitrary inputs.

#![allow(clippy::unwrap_used)]

use http::Request;
use mesh_routing::matcher::split_host_port;
use mesh_routing::{RequestView, Rewrite, RouteMatch, StringMatch, UriMatch, Weighted};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;

proptest! {
    #[test]
    fn weighted_pick_never_returns_a_zero_weight_destination(
        weights in proptest::collection::vec(0u32..1000, 2..12),
        seed in any::<u64>(),
    ) {
        let entries: Vec<(usize, u32)> = weights.iter().copied().enumerate().collect();
        match Weighted::new(entries) {
            Err(_) => prop_assert!(weights.iter().all(|&w| w == 0)),
            Ok(w) => {
                let mut rng = SmallRng::seed_from_u64(seed);
                for _ in 0..64 {
                    let i = *w.pick(&mut rng);
                    prop_assert!(weights[i] > 0);
                }
                let total: f64 = (0..w.items().len()).map(|i| w.share(i)).sum();
                prop_assert!((total - 1.0).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn uri_prefix_is_a_raw_string_prefix_and_ignore_case_is_ascii_folding(
        prefix in "/[a-zA-Z0-9/]{0,8}",
        path in "/[a-zA-Z0-9/._-]{0,24}",
    ) {
        let sensitive = UriMatch { matcher: StringMatch::prefix(prefix.clone()), ignore_case: false };
        let insensitive = UriMatch { matcher: StringMatch::prefix(prefix.clone()), ignore_case: true };
        prop_assert_eq!(sensitive.matches(&path), path.starts_with(&prefix));
        prop_assert_eq!(
            insensitive.matches(&path),
            path.to_ascii_lowercase().starts_with(&prefix.to_ascii_lowercase())
        );
    }

    #[test]
    fn regex_matches_only_whole_values(value in "[a-z0-9]{0,12}") {
        let m = StringMatch::regex("[0-9]+").unwrap();
        prop_assert_eq!(m.matches(&value), !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()));
    }

    #[test]
    fn prefix_rewrite_keeps_everything_after_the_matched_prefix(
        prefix in "/[a-z]{1,6}",
        tail in "[a-z0-9/]{0,12}",
        replacement in "/[a-z0-9]{0,6}",
        query in proptest::option::of("[a-z]=[0-9]"),
    ) {
        let uri = match &query {
            Some(q) => format!("{prefix}{tail}?{q}"),
            None => format!("{prefix}{tail}"),
        };
        let mut req = Request::builder().uri(uri.as_str()).body(()).unwrap();
        let matched = UriMatch { matcher: StringMatch::prefix(prefix.clone()), ignore_case: false };
        Rewrite { uri: Some(replacement.clone()), ..Rewrite::default() }.apply(&mut req, Some(&matched));
        prop_assert_eq!(req.uri().path(), format!("{replacement}{tail}"));
        prop_assert_eq!(req.uri().query(), query.as_deref());
        prop_assert_eq!(req.headers()["x-envoy-original-path"].to_str().unwrap(), uri.as_str());
    }

    #[test]
    fn matching_arbitrary_requests_never_panics(
        authority in "[a-zA-Z0-9.:\\[\\]-]{0,20}",
        path in "/[ -~]{0,30}",
        header in "[ -~]{0,20}",
    ) {
        let Ok(uri) = format!("http://h{path}").parse::<http::Uri>() else { return Ok(()) };
        let mut b = Request::builder().uri(uri);
        if let Ok(v) = http::HeaderValue::from_str(&header) {
            b = b.header("x-h", v);
        }
        if let Ok(v) = http::HeaderValue::from_str(&authority) {
            b = b.header("host", v);
        }
        let req = b.body(()).unwrap();
        let view = RequestView::from_request(&req, None);
        let m = RouteMatch {
            uri: Some(UriMatch { matcher: StringMatch::regex(".*/x.*").unwrap(), ignore_case: true }),
            headers: vec![mesh_routing::HeaderMatch::without(
                http::HeaderName::from_static("x-h"),
                Some(StringMatch::prefix("a")),
            )],
            ..RouteMatch::default()
        };
        let _ = m.matches(&view);
        let _ = split_host_port(&authority);
    }

    #[test]
    fn host_and_port_split_round_trips(host in "[a-z][a-z0-9.-]{0,20}", port in any::<u16>()) {
        let with_port = format!("{host}:{port}");
        prop_assert_eq!(split_host_port(&with_port), (host.as_str(), Some(port)));
        prop_assert_eq!(split_host_port(&host), (host.as_str(), None));
        let v6 = format!("[::1]:{port}");
        prop_assert_eq!(split_host_port(&v6), ("::1", Some(port)));
    }
}
