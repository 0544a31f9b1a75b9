//! Compiles the gRPC APIs under `proto/` (Istio's certificate service) into Rust when the
//! `xds` feature is on. The `.proto` files are parsed by protox, so no `protoc` is needed.
//! Also makes a change of `symbol-order.txt` rebuild the crate, so that `cargo dist` links
//! with the new order.

fn main() {
    println!("cargo::rerun-if-changed=proto");
    // An input of `cargo dist`'s link (.cargo/config.toml): a new order relinks the binary.
    println!("cargo::rerun-if-changed=symbol-order.txt");
    // The code generators are build dependencies of the `xds` feature only.
    #[cfg(feature = "xds")]
    if std::env::var_os("CARGO_FEATURE_XDS").is_some() {
        compile();
    }
}

#[cfg(feature = "xds")]
fn compile() {
    let files = protox::compile(["istio/v1/auth/ca.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/istio/v1/auth/ca.proto: {e}"));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(files)
        .unwrap_or_else(|e| panic!("generating the gRPC code: {e}"));
}
