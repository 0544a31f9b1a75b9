//! Table-driven tests of every match field (ISTIO.md §1.2), of host lookup and of the
//! precedence rules (§1.1), through the real compilation path from YAML.

#![allow(clippy::unwrap_used)]

mod support;

use support::{config, decide, request, routing};

const MATCHES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: default}
spec:
  hosts: [shop.example.com]
  http:
  - name: exact-uri
    match: [{uri: {exact: /exact}}]
    route: [{destination: {host: shop.example.com}}]
  - name: prefix-uri
    match: [{uri: {prefix: /prefix}}]
    route: [{destination: {host: shop.example.com}}]
  - name: regex-uri
    match: [{uri: {regex: '/items/\d+'}}]
    route: [{destination: {host: shop.example.com}}]
  - name: icase-exact
    match: [{uri: {exact: /CaseLess}, ignoreUriCase: true}]
    route: [{destination: {host: shop.example.com}}]
  - name: icase-prefix
    match: [{uri: {prefix: /IC/}, ignoreUriCase: true}]
    route: [{destination: {host: shop.example.com}}]
  - name: icase-regex
    match: [{uri: {regex: '/Re[0-9]'}, ignoreUriCase: true}]
    route: [{destination: {host: shop.example.com}}]
  - name: header-exact
    match: [{headers: {x-user: {exact: jason}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: header-prefix
    match: [{headers: {x-tier: {prefix: gold}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: header-regex
    match: [{headers: {x-id: {regex: '\d+$'}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: header-present
    match: [{headers: {x-present: {}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: header-star
    match: [{headers: {x-star: {regex: '*'}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: without-exact
    match: [{uri: {prefix: /without}, withoutHeaders: {x-block: {exact: "yes"}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: without-present
    match: [{uri: {prefix: /absent}, withoutHeaders: {x-absent: {}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: method
    match: [{uri: {prefix: /method}, method: {exact: POST}}]
    route: [{destination: {host: shop.example.com}}]
  - name: authority
    match: [{uri: {prefix: /auth}, authority: {exact: "shop.example.com:8443"}}]
    route: [{destination: {host: shop.example.com}}]
  - name: scheme
    match: [{uri: {prefix: /scheme}, scheme: {exact: https}}]
    route: [{destination: {host: shop.example.com}}]
  - name: query-exact
    match: [{uri: {prefix: /query}, queryParams: {v: {exact: "2"}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: query-flag
    match: [{uri: {prefix: /qflag}, queryParams: {debug: {exact: ""}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: query-regex
    match: [{uri: {prefix: /page}, queryParams: {page: {regex: '\d+'}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: port
    match: [{uri: {prefix: /port}, port: 8080}]
    route: [{destination: {host: shop.example.com}}]
  - name: or-blocks
    match: [{uri: {exact: /a}}, {uri: {exact: /b}}]
    route: [{destination: {host: shop.example.com}}]
  - name: and-block
    match: [{uri: {prefix: /and}, headers: {x-a: {exact: "1"}}, method: {exact: GET}}]
    route: [{destination: {host: shop.example.com}}]
  - name: pseudo-header-key-ignored
    match: [{uri: {prefix: /pseudo}, headers: {method: {exact: POST}}}]
    route: [{destination: {host: shop.example.com}}]
  - name: catch-all
    route: [{destination: {host: shop.example.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: precedence, namespace: default}
spec:
  hosts: [prec.example.com]
  http:
  - name: first
    match: [{uri: {prefix: /api}}]
    route: [{destination: {host: prec.example.com}}]
  - name: shadowed
    match: [{uri: {exact: /api/v1}}]
    route: [{destination: {host: prec.example.com}}]
  - name: canary-after-generic
    match: [{headers: {x-canary: {exact: "true"}}}]
    route: [{destination: {host: prec.example.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wild, namespace: default}
spec:
  hosts: ["*.wild.com"]
  http:
  - name: wild
    route: [{destination: {host: backend.wild.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: deeper-wild, namespace: default}
spec:
  hosts: ["*.api.wild.com"]
  http:
  - name: deeper-wild
    route: [{destination: {host: api.wild.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: reviews
    route: [{destination: {host: reviews}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: other}
spec:
  hosts: [ratings]
  http:
  - name: ratings-other
    route: [{destination: {host: ratings}}]
"#;

/// (case, method, uri, headers, expected route name or "NR").
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

const CASES: &[Case] = &[
    (
        "uri exact",
        "GET",
        "http://shop.example.com/exact",
        &[],
        "exact-uri",
    ),
    (
        "uri exact is not a prefix",
        "GET",
        "http://shop.example.com/exact/more",
        &[],
        "catch-all",
    ),
    (
        "uri exact ignores the query",
        "GET",
        "http://shop.example.com/exact?x=1",
        &[],
        "exact-uri",
    ),
    (
        "uri prefix",
        "GET",
        "http://shop.example.com/prefix/x",
        &[],
        "prefix-uri",
    ),
    (
        "uri prefix is a raw string prefix",
        "GET",
        "http://shop.example.com/prefixed",
        &[],
        "prefix-uri",
    ),
    (
        "uri exact is case-sensitive",
        "GET",
        "http://shop.example.com/EXACT",
        &[],
        "catch-all",
    ),
    (
        "uri regex full match",
        "GET",
        "http://shop.example.com/items/42",
        &[],
        "regex-uri",
    ),
    (
        "uri regex must match the whole path",
        "GET",
        "http://shop.example.com/items/42/x",
        &[],
        "catch-all",
    ),
    (
        "uri regex is not searched inside",
        "GET",
        "http://shop.example.com/x/items/42",
        &[],
        "catch-all",
    ),
    (
        "ignoreUriCase exact upper",
        "GET",
        "http://shop.example.com/CASELESS",
        &[],
        "icase-exact",
    ),
    (
        "ignoreUriCase exact lower",
        "GET",
        "http://shop.example.com/caseless",
        &[],
        "icase-exact",
    ),
    (
        "ignoreUriCase prefix",
        "GET",
        "http://shop.example.com/ic/anything",
        &[],
        "icase-prefix",
    ),
    (
        "ignoreUriCase does not touch regex",
        "GET",
        "http://shop.example.com/re1",
        &[],
        "catch-all",
    ),
    (
        "regex under ignoreUriCase still matches its own case",
        "GET",
        "http://shop.example.com/Re1",
        &[],
        "icase-regex",
    ),
    (
        "header exact",
        "GET",
        "http://shop.example.com/",
        &[("x-user", "jason")],
        "header-exact",
    ),
    (
        "header exact is case-sensitive",
        "GET",
        "http://shop.example.com/",
        &[("x-user", "Jason")],
        "catch-all",
    ),
    (
        "header prefix",
        "GET",
        "http://shop.example.com/",
        &[("x-tier", "golden")],
        "header-prefix",
    ),
    (
        "header regex full match",
        "GET",
        "http://shop.example.com/",
        &[("x-id", "123")],
        "header-regex",
    ),
    (
        "header regex does not search",
        "GET",
        "http://shop.example.com/",
        &[("x-id", "a123")],
        "catch-all",
    ),
    (
        "header presence with empty value",
        "GET",
        "http://shop.example.com/",
        &[("x-present", "")],
        "header-present",
    ),
    (
        "header presence with any value",
        "GET",
        "http://shop.example.com/",
        &[("x-present", "whatever")],
        "header-present",
    ),
    (
        "header regex star is presence",
        "GET",
        "http://shop.example.com/",
        &[("x-star", "no*star")],
        "header-star",
    ),
    (
        "header names are case-insensitive",
        "GET",
        "http://shop.example.com/",
        &[("X-User", "jason")],
        "header-exact",
    ),
    (
        "withoutHeaders: missing header counts as empty",
        "GET",
        "http://shop.example.com/without",
        &[],
        "without-exact",
    ),
    (
        "withoutHeaders: matching value excludes",
        "GET",
        "http://shop.example.com/without",
        &[("x-block", "yes")],
        "catch-all",
    ),
    (
        "withoutHeaders: other value passes",
        "GET",
        "http://shop.example.com/without",
        &[("x-block", "no")],
        "without-exact",
    ),
    (
        "withoutHeaders presence: absent passes",
        "GET",
        "http://shop.example.com/absent",
        &[],
        "without-present",
    ),
    (
        "withoutHeaders presence: present excludes",
        "GET",
        "http://shop.example.com/absent",
        &[("x-absent", "")],
        "catch-all",
    ),
    (
        "method exact",
        "POST",
        "http://shop.example.com/method",
        &[],
        "method",
    ),
    (
        "method mismatch",
        "GET",
        "http://shop.example.com/method",
        &[],
        "catch-all",
    ),
    (
        "authority exact with port",
        "GET",
        "http://shop.example.com:8443/auth",
        &[],
        "authority",
    ),
    (
        "authority exact without port differs",
        "GET",
        "http://shop.example.com/auth",
        &[],
        "catch-all",
    ),
    (
        "scheme https",
        "GET",
        "https://shop.example.com/scheme",
        &[],
        "scheme",
    ),
    (
        "scheme http mismatch",
        "GET",
        "http://shop.example.com/scheme",
        &[],
        "catch-all",
    ),
    (
        "query exact",
        "GET",
        "http://shop.example.com/query?a=1&v=2",
        &[],
        "query-exact",
    ),
    (
        "query exact is not a prefix",
        "GET",
        "http://shop.example.com/query?v=20",
        &[],
        "catch-all",
    ),
    (
        "query first occurrence decides",
        "GET",
        "http://shop.example.com/query?v=3&v=2",
        &[],
        "catch-all",
    ),
    (
        "query exact empty matches a bare key",
        "GET",
        "http://shop.example.com/qflag?debug",
        &[],
        "query-flag",
    ),
    (
        "query exact empty matches key=",
        "GET",
        "http://shop.example.com/qflag?debug=",
        &[],
        "query-flag",
    ),
    (
        "query exact empty needs the key",
        "GET",
        "http://shop.example.com/qflag?other",
        &[],
        "catch-all",
    ),
    (
        "query regex full match",
        "GET",
        "http://shop.example.com/page?page=12",
        &[],
        "query-regex",
    ),
    (
        "query regex must match whole value",
        "GET",
        "http://shop.example.com/page?page=12a",
        &[],
        "catch-all",
    ),
    (
        "port matches the addressed port",
        "GET",
        "http://shop.example.com:8080/port",
        &[],
        "port",
    ),
    (
        "port defaults to 80 for http",
        "GET",
        "http://shop.example.com/port",
        &[],
        "catch-all",
    ),
    (
        "OR between blocks: first",
        "GET",
        "http://shop.example.com/a",
        &[],
        "or-blocks",
    ),
    (
        "OR between blocks: second",
        "GET",
        "http://shop.example.com/b",
        &[],
        "or-blocks",
    ),
    (
        "AND within a block: all hold",
        "GET",
        "http://shop.example.com/and",
        &[("x-a", "1")],
        "and-block",
    ),
    (
        "AND within a block: method fails",
        "POST",
        "http://shop.example.com/and",
        &[("x-a", "1")],
        "catch-all",
    ),
    (
        "AND within a block: header missing",
        "GET",
        "http://shop.example.com/and",
        &[],
        "catch-all",
    ),
    (
        "pseudo-header keys in headers are ignored",
        "GET",
        "http://shop.example.com/pseudo",
        &[],
        "pseudo-header-key-ignored",
    ),
    (
        "first match wins over a more specific later route",
        "GET",
        "http://prec.example.com/api/v1",
        &[],
        "first",
    ),
    (
        "a header route after a catching route still gets its own traffic",
        "GET",
        "http://prec.example.com/x",
        &[("x-canary", "true")],
        "canary-after-generic",
    ),
    (
        "host with routes but no match is NR",
        "GET",
        "http://prec.example.com/other",
        &[],
        "NR",
    ),
    (
        "host lookup ignores case",
        "GET",
        "http://SHOP.example.COM/exact",
        &[],
        "exact-uri",
    ),
    (
        "host lookup ignores the port",
        "GET",
        "http://shop.example.com:9999/exact",
        &[],
        "exact-uri",
    ),
    (
        "unknown host is NR",
        "GET",
        "http://unknown.example.com/",
        &[],
        "NR",
    ),
    ("wildcard host", "GET", "http://a.wild.com/", &[], "wild"),
    (
        "longest wildcard wins",
        "GET",
        "http://x.api.wild.com/",
        &[],
        "deeper-wild",
    ),
    (
        "wildcard needs one more label",
        "GET",
        "http://wild.com/",
        &[],
        "NR",
    ),
    (
        "short name in the proxy namespace",
        "GET",
        "http://reviews:9080/",
        &[],
        "reviews",
    ),
    (
        "name.namespace",
        "GET",
        "http://reviews.default/",
        &[],
        "reviews",
    ),
    (
        "name.namespace.svc",
        "GET",
        "http://reviews.default.svc/",
        &[],
        "reviews",
    ),
    (
        "fully qualified",
        "GET",
        "http://reviews.default.svc.cluster.local:9080/",
        &[],
        "reviews",
    ),
    (
        "short name of another namespace is not ours",
        "GET",
        "http://ratings/",
        &[],
        "NR",
    ),
    (
        "name.namespace of another namespace",
        "GET",
        "http://ratings.other/",
        &[],
        "ratings-other",
    ),
];

#[test]
fn every_match_field_and_precedence_rule() {
    let table = routing(&config(MATCHES)).table;
    let mut failures = Vec::new();
    for (case, method, uri, headers, expected) in CASES {
        let got = match decide(&table, &request(method, uri, headers)) {
            Ok(d) => d.split(" -> ").next().unwrap_or_default().to_owned(),
            Err(nr) => nr.to_owned(),
        };
        if got != *expected {
            failures.push(format!(
                "{case}: {method} {uri} {headers:?}: expected {expected}, got {got}"
            ));
        }
    }
    assert!(CASES.len() >= 40);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn destination_short_names_are_qualified_with_the_virtual_service_namespace() {
    let table = routing(&config(MATCHES)).table;
    let d = decide(&table, &request("GET", "http://ratings.other/", &[])).unwrap();
    assert_eq!(d, "ratings-other -> ratings.other.svc.cluster.local||@100");
}

#[test]
fn invalid_regex_in_a_match_never_reaches_a_table() {
    let yaml = MATCHES.replace(r"'/items/\d+'", "'/items/(['");
    assert_ne!(yaml, MATCHES);
    // Either validation rejects the file, or compilation does with a located error.
    if let Ok((cfg, _)) = mesh_core::config::MeshConfig::from_yaml_str(
        "bad.yaml",
        &yaml,
        &mesh_core::config::LoadOptions::default(),
    ) {
        let errors = mesh_routing::Routing::compile(&cfg, &Default::default()).unwrap_err();
        assert!(matches!(
            errors[0],
            mesh_routing::CompileError::Match { ref resource, .. } if resource == "VirtualService/default/shop"
        ));
    }
}
