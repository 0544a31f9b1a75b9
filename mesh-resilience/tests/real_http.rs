//! The layers against real HTTP/1.1 upstreams on 127.0.0.1 with a real hyper client.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::BodyExt;
use mesh_core::error::{ConnectFailure, Overflow};
use mesh_core::{BoxBody, Endpoint, is_caused_by};
use mesh_resilience::{
    Balance, LbPolicy, OutlierConfig, PoolLimitLayer, PoolLimits, RetriesExhausted, RetryLayer,
    RetryPolicy,
};
use tower::{Layer, ServiceExt};

fn get() -> http::Request<BoxBody> {
    http::Request::builder()
        .uri("/status")
        .body(mesh_core::body::empty())
        .expect("request")
}

/// Waits (with a generous real-time bound) until `cond` holds.
async fn eventually(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !cond() {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("condition never held");
}

#[tokio::test]
async fn third_concurrent_request_overflows_over_real_http1() {
    let up = support::upstream(200, true).await;
    let balance = Balance::new(
        LbPolicy::LeastRequest,
        None,
        support::endpoint_service(support::client()),
    );
    balance.update([Endpoint::new(up.addr)]);
    let limits = PoolLimits {
        max_connections: 1,
        http1_max_pending_requests: 1,
        ..PoolLimits::default()
    };
    let pool = PoolLimitLayer::new(limits);
    let svc = pool.layer(balance);

    let first = tokio::spawn(svc.clone().oneshot(get()));
    eventually(|| up.seen.requests.load(Ordering::SeqCst) == 1).await;
    let second = tokio::spawn(svc.clone().oneshot(get()));
    eventually(|| pool.pending() == 1).await;

    // The third finds one in flight and one waiting: answered at once, never sent.
    let err = svc.clone().oneshot(get()).await.expect_err("overflow");
    assert!(is_caused_by::<Overflow>(err.as_ref()));
    assert_eq!(up.seen.requests.load(Ordering::SeqCst), 1);

    // Release both upstream answers; the waiting request goes once the first BODY ended.
    up.gate.add_permits(2);
    let res = first.await.expect("join").expect("first");
    assert_eq!(res.status(), 200);
    assert_eq!(
        &res.into_body().collect().await.expect("body").to_bytes()[..],
        b"hello"
    );
    let res = second.await.expect("join").expect("second");
    assert_eq!(
        res.into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len(),
        5
    );
    assert_eq!(
        up.seen.max_in_flight.load(Ordering::SeqCst),
        1,
        "one connection, one request at a time"
    );
    assert_eq!((pool.in_flight(), pool.pending()), (0, 0));
}

#[tokio::test]
async fn connect_failures_are_retried_on_the_live_endpoint_and_the_dead_one_is_ejected() {
    let live = support::upstream(200, false).await;
    let dead = support::refusing_addr().await;
    let outlier = OutlierConfig {
        max_ejection_percent: 50,
        ..OutlierConfig::default()
    };
    let balance = Balance::new(
        LbPolicy::RoundRobin,
        Some(outlier),
        support::endpoint_service(support::client()),
    );
    balance.update([Endpoint::new(dead), Endpoint::new(live.addr)]);
    let svc = RetryLayer::new(RetryPolicy::istio_default()).layer(balance.clone());

    for _ in 0..20 {
        let res = svc
            .clone()
            .oneshot(get())
            .await
            .expect("the retry reaches the live endpoint");
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.expect("body");
    }
    // Round robin sent every other first attempt to the dead endpoint until its 5th
    // consecutive connect failure ejected it; those requests arrived as attempt 2.
    assert!(balance.is_ejected(dead));
    let attempts = live.seen.attempts.lock().expect("lock").clone();
    assert_eq!(attempts.len(), 20);
    assert_eq!(attempts.iter().filter(|a| a.as_str() == "2").count(), 5);
    assert!(attempts.iter().all(|a| a == "1" || a == "2"));
}

#[tokio::test]
async fn exhausted_connect_failures_surface_as_connect_failure() {
    let dead = support::refusing_addr().await;
    let balance = Balance::new(
        LbPolicy::LeastRequest,
        None,
        support::endpoint_service(support::client()),
    );
    balance.update([Endpoint::new(dead)]);
    let err = RetryLayer::new(RetryPolicy::istio_default())
        .layer(balance)
        .oneshot(get())
        .await
        .expect_err("nothing listens");
    assert!(is_caused_by::<RetriesExhausted>(err.as_ref()));
    assert!(is_caused_by::<ConnectFailure>(err.as_ref()));
    assert!(
        err.to_string()
            .ends_with("reset reason: connection failure"),
        "{err}"
    );
}
