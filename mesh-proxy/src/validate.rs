//! `mesh-proxy validate <PATH>...`: load and validate Istio configuration the way the
//! proxy would, for operators' CI before they apply it.
//!
//! Prints one summary line per resource (`VirtualService production/order-service: 2 http
//! routes`) and every note and warning, then exits 0; or prints every error (with file,
//! line:column, document, resource and field path) and exits 1.
//!
//! `--workload-port <PORT>` (repeatable) names the ports the workloads of these policies
//! serve: every AuthorizationPolicy `DENY` rule whose `to.operation.ports` names another
//! port is then reported as a warning, since it never matches (at start and on reload the
//! proxy makes the same check with its own application port). Without the option the
//! check is skipped: the files alone do not say which ports a workload serves, and
//! guessing from ServiceEntry or Gateway ports would warn about correct policies
//! (ISTIO.md AP-48).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use mesh_core::config::{AnyResource, LoadOptions, load_paths};

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
    /// A port the workloads of the AuthorizationPolicies serve (repeatable); DENY rules
    /// for other ports are reported as warnings.
    #[arg(long = "workload-port", value_name = "PORT")]
    pub workload_ports: Vec<u16>,
}

/// Runs the subcommand, writing the report to `out`.
pub fn run(args: &Args, out: &mut impl Write) -> std::io::Result<ExitCode> {
    let options = LoadOptions {
        default_namespace: args.namespace.clone(),
        root_namespace: args.root_namespace.clone(),
    };
    let mut report = load_paths(&args.paths, &options);
    if !args.workload_ports.is_empty() {
        let policies = report.resources.iter().filter_map(|r| match r {
            AnyResource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        });
        let warnings = report.unserved_deny_ports(policies, &args.workload_ports);
        report.diagnostics.extend(warnings);
    }
    // Telemetry's CEL expressions are checked where they are compiled.
    let telemetry: Vec<_> = report
        .resources
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            AnyResource::Telemetry(t) => Some((i, mesh_telemetry::policy::check(t))),
            _ => None,
        })
        .flat_map(|(i, errs)| errs.into_iter().map(move |e| (i, e)))
        .filter_map(|(i, e)| report.error_at(i, &e.path, e.message))
        .collect();
    report.diagnostics.extend(telemetry);
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
