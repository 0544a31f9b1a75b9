//! mesh-proxy's stacks embedded in-process ([`mesh_proxy::Mesh`]) around a no-op
//! application: what one request costs in the library itself, without listeners for
//! the application or a client process. The scenarios are in [`benches::stack`]:
//! `stack/inbound` (payment-service's inbound stack called directly) and
//! `stack/outbound_inbound` (order-service's outbound stack → mTLS over h2 on loopback →
//! payment-service's inbound listener).
//!
//! ```sh
//! cargo bench -p benches --bench stack                          # criterion
//! cargo bench -p benches --bench stack --no-run                 # prints the binary path
//! # instructions per request: (Ir at N + 1000 - Ir at N) / 1000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null <binary> requests inbound N
//! ```
//!
//! The allocations per request are counted by `stack_counts`, a separate binary: its
//! counting global allocator would otherwise be part of every timed request here.
//! Run by `cargo test --benches`, this sends a few requests through each and checks them.

use std::time::Duration;

use benches::stack::{SCENARIOS, request, start};
use criterion::Criterion;

fn main() {
    // `cargo bench` adds `--bench`; `cargo test` runs the binary without it.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (rt, w) = start();
    if args.first().map(String::as_str) == Some("requests") {
        let name = args.get(1).map_or("inbound", String::as_str);
        let n: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1000);
        rt.block_on(async {
            for _ in 0..n {
                request(&w, name).await;
            }
        });
    } else if args.iter().any(|a| a == "--bench") {
        let mut c = Criterion::default().configure_from_args();
        let mut g = c.benchmark_group("stack");
        g.measurement_time(Duration::from_secs(3));
        for name in SCENARIOS {
            g.bench_function(name, |b| b.to_async(&rt).iter(|| request(&w, name)));
        }
        g.finish();
        c.final_summary();
    } else {
        rt.block_on(async {
            for _ in 0..3 {
                for name in SCENARIOS {
                    request(&w, name).await;
                }
            }
        });
        println!("stack: inbound and outbound_inbound answered 200");
    }
    w.shutdown();
}
