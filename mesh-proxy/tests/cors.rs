//! VirtualService `corsPolicy` at the ingress gateway: an allowed preflight is answered
//! by the proxy and never reaches the application; allowed requests get the CORS
//! response headers; other origins get none, and their preflights are forwarded or
//! answered bare as `unmatchedPreflights` says.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use support::gateway::plain_gateway;
use support::*;

const CORS: &str = "    corsPolicy:
      allowOrigins:
      - exact: https://shop.example
      - regex: 'https://.*\\.partner\\.example'
      allowMethods: [POST, GET]
      allowHeaders: [x-token]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true
";

/// `curl -i` with `args` to `path` on `api.example.com` through the gateway at `addr`:
/// the status line and the lower-cased header lines.
async fn curl_head(addr: std::net::SocketAddr, path: &str, args: &[&str]) -> String {
    let url = format!("http://{addr}{path}");
    let mut all = vec!["-s", "-i", "-H", "Host: api.example.com"];
    all.extend_from_slice(args);
    all.push(url.as_str());
    let (code, out, err) = curl(&all).await;
    assert_eq!(code, 0, "{err}");
    out.lines()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_and_responses_decorated() {
    if !tool_available("curl") {
        return;
    }
    let world = World::new();
    let backend = App::start(Behaviour::Ok("backend")).await;
    let (gw, addr) = plain_gateway(&world, backend.addr, CORS, "", "").await;
    let preflight = [
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://a.partner.example",
        "-H",
        "Access-Control-Request-Method: POST",
    ];
    let head = curl_head(addr, "/pay", &preflight).await;
    assert!(head.starts_with("http/1.1 200"), "{head}\n{}", gw.output());
    for line in [
        "access-control-allow-origin: https://a.partner.example",
        "access-control-allow-methods: post,get",
        "access-control-allow-headers: x-token",
        "access-control-max-age: 86400",
        "access-control-allow-credentials: true",
    ] {
        assert!(head.lines().any(|l| l == line), "{line} missing:\n{head}");
    }
    assert_eq!(backend.hits(), 0, "the preflight reached the application");

    // An allowed request is forwarded and its response decorated.
    let head = curl_head(addr, "/pay", &["-H", "Origin: https://shop.example"]).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://shop.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-expose-headers: x-trace"),
        "{head}"
    );
    assert_eq!(backend.hits(), 1);

    // Another origin: no CORS headers, and its preflight goes to the application.
    let evil = ["-H", "Origin: https://shop.example.evil"];
    let head = curl_head(addr, "/pay", &evil).await;
    assert!(!head.contains("access-control-"), "{head}");
    let head = curl_head(
        addr,
        "/pay",
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: https://shop.example.evil",
            "-H",
            "Access-Control-Request-Method: POST",
        ],
    )
    .await;
    assert!(!head.contains("access-control-"), "{head}");
    assert_eq!(backend.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_preflights_can_be_ignored() {
    if !tool_available("curl") {
        return;
    }
    let world = World::new();
    let backend = App::start(Behaviour::Ok("backend")).await;
    let route = format!("{CORS}      unmatchedPreflights: IGNORE\n");
    let (_gw, addr) = plain_gateway(&world, backend.addr, &route, "", "").await;
    let head = curl_head(
        addr,
        "/pay",
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: https://elsewhere.example",
            "-H",
            "Access-Control-Request-Method: GET",
        ],
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("access-control-"), "{head}");
    assert_eq!(backend.hits(), 0);
}
