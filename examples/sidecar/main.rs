//! `sidecar`: the article's scenario live on loopback, from one command.
//!
//! `cargo run --release -p examples --bin sidecar -- [--short] [--keep-running]`
//!
//! Starts a CA, order-service v1 and v2, payment-service (two replicas), web-frontend, a
//! sidecar for each and an ingress gateway with TLS, configured from the Istio YAML in
//! `examples/sidecar/config/`, then walks through STRICT mTLS, authorization, the canary
//! and its progressive rollout, resilience, observability and certificate rotation,
//! printing what happened at each step and a summary. Exits 0 when every expectation
//! held, 1 otherwise.

use std::process::ExitCode;

use examples::demo::{Options, run};

#[tokio::main]
async fn main() -> ExitCode {
    let mut options = Options::full();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--short" => {
                options = Options {
                    keep_running: options.keep_running,
                    ..Options::short()
                }
            }
            "--keep-running" => options.keep_running = true,
            _ => {
                eprintln!("usage: sidecar [--short] [--keep-running]");
                return ExitCode::from(2);
            }
        }
    }
    match run(options).await {
        Ok(checks) => {
            let failed = checks.iter().filter(|(_, c)| !c.ok).count();
            if failed == 0 {
                println!("\nAll {} expectations held.", checks.len());
                ExitCode::SUCCESS
            } else {
                println!("\n{failed} of {} expectations failed.", checks.len());
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sidecar demo: {e}");
            ExitCode::FAILURE
        }
    }
}
