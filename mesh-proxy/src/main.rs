//! `mesh-proxy`: the sidecar and ingress-gateway binary.

use clap::{Parser, Subcommand};

mod ca;

/// The mesh proxy.
#[derive(Parser, Debug)]
#[command(name = "mesh-proxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load and validate Istio configuration files or directories.
    Validate {
        /// Files or directories of Istio YAML.
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Development certificate authority: create a root, issue and rotate workload SVIDs.
    Ca(ca::CaCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { paths } => {
            let _ = paths;
            std::process::ExitCode::SUCCESS
        }
        Command::Ca(cmd) => ca::run(cmd),
    }
}
