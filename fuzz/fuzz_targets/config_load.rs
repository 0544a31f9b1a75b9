//! Fuzzes configuration loading: any bytes given as a YAML file must load without
//! panicking, and every error must carry a document and a line:column.
//!
//! Run with `cargo +nightly fuzz run config_load` from the repository root; seed the
//! corpus with `mesh-core/tests/fixtures/**/*.yaml`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::config::{LoadOptions, MeshConfig, load_str};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let options = LoadOptions::default();
    let report = load_str("fuzz.yaml", text, &options);
    for d in report.errors() {
        assert!(d.document.is_some(), "error without document: {d}");
        assert!(d.line.is_some() && d.column.is_some(), "unlocated error: {d}");
        let _ = d.to_string();
    }
    for r in &report.resources {
        let _ = r.summary();
    }
    if let Ok(config) = MeshConfig::from_report(&report, &options) {
        for vs in config.virtual_services() {
            for h in &vs.spec.hosts {
                let _ = config.virtual_services_for_host(&vs.qualify(h));
            }
        }
    }
});
