//! `mesh-proxy`: the sidecar and ingress-gateway binary.

use clap::{Parser, Subcommand};

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
    /// Load and validate Istio configuration files or directories.
    Validate(validate::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => validate::run(&args, &mut std::io::stdout().lock()),
    };
    result.unwrap_or_else(|e| {
        eprintln!("mesh-proxy: {e}");
        std::process::ExitCode::FAILURE
    })
}
