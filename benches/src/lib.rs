//! Criterion benchmarks of the mesh workspace live in `benches/`: one file per concern.
//! Run them with `cargo bench -p benches`; the numbers are recorded in `BENCHMARKS.md`.

pub mod proxy;
pub mod tls;
