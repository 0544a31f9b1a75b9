//! Slow start on a paused clock: a new endpoint's share of ROUND_ROBIN and
//! LEAST_REQUEST picks follows Envoy's ramp (chi-square against the expected shares at
//! points in the window), and the other policies ignore it.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use mesh_core::{BoxError, Endpoint, UpstreamHost};
use mesh_resilience::{Balance, ConsistentHash, HashKey, LbConfig, LbPolicy, SlowStart};
use tower::util::BoxCloneSyncService;
use tower::{ServiceExt, service_fn};

type Svc = BoxCloneSyncService<http::Request<()>, http::Response<Full<Bytes>>, BoxError>;

/// Chi-square bound for 3 degrees of freedom (four endpoints) at p = 0.001.
const CHI2_3DF: f64 = 16.27;
const WINDOW: Duration = Duration::from_secs(60);

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8], 8080))
}

fn endpoints(n: usize) -> Vec<Endpoint> {
    (1..=n).map(|i| Endpoint::new(addr(i))).collect()
}

fn balancer(policy: LbPolicy, slow_start: SlowStart) -> Balance<Svc> {
    let config = LbConfig::from(policy).with_slow_start(slow_start);
    Balance::new(config, None, |_ep: &Endpoint| {
        Svc::new(service_fn(|_req: http::Request<()>| {
            std::future::ready(Ok(http::Response::new(Full::new(Bytes::from_static(
                b"ok",
            )))))
        }))
    })
    .with_rng_seed(3)
}

/// Where `n` requests go; each response is dropped at once (nothing stays in flight).
async fn picks(b: &Balance<Svc>, n: usize) -> HashMap<SocketAddr, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let res = b.clone().oneshot(http::Request::new(())).await.unwrap();
        *counts
            .entry(res.extensions().get::<UpstreamHost>().unwrap().0)
            .or_default() += 1;
    }
    counts
}

/// Chi-square of `counts` against `weights` (normalized to shares).
fn chi_square(counts: &HashMap<SocketAddr, usize>, weights: &[(SocketAddr, f64)]) -> f64 {
    let n: usize = counts.values().sum();
    let total: f64 = weights.iter().map(|w| w.1).sum();
    weights
        .iter()
        .map(|(a, w)| {
            let expected = n as f64 * w / total;
            let seen = counts.get(a).copied().unwrap_or(0) as f64;
            (seen - expected).powi(2) / expected
        })
        .sum()
}

/// Three warm endpoints, then a fourth joins: at 0, 15, 30 and 45 s into its window its
/// share follows `slow_start`'s weight; after the window all four are even.
async fn new_endpoint_ramps_up(policy: LbPolicy, slow_start: SlowStart) {
    let b = balancer(policy.clone(), slow_start);
    b.update(endpoints(3));
    tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
    let even = [1.0; 4].iter().enumerate().map(|(i, w)| (addr(i + 1), *w));
    let warm = picks(&b, 3000).await;
    let chi2 = chi_square(&warm, &even.clone().take(3).collect::<Vec<_>>());
    assert!(chi2 < CHI2_3DF, "{policy:?} warm: {chi2} {warm:?}");

    b.update(endpoints(4));
    let joined = tokio::time::Instant::now();
    for at in [0, 15, 30, 45] {
        tokio::time::advance(joined + Duration::from_secs(at) - tokio::time::Instant::now()).await;
        let weight = slow_start.weight_at(Duration::from_secs(at));
        let weights = [
            (addr(1), 1.0),
            (addr(2), 1.0),
            (addr(3), 1.0),
            (addr(4), weight),
        ];
        let counts = picks(&b, 4000).await;
        let chi2 = chi_square(&counts, &weights);
        assert!(
            chi2 < CHI2_3DF,
            "{policy:?} at {at} s (weight {weight}): chi-square {chi2}, {counts:?}"
        );
    }
    tokio::time::advance(joined + WINDOW - tokio::time::Instant::now()).await;
    let after = picks(&b, 4000).await;
    let chi2 = chi_square(&after, &even.collect::<Vec<_>>());
    assert!(
        chi2 < CHI2_3DF,
        "{policy:?} after the window: {chi2} {after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn round_robin_ramps_a_new_endpoint_linearly_from_ten_percent() {
    new_endpoint_ramps_up(LbPolicy::RoundRobin, SlowStart::new(WINDOW)).await;
}

#[tokio::test(start_paused = true)]
async fn least_request_ramps_a_new_endpoint_linearly_from_ten_percent() {
    new_endpoint_ramps_up(LbPolicy::LeastRequest, SlowStart::new(WINDOW)).await;
}

#[tokio::test(start_paused = true)]
async fn aggression_and_minimum_percent_shape_the_ramp() {
    let slow = SlowStart {
        window: WINDOW,
        minimum_percent: 30.0,
        aggression: 2.0,
    };
    // sqrt(15/60) = 0.5; at 0 s the minimum 0.3 holds.
    assert!((slow.weight_at(Duration::from_secs(15)) - 0.5).abs() < 1e-12);
    assert_eq!(slow.weight_at(Duration::ZERO), 0.3);
    new_endpoint_ramps_up(LbPolicy::RoundRobin, slow).await;
    new_endpoint_ramps_up(LbPolicy::LeastRequest, slow).await;
}

#[tokio::test(start_paused = true)]
async fn least_request_weighs_a_ramping_set_by_requests_in_flight() {
    let b = balancer(LbPolicy::LeastRequest, SlowStart::new(WINDOW));
    b.update(endpoints(3));
    tokio::time::advance(WINDOW).await;
    b.update(endpoints(4));
    tokio::time::advance(Duration::from_secs(30)).await;
    // Keep three responses of endpoint 1 open: its weight is 1 / (3 + 1).
    let mut held = Vec::new();
    while held.len() < 3 {
        let res = b.clone().oneshot(http::Request::new(())).await.unwrap();
        if res.extensions().get::<UpstreamHost>().unwrap().0 == addr(1) {
            held.push(res);
        }
    }
    assert_eq!(b.in_flight(addr(1)), 3);
    let counts = picks(&b, 4000).await;
    let weights = [
        (addr(1), 0.25),
        (addr(2), 1.0),
        (addr(3), 1.0),
        (addr(4), 0.5),
    ];
    let chi2 = chi_square(&counts, &weights);
    assert!(chi2 < CHI2_3DF, "chi-square {chi2}, {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn endpoints_that_start_together_share_evenly_and_keep_their_start_across_updates() {
    let b = balancer(LbPolicy::RoundRobin, SlowStart::new(WINDOW));
    b.update(endpoints(4));
    tokio::time::advance(Duration::from_secs(10)).await;
    let even: Vec<_> = (1..=4).map(|i| (addr(i), 1.0)).collect();
    let counts = picks(&b, 4000).await;
    assert!(chi_square(&counts, &even) < CHI2_3DF, "{counts:?}");

    tokio::time::advance(WINDOW).await;
    b.update(endpoints(3));
    b.update(endpoints(4));
    tokio::time::advance(Duration::from_secs(30)).await;
    // Endpoint 4 left and came back: a new start. A relabelled endpoint keeps its own.
    let relabelled =
        Endpoint::new(addr(4)).with_labels([("version".to_owned(), "v2".to_owned())].into());
    b.update(endpoints(3).into_iter().chain([relabelled]));
    let weights = [
        (addr(1), 1.0),
        (addr(2), 1.0),
        (addr(3), 1.0),
        (addr(4), 0.5),
    ];
    let counts = picks(&b, 4000).await;
    let chi2 = chi_square(&counts, &weights);
    assert!(chi2 < CHI2_3DF, "chi-square {chi2}, {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn random_and_consistent_hash_ignore_slow_start() {
    let hash = LbPolicy::ConsistentHash(ConsistentHash::new(HashKey::SourceIp));
    for policy in [LbPolicy::Random, hash] {
        let b = balancer(policy.clone(), SlowStart::new(WINDOW));
        assert_eq!(b.slow_start(), None, "{policy:?}");
    }
    let b = balancer(LbPolicy::Random, SlowStart::new(WINDOW));
    b.update(endpoints(3));
    tokio::time::advance(WINDOW).await;
    b.update(endpoints(4));
    let counts = picks(&b, 4000).await;
    let even: Vec<_> = (1..=4).map(|i| (addr(i), 1.0)).collect();
    assert!(chi_square(&counts, &even) < CHI2_3DF, "{counts:?}");
    // A zero window is no slow start.
    let off = balancer(LbPolicy::RoundRobin, SlowStart::new(Duration::ZERO));
    assert_eq!(off.slow_start(), None);
}
