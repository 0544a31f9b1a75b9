//! Istio's own sample files (bookinfo, helloworld, httpbin, cert-manager, tcp-echo) compile
//! into route tables whose decisions match what Istio does with them.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::StatusCode;
use mesh_core::config::{ClientTlsMode, SimpleLb};
use mesh_core::extensions::response_flags;
use mesh_routing::{CompileOptions, Listener, RouteTable, RouterHandle, Routing};
use support::{Recorder, decide, fixtures, request};
use tower::{Service, ServiceExt};

fn sample(files: &[&str]) -> Routing {
    let paths: Vec<String> = files.iter().map(|f| format!("istio-samples/{f}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    support::routing(&fixtures(&paths))
}

fn gateway(file: &str, namespace: &str, name: &str) -> RouteTable {
    let cfg = fixtures(&[&format!("istio-samples/{file}")]);
    Routing::compile(&cfg, &CompileOptions::gateway(namespace, name))
        .unwrap()
        .table
}

fn d(table: &RouteTable, uri: &str, headers: &[(&str, &str)]) -> String {
    decide(table, &request("GET", uri, headers)).unwrap_or_else(|e| e.to_owned())
}

const SVC: &str = ".default.svc.cluster.local";

#[test]
fn all_v1_sends_every_bookinfo_service_to_v1() {
    let r = sample(&["virtual-service-all-v1.yaml", "destination-rule-all.yaml"]);
    for svc in ["productpage", "reviews", "ratings", "details"] {
        assert_eq!(
            d(&r.table, &format!("http://{svc}:9080/"), &[]),
            format!("- -> {svc}{SVC}|v1|@100")
        );
    }
}

#[test]
fn reviews_90_10_splits_by_weight() {
    let r = sample(&["virtual-service-reviews-90-10.yaml"]);
    assert_eq!(
        d(&r.table, "http://reviews:9080/reviews/0", &[]),
        format!("- -> reviews{SVC}|v1|@90,reviews{SVC}|v2|@10")
    );
}

#[test]
fn jason_goes_to_v2_and_everyone_else_to_v3() {
    let r = sample(&["virtual-service-reviews-jason-v2-v3.yaml"]);
    assert_eq!(
        d(&r.table, "http://reviews/", &[("end-user", "jason")]),
        format!("- -> reviews{SVC}|v2|@100")
    );
    assert_eq!(
        d(&r.table, "http://reviews/", &[("end-user", "json")]),
        format!("- -> reviews{SVC}|v3|@100")
    );
    assert_eq!(
        d(&r.table, "http://reviews/", &[]),
        format!("- -> reviews{SVC}|v3|@100")
    );
}

#[test]
fn test_v2_sends_jason_to_v2_and_others_to_v1() {
    let r = sample(&["virtual-service-reviews-test-v2.yaml"]);
    assert_eq!(
        d(&r.table, "http://reviews/", &[("end-user", "jason")]),
        format!("- -> reviews{SVC}|v2|@100")
    );
    assert_eq!(
        d(&r.table, "http://reviews/", &[]),
        format!("- -> reviews{SVC}|v1|@100")
    );
}

/// Routes the ratings/details samples with a registry of v1 endpoints so requests complete.
fn with_v1_endpoints(file: &str, host: &str) -> Routing {
    let mut routing = sample(&[file, "destination-rule-all.yaml"]);
    routing.registry.insert_static(
        format!("{host}{SVC}"),
        mesh_routing::ServicePort::new(9080, "http"),
        vec![mesh_routing::WorkloadEntry::new("10.1.0.1").with_labels([("version", "v1")])],
    );
    routing
}

#[tokio::test]
async fn ratings_abort_fails_only_jason_with_500() {
    let routing = with_v1_endpoints("virtual-service-ratings-test-abort.yaml", "ratings");
    let rec = Recorder::default();
    let mut router = RouterHandle::with_seed(rec.make(), routing, 1).router();
    let res = router
        .ready()
        .await
        .unwrap()
        .call(request(
            "GET",
            "http://ratings:9080/ratings/0",
            &[("end-user", "jason")],
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response_flags(res.extensions()).to_string(), "FI");
    let res = router
        .ready()
        .await
        .unwrap()
        .call(request("GET", "http://ratings:9080/ratings/0", &[]))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(rec.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn ratings_delay_holds_jason_for_seven_seconds() {
    let routing = with_v1_endpoints("virtual-service-ratings-test-delay.yaml", "ratings");
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 1).router();
    let start = tokio::time::Instant::now();
    let res = router
        .ready()
        .await
        .unwrap()
        .call(request(
            "GET",
            "http://ratings:9080/",
            &[("end-user", "jason")],
        ))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(7));
    assert_eq!(response_flags(res.extensions()).to_string(), "DI");
    let start = tokio::time::Instant::now();
    router
        .ready()
        .await
        .unwrap()
        .call(request("GET", "http://ratings:9080/", &[]))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn details_fault_sample_aborts_everything_with_555() {
    let routing = with_v1_endpoints("fault-injection-details-v1.yaml", "details");
    let mut router = RouterHandle::with_seed(Recorder::default().make(), routing, 1).router();
    for _ in 0..20 {
        let res = router
            .ready()
            .await
            .unwrap()
            .call(request("GET", "http://details:9080/details/0", &[]))
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 555);
    }
}

#[test]
fn bookinfo_gateway_routes_the_product_page_paths_only() {
    let t = gateway("bookinfo-gateway.yaml", "default", "bookinfo-gateway");
    let pp = format!("- -> productpage{SVC}||9080@100");
    for path in [
        "/productpage",
        "/static/css/app.css",
        "/login",
        "/logout",
        "/api/v1/products/1",
    ] {
        assert_eq!(
            d(&t, &format!("http://bookinfo.example.com:8080{path}"), &[]),
            pp,
            "{path}"
        );
    }
    assert_eq!(
        d(&t, "http://bookinfo.example.com:8080/productpage/x", &[]),
        "NR"
    );
    assert_eq!(d(&t, "http://bookinfo.example.com:8080/admin", &[]), "NR");
    // Bound to the gateway only: sidecars do not see it.
    let mesh = sample(&["bookinfo-gateway.yaml"]).table;
    assert_eq!(
        d(&mesh, "http://bookinfo.example.com/productpage", &[]),
        "NR"
    );
}

#[test]
fn helloworld_httpbin_and_cert_manager_gateways() {
    let t = gateway("helloworld-gateway.yaml", "default", "helloworld-gateway");
    assert_eq!(
        d(&t, "http://any.host/hello", &[]),
        format!("- -> helloworld{SVC}||5000@100")
    );
    assert_eq!(d(&t, "http://any.host/hello/x", &[]), "NR");

    let t = gateway("httpbin-gateway.yaml", "default", "httpbin-gateway");
    assert_eq!(
        d(&t, "http://1.2.3.4/status/418", &[]),
        format!("- -> httpbin{SVC}||8000@100")
    );

    let t = gateway(
        "certmanager-gateway.yaml",
        "istio-system",
        "cert-manager-gateway",
    );
    assert_eq!(
        d(
            &t,
            "http://shop.example.com/.well-known/acme-challenge/token",
            &[]
        ),
        "- -> cert-manager-resolver.istio-system.svc.cluster.local||8089@100"
    );
    assert_eq!(
        d(&t, "http://shop.example.com/.well-known/other", &[]),
        "NR"
    );
    // The same gateway name in another namespace is a different gateway.
    let other = gateway(
        "certmanager-gateway.yaml",
        "default",
        "cert-manager-gateway",
    );
    assert_eq!(
        d(
            &other,
            "http://shop.example.com/.well-known/acme-challenge/t",
            &[]
        ),
        "NR"
    );
}

#[test]
fn destination_rule_samples_resolve_subset_policies() {
    let r = sample(&["destination-rule-reviews.yaml"]);
    let rule = r.rules.get(&format!("reviews{SVC}")).unwrap();
    for subset in ["v1", "v2", "v3"] {
        assert_eq!(rule.subset(subset).unwrap().labels["version"], subset);
        let p = rule.resolve(Some(subset), 9080);
        assert_eq!(p.load_balancer.unwrap().simple, Some(SimpleLb::Random));
    }
    assert!(rule.subset("v4").is_none());

    let r = sample(&["destination-rule-all-mtls.yaml"]);
    let rule = r.rules.get(&format!("ratings{SVC}")).unwrap();
    assert_eq!(rule.subsets.len(), 4);
    let p = rule.resolve(Some("v2-mysql"), 9080);
    assert_eq!(p.tls.unwrap().mode, Some(ClientTlsMode::IstioMutual));
}

#[test]
fn tcp_only_virtual_services_compile_without_http_routes() {
    for file in ["tcp-echo-all-v1.yaml", "tcp-echo-20-v2.yaml"] {
        let r = sample(&[file]);
        // TCP routing is not HTTP routing: an HTTP request to the host finds no route.
        assert_eq!(d(&r.table, "http://tcp-echo:9000/", &[]), "NR", "{file}");
        assert!(
            r.table
                .virtual_hosts()
                .iter()
                .all(|vh| vh.routes.is_empty())
        );
    }
}

#[test]
fn every_routing_sample_compiles_for_mesh_and_its_gateways() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../mesh-core/tests/fixtures/istio-samples");
    let mut compiled = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.ends_with(".yaml") || name.starts_with("security-") {
            continue;
        }
        let cfg = fixtures(&[&format!("istio-samples/{name}")]);
        Routing::compile(&cfg, &CompileOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        for gw in cfg.gateways() {
            let options = CompileOptions {
                listener: Listener::Gateway {
                    namespace: gw.metadata.namespace.clone(),
                    name: gw.metadata.name.clone(),
                },
                ..CompileOptions::default()
            };
            Routing::compile(&cfg, &options).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        compiled += 1;
    }
    assert_eq!(compiled, 16);
}
