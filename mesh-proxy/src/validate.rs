//! `mesh-proxy validate <PATH>...`: load and validate Istio configuration the way the
//! proxy would, for operators' CI before they apply it.
//!
//! Prints one summary line per resource (`VirtualService production/order-service: 2 http
//! routes`) and every note and warning, then exits 0; or prints every error (with file,
//! line:column, document, resource and field path) and exits 1.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use mesh_core::config::{LoadOptions, load_paths};

/// Arguments of `validate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files or directories of Istio YAML (directories: their .yaml/.yml files).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Namespace of resources that do not set metadata.namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The mesh root namespace (mesh-wide policies).
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
}

/// Runs the subcommand, writing the report to `out`.
pub fn run(args: &Args, out: &mut impl Write) -> std::io::Result<ExitCode> {
    let options = LoadOptions {
        default_namespace: args.namespace.clone(),
        root_namespace: args.root_namespace.clone(),
    };
    let report = load_paths(&args.paths, &options);
    let errors = report.errors().count();
    let warnings = report.warnings().count();
    if errors == 0 {
        for r in &report.resources {
            writeln!(out, "{}", r.summary())?;
        }
    }
    for d in &report.diagnostics {
        writeln!(out, "{d}")?;
    }
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    if errors == 0 {
        writeln!(
            out,
            "OK: {}, {} (config version {:016x})",
            plural(report.resources.len(), "resource"),
            plural(warnings, "warning"),
            report.version
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        writeln!(
            out,
            "FAILED: {}, {}",
            plural(errors, "error"),
            plural(warnings, "warning")
        )?;
        Ok(ExitCode::FAILURE)
    }
}
