//! `mesh-proxy`: the sidecar and ingress-gateway binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod ca;
mod control_plane;
mod init;
mod kube_inject;
mod validate;

// The binary's allocator, chosen at build time: jemalloc by default (its background thread
// returns freed memory to the system while the proxy idles), mimalloc when that feature is
// on, the system allocator with neither (BENCHMARKS.md, "Memory").
#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Run the ingress gateway for a Gateway resource.
    Gateway {
        /// The proxy settings file (YAML) with a `gateway` section.
        #[arg(long, env = "MESH_PROXY_SETTINGS")]
        settings: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Load and validate Istio configuration files or directories.
    Validate(validate::Args),
    /// Explain what the mesh does with one request: route, policies, TLS, authorization.
    Explain(Box<mesh_proxy::explain::cli::Args>),
    /// Development certificate authority: create a root, issue and rotate workload SVIDs.
    Ca(ca::CaCommand),
    /// Run the control plane: configuration to sidecars over xDS, workload certificates.
    Discovery(Box<control_plane::Args>),
    /// Install the transparent-capture rules (nftables) in the current network namespace.
    Init(init::Args),
    /// Inject the sidecar into the pod templates of Kubernetes manifests (as `istioctl
    /// kube-inject`).
    Inject(Box<kube_inject::Args>),
}

/// Runtime sizing shared by `sidecar` and `gateway`.
#[derive(clap::Args, Debug)]
struct RuntimeArgs {
    /// Number of tokio worker threads (default: one per CPU). With 1, the proxy runs
    /// on a single thread (tokio's current-thread runtime).
    #[arg(long, env = "MESH_PROXY_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: Option<u16>,
}

#[derive(Clone, Copy)]
enum Kind {
    Sidecar,
    Gateway,
}

/// Logs to stderr, filtered by `MESH_LOG` (default `info`).
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn run_proxy(kind: Kind, path: &std::path::Path, args: &RuntimeArgs) -> ExitCode {
    init_logging();
    let settings = match mesh_proxy::Settings::load(path) {
        Ok(s) => s,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let mut builder = match args.worker_threads {
        // One thread serves everything, without the work-stealing scheduler's hand-offs
        // between the thread that accepts and a worker.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
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
        mesh_proxy::process::shutdown::signal().await;
        proxy.shutdown();
        if !mesh_proxy::process::shutdown::drain_unless_signalled(proxy).await {
            // Without waiting for the runtime's tasks and blocking threads to wind down.
            std::process::exit(1);
        }
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Sidecar { settings, runtime } => run_proxy(Kind::Sidecar, &settings, &runtime),
        Command::Gateway { settings, runtime } => run_proxy(Kind::Gateway, &settings, &runtime),
        Command::Validate(args) => validate::run(&args, &mut std::io::stdout().lock())
            .unwrap_or_else(|e| {
                eprintln!("mesh-proxy: {e}");
                ExitCode::FAILURE
            }),
        Command::Explain(args) => mesh_proxy::explain::cli::run(
            &args,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        )
        .unwrap_or_else(|e| {
            eprintln!("mesh-proxy: {e}");
            ExitCode::FAILURE
        }),
        Command::Ca(cmd) => ca::run(cmd),
        Command::Discovery(args) => control_plane::run(*args),
        Command::Init(args) => init::run(&args),
        Command::Inject(args) => kube_inject::run(*args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_flag_is_parsed_and_zero_is_refused() {
        let cli = Cli::try_parse_from([
            "mesh-proxy",
            "sidecar",
            "--settings",
            "s.yaml",
            "--worker-threads",
            "1",
        ])
        .unwrap();
        let Command::Sidecar { runtime, .. } = cli.command else {
            panic!("expected the sidecar command");
        };
        assert_eq!(runtime.worker_threads, Some(1));
        assert!(
            Cli::try_parse_from([
                "mesh-proxy",
                "gateway",
                "--settings",
                "g.yaml",
                "--worker-threads",
                "0"
            ])
            .is_err()
        );
    }
}
