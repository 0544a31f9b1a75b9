//! The stacks of `benches/benches/stack.rs` and `stack_counts.rs`: payment-service and
//! order-service as two [`Mesh`]es in one process, from the article's policy (STRICT
//! mTLS, the AuthorizationPolicy, retries under a 5 s deadline, outlier detection, pool
//! limits), around a no-op application.
//!
//! - `inbound`: payment-service's inbound stack called directly (sanitize → telemetry →
//!   respond → AuthorizationPolicy, allowing the caller → no-op), with the caller's
//!   identity in the request as a TLS accept leaves it;
//! - `outbound_inbound`: order-service's outbound stack (telemetry → router → deadline
//!   5 s → retries → pool limits → balancer with outlier detection) → mTLS over h2 on
//!   loopback → payment-service's inbound stack (`Mesh::serve_inbound`) → no-op.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody};
use mesh_core::extensions::{ConnectionInfo, ConnectionSecurity};
use mesh_core::{Identity, PeerIdentity};
use mesh_proxy::stack::HttpService;
use mesh_proxy::{Certificates, Mesh, Outbound, Workload};
use tower::{ServiceExt, service_fn};

/// The article's payment-service policy: STRICT mTLS, only order-service may POST,
/// retries under a 5 s deadline, outlier detection and pool limits.
const ISTIO: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: production}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-service, namespace: production}
spec:
  selector: {matchLabels: {app: payment-service}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/production/sa/order-service]}}]
    to: [{operation: {methods: [POST], paths: [/api/v1/payments*]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-service, namespace: production}
spec:
  hosts: [payment-service]
  http:
  - timeout: 5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"gateway-error,connect-failure\"}
    route: [{destination: {host: payment-service}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment-service, namespace: production}
spec:
  host: payment-service
  trafficPolicy:
    connectionPool: {http: {http1MaxPendingRequests: 1024, http2MaxRequests: 1024}}
    outlierDetection: {consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50}
";

/// The two meshes, payment-service's inbound stack and order-service's outbound stack.
pub struct World {
    payment: Mesh,
    order: Mesh,
    inbound: HttpService,
    outbound: Outbound,
    /// The caller's identity, parsed once, as a TLS accept does per connection.
    caller: Identity,
    _dir: tempfile::TempDir,
}

fn noop() -> impl tower::Service<
    Request<BoxBody>,
    Response = Response<BoxBody>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    service_fn(|_req: Request<BoxBody>| async { Ok(Response::new(body::full("paid"))) })
}

/// A current-thread runtime (a request's work, both stacks and their connection tasks,
/// all on the calling thread) with [`world`] built on it.
pub fn start() -> (tokio::runtime::Runtime, World) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let w = rt.block_on(world());
    (rt, w)
}

/// Builds both meshes from the article's policy; payment-service listens on loopback.
pub async fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Arc::new(mesh_tls::CertificateAuthority::new("cluster.local").expect("ca"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let entry = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: payment-service, namespace: production}}\n\
         spec:\n  hosts: [payment-service]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n\
         \x20 endpoints:\n  - address: 127.0.0.1\n    ports: {{http: {port}}}\n    serviceAccount: payment-service\n"
    );
    std::fs::write(dir.path().join("mesh.yaml"), format!("{entry}---\n{ISTIO}")).expect("yaml");
    let certificates = Certificates::Issuer { ca, lifetime: None };
    let build = |sa: &str| {
        Mesh::builder(Workload::new("production", sa).label("app", sa))
            .config_dir(dir.path())
            .certificates(certificates.clone())
            .build()
            .expect("mesh")
    };
    let payment = build("payment-service");
    payment.serve_inbound(listener, noop());
    let order = build("order-service");
    World {
        inbound: payment.inbound(noop()),
        outbound: order.outbound(),
        caller: Identity::parse("spiffe://cluster.local/ns/production/sa/order-service")
            .expect("identity"),
        payment,
        order,
        _dir: dir,
    }
}

/// A POST as the inbound stack receives it after order-service's mTLS handshake: the
/// connection's identity is shared by its requests (one reference count each).
fn inbound_request(caller: &Identity) -> Request<BoxBody> {
    let mut req = Request::post("/api/v1/payments")
        .header("host", "payment-service")
        .body(body::empty())
        .expect("request");
    req.extensions_mut().insert(PeerIdentity(caller.clone()));
    let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
    req.extensions_mut().insert(ConnectionInfo {
        remote: addr(40_000),
        local: addr(8080),
        security: ConnectionSecurity::MutualTls,
    });
    req
}

/// One request through payment-service's inbound stack, answered 200 and read.
pub async fn inbound(w: &World) {
    let res = w
        .inbound
        .clone()
        .oneshot(inbound_request(&w.caller))
        .await
        .expect("inbound");
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.expect("body");
}

/// One request through order-service's outbound stack to payment-service, over mTLS.
pub async fn outbound(w: &World) {
    let req = Request::post("http://payment-service/api/v1/payments")
        .body(body::empty())
        .expect("request");
    let res = w.outbound.clone().oneshot(req).await.expect("outbound");
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.expect("body");
}

/// The scenarios by name.
pub const SCENARIOS: [&str; 2] = ["inbound", "outbound_inbound"];

/// One request of the scenario `name` ([`SCENARIOS`]).
pub async fn request(w: &World, name: &str) {
    match name {
        "inbound" => inbound(w).await,
        "outbound_inbound" => outbound(w).await,
        other => panic!("unknown scenario {other:?}; one of {SCENARIOS:?}"),
    }
}

impl World {
    /// Stops both meshes' listeners and tasks.
    pub fn shutdown(&self) {
        self.payment.shutdown();
        self.order.shutdown();
    }
}
