//! mesh-tls: a fixed workload for instruction counting of the mTLS handshake.
//!
//! `cargo bench -p benches --bench tls_counts -- OP N` runs `OP` `N` times. Operations:
//!
//! - `mesh`: a full in-memory mTLS handshake through `ServerTls`/`ClientTls` with
//!   per-connection recording configs, SPIFFE verification of both certificates, secure
//!   naming, and the peer identities read from the slots (what the inbound acceptor and
//!   `ClientTls::connect` do).
//! - `plain`: the same handshake through plain rustls configs (`WebPkiClientVerifier`,
//!   the default server verifier with a DNS name check), same ECDSA P-256 keys.
//! - `check_leaf`: SPIFFE identity extraction and SVID checks from a DER leaf.
//!
//! Setup (CA, keys, configs) is the same for every `N`, so under
//! `valgrind --tool=callgrind` the difference between the instruction totals of two
//! values of `N`, divided by the difference of the `N`s, is the instruction count of one
//! operation, independent of machine load. `OP` `list` prints the operations.

use std::hint::black_box;

use benches::tls::{Fixture, TD};
use mesh_tls::svid::{PeerRole, check_leaf};

const OPS: &[&str] = &["mesh", "plain", "check_leaf"];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let op = args.first().map(String::as_str).unwrap_or("list");
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    if !OPS.contains(&op) {
        println!("operations: {}", OPS.join(" "));
        return;
    }

    let fx = Fixture::new();
    let leaf = fx.client_svid.leaf_der().to_vec();

    for _ in 0..n {
        match op {
            "mesh" => {
                let (done, (server_slot, client_slot)) = fx.mesh_handshake();
                let ids = (
                    server_slot.get().map(|l| l.identity.clone()),
                    client_slot.get().map(|l| l.identity.clone()),
                );
                assert!(ids.0.is_some() && ids.1.is_some(), "both peers recorded");
                black_box((done, ids));
            }
            "plain" => {
                black_box(fx.plain_handshake());
            }
            "check_leaf" => {
                black_box(
                    check_leaf(black_box(&leaf), PeerRole::Client, &[TD], None).expect("valid"),
                );
            }
            _ => unreachable!("checked against OPS"),
        }
    }
    println!("{op}: {n} runs");
}
