//! Every field of istio/api's protos for the ten kinds is known to the loader, and every
//! field that is parsed but not enforced is reported where it is written.

use std::path::{Path, PathBuf};

use mesh_core::config::*;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/all-fields")
}

#[test]
fn documents_using_every_field_load_without_errors() {
    let report = load_paths(&[dir()], &LoadOptions::default());
    let errors: Vec<String> = report.errors().map(ToString::to_string).collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let kinds: Vec<Kind> = report.resources.iter().map(AnyResource::kind).collect();
    for k in Kind::ALL {
        assert!(kinds.contains(&k), "{k} has an all-fields document");
    }
    // Every apiVersion a kind is served under was used by at least one document or test.
    assert_eq!(report.resources.len(), 21);
}

#[test]
fn every_not_enforced_field_is_reported_where_it_is_written() {
    let report = load_paths(&[dir()], &LoadOptions::default());
    let warnings: Vec<&Diagnostic> = report.warnings().collect();
    for n in NOT_ENFORCED {
        let field = n.pattern.rsplit('.').next().unwrap();
        let expected = format!("`{field}` is parsed but not enforced: {}", n.effect);
        let hit = warnings.iter().find(|w| {
            w.message == expected
                && w.resource
                    .as_deref()
                    .is_some_and(|r| r.starts_with(n.kind.as_str()))
        });
        let hit = hit.unwrap_or_else(|| panic!("no warning for {:?} {}", n.kind, n.pattern));
        assert!(
            hit.line.is_some()
                && hit
                    .path
                    .as_deref()
                    .is_some_and(|p| p.ends_with(field.trim_end_matches("[]"))),
            "{hit}"
        );
    }
}

#[test]
fn warnings_point_at_the_field_not_its_children() {
    let report = load_paths(&[dir().join("sidecar.yaml")], &LoadOptions::default());
    // `egress[].port` has children (`number`, `protocol`, `name`): one warning, at the field.
    let port: Vec<&Diagnostic> = report
        .warnings()
        .filter(|w| w.message.starts_with("`port`"))
        .collect();
    assert_eq!(port.len(), 1);
    assert_eq!(port[0].path.as_deref(), Some("spec.egress[0].port"));
    assert_eq!(port[0].line_column(), Some((18, 5)));
}

#[test]
fn virtual_service_fields_parse_to_their_values() {
    let (config, _) = MeshConfig::load(
        &[dir().join("virtual-service.yaml")],
        &LoadOptions::default(),
    )
    .unwrap();
    let vs = &config.virtual_services()[0];
    assert_eq!(
        vs.metadata.creation_timestamp.as_deref(),
        Some("2024-05-01T12:00:00Z")
    );
    let main = &vs.spec.http[0];
    let m = &main.matches[0];
    assert_eq!(m.headers.get("x-present"), Some(&StringMatch::Present));
    assert_eq!(
        m.headers.get("x-any"),
        Some(&StringMatch::Regex("*".into()))
    );
    assert_eq!(
        m.query_params.get("debug"),
        Some(&StringMatch::Exact(String::new()))
    );
    assert_eq!(
        m.without_headers.get("x-internal"),
        Some(&StringMatch::Present)
    );
    assert!(m.ignore_uri_case);
    let retries = main.retries.as_ref().unwrap();
    assert_eq!(retries.backoff, Some(Duration::from_millis(50)));
    assert_eq!(retries.retry_ignore_previous_hosts, Some(true));
    let fault = main.fault.as_ref().unwrap();
    assert_eq!(
        fault.abort.as_ref().unwrap().grpc_status.as_deref(),
        Some("UNAVAILABLE")
    );
    assert_eq!(
        fault.delay.as_ref().unwrap().fixed_delay,
        Some(Duration::from_millis(100))
    );
    let cors = main.cors_policy.as_ref().unwrap();
    assert_eq!(cors.max_age, Some(Duration::from_secs(86_400)));
    assert_eq!(cors.unmatched_preflights, Some(UnmatchedPreflights::Ignore));
    let headers = main.route[0]
        .headers
        .as_ref()
        .unwrap()
        .request
        .as_ref()
        .unwrap();
    assert_eq!(headers.remove, ["x-debug"]);
    let redirect = vs.spec.http[2].redirect.as_ref().unwrap();
    assert_eq!(
        redirect.derive_port,
        Some(RedirectPortSelection::FromRequestPort)
    );
    assert_eq!(redirect.redirect_code, Some(308));
    let moved_prefix = vs.spec.http.last().unwrap().redirect.as_ref().unwrap();
    assert_eq!(moved_prefix.prefix_rewrite.as_deref(), Some("/v2/"));
    let rr = vs.spec.http[4]
        .rewrite
        .as_ref()
        .unwrap()
        .uri_regex_rewrite
        .as_ref()
        .unwrap();
    assert_eq!(rr.rewrite, "/api/\\1/\\2");
    let body = vs.spec.http[6]
        .direct_response
        .as_ref()
        .unwrap()
        .body
        .as_ref()
        .unwrap();
    assert_eq!(body.bytes.as_deref(), Some("aGVsbG8="));
    assert_eq!(
        vs.spec.http[7]
            .delegate
            .as_ref()
            .unwrap()
            .namespace
            .as_deref(),
        Some("legacy")
    );
    assert_eq!(
        vs.spec.tls[0].matches[0].sni_hosts,
        ["secure.shop.example.com"]
    );
    assert_eq!(
        vs.spec.tcp[0].matches[0].source_subnet.as_deref(),
        Some("10.2.0.0/16")
    );
}

#[test]
fn destination_rule_fields_parse_to_their_values() {
    let (config, _) = MeshConfig::load(
        &[dir().join("destination-rule.yaml")],
        &LoadOptions::default(),
    )
    .unwrap();
    let dr = &config.destination_rules()[0];
    let tp = dr.spec.traffic_policy.as_ref().unwrap();
    let lb = tp.load_balancer.as_ref().unwrap();
    assert_eq!(lb.simple, Some(SimpleLb::LeastRequest));
    assert_eq!(lb.warmup.as_ref().unwrap().aggression, Some(1.5));
    let dist = &lb.locality_lb_setting.as_ref().unwrap().distribute[0];
    assert_eq!(dist.to.get("us-east/zone2/*"), Some(&20));
    let keepalive = tp
        .connection_pool
        .as_ref()
        .unwrap()
        .tcp
        .as_ref()
        .unwrap()
        .tcp_keepalive
        .clone()
        .unwrap();
    assert_eq!(keepalive.time, Some(Duration::from_secs(7200)));
    let od = tp.outlier_detection.as_ref().unwrap();
    assert_eq!(od.outlier_detection_http_error_codes, [500, 503]);
    assert_eq!(od.min_health_percent, Some(20));
    assert_eq!(tp.tls.as_ref().unwrap().mode, Some(ClientTlsMode::Mutual));
    let port = &tp.port_level_settings[0];
    let cookie = port
        .load_balancer
        .as_ref()
        .unwrap()
        .consistent_hash
        .as_ref()
        .unwrap()
        .http_cookie
        .clone()
        .unwrap();
    assert_eq!(cookie.ttl, Some(Duration::from_secs(3600)));
    assert_eq!(
        cookie.attributes[1],
        CookieAttribute {
            name: "Secure".into(),
            value: None
        }
    );
    assert_eq!(tp.tunnel.as_ref().unwrap().target_port, 8443);
    assert_eq!(
        tp.proxy_protocol.as_ref().unwrap().version,
        Some(ProxyProtocolVersion::V2)
    );
    assert_eq!(tp.retry_budget.as_ref().unwrap().percent, Some(20.0));
    assert_eq!(
        dr.spec
            .workload_selector
            .as_ref()
            .unwrap()
            .match_labels
            .get("app")
            .map(String::as_str),
        Some("web")
    );
    // The rule selects clients labelled `app: web`: theirs, no one else's.
    let host = qualify_host("reviews", "shop");
    let web = mesh_core::Labels::from([("app".to_owned(), "web".to_owned())]);
    assert!(config.subset(&host, "shop", "v1").is_none());
    assert!(
        config
            .destination_rule_for_workload(&host, "shop", Some(&mesh_core::Labels::new()))
            .is_none()
    );
    let v1 = config
        .destination_rule_for_workload(&host, "shop", Some(&web))
        .unwrap()
        .spec
        .subsets
        .iter()
        .find(|s| s.name == "v1")
        .unwrap();
    let maglev = v1
        .traffic_policy
        .as_ref()
        .unwrap()
        .load_balancer
        .as_ref()
        .unwrap()
        .consistent_hash
        .as_ref()
        .unwrap()
        .maglev
        .clone();
    assert_eq!(
        maglev,
        Some(Maglev {
            table_size: Some(65537)
        })
    );
}

#[test]
fn gateway_service_entry_and_security_fields_parse_to_their_values() {
    let (config, _) = MeshConfig::load(&[dir()], &LoadOptions::default()).unwrap();
    let gw = config.gateway("shop", "edge").unwrap();
    let https = &gw.spec.servers[1];
    let tls = https.tls.as_ref().unwrap();
    assert_eq!(
        (tls.min_protocol_version, tls.max_protocol_version),
        (Some(TlsProtocol::V1_2), Some(TlsProtocol::V1_3))
    );
    assert_eq!(https.port.as_ref().unwrap().target_port, Some(8443));
    assert_eq!(
        gw.spec.servers[2].tls.as_ref().unwrap().credential_names,
        ["multi-rsa", "multi-ecdsa"]
    );
    assert!(gw.spec.servers[0].tls.as_ref().unwrap().https_redirect);

    let se = config.service_entries_for_host("payments.shop.internal");
    let se = se[0];
    assert_eq!(se.spec.resolution, Some(Resolution::Static));
    assert_eq!(se.spec.location, Some(Location::MeshInternal));
    let ep = &se.spec.endpoints[0];
    assert_eq!(
        (
            ep.ports.get("http"),
            ep.weight,
            ep.service_account.as_deref()
        ),
        (Some(&9080), Some(3), Some("payments"))
    );
    assert_eq!(ep.locality.as_deref(), Some("us-east/zone1"));

    let pa = &config.peer_authentications()[0];
    assert_eq!(
        pa.spec.port_level_mtls.get(&9091).unwrap().mode,
        Some(MtlsMode::Unset)
    );

    let ap = config
        .authorization_policies()
        .iter()
        .find(|a| a.name() == "payments")
        .unwrap();
    let src = ap.spec.rules[0].from.as_ref().unwrap()[0]
        .source
        .as_ref()
        .unwrap();
    assert_eq!(src.trust_domains, ["cluster.local"]);
    let op = ap.spec.rules[0].to.as_ref().unwrap()[0]
        .operation
        .as_ref()
        .unwrap();
    assert_eq!(op.paths[1], "/v1/{*}/items/{**}");
    let edge = config
        .authorization_policies()
        .iter()
        .find(|a| a.name() == "edge")
        .unwrap();
    assert_eq!(edge.spec.target_refs[0].kind, "Gateway");
    // targetRefs policies are not selected by labels.
    let labels: Labels = [("app".to_owned(), "payments".to_owned())].into();
    let names: Vec<&str> = config
        .authorization_policies_for("shop", &labels)
        .iter()
        .map(|a| a.name())
        .collect();
    assert_eq!(names, ["payments"]);
}
