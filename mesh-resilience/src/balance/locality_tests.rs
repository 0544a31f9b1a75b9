//! Locality balancing and endpoint weights through [`Balance`], with distributions
//! checked by chi-square at fixed seeds.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mesh_core::{BoxBody, BoxError, Endpoint, Locality, UpstreamHost};
use tower::{ServiceExt, service_fn};

use super::*;
use crate::outlier::OutlierConfig;

type Script = Arc<Mutex<HashMap<SocketAddr, u16>>>;
type EpSvc = tower::util::BoxCloneSyncService<http::Request<()>, http::Response<BoxBody>, BoxError>;

fn at(i: u8, locality: &str) -> Endpoint {
    Endpoint::new(SocketAddr::from(([10, 0, 0, i], 80))).with_locality(Locality::parse(locality))
}

fn balancer(config: LbConfig, outlier: Option<OutlierConfig>) -> (Balance<EpSvc>, Script) {
    let script: Script = Arc::default();
    let s = script.clone();
    let balance = Balance::new(config, outlier, move |ep: &Endpoint| {
        let address = ep.address;
        let s = s.clone();
        EpSvc::new(service_fn(move |_req: http::Request<()>| {
            let status = s.lock().unwrap().get(&address).copied().unwrap_or(200);
            async move {
                Ok(http::Response::builder()
                    .status(status)
                    .body(mesh_core::body::full(""))
                    .unwrap())
            }
        }))
    })
    .with_rng_seed(11);
    (balance, script)
}

fn origin(locality: &str) -> Origin {
    Origin {
        locality: Locality::parse(locality),
        ..Origin::default()
    }
}

fn eject_on_first_5xx() -> OutlierConfig {
    OutlierConfig {
        consecutive_5xx_errors: 1,
        max_ejection_percent: 100,
        ..OutlierConfig::default()
    }
}

async fn send(b: &Balance<EpSvc>, req: http::Request<()>) -> SocketAddr {
    let res = b.clone().oneshot(req).await.unwrap();
    res.extensions().get::<UpstreamHost>().unwrap().0
}

/// Requests per endpoint (the last octet) over `n` requests.
async fn counts(b: &Balance<EpSvc>, n: usize) -> BTreeMap<u8, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let SocketAddr::V4(a) = send(b, http::Request::new(())).await else {
            unreachable!()
        };
        *out.entry(a.ip().octets()[3]).or_default() += 1;
    }
    out
}

/// Pearson's chi-square of `observed` against the shares `expected` (summing to 1).
fn chi_square(observed: &[usize], expected: &[f64]) -> f64 {
    let n: usize = observed.iter().sum();
    observed
        .iter()
        .zip(expected)
        .map(|(&o, &p)| {
            let e = n as f64 * p;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

fn six_endpoints() -> Vec<Endpoint> {
    vec![
        at(1, "a/1"),
        at(2, "a/1"),
        at(3, "a/2"),
        at(4, "a/2"),
        at(5, "b/1"),
        at(6, "b/1"),
    ]
}

#[tokio::test(start_paused = true)]
async fn failover_stays_local_then_moves_zone_then_region() {
    let config = LbConfig::from(LbPolicy::RoundRobin).with_origin(origin("a/1"));
    let (b, script) = balancer(config, Some(eject_on_first_5xx()));
    b.update(six_endpoints());
    let c = counts(&b, 200).await;
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), [1, 2], "{c:?}");
    // The local zone fails: its endpoints are ejected, the next zone takes over.
    script.lock().unwrap().extend([
        (SocketAddr::from(([10, 0, 0, 1], 80)), 503),
        (SocketAddr::from(([10, 0, 0, 2], 80)), 503),
    ]);
    for _ in 0..4 {
        let _ = b.clone().oneshot(http::Request::new(())).await;
    }
    let c = counts(&b, 200).await;
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), [3, 4], "{c:?}");
    script.lock().unwrap().extend([
        (SocketAddr::from(([10, 0, 0, 3], 80)), 503),
        (SocketAddr::from(([10, 0, 0, 4], 80)), 503),
    ]);
    for _ in 0..4 {
        let _ = b.clone().oneshot(http::Request::new(())).await;
    }
    let c = counts(&b, 200).await;
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), [5, 6], "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn half_a_priority_down_spills_thirty_percent_chi_square() {
    // 10 local endpoints, 10 in the other zone; 5 local ones ejected: health 1.4 × 50 = 70.
    let mut eps: Vec<Endpoint> = (1..=10).map(|i| at(i, "a/1")).collect();
    eps.extend((11..=20).map(|i| at(i, "a/2")));
    let config = LbConfig::from(LbPolicy::Random).with_origin(origin("a/1"));
    let (b, script) = balancer(config, Some(eject_on_first_5xx()));
    b.update(eps);
    for i in 1..=5u8 {
        script
            .lock()
            .unwrap()
            .insert(SocketAddr::from(([10, 0, 0, i], 80)), 503);
    }
    while (1..=5u8).any(|i| !b.is_ejected(SocketAddr::from(([10, 0, 0, i], 80)))) {
        let _ = b.clone().oneshot(http::Request::new(())).await;
    }
    let c = counts(&b, 4000).await;
    let local: usize = c.range(1..=10).map(|(_, n)| n).sum();
    let remote: usize = c.range(11..=20).map(|(_, n)| n).sum();
    let chi2 = chi_square(&[local, remote], &[0.7, 0.3]);
    // df = 1, p = 0.001.
    assert!(
        chi2 < 10.83,
        "chi-square {chi2}: {local} local, {remote} remote"
    );
}

#[tokio::test(start_paused = true)]
async fn without_outlier_detection_localities_are_not_considered() {
    let config = LbConfig::from(LbPolicy::RoundRobin).with_origin(origin("a/1"));
    let (b, _) = balancer(config, None);
    b.update(six_endpoints());
    let c = counts(&b, 600).await;
    assert_eq!(c.values().copied().collect::<Vec<_>>(), [100; 6]);
}

#[tokio::test(start_paused = true)]
async fn distribute_splits_eighty_twenty_chi_square() {
    let locality = LocalityLb {
        distribute: vec![Distribute {
            from: "a/1/*".into(),
            to: BTreeMap::from([("a/1/*".into(), 80), ("b/*".into(), 20)]),
        }],
        ..LocalityLb::default()
    };
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::LeastRequest,
        LbPolicy::Random,
    ] {
        let config = LbConfig::from(policy.clone())
            .with_origin(origin("a/1"))
            .with_locality(locality.clone());
        let (b, _) = balancer(config, None);
        b.update(six_endpoints());
        let c = counts(&b, 4000).await;
        // a/2 gets nothing: no key names it.
        assert!(!c.contains_key(&3) && !c.contains_key(&4), "{c:?}");
        let local = c[&1] + c[&2];
        let remote = c[&5] + c[&6];
        let chi2 = chi_square(&[local, remote], &[0.8, 0.2]);
        assert!(chi2 < 10.83, "{policy:?}: chi-square {chi2}: {c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn endpoint_weights_split_three_to_one_chi_square() {
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::LeastRequest,
        LbPolicy::Random,
    ] {
        let (b, _) = balancer(LbConfig::from(policy.clone()), None);
        b.update([at(1, "").with_weight(3), at(2, "")]);
        let c = counts(&b, 4000).await;
        let chi2 = chi_square(&[c[&1], c[&2]], &[0.75, 0.25]);
        assert!(chi2 < 10.83, "{policy:?}: chi-square {chi2}: {c:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn retries_to_remote_localities_skip_the_tried_priority() {
    let config = LbConfig::from(LbPolicy::RoundRobin).with_origin(origin("a/1"));
    let (b, _) = balancer(config, Some(eject_on_first_5xx()));
    b.update(six_endpoints());
    let tried = SocketAddr::from(([10, 0, 0, 1], 80));
    for _ in 0..20 {
        // An ordinary retry stays in the local zone, on the other endpoint.
        let mut req = http::Request::new(());
        req.extensions_mut().insert(PreviousHosts(vec![tried]));
        assert_eq!(send(&b, req).await, SocketAddr::from(([10, 0, 0, 2], 80)));
        // With retryRemoteLocalities it goes to the next priority.
        let mut req = http::Request::new(());
        req.extensions_mut().insert(PreviousHosts(vec![tried]));
        req.extensions_mut().insert(RetryRemoteLocalities);
        let SocketAddr::V4(to) = send(&b, req).await else {
            unreachable!()
        };
        assert!([3, 4].contains(&to.ip().octets()[3]), "{to}");
    }
}

#[tokio::test(start_paused = true)]
async fn endpoints_of_another_network_are_left_out() {
    let mine = Origin {
        network: Some("net-1".into()),
        ..Origin::default()
    };
    let (b, _) = balancer(LbConfig::from(LbPolicy::RoundRobin).with_origin(mine), None);
    b.update([
        at(1, "").with_network("net-1"),
        at(2, "").with_network("net-2"),
        at(3, ""),
    ]);
    let c = counts(&b, 100).await;
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), [1, 3]);
}
