//! `mesh-proxy inject`: the sidecar injected into manifests, as `istioctl kube-inject`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use mesh_proxy::inject::{InjectOptions, inject_manifests};

/// Inject the sidecar into the pod templates of Kubernetes manifests.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The manifests (a multi-document YAML stream); `-` for standard input.
    #[arg(short = 'f', long = "filename")]
    filename: PathBuf,
    /// Where to write the result (default: standard output).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// The namespace of objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// The proxy's image.
    #[arg(long, default_value = concat!("mesh-proxy:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The pull policy of the proxy's image.
    #[arg(long)]
    image_pull_policy: Option<String>,
    /// The namespace `discovery` runs in.
    #[arg(long, default_value = "istio-system")]
    discovery_namespace: String,
    /// `discovery`'s service account.
    #[arg(long, default_value = "mesh-discovery")]
    discovery_service_account: String,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Inject the proxy as a native sidecar (an init container with `restartPolicy:
    /// Always`; Kubernetes 1.29 or later).
    #[arg(long)]
    native_sidecars: bool,
    /// The revision written in `sidecar.istio.io/status`.
    #[arg(long, default_value = "default")]
    revision: String,
}

/// Runs `inject`: 0 when every document was written, 1 with the error otherwise.
pub fn run(args: Args) -> ExitCode {
    let name = args.filename.display().to_string();
    let mut text = String::new();
    let read = if name == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(&args.filename).map(|t| text = t)
    };
    if let Err(e) = read {
        eprintln!("mesh-proxy: cannot read {name}: {e}");
        return ExitCode::FAILURE;
    }
    let options = InjectOptions {
        image: args.image,
        image_pull_policy: args.image_pull_policy,
        discovery_namespace: args.discovery_namespace,
        discovery_service_account: args.discovery_service_account,
        trust_domain: args.trust_domain,
        native_sidecars: args.native_sidecars,
        revision: args.revision,
        ..InjectOptions::default()
    };
    let (out, notes) = match inject_manifests(&name, &text, &args.namespace, &options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mesh-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    for note in notes {
        eprintln!("{note}");
    }
    let written = match &args.output {
        Some(path) => std::fs::write(path, out),
        None => std::io::stdout().lock().write_all(out.as_bytes()),
    };
    if let Err(e) = written {
        eprintln!("mesh-proxy: cannot write the result: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
