use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use mesh_core::error::{ConnectFailure, DeadlineExceeded, NoHealthyUpstream, PerTryTimeout};
use mesh_core::{BoxBody, BoxError, Endpoint, UpstreamHost, find_cause, is_caused_by};
use tokio::time::Instant;
use tower::{ServiceExt, service_fn};

use super::*;
use crate::deadline::{AttemptDeadline, RequestDeadline};
use crate::outlier::OutlierConfig;

/// Statuses each endpoint answers with (default 200), shared with the test.
type Script = Arc<Mutex<HashMap<SocketAddr, u16>>>;

type EpSvc = tower::util::BoxCloneSyncService<http::Request<()>, http::Response<BoxBody>, BoxError>;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8], 80))
}

fn endpoints(n: usize) -> Vec<Endpoint> {
    (1..=n).map(|i| Endpoint::new(addr(i))).collect()
}

fn scripted(
    lb: LbPolicy,
    outlier: Option<OutlierConfig>,
) -> (Balance<EpSvc>, Script, Arc<Mutex<usize>>) {
    let script: Script = Arc::default();
    let made = Arc::new(Mutex::new(0));
    let (s, m) = (script.clone(), made.clone());
    let balance = Balance::new(lb, outlier, move |ep: &Endpoint| {
        *m.lock().unwrap() += 1;
        let address = ep.address;
        let s = s.clone();
        EpSvc::new(service_fn(move |_req: http::Request<()>| {
            let status = s.lock().unwrap().get(&address).copied().unwrap_or(200);
            async move {
                if status == 0 {
                    return Err(Box::new(ConnectFailure::bare()) as BoxError);
                }
                Ok(http::Response::builder()
                    .status(status)
                    .body(mesh_core::body::full(address.to_string()))
                    .unwrap())
            }
        }))
    })
    .with_rng_seed(5);
    (balance, script, made)
}

async fn hit(b: &Balance<EpSvc>) -> Result<SocketAddr, BoxError> {
    let res = b.clone().oneshot(http::Request::new(())).await?;
    Ok(res.extensions().get::<UpstreamHost>().unwrap().0)
}

fn eject_all_allowed() -> OutlierConfig {
    OutlierConfig {
        max_ejection_percent: 100,
        ..OutlierConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn no_endpoint_means_no_healthy_upstream() {
    let (b, _, _) = scripted(LbPolicy::LeastRequest, None);
    let err = hit(&b).await.unwrap_err();
    assert!(is_caused_by::<NoHealthyUpstream>(err.as_ref()));
    assert_eq!(err.to_string(), "no healthy upstream");
}

#[tokio::test(start_paused = true)]
async fn ejected_endpoints_are_skipped_then_return_after_the_ejection_time() {
    let (b, script, _) = scripted(LbPolicy::RoundRobin, Some(eject_all_allowed()));
    b.update(endpoints(3));
    script.lock().unwrap().insert(addr(2), 503);
    // Round robin sends every third request to endpoint 2; its 5th 503 ejects it.
    for _ in 0..15 {
        hit(&b).await.unwrap();
    }
    assert!(b.is_ejected(addr(2)));
    script.lock().unwrap().clear();
    for _ in 0..30 {
        assert_ne!(hit(&b).await.unwrap(), addr(2));
    }
    // Ejected for 30 s; back at the first sweep after that.
    tokio::time::advance(Duration::from_secs(40)).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(hit(&b).await.unwrap());
    }
    assert!(seen.contains(&addr(2)), "{seen:?}");
    assert!(!b.is_ejected(addr(2)));
}

#[tokio::test(start_paused = true)]
async fn all_ejected_without_panic_is_no_healthy_upstream() {
    let (b, script, _) = scripted(LbPolicy::LeastRequest, Some(eject_all_allowed()));
    b.update(endpoints(2));
    script
        .lock()
        .unwrap()
        .extend([(addr(1), 503), (addr(2), 503)]);
    for _ in 0..10 {
        let _ = hit(&b).await;
    }
    assert_eq!(b.detector().unwrap().ejected_count(), 2);
    let err = hit(&b).await.unwrap_err();
    assert!(is_caused_by::<NoHealthyUpstream>(err.as_ref()));
}

#[tokio::test(start_paused = true)]
async fn panic_mode_balances_across_ejected_endpoints() {
    let cfg = OutlierConfig {
        min_health_percent: 60,
        ..eject_all_allowed()
    };
    let (b, script, _) = scripted(LbPolicy::RoundRobin, Some(cfg));
    b.update(endpoints(2));
    script.lock().unwrap().insert(addr(1), 503);
    for _ in 0..10 {
        let _ = hit(&b).await;
    }
    assert!(b.is_ejected(addr(1)));
    // 1 of 2 healthy = 50 % < 60 %: panic, both endpoints get traffic.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(hit(&b).await.unwrap());
    }
    assert!(
        seen.contains(&addr(1)) && seen.contains(&addr(2)),
        "{seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn updates_keep_the_state_of_endpoints_that_stay() {
    let (b, script, made) = scripted(LbPolicy::RoundRobin, Some(eject_all_allowed()));
    b.update(endpoints(2));
    script.lock().unwrap().insert(addr(1), 503);
    for _ in 0..10 {
        let _ = hit(&b).await;
    }
    assert!(b.is_ejected(addr(1)));
    assert_eq!(*made.lock().unwrap(), 2);
    // Add 3, remove 2: endpoint 1 stays ejected with its service; only 3 is new.
    b.update([Endpoint::new(addr(1)), Endpoint::new(addr(3))]);
    assert_eq!(*made.lock().unwrap(), 3);
    assert!(b.is_ejected(addr(1)));
    let d = b.detector().unwrap();
    assert_eq!((d.host_count(), d.ejected_count()), (2, 1));
    for _ in 0..10 {
        assert_eq!(hit(&b).await.unwrap(), addr(3));
    }
    // Changed labels: a new service, same outlier state.
    let relabeled =
        Endpoint::new(addr(1)).with_labels([("version".to_owned(), "v2".to_owned())].into());
    b.update([relabeled, Endpoint::new(addr(3))]);
    assert_eq!(*made.lock().unwrap(), 4);
    assert!(b.is_ejected(addr(1)));
}

#[tokio::test(start_paused = true)]
async fn in_flight_counts_last_until_the_response_body_ends() {
    let (b, _, _) = scripted(LbPolicy::LeastRequest, None);
    b.update(endpoints(1));
    let res = b.clone().oneshot(http::Request::new(())).await.unwrap();
    assert_eq!(b.in_flight(addr(1)), 1, "headers arrived, body not read");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"10.0.0.1:80");
    assert_eq!(b.in_flight(addr(1)), 0);
}

#[tokio::test(start_paused = true)]
async fn least_request_prefers_idle_endpoints() {
    let (b, _, _) = scripted(LbPolicy::LeastRequest, None);
    b.update(endpoints(2));
    // Hold 3 responses open on whichever endpoints they land, then check the next picks.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(b.clone().oneshot(http::Request::new(())).await.unwrap());
    }
    let busy = |a| b.in_flight(a);
    let idle = if busy(addr(1)) < busy(addr(2)) {
        addr(1)
    } else {
        addr(2)
    };
    assert_ne!(busy(addr(1)), busy(addr(2)));
    // With two endpoints P2C compares both: the less loaded one always wins.
    for _ in 0..5 {
        assert_eq!(hit(&b).await.unwrap(), idle);
    }
}

#[tokio::test(start_paused = true)]
async fn random_spreads_evenly_chi_square() {
    let (b, _, _) = scripted(LbPolicy::Random, None);
    b.update(endpoints(4));
    let mut counts: HashMap<SocketAddr, f64> = HashMap::new();
    let n = 4000.0;
    for _ in 0..4000 {
        *counts.entry(hit(&b).await.unwrap()).or_default() += 1.0;
    }
    let expected = n / 4.0;
    let chi2: f64 = counts
        .values()
        .map(|c| (c - expected).powi(2) / expected)
        .sum();
    // 3 degrees of freedom, p = 0.001.
    assert!(chi2 < 16.27, "chi-square {chi2}, counts {counts:?}");
    assert_eq!(counts.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn previous_hosts_are_avoided_only_while_another_exists() {
    let (b, _, _) = scripted(LbPolicy::LeastRequest, None);
    b.update(endpoints(2));
    for _ in 0..20 {
        let mut req = http::Request::new(());
        req.extensions_mut().insert(PreviousHosts(vec![addr(1)]));
        let res = b.clone().oneshot(req).await.unwrap();
        assert_eq!(res.extensions().get::<UpstreamHost>().unwrap().0, addr(2));
    }
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(PreviousHosts(vec![addr(1), addr(2)]));
    assert!(
        b.clone().oneshot(req).await.is_ok(),
        "all tried: pick anyway"
    );
}

#[tokio::test(start_paused = true)]
async fn endpoint_errors_carry_the_address_and_count_for_outlier_detection() {
    let cfg = OutlierConfig {
        consecutive_5xx_errors: 2,
        ..eject_all_allowed()
    };
    let (b, script, _) = scripted(LbPolicy::LeastRequest, Some(cfg));
    b.update(endpoints(1));
    script.lock().unwrap().insert(addr(1), 0);
    let err = hit(&b).await.unwrap_err();
    assert_eq!(
        find_cause::<EndpointFailed>(err.as_ref())
            .unwrap()
            .address(),
        addr(1)
    );
    assert!(is_caused_by::<ConnectFailure>(err.as_ref()));
    assert_eq!(err.to_string(), ConnectFailure::bare().to_string());
    let _ = hit(&b).await;
    assert!(b.is_ejected(addr(1)), "two connect failures in a row");
}

#[tokio::test(start_paused = true)]
async fn attempt_deadline_times_out_the_endpoint_and_charges_it() {
    let cfg = OutlierConfig {
        consecutive_5xx_errors: 1,
        ..eject_all_allowed()
    };
    let b = Balance::new(LbPolicy::LeastRequest, Some(cfg), |_ep: &Endpoint| {
        service_fn(|_req: http::Request<()>| {
            std::future::pending::<Result<http::Response<BoxBody>, BoxError>>()
        })
    });
    b.update(endpoints(1));
    let start = Instant::now();
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(AttemptDeadline(start + Duration::from_secs(1)));
    req.extensions_mut().insert(RequestDeadline {
        at: start + Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    });
    let err = b.clone().oneshot(req).await.unwrap_err();
    assert!(is_caused_by::<PerTryTimeout>(err.as_ref()));
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert!(
        b.is_ejected(addr(1)),
        "a timeout is a local-origin failure of the endpoint"
    );
    assert_eq!(b.in_flight(addr(1)), 0);

    let b2 = Balance::new(LbPolicy::LeastRequest, None, |_ep: &Endpoint| {
        service_fn(|_req: http::Request<()>| {
            std::future::pending::<Result<http::Response<BoxBody>, BoxError>>()
        })
    });
    b2.update(endpoints(1));
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(RequestDeadline::after(Duration::from_secs(2)));
    let err = b2.oneshot(req).await.unwrap_err();
    assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
}

#[tokio::test(start_paused = true)]
async fn the_picked_endpoints_readiness_is_awaited() {
    use tower_test::mock;
    let (inner, mut handle) = mock::pair::<http::Request<()>, http::Response<BoxBody>>();
    let b = Balance::new(LbPolicy::LeastRequest, None, move |_ep: &Endpoint| {
        inner.clone()
    });
    b.update(endpoints(1));
    handle.allow(0);
    let mut fut = tokio_test::task::spawn(b.clone().oneshot(http::Request::new(())));
    tokio_test::assert_pending!(fut.poll());
    tokio_test::assert_pending!(fut.poll());
    handle.allow(1);
    assert!(fut.is_woken(), "readiness wakes the request");
    tokio_test::assert_pending!(fut.poll());
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(http::Response::new(mesh_core::body::empty()));
    let res = fut.await.unwrap();
    assert_eq!(
        res.extensions().get::<UpstreamHost>(),
        Some(&UpstreamHost(addr(1)))
    );
}

#[tokio::test(start_paused = true)]
async fn ten_endpoints_with_default_cap_eject_exactly_one() {
    let (b, script, _) = scripted(LbPolicy::RoundRobin, Some(OutlierConfig::default()));
    b.update(endpoints(10));
    script
        .lock()
        .unwrap()
        .extend((1..=10).map(|i| (addr(i), 503)));
    for _ in 0..100 {
        let _ = hit(&b).await;
    }
    assert_eq!(b.detector().unwrap().ejected_count(), 1);
    let (b, script, _) = scripted(
        LbPolicy::RoundRobin,
        Some(OutlierConfig {
            max_ejection_percent: 50,
            ..OutlierConfig::default()
        }),
    );
    b.update(endpoints(3));
    script
        .lock()
        .unwrap()
        .extend((1..=3).map(|i| (addr(i), 503)));
    for _ in 0..30 {
        let _ = hit(&b).await;
    }
    assert_eq!(
        b.detector().unwrap().ejected_count(),
        1,
        "50 % of 3 hosts is 1"
    );
}

#[tokio::test(start_paused = true)]
async fn least_request_with_equal_loads_is_uniform_chi_square() {
    let (b, _, _) = scripted(LbPolicy::LeastRequest, None);
    b.update(endpoints(4));
    let mut counts: HashMap<SocketAddr, f64> = HashMap::new();
    for _ in 0..4000 {
        *counts.entry(hit(&b).await.unwrap()).or_default() += 1.0;
    }
    let expected = 1000.0;
    let chi2: f64 = counts
        .values()
        .map(|c| (c - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 16.27, "chi-square {chi2}, counts {counts:?}");
}

#[tokio::test(start_paused = true)]
async fn round_robin_stays_even_over_the_endpoints_left_after_an_ejection() {
    let (b, script, _) = scripted(LbPolicy::RoundRobin, Some(eject_all_allowed()));
    b.update(endpoints(4));
    script.lock().unwrap().insert(addr(1), 503);
    while !b.is_ejected(addr(1)) {
        let _ = hit(&b).await;
    }
    script.lock().unwrap().clear();
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for _ in 0..30 {
        *counts.entry(hit(&b).await.unwrap()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|&c| c == 10), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_pick_meeting_an_ejected_endpoint_replays_due_sweeps_first() {
    let (mut b, script, _) = scripted(LbPolicy::LeastRequest, Some(eject_all_allowed()));
    b.update(endpoints(2));
    script.lock().unwrap().insert(addr(2), 503);
    while b.detector().unwrap().ejected_count() != 1 {
        let _ = hit(&b).await;
    }
    let ejected_at = Instant::now();
    script.lock().unwrap().clear();
    // Both endpoints are looked at by every pick among two, so every pick catches up.
    tokio::time::advance(Duration::from_secs(29)).await;
    for _ in 0..20 {
        assert_eq!(b.choose(None), Some(addr(1)));
    }
    // Back at the first sweep after the 30 s ejection time, on the very first pick.
    tokio::time::advance(Duration::from_secs(40) - (Instant::now() - ejected_at)).await;
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(b.choose(None).unwrap());
    }
    assert!(seen.contains(&addr(2)), "{seen:?}");
    assert!(!b.is_ejected(addr(2)));
}

#[tokio::test(start_paused = true)]
async fn picks_that_meet_no_ejected_endpoint_leave_sweeps_pending_without_changing_picks() {
    // Two balancers with the same seed over the same 100 endpoints and the same ejected
    // one: one replays the due sweep before every pick (as a timer would), the other
    // lazily. Their picks must be identical, before and after the ejection time.
    let cfg = OutlierConfig {
        max_ejection_percent: 10,
        ..OutlierConfig::default()
    };
    let make = || {
        let (mut b, script, _) = scripted(LbPolicy::LeastRequest, Some(cfg.clone()));
        b = b.with_rng_seed(11);
        b.update(endpoints(100));
        script.lock().unwrap().insert(addr(7), 503);
        (b, script)
    };
    let (mut lazy, s1) = make();
    let (mut eager, s2) = make();
    for b in [&lazy, &eager] {
        let d = b.detector().unwrap();
        for _ in 0..5 {
            d.record(
                &b.shared.set.load()[6].health.clone().unwrap(),
                &mesh_core::Outcome::Response {
                    status: 503,
                    grpc_status: None,
                },
            );
        }
        assert_eq!(d.ejected_count(), 1);
    }
    s1.lock().unwrap().clear();
    s2.lock().unwrap().clear();
    let mut lazy_reads = 0;
    for step in 0..60 {
        tokio::time::advance(Duration::from_secs(1)).await;
        let d = eager.detector().unwrap().clone();
        d.sweep_if_due(Instant::now());
        for _ in 0..50 {
            assert_eq!(lazy.choose(None), eager.choose(None), "at {step} s");
        }
        if lazy.detector().unwrap().ejected_count() == 0 {
            lazy_reads += 1;
        }
    }
    // The ejection ended (at the sweep of t=30) for both.
    assert_eq!(eager.detector().unwrap().ejected_count(), 0);
    assert!(lazy_reads > 0);
    assert!(!lazy.is_ejected(addr(7)));
}
