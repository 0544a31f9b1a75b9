//! The README draft stays true to the code: its embedding example is the doc test of
//! this crate, it lists every field that is parsed but not enforced, and the commands
//! it names exist.

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The first fenced `rust` block of the README.
fn readme_example(readme: &str) -> String {
    let start = readme.find("```rust\n").unwrap() + "```rust\n".len();
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].to_owned()
}

/// The doc test of `src/lib.rs` without its hidden lines.
fn doctest_example(lib: &str) -> String {
    let body: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .skip_while(|l| *l != "```")
        .skip(1)
        .take_while(|l| *l != "```")
        .filter(|l| !l.starts_with("# ") && *l != "#")
        .collect();
    body.join("\n") + "\n"
}

#[test]
fn readme_embedding_example_is_the_crate_doc_test() {
    let readme = read("../README.draft.md");
    let lib = read("src/lib.rs");
    assert_eq!(readme_example(&readme), doctest_example(&lib));
}

#[test]
fn readme_lists_every_field_that_is_not_enforced() {
    let readme = read("../README.draft.md");
    for n in mesh_core::config::NOT_ENFORCED {
        assert!(
            readme.contains(&format!("`{}`", n.pattern)),
            "README misses {}",
            n.pattern
        );
        assert!(
            readme.contains(n.effect),
            "README misses the effect of {}",
            n.pattern
        );
    }
}

#[test]
fn readme_commands_name_existing_targets() {
    let readme = read("../README.draft.md");
    for cmd in [
        "cargo run --release -p examples --bin sidecar",
        "cargo test --workspace",
        "cargo run -p examples --bin embedded",
        "cargo bench -p benches",
    ] {
        assert!(readme.contains(cmd), "{cmd}");
    }
    let manifest = read("Cargo.toml");
    assert!(manifest.contains("name = \"sidecar\"") && manifest.contains("name = \"embedded\""));
    assert!(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes/README.md")
            .exists()
    );
}
