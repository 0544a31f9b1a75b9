//! Istio's own sample files and the article's YAML blocks load, validate, and parse into
//! the content they spell.

use std::path::{Path, PathBuf};

use mesh_core::config::*;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Loads one fixture file and asserts it has no errors.
fn load_ok(rel: &str) -> (MeshConfig, LoadReport) {
    let (config, report) = MeshConfig::load(&[fixture(rel)], &LoadOptions::default())
        .unwrap_or_else(|errors| {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("{rel} must load, got:\n{}", text.join("\n"))
        });
    (config, report)
}

const DEFAULT: &str = "default";

fn ns_host(short: &str) -> String {
    qualify_host(short, DEFAULT)
}

#[test]
fn every_istio_sample_file_loads_without_errors() {
    let dir = fixture("istio-samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 18, "all sample files are fixtures");
    for f in files {
        let report = load_paths(&[&f], &LoadOptions::default());
        let errors: Vec<String> = report.errors().map(ToString::to_string).collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", f.display());
        assert!(!report.resources.is_empty(), "{}", f.display());
    }
}

#[test]
fn loading_the_samples_directory_sorts_files_and_counts_every_document() {
    let report = load_paths(&[fixture("istio-samples")], &LoadOptions::default());
    assert!(!report.has_errors());
    // 34 Istio documents across 18 files (trailing empty documents are not counted).
    assert_eq!(report.resources.len(), 34);
    let first = report.resources[0].origin();
    assert!(first.file.ends_with("bookinfo-gateway.yaml"));
    assert_eq!((first.document, first.seq), (1, 0));
    let seqs: Vec<usize> = report.resources.iter().map(|r| r.origin().seq).collect();
    assert_eq!(seqs, (0..34).collect::<Vec<_>>());
    // The same DestinationRule names appear in several files: later files replace earlier.
    let config = MeshConfig::from_report(&report, &LoadOptions::default()).unwrap();
    let reviews = config
        .destination_rule_for(&ns_host("reviews"), DEFAULT)
        .unwrap();
    assert!(
        reviews
            .origin
            .file
            .ends_with("destination-rule-reviews.yaml")
    );
    assert!(report.warnings().any(|w| {
        w.message
            .contains("DestinationRule/default/reviews is defined again")
    }));
}

#[test]
fn bookinfo_gateway_binds_the_productpage_routes() {
    let (config, _) = load_ok("istio-samples/bookinfo-gateway.yaml");
    let gw = config.gateway(DEFAULT, "bookinfo-gateway").unwrap();
    assert_eq!(gw.api_version, "networking.istio.io/v1");
    assert_eq!(
        gw.spec.selector.get("istio").map(String::as_str),
        Some("ingressgateway")
    );
    let server = &gw.spec.servers[0];
    let port = server.port.as_ref().unwrap();
    assert_eq!(
        (port.number, port.name.as_str(), port.protocol.as_str()),
        (8080, "http", "HTTP")
    );
    assert_eq!(server.hosts, ["*"]);

    let vs = config.virtual_services_for_gateway(DEFAULT, "bookinfo-gateway");
    assert_eq!(vs.len(), 1);
    let route = &vs[0].spec.http[0];
    let uris: Vec<&StringMatch> = route
        .matches
        .iter()
        .map(|m| m.uri.as_ref().unwrap())
        .collect();
    assert_eq!(
        uris,
        [
            &StringMatch::Exact("/productpage".into()),
            &StringMatch::Prefix("/static".into()),
            &StringMatch::Exact("/login".into()),
            &StringMatch::Exact("/logout".into()),
            &StringMatch::Prefix("/api/v1/products".into()),
        ]
    );
    let dest = &route.route[0].destination;
    assert_eq!(dest.host, "productpage");
    assert_eq!(dest.port, Some(PortSelector { number: 9080 }));
    assert_eq!(
        vs[0].qualify(&dest.host),
        "productpage.default.svc.cluster.local"
    );
    // A `*` host bound to a gateway only: not a sidecar VirtualService.
    assert_eq!(config.mesh_virtual_services().count(), 0);
}

#[test]
fn certmanager_gateway_keeps_its_namespace() {
    let (config, _) = load_ok("istio-samples/certmanager-gateway.yaml");
    assert!(
        config
            .gateway("istio-system", "cert-manager-gateway")
            .is_some()
    );
    let vs = config.virtual_services_for_gateway("istio-system", "cert-manager-gateway");
    assert_eq!(vs[0].metadata.namespace, "istio-system");
    assert_eq!(
        vs[0].spec.http[0].matches[0].uri,
        Some(StringMatch::Prefix("/.well-known/acme-challenge/".into()))
    );
    assert_eq!(
        vs[0].spec.http[0].route[0].destination.port,
        Some(PortSelector { number: 8089 })
    );
}

#[test]
fn destination_rule_all_defines_the_bookinfo_subsets() {
    let (config, report) = load_ok("istio-samples/destination-rule-all.yaml");
    assert_eq!(
        report.resources.len(),
        4,
        "the trailing empty document is not a resource"
    );
    let ratings = config
        .destination_rule_for(&ns_host("ratings"), DEFAULT)
        .unwrap();
    let names: Vec<&str> = ratings
        .spec
        .subsets
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["v1", "v2", "v2-mysql", "v2-mysql-vm"]);
    let subset = config
        .subset(&ns_host("ratings"), DEFAULT, "v2-mysql")
        .unwrap();
    assert_eq!(
        subset.labels.get("version").map(String::as_str),
        Some("v2-mysql")
    );
    assert!(config.subset(&ns_host("details"), DEFAULT, "v3").is_none());
    assert!(ratings.spec.traffic_policy.is_none());
}

#[test]
fn destination_rule_all_mtls_sets_istio_mutual_without_warnings() {
    let (config, report) = load_ok("istio-samples/destination-rule-all-mtls.yaml");
    for dr in config.destination_rules() {
        let tls = dr
            .spec
            .traffic_policy
            .as_ref()
            .unwrap()
            .tls
            .as_ref()
            .unwrap();
        assert_eq!(tls.mode, Some(ClientTlsMode::IstioMutual));
    }
    // ISTIO_MUTUAL is enforced, so nothing is reported.
    assert_eq!(report.warnings().count(), 0);
}

#[test]
fn destination_rule_reviews_uses_random_balancing() {
    let (config, _) = load_ok("istio-samples/destination-rule-reviews.yaml");
    let dr = config
        .destination_rule_for(&ns_host("reviews"), DEFAULT)
        .unwrap();
    let lb = dr
        .spec
        .traffic_policy
        .as_ref()
        .unwrap()
        .load_balancer
        .as_ref()
        .unwrap();
    assert_eq!(lb.simple, Some(SimpleLb::Random));
    assert_eq!(dr.spec.subsets.len(), 3);
}

#[test]
fn fault_injection_details_aborts_all_requests_with_555() {
    let (config, _) = load_ok("istio-samples/fault-injection-details-v1.yaml");
    let vs = config.virtual_services_for_host(&ns_host("details"));
    let abort = vs[0].spec.http[0]
        .fault
        .as_ref()
        .unwrap()
        .abort
        .as_ref()
        .unwrap();
    assert_eq!(abort.http_status, Some(555));
    assert_eq!(abort.percentage, Some(Percent { value: 100.0 }));
    assert_eq!(vs[0].spec.http.len(), 2);
    // The file ends without a newline, right after `version: v1`.
    let dr = config
        .destination_rule_for(&ns_host("details"), DEFAULT)
        .unwrap();
    assert_eq!(
        dr.spec.subsets[0].labels.get("version").map(String::as_str),
        Some("v1")
    );
}

#[test]
fn gateway_samples_route_to_their_service_ports() {
    for (file, gw, host, port) in [
        (
            "istio-samples/helloworld-gateway.yaml",
            "helloworld-gateway",
            "helloworld",
            5000,
        ),
        (
            "istio-samples/httpbin-gateway.yaml",
            "httpbin-gateway",
            "httpbin",
            8000,
        ),
    ] {
        let (config, _) = load_ok(file);
        let vs = config.virtual_services_for_gateway(DEFAULT, gw);
        let dest = &vs[0].spec.http[0].route[0].destination;
        assert_eq!(
            (dest.host.as_str(), dest.port.unwrap().number),
            (host, port),
            "{file}"
        );
        assert_eq!(
            config.gateway(DEFAULT, gw).unwrap().spec.servers[0]
                .port
                .as_ref()
                .unwrap()
                .number,
            80
        );
    }
}

#[test]
fn authorization_policy_sample_parses_sources_operations_and_conditions() {
    let (config, report) = load_ok("istio-samples/security-v1-AuthorizationPolicy.yaml");
    let labels: Labels = [("app", "httpbin"), ("version", "v1")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    let aps = config.authorization_policies_for(DEFAULT, &labels);
    assert_eq!(aps.len(), 1);
    let ap = aps[0];
    assert_eq!(ap.api_version, "security.istio.io/v1");
    assert_eq!(ap.spec.action, None);
    let rule = &ap.spec.rules[0];
    let from = rule.from.as_ref().unwrap();
    assert_eq!(
        from[0].source.as_ref().unwrap().principals,
        ["cluster.local/ns/default/sa/sleep"]
    );
    assert_eq!(from[1].source.as_ref().unwrap().namespaces, ["test"]);
    let to = rule.to.as_ref().unwrap();
    let op = to[0].operation.as_ref().unwrap();
    assert_eq!(
        (op.methods.as_slice(), op.paths.as_slice()),
        (&["GET".to_owned()][..], &["/info*".to_owned()][..])
    );
    assert_eq!(to[1].operation.as_ref().unwrap().paths, ["/data"]);
    assert_eq!(rule.when[0].key, "request.auth.claims[iss]");
    assert_eq!(rule.when[0].values, ["https://accounts.google.com"]);
    // The JWT condition is enforced (RequestAuthentication): no warning.
    let w: Vec<&Diagnostic> = report.warnings().collect();
    assert!(w.is_empty(), "{w:?}");
    // Another workload in the namespace is not selected.
    let other: Labels = [("app".to_owned(), "sleep".to_owned())].into();
    assert!(
        config
            .authorization_policies_for(DEFAULT, &other)
            .is_empty()
    );
}

#[test]
fn peer_authentication_sample_has_integer_port_keys() {
    let (config, _) = load_ok("istio-samples/security-v1beta1-PeerAuthentication.yaml");
    let pa = &config.peer_authentications()[0];
    assert_eq!(pa.api_version, "security.istio.io/v1beta1");
    assert_eq!(
        pa.spec.mtls.as_ref().unwrap().mode,
        Some(MtlsMode::Permissive)
    );
    assert_eq!(
        pa.spec.port_level_mtls.get(&8080).unwrap().mode,
        Some(MtlsMode::Strict)
    );
    let labels: Labels = [("app", "httpbin"), ("version", "v1")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    assert_eq!(config.peer_authentications_for(DEFAULT, &labels).len(), 1);
    assert!(
        config
            .peer_authentications_for(DEFAULT, &Labels::new())
            .is_empty()
    );
}

#[test]
fn tcp_echo_samples_split_80_20_and_load_without_warnings() {
    let (config, report) = load_ok("istio-samples/tcp-echo-20-v2.yaml");
    let vs = &config.virtual_services()[0];
    let tcp = &vs.spec.tcp[0];
    assert_eq!(tcp.matches[0].port, Some(31400));
    let split: Vec<(Option<&str>, Option<i32>)> = tcp
        .route
        .iter()
        .map(|d| (d.destination.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(split, [(Some("v1"), Some(80)), (Some("v2"), Some(20))]);
    // TCP routes are applied by sidecars: no "not enforced" warning for them.
    assert!(
        !report
            .warnings()
            .any(|w| w.path.as_deref() == Some("spec.tcp") || w.message.contains("not enforced")),
        "{:?}",
        report.warnings().collect::<Vec<_>>()
    );

    let (config, _) = load_ok("istio-samples/tcp-echo-all-v1.yaml");
    assert_eq!(
        config.gateways()[0].spec.servers[0]
            .port
            .as_ref()
            .unwrap()
            .protocol,
        "TCP"
    );
    assert_eq!(
        config.destination_rules()[0].metadata.name,
        "tcp-echo-destination"
    );
    assert_eq!(config.virtual_services()[0].spec.tcp[0].route.len(), 1);
}

#[test]
fn virtual_service_all_v1_routes_each_service_to_v1() {
    let (config, _) = load_ok("istio-samples/virtual-service-all-v1.yaml");
    for svc in ["productpage", "reviews", "ratings", "details"] {
        let vs = config.virtual_services_for_host(&ns_host(svc));
        assert_eq!(vs.len(), 1, "{svc}");
        let d = &vs[0].spec.http[0].route[0].destination;
        assert_eq!((d.host.as_str(), d.subset.as_deref()), (svc, Some("v1")));
    }
    assert_eq!(config.mesh_virtual_services().count(), 4);
}

#[test]
fn ratings_test_samples_inject_abort_and_delay_for_jason() {
    let (config, _) = load_ok("istio-samples/virtual-service-ratings-test-abort.yaml");
    let http = &config.virtual_services()[0].spec.http;
    assert_eq!(
        http[0].matches[0].headers.get("end-user"),
        Some(&StringMatch::Exact("jason".into()))
    );
    let abort = http[0].fault.as_ref().unwrap().abort.as_ref().unwrap();
    assert_eq!(
        (abort.http_status, abort.percentage.unwrap().value),
        (Some(500), 100.0)
    );
    assert!(http[1].matches.is_empty(), "second route is the catch-all");

    let (config, _) = load_ok("istio-samples/virtual-service-ratings-test-delay.yaml");
    let delay = config.virtual_services()[0].spec.http[0]
        .fault
        .as_ref()
        .unwrap()
        .delay
        .clone()
        .unwrap();
    assert_eq!(delay.fixed_delay, Some(Duration::from_secs(7)));
    assert_eq!(delay.percentage, Some(Percent { value: 100.0 }));
}

#[test]
fn reviews_samples_split_by_weight_and_by_header() {
    let (config, _) = load_ok("istio-samples/virtual-service-reviews-90-10.yaml");
    let route = &config.virtual_services()[0].spec.http[0].route;
    let w: Vec<(Option<&str>, Option<i32>)> = route
        .iter()
        .map(|d| (d.destination.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(w, [(Some("v1"), Some(90)), (Some("v2"), Some(10))]);

    for (file, jason, others) in [
        (
            "istio-samples/virtual-service-reviews-jason-v2-v3.yaml",
            "v2",
            "v3",
        ),
        (
            "istio-samples/virtual-service-reviews-test-v2.yaml",
            "v2",
            "v1",
        ),
    ] {
        let (config, _) = load_ok(file);
        let http = &config.virtual_services()[0].spec.http;
        assert_eq!(
            http[0].route[0].destination.subset.as_deref(),
            Some(jason),
            "{file}"
        );
        assert_eq!(
            http[1].route[0].destination.subset.as_deref(),
            Some(others),
            "{file}"
        );
    }
}

// ------------------------------------------------------------------- article fixtures

#[test]
fn article_peer_authentication_makes_production_strict() {
    let (config, report) = load_ok("article/peer-authentication-strict.yaml");
    let pa = &config.peer_authentications()[0];
    assert_eq!((pa.name(), pa.namespace()), ("default", "production"));
    assert_eq!(pa.spec.mtls.as_ref().unwrap().mode, Some(MtlsMode::Strict));
    assert!(pa.spec.selector.is_none(), "namespace-wide");
    assert_eq!(
        config
            .peer_authentications_for("production", &Labels::new())
            .len(),
        1
    );
    assert!(
        config
            .peer_authentications_for("staging", &Labels::new())
            .is_empty()
    );
    assert_eq!(report.diagnostics.len(), 0);
}

#[test]
fn article_authorization_policy_admits_only_order_service() {
    let (config, report) = load_ok("article/authorization-policy-payment.yaml");
    let labels: Labels = [("app".to_owned(), "payment-service".to_owned())].into();
    let ap = config.authorization_policies_for("production", &labels)[0];
    assert_eq!(ap.spec.action.unwrap_or_default(), Action::Allow);
    let rule = &ap.spec.rules[0];
    let src = rule.from.as_ref().unwrap()[0].source.as_ref().unwrap();
    assert_eq!(
        src.principals,
        ["cluster.local/ns/production/sa/order-service"]
    );
    let op = rule.to.as_ref().unwrap()[0].operation.as_ref().unwrap();
    assert_eq!(op.methods, ["POST"]);
    assert_eq!(op.paths, ["/api/v1/payments", "/api/v1/payments/*"]);
    assert_eq!(report.diagnostics.len(), 0);
}

#[test]
fn article_canary_skips_the_deployment_and_splits_95_5() {
    let (config, report) = load_ok("article/canary-order-service.yaml");
    let notes: Vec<&Diagnostic> = report.notes().collect();
    assert_eq!(notes.len(), 1);
    assert_eq!(
        notes[0].to_string(),
        format!(
            "{}:5:7: note: document 1: skipped Deployment apps/v1 order-service-v2: not an Istio resource",
            fixture("article/canary-order-service.yaml").display()
        )
    );
    assert_eq!(report.resources.len(), 2);
    assert_eq!(report.resources[0].origin().document, 2);

    let host = ns_host("order-service");
    let dr = config.destination_rule_for(&host, DEFAULT).unwrap();
    assert_eq!(dr.api_version, "networking.istio.io/v1beta1");
    assert_eq!(
        dr.spec
            .subsets
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["v1", "v2"]
    );
    let pool = dr
        .spec
        .traffic_policy
        .as_ref()
        .unwrap()
        .connection_pool
        .as_ref()
        .unwrap();
    assert_eq!(pool.tcp.as_ref().unwrap().max_connections, Some(100));
    assert_eq!(
        pool.http.as_ref().unwrap().h2_upgrade_policy,
        Some(H2UpgradePolicy::Upgrade)
    );

    let vs = config.virtual_services_for_host(&host)[0];
    assert_eq!(
        vs.spec.http[0].matches[0].headers.get("x-canary"),
        Some(&StringMatch::Exact("true".into()))
    );
    assert_eq!(
        vs.spec.http[0].route[0].destination.subset.as_deref(),
        Some("v2")
    );
    let split: Vec<(Option<&str>, Option<i32>)> = vs.spec.http[1]
        .route
        .iter()
        .map(|d| (d.destination.subset.as_deref(), d.weight))
        .collect();
    assert_eq!(split, [(Some("v1"), Some(95)), (Some("v2"), Some(5))]);
    assert_eq!(
        report.resources[1].summary(),
        "VirtualService default/order-service: 2 http routes"
    );
}

#[test]
fn article_resilience_sets_timeout_retries_pool_and_outlier_detection() {
    let (config, report) = load_ok("article/payment-service-resilience.yaml");
    let host = ns_host("payment-service");
    let route = &config.virtual_services_for_host(&host)[0].spec.http[0];
    assert_eq!(route.timeout, Some(Duration::from_secs(5)));
    let retries = route.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        retries.retry_on.as_deref(),
        Some("gateway-error,connect-failure,retriable-4xx")
    );

    let tp = config
        .destination_rule_for(&host, DEFAULT)
        .unwrap()
        .spec
        .traffic_policy
        .clone()
        .unwrap();
    let http = tp.connection_pool.unwrap().http.unwrap();
    assert_eq!(http.http1_max_pending_requests, Some(100));
    assert_eq!(http.max_requests_per_connection, Some(10));
    let od = tp.outlier_detection.unwrap();
    assert_eq!(od.consecutive_5xx_errors, Some(5));
    assert_eq!(od.interval, Some(Duration::from_secs(30)));
    assert_eq!(od.base_ejection_time, Some(Duration::from_secs(30)));
    assert_eq!(od.max_ejection_percent, Some(50));
    assert_eq!(report.diagnostics.len(), 0);
}

#[test]
fn article_gateway_terminates_tls_and_routes_by_prefix() {
    let (config, report) = load_ok("article/api-gateway.yaml");
    let gw = config.gateway(DEFAULT, "api-gateway").unwrap();
    let server = &gw.spec.servers[0];
    let tls = server.tls.as_ref().unwrap();
    assert_eq!(tls.mode, Some(ServerTlsMode::Simple));
    assert_eq!(tls.credential_name.as_deref(), Some("api-tls-cert"));
    assert_eq!(server.port.as_ref().unwrap().number, 443);
    assert_eq!(server.hosts, ["api.example.com"]);
    let labels: Labels = [("istio".to_owned(), "ingress".to_owned())].into();
    assert_eq!(config.gateways_for_labels(&labels).len(), 1);

    let vs = config.virtual_services_for_host("api.example.com")[0];
    let prefixes: Vec<(&StringMatch, &str)> = vs
        .spec
        .http
        .iter()
        .map(|r| {
            (
                r.matches[0].uri.as_ref().unwrap(),
                r.route[0].destination.host.as_str(),
            )
        })
        .collect();
    assert_eq!(
        prefixes,
        [
            (
                &StringMatch::Prefix("/api/v1/orders".into()),
                "order-service"
            ),
            (
                &StringMatch::Prefix("/api/v1/payments".into()),
                "payment-service"
            ),
        ]
    );
    assert_eq!(report.diagnostics.len(), 0);
}

#[test]
fn article_directory_loads_as_one_configuration() {
    let (config, report) =
        MeshConfig::load(&[fixture("article")], &LoadOptions::default()).unwrap();
    assert_eq!(report.notes().count(), 1);
    assert_eq!(config.virtual_services().len(), 3);
    assert_eq!(config.destination_rules().len(), 2);
    assert_eq!(
        config.namespaces().collect::<Vec<_>>(),
        ["default", "production"]
    );
    assert_eq!(
        config.count_in_namespace("production", Kind::PeerAuthentication),
        1
    );
}
