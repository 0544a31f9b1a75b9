//! The article's policies with payment-service replaced by plain HTTP servers without a
//! sidecar, twice: behind a DestinationRule with `tls: DISABLE` (the endpoints carry a
//! service account, so only the rule makes them plaintext) and with auto-mTLS choosing
//! plaintext for endpoints without the sidecar mark. The 95/5 split (chi-square), the
//! header canary, retries under the 5 s deadline, outlier ejection capped at 50 % and pool
//! overflow (503 `UO`) are all observed at the recording servers.
//!
//! Auto-mTLS also reads the server's side (SR-24): endpoints that would get Istio mTLS
//! (they carry a service account) get plaintext when their service is `MESH_EXTERNAL` or
//! their PeerAuthentication is `DISABLE`, for the workload or for its port.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

#[derive(Clone, Copy, Debug)]
enum Plain {
    /// `tls: {mode: DISABLE}`, endpoints marked with a service account.
    TlsDisable,
    /// No `tls`: auto-mTLS, endpoints without the sidecar mark.
    AutoMtls,
}

impl Plain {
    /// The extra endpoint fields.
    fn mark(self) -> &'static str {
        match self {
            Plain::TlsDisable => ", serviceAccount: payment-service",
            Plain::AutoMtls => "",
        }
    }

    /// The DestinationRule's `tls` block, indented for `trafficPolicy`.
    fn tls(self) -> &'static str {
        match self {
            Plain::TlsDisable => "    tls: {mode: DISABLE}\n",
            Plain::AutoMtls => "",
        }
    }
}

/// payment-service's ServiceEntry: one endpoint per `(address, version)`.
fn entry(endpoints: &[(SocketAddr, &str)], plain: Plain) -> String {
    let mut eps = String::new();
    for (addr, version) in endpoints {
        eps.push_str(&format!(
            "  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: payment-service, version: {version}}}{mark}}}\n",
            port = addr.port(),
            mark = plain.mark(),
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
{eps}"
    )
}

/// The calling sidecar (order-service) on `yaml`, and a client of its outbound listener.
async fn caller(world: &World, yaml: &str) -> (Proxy, Client) {
    let config = world.write_config("istio", "mesh.yaml", yaml);
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(world, "order-service", &config, Ports::new(), nowhere).await;
    let client = Client::new(proxy.outbound());
    (proxy, client)
}

async fn canary(plain: Plain) {
    let world = World::new();
    let (v1, v2) = (
        App::start(Behaviour::Ok("v1")).await,
        App::start(Behaviour::Ok("v2")).await,
    );
    let yaml = format!(
        "{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment-service, namespace: production}}
spec:
  host: payment-service
  trafficPolicy:
{tls}    loadBalancer: {{simple: ROUND_ROBIN}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  http:
  - match:
    - headers:
        x-canary: {{exact: 'true'}}
    route:
    - destination: {{host: payment-service, subset: v2}}
  - route:
    - {{destination: {{host: payment-service, subset: v1}}, weight: 95}}
    - {{destination: {{host: payment-service, subset: v2}}, weight: 5}}
",
        entry(&[(v1.addr, "v1"), (v2.addr, "v2")], plain),
        tls = plain.tls(),
    );
    let (proxy, client) = caller(&world, &yaml).await;
    let n = 1000;
    for _ in 0..n {
        let (status, _) = client
            .request("POST", "payment-service", "/pay", &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "{plain:?}\n{}", proxy.output());
    }
    let (a, b) = (v1.hits() as f64, v2.hits() as f64);
    assert_eq!(a + b, n as f64);
    let chi = (a - 950.0).powi(2) / 950.0 + (b - 50.0).powi(2) / 50.0;
    assert!(chi < 10.83, "{plain:?}: {a} to v1, {b} to v2");
    for _ in 0..50 {
        let (status, body) = client
            .request("POST", "payment-service", "/pay", &[("x-canary", "true")])
            .await
            .unwrap();
        assert_eq!((status, body.as_str()), (200, "v2"), "{plain:?}");
    }
}

async fn resilience(plain: Plain) {
    let world = World::new();
    let good = App::start(Behaviour::Ok("paid")).await;
    let mut bad = Vec::new();
    for _ in 0..3 {
        bad.push(App::start(Behaviour::Status(503, "unavailable")).await);
    }
    let slow = App::start(Behaviour::Slow(Duration::from_millis(400), "slow")).await;
    let endpoints: Vec<(SocketAddr, &str)> = std::iter::once(good.addr)
        .chain(bad.iter().map(|a| a.addr))
        .map(|a| (a, "v1"))
        .collect();
    let slow_entry = entry(&[(slow.addr, "v1")], plain)
        .replace("name: payment-service", "name: ledger")
        .replace("hosts: [payment-service]", "hosts: [ledger]");
    let yaml = format!(
        "{}---
{slow_entry}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment-service, namespace: production}}
spec:
  hosts: [payment-service]
  http:
  - timeout: 5s
    retries: {{attempts: 3, perTryTimeout: 2s, retryOn: 'gateway-error,connect-failure'}}
    route:
    - destination: {{host: payment-service}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: payment-service, namespace: production}}
spec:
  host: payment-service
  trafficPolicy:
{tls}    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ledger, namespace: production}}
spec:
  host: ledger
  trafficPolicy:
{tls}    connectionPool:
      http: {{http1MaxPendingRequests: 1, http2MaxRequests: 1}}
",
        entry(&endpoints, plain),
        tls = plain.tls(),
    );
    let (proxy, client) = caller(&world, &yaml).await;

    // Every request succeeds: the failing servers' 503s are retried away.
    for i in 0..40 {
        let (status, body) = client
            .request("POST", "payment-service", "/pay", &[])
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "paid"),
            "{plain:?} request {i}"
        );
    }
    assert_eq!(good.hits(), 40);
    assert!(bad.iter().map(App::hits).sum::<usize>() >= 2);
    // Ejection is capped at half of the four servers.
    let clusters: serde_json::Value =
        serde_json::from_str(&proxy.admin("/clusters?format=json").await).unwrap();
    let payment = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .unwrap()
                .ends_with("|payment-service.production.svc.cluster.local")
        })
        .unwrap_or_else(|| panic!("{clusters}"));
    assert_eq!(payment["ejected"], 2, "{plain:?}: {payment}");

    // The pool admits one request at a time and queues one: of four at once, two are
    // refused with 503 UO and never reach the server.
    let requests = (0..4).map(|_| {
        let client = Client::new(proxy.outbound());
        tokio::spawn(async move { client.request("GET", "ledger", "/", &[]).await.unwrap() })
    });
    let mut statuses = Vec::new();
    for r in requests.collect::<Vec<_>>() {
        statuses.push(r.await.unwrap().0);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503, 503], "{plain:?}");
    assert_eq!(slow.hits(), 2);
    let metrics = proxy
        .metrics_when(|t| t.contains("response_flags=\"UO\""))
        .await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"ledger.production.svc.cluster.local\"")
                && l.contains("response_code=\"503\"")
                && l.contains("response_flags=\"UO\"")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_to_plain_servers_behind_tls_disable() {
    canary(Plain::TlsDisable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_to_plain_servers_by_auto_mtls() {
    canary(Plain::AutoMtls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilience_with_plain_servers_behind_tls_disable() {
    resilience(Plain::TlsDisable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resilience_with_plain_servers_by_auto_mtls() {
    resilience(Plain::AutoMtls).await;
}

/// One request to `payment-service` whose endpoint (a plain server) carries a service
/// account, with `extra` resources: the status and the requests the server received.
async fn one_call(location: &str, extra: &str) -> (u16, usize) {
    let world = World::new();
    let app = App::start(Behaviour::Ok("paid")).await;
    let yaml = format!(
        "{}{extra}",
        entry(&[(app.addr, "v1")], Plain::TlsDisable).replace("MESH_INTERNAL", location),
    )
    .replace("{port}", &app.addr.port().to_string());
    let (_proxy, client) = caller(&world, &yaml).await;
    let (status, _) = client
        .request("POST", "payment-service", "/pay", &[])
        .await
        .unwrap();
    (status, app.hits())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mtls_sends_plaintext_where_the_server_takes_only_plaintext() {
    let disable = |spec: &str| {
        format!(
            "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: payment-service, namespace: production}}
spec:
  selector: {{matchLabels: {{app: payment-service}}}}
  {spec}
"
        )
    };
    // The endpoint carries a service account: Istio mTLS, which a plain server fails.
    assert_eq!(one_call("MESH_INTERNAL", "").await, (503, 0));
    // Outside the mesh: plaintext.
    assert_eq!(one_call("MESH_EXTERNAL", "").await, (200, 1));
    // The server's PeerAuthentication disables mTLS for the workload.
    assert_eq!(
        one_call("MESH_INTERNAL", &disable("mtls: {mode: DISABLE}")).await,
        (200, 1)
    );
    // ... or for the port it listens on.
    assert_eq!(
        one_call(
            "MESH_INTERNAL",
            &disable("mtls: {mode: STRICT}\n  portLevelMtls: {{port}: {mode: DISABLE}}")
        )
        .await,
        (200, 1)
    );
    // DISABLE on another port leaves this one to Istio mTLS.
    assert_eq!(
        one_call(
            "MESH_INTERNAL",
            &disable("mtls: {mode: PERMISSIVE}\n  portLevelMtls: {1: {mode: DISABLE}}"),
        )
        .await,
        (503, 0)
    );
}
