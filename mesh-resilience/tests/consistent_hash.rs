//! Consistent hashing through the balancer's public API: for each table (ring hash,
//! Maglev) and each key (header, cookie, source IP, query parameter), a key always goes
//! to the same endpoint, keys spread by each endpoint's share of the hash space
//! (chi-square), and taking one endpoint away moves only its keys.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use mesh_core::{BoxError, ConnectionInfo, ConnectionSecurity, Endpoint, UpstreamHost};
use mesh_resilience::{
    Balance, ConsistentHash, HashAlgorithm, HashCookie, HashKey, LbPolicy, OutlierConfig,
    PreviousHosts,
};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt, service_fn};

type Svc = BoxCloneSyncService<http::Request<()>, http::Response<Empty<Bytes>>, BoxError>;

/// Chi-square bound for 3 degrees of freedom (four endpoints) at p = 0.001.
const CHI2_3DF: f64 = 16.27;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8], 8080))
}

fn endpoints(n: usize) -> Vec<Endpoint> {
    (1..=n).map(|i| Endpoint::new(addr(i))).collect()
}

/// Endpoints in `failing` answer 503, the others 200.
fn balancer(
    key: HashKey,
    algorithm: HashAlgorithm,
    outlier: Option<OutlierConfig>,
) -> (Balance<Svc>, Arc<Mutex<HashSet<SocketAddr>>>) {
    let policy = LbPolicy::ConsistentHash(ConsistentHash::new(key).with_algorithm(algorithm));
    with_policy(policy, outlier)
}

fn with_policy(
    policy: LbPolicy,
    outlier: Option<OutlierConfig>,
) -> (Balance<Svc>, Arc<Mutex<HashSet<SocketAddr>>>) {
    let failing: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
    let f = failing.clone();
    let b = Balance::new(policy, outlier, move |ep: &Endpoint| {
        let address = ep.address;
        let f = f.clone();
        Svc::new(service_fn(move |_req: http::Request<()>| {
            let status = if f.lock().unwrap().contains(&address) {
                503
            } else {
                200
            };
            std::future::ready(Ok(http::Response::builder()
                .status(status)
                .body(Empty::new())
                .unwrap()))
        }))
    })
    .with_rng_seed(7);
    (b, failing)
}

fn connection(remote: SocketAddr) -> ConnectionInfo {
    ConnectionInfo {
        remote,
        local: "127.0.0.1:15001".parse().unwrap(),
        security: ConnectionSecurity::None,
    }
}

/// A kind of key, and the `i`-th distinct request of it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Header,
    Cookie,
    SourceIp,
    Query,
}

impl Kind {
    fn key(self) -> HashKey {
        match self {
            Kind::Header => HashKey::Header(http::HeaderName::from_static("x-user")),
            Kind::Cookie => HashKey::Cookie(HashCookie {
                name: "session".into(),
                ..HashCookie::default()
            }),
            Kind::SourceIp => HashKey::SourceIp,
            Kind::Query => HashKey::QueryParameter("user".into()),
        }
    }

    fn request(self, i: usize) -> http::Request<()> {
        let b = http::Request::builder().uri("/cart");
        let mut req = match self {
            Kind::Header => b.header("x-user", format!("user-{i}")),
            Kind::Cookie => b.header("cookie", format!("theme=dark; session=s{i}")),
            Kind::SourceIp => b,
            Kind::Query => b.uri(format!("/cart?page=2&user=u{i}")),
        }
        .body(())
        .unwrap();
        // Every request arrives on its own connection; only the source IP key reads it.
        let ip = [172, 16, (i >> 8) as u8, i as u8];
        req.extensions_mut()
            .insert(connection(SocketAddr::from((ip, 40_000))));
        req
    }
}

fn chi_square(counts: &HashMap<SocketAddr, usize>, shares: &[(SocketAddr, f64)]) -> f64 {
    let n: usize = counts.values().sum();
    shares
        .iter()
        .map(|(a, share)| {
            let expected = n as f64 * share;
            let seen = counts.get(a).copied().unwrap_or(0) as f64;
            (seen - expected).powi(2) / expected
        })
        .sum()
}

async fn upstream_of(b: &Balance<Svc>, req: http::Request<()>) -> (SocketAddr, http::HeaderMap) {
    let res = b.clone().oneshot(req).await.unwrap();
    (
        res.extensions().get::<UpstreamHost>().unwrap().0,
        res.headers().clone(),
    )
}

/// Same key, same endpoint (through `call` and `choose_for`, from any clone); over
/// 4000 keys the endpoints' counts match their hash shares.
async fn sticks_and_spreads(kind: Kind, algorithm: HashAlgorithm) {
    let (b, _) = balancer(kind.key(), algorithm, None);
    b.update(endpoints(4));
    let mut chooser = b.clone();
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for i in 0..4000 {
        let first = chooser.choose_for(&kind.request(i)).unwrap();
        assert_eq!(b.clone().choose_for(&kind.request(i)), Some(first), "{i}");
        if i < 50 {
            assert_eq!(upstream_of(&b, kind.request(i)).await.0, first, "{i}");
        }
        *counts.entry(first).or_default() += 1;
    }
    let shares = b.hash_shares();
    assert_eq!(shares.len(), 4);
    let chi2 = chi_square(&counts, &shares);
    assert!(
        chi2 < CHI2_3DF,
        "{kind:?}: chi-square {chi2}, counts {counts:?}, shares {shares:?}"
    );
}

/// One distribution test per table and key kind.
macro_rules! sticks_and_spreads {
    ($($name:ident: $kind:ident on $algorithm:expr;)*) => {$(
        #[tokio::test]
        async fn $name() {
            sticks_and_spreads(Kind::$kind, $algorithm).await;
        }
    )*};
}

sticks_and_spreads! {
    ring_hash_header_keys_stick_and_spread_by_share: Header on HashAlgorithm::default();
    ring_hash_cookie_keys_stick_and_spread_by_share: Cookie on HashAlgorithm::default();
    ring_hash_source_ip_keys_stick_and_spread_by_share: SourceIp on HashAlgorithm::default();
    ring_hash_query_parameter_keys_stick_and_spread_by_share: Query on HashAlgorithm::default();
    maglev_header_keys_stick_and_spread_by_share: Header on HashAlgorithm::maglev(0).unwrap();
    maglev_cookie_keys_stick_and_spread_by_share: Cookie on HashAlgorithm::maglev(0).unwrap();
    maglev_source_ip_keys_stick_and_spread_by_share: SourceIp on HashAlgorithm::maglev(0).unwrap();
    maglev_query_parameter_keys_stick_and_spread_by_share: Query on HashAlgorithm::maglev(0).unwrap();
}

#[tokio::test]
async fn a_ring_of_a_few_points_per_endpoint_still_sticks() {
    // The deprecated top-level field and `ringHash` map to the same table.
    let (b, _) = balancer(
        Kind::Header.key(),
        HashAlgorithm::ring_hash(8).unwrap(),
        None,
    );
    b.update(endpoints(4));
    let mut b2 = b.clone();
    for i in 0..200 {
        let a = b2.choose_for(&Kind::Header.request(i));
        assert_eq!(a, b2.choose_for(&Kind::Header.request(i)));
    }
}

/// Ejecting one endpoint moves exactly the keys that were on it; a retry that avoids
/// an endpoint picks what ejecting it would.
async fn ejection_moves_only_its_keys(kind: Kind, algorithm: HashAlgorithm) {
    let outlier = OutlierConfig {
        consecutive_5xx_errors: 1,
        max_ejection_percent: 100,
        ..OutlierConfig::default()
    };
    let (b, failing) = balancer(kind.key(), algorithm, Some(outlier));
    b.update(endpoints(4));
    let mut c = b.clone();
    let keys = 2000;
    let before: Vec<SocketAddr> = (0..keys)
        .map(|i| c.choose_for(&kind.request(i)).unwrap())
        .collect();
    let victim = addr(2);
    let retried: Vec<SocketAddr> = (0..keys)
        .map(|i| {
            let mut req = kind.request(i);
            req.extensions_mut().insert(PreviousHosts(vec![victim]));
            c.choose_for(&req).unwrap()
        })
        .collect();
    // One 503 from the victim ejects it.
    failing.lock().unwrap().insert(victim);
    let on_victim = before.iter().position(|a| *a == victim).unwrap();
    let res = b.clone().oneshot(kind.request(on_victim)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(b.is_ejected(victim));
    let mut moved = 0;
    for i in 0..keys {
        let after = c.choose_for(&kind.request(i)).unwrap();
        if before[i] == victim {
            assert_ne!(after, victim);
            moved += 1;
        } else {
            assert_eq!(after, before[i], "key {i} was not on the ejected endpoint");
        }
        assert_eq!(after, retried[i], "key {i}: retry and ejection agree");
    }
    assert!(moved > keys / 8, "the victim had its share: {moved}");
}

#[tokio::test(start_paused = true)]
async fn ring_hash_ejection_moves_only_the_ejected_endpoints_keys() {
    ejection_moves_only_its_keys(Kind::Header, HashAlgorithm::default()).await;
    ejection_moves_only_its_keys(Kind::SourceIp, HashAlgorithm::default()).await;
}

#[tokio::test(start_paused = true)]
async fn maglev_ejection_moves_only_the_ejected_endpoints_keys() {
    ejection_moves_only_its_keys(Kind::Query, HashAlgorithm::maglev(0).unwrap()).await;
    ejection_moves_only_its_keys(Kind::Cookie, HashAlgorithm::maglev(0).unwrap()).await;
}

/// Keys on each endpoint before and after removing the last of `n` endpoints: (keys of
/// the removed endpoint, keys of the others that moved).
fn removal(algorithm: HashAlgorithm, n: usize) -> (usize, usize) {
    let (b, _) = balancer(Kind::Header.key(), algorithm, None);
    b.update(endpoints(n));
    let mut c = b.clone();
    let keys = 10_000;
    let before: Vec<SocketAddr> = (0..keys)
        .map(|i| c.choose_for(&Kind::Header.request(i)).unwrap())
        .collect();
    b.update(endpoints(n - 1));
    let removed = addr(n);
    let (mut on_removed, mut others_moved) = (0, 0);
    for (i, was) in before.iter().enumerate() {
        let now = c.choose_for(&Kind::Header.request(i)).unwrap();
        assert_ne!(now, removed);
        if *was == removed {
            on_removed += 1;
        } else if now != *was {
            others_moved += 1;
        }
    }
    (on_removed, others_moved)
}

#[tokio::test]
async fn removing_an_endpoint_moves_only_its_keys_while_ring_points_stay() {
    // 1024 / 33 and 1024 / 32 both round up to 32 points per endpoint: the remaining
    // endpoints keep exactly their points, so only the removed endpoint's keys move.
    let (on_removed, others_moved) = removal(HashAlgorithm::default(), 33);
    assert!(on_removed > 150, "{on_removed}");
    assert_eq!(others_moved, 0);
}

#[tokio::test]
async fn removing_an_endpoint_from_maglev_barely_moves_other_keys() {
    let (on_removed, others_moved) = removal(HashAlgorithm::maglev(0).unwrap(), 4);
    assert!(on_removed > 2000, "{on_removed}");
    // Maglev's minimal disruption: a handful of slots change hands among the others.
    assert!(others_moved < 50, "{others_moved} of 10000");
}

#[tokio::test]
async fn requests_without_a_key_go_to_a_random_endpoint_by_hash_share() {
    let (b, _) = balancer(Kind::Header.key(), HashAlgorithm::default(), None);
    b.update(endpoints(4));
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    for _ in 0..4000 {
        let (a, _) = upstream_of(&b, http::Request::new(())).await;
        *counts.entry(a).or_default() += 1;
    }
    let chi2 = chi_square(&counts, &b.hash_shares());
    assert!(chi2 < CHI2_3DF, "chi-square {chi2}, counts {counts:?}");
}

fn session_cookie(ttl: Option<Duration>) -> HashKey {
    HashKey::Cookie(HashCookie {
        name: "session".into(),
        path: Some("/".into()),
        ttl,
        attributes: vec![("SameSite".into(), "Lax".into())],
    })
}

#[tokio::test]
async fn an_absent_cookie_is_generated_set_on_the_response_and_then_sticks() {
    let (b, _) = balancer(
        session_cookie(Some(Duration::from_secs(3600))),
        HashAlgorithm::default(),
        None,
    );
    b.update(endpoints(4));
    let mut req = http::Request::new(());
    req.extensions_mut()
        .insert(connection("10.9.8.7:5555".parse().unwrap()));
    let (first, headers) = upstream_of(&b, req).await;
    let set = headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(set.len(), 1, "{set:?}");
    let value = set[0]
        .strip_prefix("session=\"")
        .and_then(|s| s.split_once('"'))
        .map(|(v, rest)| {
            assert_eq!(rest, "; Max-Age=3600; Path=/; SameSite=Lax; HttpOnly");
            v.to_owned()
        })
        .unwrap();
    assert_eq!(value.len(), 16);
    assert!(value.bytes().all(|c| c.is_ascii_hexdigit()));
    // Sent back from other connections, the cookie keeps the endpoint and is not set again.
    for port in 1..=20 {
        let mut again = http::Request::builder()
            .header("cookie", format!("session=\"{value}\""))
            .body(())
            .unwrap();
        again
            .extensions_mut()
            .insert(connection(SocketAddr::from(([10, 9, 8, port], 6000))));
        let (a, headers) = upstream_of(&b, again).await;
        assert_eq!(a, first);
        assert!(headers.get(http::header::SET_COOKIE).is_none());
    }
}

#[tokio::test]
async fn generated_cookies_spread_new_clients_by_hash_share() {
    let (b, _) = balancer(
        session_cookie(Some(Duration::ZERO)),
        HashAlgorithm::maglev(0).unwrap(),
        None,
    );
    b.update(endpoints(4));
    let mut counts: HashMap<SocketAddr, usize> = HashMap::new();
    let mut values = HashSet::new();
    for i in 0..4000u16 {
        let mut req = http::Request::new(());
        let remote = SocketAddr::from(([192, 168, (i >> 8) as u8, i as u8], 30_000 + i));
        req.extensions_mut().insert(connection(remote));
        let (a, headers) = upstream_of(&b, req).await;
        let cookie = headers
            .get(http::header::SET_COOKIE)
            .unwrap()
            .to_str()
            .unwrap();
        // A zero ttl is a session cookie: no Max-Age.
        assert!(
            cookie.ends_with("\"; Path=/; SameSite=Lax; HttpOnly"),
            "{cookie}"
        );
        values.insert(cookie.to_owned());
        *counts.entry(a).or_default() += 1;
    }
    assert_eq!(values.len(), 4000, "one cookie per client connection");
    let chi2 = chi_square(&counts, &b.hash_shares());
    assert!(chi2 < CHI2_3DF, "chi-square {chi2}, counts {counts:?}");
}

#[tokio::test]
async fn without_a_ttl_an_absent_cookie_is_not_generated() {
    let (b, _) = balancer(session_cookie(None), HashAlgorithm::default(), None);
    b.update(endpoints(4));
    let mut seen = HashSet::new();
    for port in 0..40 {
        let mut req = http::Request::new(());
        req.extensions_mut()
            .insert(connection(SocketAddr::from(([10, 1, 1, 1], 7000 + port))));
        let (a, headers) = upstream_of(&b, req).await;
        assert!(headers.get(http::header::SET_COOKIE).is_none());
        seen.insert(a);
    }
    assert!(seen.len() > 1, "no key: random endpoints");
}

mod allocations {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    fn now<F: Future>(fut: F) -> F::Output {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(fut).poll(&mut cx) {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("the service answers at once"),
        }
    }

    /// Allocations per request through `b`, requests built beforehand.
    fn per_request(mut b: Balance<Svc>, make: impl Fn(usize) -> http::Request<()>) -> f64 {
        drop(now(b.call(make(0))).unwrap());
        let mut requests: Vec<_> = (0..100).map(make).collect();
        let info = allocation_counter::measure(|| {
            for req in requests.drain(..) {
                drop(now(b.call(req)).unwrap());
            }
        });
        info.count_total as f64 / 100.0
    }

    fn plain() -> Balance<Svc> {
        let (b, _) = with_policy(LbPolicy::LeastRequest, None);
        b.update(endpoints(4));
        b
    }

    #[test]
    fn hashing_a_key_adds_no_allocation_to_a_pick() {
        let baseline = per_request(plain(), |i| Kind::Header.request(i));
        for kind in [Kind::Header, Kind::Cookie, Kind::SourceIp, Kind::Query] {
            for algorithm in [HashAlgorithm::default(), HashAlgorithm::maglev(0).unwrap()] {
                let (b, _) = balancer(kind.key(), algorithm, None);
                b.update(endpoints(4));
                assert_eq!(
                    per_request(b, |i| kind.request(i)),
                    baseline,
                    "{kind:?} {algorithm:?}"
                );
            }
        }
    }
}
