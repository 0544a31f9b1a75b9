use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use mesh_core::error::{
    ConnectFailure, DeadlineExceeded, Overflow, PerTryTimeout, ResetReason, UpstreamReset,
};
use mesh_core::extensions::response_flags;
use mesh_core::{BoxBody, BoxError, Endpoint, ResponseFlags, is_caused_by};
use proptest::prelude::*;
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};
use tower_test::mock;

use super::*;
use crate::balance::{Balance, LbPolicy, PreviousHosts};
use crate::deadline::{AttemptDeadline, DeadlineLayer, RequestDeadline};
use crate::limit::RetryGate;

const UPSTREAM: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9)),
    80,
);

#[derive(Clone, Debug)]
enum Act {
    Status(u16),
    Grpc(u16),
    RateLimited(u16),
    Connect,
    Reset(ResetReason, bool),
    Overflow,
    Hang,
}

#[derive(Debug)]
struct Seen {
    attempt: String,
    at: Instant,
    previous: Option<PreviousHosts>,
    attempt_deadline: Option<AttemptDeadline>,
    body: Bytes,
}

#[derive(Default)]
struct Upstream {
    script: Mutex<VecDeque<Act>>,
    seen: Mutex<Vec<Seen>>,
}

impl Upstream {
    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn attempt_headers(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.attempt.clone())
            .collect()
    }
}

type Svc =
    tower::util::BoxCloneSyncService<http::Request<BoxBody>, http::Response<BoxBody>, BoxError>;

/// An upstream that plays `acts` in order (the last one repeats).
fn upstream(acts: &[Act]) -> (Arc<Upstream>, Svc) {
    let up = Arc::new(Upstream {
        script: Mutex::new(acts.iter().cloned().collect()),
        ..Upstream::default()
    });
    let state = up.clone();
    let svc = service_fn(move |req: http::Request<BoxBody>| {
        let up = state.clone();
        // The deadlines are those of the call (the retry layer sets them around it).
        let attempt_deadline = AttemptDeadline::of(&req);
        async move {
            let act = {
                let mut script = up.script.lock().unwrap();
                if script.len() > 1 {
                    script.pop_front().unwrap()
                } else {
                    script[0].clone()
                }
            };
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            up.seen.lock().unwrap().push(Seen {
                attempt: parts
                    .headers
                    .get(ATTEMPT_COUNT)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
                at: Instant::now(),
                previous: parts.extensions.get::<PreviousHosts>().cloned(),
                attempt_deadline,
                body,
            });
            let status = |code: u16| {
                let mut res = http::Response::builder()
                    .status(code)
                    .body(mesh_core::body::full("x"))
                    .unwrap();
                res.extensions_mut()
                    .insert(mesh_core::UpstreamHost(UPSTREAM));
                res
            };
            match act {
                Act::Status(code) => Ok(status(code)),
                Act::Grpc(code) => {
                    let mut res = status(200);
                    res.headers_mut().insert("grpc-status", code.into());
                    Ok(res)
                }
                Act::RateLimited(code) => {
                    let mut res = status(code);
                    res.headers_mut()
                        .insert("x-envoy-ratelimited", "true".parse().unwrap());
                    Ok(res)
                }
                Act::Connect => Err(Box::new(ConnectFailure::bare()) as BoxError),
                Act::Reset(reason, sent) => {
                    Err(Box::new(UpstreamReset::new(reason, sent, None)) as BoxError)
                }
                Act::Overflow => Err(Box::new(Overflow) as BoxError),
                Act::Hang => std::future::pending().await,
            }
        }
    });
    (up, Svc::new(svc))
}

fn policy(attempts: u32, retry_on: &str) -> RetryPolicy {
    RetryPolicy::with_attempts(attempts).retry_on(RetryOn::parse(retry_on).unwrap())
}

fn get() -> http::Request<BoxBody> {
    http::Request::new(mesh_core::body::empty())
}

async fn run(
    policy: RetryPolicy,
    acts: &[Act],
) -> (Arc<Upstream>, Result<http::Response<BoxBody>, BoxError>) {
    let (up, svc) = upstream(acts);
    let svc = RetryLayer::new(policy).with_rng_seed(1).layer(svc);
    let res = svc.oneshot(get()).await;
    (up, res)
}

type Stack<RB> =
    tower::util::BoxCloneSyncService<http::Request<BoxBody>, http::Response<RB>, BoxError>;

/// A route's stack, composed one of the two ways: a deadline layer around the retry
/// layer (`fold` false), or the retry layer applying the deadline itself.
fn route_stack<S, RB>(
    fold: bool,
    timeout: Option<Duration>,
    retry: RetryLayer,
    inner: S,
) -> Stack<RB>
where
    S: tower::Service<http::Request<BoxBody>, Response = http::Response<RB>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: Send + 'static,
{
    if fold {
        Stack::new(
            retry
                .with_deadline(DeadlineLayer::new(timeout))
                .layer(inner),
        )
    } else {
        Stack::new(DeadlineLayer::new(timeout).layer(retry.layer(inner)))
    }
}

#[tokio::test(start_paused = true)]
async fn article_example_caller_never_waits_more_than_the_route_timeout() {
    for fold in [false, true] {
        // timeout 5 s, 3 retries of at most 2 s each, an upstream that never answers.
        let (up, upstream) = upstream(&[Act::Hang]);
        let svc = route_stack(
            fold,
            Some(Duration::from_secs(5)),
            RetryLayer::new(policy(3, "5xx").per_try_timeout(Some(Duration::from_secs(2))))
                .with_rng_seed(3),
            upstream,
        );
        let start = Instant::now();
        let err = svc.oneshot(get()).await.unwrap_err();
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
        assert_eq!(
            Instant::now() - start,
            Duration::from_secs(5),
            "exactly the route timeout"
        );
        // Attempts at 0 s, ~2 s and ~4 s; the third was cut by the deadline, not by its 2 s.
        assert_eq!(up.attempt_headers(), ["1", "2", "3"]);
        let seen = up.seen.lock().unwrap();
        assert_eq!(
            seen[2].attempt_deadline,
            Some(AttemptDeadline(start + Duration::from_secs(5)))
        );
        assert!(
            seen[1].at - start >= Duration::from_secs(2)
                && seen[1].at - start < Duration::from_millis(2025)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_is_retried_under_5xx_and_the_retry_succeeds() {
    let (up, svc) = upstream(&[Act::Hang, Act::Status(200)]);
    let svc =
        RetryLayer::new(policy(2, "5xx").per_try_timeout(Some(Duration::from_secs(1)))).layer(svc);
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(up.attempts(), 2);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_is_not_retried_under_istio_default() {
    let (up, svc) = upstream(&[Act::Hang]);
    let p = RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(1)));
    let start = Instant::now();
    let err = RetryLayer::new(p)
        .layer(svc)
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(is_caused_by::<PerTryTimeout>(err.as_ref()));
    assert!(!is_caused_by::<RetriesExhausted>(err.as_ref()));
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(up.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_at_least_the_route_timeout_is_ignored() {
    for fold in [false, true] {
        let (up, svc) = upstream(&[Act::Hang]);
        let svc = route_stack(
            fold,
            Some(Duration::from_secs(2)),
            RetryLayer::new(policy(3, "5xx").per_try_timeout(Some(Duration::from_secs(2)))),
            svc,
        );
        let err = svc.oneshot(get()).await.unwrap_err();
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
        assert_eq!(up.attempts(), 1);
        assert_eq!(up.seen.lock().unwrap()[0].attempt_deadline, None);
    }
}

#[tokio::test(start_paused = true)]
async fn every_attempt_carries_its_attempt_count() {
    let (up, res) = run(
        policy(5, "503"),
        &[Act::Status(503), Act::Status(503), Act::Status(200)],
    )
    .await;
    assert_eq!(res.unwrap().status(), 200);
    assert_eq!(up.attempt_headers(), ["1", "2", "3"]);
    // Retries name the host that answered before, once.
    let seen = up.seen.lock().unwrap();
    assert_eq!(seen[0].previous, None);
    assert_eq!(seen[2].previous, Some(PreviousHosts(vec![UPSTREAM])));
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_return_the_last_response_flagged_urx() {
    let (up, res) = run(
        policy(2, "5xx"),
        &[Act::Status(500), Act::Status(502), Act::Status(503)],
    )
    .await;
    let res = res.unwrap();
    assert_eq!(res.status(), 503, "the last upstream response");
    assert_eq!(response_flags(res.extensions()).to_string(), "URX");
    assert_eq!(up.attempts(), 3, "1 + attempts");
}

#[tokio::test(start_paused = true)]
async fn a_response_that_is_not_retriable_is_returned_unflagged() {
    let (up, res) = run(policy(2, "gateway-error"), &[Act::Status(500)]).await;
    let res = res.unwrap();
    assert_eq!(res.status(), 500);
    assert!(response_flags(res.extensions()).is_empty());
    assert_eq!(up.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn exhausted_errors_are_wrapped_and_keep_their_cause() {
    let (up, res) = run(RetryPolicy::istio_default(), &[Act::Connect]).await;
    let err = res.unwrap_err();
    assert!(is_caused_by::<RetriesExhausted>(err.as_ref()));
    assert!(is_caused_by::<ConnectFailure>(err.as_ref()));
    assert_eq!(err.to_string(), ConnectFailure::bare().to_string());
    assert_eq!(up.attempts(), 3);
}

#[tokio::test(start_paused = true)]
async fn overflow_is_never_retried() {
    let (up, res) = run(
        policy(
            3,
            "5xx,gateway-error,reset,reset-before-request,connect-failure",
        ),
        &[Act::Overflow],
    )
    .await;
    assert!(is_caused_by::<Overflow>(res.unwrap_err().as_ref()));
    assert_eq!(up.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn each_retry_on_condition_retries_its_outcome_end_to_end() {
    use ResetReason::*;
    let cases: Vec<(&str, Act, bool)> = vec![
        ("5xx", Act::Status(500), true),
        ("5xx", Act::Status(404), false),
        ("gateway-error", Act::Status(504), true),
        ("gateway-error", Act::Status(500), false),
        ("reset", Act::Reset(RemoteReset, true), true),
        ("reset", Act::Status(503), false),
        (
            "reset-before-request",
            Act::Reset(ConnectionTermination, false),
            true,
        ),
        (
            "reset-before-request",
            Act::Reset(ConnectionTermination, true),
            false,
        ),
        ("connect-failure", Act::Connect, true),
        ("connect-failure", Act::Reset(RemoteReset, false), false),
        ("refused-stream", Act::Reset(RefusedStream, true), true),
        ("refused-stream", Act::Reset(RemoteReset, true), false),
        ("retriable-4xx", Act::Status(409), true),
        ("retriable-4xx", Act::Status(429), false),
        ("retriable-status-codes,429", Act::Status(429), true),
        ("429", Act::Status(503), false),
        ("envoy-ratelimited", Act::RateLimited(429), true),
        ("5xx", Act::RateLimited(503), false),
        ("cancelled", Act::Grpc(1), true),
        ("deadline-exceeded", Act::Grpc(4), true),
        ("resource-exhausted", Act::Grpc(8), true),
        ("internal", Act::Grpc(13), true),
        ("unavailable", Act::Grpc(14), true),
        ("unavailable", Act::Grpc(13), false),
    ];
    for (retry_on, act, retried) in cases {
        let (up, _res) = run(policy(1, retry_on), &[act.clone(), Act::Status(200)]).await;
        let want = if retried { 2 } else { 1 };
        assert_eq!(up.attempts(), want, "retryOn {retry_on:?} with {act:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn istio_default_does_not_retry_503_but_the_compat_flag_does() {
    let (up, res) = run(
        RetryPolicy::istio_default(),
        &[Act::Status(503), Act::Status(200)],
    )
    .await;
    assert_eq!((res.unwrap().status().as_u16(), up.attempts()), (503, 1));
    let (up, res) = run(
        RetryPolicy::istio_default_with_503(),
        &[Act::Status(503), Act::Status(200)],
    )
    .await;
    assert_eq!((res.unwrap().status().as_u16(), up.attempts()), (200, 2));
}

#[tokio::test(start_paused = true)]
async fn backoff_between_attempts_stays_within_envoys_bounds() {
    for seed in 0..20 {
        let (up, svc) = upstream(&[Act::Status(503)]);
        let svc = RetryLayer::new(policy(4, "503"))
            .with_rng_seed(seed)
            .layer(svc);
        let _ = svc.oneshot(get()).await;
        let seen = up.seen.lock().unwrap();
        let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
        let bounds = [25, 75, 175, 250].map(Duration::from_millis);
        assert_eq!(gaps.len(), 4);
        for (gap, bound) in gaps.iter().zip(bounds) {
            assert!(*gap < bound, "seed {seed}: {gap:?} !< {bound:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn small_bodies_are_replayed_on_every_attempt() {
    let (up, svc) = upstream(&[Act::Status(503), Act::Status(503), Act::Status(200)]);
    let svc = RetryLayer::new(policy(2, "503")).layer(svc);
    let req = http::Request::new(mesh_core::body::full("payment=42"));
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    let seen = up.seen.lock().unwrap();
    assert!(seen.iter().all(|s| &s.body[..] == b"payment=42"));
    assert_eq!(seen.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn bodies_over_the_cap_go_once_unretried() {
    let big = vec![7u8; 100];
    for body in [
        mesh_core::body::full(big.clone()),
        // Unknown length, discovered while buffering.
        mesh_core::body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            big.chunks(30)
                .map(|c| Ok::<_, BoxError>(http_body::Frame::data(Bytes::copy_from_slice(c))))
                .collect::<Vec<_>>(),
        ))),
    ] {
        let (up, svc) = upstream(&[Act::Status(503), Act::Status(200)]);
        let svc = RetryLayer::new(policy(2, "503").replay_limit(64)).layer(svc);
        let res = svc.oneshot(http::Request::new(body)).await.unwrap();
        assert_eq!(res.status(), 503);
        assert!(
            response_flags(res.extensions()).is_empty(),
            "not URX: never retriable"
        );
        let seen = up.seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(&seen[0].body[..], &big[..], "every byte went upstream once");
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_retried_once_the_response_has_started() {
    // A 200 whose body fails mid-stream: the caller sees the body error, no second attempt.
    let (up, svc) = upstream(&[Act::Status(200)]);
    let failing = svc.map_response(|res: http::Response<BoxBody>| {
        res.map(|_| {
            let frames = vec![
                Ok(http_body::Frame::data(Bytes::from_static(b"partial"))),
                Err::<http_body::Frame<Bytes>, BoxError>(Box::new(UpstreamReset::new(
                    ResetReason::RemoteReset,
                    true,
                    None,
                ))),
            ];
            mesh_core::body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
                frames,
            )))
        })
    });
    let svc = RetryLayer::new(policy(3, "5xx,reset")).layer(failing);
    let res = svc.oneshot(get()).await.unwrap();
    assert!(res.into_body().collect().await.is_err());
    assert_eq!(up.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_stops_retries() {
    let budget = Arc::new(RetryBudget::new(0.0, 0, Duration::from_secs(10)));
    let (up, svc) = upstream(&[Act::Status(503)]);
    let svc = RetryLayer::new(policy(3, "503"))
        .with_budget(budget)
        .layer(svc);
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(up.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_max_retries_gate_skips_the_retry_and_flags_uo() {
    let gate = RetryGate::new(1);
    let _held = gate.try_acquire().unwrap();
    let (up, svc) = upstream(&[Act::Status(503)]);
    let svc = RetryLayer::new(policy(3, "503"))
        .with_retry_gate(gate.clone())
        .layer(svc);
    let res = svc.oneshot(get()).await.unwrap();
    assert_eq!(
        response_flags(res.extensions()),
        ResponseFlags::UPSTREAM_OVERFLOW
    );
    assert_eq!(up.attempts(), 1);
    drop(_held);
    // With room, retries hold the gate only while in flight.
    let (up, svc) = upstream(&[Act::Status(503), Act::Status(200)]);
    let svc = RetryLayer::new(policy(3, "503"))
        .with_retry_gate(gate.clone())
        .layer(svc);
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    assert_eq!((up.attempts(), gate.active()), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn disabled_policy_passes_through_with_attempt_count_one() {
    let (up, res) = run(RetryPolicy::disabled(), &[Act::Connect]).await;
    let err = res.unwrap_err();
    assert!(is_caused_by::<ConnectFailure>(err.as_ref()));
    assert!(!is_caused_by::<RetriesExhausted>(err.as_ref()));
    assert_eq!(up.attempt_headers(), ["1"]);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_forwarded_and_the_ready_service_is_used() {
    let (inner, mut handle) = mock::pair::<http::Request<BoxBody>, http::Response<BoxBody>>();
    let mut svc = mock::Spawn::new(RetryLayer::new(policy(1, "503")).layer(inner));
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let fut = tokio::spawn(svc.call(get()));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(
        http::Response::builder()
            .status(503)
            .body(mesh_core::body::empty())
            .unwrap(),
    );
    // The retry polls a clone for readiness before its second call.
    handle.allow(1);
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()[ATTEMPT_COUNT], "2");
    send.send_response(http::Response::new(mesh_core::body::empty()));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn capacity_is_reserved_once_and_moves_with_the_request() {
    let (inner, mut handle) = mock::pair::<http::Request<BoxBody>, http::Response<BoxBody>>();
    let mut svc = mock::Spawn::new(RetryLayer::new(policy(1, "503")).layer(inner));
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    assert_ready_ok!(svc.poll_ready(), "polling again reuses the reservation");
    let fut = tokio::spawn(svc.call(get()));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(http::Response::new(mesh_core::body::empty()));
    assert_eq!(fut.await.unwrap().unwrap().status(), 200);
    // The ready service went with the request; the one left behind must get its own.
    assert_pending!(svc.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn retries_avoid_the_endpoint_that_just_failed() {
    let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let log = hits.clone();
    let balance = Balance::new(LbPolicy::LeastRequest, None, move |ep: &Endpoint| {
        let addr = ep.address;
        let log = log.clone();
        service_fn(move |req: http::Request<BoxBody>| {
            let log = log.clone();
            async move {
                let attempt = req.headers()[ATTEMPT_COUNT].to_str().unwrap().to_owned();
                log.lock().unwrap().push((attempt.clone(), addr));
                // Every first attempt fails, whichever endpoint gets it.
                let status = if attempt == "1" { 503 } else { 200 };
                Ok::<_, BoxError>(
                    http::Response::builder()
                        .status(status)
                        .body(mesh_core::body::empty())
                        .unwrap(),
                )
            }
        })
    })
    .with_rng_seed(9);
    balance.update([Endpoint::new(a), Endpoint::new(b)]);
    let svc = RetryLayer::new(RetryPolicy::istio_default_with_503()).layer(balance);
    for _ in 0..50 {
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let hits = hits.lock().unwrap();
    assert_eq!(hits.len(), 100);
    for pair in hits.chunks(2) {
        assert_eq!((pair[0].0.as_str(), pair[1].0.as_str()), ("1", "2"));
        assert_ne!(pair[0].1, pair[1].1, "the retry went to the other endpoint");
    }
}

#[tokio::test(start_paused = true)]
async fn with_a_single_endpoint_the_retry_goes_back_to_it() {
    let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let balance = Balance::new(LbPolicy::RoundRobin, None, |_ep: &Endpoint| {
        let (_, svc) = upstream(&[Act::Status(503), Act::Status(200)]);
        svc
    });
    balance.update([Endpoint::new(a)]);
    let svc = RetryLayer::new(RetryPolicy::istio_default_with_503()).layer(balance);
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn request_deadline_bounds_the_backoff() {
    // A 50 ms route timeout and a 100 ms back-off base: the back-off is cut at the deadline.
    for fold in [false, true] {
        let (up, svc) = upstream(&[Act::Status(503)]);
        let svc = route_stack(
            fold,
            Some(Duration::from_millis(50)),
            RetryLayer::new(policy(5, "503").backoff_base(Duration::from_millis(100)))
                .with_rng_seed(4),
            svc,
        );
        let start = Instant::now();
        let res = svc.oneshot(get()).await;
        assert!(Instant::now() - start <= Duration::from_millis(50));
        match res {
            Err(e) => assert!(is_caused_by::<DeadlineExceeded>(e.as_ref())),
            Ok(r) => panic!("expected the deadline, got {}", r.status()),
        }
        assert!(up.attempts() >= 1);
    }
}

proptest! {
    #[test]
    fn attempt_deadlines_never_outlive_the_request_deadline(
        timeout_ms in 1u64..10_000,
        per_try_ms in 1u64..10_000,
        elapsed_ms in 0u64..10_000,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let deadline = RequestDeadline::after(Duration::from_millis(timeout_ms));
            tokio::time::advance(Duration::from_millis(elapsed_ms)).await;
            let p = RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_millis(per_try_ms)));
            let effective = p.effective_per_try_timeout(Some(deadline.timeout));
            prop_assert_eq!(effective.is_none(), per_try_ms >= timeout_ms);
            if let Some(per_try) = effective {
                let end = deadline.clip(Instant::now() + per_try);
                prop_assert!(end <= deadline.at);
                prop_assert!(end <= Instant::now() + per_try);
            }
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_body_slower_than_the_deadline_ends_in_deadline_exceeded() {
    let (up, svc) = upstream(&[Act::Status(200)]);
    let svc = RetryLayer::new(policy(2, "5xx")).layer(svc);
    let never_ends = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, BoxError>>();
    let mut req = http::Request::new(mesh_core::body::boxed(http_body_util::StreamBody::new(
        never_ends,
    )));
    req.extensions_mut()
        .insert(RequestDeadline::after(Duration::from_secs(1)));
    let start = Instant::now();
    let err = svc.oneshot(req).await.unwrap_err();
    assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
    assert_eq!(up.attempts(), 0);
}

#[tokio::test(start_paused = true)]
async fn waiting_for_readiness_before_a_retry_is_bounded_by_the_deadline() {
    let (inner, mut handle) = mock::pair::<http::Request<BoxBody>, http::Response<BoxBody>>();
    let mut svc = mock::Spawn::new(RetryLayer::new(policy(3, "503")).layer(inner));
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut req = get();
    req.extensions_mut()
        .insert(RequestDeadline::after(Duration::from_secs(2)));
    let start = Instant::now();
    let fut = tokio::spawn(svc.call(req));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(
        http::Response::builder()
            .status(503)
            .body(mesh_core::body::empty())
            .unwrap(),
    );
    // No capacity for the retry: it waits, but not past the deadline.
    let err = fut.await.unwrap().unwrap_err();
    assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn attempt_count_can_be_turned_off() {
    let mut p = policy(1, "503");
    p.include_attempt_count = false;
    let (up, res) = run(p, &[Act::Status(503), Act::Status(200)]).await;
    assert_eq!(res.unwrap().status(), 200);
    assert_eq!(up.attempt_headers(), ["", ""]);
}

/// A balancer over one endpoint that never answers and is ejected on its first failure.
fn hanging_balance() -> Balance<Svc> {
    let cfg = crate::outlier::OutlierConfig {
        consecutive_5xx_errors: 1,
        max_ejection_percent: 100,
        ..crate::outlier::OutlierConfig::default()
    };
    let balance = Balance::new(LbPolicy::LeastRequest, Some(cfg), |_ep: &Endpoint| {
        Svc::new(service_fn(|_req: http::Request<BoxBody>| {
            std::future::pending::<Result<http::Response<BoxBody>, BoxError>>()
        }))
    });
    balance.update([Endpoint::new(UPSTREAM)]);
    balance
}

/// Sends `req` through `svc`; the error, which must come exactly `after` the send.
async fn fails_after<RB>(svc: Stack<RB>, req: http::Request<BoxBody>, after: Duration) -> BoxError {
    let start = Instant::now();
    let Err(err) = svc.oneshot(req).await else {
        panic!("the request succeeded");
    };
    assert_eq!(Instant::now() - start, after, "{err}");
    err
}

/// The endpoint was charged by the balancer: its timer fired, not only an outer one.
fn charged_by_the_balancer(balance: &Balance<Svc>, err: &BoxError) {
    assert!(
        mesh_core::find_cause::<crate::balance::EndpointFailed>(err.as_ref()).is_some(),
        "the balancer's timer ended the attempt: {err}"
    );
    assert!(balance.is_ejected(UPSTREAM), "the endpoint was charged");
    assert_eq!(balance.in_flight(UPSTREAM), 0);
}

#[tokio::test(start_paused = true)]
async fn the_balancer_enforces_the_attempt_deadline_of_the_retry_layer() {
    for fold in [false, true] {
        let balance = hanging_balance();
        let svc = route_stack(
            fold,
            Some(Duration::from_secs(5)),
            RetryLayer::new(
                RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(1))),
            ),
            balance.clone(),
        );
        let err = fails_after(svc, get(), Duration::from_secs(1)).await;
        assert!(is_caused_by::<PerTryTimeout>(err.as_ref()));
        charged_by_the_balancer(&balance, &err);
    }
}

#[tokio::test(start_paused = true)]
async fn the_balancer_enforces_the_route_deadline_with_and_without_retries() {
    for (retry, fold) in [
        (RetryPolicy::disabled(), false),
        (RetryPolicy::disabled(), true),
        (RetryPolicy::istio_default(), false),
        (RetryPolicy::istio_default(), true),
    ] {
        let balance = hanging_balance();
        let svc = route_stack(
            fold,
            Some(Duration::from_secs(2)),
            RetryLayer::new(retry),
            balance.clone(),
        );
        let err = fails_after(svc, get(), Duration::from_secs(2)).await;
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
        charged_by_the_balancer(&balance, &err);
    }
}

#[tokio::test(start_paused = true)]
async fn an_embedders_deadline_extension_bounds_every_layer_when_earlier() {
    for fold in [false, true] {
        let balance = hanging_balance();
        let svc = route_stack(
            fold,
            Some(Duration::from_secs(5)),
            RetryLayer::new(
                RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_secs(3))),
            ),
            balance.clone(),
        );
        let mut req = get();
        req.extensions_mut()
            .insert(RequestDeadline::after(Duration::from_millis(1500)));
        let err = fails_after(svc, req, Duration::from_millis(1500)).await;
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
        charged_by_the_balancer(&balance, &err);
    }
}

#[tokio::test(start_paused = true)]
async fn the_retry_layer_applies_grpc_timeout_like_the_deadline_layer() {
    let grpc = || {
        let mut req = get();
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("300m"));
        req
    };
    for (route, want) in [
        (None, Duration::from_millis(300)),
        (Some(Duration::from_secs(5)), Duration::from_millis(300)),
        (Some(Duration::from_millis(200)), Duration::from_millis(200)),
    ] {
        for (retry, fold) in [
            (RetryPolicy::disabled(), false),
            (RetryPolicy::disabled(), true),
            (RetryPolicy::istio_default(), false),
            (RetryPolicy::istio_default(), true),
        ] {
            let balance = hanging_balance();
            let svc = route_stack(fold, route, RetryLayer::new(retry), balance.clone());
            let start = Instant::now();
            let err = svc.oneshot(grpc()).await.unwrap_err();
            assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()));
            assert_eq!(Instant::now() - start, want);
            charged_by_the_balancer(&balance, &err);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_retry_layer_applies_grpc_timeout_to_a_request_with_a_body_too() {
    // A body is read before the first attempt: the deadline comes from looking the
    // headers up, not from the walk of a copy made at once.
    for (body, retry) in [
        ("payload", RetryPolicy::istio_default()),
        ("payload", RetryPolicy::istio_default().replay_limit(3)),
        ("", RetryPolicy::istio_default()),
    ] {
        let balance = hanging_balance();
        let svc = route_stack(true, None, RetryLayer::new(retry), balance.clone());
        let mut req = http::Request::new(mesh_core::body::full(body));
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc+proto"),
        );
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("250m"));
        let err = fails_after(svc, req, Duration::from_millis(250)).await;
        assert!(is_caused_by::<DeadlineExceeded>(err.as_ref()), "{body:?}");
        charged_by_the_balancer(&balance, &err);
    }
}

#[tokio::test(start_paused = true)]
async fn a_grpc_timeout_is_ignored_on_a_request_that_is_not_grpc() {
    let balance = hanging_balance();
    let mut svc = RetryLayer::new(RetryPolicy::istio_default())
        .with_deadline(DeadlineLayer::new(None))
        .layer(balance.clone());
    let mut req = get();
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    req.headers_mut()
        .insert("grpc-timeout", http::HeaderValue::from_static("250m"));
    futures_util::future::poll_fn(|cx| tower::Service::poll_ready(&mut svc, cx))
        .await
        .unwrap();
    let mut fut = tokio_test::task::spawn(tower::Service::call(&mut svc, req));
    assert_pending!(fut.poll());
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_pending!(fut.poll());
    assert_eq!(balance.in_flight(UPSTREAM), 1, "still waiting, unbounded");
}

#[tokio::test(start_paused = true)]
async fn an_incoming_attempt_count_is_replaced_where_the_caller_put_it() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = service_fn(move |req: http::Request<BoxBody>| {
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        record.lock().unwrap().push(headers);
        let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let status = if n < 2 { 503 } else { 200 };
        let res = http::Response::builder().status(status).body(()).unwrap();
        std::future::ready(Ok::<_, BoxError>(res))
    });
    for fold in [false, true] {
        seen.lock().unwrap().clear();
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let svc = route_stack(
            fold,
            Some(Duration::from_secs(5)),
            RetryLayer::new(policy(2, "503")).with_rng_seed(1),
            svc.clone(),
        );
        let mut req = get();
        req.headers_mut()
            .insert("x-a", http::HeaderValue::from_static("1"));
        req.headers_mut()
            .append(ATTEMPT_COUNT, http::HeaderValue::from_static("7"));
        req.headers_mut()
            .append(ATTEMPT_COUNT, http::HeaderValue::from_static("8"));
        req.headers_mut()
            .insert("x-b", http::HeaderValue::from_static("2"));
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let pairs = |n: &str| {
            [("x-a", "1"), ("x-envoy-attempt-count", n), ("x-b", "2")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .to_vec()
        };
        assert_eq!(*seen.lock().unwrap(), [pairs("1"), pairs("2"), pairs("3")]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_layer_without_a_route_timeout_sets_no_deadline() {
    use tower::Service;
    for retry in [RetryPolicy::disabled(), RetryPolicy::istio_default()] {
        let balance = hanging_balance();
        let mut svc = RetryLayer::new(retry)
            .with_deadline(DeadlineLayer::new(None))
            .layer(balance.clone());
        futures_util::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .unwrap();
        let mut fut = tokio_test::task::spawn(svc.call(get()));
        assert_pending!(fut.poll());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_pending!(fut.poll());
        assert_eq!(balance.in_flight(UPSTREAM), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_deadline_set_around_one_call_does_not_reach_the_next_call() {
    use tower::Service;
    let balance = hanging_balance();
    let mut bounded = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Some(Duration::from_secs(1))))
        .layer(RetryLayer::new(
            RetryPolicy::istio_default().per_try_timeout(Some(Duration::from_millis(500))),
        ))
        .service(balance.clone());
    let mut unbounded = RetryLayer::new(RetryPolicy::istio_default()).layer(balance.clone());
    futures_util::future::poll_fn(|cx| bounded.poll_ready(cx))
        .await
        .unwrap();
    let mut first = tokio_test::task::spawn(bounded.call(get()));
    assert_pending!(first.poll());
    // The next request on this thread, through layers that set no deadline.
    futures_util::future::poll_fn(|cx| unbounded.poll_ready(cx))
        .await
        .unwrap();
    let mut next = tokio_test::task::spawn(unbounded.call(get()));
    assert_pending!(next.poll());
    assert_eq!(crate::deadline::CallDeadlines::current().request, None);
    tokio::time::advance(Duration::from_millis(500)).await;
    let err = first.poll().map(|r| r.unwrap_err());
    match err {
        std::task::Poll::Ready(err) => assert!(is_caused_by::<PerTryTimeout>(err.as_ref())),
        std::task::Poll::Pending => panic!("the first request has a 500 ms attempt deadline"),
    }
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_pending!(next.poll());
    assert_eq!(balance.in_flight(UPSTREAM), 1, "still waiting, unbounded");
}
