//! `mesh-proxy`: the sidecar and ingress-gateway binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod ca;
mod validate;

/// The mesh proxy.
#[derive(Parser, Debug)]
#[command(name = "mesh-proxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the sidecar: outbound, inbound and admin listeners.
    Sidecar {
        /// The proxy settings file (YAML).
        #[arg(long, env = "MESH_PROXY_SETTINGS")]
        settings: PathBuf,
    },
    /// Run the ingress gateway for a Gateway resource.
    Gateway {
        /// The proxy settings file (YAML) with a `gateway` section.
        #[arg(long, env = "MESH_PROXY_SETTINGS")]
        settings: PathBuf,
    },
    /// Load and validate Istio configuration files or directories.
    Validate(validate::Args),
    /// Development certificate authority: create a root, issue and rotate workload SVIDs.
    Ca(ca::CaCommand),
}

#[derive(Clone, Copy)]
enum Kind {
    Sidecar,
    Gateway,
}

fn run_proxy(kind: Kind, path: &std::path::Path) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = match mesh_proxy::Settings::load(path) {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let started = match kind {
            Kind::Sidecar => mesh_proxy::Sidecar::start(settings).await,
            Kind::Gateway => mesh_proxy::Gateway::start(settings).await,
        };
        let proxy = match started {
            Ok(p) => p,
            Err(e) => {
                eprintln!("mesh-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        for (name, addr) in &proxy.addresses {
            println!("{name} listening on {addr}");
        }
        mesh_proxy::shutdown::signal().await;
        proxy.shutdown();
        proxy.wait().await;
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sidecar { settings } => run_proxy(Kind::Sidecar, &settings),
        Command::Gateway { settings } => run_proxy(Kind::Gateway, &settings),
        Command::Validate(args) => validate::run(&args, &mut std::io::stdout().lock())
            .unwrap_or_else(|e| {
                eprintln!("mesh-proxy: {e}");
                ExitCode::FAILURE
            }),
        Command::Ca(cmd) => ca::run(cmd),
    }
}
