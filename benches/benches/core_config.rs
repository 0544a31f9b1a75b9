//! Cost of loading and validating Istio configuration (what a reload pays) and of the
//! snapshot lookups runtime tables are compiled from.

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::config::{LoadOptions, MeshConfig, load_str};
use std::hint::black_box;

const ALL_FIELDS_VS: &str =
    include_str!("../../mesh-core/tests/fixtures/all-fields/virtual-service.yaml");
const CANARY: &str =
    include_str!("../../mesh-core/tests/fixtures/article/canary-order-service.yaml");
const BOOKINFO_DR: &str =
    include_str!("../../mesh-core/tests/fixtures/istio-samples/destination-rule-all.yaml");

fn load(c: &mut Criterion) {
    let options = LoadOptions::default();
    let mut g = c.benchmark_group("config_load_validate");
    for (name, text) in [
        ("virtual_service_all_fields", ALL_FIELDS_VS),
        ("article_canary_3_docs", CANARY),
        ("bookinfo_destination_rules_4_docs", BOOKINFO_DR),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| load_str("bench.yaml", black_box(text), &options))
        });
    }
    // A larger configuration: 200 VirtualService/DestinationRule pairs in one file.
    let big: String = (0..200)
        .map(|i| {
            CANARY
                .split("---")
                .skip(1)
                .collect::<Vec<_>>()
                .join("---")
                .replace("order-service", &format!("svc-{i}"))
                + "\n---\n"
        })
        .collect();
    g.bench_function("400_resources_one_file", |b| {
        b.iter(|| load_str("big.yaml", black_box(&big), &options))
    });
    g.finish();

    let (config, _) = MeshConfig::from_yaml_str("big.yaml", &big, &options).expect("valid");
    let mut g = c.benchmark_group("config_lookup");
    g.bench_function("destination_rule_for_400_resources", |b| {
        b.iter(|| {
            config.destination_rule_for(black_box("svc-117.default.svc.cluster.local"), "default")
        })
    });
    g.bench_function("virtual_services_for_host_400_resources", |b| {
        b.iter(|| config.virtual_services_for_host(black_box("svc-117.default.svc.cluster.local")))
    });
    g.finish();
}

criterion_group!(benches, load);
criterion_main!(benches);
