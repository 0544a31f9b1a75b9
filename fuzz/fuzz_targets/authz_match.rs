//! Fuzzes policy compilation and matching with arbitrary values and requests: never
//! panics, and the three-valued evaluation stays consistent: whenever a rule set matches
//! as an ALLOW policy, the same rules as a DENY policy deny (an ALLOW needs a sure
//! match, a DENY also takes an unsure one).
//!
//! `cargo +nightly fuzz run authz_match`

#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use mesh_core::{ConnectionInfo, ConnectionSecurity, Identity};
use mesh_tls::authz::{
    Action, Condition, Operation, Policy, PolicySet, RequestAttributes, Rule, ServerName, Source,
};

#[derive(Arbitrary, Debug)]
struct FuzzSource {
    principals: Vec<String>,
    not_principals: Vec<String>,
    request_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<String>,
    not_remote_ip_blocks: Vec<String>,
    service_accounts: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct FuzzOperation {
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    ports: Vec<String>,
    methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct FuzzCondition {
    key: u8,
    header: String,
    values: Vec<String>,
    not_values: Vec<String>,
}

#[derive(Arbitrary, Debug)]
struct FuzzRule {
    from: Option<Vec<FuzzSource>>,
    to: Option<Vec<FuzzOperation>>,
    when: Vec<FuzzCondition>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    rules: Vec<FuzzRule>,
    method: String,
    path: String,
    host: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    peer: Option<(String, String)>,
    remote: ([u8; 4], u16),
    connection: bool,
    sni: Option<Option<String>>,
}

const KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "request.auth.claims[groups]",
    "experimental.envoy.filters.x",
];

fn rules(input: &Input) -> Vec<Rule> {
    input
        .rules
        .iter()
        .map(|r| Rule {
            from: r.from.as_ref().map(|v| {
                v.iter()
                    .map(|s| Source {
                        principals: s.principals.clone(),
                        not_principals: s.not_principals.clone(),
                        request_principals: s.request_principals.clone(),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        ip_blocks: s.ip_blocks.clone(),
                        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                        service_accounts: s.service_accounts.clone(),
                        ..Source::default()
                    })
                    .collect()
            }),
            to: r.to.as_ref().map(|v| {
                v.iter()
                    .map(|o| Operation {
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                        ports: o.ports.clone(),
                        methods: o.methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                        ..Operation::default()
                    })
                    .collect()
            }),
            when: r
                .when
                .iter()
                .map(|c| Condition {
                    key: match KEYS.get(usize::from(c.key)) {
                        Some(k) => (*k).to_owned(),
                        None => format!("request.headers[{}]", c.header),
                    },
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                })
                .collect(),
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let rules = rules(&input);
    let allow = Policy::new("ns", "allow", Action::Allow, rules.clone());
    let deny = Policy::new("ns", "deny", Action::Deny, rules);
    let (Ok(allow), Ok(deny)) = (PolicySet::compile([&allow]), PolicySet::compile([&deny])) else {
        return;
    };

    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    let peer = input
        .peer
        .as_ref()
        .and_then(|(ns, sa)| Identity::from_istio("cluster.local", ns, sa).ok());
    let info = ConnectionInfo {
        remote: (input.remote.0, input.remote.1).into(),
        local: ([10, 0, 0, 1], 8080).into(),
        security: if peer.is_some() {
            ConnectionSecurity::MutualTls
        } else {
            ConnectionSecurity::None
        },
    };
    let attrs = RequestAttributes {
        method: &input.method,
        path: &input.path,
        host: input.host.as_deref(),
        headers: &headers,
        peer: peer.as_ref(),
        connection: input.connection.then_some(&info),
        remote_ip: None,
        server_name: match &input.sni {
            Some(s) => ServerName::Known(s.as_deref()),
            None => ServerName::Unknown,
        },
        request_auth: None,
    };
    let allowed = allow.evaluate(&attrs);
    let denied = deny.evaluate(&attrs);
    if allowed.allowed && allowed.policy.is_some() {
        assert!(
            !denied.allowed,
            "ALLOW matched but DENY with the same rules did not"
        );
    }
    assert_eq!(
        allow.evaluate(&attrs),
        allowed,
        "decisions are deterministic"
    );
});
