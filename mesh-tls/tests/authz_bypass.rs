//! Known authorization bypasses (SECURITY.md §2.1, ISTIO.md AP-47) against a DENY on
//! `/admin` and `/admin/*`, under every path normalization mode. Each request is written
//! byte for byte on a real socket to a hyper server; every case asserts the status and
//! the exact target the application received (or that it received nothing).

#![allow(clippy::unwrap_used)]

mod authz_support;

use authz_support::Server;
use mesh_tls::authz::{
    Action, AuthzLayer, NormalizeOptions, Operation, PathNormalization, PathParameters, Policy,
    PolicySet, Rule,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// 403, application not called.
    Deny,
    /// 400, application not called.
    Bad,
    /// 200, application called with this target.
    Pass(&'static str),
}
use Want::*;

fn deny_admin() -> PolicySet {
    let policy = Policy::new(
        "production",
        "deny-admin",
        Action::Deny,
        vec![Rule {
            to: Some(vec![Operation {
                paths: vec!["/admin".into(), "/admin/*".into()],
                ..Operation::default()
            }]),
            ..Rule::default()
        }],
    );
    PolicySet::compile([&policy]).unwrap()
}

async fn check(server: &Server, label: &str, target: &str, want: Want) -> Result<(), String> {
    let (status, body) = server.raw_get(target).await;
    let seen: Vec<String> = server.take_seen().into_iter().map(|s| s.target).collect();
    let got = match (status, seen.as_slice()) {
        (403, []) if body == "RBAC: access denied" => Deny,
        (400, []) => Bad,
        (200, [one]) => Pass(Box::leak(one.clone().into_boxed_str())),
        _ => {
            return Err(format!(
                "{label} {target:?}: status {status}, body {body:?}, app saw {seen:?}"
            ));
        }
    };
    if got == want {
        Ok(())
    } else {
        Err(format!("{label} {target:?}: got {got:?}, want {want:?}"))
    }
}

/// (input, [NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES])
const CASES: &[(&str, [Want; 4])] = &[
    ("/admin", [Deny, Deny, Deny, Deny]),
    (
        "/public",
        [
            Pass("/public"),
            Pass("/public"),
            Pass("/public"),
            Pass("/public"),
        ],
    ),
    // CVE-2020-8595: query and fragment do not take part in path matching.
    ("/admin?x=1", [Deny, Deny, Deny, Deny]),
    ("/admin?", [Deny, Deny, Deny, Deny]),
    // CVE-2021-39156 / CVE-2021-32779: fragments are stripped, never forwarded.
    ("/admin#x", [Deny, Deny, Deny, Deny]),
    (
        "/public#x",
        [
            Pass("/public"),
            Pass("/public"),
            Pass("/public"),
            Pass("/public"),
        ],
    ),
    // CVE-2019-9901: dot segments.
    ("/info/../admin", [Pass("/info/../admin"), Deny, Deny, Deny]),
    (
        "/something/../admin",
        [Pass("/something/../admin"), Deny, Deny, Deny],
    ),
    ("/./admin", [Pass("/./admin"), Deny, Deny, Deny]),
    ("/admin/.", [Deny, Deny, Deny, Deny]),
    (
        "/x/../admin/..",
        [Pass("/x/../admin/.."), Pass("/"), Pass("/"), Pass("/")],
    ),
    ("/%2e%2e/admin", [Pass("/%2e%2e/admin"), Deny, Deny, Deny]),
    ("/x/%2E./admin", [Pass("/x/%2E./admin"), Deny, Deny, Deny]),
    // Encoded unreserved characters.
    ("/%61dmin", [Pass("/%61dmin"), Deny, Deny, Deny]),
    ("/admi%6E/x", [Pass("/admi%6E/x"), Deny, Deny, Deny]),
    // No double decoding.
    (
        "/x/%252e%252e/admin",
        [
            Pass("/x/%252e%252e/admin"),
            Pass("/x/%252e%252e/admin"),
            Pass("/x/%252e%252e/admin"),
            Pass("/x/%252e%252e/admin"),
        ],
    ),
    // CVE-2021-31920 / CVE-2021-29492 and CVE-2026-26205: slashes. BASE keeps `//` and
    // `%2F` as Istio does (documented); the app receives exactly the path that was judged.
    ("//admin", [Pass("//admin"), Pass("//admin"), Deny, Deny]),
    (
        "//admin/secret",
        [Pass("//admin/secret"), Pass("//admin/secret"), Deny, Deny],
    ),
    (
        "/a//..//admin",
        [Pass("/a//..//admin"), Pass("/a//admin"), Deny, Deny],
    ),
    (
        "/something%2F..%2Fadmin",
        [
            Pass("/something%2F..%2Fadmin"),
            Pass("/something%2F..%2Fadmin"),
            Pass("/something%2F..%2Fadmin"),
            Deny,
        ],
    ),
    (
        "/something%2f..%2fadmin",
        [
            Pass("/something%2f..%2fadmin"),
            Pass("/something%2F..%2Fadmin"),
            Pass("/something%2F..%2Fadmin"),
            Deny,
        ],
    ),
    (
        "/%2Fadmin",
        [
            Pass("/%2Fadmin"),
            Pass("/%2Fadmin"),
            Pass("/%2Fadmin"),
            Deny,
        ],
    ),
    (
        "/admin%2fx",
        [
            Pass("/admin%2fx"),
            Pass("/admin%2Fx"),
            Pass("/admin%2Fx"),
            Deny,
        ],
    ),
    (
        "/%5Cadmin",
        [
            Pass("/%5Cadmin"),
            Pass("/%5Cadmin"),
            Pass("/%5Cadmin"),
            Deny,
        ],
    ),
    (
        "/x%5C..%5Cadmin",
        [
            Pass("/x%5C..%5Cadmin"),
            Pass("/x%5C..%5Cadmin"),
            Pass("/x%5C..%5Cadmin"),
            Deny,
        ],
    ),
    ("/x\\..\\admin", [Pass("/x\\..\\admin"), Deny, Deny, Deny]),
    // CVE-2026-73553 / CVE-2026-73511 / CVE-2026-73551: `;` path parameters.
    ("/admin;x=y/action", [Bad, Bad, Bad, Bad]),
    ("/admin;jsessionid=1", [Bad, Bad, Bad, Bad]),
    ("/user/..;foo=bar/admin", [Bad, Bad, Bad, Bad]),
    ("/user/.;/admin", [Bad, Bad, Bad, Bad]),
    // CVE-2025-46821: `*` is an ordinary path character.
    ("/admin/*x", [Deny, Deny, Deny, Deny]),
    // AP-45: paths are case-sensitive, as in Istio (documented exposure).
    (
        "/ADMIN",
        [
            Pass("/ADMIN"),
            Pass("/ADMIN"),
            Pass("/ADMIN"),
            Pass("/ADMIN"),
        ],
    ),
    // Malformed escapes, encoded NUL, control bytes: 400.
    ("/admin%00", [Bad, Bad, Bad, Bad]),
    ("/adm%zzin", [Bad, Bad, Bad, Bad]),
    ("/admin%", [Bad, Bad, Bad, Bad]),
    ("/adm\x01in", [Bad, Bad, Bad, Bad]),
    ("/adm\x7fin", [Bad, Bad, Bad, Bad]),
];

const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

#[tokio::test]
async fn every_bypass_input_under_every_normalization_mode() {
    let mut failures = Vec::new();
    for (i, mode) in MODES.into_iter().enumerate() {
        let layer = AuthzLayer::new(deny_admin()).normalization(NormalizeOptions::new(mode));
        let server = Server::start(layer).await;
        for (target, wants) in CASES {
            if let Err(e) = check(&server, mode.as_istio(), target, wants[i]).await {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn strip_mode_removes_path_parameters_before_matching_and_forwarding() {
    let layer = AuthzLayer::new(deny_admin()).normalization(NormalizeOptions {
        path_parameters: PathParameters::Strip,
        ..NormalizeOptions::default()
    });
    let server = Server::start(layer).await;
    let mut failures = Vec::new();
    for (target, want) in [
        ("/admin;jsessionid=1", Deny),
        ("/admin;x=y/action", Deny),
        ("/user/..;foo=bar/admin", Deny),
        ("/user/.;x/../admin", Deny),
        ("/public;x=1?q=;", Pass("/public?q=;")),
    ] {
        if let Err(e) = check(&server, "BASE+strip", target, want).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn escaped_slashes_can_be_rejected_instead_of_rewritten() {
    for mode in MODES {
        let layer = AuthzLayer::new(deny_admin()).normalization(NormalizeOptions {
            normalization: mode,
            reject_escaped_slashes: true,
            ..NormalizeOptions::default()
        });
        let server = Server::start(layer).await;
        for target in [
            "/something%2F..%2Fadmin",
            "/%2fadmin",
            "/%5Cadmin",
            "/a%5cb",
        ] {
            check(&server, mode.as_istio(), target, Bad).await.unwrap();
        }
        check(&server, mode.as_istio(), "/a%3Fb", Pass("/a%3Fb"))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn host_comparison_is_case_insensitive_and_ignores_port_and_trailing_dot() {
    let policy = Policy::new(
        "production",
        "deny-secret",
        Action::Deny,
        vec![Rule {
            to: Some(vec![Operation {
                hosts: vec!["secret.com".into()],
                ..Operation::default()
            }]),
            ..Rule::default()
        }],
    );
    let server = Server::start(AuthzLayer::new(PolicySet::compile([&policy]).unwrap())).await;
    for host in [
        "secret.com",
        "Secret.com",
        "SECRET.COM",
        "secret.com:80",
        "Secret.Com.:8080",
        "secret.com.",
    ] {
        let req = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(server.raw(req.as_bytes()).await.0, 403, "Host: {host}");
    }
    let req = "GET /x HTTP/1.1\r\nHost: public.com\r\nConnection: close\r\n\r\n";
    assert_eq!(server.raw(req.as_bytes()).await.0, 200);
    // Absolute-form: the target's authority is what is judged (RFC 9112 §3.2.2).
    let req = "GET http://Secret.com/x HTTP/1.1\r\nHost: public.com\r\nConnection: close\r\n\r\n";
    assert_eq!(server.raw(req.as_bytes()).await.0, 403);
    assert_eq!(server.take_seen().len(), 1);
}

#[tokio::test]
async fn malformed_requests_are_rejected_with_400() {
    let server = Server::start(AuthzLayer::new(PolicySet::allow_all())).await;
    for req in [
        // AP-44: method not in upper case.
        "get /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "Post /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        // AP-44: whitespace in a header name (hyper rejects it before the layer).
        "GET /x HTTP/1.1\r\nHost: a\r\nX Foo: bar\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a\r\nX-Foo : bar\r\nConnection: close\r\n\r\n",
        // CVE-2019-9900: NUL in a header value.
        "GET /x HTTP/1.1\r\nHost: a\r\nX-User: ad\0min\r\nConnection: close\r\n\r\n",
        // Two Host headers.
        "GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    ] {
        assert_eq!(server.raw(req.as_bytes()).await.0, 400, "{req:?}");
    }
    assert!(server.take_seen().is_empty());
    let ok = "GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    assert_eq!(server.raw(ok.as_bytes()).await.0, 200);
}
