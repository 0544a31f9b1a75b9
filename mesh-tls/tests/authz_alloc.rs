//! Decisions on the allow path do not allocate: counted with a counting global
//! allocator (the `allocation-counter` crate, per thread).

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use http::HeaderMap;
use mesh_core::{ConnectionInfo, ConnectionSecurity, Identity};
use mesh_tls::authz::{
    Action, Condition, NormalizeOptions, Operation, PathNormalization, Policy, PolicySet,
    RequestAttributes, Rule, ServerName, Source, canonicalize,
};

fn article() -> Policy {
    Policy::new(
        "production",
        "payment-policy",
        Action::Allow,
        vec![Rule {
            from: Some(vec![Source {
                principals: vec!["cluster.local/ns/production/sa/order-service".into()],
                ..Source::default()
            }]),
            to: Some(vec![Operation {
                methods: vec!["POST".into()],
                paths: vec!["/api/v1/payments".into(), "/api/v1/payments/*".into()],
                ..Operation::default()
            }]),
            when: vec![],
        }],
    )
}

/// 100 policies of 10 rules each, touching every kind of field; only the very last rule
/// of the last ALLOW policy matches the request, so every rule is evaluated.
fn hundred_by_ten() -> Vec<Policy> {
    (0..100)
        .map(|p| {
            let action = if p % 10 == 0 {
                Action::Deny
            } else {
                Action::Allow
            };
            let rules = (0..10)
                .map(|r| {
                    let last = p == 99 && r == 9;
                    Rule {
                        from: Some(vec![Source {
                            principals: vec![if last {
                                "cluster.local/ns/production/sa/order-service".into()
                            } else {
                                format!("cluster.local/ns/ns{p}/sa/sa{r}")
                            }],
                            namespaces: vec!["prod*".into()],
                            ip_blocks: vec!["10.0.0.0/8".into()],
                            ..Source::default()
                        }]),
                        to: Some(vec![Operation {
                            hosts: vec!["*.svc".into(), "payment".into()],
                            methods: vec!["POST".into(), "PUT".into()],
                            paths: vec![format!("/api/v{r}/{{*}}/x"), "/api/v1/payments/*".into()],
                            ports: vec!["8080".into()],
                            ..Operation::default()
                        }]),
                        when: vec![Condition::values(
                            "request.headers[x-tenant]",
                            &["acme", "globex*"],
                        )],
                    }
                })
                .collect();
            Policy::new("production", &format!("p{p}"), action, rules)
        })
        .collect()
}

struct Fixture {
    headers: HeaderMap,
    peer: Identity,
    info: ConnectionInfo,
}

impl Fixture {
    fn new() -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "acme".parse().unwrap());
        Fixture {
            headers,
            peer: Identity::parse("spiffe://cluster.local/ns/production/sa/order-service").unwrap(),
            info: ConnectionInfo {
                remote: "10.1.2.3:40000".parse().unwrap(),
                local: "10.9.9.9:8080".parse().unwrap(),
                security: ConnectionSecurity::MutualTls,
            },
        }
    }

    fn attrs<'a>(&'a self, path: &'a str) -> RequestAttributes<'a> {
        RequestAttributes {
            method: "POST",
            path,
            host: Some("payment.production.svc"),
            headers: &self.headers,
            peer: Some(&self.peer),
            connection: Some(&self.info),
            remote_ip: None,
            server_name: ServerName::Unknown,
            request_auth: None,
        }
    }
}

#[test]
fn article_policy_allow_decision_does_not_allocate() {
    let set = PolicySet::compile([&article()]).unwrap();
    let f = Fixture::new();
    let attrs = f.attrs("/api/v1/payments/123");
    let mut allowed = false;
    let info = allocation_counter::measure(|| {
        for _ in 0..100 {
            allowed = black_box(&set).evaluate(black_box(&attrs)).allowed;
        }
    });
    assert!(allowed);
    assert_eq!(info.count_total, 0, "{info:?}");
}

#[test]
fn hundred_policies_allow_decision_does_not_allocate() {
    let policies = hundred_by_ten();
    let set = PolicySet::compile(&policies).unwrap();
    let f = Fixture::new();
    let attrs = f.attrs("/api/v1/payments/123");
    let mut decision = None;
    let info = allocation_counter::measure(|| {
        decision = Some(black_box(&set).evaluate(black_box(&attrs)));
    });
    let decision = decision.unwrap();
    assert!(decision.allowed);
    assert_eq!(
        decision.policy.map(|m| (m.name.to_string(), m.rule)),
        Some(("production/p99".into(), 9))
    );
    assert_eq!(info.count_total, 0, "{info:?}");
}

/// The 100 x 10 set with every source rewritten by `source(policy, rule, last)`.
fn hundred_by_ten_with(source: impl Fn(usize, usize, bool) -> Source) -> Vec<Policy> {
    let mut policies = hundred_by_ten();
    for (p, policy) in policies.iter_mut().enumerate() {
        for (r, rule) in policy.rules.iter_mut().flatten().enumerate() {
            rule.from = Some(vec![source(p, r, p == 99 && r == 9)]);
        }
    }
    policies
}

#[test]
fn indexed_wildcard_namespace_and_path_decisions_do_not_allocate() {
    let ns = |p: usize, last: bool| {
        if last {
            "production".to_string()
        } else {
            format!("ns{p}")
        }
    };
    let sets = [
        hundred_by_ten_with(|p, _, last| Source {
            principals: vec![format!("cluster.local/ns/{}/*", ns(p, last))],
            ..Source::default()
        }),
        hundred_by_ten_with(|p, r, last| Source {
            principals: vec![if last {
                "*/sa/order-service".into()
            } else {
                format!("*/ns/ns{p}/sa/sa{r}")
            }],
            ..Source::default()
        }),
        hundred_by_ten_with(|p, _, last| Source {
            namespaces: vec![ns(p, last)],
            ..Source::default()
        }),
        hundred_by_ten_with(|p, _, last| Source {
            ip_blocks: vec![if last {
                "10.0.0.0/8".into()
            } else {
                format!("192.168.{p}.0/24")
            }],
            ..Source::default()
        }),
    ];
    let f = Fixture::new();
    let attrs = f.attrs("/api/v1/payments/123");
    for policies in &sets {
        let set = PolicySet::compile(policies).unwrap();
        let mut decision = None;
        let info = allocation_counter::measure(|| {
            decision = Some(black_box(&set).evaluate(black_box(&attrs)));
        });
        let decision = decision.unwrap();
        assert!(decision.allowed);
        assert_eq!(
            decision.policy.map(|m| (m.name.to_string(), m.rule)),
            Some(("production/p99".into(), 9))
        );
        assert_eq!(info.count_total, 0, "{info:?}");
    }
}

#[test]
fn canonical_targets_are_not_copied() {
    for mode in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        let opts = NormalizeOptions::new(mode);
        let info = allocation_counter::measure(|| {
            let c =
                canonicalize(black_box("/api/v1/payments/123?currency=eur#top"), &opts).unwrap();
            assert_eq!(c.path(), "/api/v1/payments/123");
        });
        assert_eq!(info.count_total, 0, "{mode:?}: {info:?}");
    }
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the tests above against a counter that counts nothing.
    let set = PolicySet::compile([&article()]).unwrap();
    let info = allocation_counter::measure(|| {
        let c = canonicalize(
            black_box("/api/v1/./payments"),
            &NormalizeOptions::default(),
        )
        .unwrap();
        black_box(c);
        black_box(set.clone());
    });
    assert!(info.count_total > 0);
}
