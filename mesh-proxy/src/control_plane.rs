//! `mesh-proxy discovery`: the control plane process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use mesh_core::config::Duration as IstioDuration;
use mesh_proxy::discovery::{Discovery, DiscoveryOptions, Source};

/// Run the control plane: configuration to sidecars over xDS, workload certificates.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Serve Istio's resources, Services and endpoints from the Kubernetes API (in-cluster
    /// credentials, `KUBECONFIG`, or `--kubeconfig`), and certificates to callers whose
    /// service-account token the API server vouches for.
    #[arg(
        long,
        conflicts_with = "config_dirs",
        required_unless_present = "config_dirs"
    )]
    kubernetes: bool,
    /// The kubeconfig file for `--kubernetes`.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Serve a directory (or file) of Istio YAML instead, watched (repeatable).
    #[arg(long = "config-dir")]
    config_dirs: Vec<PathBuf>,
    /// The CA directory: Istio's plug-in layout (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, `cert-chain.pem`) or one from `mesh-proxy ca init`.
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
    /// Validating webhook listener (HTTPS; with `--kubernetes`).
    #[arg(long, requires = "kubernetes")]
    webhook: Option<SocketAddr>,
    /// The ValidatingWebhookConfiguration whose `caBundle` is kept set to the mesh root.
    #[arg(long, requires = "webhook")]
    webhook_config: Option<String>,
    /// Inject sidecars into new pods on the webhook listener (`POST /inject`).
    #[arg(long, requires = "webhook")]
    inject: bool,
    /// The image of injected proxies.
    #[arg(long, requires = "inject", default_value = concat!("mesh-proxy:", env!("CARGO_PKG_VERSION")))]
    proxy_image: String,
    /// The pull policy of injected proxies' image (`Always`, `IfNotPresent`, `Never`).
    #[arg(long, requires = "inject")]
    proxy_image_pull_policy: Option<String>,
    /// Inject native sidecars (`restartPolicy: Always` init containers): `auto` when the
    /// API server is 1.33 or later.
    #[arg(long, requires = "inject", default_value = "auto", value_parser = ["auto", "true", "false"])]
    native_sidecars: String,
    /// The revision this injector serves (namespaces labelled `istio.io/rev=<revision>`).
    #[arg(long, requires = "inject", default_value = "default")]
    revision: String,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept set to the mesh root.
    #[arg(long, requires = "inject")]
    injector_config: Option<String>,
    /// More DNS names for the serving certificate (repeatable).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// The audience certificate requests' tokens must carry.
    #[arg(long, default_value = "istio-ca")]
    token_audience: String,
    /// Lifetime of issued workload certificates when a request asks for none.
    #[arg(long, default_value = "24h")]
    workload_cert_ttl: IstioDuration,
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
        let source = if args.kubernetes {
            Source::Kubernetes {
                kubeconfig: args.kubeconfig,
            }
        } else {
            Source::Files(args.config_dirs)
        };
        let options = DiscoveryOptions {
            namespace: args.namespace,
            service_account: args.service_account,
            trust_domain: args.trust_domain,
            root_namespace: args.root_namespace,
            grpc: args.grpc,
            monitoring: args.monitoring,
            webhook: args.webhook,
            webhook_config: args.webhook_config,
            dns_names: args.dns_names,
            token_audiences: vec![args.token_audience],
            workload_cert_ttl: Some(args.workload_cert_ttl.as_std()),
            inject: args.inject.then(|| mesh_proxy::inject::InjectOptions {
                image: args.proxy_image,
                image_pull_policy: args.proxy_image_pull_policy,
                revision: args.revision,
                ..mesh_proxy::inject::InjectOptions::default()
            }),
            native_sidecars: match args.native_sidecars.as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            injector_config: args.injector_config,
            ..DiscoveryOptions::new(source, args.ca_dir)
        };
        let discovery = match Discovery::start(options).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("mesh-proxy: {e}");
                return ExitCode::FAILURE;
            }
        };
        for name in ["grpc", "monitoring", "webhook"] {
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
