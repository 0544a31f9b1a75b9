//! Locality-aware balancing through the real binary: a sidecar in region `a`, zone `1`
//! (`workload.locality`) calls a service with endpoints in its zone, in zone `2` of its
//! region and in region `b` (ServiceEntry `endpoints[].locality`). Traffic stays local
//! while the local endpoints are healthy, fails over zone by zone as outlier detection
//! ejects them (Istio's "Locality failover" task), splits 80/20 under `distribute`
//! ("Locality weighted distribution"), and follows endpoint `weight`s 3:1.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;

/// A plain HTTP server answering its name with a status the test can change.
struct Instance {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Instance {
    async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let s = status.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let code = s.load(Ordering::SeqCst);
                        async move {
                            let _ = req.into_body().collect().await;
                            let mut res = Response::new(Full::new(Bytes::from(name)));
                            *res.status_mut() = StatusCode::from_u16(code).unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self { addr, status, task }
    }

    fn fail(&self) {
        self.status.store(503, Ordering::SeqCst);
    }
}

/// The ServiceEntry of `inventory` with one endpoint per `(instance, locality, weight)`.
fn service_entry(endpoints: &[(&Instance, &str, u32)]) -> String {
    let mut eps = String::new();
    for (i, locality, weight) in endpoints {
        eps.push_str(&format!(
            "  - address: 127.0.0.1\n    ports: {{http: {}}}\n    locality: {locality}\n    weight: {weight}\n",
            i.addr.port()
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: inventory, namespace: production}}\n\
         spec:\n  hosts: [inventory]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {{number: 80, name: http, protocol: HTTP}}\n  endpoints:\n{eps}\
         ---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: inventory, namespace: production}}\n\
         spec:\n  hosts: [inventory]\n  http:\n  - route:\n    - destination: {{host: inventory}}\n    retries: {{attempts: 0}}\n"
    )
}

/// Starts the calling sidecar in `a/1` with `config` in its config directory.
async fn caller(world: &World, config: &str) -> (Proxy, Client) {
    let dir = world.write_config("istio", "inventory.yaml", config);
    let ports = Ports::new();
    let settings = sidecar_settings(
        world,
        "shop",
        &labels(&[("app", "shop")]),
        &dir,
        ports,
        "127.0.0.1:9".parse().unwrap(),
        "randomSeed: 3\n",
    )
    .replacen("workload:\n", "workload:\n  locality: a/1\n", 1);
    let proxy = Proxy::start(world, "sidecar", "shop", &settings, ports).await;
    let client = Client::new(proxy.outbound());
    (proxy, client)
}

/// Answers per body (a 503 counts under `"503"`) over `n` requests.
async fn tally(client: &Client, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let (status, body) = client.request("GET", "inventory", "/", &[]).await.unwrap();
        let key = if status == 200 {
            body
        } else {
            status.to_string()
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

fn keys(t: &BTreeMap<String, usize>) -> Vec<&str> {
    t.keys().map(String::as_str).collect()
}

/// Pearson's chi-square of `observed` against the shares `expected`.
fn chi_square(observed: &[usize], expected: &[f64]) -> f64 {
    let n: usize = observed.iter().sum();
    observed
        .iter()
        .zip(expected)
        .map(|(&o, &p)| (o as f64 - n as f64 * p).powi(2) / (n as f64 * p))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_stays_local_then_fails_over_to_the_next_zone_then_region() {
    let world = World::new();
    let (l1, l2, zone, region) = (
        Instance::start("local-1").await,
        Instance::start("local-2").await,
        Instance::start("zone-2").await,
        Instance::start("region-b").await,
    );
    let mut config = service_entry(&[
        (&l1, "a/1", 1),
        (&l2, "a/1", 1),
        (&zone, "a/2", 1),
        (&region, "b/1", 1),
    ]);
    // Outlier detection turns on Istio's default locality failover.
    config.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: inventory, namespace: production}\n\
         spec:\n  host: inventory\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection:\n      consecutive5xxErrors: 1\n      interval: 1s\n      baseEjectionTime: 5m\n      maxEjectionPercent: 100\n",
    );
    let (_proxy, client) = caller(&world, &config).await;

    let t = tally(&client, 40).await;
    assert_eq!(keys(&t), ["local-1", "local-2"], "{t:?}");
    assert_eq!(t["local-1"], 20, "{t:?}");

    // The local zone fails: each local endpoint answers one 503 and is ejected.
    l1.fail();
    l2.fail();
    let t = tally(&client, 42).await;
    assert_eq!(t["503"], 2, "{t:?}");
    assert_eq!(t["zone-2"], 40, "{t:?}");

    // Then the zone fails too: the other region takes over.
    zone.fail();
    let t = tally(&client, 41).await;
    assert_eq!(t["503"], 1, "{t:?}");
    assert_eq!(t["region-b"], 40, "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distribute_sends_eighty_percent_local_and_twenty_to_the_other_region() {
    let world = World::new();
    let (local, other_zone, remote) = (
        Instance::start("local").await,
        Instance::start("zone-2").await,
        Instance::start("region-b").await,
    );
    let mut config = service_entry(&[
        (&local, "a/1", 1),
        (&other_zone, "a/2", 1),
        (&remote, "b/1", 1),
    ]);
    config.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: inventory, namespace: production}\n\
         spec:\n  host: inventory\n  trafficPolicy:\n    loadBalancer:\n      simple: RANDOM\n      localityLbSetting:\n        distribute:\n        - from: a/1/*\n          to:\n            \"a/1/*\": 80\n            \"b/*\": 20\n",
    );
    let (_proxy, client) = caller(&world, &config).await;
    let t = tally(&client, 500).await;
    assert_eq!(keys(&t), ["local", "region-b"], "{t:?}");
    let chi2 = chi_square(&[t["local"], t["region-b"]], &[0.8, 0.2]);
    // df = 1, p = 0.001.
    assert!(chi2 < 10.83, "chi-square {chi2}: {t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_weights_split_three_to_one() {
    let world = World::new();
    let (heavy, light) = (
        Instance::start("heavy").await,
        Instance::start("light").await,
    );
    let mut config = service_entry(&[(&heavy, "a/1", 3), (&light, "a/1", 1)]);
    config.push_str(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: inventory, namespace: production}\n\
         spec:\n  host: inventory\n  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n",
    );
    let (_proxy, client) = caller(&world, &config).await;
    let t = tally(&client, 500).await;
    let chi2 = chi_square(&[t["heavy"], t["light"]], &[0.75, 0.25]);
    assert!(chi2 < 10.83, "chi-square {chi2}: {t:?}");
}
