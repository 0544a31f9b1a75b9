//! Fuzzes the B3 (single and multi-header) and W3C trace-context parsers with arbitrary
//! header values: never panics, and the context of the next hop, written in each format
//! alone, reads back as the same trace, span and sampling decision.
//!
//! `fuzz/run 60 trace_context`

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_telemetry::trace::{Formats, Sampler, extract, inject, next_hop};
use rand::SeedableRng;

const NAMES: [&str; 9] = [
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "traceparent",
    "tracestate",
    "x-request-id",
];

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(u8, Vec<u8>)>,
    seed: u64,
    percent: u8,
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        let name = HeaderName::from_static(NAMES[usize::from(*name) % NAMES.len()]);
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(name, value);
        }
    }
    let incoming = extract(&headers);
    let sampler = Sampler::percent(f64::from(input.percent % 101));
    let mut rng = rand::rngs::StdRng::seed_from_u64(input.seed);
    let hop = next_hop(incoming, &sampler, &mut rng);
    for formats in [
        Formats { b3_multi: true, b3_single: false, w3c: false },
        Formats { b3_multi: false, b3_single: true, w3c: false },
        Formats { b3_multi: false, b3_single: false, w3c: true },
    ] {
        let mut out = HeaderMap::new();
        inject(&hop, formats, &mut out);
        let back = extract(&out);
        let (trace_id, _, span_id) = back.ids.expect("an injected context reads back");
        assert_eq!(trace_id, hop.trace_id, "{formats:?}");
        assert_eq!(span_id, hop.span_id, "{formats:?}");
        assert_eq!(back.sampled.unwrap_or(false) || back.debug, hop.sampled, "{formats:?}");
    }
});
