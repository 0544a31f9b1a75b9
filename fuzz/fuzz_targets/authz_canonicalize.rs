//! Fuzzes request-path canonicalization: never panics, and every accepted target has a
//! canonical form that is stable, free of fragments, parameters and (when normalizing)
//! dot segments.
//!
//! `cargo +nightly fuzz run authz_canonicalize`

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_tls::authz::{NormalizeOptions, PathNormalization, PathParameters, canonicalize};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(target) = std::str::from_utf8(rest) else {
        return;
    };
    let opts = NormalizeOptions {
        normalization: match flags & 3 {
            0 => PathNormalization::None,
            1 => PathNormalization::Base,
            2 => PathNormalization::MergeSlashes,
            _ => PathNormalization::DecodeAndMergeSlashes,
        },
        reject_escaped_slashes: flags & 4 != 0,
        path_parameters: if flags & 8 != 0 {
            PathParameters::Strip
        } else {
            PathParameters::Reject
        },
    };
    let Ok(once) = canonicalize(target, &opts) else {
        return;
    };
    let path = once.path();
    assert!(path.starts_with('/') || path == "*", "{path:?}");
    assert!(!once.as_str().contains('#'));
    assert!(!path.contains(';'));
    assert!(once.as_str().bytes().all(|b| (0x21..0x7f).contains(&b)));
    if opts.normalization != PathNormalization::None {
        assert!(path.split('/').all(|s| s != "." && s != ".."), "{path:?}");
        assert!(!path.contains('\\'));
    }
    if matches!(
        opts.normalization,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    ) {
        assert!(!path.contains("//"), "{path:?}");
    }
    let twice = canonicalize(once.as_str(), &opts).expect("canonical output is accepted");
    assert_eq!(twice.as_str(), once.as_str());
});
