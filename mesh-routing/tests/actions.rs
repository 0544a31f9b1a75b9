//! Every per-route action through the router (ISTIO.md §1.6, §1.7), the NR/NC/UH answers,
//! the route policy handed to the resilience layers, gateway binding (§1.1 VS-02/VS-06,
//! §7 GW-03) and DNS endpoints.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use mesh_core::body::{self, BoxBody};
use mesh_core::error::{BoxError, ClusterNotFound, NoHealthyUpstream, NoRoute};
use mesh_core::extensions::response_flags;
use mesh_routing::{CompileOptions, Listener, Router, RouterHandle, Routing, Target};
use support::{CHI2_1DF_P001, Dest, Recorder, chi_square, config, decide, request, routing};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

const REGISTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow, namespace: default}
spec:
  hosts: [shadow.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.1.1}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v9, labels: {version: v9}}
"#;

fn with_registry(vs: &str) -> Routing {
    routing(&config(&format!("{REGISTRY}\n---\n{vs}")))
}

async fn send(
    router: &mut Router<Dest>,
    req: Request<BoxBody>,
) -> Result<Response<BoxBody>, BoxError> {
    router.ready().await.unwrap().call(req).await
}

async fn text(res: Response<BoxBody>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: [web]\n  http:\n{http}"
    )
}

#[tokio::test]
async fn abort_answers_locally_with_status_body_and_fi() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(
        "  - fault: {abort: {httpStatus: 555, percentage: {value: 100}}}\n    route: [{destination: {host: web, subset: v1}}]\n",
    ));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    let res = send(&mut router, request("GET", "http://web/", &[]))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 555);
    assert_eq!(response_flags(res.extensions()).to_string(), "FI");
    assert_eq!(text(res).await, "fault filter abort");
    assert!(rec.seen().is_empty(), "an abort never reaches the upstream");
}

#[tokio::test]
async fn grpc_abort_is_a_trailers_only_response() {
    let routing = with_registry(&vs(
        "  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}\n    route: [{destination: {host: web}}]\n",
    ));
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 1).router();
    let res = send(
        &mut router,
        request(
            "POST",
            "http://web/svc/Method",
            &[("content-type", "application/grpc")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["grpc-status"], "14");
}

#[tokio::test(start_paused = true)]
async fn delay_holds_the_request_for_the_fixed_delay_then_forwards_with_di() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(
        "  - fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}}\n    route: [{destination: {host: web, subset: v1}}]\n",
    ));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    let start = tokio::time::Instant::now();
    let fut = router
        .ready()
        .await
        .unwrap()
        .call(request("GET", "http://web/", &[]));
    let mut fut = tokio_test::task::spawn(fut);
    assert!(fut.poll().is_pending());
    tokio::time::advance(Duration::from_millis(6_999)).await;
    assert!(fut.poll().is_pending());
    assert!(rec.seen().is_empty(), "not forwarded during the delay");
    tokio::time::advance(Duration::from_millis(1)).await;
    let res = fut.await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(7));
    assert_eq!(response_flags(res.extensions()).to_string(), "DI");
    assert_eq!(rec.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn delay_and_abort_both_apply_in_order() {
    let routing = with_registry(&vs(
        "  - fault:\n      delay: {fixedDelay: 2s, percentage: {value: 100}}\n      abort: {httpStatus: 503, percentage: {value: 100}}\n    route: [{destination: {host: web}}]\n",
    ));
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 1).router();
    let start = tokio::time::Instant::now();
    let res = send(&mut router, request("GET", "http://web/", &[]))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(res.status(), 503);
    assert_eq!(response_flags(res.extensions()).to_string(), "DI,FI");
}

#[tokio::test]
async fn fault_without_percentage_never_fires() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(
        "  - fault: {abort: {httpStatus: 500}, delay: {fixedDelay: 1s}}\n    route: [{destination: {host: web}}]\n",
    ));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    for _ in 0..500 {
        let res = send(&mut router, request("GET", "http://web/", &[]))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert!(response_flags(res.extensions()).is_empty());
    }
}

#[tokio::test]
async fn partial_abort_fires_for_its_share_of_requests() {
    let routing = with_registry(&vs(
        "  - fault: {abort: {httpStatus: 500, percentage: {value: 20}}}\n    route: [{destination: {host: web}}]\n",
    ));
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 5).router();
    let (mut aborted, mut ok) = (0, 0);
    for _ in 0..5_000 {
        match send(&mut router, request("GET", "http://web/", &[]))
            .await
            .unwrap()
            .status()
        {
            StatusCode::INTERNAL_SERVER_ERROR => aborted += 1,
            _ => ok += 1,
        }
    }
    assert!(
        chi_square(&[aborted, ok], &[0.2, 0.8]) < CHI2_1DF_P001,
        "{aborted}/{ok}"
    );
}

#[tokio::test]
async fn header_operations_apply_at_route_and_destination_level() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(r#"  - headers:
      request:
        set: {x-set: route}
        add: {x-add: route}
        remove: [x-secret]
      response:
        set: {x-resp: route}
        remove: [x-destination]
    route:
    - destination: {host: web, subset: v1}
      headers:
        request: {add: {x-add: dest}}
        response: {add: {x-resp-dest: "1"}}
"#));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    let res = send(
        &mut router,
        request(
            "GET",
            "http://web/",
            &[("x-set", "client"), ("x-add", "client"), ("x-secret", "s")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(res.headers()["x-resp"], "route");
    assert_eq!(res.headers()["x-resp-dest"], "1");
    assert!(!res.headers().contains_key("x-destination"));
    let seen = &rec.seen()[0];
    assert_eq!(seen.headers["x-set"], "route");
    assert_eq!(
        seen.headers.get_all("x-add").iter().collect::<Vec<_>>(),
        vec!["client", "route", "dest"]
    );
    assert!(!seen.headers.contains_key("x-secret"));
}

#[tokio::test]
async fn setting_host_header_rewrites_the_authority() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(
        "  - headers: {request: {set: {host: internal.example.com}}}\n    route: [{destination: {host: web}}]\n",
    ));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    send(&mut router, request("GET", "http://web/x", &[]))
        .await
        .unwrap();
    let seen = &rec.seen()[0];
    assert_eq!(seen.headers["host"], "internal.example.com");
    assert_eq!(seen.uri.host(), Some("internal.example.com"));
}

#[tokio::test]
async fn prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_original_path() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(r#"  - match: [{uri: {prefix: /ratings}}]
    rewrite: {uri: /v1/bookRatings, authority: ratings.internal}
    route: [{destination: {host: web}}]
  - match: [{uri: {regex: '/svc/[^/]+/.*'}}]
    rewrite: {uriRegexRewrite: {match: '^/svc/([^/]+)/(.*)$', rewrite: '/\2/of/\1'}}
    route: [{destination: {host: web}}]
"#));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    send(&mut router, request("GET", "http://web/ratings/5?x=1", &[]))
        .await
        .unwrap();
    send(&mut router, request("GET", "http://web/svc/foo/bar", &[]))
        .await
        .unwrap();
    let seen = rec.seen();
    assert_eq!(
        seen[0].uri.path_and_query().unwrap(),
        "/v1/bookRatings/5?x=1"
    );
    assert_eq!(seen[0].headers["x-envoy-original-path"], "/ratings/5?x=1");
    assert_eq!(seen[0].headers["host"], "ratings.internal");
    assert_eq!(seen[1].uri.path(), "/bar/of/foo");
}

#[tokio::test]
async fn redirect_and_direct_response_answer_locally() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(r#"  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: new.example.com, redirectCode: 308}
  - match: [{uri: {prefix: /moved}}]
    redirect: {scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}
  - match: [{uri: {prefix: /archive/}}]
    redirect: {prefixRewrite: /v2/}
  - match: [{uri: {exact: /maintenance}}]
    directResponse: {status: 503, body: {string: "down for maintenance"}}
  - match: [{uri: {exact: /bin}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - match: [{uri: {exact: /empty}}]
    directResponse: {status: 204}
"#));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    let res = send(&mut router, request("GET", "http://web/old?q=1", &[]))
        .await
        .unwrap();
    assert_eq!(res.status(), 308);
    assert_eq!(res.headers()["location"], "http://new.example.com/new?q=1");
    let res = send(&mut router, request("GET", "http://web:8080/moved/x", &[]))
        .await
        .unwrap();
    assert_eq!(res.status(), 301);
    assert_eq!(res.headers()["location"], "https://web/moved/x");
    // prefixRewrite replaces only the matched prefix and keeps the rest and the query.
    let res = send(
        &mut router,
        request("GET", "http://web/archive/2024/x?p=2", &[]),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 301);
    assert_eq!(res.headers()["location"], "http://web/v2/2024/x?p=2");
    let res = send(&mut router, request("GET", "http://web/maintenance", &[]))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(text(res).await, "down for maintenance");
    let res = send(&mut router, request("GET", "http://web/bin", &[]))
        .await
        .unwrap();
    assert_eq!(text(res).await, "hello");
    let res = send(&mut router, request("GET", "http://web/empty", &[]))
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert!(text(res).await.is_empty());
    assert!(rec.seen().is_empty());
}

#[tokio::test]
async fn route_policy_reaches_the_destination_in_request_extensions() {
    let rec = Recorder::default();
    let routing = with_registry(&vs(r#"  - name: orders
    match: [{uri: {prefix: /a}}]
    timeout: 5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,connect-failure,retriable-4xx"}
    route: [{destination: {host: web}}]
  - timeout: 0s
    route: [{destination: {host: web}}]
"#));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    send(&mut router, request("GET", "http://web/a", &[]))
        .await
        .unwrap();
    send(&mut router, request("GET", "http://web/b", &[]))
        .await
        .unwrap();
    let seen = rec.seen();
    let p = seen[0].policy.clone().unwrap();
    assert_eq!(p.timeout, Some(Duration::from_secs(5)));
    let retries = p.retries.unwrap();
    assert_eq!(retries.attempts, 3);
    assert_eq!(
        retries.per_try_timeout.unwrap().as_std(),
        Duration::from_secs(2)
    );
    assert_eq!(
        retries.retry_on.as_deref(),
        Some("gateway-error,connect-failure,retriable-4xx")
    );
    assert_eq!(p.route_name.as_deref(), Some("orders"));
    let p = seen[1].policy.clone().unwrap();
    assert_eq!(p.timeout, None, "0s disables the timeout");
    assert!(p.retries.is_none());
}

/// Mirror destinations: `shadow` answers after `delay` (or never) and records bodies.
fn mirror_make(
    rec: Recorder,
    mirrored: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl Fn(&Arc<Target>) -> Dest + Clone {
    let primary = rec.make();
    move |target: &Arc<Target>| {
        if target.key.host.starts_with("shadow.") {
            let mirrored = Arc::clone(&mirrored);
            BoxCloneSyncService::new(tower::service_fn(move |req: Request<BoxBody>| {
                let mirrored = Arc::clone(&mirrored);
                async move {
                    let host = req
                        .headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap().to_owned());
                    let body = req.into_body().collect().await?.to_bytes();
                    mirrored.lock().unwrap().push(format!(
                        "{}:{}",
                        host.unwrap_or_default(),
                        String::from_utf8_lossy(&body)
                    ));
                    // The mirror never answers: the caller must not notice.
                    std::future::pending::<()>().await;
                    Ok::<_, BoxError>(Response::new(body::empty()))
                }
            }))
        } else {
            primary(target)
        }
    }
}

#[tokio::test]
async fn mirror_gets_a_copy_and_never_delays_or_changes_the_response() {
    let rec = Recorder::default();
    let mirrored = Arc::new(std::sync::Mutex::new(Vec::new()));
    let routing = with_registry(&vs(
        "  - mirror: {host: shadow}\n    route: [{destination: {host: web, subset: v1}}]\n",
    ));
    let mut router =
        RouterHandle::with_seed(mirror_make(rec.clone(), Arc::clone(&mirrored)), routing, 1)
            .router();
    let mut req = request("POST", "http://web/orders", &[("host", "web")]);
    *req.body_mut() = body::full("order #1");
    let res = send(&mut router, req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(text(res).await, "web.default.svc.cluster.local|v1|80");
    assert_eq!(rec.seen()[0].body, "order #1");
    // The mirror task runs on its own; wait for it to have read the body.
    for _ in 0..100 {
        if !mirrored.lock().unwrap().is_empty() {
            break;
        }
        tokio::task::yield_now().await;
    }
    // No `-shadow` suffix on the mirrored Host (pinned choice 6).
    assert_eq!(
        mirrored.lock().unwrap().clone(),
        vec!["web:order #1".to_owned()]
    );
}

#[tokio::test]
async fn mirror_percentage_zero_mirrors_nothing() {
    let rec = Recorder::default();
    let mirrored = Arc::new(std::sync::Mutex::new(Vec::new()));
    let routing = with_registry(&vs(
        "  - mirror: {host: shadow}\n    mirrorPercentage: {value: 0}\n    route: [{destination: {host: web}}]\n",
    ));
    let mut router =
        RouterHandle::with_seed(mirror_make(rec.clone(), Arc::clone(&mirrored)), routing, 1)
            .router();
    for _ in 0..50 {
        send(&mut router, request("GET", "http://web/", &[]))
            .await
            .unwrap();
    }
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(mirrored.lock().unwrap().is_empty());
    assert_eq!(rec.seen().len(), 50);
}

#[tokio::test]
async fn no_matching_route_is_no_route() {
    let routing = with_registry(&vs(
        "  - match: [{uri: {prefix: /api}}]\n    route: [{destination: {host: web}}]\n",
    ));
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 1).router();
    let err = send(&mut router, request("GET", "http://web/other", &[]))
        .await
        .unwrap_err();
    assert!(mesh_core::is_caused_by::<NoRoute>(err.as_ref()));
    let err = send(
        &mut router,
        request("GET", "http://nobody.example.com/", &[]),
    )
    .await
    .unwrap_err();
    assert!(mesh_core::is_caused_by::<NoRoute>(err.as_ref()));
}

#[tokio::test]
async fn undefined_subset_or_unknown_host_is_cluster_not_found() {
    let routing = with_registry(&vs(r#"  - match: [{uri: {prefix: /undefined}}]
    route: [{destination: {host: web, subset: v7}}]
  - match: [{uri: {prefix: /unknown}}]
    route: [{destination: {host: nowhere}}]
  - match: [{uri: {prefix: /badport}}]
    route: [{destination: {host: web, port: {number: 9999}}}]
"#));
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 1).router();
    for path in ["/undefined", "/unknown", "/badport"] {
        let err = send(
            &mut router,
            request("GET", &format!("http://web{path}"), &[]),
        )
        .await
        .unwrap_err();
        let nc = mesh_core::find_cause::<ClusterNotFound>(err.as_ref())
            .unwrap_or_else(|| panic!("{path}: {err}"));
        assert!(nc.0.starts_with("outbound|"), "{nc:?}");
    }
}

#[tokio::test]
async fn subset_without_endpoints_is_no_healthy_upstream() {
    let routing = with_registry(&vs("  - route: [{destination: {host: web, subset: v9}}]\n"));
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 1).router();
    let err = send(&mut router, request("GET", "http://web/", &[]))
        .await
        .unwrap_err();
    assert!(mesh_core::is_caused_by::<NoHealthyUpstream>(err.as_ref()));
    assert_eq!(err.to_string(), "no healthy upstream");
}

#[tokio::test]
async fn registry_host_without_virtual_service_gets_a_default_route() {
    let rec = Recorder::default();
    let routing = routing(&config(REGISTRY));
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    let res = send(&mut router, request("GET", "http://shadow/", &[]))
        .await
        .unwrap();
    assert_eq!(
        res.headers()["x-destination"],
        "shadow.default.svc.cluster.local||80"
    );
}

#[tokio::test]
async fn destination_readiness_is_awaited_inside_the_response_future() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<BoxBody>, Response<BoxBody>>();
    handle.allow(0);
    let routing = with_registry(&vs("  - route: [{destination: {host: web}}]\n"));
    let make = move |_t: &Arc<Target>| -> Dest {
        BoxCloneSyncService::new(mock.clone().map_err(|e: BoxError| e))
    };
    let mut router = RouterHandle::with_seed(make, routing, 1).router();
    // The router itself is always ready: it does not know the destination yet.
    assert!(tokio_test::task::spawn(router.ready()).poll().is_ready());
    let mut fut = tokio_test::task::spawn(router.call(request("GET", "http://web/", &[])));
    assert!(fut.poll().is_pending());
    assert!(
        tokio_test::task::spawn(handle.next_request())
            .poll()
            .is_pending()
    );
    handle.allow(1);
    assert!(fut.poll().is_pending());
    let (req, send_response) = handle.next_request().await.unwrap();
    assert_eq!(req.uri().path(), "/");
    send_response.send_response(Response::new(body::empty()));
    assert_eq!(fut.await.unwrap().status(), 200);
}

#[tokio::test]
async fn destination_errors_pass_through_unchanged() {
    let routing = with_registry(&vs("  - route: [{destination: {host: web}}]\n"));
    let make = |_t: &Arc<Target>| -> Dest {
        BoxCloneSyncService::new(tower::service_fn(|_req: Request<BoxBody>| async {
            Err::<Response<BoxBody>, BoxError>(Box::new(mesh_core::error::Overflow))
        }))
    };
    let mut router = RouterHandle::with_seed(make, routing, 1).router();
    let err = send(&mut router, request("GET", "http://web/", &[]))
        .await
        .unwrap_err();
    assert!(mesh_core::is_caused_by::<mesh_core::error::Overflow>(
        err.as_ref()
    ));
}

const GATEWAYS: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.example.com"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: partner, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["edge/partner.example.org"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gw-only, namespace: edge}
spec:
  hosts: [shop.example.com]
  gateways: [public]
  http:
  - name: gw-only
    route: [{destination: {host: web.default.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: both, namespace: default}
spec:
  hosts: [api.example.com]
  gateways: [edge/public, mesh]
  http:
  - name: gateway-block
    match: [{uri: {prefix: /admin}, gateways: [edge/public]}]
    route: [{destination: {host: web}}]
  - name: mesh-block
    match: [{uri: {prefix: /admin}, gateways: [mesh]}]
    route: [{destination: {host: shadow}}]
  - name: both-rest
    route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything, namespace: edge}
spec:
  hosts: ["*"]
  gateways: [public]
  http:
  - name: star-narrowed
    route: [{destination: {host: web.default.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: apex, namespace: edge}
spec:
  hosts: [example.com]
  gateways: [public]
  http:
  - name: apex
    route: [{destination: {host: web.default.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: partner-from-default, namespace: default}
spec:
  hosts: [partner.example.org]
  gateways: [edge/partner]
  http:
  - name: partner-wrong-namespace
    route: [{destination: {host: web}}]
"#;

fn table_for(listener: Listener) -> mesh_routing::RouteTable {
    let cfg = config(&format!("{REGISTRY}\n---\n{GATEWAYS}"));
    let options = CompileOptions {
        listener,
        ..CompileOptions::default()
    };
    Routing::compile(&cfg, &options).unwrap().table
}

fn route_name(table: &mesh_routing::RouteTable, uri: &str) -> String {
    match decide(table, &request("GET", uri, &[])) {
        Ok(d) => d.split(" -> ").next().unwrap().to_owned(),
        Err(e) => e.to_owned(),
    }
}

#[test]
fn gateway_binding_selects_virtual_services_per_listener() {
    let mesh = table_for(Listener::Mesh);
    let public = table_for(Listener::Gateway {
        namespace: "edge".into(),
        name: "public".into(),
    });
    let partner = table_for(Listener::Gateway {
        namespace: "edge".into(),
        name: "partner".into(),
    });
    let cases: &[(&mesh_routing::RouteTable, &str, &str)] = &[
        // Bound only to the gateway: not on sidecars.
        (&mesh, "http://shop.example.com/", "NR"),
        (&public, "http://shop.example.com/", "gw-only"),
        // Listed gateways plus `mesh`: both; per-match gateways pick the block.
        (&mesh, "http://api.example.com/admin", "mesh-block"),
        (&public, "http://api.example.com/admin", "gateway-block"),
        (&mesh, "http://api.example.com/x", "both-rest"),
        (&public, "http://api.example.com/x", "both-rest"),
        // `*` VirtualService narrowed to the server's `*.example.com`.
        (&public, "http://other.example.com/", "star-narrowed"),
        (&public, "http://other.example.net/", "NR"),
        // `*.example.com` does not cover the apex.
        (&public, "http://example.com/", "NR"),
        // The partner server only admits VirtualServices of namespace edge.
        (&partner, "http://partner.example.org/", "NR"),
        (&partner, "http://shop.example.com/", "NR"),
    ];
    let mut failures = Vec::new();
    for (table, uri, expected) in cases {
        let got = route_name(table, uri);
        if got != *expected {
            failures.push(format!("{uri}: expected {expected}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gateway_tables_have_no_default_routes() {
    let public = table_for(Listener::Gateway {
        namespace: "edge".into(),
        name: "public".into(),
    });
    assert_eq!(
        route_name(&public, "http://web.default.svc.cluster.local/"),
        "NR"
    );
    let mesh = table_for(Listener::Mesh);
    assert_eq!(route_name(&mesh, "http://web/"), "default");
}

#[test]
fn dns_service_entry_endpoints_are_resolved_by_refresh() {
    let cfg = config(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.internal]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  endpoints: [{address: localhost}]
"#,
    );
    let rec = Recorder::default();
    // Made outside a runtime: nothing resolves until a refresh.
    let handle = RouterHandle::with_seed(rec.make(), routing(&cfg), 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut router = handle.router();
        let err = send(&mut router, request("GET", "http://db.internal:5432/", &[]))
            .await
            .unwrap_err();
        assert!(
            mesh_core::is_caused_by::<NoHealthyUpstream>(err.as_ref()),
            "nothing resolved yet"
        );
        handle.refresh_dns().await;
        let target = handle.snapshot().target(0).cloned().unwrap();
        let eps = target.endpoints();
        assert!(!eps.is_empty());
        assert!(
            eps.iter()
                .all(|e| e.address.ip().is_loopback() && e.address.port() == 5432)
        );
        let res = send(&mut router, request("GET", "http://db.internal:5432/", &[]))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    });
}

#[test]
fn source_labels_and_namespace_select_the_proxy_not_the_request() {
    let cfg = config(&format!(
        "{REGISTRY}\n---\n{}",
        vs(r#"  - name: from-frontend
    match: [{sourceLabels: {app: frontend}}]
    route: [{destination: {host: web, subset: v2}}]
  - name: from-ns-batch
    match: [{sourceNamespace: batch}]
    route: [{destination: {host: web, subset: v2}}]
  - name: rest
    route: [{destination: {host: web, subset: v1}}]
"#)
    ));
    let frontend = CompileOptions {
        workload_labels: [
            ("app".to_owned(), "frontend".to_owned()),
            ("version".to_owned(), "v3".to_owned()),
        ]
        .into(),
        ..CompileOptions::default()
    };
    let t = Routing::compile(&cfg, &frontend).unwrap().table;
    assert_eq!(route_name(&t, "http://web/"), "from-frontend");
    let t = Routing::compile(&cfg, &CompileOptions::default())
        .unwrap()
        .table;
    assert_eq!(route_name(&t, "http://web/"), "rest");
    let mut batch = CompileOptions::default();
    batch.naming.namespace = "batch".into();
    let t = Routing::compile(&cfg, &batch).unwrap().table;
    assert_eq!(route_name(&t, "http://web.default/"), "from-ns-batch");
}

#[tokio::test]
async fn new_dns_destinations_resolve_in_the_background_after_an_update() {
    let cfg = config(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cache, namespace: default}
spec:
  hosts: [cache.internal]
  resolution: DNS
  ports: [{number: 6379, name: tcp-redis, protocol: TCP}]
  endpoints: [{address: localhost}]
"#,
    );
    let handle = RouterHandle::with_seed(Recorder::default().make(), Routing::default(), 1);
    handle.update(routing(&cfg));
    let target = handle.snapshot().target(0).cloned().unwrap();
    for _ in 0..200 {
        if !target.endpoints().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let eps = target.endpoints();
    assert!(
        !eps.is_empty(),
        "the host itself is resolved when no endpoints are listed"
    );
    assert!(
        eps.iter()
            .all(|e| e.address.ip().is_loopback() && e.address.port() == 6379)
    );
}

#[test]
fn periodic_dns_refresh_resolves_at_once_and_keeps_running() {
    let cfg = config(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.internal]
  resolution: DNS
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  endpoints: [{address: localhost}]
"#,
    );
    // Made outside a runtime, so only the refresher can resolve.
    let handle = RouterHandle::with_seed(Recorder::default().make(), routing(&cfg), 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let task = handle.spawn_dns_refresh(Duration::from_secs(30));
        let target = handle.snapshot().target(0).cloned().unwrap();
        for _ in 0..400 {
            if !target.endpoints().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!target.endpoints().is_empty());
        assert!(!task.is_finished());
        task.abort();
    });
}
