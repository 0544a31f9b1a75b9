//! mesh-tls authz: decision time for AuthorizationPolicy sets, path canonicalization,
//! and the whole layer around a no-op service.
//!
//! `cargo bench -p benches --bench authz -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Request, Response};
use mesh_core::{ConnectionInfo, ConnectionSecurity, Identity, PeerIdentity};
use mesh_tls::authz::{
    Action, AuthzLayer, Condition, NormalizeOptions, Operation, PathNormalization, Policy,
    PolicySet, RequestAttributes, Rule, ServerName, Source, canonicalize,
};
use tower::{Layer, Service, ServiceExt};

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

/// How the sources (and paths) of the 100 x 10 set are written.
#[derive(Clone, Copy)]
enum Shape {
    /// `principals: [cluster.local/ns/ns<p>/sa/sa<r>]`.
    ExactPrincipals,
    /// `principals: [cluster.local/ns/ns<p>/*]` (a namespace's workloads).
    PrefixPrincipals,
    /// `principals: [*/ns/ns<p>/sa/sa<r>]` (a workload in any trust domain).
    SuffixPrincipals,
    /// `namespaces: [ns<p>]`, no principals.
    Namespaces,
    /// `ipBlocks: [192.168.<p>.0/24]` only, with per-rule paths `/api/p<p>/v<r>/{*}`.
    IpBlocksAndPaths,
    /// `ipBlocks: [192.168.<p>.0/24]` only, and every rule also allows
    /// `/api/v1/payments/*`: every rule is a candidate for the request (the worst case).
    IpBlocksOnly,
}

/// 100 policies x 10 rules (every 10th a DENY), each rule with a source (see [`Shape`]),
/// ipBlocks, hosts, methods, a URI template, ports and a header condition. Only the last
/// rule of the last policy matches the request.
fn hundred_by_ten(shape: Shape) -> Vec<Policy> {
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
                    let (ns, sa) = if last {
                        ("production".to_string(), "order-service".to_string())
                    } else {
                        (format!("ns{p}"), format!("sa{r}"))
                    };
                    let mut source = Source {
                        ip_blocks: vec!["10.0.0.0/8".into()],
                        ..Source::default()
                    };
                    match shape {
                        Shape::ExactPrincipals => {
                            source.principals = vec![format!("cluster.local/ns/{ns}/sa/{sa}")];
                            source.namespaces = vec!["prod*".into()];
                        }
                        Shape::PrefixPrincipals => {
                            source.principals = vec![format!("cluster.local/ns/{ns}/*")];
                            source.namespaces = vec!["prod*".into()];
                        }
                        Shape::SuffixPrincipals => {
                            source.principals = vec![format!("*/ns/{ns}/sa/{sa}")];
                            source.namespaces = vec!["prod*".into()];
                        }
                        Shape::Namespaces => source.namespaces = vec![ns],
                        Shape::IpBlocksAndPaths | Shape::IpBlocksOnly if !last => {
                            source.ip_blocks = vec![format!("192.168.{p}.0/24")];
                        }
                        Shape::IpBlocksAndPaths | Shape::IpBlocksOnly => {}
                    }
                    let paths = match shape {
                        Shape::IpBlocksAndPaths if !last => {
                            vec![format!("/api/p{p}/v{r}/{{*}}"), format!("/api/p{p}/v{r}")]
                        }
                        _ => vec![format!("/api/v{r}/{{*}}/x"), "/api/v1/payments/*".into()],
                    };
                    Rule {
                        from: Some(vec![source]),
                        to: Some(vec![Operation {
                            hosts: vec!["*.svc".into(), "payment".into()],
                            methods: vec!["POST".into(), "PUT".into()],
                            paths,
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

fn decisions(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", http::HeaderValue::from_static("acme"));
    let peer =
        Identity::parse("spiffe://cluster.local/ns/production/sa/order-service").expect("valid id");
    let info = ConnectionInfo {
        remote: "10.1.2.3:40000".parse().expect("addr"),
        local: "10.9.9.9:8080".parse().expect("addr"),
        security: ConnectionSecurity::MutualTls,
    };
    let attrs = |method, path| RequestAttributes {
        method,
        path,
        host: Some("payment.production.svc"),
        headers: &headers,
        peer: Some(&peer),
        connection: Some(&info),
        remote_ip: None,
        server_name: ServerName::Unknown,
        request_auth: None,
    };

    let article = PolicySet::compile([&article()]).expect("compiles");
    let allow = attrs("POST", "/api/v1/payments/123");
    let deny = attrs("GET", "/api/v1/payments/123");
    c.bench_function("authz/article/allow", |b| {
        b.iter(|| black_box(&article).evaluate(black_box(&allow)).allowed)
    });
    c.bench_function("authz/article/deny", |b| {
        b.iter(|| black_box(&article).evaluate(black_box(&deny)).allowed)
    });

    let policies = hundred_by_ten(Shape::ExactPrincipals);
    let big = PolicySet::compile(&policies).expect("compiles");
    c.bench_function("authz/100x10/allow_last_rule", |b| {
        b.iter(|| black_box(&big).evaluate(black_box(&allow)).allowed)
    });
    c.bench_function("authz/100x10/deny_no_match", |b| {
        b.iter(|| black_box(&big).evaluate(black_box(&deny)).allowed)
    });
    for (name, shape) in [
        ("prefix_principals", Shape::PrefixPrincipals),
        ("suffix_principals", Shape::SuffixPrincipals),
        ("namespaces", Shape::Namespaces),
        ("ip_and_paths", Shape::IpBlocksAndPaths),
        ("worst_case", Shape::IpBlocksOnly),
    ] {
        let set = PolicySet::compile(&hundred_by_ten(shape)).expect("compiles");
        assert!(set.evaluate(&allow).allowed && !set.evaluate(&deny).allowed);
        c.bench_function(&format!("authz/100x10_{name}/allow_last_rule"), |b| {
            b.iter(|| black_box(&set).evaluate(black_box(&allow)).allowed)
        });
    }
    c.bench_function("authz/100x10/compile", |b| {
        b.iter(|| PolicySet::compile(black_box(&policies)).expect("compiles"))
    });
}

fn canonicalization(c: &mut Criterion) {
    let base = NormalizeOptions::default();
    let decode = NormalizeOptions::new(PathNormalization::DecodeAndMergeSlashes);
    c.bench_function("authz/canonicalize/canonical", |b| {
        b.iter(|| canonicalize(black_box("/api/v1/payments/123?currency=eur"), &base).is_ok())
    });
    c.bench_function("authz/canonicalize/rewrite", |b| {
        b.iter(|| {
            canonicalize(
                black_box("/api/v1/./x/..//payments%2F%31%32%33?currency=eur"),
                &decode,
            )
            .is_ok()
        })
    });
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let set = PolicySet::compile([&article()]).expect("compiles");
    let svc = AuthzLayer::new(set).layer(tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
    }));
    let peer = PeerIdentity(
        Identity::parse("spiffe://cluster.local/ns/production/sa/order-service").expect("id"),
    );
    let info = ConnectionInfo {
        remote: "10.1.2.3:40000".parse().expect("addr"),
        local: "10.9.9.9:8080".parse().expect("addr"),
        security: ConnectionSecurity::MutualTls,
    };
    c.bench_function("authz/layer/article_allow", |b| {
        b.iter(|| {
            let mut req = Request::post("/api/v1/payments/123")
                .header("host", "payment")
                .body(())
                .expect("request");
            req.extensions_mut().insert(peer.clone());
            req.extensions_mut().insert(info);
            let mut svc = svc.clone();
            rt.block_on(async move {
                let svc = svc.ready().await.expect("ready");
                svc.call(req).await.expect("response").status()
            })
        })
    });
}

criterion_group!(benches, decisions, canonicalization, layer);
criterion_main!(benches);
