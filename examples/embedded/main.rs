//! `embedded`: the mesh without a sidecar. order-service calls payment-service with
//! mTLS identities, AuthorizationPolicy, retries with a deadline, outlier detection,
//! weighted subsets and Istio metrics, all as layers inside the two processes' code,
//! configured from the Istio YAML in `examples/embedded/config/`.
//!
//! `cargo run -p examples --bin embedded -- [--requests N]` (default 200); exits 0 when
//! every check held.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut requests = 200;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|n| n.parse().ok())) {
            ("--requests", Some(n)) => requests = n,
            _ => {
                eprintln!("usage: embedded [--requests N]");
                return ExitCode::from(2);
            }
        }
    }
    match examples::embedded::run(requests).await {
        Ok(checks) if checks.iter().all(|c| c.ok) => {
            println!("all {} checks passed", checks.len());
            ExitCode::SUCCESS
        }
        Ok(checks) => {
            let failed = checks.iter().filter(|c| !c.ok).count();
            println!("{failed} of {} checks failed", checks.len());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("embedded: {e}");
            ExitCode::FAILURE
        }
    }
}
