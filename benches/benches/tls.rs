//! mesh-tls: full mTLS handshake through the mesh configs vs plain rustls with the same
//! key type, and identity extraction from a DER leaf.
//!
//! Handshakes run in memory (no sockets): bytes are moved between a rustls client and
//! server connection until both finish, so only TLS and verification work is measured.
//! Both sides disable resumption, as the mesh does, so every iteration is a full
//! handshake with ECDSA P-256 certificates. The workload is `benches::tls::Fixture`,
//! shared with the `tls_counts` instruction-count bench.

use std::hint::black_box;

use benches::tls::{Fixture, TD, handshake};
use criterion::{Criterion, criterion_group, criterion_main};
use mesh_tls::CertificateAuthority;
use mesh_tls::svid::{PeerRole, check_leaf};
use mesh_tls::verify::PeerSlot;
use rustls::{ClientConnection, ServerConnection};

fn handshakes(c: &mut Criterion) {
    let fx = Fixture::new();
    let mut group = c.benchmark_group("tls/handshake");

    // Ours: a per-connection config pair whose verifiers record the peers, exactly what
    // `InboundAcceptor::accept` and `ClientTls::connect` do.
    group.bench_function("mesh", |b| {
        b.iter(|| {
            let (done, (server_slot, client_slot)) = fx.mesh_handshake();
            let ids = (
                server_slot.get().map(|l| l.identity.clone()),
                client_slot.get().map(|l| l.identity.clone()),
            );
            assert!(ids.0.is_some() && ids.1.is_some());
            black_box((done, ids))
        })
    });

    // Ours with configs built once (isolates the per-connection config build).
    let server_cfg = fx.server_tls.config(None);
    let client_cfg = fx.client_tls.config(&fx.expected, None);
    group.bench_function("mesh_shared_config", |b| {
        b.iter(|| {
            let server = ServerConnection::new(server_cfg.clone()).expect("server conn");
            let client =
                ClientConnection::new(client_cfg.clone(), fx.name.clone()).expect("client conn");
            black_box(handshake(client, server))
        })
    });

    // The per-connection part of "mesh" alone: building the two recording configs.
    group.bench_function("mesh_config_build_only", |b| {
        b.iter(|| {
            black_box((
                fx.server_tls.config(Some(PeerSlot::new())),
                fx.client_tls.config(&fx.expected, Some(PeerSlot::new())),
            ))
        })
    });

    // Plain rustls mTLS: webpki verifiers, DNS name check, same certificates and keys.
    group.bench_function("plain_rustls", |b| {
        b.iter(|| black_box(fx.plain_handshake()))
    });
    group.finish();
}

fn identity(c: &mut Criterion) {
    let ca = CertificateAuthority::new(TD).expect("ca");
    let svid = ca.issue("production", "order-service").expect("svid");
    let der = svid.leaf_der().to_vec();
    let mut group = c.benchmark_group("tls/identity");
    group.bench_function("check_leaf", |b| {
        b.iter(|| check_leaf(black_box(&der), PeerRole::Client, &[TD], None).expect("valid"))
    });
    group.finish();
}

criterion_group!(benches, handshakes, identity);
criterion_main!(benches);
