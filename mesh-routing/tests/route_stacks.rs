//! Route stacks: a maker's per-route services are built when a table is compiled (once
//! per route policy and destination, again on every update), never per request, and a
//! changed DestinationRule policy can replace a kept destination's service.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Response;
use mesh_core::body::{self, BoxBody};
use mesh_core::error::BoxError;
use mesh_core::extensions::RoutePolicy;
use mesh_routing::{MakeDestination, RouterHandle, Target};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

type Svc = BoxCloneSyncService<http::Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Answers `<destination> timeout=<route timeout>` and counts what it was asked to make.
#[derive(Clone, Default)]
struct Counting {
    made: Arc<AtomicUsize>,
    routes: Arc<AtomicUsize>,
    replaced: Arc<AtomicUsize>,
}

fn answer(text: String) -> Svc {
    BoxCloneSyncService::new(tower::service_fn(move |req: http::Request<BoxBody>| {
        let text = text.clone();
        async move {
            // The stack applies the route policy itself: the router leaves none behind.
            assert!(req.extensions().get::<RoutePolicy>().is_none());
            Ok::<_, BoxError>(Response::new(body::full(text)))
        }
    }))
}

impl MakeDestination for Counting {
    type Service = Svc;

    fn make(&self, target: &Arc<Target>) -> Svc {
        self.made.fetch_add(1, Ordering::SeqCst);
        answer(format!("{} timeout=none", target.key.host))
    }

    fn route(&self, policy: &Arc<RoutePolicy>, _destination: &Svc, target: &Arc<Target>) -> Svc {
        self.routes.fetch_add(1, Ordering::SeqCst);
        answer(format!("{} timeout={:?}", target.key.host, policy.timeout))
    }

    fn routes_apply_policy(&self) -> bool {
        true
    }

    fn policy_changed(&self, _service: &Svc, target: &Arc<Target>) -> Option<Svc> {
        self.replaced.fetch_add(1, Ordering::SeqCst);
        Some(self.make(target))
    }
}

fn yaml(timeout: &str, max_ejection: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 10.0.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - match: [{{uri: {{prefix: /slow}}}}]
    timeout: {timeout}
    route: [{{destination: {{host: reviews}}}}]
  - route: [{{destination: {{host: reviews}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  trafficPolicy: {{outlierDetection: {{maxEjectionPercent: {max_ejection}}}}}
"
    )
}

async fn get(handle: &RouterHandle<Counting>, path: &str) -> String {
    let req = support::request("GET", &format!("http://reviews{path}"), &[]);
    let res = handle.router().oneshot(req).await.expect("routed");
    let bytes = http_body_util::BodyExt::collect(res.into_body())
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn route_stacks_are_built_per_compile_not_per_request() {
    let make = Counting::default();
    let handle = RouterHandle::new(
        make.clone(),
        support::routing(&support::config(&yaml("5s", 50))),
    );
    // Two routes with different policies to one destination: two stacks, one service.
    assert_eq!(make.made.load(Ordering::SeqCst), 1);
    assert_eq!(make.routes.load(Ordering::SeqCst), 2);
    for _ in 0..10 {
        assert_eq!(
            get(&handle, "/slow/a").await,
            "reviews.default.svc.cluster.local timeout=Some(5s)"
        );
        assert_eq!(
            get(&handle, "/").await,
            "reviews.default.svc.cluster.local timeout=None"
        );
    }
    assert_eq!(make.routes.load(Ordering::SeqCst), 2, "built per request");

    // A new route policy: the stacks are built again around the kept destination.
    handle.update(support::routing(&support::config(&yaml("2s", 50))));
    assert_eq!(make.made.load(Ordering::SeqCst), 1);
    assert_eq!(make.routes.load(Ordering::SeqCst), 4);
    assert_eq!(make.replaced.load(Ordering::SeqCst), 0);
    assert_eq!(
        get(&handle, "/slow").await,
        "reviews.default.svc.cluster.local timeout=Some(2s)"
    );

    // A new DestinationRule policy: the maker may replace the kept destination.
    handle.update(support::routing(&support::config(&yaml("2s", 10))));
    assert_eq!(make.replaced.load(Ordering::SeqCst), 1);
    assert_eq!(make.made.load(Ordering::SeqCst), 2);
}
