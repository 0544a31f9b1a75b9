//! Properties of path canonicalization and its use by the layer.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use mesh_tls::authz::{
    Action, AuthzLayer, NormalizeOptions, Operation, PathNormalization, PathParameters, Policy,
    PolicySet, Rule, canonicalize,
};
use proptest::prelude::*;
use tower::{ServiceBuilder, ServiceExt};

fn mode() -> impl Strategy<Value = PathNormalization> {
    prop_oneof![
        Just(PathNormalization::None),
        Just(PathNormalization::Base),
        Just(PathNormalization::MergeSlashes),
        Just(PathNormalization::DecodeAndMergeSlashes),
    ]
}

fn options() -> impl Strategy<Value = NormalizeOptions> {
    (mode(), any::<bool>(), any::<bool>()).prop_map(|(normalization, reject, strip)| {
        NormalizeOptions {
            normalization,
            reject_escaped_slashes: reject,
            path_parameters: if strip {
                PathParameters::Strip
            } else {
                PathParameters::Reject
            },
        }
    })
}

/// Request targets built from the pieces that matter to canonicalization.
fn target() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just("//".to_owned()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("/./".to_owned()),
        Just("/../".to_owned()),
        Just("\\".to_owned()),
        Just(";".to_owned()),
        Just(";x=1".to_owned()),
        Just("?".to_owned()),
        Just("#".to_owned()),
        Just("*".to_owned()),
        Just("%".to_owned()),
        "%[0-9a-fA-F]{2}",
        "%2[eEfF]",
        "%5[cC]",
        "[a-zA-Z0-9_~-]{1,4}",
    ];
    prop::collection::vec(piece, 0..16).prop_map(|pieces| format!("/{}", pieces.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn canonicalization_is_idempotent(t in target(), opts in options()) {
        if let Ok(once) = canonicalize(&t, &opts) {
            let twice = canonicalize(once.as_str(), &opts).unwrap();
            prop_assert_eq!(twice.as_str(), once.as_str());
            prop_assert!(!twice.is_rewritten(), "canonical output {:?} was rewritten again", once.as_str());
        }
    }

    #[test]
    fn canonical_paths_have_no_dot_segments_or_parameters(t in target(), opts in options()) {
        if let Ok(c) = canonicalize(&t, &opts) {
            let path = c.path();
            prop_assert!(!path.contains(';'), "{:?}", path);
            prop_assert!(!c.as_str().contains('#'));
            if opts.normalization != PathNormalization::None {
                prop_assert!(path.split('/').all(|s| s != "." && s != ".."), "{:?}", path);
                prop_assert!(!path.contains('\\'));
            }
            if matches!(opts.normalization, PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes) {
                prop_assert!(!path.contains("//"), "{:?}", path);
            }
        }
    }
}

/// A canonical path made of unreserved characters.
fn plain_path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[a-zA-Z0-9_~-]{1,5}", 1..5)
}

/// Every way of writing one segment boundary or character that `mode` undoes.
#[derive(Clone, Debug)]
struct Encoding {
    /// Per character: percent-encode it, with lower-case hex.
    encode: Vec<(bool, bool)>,
    /// Per segment: noise inserted before it (0 none, 1 `./`, 2 `x/../`, 3 `%2E/`, 4 `%2e%2E/` + `..` pair).
    noise: Vec<u8>,
    /// Per separator: 0 `/`, 1 `\`, 2 `//` (merge modes), 3 `%2F` (decode mode), 4 `%5c` (decode mode).
    separators: Vec<u8>,
}

fn encoding() -> impl Strategy<Value = Encoding> {
    (
        prop::collection::vec((any::<bool>(), any::<bool>()), 32),
        prop::collection::vec(0u8..5, 8),
        prop::collection::vec(0u8..5, 16),
    )
        .prop_map(|(encode, noise, separators)| Encoding {
            encode,
            noise,
            separators,
        })
}

fn encode(segments: &[String], e: &Encoding, mode: PathNormalization) -> String {
    let mut out = String::new();
    let mut sep_i = 0;
    let mut sep = |out: &mut String| {
        let s = e.separators[sep_i % e.separators.len()];
        sep_i += 1;
        if out.is_empty() {
            // A request target starts with `/`.
            out.push('/');
            return;
        }
        out.push_str(match (s, mode) {
            (1, _) => "\\",
            (2, PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes) => "//",
            (3, PathNormalization::DecodeAndMergeSlashes) => "%2F",
            (4, PathNormalization::DecodeAndMergeSlashes) => "%5c",
            _ => "/",
        });
    };
    let mut char_i = 0;
    for (i, seg) in segments.iter().enumerate() {
        match e.noise[i % e.noise.len()] {
            1 => {
                sep(&mut out);
                out.push('.');
            }
            2 => {
                sep(&mut out);
                out.push_str("junk");
                sep(&mut out);
                out.push_str("..");
            }
            3 => {
                sep(&mut out);
                out.push_str("%2E");
            }
            4 => {
                sep(&mut out);
                out.push_str("j%2e");
                sep(&mut out);
                out.push_str("%2e%2E");
            }
            _ => {}
        }
        sep(&mut out);
        for c in seg.chars() {
            let (enc, lower) = e.encode[char_i % e.encode.len()];
            char_i += 1;
            if enc {
                let hex = format!("%{:02X}", c as u32);
                out.push_str(&if lower { hex.to_lowercase() } else { hex });
            } else {
                out.push(c);
            }
        }
    }
    out
}

async fn status_through_layer(
    set: &PolicySet,
    opts: NormalizeOptions,
    target: &str,
) -> (StatusCode, usize) {
    let called = Arc::new(AtomicUsize::new(0));
    let seen = called.clone();
    let svc = ServiceBuilder::new()
        .layer(AuthzLayer::new(set.clone()).normalization(opts))
        .service_fn(move |_req: Request<Empty<Bytes>>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
        });
    let req = Request::builder().uri(target).body(Empty::new()).unwrap();
    let res = svc.oneshot(req).await.unwrap();
    (res.status(), called.load(Ordering::SeqCst))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn deny_of_a_path_denies_every_encoding_the_mode_decodes(
        segments in plain_path(),
        e in encoding(),
        mode in prop_oneof![
            Just(PathNormalization::Base),
            Just(PathNormalization::MergeSlashes),
            Just(PathNormalization::DecodeAndMergeSlashes),
        ],
    ) {
        let path = format!("/{}", segments.join("/"));
        let encoded = encode(&segments, &e, mode);
        let opts = NormalizeOptions::new(mode);
        let canonical = canonicalize(&encoded, &opts).unwrap();
        prop_assert_eq!(canonical.path(), path.as_str(), "encoded {:?}", encoded);

        let deny = Policy::new("ns", "deny", Action::Deny, vec![Rule {
            to: Some(vec![Operation { paths: vec![path.clone()], ..Operation::default() }]),
            ..Rule::default()
        }]);
        let set = PolicySet::compile([&deny]).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (status, called) = rt.block_on(status_through_layer(&set, opts, &encoded));
        prop_assert_eq!(status, StatusCode::FORBIDDEN, "encoded {:?}", encoded);
        prop_assert_eq!(called, 0);
    }
}
