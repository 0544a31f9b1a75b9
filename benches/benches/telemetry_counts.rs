//! mesh-telemetry: allocation counts and a fixed workload for instruction counting.
//!
//! `cargo bench -p benches --bench telemetry_counts -- OP N` runs `OP` `N` times and
//! prints the allocations per run (counted by a global allocator on this thread).
//! Under `valgrind --tool=callgrind`, the difference between the instruction totals of
//! two values of `N` divided by their difference is the instruction count of one run,
//! independent of machine load. `OP` `list` prints the operations.

use std::hint::black_box;

use http::{HeaderMap, HeaderValue};
use mesh_core::{ConnectionSecurity, Identity, ResponseFlags};
use mesh_telemetry::trace::{Formats, Propagator};
use mesh_telemetry::{DestinationService, MetricsRegistry, Reporter, RequestFacts, Workload};
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_static(v));
    }
    h
}

fn case(name: &str) -> Option<HeaderMap> {
    let common = [("host", "reviews:9080"), ("user-agent", "curl/8.5.0")];
    let mut h = match name {
        "b3_multi" => headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]),
        "b3_multi_only_b3_out" => headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]),
        "b3_single" => headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]),
        "w3c" => headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]),
        "none" => HeaderMap::new(),
        _ => return None,
    };
    for (k, v) in common {
        h.insert(k, HeaderValue::from_static(v));
    }
    Some(h)
}

const OPS: &[&str] = &[
    "record_outbound",
    "record_inbound",
    "extract_b3_multi",
    "propagate_b3_multi",
    "propagate_b3_multi_only_b3_out",
    "propagate_b3_single",
    "propagate_w3c",
    "propagate_none",
    "clone_b3_multi",
    "clone_b3_multi_only_b3_out",
    "clone_b3_single",
    "clone_w3c",
    "clone_none",
];

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let op = args.first().map(String::as_str).unwrap_or("list");
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    if !OPS.contains(&op) {
        println!("operations: {}", OPS.join(" "));
        return;
    }
    let reg = MetricsRegistry::new();
    let id = |s: &str| Identity::parse(s).expect("valid id");
    let local = Workload::new("productpage-v1", "default").with_version("v1");
    let peer = Workload::new("reviews-v2", "default")
        .with_version("v2")
        .with_principal(id("spiffe://cluster.local/ns/default/sa/bookinfo-reviews"));
    let svc = DestinationService::from_host("reviews.default.svc.cluster.local");
    let out = reg.istio().handle(Reporter::Source, &local, &peer, &svc);
    let inbound = reg
        .istio()
        .handle(Reporter::Destination, &local, &peer, &svc);
    let caller = id("spiffe://cluster.local/ns/frontend/sa/web");
    let in_facts = RequestFacts {
        response_code: 503,
        flags: ResponseFlags::UPSTREAM_OVERFLOW,
        security: ConnectionSecurity::MutualTls,
        peer: Some(&caller),
        ..RequestFacts::default()
    };
    let out_facts = RequestFacts::default();
    let default = Propagator::default();
    let b3_only = Propagator {
        formats: Formats {
            b3_multi: true,
            b3_single: false,
            w3c: false,
        },
        ..Propagator::default()
    };
    let mut rng = SmallRng::seed_from_u64(1);
    let kind = op.split_once('_').map_or(op, |(k, _)| k);
    let case_name = op
        .trim_start_matches("propagate_")
        .trim_start_matches("clone_")
        .trim_start_matches("extract_");
    let incoming = case(case_name);
    let p = if case_name == "b3_multi_only_b3_out" {
        b3_only
    } else {
        default
    };
    // Warm caches and series before counting.
    out.record(&out_facts, 1.0, 1, 1);
    inbound.record(&in_facts, 1.0, 1, 1);
    let info = allocation_counter::measure(|| {
        for _ in 0..n {
            match (kind, &incoming) {
                ("record", _) if op == "record_outbound" => {
                    out.record(black_box(&out_facts), black_box(12.5), 310, 820)
                }
                ("record", _) => inbound.record(black_box(&in_facts), black_box(12.5), 310, 820),
                ("extract", Some(h)) => {
                    black_box(mesh_telemetry::trace::extract(black_box(h)));
                }
                ("propagate", Some(h)) => {
                    let mut h = h.clone();
                    black_box(p.propagate(&mut h, &mut rng));
                    black_box(&h);
                }
                ("clone", Some(h)) => {
                    let h = h.clone();
                    black_box(&h);
                }
                _ => unreachable!("checked against OPS"),
            }
        }
    });
    println!(
        "{op}: {n} runs, {:.2} allocations per run, {:.1} bytes per run",
        info.count_total as f64 / n as f64,
        info.bytes_total as f64 / n as f64
    );
}
