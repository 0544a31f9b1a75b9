//! `mesh-proxy explain <PATH>... --from <WORKLOAD> --to <HOST> ...`: the command line of
//! [`explain`](super::explain).
//!
//! The files are loaded as `mesh-proxy validate` loads them; a configuration with errors
//! is not explained: its diagnostics go to standard error and the exit code is 1. A
//! request that is explained exits 0, whether it is allowed, denied or not routed; a
//! command line that does not describe a request (no sender, a malformed header, a
//! Gateway the files do not hold) exits 2.
//! Warnings of the load go to standard error too, so that `--output json` writes nothing
//! but the JSON document to standard output.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use http::{HeaderName, HeaderValue, Method};
use mesh_core::Labels;
use mesh_core::config::{LoadOptions, MeshConfig, load_paths};

use super::{Query, Source};

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Text,
    /// One JSON document.
    Json,
}

/// Arguments of `explain`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Files or directories of Istio YAML (directories: their .yaml/.yml files).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Namespace of resources that do not set metadata.namespace, and of a `--from`
    /// workload given without one.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The mesh root namespace (mesh-wide policies).
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
    /// SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The sending workload: `<service-account>` or `<namespace>/<service-account>`
    /// (labelled `app=<service-account>`), e.g. `order-service`.
    #[arg(long = "from", value_name = "WORKLOAD", conflicts_with = "gateway")]
    pub from: Option<String>,
    /// The request arrives at this Gateway (`<namespace>/<name>`) instead of a sidecar;
    /// the gateway's pods are labelled as the Gateway's selector.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub gateway: Option<String>,
    /// The sender's service account (default: the `--from` name, or
    /// `istio-ingressgateway` for a Gateway).
    #[arg(long, value_name = "NAME")]
    pub service_account: Option<String>,
    /// A label of the sending workload (repeatable), added to the default ones.
    #[arg(long = "source-label", value_name = "KEY=VALUE")]
    pub source_labels: Vec<String>,
    /// The destination host as the client sends it, optionally with `:port`.
    #[arg(long = "to", visible_alias = "host", value_name = "HOST")]
    pub to: String,
    /// The port the client addresses (default: the host's, else 80; at a Gateway, the
    /// port of the server that owns the host).
    #[arg(long)]
    pub port: Option<u16>,
    /// Method.
    #[arg(long, short = 'X', default_value = "GET")]
    pub method: String,
    /// Path, optionally with a query.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// A request header `name: value` (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// A label of the destination workload (repeatable): replaces the labels that are
    /// otherwise assumed (ServiceEntry endpoints, else `app=<service>` and the subset's).
    #[arg(long = "destination-label", value_name = "KEY=VALUE")]
    pub destination_labels: Vec<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

fn label(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label `{arg}` is not KEY=VALUE")),
    }
}

fn labels(args: &[String]) -> Result<Labels, String> {
    args.iter().map(|a| label(a)).collect()
}

/// The query the arguments describe, checked against the configuration.
fn query(args: &Args, config: &MeshConfig) -> Result<Query, String> {
    let mut source = match (&args.from, &args.gateway) {
        (Some(from), None) => {
            let (ns, sa) = from.split_once('/').unwrap_or((&args.namespace, from));
            let mut s = Source::new(ns, args.service_account.as_deref().unwrap_or(sa));
            s.labels.insert("app".into(), sa.to_owned());
            s
        }
        (None, Some(gw)) => {
            let (ns, name) = gw
                .split_once('/')
                .ok_or_else(|| format!("--gateway `{gw}` is not NAMESPACE/NAME"))?;
            let resource = config
                .gateway(ns, name)
                .ok_or_else(|| format!("Gateway {ns}/{name} is not in the configuration"))?;
            Source {
                namespace: ns.to_owned(),
                service_account: args
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "istio-ingressgateway".into()),
                labels: resource.spec.selector.clone(),
            }
        }
        _ => return Err("name the sender with --from WORKLOAD or --gateway NAMESPACE/NAME".into()),
    };
    source.labels.extend(labels(&args.source_labels)?);
    let method = Method::from_bytes(args.method.as_bytes())
        .map_err(|_| format!("`{}` is not an HTTP method", args.method))?;
    let mut headers = http::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("header `{h}` is not `name: value`"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("`{}` is not a header name", name.trim()))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("the value of header {name} is not valid"))?;
        headers.append(name, value);
    }
    if !args.path.starts_with('/') {
        return Err(format!("path `{}` must start with /", args.path));
    }
    let destination_labels = if args.destination_labels.is_empty() {
        None
    } else {
        Some(labels(&args.destination_labels)?)
    };
    Ok(Query {
        source,
        gateway: args
            .gateway
            .as_deref()
            .and_then(|g| g.split_once('/'))
            .map(|(ns, n)| (ns.to_owned(), n.to_owned())),
        method,
        host: args.to.clone(),
        port: args.port,
        path: args.path.clone(),
        headers,
        destination_labels,
        trust_domain: args.trust_domain.clone(),
    })
}

/// Runs the subcommand, writing the explanation to `out` and diagnostics to `err`.
pub fn run(args: &Args, out: &mut impl Write, err: &mut impl Write) -> std::io::Result<ExitCode> {
    let options = LoadOptions {
        default_namespace: args.namespace.clone(),
        root_namespace: args.root_namespace.clone(),
    };
    let report = load_paths(&args.paths, &options);
    let config = match MeshConfig::from_report(&report, &options) {
        Ok(c) => c,
        Err(errors) => {
            for d in &errors {
                writeln!(err, "{d}")?;
            }
            writeln!(
                err,
                "mesh-proxy explain: the configuration has {} error{}; nothing explained",
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            )?;
            return Ok(ExitCode::FAILURE);
        }
    };
    for w in report.warnings() {
        writeln!(err, "{w}")?;
    }
    let query = match query(args, &config) {
        Ok(q) => q,
        Err(e) => {
            writeln!(err, "mesh-proxy explain: {e}")?;
            return Ok(ExitCode::from(2));
        }
    };
    let answer = match super::explain(&config, &report, &query) {
        Ok(a) => a,
        Err(e) => {
            writeln!(err, "mesh-proxy explain: {e}")?;
            return Ok(ExitCode::FAILURE);
        }
    };
    match args.output {
        Output::Text => write!(out, "{}", super::text(&answer))?,
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, &answer)?;
            writeln!(out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
