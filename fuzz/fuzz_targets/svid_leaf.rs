//! Fuzzes SVID extraction from a peer's leaf certificate: arbitrary DER never panics, and
//! an accepted leaf names a SPIFFE identity of a trusted domain.
//!
//! `fuzz/run 60 svid_leaf`

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_tls::svid::{PeerRole, check_leaf};

fuzz_target!(|der: &[u8]| {
    for role in [PeerRole::Client, PeerRole::Server] {
        if let Ok(leaf) = check_leaf(der, role, &["cluster.local"], None) {
            assert_eq!(leaf.identity.trust_domain(), "cluster.local");
            assert!(leaf.identity.as_str().starts_with("spiffe://cluster.local/"));
        }
    }
});
