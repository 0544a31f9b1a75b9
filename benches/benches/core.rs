//! mesh-core: SPIFFE ID parsing and outcome classification.

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::{Identity, Outcome};
use std::hint::black_box;

fn identity(c: &mut Criterion) {
    let s = "spiffe://cluster.local/ns/production/sa/order-service";
    c.bench_function("identity/parse", |b| {
        b.iter(|| Identity::parse(black_box(s)))
    });
    let id = Identity::parse(s).expect("valid id");
    c.bench_function("identity/namespace", |b| {
        b.iter(|| black_box(&id).namespace())
    });
}

fn outcome(c: &mut Criterion) {
    let res = http::Response::builder()
        .status(503)
        .body(())
        .expect("response");
    c.bench_function("outcome/from_response", |b| {
        b.iter(|| Outcome::from_response(black_box(&res)).is_gateway_error())
    });
}

criterion_group!(benches, identity, outcome);
criterion_main!(benches);
