//! `mesh-proxy discovery`: the control plane process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use mesh_proxy::discovery::{Discovery, DiscoveryOptions, Source};

/// Run the control plane: configuration to sidecars over xDS, workload certificates.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory (or file) of Istio YAML to serve, watched (repeatable).
    #[arg(long = "config-dir", required = true)]
    config_dirs: Vec<PathBuf>,
    /// The CA directory (from `mesh-proxy ca init`).
    #[arg(long, env = "MESH_CA_DIR", default_value = "/etc/cacerts")]
    ca_dir: PathBuf,
    /// This process's namespace (its identity is issued for it).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    namespace: String,
    /// This process's service account.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "mesh-discovery")]
    service_account: String,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The root namespace (mesh-wide policies).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// gRPC listener (xDS, certificates).
    #[arg(long, default_value = "0.0.0.0:15012")]
    grpc: SocketAddr,
    /// Monitoring listener (`/metrics`, `/ready`).
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring: SocketAddr,
}

/// Runs `discovery` until SIGTERM or Ctrl-C.
pub fn run(args: Args) -> ExitCode {
    crate::init_logging();
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
        let options = DiscoveryOptions {
            namespace: args.namespace,
            service_account: args.service_account,
            trust_domain: args.trust_domain,
            root_namespace: args.root_namespace,
            ca_dir: args.ca_dir,
            source: Source::Files(args.config_dirs),
            grpc: args.grpc,
            monitoring: args.monitoring,
        };
        let discovery = match Discovery::start(options).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("mesh-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        for name in ["grpc", "monitoring"] {
            if let Some(addr) = discovery.address(name) {
                println!("{name} listening on {addr}");
            }
        }
        mesh_proxy::process::shutdown::signal().await;
        discovery.shutdown();
        discovery.wait().await;
        ExitCode::SUCCESS
    })
}
