//! Istio's AuthorizationPolicy evaluation rules, table-driven (ISTIO.md §4.1–4.3).
//!
//! Each case is a policy set, a request and the expected decision. Requests default to
//! `GET /` on `payment.production.svc` from `cluster.local/ns/production/sa/order-service`
//! at 10.1.2.3 to 10.9.9.9:8080 over mTLS.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use mesh_core::{ConnectionInfo, ConnectionSecurity, Identity};
use mesh_tls::authz::{
    Action, Condition, Operation, Policy, PolicySet, RequestAttributes, Rule, ServerName, Source,
    Workload,
};

#[derive(Clone)]
struct Req {
    method: &'static str,
    path: &'static str,
    host: Option<&'static str>,
    headers: Vec<(&'static str, &'static [u8])>,
    peer: Option<&'static str>,
    remote: &'static str,
    local: &'static str,
    xff_client: Option<&'static str>,
    connection: bool,
    sni: ServerName<'static>,
}

impl Default for Req {
    fn default() -> Self {
        Req {
            method: "GET",
            path: "/",
            host: Some("payment.production.svc"),
            headers: vec![],
            peer: Some("spiffe://cluster.local/ns/production/sa/order-service"),
            remote: "10.1.2.3:40000",
            local: "10.9.9.9:8080",
            xff_client: None,
            connection: true,
            sni: ServerName::Unknown,
        }
    }
}

fn decide(policies: &[Policy], req: &Req) -> (bool, Option<String>, Option<String>) {
    let set = PolicySet::compile(policies).expect("policies compile");
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        headers.append(
            http::HeaderName::from_static(k),
            http::HeaderValue::from_bytes(v).unwrap(),
        );
    }
    let peer = req.peer.map(|p| Identity::parse(p).unwrap());
    let info = ConnectionInfo {
        remote: req.remote.parse::<SocketAddr>().unwrap(),
        local: req.local.parse::<SocketAddr>().unwrap(),
        security: if peer.is_some() {
            ConnectionSecurity::MutualTls
        } else {
            ConnectionSecurity::None
        },
    };
    let attrs = RequestAttributes {
        method: req.method,
        path: req.path,
        host: req.host,
        headers: &headers,
        peer: peer.as_ref(),
        connection: req.connection.then_some(&info),
        remote_ip: req.xff_client.map(|ip| ip.parse::<IpAddr>().unwrap()),
        server_name: req.sni,
        request_auth: None,
    };
    let d = set.evaluate(&attrs);
    (
        d.allowed,
        d.policy.map(|m| format!("{}#{}", m.name, m.rule)),
        d.audit.map(|m| format!("{}#{}", m.name, m.rule)),
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> Policy {
    Policy::new("production", name, action, rules)
}

fn from(src: Source) -> Rule {
    Rule {
        from: Some(vec![src]),
        ..Rule::default()
    }
}

fn to(op: Operation) -> Rule {
    Rule {
        to: Some(vec![op]),
        ..Rule::default()
    }
}

fn when(c: Condition) -> Rule {
    Rule {
        when: vec![c],
        ..Rule::default()
    }
}

fn principals(v: &[&str]) -> Source {
    Source {
        principals: s(v),
        ..Source::default()
    }
}

fn paths(v: &[&str]) -> Operation {
    Operation {
        paths: s(v),
        ..Operation::default()
    }
}

struct Case {
    name: &'static str,
    policies: Vec<Policy>,
    req: Req,
    allowed: bool,
    /// Expected deciding policy (`name#rule`), checked when `Some`.
    by: Option<&'static str>,
}

fn case(name: &'static str, policies: Vec<Policy>, req: Req, allowed: bool) -> Case {
    Case {
        name,
        policies,
        req,
        allowed,
        by: None,
    }
}

fn cases() -> Vec<Case> {
    use Action::*;
    let r = Req::default;
    let allow_any = || policy("allow-any", Allow, vec![Rule::default()]);
    vec![
        // --- actions and evaluation order (AP-02, AP-04, AP-05)
        case("no policies allow everything", vec![], r(), true),
        case(
            "spec {} (ALLOW without rules) denies everything",
            vec![Policy {
                rules: None,
                ..policy("nothing", Allow, vec![])
            }],
            r(),
            false,
        ),
        case("rules [{}] allows everything", vec![allow_any()], r(), true),
        case(
            "DENY rules [{}] denies everything",
            vec![policy("deny-all", Deny, vec![Rule::default()])],
            r(),
            false,
        ),
        case(
            "DENY wins over a matching ALLOW",
            vec![
                allow_any(),
                policy(
                    "deny-get",
                    Deny,
                    vec![to(Operation {
                        methods: s(&["GET"]),
                        ..Default::default()
                    })],
                ),
            ],
            r(),
            false,
        ),
        case(
            "non-matching DENY and no ALLOW allows",
            vec![policy(
                "deny-post",
                Deny,
                vec![to(Operation {
                    methods: s(&["POST"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "ALLOW present but not matching denies",
            vec![policy(
                "allow-post",
                Allow,
                vec![to(Operation {
                    methods: s(&["POST"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "one of several ALLOW policies matching allows",
            vec![
                policy(
                    "allow-post",
                    Allow,
                    vec![to(Operation {
                        methods: s(&["POST"]),
                        ..Default::default()
                    })],
                ),
                policy(
                    "allow-get",
                    Allow,
                    vec![to(Operation {
                        methods: s(&["GET"]),
                        ..Default::default()
                    })],
                ),
            ],
            r(),
            true,
        ),
        case(
            "rules are ORed",
            vec![policy(
                "p",
                Allow,
                vec![to(paths(&["/x"])), to(paths(&["/"]))],
            )],
            r(),
            true,
        ),
        case(
            "AUDIT alone never denies",
            vec![policy("audit-all", Audit, vec![Rule::default()])],
            r(),
            true,
        ),
        case(
            "AUDIT never allows when an ALLOW does not match",
            vec![
                policy("audit-all", Audit, vec![Rule::default()]),
                policy(
                    "allow-post",
                    Allow,
                    vec![to(Operation {
                        methods: s(&["POST"]),
                        ..Default::default()
                    })],
                ),
            ],
            r(),
            false,
        ),
        // --- rule structure (AP-10, AP-11)
        case(
            "from AND to must both match",
            vec![policy(
                "p",
                Allow,
                vec![Rule {
                    from: Some(vec![principals(&[
                        "cluster.local/ns/production/sa/order-service",
                    ])]),
                    to: Some(vec![paths(&["/other"])]),
                    when: vec![],
                }],
            )],
            r(),
            false,
        ),
        case(
            "from entries are ORed",
            vec![policy(
                "p",
                Allow,
                vec![Rule {
                    from: Some(vec![
                        principals(&["x/ns/a/sa/b"]),
                        principals(&["cluster.local/ns/production/sa/order-service"]),
                    ]),
                    ..Rule::default()
                }],
            )],
            r(),
            true,
        ),
        case(
            "fields in one source are ANDed",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    principals: s(&["*"]),
                    namespaces: s(&["staging"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "when conditions are ANDed",
            vec![policy(
                "p",
                Allow,
                vec![Rule {
                    when: vec![
                        Condition::values("source.namespace", &["production"]),
                        Condition::values("destination.port", &["9090"]),
                    ],
                    ..Rule::default()
                }],
            )],
            r(),
            false,
        ),
        // --- principals, namespaces, service accounts (AP-13, AP-20..AP-23, PA-08)
        case(
            "exact principal matches without spiffe://",
            vec![policy(
                "p",
                Allow,
                vec![from(principals(&[
                    "cluster.local/ns/production/sa/order-service",
                ]))],
            )],
            r(),
            true,
        ),
        case(
            "principal with spiffe:// prefix does not match",
            vec![policy(
                "p",
                Allow,
                vec![from(principals(&[
                    "spiffe://cluster.local/ns/production/sa/order-service",
                ]))],
            )],
            r(),
            false,
        ),
        case(
            "prefix principal",
            vec![policy(
                "p",
                Allow,
                vec![from(principals(&["cluster.local/ns/production/*"]))],
            )],
            r(),
            true,
        ),
        case(
            "suffix principal (CVE-2020-16844) denies",
            vec![policy(
                "d",
                Deny,
                vec![from(principals(&["*/sa/order-service"]))],
            )],
            r(),
            false,
        ),
        case(
            "presence principal excludes plaintext",
            vec![policy("p", Allow, vec![from(principals(&["*"]))])],
            Req { peer: None, ..r() },
            false,
        ),
        case(
            "presence principal admits any mTLS peer",
            vec![policy("p", Allow, vec![from(principals(&["*"]))])],
            r(),
            true,
        ),
        case(
            "notPrincipals [*] admits plaintext",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    not_principals: s(&["*"]),
                    ..Default::default()
                })],
            )],
            Req { peer: None, ..r() },
            true,
        ),
        case(
            "notPrincipals excludes the listed peer",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    not_principals: s(&["cluster.local/ns/production/sa/order-service"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "a * inside a principal is literal",
            vec![policy(
                "p",
                Allow,
                vec![from(principals(&["cluster.local/ns/*/sa/order-service"]))],
            )],
            r(),
            false,
        ),
        case(
            "namespace from the principal",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    namespaces: s(&["production"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "namespace wildcard in the middle",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    namespaces: s(&["pro*ion"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "notNamespaces excludes",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    not_namespaces: s(&["production"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "plaintext caller has no namespace",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    namespaces: s(&["*"]),
                    ..Default::default()
                })],
            )],
            Req { peer: None, ..r() },
            false,
        ),
        case(
            "service account matches literally (CVE-2026-39350)",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    service_accounts: s(&["cert-manager/cert-manager.io"]),
                    ..Default::default()
                })],
            )],
            Req {
                peer: Some("spiffe://cluster.local/ns/cert-manager/sa/cert-manager-io"),
                ..r()
            },
            false,
        ),
        case(
            "service account without namespace uses the policy's",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    service_accounts: s(&["order-service"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        // --- JWT attributes of a request without a token (tests/authz_jwt.rs has tokens)
        case(
            "ALLOW requestPrincipals [*] refuses a request without a token",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    request_principals: s(&["*"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "ALLOW notRequestPrincipals admits a request without a token",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    not_request_principals: s(&["issuer/bad-user"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "DENY notRequestPrincipals [*] denies a request without a token",
            vec![policy(
                "d",
                Deny,
                vec![from(Source {
                    not_request_principals: s(&["*"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "DENY requestPrincipals on a path spares a request without a token",
            vec![policy(
                "d",
                Deny,
                vec![Rule {
                    from: Some(vec![Source {
                        request_principals: s(&["*"]),
                        ..Default::default()
                    }]),
                    to: Some(vec![paths(&["/admin"])]),
                    when: vec![],
                }],
            )],
            Req {
                path: "/admin",
                ..r()
            },
            true,
        ),
        case(
            "DENY requestPrincipals scoped to a path spares other paths",
            vec![policy(
                "d",
                Deny,
                vec![Rule {
                    from: Some(vec![Source {
                        request_principals: s(&["*"]),
                        ..Default::default()
                    }]),
                    to: Some(vec![paths(&["/admin"])]),
                    when: vec![],
                }],
            )],
            r(),
            true,
        ),
        case(
            "ALLOW through another from entry despite a JWT entry",
            vec![policy(
                "p",
                Allow,
                vec![Rule {
                    from: Some(vec![
                        Source {
                            request_principals: s(&["*"]),
                            ..Default::default()
                        },
                        principals(&["*"]),
                    ]),
                    ..Rule::default()
                }],
            )],
            r(),
            true,
        ),
        case(
            "ALLOW on request.auth.claims refuses a request without a token",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values(
                    "request.auth.claims[groups]",
                    &["admin"],
                ))],
            )],
            r(),
            false,
        ),
        // --- principal index: declaration order and unindexable rules are kept
        Case {
            by: Some("production/p#1"),
            ..case(
                "first matching rule wins across indexed and unindexed rules",
                vec![policy(
                    "p",
                    Allow,
                    vec![
                        from(principals(&["cluster.local/ns/x/sa/y"])),
                        from(principals(&["cluster.local/ns/production/*"])),
                        from(principals(&[
                            "cluster.local/ns/production/sa/order-service",
                        ])),
                    ],
                )],
                r(),
                true,
            )
        },
        Case {
            by: Some("production/a#0"),
            ..case(
                "an exact principal rule declared first is reported first",
                vec![
                    policy(
                        "a",
                        Allow,
                        vec![from(principals(&[
                            "cluster.local/ns/production/sa/order-service",
                        ]))],
                    ),
                    policy("b", Allow, vec![from(principals(&["*"]))]),
                ],
                r(),
                true,
            )
        },
        case(
            "a from entry without principals keeps the rule unindexed",
            vec![policy(
                "p",
                Allow,
                vec![Rule {
                    from: Some(vec![
                        principals(&["cluster.local/ns/x/sa/y"]),
                        Source {
                            namespaces: s(&["production"]),
                            ..Default::default()
                        },
                    ]),
                    ..Rule::default()
                }],
            )],
            r(),
            true,
        ),
        case(
            "notPrincipals rules are not indexed",
            vec![policy(
                "d",
                Deny,
                vec![from(Source {
                    not_principals: s(&["cluster.local/ns/x/sa/y"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        // --- IP blocks (AP-13)
        case(
            "ipBlocks CIDR matches the peer address",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    ip_blocks: s(&["10.1.0.0/16"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "ipBlocks single address",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    ip_blocks: s(&["10.1.2.4"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "notIpBlocks excludes",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    ip_blocks: s(&["10.0.0.0/8"]),
                    not_ip_blocks: s(&["10.1.2.3"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "IPv4-mapped IPv6 peer matches an IPv4 block",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    ip_blocks: s(&["10.1.2.0/24"]),
                    ..Default::default()
                })],
            )],
            Req {
                remote: "[::ffff:10.1.2.3]:40000",
                ..r()
            },
            true,
        ),
        case(
            "remoteIpBlocks uses the forwarded client",
            vec![policy(
                "d",
                Deny,
                vec![from(Source {
                    remote_ip_blocks: s(&["203.0.113.0/24"]),
                    ..Default::default()
                })],
            )],
            Req {
                xff_client: Some("203.0.113.7"),
                ..r()
            },
            false,
        ),
        case(
            "remoteIpBlocks falls back to the peer address",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    remote_ip_blocks: s(&["10.1.2.3/32"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "ALLOW on ipBlocks without connection info does not match",
            vec![policy(
                "p",
                Allow,
                vec![from(Source {
                    ip_blocks: s(&["0.0.0.0/0"]),
                    ..Default::default()
                })],
            )],
            Req {
                connection: false,
                ..r()
            },
            false,
        ),
        case(
            "DENY on notIpBlocks without connection info denies",
            vec![policy(
                "d",
                Deny,
                vec![from(Source {
                    not_ip_blocks: s(&["10.0.0.0/8"]),
                    ..Default::default()
                })],
            )],
            Req {
                connection: false,
                ..r()
            },
            false,
        ),
        // --- operation fields (AP-14)
        case(
            "hosts are case-insensitive (CVE-2021-39155)",
            vec![policy(
                "d",
                Deny,
                vec![to(Operation {
                    hosts: s(&["secret.com"]),
                    ..Default::default()
                })],
            )],
            Req {
                host: Some("Secret.COM"),
                ..r()
            },
            false,
        ),
        case(
            "host with a port still matches the bare host",
            vec![policy(
                "d",
                Deny,
                vec![to(Operation {
                    hosts: s(&["secret.com"]),
                    ..Default::default()
                })],
            )],
            Req {
                host: Some("secret.com:80"),
                ..r()
            },
            false,
        ),
        case(
            "host with a trailing dot matches",
            vec![policy(
                "d",
                Deny,
                vec![to(Operation {
                    hosts: s(&["secret.com"]),
                    ..Default::default()
                })],
            )],
            Req {
                host: Some("secret.com."),
                ..r()
            },
            false,
        ),
        case(
            "host:* form matches a host with port",
            vec![policy(
                "p",
                Allow,
                vec![to(Operation {
                    hosts: s(&["httpbin.com:*"]),
                    ..Default::default()
                })],
            )],
            Req {
                host: Some("httpbin.com:8000"),
                ..r()
            },
            true,
        ),
        case(
            "suffix host wildcard",
            vec![policy(
                "p",
                Allow,
                vec![to(Operation {
                    hosts: s(&["*.production.svc"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "notHosts excludes",
            vec![policy(
                "p",
                Allow,
                vec![to(Operation {
                    not_hosts: s(&["payment.production.svc"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "ports match the destination port",
            vec![policy(
                "p",
                Allow,
                vec![to(Operation {
                    ports: s(&["8080"]),
                    ..Default::default()
                })],
            )],
            r(),
            true,
        ),
        case(
            "notPorts excludes",
            vec![policy(
                "p",
                Allow,
                vec![to(Operation {
                    not_ports: s(&["8080"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "methods are case-sensitive exact",
            vec![policy(
                "p",
                Allow,
                vec![to(Operation {
                    methods: s(&["get"]),
                    ..Default::default()
                })],
            )],
            r(),
            false,
        ),
        case(
            "notMethods excludes",
            vec![policy(
                "d",
                Deny,
                vec![to(Operation {
                    not_methods: s(&["GET", "HEAD"]),
                    ..Default::default()
                })],
            )],
            Req {
                method: "DELETE",
                ..r()
            },
            false,
        ),
        case(
            "exact path does not match a sub-path",
            vec![policy("p", Allow, vec![to(paths(&["/api"]))])],
            Req {
                path: "/api/x",
                ..r()
            },
            false,
        ),
        case(
            "prefix path",
            vec![policy("p", Allow, vec![to(paths(&["/api/*"]))])],
            Req {
                path: "/api/x/y",
                ..r()
            },
            true,
        ),
        case(
            "suffix path",
            vec![policy("p", Allow, vec![to(paths(&["*.png"]))])],
            Req {
                path: "/img/a.png",
                ..r()
            },
            true,
        ),
        case(
            "paths are case-sensitive (AP-45)",
            vec![policy("d", Deny, vec![to(paths(&["/admin"]))])],
            Req {
                path: "/ADMIN",
                ..r()
            },
            true,
        ),
        case(
            "a . in a path is literal",
            vec![policy("p", Allow, vec![to(paths(&["/a.b"]))])],
            Req {
                path: "/aXb",
                ..r()
            },
            false,
        ),
        case(
            "URI template {*} matches one segment",
            vec![policy("p", Allow, vec![to(paths(&["/api/{*}/orders"]))])],
            Req {
                path: "/api/v1/orders",
                ..r()
            },
            true,
        ),
        case(
            "URI template {*} does not span segments",
            vec![policy("p", Allow, vec![to(paths(&["/api/{*}/orders"]))])],
            Req {
                path: "/api/v1/x/orders",
                ..r()
            },
            false,
        ),
        case(
            "URI template {**} matches the rest",
            vec![policy("d", Deny, vec![to(paths(&["/admin/{**}"]))])],
            Req {
                path: "/admin/a/b/c",
                ..r()
            },
            false,
        ),
        case(
            "notPaths in ALLOW",
            vec![policy(
                "p",
                Allow,
                vec![to(Operation {
                    not_paths: s(&["/admin"]),
                    ..Default::default()
                })],
            )],
            Req {
                path: "/admin",
                ..r()
            },
            false,
        ),
        // --- when conditions (AP-15, AP-44)
        case(
            "request.headers exact",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values(
                    "request.headers[x-user]",
                    &["alice"],
                ))],
            )],
            Req {
                headers: vec![("x-user", b"alice")],
                ..r()
            },
            true,
        ),
        case(
            "request.headers trailing whitespace is trimmed (CVE-2019-18802)",
            vec![policy(
                "d",
                Deny,
                vec![when(Condition::values(
                    "request.headers[x-user]",
                    &["admin"],
                ))],
            )],
            Req {
                headers: vec![("x-user", b"admin ")],
                ..r()
            },
            false,
        ),
        case(
            "request.headers duplicates are joined (CVE-2021-32777)",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values("request.headers[x-foo]", &["a, b"]))],
            )],
            Req {
                headers: vec![("x-foo", b"a"), ("x-foo", b"b")],
                ..r()
            },
            true,
        ),
        case(
            "request.headers duplicates cannot hide a DENY value",
            vec![policy(
                "d",
                Deny,
                vec![when(Condition::values(
                    "request.headers[x-user]",
                    &["admin"],
                ))],
            )],
            Req {
                headers: vec![("x-user", b"admin"), ("x-user", b"guest")],
                ..r()
            },
            false,
        ),
        case(
            "request.headers duplicates cannot dodge a notValues exclusion",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::not_values(
                    "request.headers[x-user]",
                    &["admin"],
                ))],
            )],
            Req {
                headers: vec![("x-user", b"guest"), ("x-user", b"admin")],
                ..r()
            },
            false,
        ),
        case(
            "request.headers duplicates not matching a DENY",
            vec![policy(
                "d",
                Deny,
                vec![when(Condition::values(
                    "request.headers[x-user]",
                    &["admin"],
                ))],
            )],
            Req {
                headers: vec![("x-user", b"alice"), ("x-user", b"bob")],
                ..r()
            },
            true,
        ),
        case(
            "request.headers presence needs a non-empty value",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values("request.headers[x-token]", &["*"]))],
            )],
            Req {
                headers: vec![("x-token", b"")],
                ..r()
            },
            false,
        ),
        case(
            "request.headers notValues",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::not_values(
                    "request.headers[x-env]",
                    &["prod"],
                ))],
            )],
            Req {
                headers: vec![("x-env", b"prod")],
                ..r()
            },
            false,
        ),
        case(
            "request.headers absent matches notValues",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::not_values(
                    "request.headers[x-env]",
                    &["prod"],
                ))],
            )],
            r(),
            true,
        ),
        case(
            "obs-text header value fails closed for DENY (CVE-2026-73552)",
            vec![policy(
                "d",
                Deny,
                vec![when(Condition::values(
                    "request.headers[x-user]",
                    &["admin"],
                ))],
            )],
            Req {
                headers: vec![("x-user", b"adm\xffin")],
                ..r()
            },
            false,
        ),
        case(
            "obs-text header value fails closed for ALLOW",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::not_values(
                    "request.headers[x-user]",
                    &["admin"],
                ))],
            )],
            Req {
                headers: vec![("x-user", b"adm\xffin")],
                ..r()
            },
            false,
        ),
        case(
            "source.ip condition",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values("source.ip", &["10.1.2.0/24"]))],
            )],
            r(),
            true,
        ),
        case(
            "remote.ip condition",
            vec![policy(
                "d",
                Deny,
                vec![when(Condition::values("remote.ip", &["198.51.100.0/24"]))],
            )],
            Req {
                xff_client: Some("198.51.100.9"),
                ..r()
            },
            false,
        ),
        case(
            "source.namespace condition",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values("source.namespace", &["production"]))],
            )],
            r(),
            true,
        ),
        case(
            "source.principal condition",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values(
                    "source.principal",
                    &["*/sa/order-service"],
                ))],
            )],
            r(),
            true,
        ),
        case(
            "destination.ip condition",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values("destination.ip", &["10.9.9.9"]))],
            )],
            r(),
            true,
        ),
        case(
            "destination.port notValues",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::not_values("destination.port", &["8080"]))],
            )],
            r(),
            false,
        ),
        case(
            "connection.sni known",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values(
                    "connection.sni",
                    &["payment.production.svc"],
                ))],
            )],
            Req {
                sni: ServerName::Known(Some("Payment.production.svc")),
                ..r()
            },
            true,
        ),
        case(
            "connection.sni unknown fails closed for ALLOW",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition::values("connection.sni", &["*"]))],
            )],
            r(),
            false,
        ),
        case(
            "values and notValues together",
            vec![policy(
                "p",
                Allow,
                vec![when(Condition {
                    key: "request.headers[x-env]".into(),
                    values: s(&["prod*"]),
                    not_values: s(&["prod-eu"]),
                })],
            )],
            Req {
                headers: vec![("x-env", b"prod-eu")],
                ..r()
            },
            false,
        ),
    ]
}

#[test]
fn istio_evaluation_table() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let (allowed, by, _) = decide(&c.policies, &c.req);
        if allowed != c.allowed || c.by.is_some_and(|want| by.as_deref() != Some(want)) {
            failures.push(format!(
                "{}: got allowed={allowed} by={by:?}, want allowed={} by={:?}",
                c.name, c.allowed, c.by
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn decision_names_the_deciding_rule_and_the_audit_rule() {
    let policies = vec![
        policy(
            "audit-admin",
            Action::Audit,
            vec![to(paths(&["/x"])), to(paths(&["/admin*"]))],
        ),
        policy(
            "deny-admin",
            Action::Deny,
            vec![to(paths(&["/nothing"])), to(paths(&["/admin"]))],
        ),
        policy("allow-all", Action::Allow, vec![Rule::default()]),
    ];
    let admin = Req {
        path: "/admin",
        ..Req::default()
    };
    assert_eq!(
        decide(&policies, &admin),
        (
            false,
            Some("production/deny-admin#1".into()),
            Some("production/audit-admin#1".into())
        )
    );
    assert_eq!(
        decide(&policies, &Req::default()),
        (true, Some("production/allow-all#0".into()), None)
    );
    // Denied for want of a matching ALLOW: no policy is named.
    let only_post = vec![policy(
        "allow-post",
        Action::Allow,
        vec![to(Operation {
            methods: s(&["POST"]),
            ..Default::default()
        })],
    )];
    assert_eq!(decide(&only_post, &Req::default()), (false, None, None));
}

#[test]
fn dry_run_policies_are_reported_but_not_enforced() {
    let mut deny = policy("deny-all", Action::Deny, vec![Rule::default()]);
    deny.dry_run = true;
    let set = PolicySet::compile([&deny]).unwrap();
    let headers = HeaderMap::new();
    let d = set.evaluate(&RequestAttributes {
        method: "GET",
        path: "/",
        host: None,
        headers: &headers,
        peer: None,
        connection: None,
        remote_ip: None,
        server_name: ServerName::Unknown,
        request_auth: None,
    });
    assert!(d.allowed);
    let shadow = d.dry_run.expect("dry-run result");
    assert!(!shadow.allowed);
    assert_eq!(&*shadow.policy.unwrap().name, "production/deny-all");
}

#[test]
fn invalid_policies_are_rejected_with_the_field() {
    let bad: Vec<(Policy, &str)> = vec![
        (policy("c", Action::Custom, vec![Rule::default()]), "action"),
        (
            Policy {
                rules: None,
                ..policy("d", Action::Deny, vec![])
            },
            "rules",
        ),
        (
            policy(
                "e",
                Action::Allow,
                vec![Rule {
                    from: Some(vec![]),
                    ..Rule::default()
                }],
            ),
            "rules[0].from",
        ),
        (
            policy(
                "f",
                Action::Allow,
                vec![Rule {
                    to: Some(vec![]),
                    ..Rule::default()
                }],
            ),
            "rules[0].to",
        ),
        (
            policy("g", Action::Allow, vec![from(Source::default())]),
            "rules[0].from[0].source",
        ),
        (
            policy("h", Action::Allow, vec![to(Operation::default())]),
            "rules[0].to[0].operation",
        ),
        (
            policy(
                "i",
                Action::Allow,
                vec![from(Source {
                    ip_blocks: s(&["10.0.0.0/33"]),
                    ..Default::default()
                })],
            ),
            "rules[0].from[0].source.ipBlocks[0]",
        ),
        (
            policy(
                "j",
                Action::Allow,
                vec![to(Operation {
                    ports: s(&["70000"]),
                    ..Default::default()
                })],
            ),
            "rules[0].to[0].operation.ports[0]",
        ),
        (
            policy("k", Action::Allow, vec![to(paths(&["/a", ""]))]),
            "rules[0].to[0].operation.paths[1]",
        ),
        (
            policy("l", Action::Allow, vec![to(paths(&["/a/{**}/b"]))]),
            "rules[0].to[0].operation.paths[0]",
        ),
        (
            policy(
                "m",
                Action::Allow,
                vec![when(Condition {
                    key: "source.ip".into(),
                    ..Default::default()
                })],
            ),
            "rules[0].when[0]",
        ),
        (
            policy(
                "n",
                Action::Allow,
                vec![when(Condition::values(
                    "experimental.envoy.filters.x",
                    &["y"],
                ))],
            ),
            "rules[0].when[0].key",
        ),
        (
            policy(
                "o",
                Action::Allow,
                vec![when(Condition::values(
                    "request.headers[bad header]",
                    &["y"],
                ))],
            ),
            "rules[0].when[0].key",
        ),
        (
            policy(
                "p",
                Action::Allow,
                vec![from(Source {
                    service_accounts: s(&["sa"]),
                    principals: s(&["x"]),
                    ..Default::default()
                })],
            ),
            "rules[0].from[0].source",
        ),
        (
            policy(
                "q",
                Action::Allow,
                vec![from(Source {
                    service_accounts: s(&["ns/sa*"]),
                    ..Default::default()
                })],
            ),
            "rules[0].from[0].source.serviceAccounts[0]",
        ),
    ];
    for (p, field) in bad {
        let err = PolicySet::compile([&p]).expect_err(&p.name);
        assert_eq!(err.field, field, "{}: {err}", p.name);
        assert_eq!(err.policy, format!("production/{}", p.name));
    }
    let custom =
        PolicySet::compile([&policy("c", Action::Custom, vec![Rule::default()])]).unwrap_err();
    assert!(
        custom
            .to_string()
            .contains("CUSTOM (ext-authz) is not supported"),
        "{custom}"
    );
}

#[test]
fn workload_scope_follows_namespace_root_and_selector() {
    let workload = Workload {
        namespace: "production".into(),
        labels: [("app".to_owned(), "payment".to_owned())].into(),
        root_namespace: "istio-system".into(),
        ..Workload::default()
    };
    let mesh_wide = Policy::new("istio-system", "mesh", Action::Allow, vec![]);
    let root_selector = Policy::new("istio-system", "root-sel", Action::Allow, vec![])
        .with_selector([("app", "payment")]);
    let same_ns = Policy::new("production", "ns", Action::Allow, vec![]);
    let selector_match =
        Policy::new("production", "sel", Action::Allow, vec![]).with_selector([("app", "payment")]);
    let selector_miss = Policy::new("production", "other", Action::Allow, vec![])
        .with_selector([("app", "orders")]);
    let other_ns = Policy::new("staging", "ns", Action::Allow, vec![]);
    // A policy bound to a waypoint (a Service) or to another gateway is not this
    // workload's; one naming the Gateway API gateway whose pods carry its name label is.
    let target = |kind: &str, name: &str| mesh_core::config::PolicyTargetReference {
        group: Some(
            if kind == "Service" {
                ""
            } else {
                "gateway.networking.k8s.io"
            }
            .into(),
        ),
        kind: kind.into(),
        name: name.into(),
        namespace: None,
    };
    let mut targeted = Policy::new("production", "gw", Action::Allow, vec![]);
    targeted.target_refs = vec![target("Service", "payment"), target("Gateway", "edge")];
    let mut gateway = workload.clone();
    gateway
        .labels
        .insert(mesh_core::config::GATEWAY_NAME_LABEL.into(), "edge".into());
    assert!(gateway.is_selected_by(&targeted));
    let mut elsewhere = gateway.clone();
    elsewhere.namespace = "staging".into();
    assert!(!elsewhere.is_selected_by(&targeted));
    assert!(workload.is_selected_by(&mesh_wide));
    assert!(workload.is_selected_by(&root_selector));
    assert!(workload.is_selected_by(&same_ns));
    assert!(workload.is_selected_by(&selector_match));
    assert!(!workload.is_selected_by(&selector_miss));
    assert!(!workload.is_selected_by(&other_ns));
    assert!(!workload.is_selected_by(&targeted));

    // An invalid policy out of scope does not break the workload's set.
    let broken = Policy::new("staging", "broken", Action::Custom, vec![]);
    let allow_get = Policy::new(
        "production",
        "allow-get",
        Action::Allow,
        vec![to(Operation {
            methods: s(&["GET"]),
            ..Default::default()
        })],
    );
    let set = PolicySet::for_workload([&broken, &allow_get], &workload).unwrap();
    assert_eq!(set.len(), 1);
}

#[test]
fn trust_domain_aliases_make_principals_equivalent() {
    let workload = |aliases: &[&str]| Workload {
        namespace: "production".into(),
        root_namespace: "istio-system".into(),
        trust_domain: "new.local".into(),
        trust_domain_aliases: s(aliases),
        ..Workload::default()
    };
    let allow_old = policy(
        "p",
        Action::Allow,
        vec![from(principals(&[
            "old.local/ns/production/sa/order-service",
        ]))],
    );
    let deny_new = policy(
        "d",
        Action::Deny,
        vec![when(Condition::values(
            "source.principal",
            &["new.local/ns/production/sa/intruder"],
        ))],
    );
    let check = |aliases: &[&str], peer: &'static str| {
        let set = PolicySet::for_workload([&allow_old, &deny_new], &workload(aliases)).unwrap();
        let headers = HeaderMap::new();
        let id = Identity::parse(peer).unwrap();
        set.evaluate(&RequestAttributes {
            method: "GET",
            path: "/",
            host: None,
            headers: &headers,
            peer: Some(&id),
            connection: None,
            remote_ip: None,
            server_name: ServerName::Unknown,
            request_auth: None,
        })
        .allowed
    };
    // Without aliases the policy written for old.local does not admit new.local.
    assert!(!check(
        &[],
        "spiffe://new.local/ns/production/sa/order-service"
    ));
    assert!(check(
        &["old.local"],
        "spiffe://new.local/ns/production/sa/order-service"
    ));
    assert!(check(
        &["old.local"],
        "spiffe://old.local/ns/production/sa/order-service"
    ));
    assert!(!check(
        &["old.local"],
        "spiffe://other.local/ns/production/sa/order-service"
    ));
    // The DENY written for new.local also covers the alias.
    assert!(!check(
        &["old.local"],
        "spiffe://old.local/ns/production/sa/intruder"
    ));
}

#[test]
fn tcp_connections_treat_http_fields_as_unknown() {
    let peer = Identity::parse("spiffe://cluster.local/ns/production/sa/order-service").unwrap();
    let info = ConnectionInfo {
        remote: "10.1.2.3:40000".parse().unwrap(),
        local: "10.9.9.9:5432".parse().unwrap(),
        security: ConnectionSecurity::MutualTls,
    };
    let tcp = |policies: &[Policy]| {
        PolicySet::compile(policies)
            .unwrap()
            .evaluate_connection(Some(&peer), &info, ServerName::Unknown)
            .allowed
    };
    let allow_post = policy(
        "p",
        Action::Allow,
        vec![Rule {
            from: Some(vec![principals(&["*"])]),
            to: Some(vec![Operation {
                methods: s(&["POST"]),
                ..Default::default()
            }]),
            when: vec![],
        }],
    );
    let allow_port = policy(
        "p",
        Action::Allow,
        vec![Rule {
            from: Some(vec![principals(&["*"])]),
            to: Some(vec![Operation {
                ports: s(&["5432"]),
                ..Default::default()
            }]),
            when: vec![],
        }],
    );
    let deny_paths = policy("d", Action::Deny, vec![to(paths(&["/admin"]))]);
    let deny_paths_scoped = policy(
        "d",
        Action::Deny,
        vec![to(Operation {
            paths: s(&["/admin"]),
            ports: s(&["8080"]),
            ..Default::default()
        })],
    );
    // AP-30: an ALLOW rule needing HTTP fields never matches a TCP connection.
    assert!(!tcp(&[allow_post]));
    assert!(tcp(std::slice::from_ref(&allow_port)));
    // A DENY with only HTTP fields denies every TCP connection in scope...
    assert!(!tcp(&[allow_port.clone(), deny_paths]));
    // ...unless scoped to another port.
    assert!(tcp(&[allow_port, deny_paths_scoped]));
}
