//! Invalid configuration is rejected with the exact file, line:column, document,
//! resource, field path and a message that says what is allowed.

use mesh_core::config::{LoadOptions, MeshConfig, load_str};

struct Case {
    name: &'static str,
    yaml: &'static str,
    errors: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "duration_without_unit_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - timeout: 5
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:9:14: error: document 1, VirtualService/prod/r, spec.http[0].timeout: invalid duration \"5\": the unit is missing; expected a number with a unit, e.g. 100ms, 5s, 1.5s, 1m30s, 1h",
        ],
    },
    Case {
        name: "duration_with_sub_millisecond_precision_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - timeout: 1500us
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:9:14: error: document 1, VirtualService/prod/r, spec.http[0].timeout: duration 1500us has sub-millisecond precision; only whole milliseconds are supported",
        ],
    },
    Case {
        name: "negative_weight_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination: {host: r, subset: v1}
      weight: 101
    - destination: {host: r, subset: v2}
      weight: -1
"##,
        errors: &[
            "bad.yaml:13:15: error: document 1, VirtualService/prod/r, spec.http[0].route[1].weight: weight -1 is negative; weights must be 0 or more",
        ],
    },
    Case {
        name: "zero_total_weight_with_two_destinations_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination: {host: r, subset: v1}
      weight: 0
    - destination: {host: r, subset: v2}
"##,
        errors: &[
            "bad.yaml:10:7: error: document 1, VirtualService/prod/r, spec.http[0].route: total destination weight is 0 across 2 destinations; give at least one destination a positive weight",
        ],
    },
    Case {
        name: "redirect_with_uri_and_prefix_rewrite_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - match:
    - uri: {prefix: /old}
    redirect:
      uri: /new
      prefixRewrite: /new
"##,
        errors: &[
            "bad.yaml:13:7: error: document 1, VirtualService/prod/r, spec.http[0].redirect.prefixRewrite: a redirect sets either uri (the whole path) or prefixRewrite (the matched prefix), not both",
        ],
    },
    Case {
        name: "unknown_spec_field_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  htpp:
  - route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:8:3: error: document 1, VirtualService/prod/r, spec.htpp: unknown field `htpp`, expected one of hosts, gateways, http, tls, tcp, exportTo",
        ],
    },
    Case {
        name: "unknown_nested_field_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination:
        hots: r
"##,
        errors: &[
            "bad.yaml:11:9: error: document 1, VirtualService/prod/r, spec.http[0].route[0].destination.hots: unknown field `hots`, expected one of host, subset, port",
        ],
    },
    Case {
        name: "unknown_metadata_field_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namepsace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:5:3: error: document 1, VirtualService/default/r, metadata.namepsace: unknown field `namepsace`, expected one of name, namespace, labels, annotations, creationTimestamp, uid, resourceVersion, generation, generateName, managedFields, ownerReferences, finalizers, deletionTimestamp, deletionGracePeriodSeconds, selfLink, clusterName",
        ],
    },
    Case {
        name: "wrong_type_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination: {host: r}
    retries:
      attempts: three
"##,
        errors: &[
            "bad.yaml:12:17: error: document 1, VirtualService/prod/r, spec.http[0].retries.attempts: `three` is not a valid integer; expected a whole number",
        ],
    },
    Case {
        name: "sequence_where_mapping_expected_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
    route: []
"##,
        errors: &[
            "bad.yaml:9:5: error: document 1, VirtualService/prod/r, spec.http: expected a list (`- item` lines or `[a, b]`) here",
        ],
    },
    Case {
        name: "yaml_syntax_error_is_located",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r
  http: []
"##,
        errors: &[
            "bad.yaml:8:7: error: document 1: YAML syntax error: illegal placement of ':' indicator",
        ],
    },
    Case {
        name: "spec_before_kind_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
spec:
  hosts: [r]
kind: VirtualService
metadata:
  name: r
"##,
        errors: &[
            "bad.yaml:2:1: error: document 1, VirtualService/default/r, spec: `spec` appears before `kind`; write apiVersion and kind first, then metadata and spec",
        ],
    },
    Case {
        name: "missing_kind_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
metadata:
  name: r
spec:
  hosts: [r]
"##,
        errors: &[
            "bad.yaml:1:1: error: document 1, kind: missing field `kind`; every document needs apiVersion and kind",
        ],
    },
    Case {
        name: "wrong_api_version_for_kind_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: VirtualService
metadata:
  name: r
spec:
  hosts: [r]
"##,
        errors: &[
            "bad.yaml:1:13: error: document 1, VirtualService/default/r, apiVersion: apiVersion `security.istio.io/v1` is not served for VirtualService; expected one of networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3",
        ],
    },
    Case {
        name: "document_that_is_not_a_mapping_is_rejected",
        yaml: r##"- apiVersion: networking.istio.io/v1
  kind: VirtualService
"##,
        errors: &[
            "bad.yaml:1:1: error: document 1: a document must be a mapping with apiVersion, kind, metadata and spec",
        ],
    },
    Case {
        name: "missing_name_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  namespace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:4:3: error: document 1, VirtualService/prod/, metadata.name: metadata.name is required",
        ],
    },
    Case {
        name: "missing_destination_host_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination:
        subset: v1
"##,
        errors: &[
            "bad.yaml:11:9: error: document 1, VirtualService/prod/r, spec.http[0].route[0].destination.host: destination host is required",
        ],
    },
    Case {
        name: "invalid_host_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: ["bad_host!"]
  http:
  - route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:7:11: error: document 1, VirtualService/prod/r, spec.hosts[0]: `bad_host!` is not a valid host; expected a DNS name such as `reviews` or `reviews.prod.svc.cluster.local`, a wildcard such as `*.example.com`, or an IP address",
        ],
    },
    Case {
        name: "wildcard_host_for_sidecars_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: ["*"]
  http:
  - route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:7:11: error: document 1, VirtualService/prod/r, spec.hosts[0]: wildcard host `*` is not allowed for a VirtualService that applies to sidecars (`mesh`); list the gateways it is for in `gateways`",
        ],
    },
    Case {
        name: "destination_port_out_of_range_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - route:
    - destination:
        host: r
        port: {number: 70000}
"##,
        errors: &[
            "bad.yaml:12:24: error: document 1, VirtualService/prod/r, spec.http[0].route[0].destination.port.number: port 70000 is out of range; ports are 1 to 65535",
        ],
    },
    Case {
        name: "invalid_regex_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - match:
    - uri:
        regex: "/api/(v1|v2"
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:11:16: error: document 1, VirtualService/prod/r, spec.http[0].match[0].uri.regex: regex `/api/(v1|v2` does not compile (unclosed group); use RE2 syntax (no backreferences or lookaround)",
        ],
    },
    Case {
        name: "invalid_header_regex_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - match:
    - headers:
        x-user:
          regex: "a{2,1}"
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:12:18: error: document 1, VirtualService/prod/r, spec.http[0].match[0].headers[\"x-user\"].regex: regex `a{2,1}` does not compile (invalid repetition count range, the start must be <= the end); use RE2 syntax (no backreferences or lookaround)",
        ],
    },
    Case {
        name: "string_match_with_two_kinds_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - match:
    - uri: {exact: /a, prefix: /b}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:10:12: error: document 1, VirtualService/prod/r, spec.http[0].match[0].uri: a string match sets exactly one of `exact`, `prefix`, `regex`",
        ],
    },
    Case {
        name: "empty_method_prefix_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - match:
    - method: {prefix: ""}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:10:24: error: document 1, VirtualService/prod/r, spec.http[0].match[0].method.prefix: method: an empty prefix matches everything and is not allowed here; remove the match or give a prefix",
        ],
    },
    Case {
        name: "abort_status_below_200_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - fault:
      abort:
        httpStatus: 99
        percentage: {value: 10}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:11:21: error: document 1, VirtualService/prod/r, spec.http[0].fault.abort.httpStatus: abort httpStatus 99 is out of range; it must be 200 to 599",
        ],
    },
    Case {
        name: "fault_without_delay_or_abort_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - fault: {}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:9:12: error: document 1, VirtualService/prod/r, spec.http[0].fault: fault must set delay, abort or both",
        ],
    },
    Case {
        name: "exponential_delay_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - fault:
      delay:
        exponentialDelay: 1s
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:11:9: error: document 1, VirtualService/prod/r, spec.http[0].fault.delay.exponentialDelay: exponentialDelay is not supported; use fixedDelay",
        ],
    },
    Case {
        name: "fault_percentage_above_100_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - fault:
      delay:
        fixedDelay: 1s
        percentage: {value: 150}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:12:29: error: document 1, VirtualService/prod/r, spec.http[0].fault.delay.percentage.value: percentage 150 is out of range; it must be between 0 and 100",
        ],
    },
    Case {
        name: "negative_retry_attempts_and_unknown_retry_condition_are_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - retries:
      attempts: -1
      retryOn: 5xx,connect-failure,bogus
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:10:17: error: document 1, VirtualService/prod/r, spec.http[0].retries.attempts: attempts -1 is negative; use 0 to disable retries",
            "bad.yaml:11:16: error: document 1, VirtualService/prod/r, spec.http[0].retries.retryOn: unknown retry condition `bogus`; allowed: 5xx, gateway-error, reset, reset-before-request, connect-failure, envoy-ratelimited, retriable-4xx, refused-stream, retriable-status-codes, retriable-headers, http3-post-connect-failure, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or an HTTP status code",
        ],
    },
    Case {
        name: "route_and_redirect_together_are_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - redirect: {uri: /new}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:9:5: error: document 1, VirtualService/prod/r, spec.http[0].redirect: an HTTP route cannot have both route and redirect",
        ],
    },
    Case {
        name: "direct_response_status_out_of_range_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - directResponse:
      status: 700
"##,
        errors: &[
            "bad.yaml:10:15: error: document 1, VirtualService/prod/r, spec.http[0].directResponse.status: directResponse status 700 is out of range; it must be 200 to 599",
        ],
    },
    Case {
        name: "route_without_action_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - match:
    - uri: {prefix: /a}
"##,
        errors: &[
            "bad.yaml:9:5: error: document 1, VirtualService/prod/r, spec.http[0]: an HTTP route needs one of route, redirect, directResponse or delegate",
        ],
    },
    Case {
        name: "all_errors_of_a_resource_are_reported",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - fault:
      abort: {httpStatus: 600}
    route:
    - destination: {host: r, subset: v1}
      weight: -5
    - destination: {host: r, subset: v2}
      weight: -1
"##,
        errors: &[
            "bad.yaml:13:15: error: document 1, VirtualService/prod/r, spec.http[0].route[0].weight: weight -5 is negative; weights must be 0 or more",
            "bad.yaml:15:15: error: document 1, VirtualService/prod/r, spec.http[0].route[1].weight: weight -1 is negative; weights must be 0 or more",
            "bad.yaml:12:7: error: document 1, VirtualService/prod/r, spec.http[0].route: total destination weight is 0 across 2 destinations; give at least one destination a positive weight",
            "bad.yaml:10:27: error: document 1, VirtualService/prod/r, spec.http[0].fault.abort.httpStatus: abort httpStatus 600 is out of range; it must be 200 to 599",
        ],
    },
    Case {
        name: "deny_policy_without_rules_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  action: DENY
  selector:
    matchLabels: {app: payments}
"##,
        errors: &[
            "bad.yaml:7:3: error: document 1, AuthorizationPolicy/prod/r, spec: a DENY policy without rules never matches; add `rules: [{}]` to match every request, or add rules",
        ],
    },
    Case {
        name: "custom_action_is_rejected_as_unsupported",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  action: CUSTOM
  provider: {name: ext-authz}
  rules: [{}]
"##,
        errors: &[
            "bad.yaml:7:11: error: document 1, AuthorizationPolicy/prod/r, spec.action: action CUSTOM (external authorization) is not supported by this proxy; use ALLOW, DENY or AUDIT",
        ],
    },
    Case {
        name: "principal_with_scheme_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - from:
    - source:
        principals: ["spiffe://cluster.local/ns/prod/sa/orders"]
"##,
        errors: &[
            "bad.yaml:10:22: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].from[0].source.principals[0]: principal `spiffe://cluster.local/ns/prod/sa/orders` must be written without `spiffe://`, e.g. `cluster.local/ns/prod/sa/orders`",
        ],
    },
    Case {
        name: "principal_that_is_not_an_identity_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - from:
    - source:
        principals: ["orders"]
"##,
        errors: &[
            "bad.yaml:10:22: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].from[0].source.principals[0]: principal `orders` is not an Istio workload identity; expected <trust-domain>/ns/<namespace>/sa/<service-account>",
        ],
    },
    Case {
        name: "empty_from_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - from: []
    to:
    - operation: {methods: [GET]}
"##,
        errors: &[
            "bad.yaml:8:11: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].from: `from` must not be empty; omit it to match any source",
        ],
    },
    Case {
        name: "empty_source_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - from:
    - source: {}
"##,
        errors: &[
            "bad.yaml:9:15: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].from[0].source: a source must set at least one field (principals, namespaces, ipBlocks, ...)",
        ],
    },
    Case {
        name: "service_accounts_with_principals_are_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/prod/sa/a"]
        serviceAccounts: ["prod/b"]
"##,
        errors: &[
            "bad.yaml:10:9: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].from[0].source: serviceAccounts cannot be combined with principals or namespaces",
        ],
    },
    Case {
        name: "invalid_ip_block_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.0/33"]
"##,
        errors: &[
            "bad.yaml:10:20: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].from[0].source.ipBlocks[0]: `10.0.0.0/33` is not an IP address or CIDR; expected e.g. 10.0.0.1 or 10.0.0.0/16",
        ],
    },
    Case {
        name: "invalid_operation_port_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - to:
    - operation:
        ports: ["http"]
"##,
        errors: &[
            "bad.yaml:10:17: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].to[0].operation.ports[0]: `http` is not a port; expected a number 0 to 65535",
        ],
    },
    Case {
        name: "condition_without_values_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - when:
    - key: source.ip
"##,
        errors: &[
            "bad.yaml:9:7: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].when[0]: a condition needs values or notValues",
        ],
    },
    Case {
        name: "unknown_condition_key_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - when:
    - key: source.user
      values: [alice]
"##,
        errors: &[
            "bad.yaml:9:12: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].when[0].key: unknown condition key `source.user`; expected one of source.ip, remote.ip, source.namespace, source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, destination.ip, destination.port, connection.sni, request.headers[<name>], request.auth.claims[<claim>]",
        ],
    },
    Case {
        name: "port_level_mtls_without_selector_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: r
  namespace: prod
spec:
  mtls: {mode: STRICT}
  portLevelMtls:
    8080:
      mode: DISABLE
"##,
        errors: &[
            "bad.yaml:8:3: error: document 1, PeerAuthentication/prod/r, spec.portLevelMtls: portLevelMtls only applies to a workload: add a selector with matchLabels",
        ],
    },
    Case {
        name: "unknown_mtls_mode_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: r
  namespace: prod
spec:
  mtls: {mode: STRICTEST}
"##,
        errors: &[
            "bad.yaml:7:16: error: document 1, PeerAuthentication/prod/r, spec.mtls.mode: unknown variant `STRICTEST`, expected one of UNSET, DISABLE, PERMISSIVE, STRICT",
        ],
    },
    Case {
        name: "bad_spiffe_id_in_subject_alt_names_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  namespace: prod
spec:
  host: r
  trafficPolicy:
    tls:
      mode: SIMPLE
      subjectAltNames: ["spiffe://Cluster.Local/ns/prod/sa/r"]
"##,
        errors: &[
            "bad.yaml:11:25: error: document 1, DestinationRule/prod/r, spec.trafficPolicy.tls.subjectAltNames[0]: `spiffe://Cluster.Local/ns/prod/sa/r` is not a valid SPIFFE ID: SPIFFE trust domain has the character 'C'; only lowercase letters, digits, `.`, `-` and `_` are allowed",
        ],
    },
    Case {
        name: "duplicate_subset_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  namespace: prod
spec:
  host: r
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v1
    labels: {version: v2}
"##,
        errors: &[
            "bad.yaml:11:11: error: document 1, DestinationRule/prod/r, spec.subsets[1].name: duplicate subset name `v1`",
        ],
    },
    Case {
        name: "empty_traffic_policy_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  namespace: prod
spec:
  host: r
  trafficPolicy: {}
"##,
        errors: &[
            "bad.yaml:8:18: error: document 1, DestinationRule/prod/r, spec.trafficPolicy: trafficPolicy must set at least one field",
        ],
    },
    Case {
        name: "max_ejection_percent_above_100_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  namespace: prod
spec:
  host: r
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 5
      maxEjectionPercent: 150
"##,
        errors: &[
            "bad.yaml:11:27: error: document 1, DestinationRule/prod/r, spec.trafficPolicy.outlierDetection.maxEjectionPercent: maxEjectionPercent 150 is out of range; it must be 0 to 100",
        ],
    },
    Case {
        name: "port_level_settings_without_port_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  namespace: prod
spec:
  host: r
  trafficPolicy:
    portLevelSettings:
    - connectionPool:
        tcp: {maxConnections: 10}
"##,
        errors: &[
            "bad.yaml:10:7: error: document 1, DestinationRule/prod/r, spec.trafficPolicy.portLevelSettings[0].port: port-level settings need port.number",
        ],
    },
    Case {
        name: "unknown_load_balancer_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  namespace: prod
spec:
  host: r
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBINN
"##,
        errors: &[
            "bad.yaml:10:15: error: document 1, DestinationRule/prod/r, spec.trafficPolicy.loadBalancer.simple: unknown variant `ROUND_ROBINN`, expected one of UNSPECIFIED, LEAST_CONN, RANDOM, PASSTHROUGH, ROUND_ROBIN, LEAST_REQUEST",
        ],
    },
    Case {
        name: "https_server_without_tls_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: r
  namespace: prod
spec:
  selector: {istio: ingress}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.example.com]
"##,
        errors: &[
            "bad.yaml:9:5: error: document 1, Gateway/prod/r, spec.servers[0].tls: HTTPS and TLS servers need tls settings (mode SIMPLE, MUTUAL, PASSTHROUGH, ...)",
        ],
    },
    Case {
        name: "static_service_entry_without_endpoints_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: r
  namespace: prod
spec:
  hosts: [db.example.com]
  ports:
  - {number: 5432, name: tcp-pg, protocol: TCP}
  resolution: STATIC
"##,
        errors: &[
            "bad.yaml:7:3: error: document 1, ServiceEntry/prod/r, spec.endpoints: resolution STATIC needs endpoints (or a workloadSelector)",
        ],
    },
    Case {
        name: "service_entry_endpoint_with_spiffe_service_account_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: r
  namespace: prod
spec:
  hosts: [db.example.com]
  ports:
  - {number: 5432, name: tcp-pg, protocol: TCP}
  resolution: STATIC
  endpoints:
  - address: 10.0.0.5
    ports: {tcp-postgres: 5432}
    serviceAccount: spiffe://cluster.local/ns/db/sa/pg
"##,
        errors: &[
            "bad.yaml:13:13: error: document 1, ServiceEntry/prod/r, spec.endpoints[0].ports[\"tcp-postgres\"]: endpoint port `tcp-postgres` is not a port of this ServiceEntry; ports are named `tcp-pg`",
            "bad.yaml:14:21: error: document 1, ServiceEntry/prod/r, spec.endpoints[0].serviceAccount: serviceAccount is a service account name in the entry's namespace, not a SPIFFE ID; write `pg`",
        ],
    },
    Case {
        name: "error_in_second_document_names_that_document",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ok
spec:
  host: r
---
# the second one is broken
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: broken
spec:
  host: r
  trafficPolicy:
    connectionPool:
      tcp:
        connectTimeout: 10
"##,
        errors: &[
            "bad.yaml:18:25: error: document 2, DestinationRule/default/broken, spec.trafficPolicy.connectionPool.tcp.connectTimeout: invalid duration \"10\": the unit is missing; expected a number with a unit, e.g. 100ms, 5s, 1.5s, 1m30s, 1h",
        ],
    },
    Case {
        name: "unknown_top_level_field_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
specs:
  hosts: [r]
"##,
        errors: &[
            "bad.yaml:5:1: error: document 1, VirtualService/default/r, specs: unknown field `specs`, expected one of `apiVersion`, `kind`, `metadata`, `spec`, `status`",
        ],
    },
    Case {
        name: "creation_timestamp_must_be_rfc3339",
        yaml: r##"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: r
  creationTimestamp: "yesterday"
spec:
  mtls: {mode: STRICT}
"##,
        errors: &[
            "bad.yaml:5:22: error: document 1, PeerAuthentication/default/r, metadata.creationTimestamp: `yesterday` is not an RFC 3339 time; expected e.g. 2024-05-01T12:00:00Z",
        ],
    },
    Case {
        name: "gateway_host_with_invalid_namespace_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: r
  namespace: prod
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["Prod/api.example.com"]
"##,
        errors: &[
            "bad.yaml:9:13: error: document 1, Gateway/prod/r, spec.servers[0].hosts[0]: `Prod` is not a valid namespace in host `Prod/api.example.com`; expected `*`, `.` or a namespace",
        ],
    },
    Case {
        name: "path_template_with_double_star_in_the_middle_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - to:
    - operation:
        paths: ["/files/{**}/meta"]
"##,
        errors: &[
            "bad.yaml:10:17: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].to[0].operation.paths[0]: path template `/files/{**}/meta`: `{**}` must be the last segment",
        ],
    },
    Case {
        name: "service_account_with_wildcard_is_rejected",
        yaml: r##"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: r
  namespace: prod
spec:
  rules:
  - from:
    - source:
        serviceAccounts: ["prod/*"]
"##,
        errors: &[
            "bad.yaml:10:27: error: document 1, AuthorizationPolicy/prod/r, spec.rules[0].from[0].source.serviceAccounts[0]: service account `prod/*` contains `*`; wildcards are not allowed in serviceAccounts",
        ],
    },
    Case {
        name: "redirect_code_that_is_not_3xx_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - redirect:
      uri: /new
      redirectCode: 200
"##,
        errors: &[
            "bad.yaml:11:21: error: document 1, VirtualService/prod/r, spec.http[0].redirect.redirectCode: redirect code 200 is not a redirect; use a 3xx code (301, 302, 303, 307, 308)",
        ],
    },
    Case {
        name: "mutual_tls_client_without_certificate_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  namespace: prod
spec:
  host: r
  trafficPolicy:
    tls:
      mode: MUTUAL
      caCertificates: /etc/ca.pem
"##,
        errors: &[
            "bad.yaml:10:7: error: document 1, DestinationRule/prod/r, spec.trafficPolicy.tls.clientCertificate: MUTUAL needs clientCertificate (or credentialName)",
            "bad.yaml:10:7: error: document 1, DestinationRule/prod/r, spec.trafficPolicy.tls.privateKey: MUTUAL needs privateKey (or credentialName)",
        ],
    },
    Case {
        name: "authority_rewritten_twice_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - rewrite:
      authority: a.example.com
    headers:
      request:
        set: {host: b.example.com}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:13:15: error: document 1, VirtualService/prod/r, spec.http[0].headers.request.set.host: the authority is already rewritten at spec.http[0].rewrite.authority; rewrite it in one place only",
        ],
    },
    Case {
        name: "empty_header_prefix_and_empty_authority_exact_are_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: r
  namespace: prod
spec:
  hosts: [r]
  http:
  - match:
    - headers:
        x-user: {prefix: ""}
      authority: {exact: ""}
    route:
    - destination: {host: r}
"##,
        errors: &[
            "bad.yaml:12:26: error: document 1, VirtualService/prod/r, spec.http[0].match[0].authority.exact: authority: an empty exact match never matches; give a value or remove the match",
            "bad.yaml:11:26: error: document 1, VirtualService/prod/r, spec.http[0].match[0].headers[\"x-user\"].prefix: headers: an empty prefix is not allowed; use `{}` to match any value",
        ],
    },
    Case {
        name: "gateway_credential_name_that_is_a_path_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: r
  namespace: prod
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: ../other/api-cert}
  - port: {number: 8443, name: https-abs, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: /etc/other/api-cert}
  - port: {number: 9443, name: https-enc, protocol: HTTPS}
    hosts: [api.example.com]
    tls:
      mode: SIMPLE
      credentialNames: ["%2e%2e%2fother", Api-Cert]
"##,
        errors: &[
            "bad.yaml:10:41: error: document 1, Gateway/prod/r, spec.servers[0].tls.credentialName: `../other/api-cert` is not a valid credentialName: the Secret name must be a DNS-1123 subdomain (lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit, at most 253 characters), optionally written `kubernetes://<name>` or `<namespace>/<name>`",
            "bad.yaml:13:41: error: document 1, Gateway/prod/r, spec.servers[1].tls.credentialName: `/etc/other/api-cert` is not a valid credentialName: the Secret name must be a DNS-1123 subdomain (lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit, at most 253 characters), optionally written `kubernetes://<name>` or `<namespace>/<name>`",
            "bad.yaml:18:25: error: document 1, Gateway/prod/r, spec.servers[2].tls.credentialNames[0]: `%2e%2e%2fother` is not a valid credentialName: the Secret name must be a DNS-1123 subdomain (lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit, at most 253 characters), optionally written `kubernetes://<name>` or `<namespace>/<name>`",
            "bad.yaml:18:43: error: document 1, Gateway/prod/r, spec.servers[2].tls.credentialNames[1]: `Api-Cert` is not a valid credentialName: the Secret name must be a DNS-1123 subdomain (lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit, at most 253 characters), optionally written `kubernetes://<name>` or `<namespace>/<name>`",
        ],
    },
    Case {
        name: "gateway_credential_name_in_another_namespace_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: r
  namespace: prod
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: other/api-cert}
  - port: {number: 8443, name: https-k8s, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: "kubernetes://other/api-cert"}
  - port: {number: 9443, name: https-gw, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: "kubernetes-gateway://other/api-cert"}
"##,
        errors: &[
            "bad.yaml:10:41: error: document 1, Gateway/prod/r, spec.servers[0].tls.credentialName: credentialName `other/api-cert` names a Secret in namespace `other`; a Gateway may only use Secrets of its own namespace `prod`",
            "bad.yaml:13:41: error: document 1, Gateway/prod/r, spec.servers[1].tls.credentialName: credentialName `kubernetes://other/api-cert` names a Secret in namespace `other`; a Gateway may only use Secrets of its own namespace `prod`",
            "bad.yaml:16:41: error: document 1, Gateway/prod/r, spec.servers[2].tls.credentialName: credentialName `kubernetes-gateway://other/api-cert` names a Secret in namespace `other`; a Gateway may only use Secrets of its own namespace `prod`",
        ],
    },
    Case {
        name: "gateway_credential_name_with_an_unsupported_scheme_is_rejected",
        yaml: r##"apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: r
  namespace: prod
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: "builtin://"}
  - port: {number: 8443, name: https-empty, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: ""}
"##,
        errors: &[
            "bad.yaml:10:41: error: document 1, Gateway/prod/r, spec.servers[0].tls.credentialName: credentialName `builtin://` uses an unsupported scheme; expected a Secret name, `kubernetes://` or `kubernetes-gateway://`",
            "bad.yaml:13:41: error: document 1, Gateway/prod/r, spec.servers[1].tls.credentialName: credentialName must not be empty; name a Secret of the Gateway's namespace",
        ],
    },
];

#[test]
fn every_invalid_document_is_rejected_with_its_exact_location_and_message() {
    assert!(
        CASES.len() >= 30,
        "the table covers at least 30 invalid documents"
    );
    let options = LoadOptions::default();
    let mut failures = Vec::new();
    for case in CASES {
        let report = load_str("bad.yaml", case.yaml, &options);
        let got: Vec<String> = report.errors().map(ToString::to_string).collect();
        if got != case.errors {
            failures.push(format!(
                "{}:\n  expected {:#?}\n  got      {:#?}",
                case.name, case.errors, got
            ));
        }
        // A configuration with errors never becomes a snapshot.
        let refused = MeshConfig::from_report(&report, &options).unwrap_err();
        assert_eq!(refused.len(), case.errors.len(), "{}", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn case_names_are_unique() {
    let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CASES.len());
}

#[test]
fn diagnostics_carry_their_parts_as_fields() {
    let case = CASES
        .iter()
        .find(|c| c.name == "negative_weight_is_rejected")
        .unwrap();
    let report = load_str("dir/bad.yaml", case.yaml, &LoadOptions::default());
    let e = report.errors().next().unwrap();
    assert_eq!(e.file, std::path::Path::new("dir/bad.yaml"));
    assert_eq!(e.document, Some(1));
    assert_eq!(e.resource.as_deref(), Some("VirtualService/prod/r"));
    assert_eq!(e.path.as_deref(), Some("spec.http[0].route[1].weight"));
    assert_eq!(e.line_column(), Some((13, 15)));
    assert_eq!(
        e.message,
        "weight -1 is negative; weights must be 0 or more"
    );
}

#[test]
fn the_valid_documents_of_a_file_still_load_next_to_a_broken_one() {
    let case = CASES
        .iter()
        .find(|c| c.name == "error_in_second_document_names_that_document")
        .unwrap();
    let report = load_str("bad.yaml", case.yaml, &LoadOptions::default());
    assert_eq!(report.resources.len(), 1);
    assert_eq!(report.resources[0].metadata().name, "ok");
}
