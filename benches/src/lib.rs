//! Criterion benchmarks of the mesh workspace live in `benches/`: one file per concern.
//! Run them with `cargo bench -p benches`; the numbers are recorded in `BENCHMARKS.md`.
//! The load harness (`load` and its helper binaries, `benches/load/README.md`) and the
//! soak run share [`load`].

pub mod load;
pub mod proxy;
pub mod stack;
pub mod tls;
