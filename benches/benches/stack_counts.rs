//! Allocations per request of the embedded stacks of `stack.rs` ([`benches::stack`]).
//! Everything runs on one current-thread runtime, so the per-thread counting allocator
//! sees every allocation of a request (both stacks, the connection tasks, hyper, rustls).
//!
//! ```sh
//! cargo test -p benches --bench stack_counts --no-run   # prints the binary path
//! <binary> allocations [N]                               # allocations per request (N = 2000)
//! ```
//!
//! Run without arguments (`cargo test --benches`) it sends a few requests through each
//! scenario and checks the answers, without counting.

use std::time::Duration;

use benches::stack::{SCENARIOS, request, start};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (rt, w) = start();
    if args.first().map(String::as_str) == Some("allocations") {
        let n: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(2000);
        println!(
            "{:<18} {:>12} {:>12}   ({n} requests)",
            "scenario", "allocations", "bytes"
        );
        for name in SCENARIOS {
            // Warm-up: connections, pools and metric series in place.
            rt.block_on(async {
                for _ in 0..200 {
                    request(&w, name).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
            let info = allocation_counter::measure(|| {
                rt.block_on(async {
                    for _ in 0..n {
                        request(&w, name).await;
                    }
                });
            });
            println!(
                "{name:<18} {:>12.2} {:>12.1}",
                info.count_total as f64 / n as f64,
                info.bytes_total as f64 / n as f64
            );
        }
    } else {
        rt.block_on(async {
            for name in SCENARIOS {
                request(&w, name).await;
            }
        });
        println!("stack_counts: inbound and outbound_inbound answered 200");
    }
    w.shutdown();
}
