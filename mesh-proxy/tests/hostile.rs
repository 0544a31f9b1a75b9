//! Hostile clients against the real binary, in raw bytes over TCP: header trust (forged
//! identity and internal headers, `X-Forwarded-Client-Cert` modes, `X-Forwarded-For` at
//! the edge, internal response headers), hostile paths against a DENY policy, and
//! requests that are not well-formed. A recording upstream shows what was forwarded.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the upstream received it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: http::HeaderMap,
}

/// An upstream that records every request and answers 200 `ok` with internal headers
/// of the kind a mesh behind a gateway sets.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The bodies that arrived whole.
    bodies: Arc<Mutex<Vec<Bytes>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let whole = bodies.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                let whole = whole.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let whole = whole.clone();
                        record.lock().unwrap().push(Seen {
                            method: req.method().to_string(),
                            target: req
                                .uri()
                                .path_and_query()
                                .map_or_else(String::new, |p| p.to_string()),
                            headers: req.headers().clone(),
                        });
                        async move {
                            if let Ok(body) = req.into_body().collect().await {
                                whole.lock().unwrap().push(body.to_bytes());
                            }
                            let res = http::Response::builder()
                                .header("x-envoy-peer-metadata", "Cg9mb3JnZWQ=")
                                .header("x-envoy-peer-metadata-id", "sidecar~10.0.0.1~x~y")
                                .header("x-envoy-upstream-service-time", "1")
                                .header("l5d-server-id", "forged")
                                .header("x-istio-attributes", "forged")
                                .header("x-forwarded-client-cert", "By=spiffe://x")
                                .header("x-app", "kept")
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(res)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            seen,
            bodies,
            task,
        }
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Writes `request` as it is and reads the answer until the proxy closes (or 10 s).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw answer (0 when there is none).
fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The response head's header names, lower case.
fn response_header_names(answer: &str) -> Vec<String> {
    let head = answer.split("\r\n\r\n").next().unwrap_or_default();
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, _)| k.trim().to_ascii_lowercase())
        .collect()
}

/// A sidecar for `payment-service` whose application is `app`, with `extra` settings,
/// and a sidecar for `order-service` calling it.
async fn two_sidecars(world: &World, app: SocketAddr, extra: &str, policy: &str) -> (Proxy, Proxy) {
    let (pp, op) = (Ports::new(), Ports::new());
    let yaml = format!(
        "{}{policy}",
        service_entry(
            "payment-service",
            80,
            &[(pp.inbound, "v1", "payment-service")]
        )
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let s = sidecar_settings(
        world,
        "payment-service",
        &labels(&[("app", "payment-service")]),
        &config,
        pp,
        app,
        extra,
    );
    let payment = Proxy::start(world, "sidecar", "payment-service", &s, pp).await;
    let order = start_sidecar(
        world,
        "order-service",
        &config,
        op,
        "127.0.0.1:9".parse().unwrap(),
    )
    .await;
    (payment, order)
}

const FORGED: &str = "X-Forwarded-Client-Cert: By=spiffe://cluster.local/ns/production/sa/admin;URI=spiffe://cluster.local/ns/production/sa/admin\r\n\
     x-forwarded-client-cert: Hash=00\r\n\
     L5d-Client-Id: admin.production.serviceaccount.identity.linkerd.cluster.local\r\n\
     x-envoy-original-path: /admin\r\n\
     x-envoy-max-retries: 100\r\n\
     x-istio-attributes: forged\r\n\
     x-user-identity: admin\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_gets_the_meshs_client_cert_and_never_a_forged_one() {
    let world = World::new();
    let app = Recorder::start().await;
    let extra = "gatewayTopology:\n  untrustedHeaders: [X-User-Identity]\n";
    let (payment, order) = two_sidecars(&world, app.addr, extra, "").await;

    // Through the caller's sidecar: mTLS between the sidecars, SANITIZE_SET inbound.
    let request =
        format!("GET /pay HTTP/1.1\r\nHost: payment-service\r\n{FORGED}Connection: close\r\n\r\n");
    let answer = raw(order.outbound(), request.as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}\n{}", payment.output());
    let seen = app.take();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    let xfcc: Vec<_> = h.get_all("x-forwarded-client-cert").iter().collect();
    assert_eq!(xfcc.len(), 1, "{h:?}");
    let xfcc = xfcc[0].to_str().unwrap();
    let (by, rest) = xfcc.split_once(";Hash=").unwrap();
    assert_eq!(
        by,
        "By=spiffe://cluster.local/ns/production/sa/payment-service"
    );
    let (hash, rest) = rest.split_once(';').unwrap();
    assert_eq!(hash.len(), 64, "{xfcc}");
    assert!(
        hash.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(
        rest,
        "Subject=\"\";URI=spiffe://cluster.local/ns/production/sa/order-service"
    );
    for name in [
        "l5d-client-id",
        "x-envoy-original-path",
        "x-envoy-max-retries",
        "x-istio-attributes",
        "x-user-identity",
    ] {
        assert!(
            !h.contains_key(name),
            "{name} reached the application: {h:?}"
        );
    }
    // The same caller's certificate gives the same hash on a new connection.
    let answer = raw(order.outbound(), request.as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}");
    let again = app.take();
    assert_eq!(
        again[0].headers["x-forwarded-client-cert"]
            .to_str()
            .unwrap(),
        xfcc
    );

    // Straight to the inbound listener in plaintext (PERMISSIVE): no identity, so no
    // XFCC at all, and nothing forged.
    let inbound = SocketAddr::from(([127, 0, 0, 1], payment.ports.inbound));
    let answer = raw(inbound, request.as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}");
    let h = &app.take()[0].headers;
    for name in [
        "x-forwarded-client-cert",
        "l5d-client-id",
        "x-envoy-original-path",
        "x-user-identity",
    ] {
        assert!(
            !h.contains_key(name),
            "{name} reached the application: {h:?}"
        );
    }
}

/// A plain-HTTP gateway in front of `upstream` (see `support::gateway`), with `extra`
/// settings and `policy` resources; the gateway and its HTTP port.
async fn plain_gateway(
    world: &World,
    upstream: SocketAddr,
    extra: &str,
    policy: &str,
) -> (Proxy, u16) {
    let (gw, addr) = support::gateway::plain_gateway(world, upstream, "", policy, extra).await;
    (gw, addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_strips_forged_identity_appends_the_peer_and_hides_internal_headers() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let (gw, http) = plain_gateway(&world, upstream.addr, "", "").await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    let request = format!(
        "GET /x HTTP/1.1\r\nHost: api.example.com\r\nX-Forwarded-For: 203.0.113.9\r\n{FORGED}Connection: close\r\n\r\n"
    );
    let answer = raw(addr, request.as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}\n{}", gw.output());
    // What the external client sees: the application's own header, none of the mesh's.
    let names = response_header_names(&answer);
    assert!(names.contains(&"x-app".to_owned()), "{answer}");
    for name in &names {
        assert!(
            !(name.starts_with("x-envoy-")
                || name.starts_with("l5d-")
                || name.starts_with("x-istio-")
                || name == "x-forwarded-client-cert"),
            "{name} leaked to the client: {answer}"
        );
    }
    let seen = upstream.take();
    let h = &seen[0].headers;
    // SANITIZE_SET without a client certificate: no XFCC.
    for name in [
        "x-forwarded-client-cert",
        "l5d-client-id",
        "x-envoy-original-path",
        "x-envoy-max-retries",
        "x-istio-attributes",
    ] {
        assert!(!h.contains_key(name), "{name} reached the upstream: {h:?}");
    }
    // The client's own X-Forwarded-For stays, with the real peer appended.
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "{h:?}");
    // Without X-Forwarded-For, the peer alone.
    let answer = raw(
        addr,
        b"GET /y HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(upstream.take()[0].headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_forward_client_cert_details_is_configurable() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let extra = "gatewayTopology:\n  forwardClientCertDetails: ALWAYS_FORWARD_ONLY\n  numTrustedProxies: 1\n";
    let (gw, http) = plain_gateway(&world, upstream.addr, extra, "").await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    let request = "GET /x HTTP/1.1\r\nHost: api.example.com\r\nX-Forwarded-Client-Cert: By=spiffe://front/door\r\nx-envoy-original-path: /admin\r\nConnection: close\r\n\r\n";
    let answer = raw(addr, request.as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}\n{}", gw.output());
    let h = &upstream.take()[0].headers;
    // A trusted front proxy's XFCC passes; the other internal headers still go.
    assert_eq!(h["x-forwarded-client-cert"], "By=spiffe://front/door");
    assert!(!h.contains_key("x-envoy-original-path"), "{h:?}");
    // FORWARD_ONLY without a client certificate removes it.
    drop(gw);
    let world = World::new();
    let extra = "gatewayTopology:\n  forwardClientCertDetails: FORWARD_ONLY\n";
    let (gw, http) = plain_gateway(&world, upstream.addr, extra, "").await;
    let answer = raw(SocketAddr::from(([127, 0, 0, 1], http)), request.as_bytes()).await;
    assert_eq!(status(&answer), 200, "{answer}\n{}", gw.output());
    assert!(
        !upstream.take()[0]
            .headers
            .contains_key("x-forwarded-client-cert")
    );
}

const DENY_ADMIN: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: production}
spec:
  selector: {matchLabels: {app: payment-service}}
  action: DENY
  rules:
  - to:
    - operation: {paths: [/admin, /admin/*]}
  - to:
    - operation: {hosts: [secret.example]}
  - when:
    - key: request.headers[x-user]
      values: ['*admin']
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_against_a_deny_policy_are_denied_or_refused_and_never_forwarded_raw() {
    let world = World::new();
    let app = Recorder::start().await;
    let (payment, _order) = two_sidecars(&world, app.addr, "", DENY_ADMIN).await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], payment.ports.inbound));
    // (request target, status, what the upstream received: None = nothing).
    let table: &[(&str, u16, Option<&str>)] = &[
        ("/admin", 403, None),
        ("/admin?x=1", 403, None),
        ("/admin#x", 403, None),
        ("//admin", 403, None),
        ("/a//..//admin", 403, None),
        ("/public/../admin", 403, None),
        ("/info/../admin/x", 403, None),
        ("/%61dmin", 403, None),
        ("/admin/*x", 403, None),
        ("/admin%2fx", 400, None),
        ("/admin%2Fx", 400, None),
        ("/x%2F..%2Fadmin", 400, None),
        ("/x/..%2fadmin", 400, None),
        ("/x%5C..%5Cadmin", 400, None),
        ("/x%5c..%5cadmin", 400, None),
        ("/x%252F..%252Fadmin", 400, None),
        ("/%252e%252e/admin", 400, None),
        ("/admin;x=y/action", 400, None),
        ("/admin;jsessionid=1", 400, None),
        ("/..;x/admin", 400, None),
        ("/admin%3Bx", 400, None),
        ("/x/..%c0%afadmin", 400, None),
        ("/%80admin", 400, None),
        ("/a%zz", 400, None),
        ("/a%00", 400, None),
        // Allowed, and forwarded in the one form the policy saw.
        ("/public//x?q=1", 200, Some("/public/x?q=1")),
        ("/public/./a/../b#frag", 200, Some("/public/b")),
        ("/caf%c3%a9", 200, Some("/caf%C3%A9")),
        ("/ADMIN", 200, Some("/ADMIN")),
        ("/administrator", 200, Some("/administrator")),
    ];
    let mut failures = Vec::new();
    for (target, want, forwarded) in table {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: payment-service\r\nConnection: close\r\n\r\n");
        let answer = raw(inbound, request.as_bytes()).await;
        let seen = app.take();
        let got_forwarded = seen.first().map(|s| s.target.as_str());
        if status(&answer) != *want || got_forwarded != *forwarded || seen.len() > 1 {
            failures.push(format!(
                "{target}: {} (want {want}), upstream got {got_forwarded:?} (want {forwarded:?})",
                status(&answer)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", payment.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_with_ports_and_non_utf8_header_values_meet_the_deny_policy() {
    let world = World::new();
    let app = Recorder::start().await;
    let (payment, _order) = two_sidecars(&world, app.addr, "", DENY_ADMIN).await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], payment.ports.inbound));
    for (head, want) in [
        (&b"Host: secret.example"[..], 403),
        (b"Host: Secret.Example:8080", 403),
        (b"Host: secret.example.:80", 403),
        (b"Host: payment-service\r\nx-user: boss-admin", 403),
        // obs-text (RFC 9110 §5.5): matching fails closed, so a DENY rule on the header
        // denies any value that is not UTF-8.
        (b"Host: payment-service\r\nx-user: \xff-admin", 403),
        (b"Host: payment-service\r\nx-user: \xffguest", 403),
        (b"Host: payment-service\r\nx-user: guest", 200),
    ] {
        let mut request = b"GET /x HTTP/1.1\r\n".to_vec();
        request.extend_from_slice(head);
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let answer = raw(inbound, &request).await;
        assert_eq!(
            status(&answer),
            want,
            "{}: {answer}",
            String::from_utf8_lossy(head)
        );
        assert_eq!(app.take().len(), usize::from(want == 200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_well_formed_get_400_and_reach_no_one() {
    let world = World::new();
    let app = Recorder::start().await;
    let (payment, order) = two_sidecars(&world, app.addr, "", DENY_ADMIN).await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], payment.ports.inbound));
    let bad: &[&[u8]] = &[
        b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: payment-service\r\nHost: other\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: admin@payment-service\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: payment service\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: payment-service:\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: payment-service:http\r\nConnection: close\r\n\r\n",
        b"GET http://admin@payment-service/x HTTP/1.1\r\nHost: payment-service\r\nConnection: close\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: payment-service\r\nConnection: close\r\n\r\n",
    ];
    for listener in [inbound, order.outbound()] {
        for request in bad {
            let answer = raw(listener, request).await;
            assert_eq!(
                status(&answer),
                400,
                "{listener} {}: {answer}",
                String::from_utf8_lossy(request)
            );
        }
    }
    assert_eq!(app.take().len(), 0);

    // HTTP/1.0 needs no Host.
    let answer = raw(inbound, b"GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "{answer}");
    app.take();

    // Absolute form: the target's authority wins over Host, for authorization too.
    let answer = raw(
        inbound,
        b"GET http://secret.example/x HTTP/1.1\r\nHost: payment-service\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 403, "{answer}");
    assert_eq!(app.take().len(), 0);
    let answer = raw(
        inbound,
        b"GET http://payment-service/x HTTP/1.1\r\nHost: secret.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    let seen = app.take();
    assert_eq!(seen[0].headers["host"], "payment-service");
    assert_eq!(seen[0].method, "GET");

    // OPTIONS * is answered by the proxy, at every listener.
    for listener in [inbound, order.outbound()] {
        let answer = raw(
            listener,
            b"OPTIONS * HTTP/1.1\r\nHost: payment-service\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&answer), 200, "{listener}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("\r\nallow: "),
            "{answer}"
        );
    }
    assert_eq!(app.take().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_is_sent_only_after_authorization_allowed_the_request() {
    let world = World::new();
    let app = Recorder::start().await;
    let (payment, _order) = two_sidecars(&world, app.addr, "", DENY_ADMIN).await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], payment.ports.inbound));
    // Denied: the answer is the 403, never a 100 first; no body was asked for.
    let answer = raw(
        inbound,
        b"POST /admin HTTP/1.1\r\nHost: payment-service\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert_eq!(app.take().len(), 0);
    // Allowed: 100 Continue, then the body is sent and forwarded.
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(b"POST /pay HTTP/1.1\r\nHost: payment-service\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    tcp.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("HTTP/1.1 200 "), "{head}{rest}");
    assert_eq!(app.take().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obfuscated_transfer_encodings_get_400_and_nothing_reaches_the_upstream() {
    let world = World::new();
    let app = Recorder::start().await;
    let (payment, order) = two_sidecars(&world, app.addr, "", "").await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], payment.ports.inbound));
    let mut failures = Vec::new();
    for listener in [inbound, order.outbound()] {
        for te in [
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: x",
            "Transfer-Encoding: x, chunked, identity",
            "Transfer-Encoding: identity, chunked",
            "Transfer-Encoding: chunked, chunked",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: \x0bchunked",
            "Transfer-Encoding : chunked",
            "Transfer-Encoding:\r\n chunked",
        ] {
            let request = format!(
                "POST /pay HTTP/1.1\r\nHost: payment-service\r\n{te}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            );
            let answer = raw(listener, request.as_bytes()).await;
            let seen = app.take();
            if status(&answer) != 400 || !seen.is_empty() {
                failures.push(format!(
                    "{listener} {te:?}: {} upstream saw {}",
                    status(&answer),
                    seen.len()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // The well-formed one passes, re-framed.
    let answer = raw(
        inbound,
        b"POST /pay HTTP/1.1\r\nHost: payment-service\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(app.take().len(), 1);
    // Content-Length with chunked: the chunked framing wins and the upstream never
    // receives both.
    let answer = raw(
        inbound,
        b"POST /pay HTTP/1.1\r\nHost: payment-service\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    let seen = app.take();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert!(
        !(h.contains_key("content-length") && h.contains_key("transfer-encoding")),
        "{h:?}"
    );
    assert_ne!(
        h.get("content-length").map(|v| v.as_bytes()),
        Some(&b"3"[..]),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunked_framing_gets_400_and_no_whole_request_reaches_the_upstream() {
    let world = World::new();
    let app = Recorder::start().await;
    let (payment, order) = two_sidecars(&world, app.addr, "", "").await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], payment.ports.inbound));
    let head = "POST /pay HTTP/1.1\r\nHost: payment-service\r\nTransfer-Encoding: chunked\r\n";
    let bodies: &[&str] = &[
        "5\nhello\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "5;a=b\rc\r\nhello\r\n0\r\n\r\n",
        "5;\nhello\r\n0\r\n\r\n",
        "+5\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "5g\r\nhello\r\n0\r\n\r\n",
        "ffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloXX\r\n0\r\n\r\n",
        "5\r\nhel",
        "5\r\nhello\r\n0\r\n",
    ];
    let mut failures = Vec::new();
    for listener in [inbound, order.outbound()] {
        for body in bodies {
            let request = format!("{head}\r\n{body}");
            let mut tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
            tcp.write_all(request.as_bytes()).await.unwrap();
            let _ = tcp.shutdown().await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
            let answer = String::from_utf8_lossy(&out).into_owned();
            app.take();
            let whole = std::mem::take(&mut *app.bodies.lock().unwrap());
            if status(&answer) != 400 || !whole.is_empty() {
                failures.push(format!(
                    "{listener} {body:?}: {} upstream got whole bodies {whole:?}",
                    status(&answer)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `GET <target>` on a kept-open connection, with `pad` bytes of one extra header value.
fn sized_request(target: &str, pad: usize) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(pad)
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_the_exact_limits_get_414_or_431_and_reach_no_one() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let (gw, http) = plain_gateway(
        &world,
        upstream.addr,
        "limits: {maxRequestTargetBytes: 1000, maxRequestHeaderBytes: 4096}\n",
        "",
    )
    .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    // The target: 1000 bytes pass, 1001 do not.
    let at = format!("/{}", "a".repeat(999));
    let over = format!("/{}", "a".repeat(1000));
    let answer = raw(addr, &sized_request(&at, 0)).await;
    assert_eq!(status(&answer), 200, "{answer}\n{}", gw.output());
    assert_eq!(upstream.take()[0].target, at);
    let answer = raw(addr, &sized_request(&over, 0)).await;
    assert_eq!(status(&answer), 414, "{answer}");
    assert!(upstream.take().is_empty());
    // The head, counted as Envoy counts it (method, target, names and values): "GET" 3,
    // "/h" 2, host 4 + 15, connection 10 + 5, x-pad 5 + pad = 44 + pad.
    let answer = raw(addr, &sized_request("/h", 4096 - 44)).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(upstream.take().len(), 1);
    let answer = raw(addr, &sized_request("/h", 4096 - 44 + 1)).await;
    assert_eq!(status(&answer), 431, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(upstream.take().is_empty());
    // A head far over the limit is refused by the codec, still with 431.
    let answer = raw(addr, &sized_request("/h", 64 * 1024)).await;
    assert_eq!(status(&answer), 431, "{answer}");
    assert!(upstream.take().is_empty());
    // HTTP/2 (h2c prior knowledge), counted the same way: "GET" 3, ":path" "/h" 2,
    // x-pad 5 + pad; the authority travels as `:authority`, not counted.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    for (pad, want) in [(4096 - 10, 200), (4096 - 10 + 1, 431)] {
        let req = http::Request::get("http://api.example.com/h")
            .header("x-pad", "p".repeat(pad))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let res = h2.send_request(req).await.unwrap();
        assert_eq!(res.status(), want, "h2 pad {pad}");
    }
    assert_eq!(upstream.take().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_a_byte_is_closed_by_the_request_headers_timeout() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let (gw, http) = plain_gateway(
        &world,
        upstream.addr,
        "limits: {requestHeadersTimeout: 500ms}\n",
        "",
    )
    .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    // Closed without an answer (a bound far above the timeout, not a measurement).
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read(&mut buf))
        .await
        .expect("the silent connection was not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}\n{}", gw.output());
    // A client that does send is served.
    let answer = raw(
        addr,
        b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once_and_counted() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let (gw, http) = plain_gateway(
        &world,
        upstream.addr,
        "limits: {maxConnections: 3, requestHeadersTimeout: 1h}\n",
        "",
    )
    .await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    // Three connections held open with half a request head each.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
        held.push(tcp);
    }
    let active = gw
        .metrics_when(|t| {
            series_value(t, "mesh_active_connections", &[("listener", "gateway")]) == Some(3.0)
        })
        .await;
    assert_eq!(
        series_value(
            &active,
            "mesh_active_connections",
            &[("listener", "gateway")]
        ),
        Some(3.0),
        "{active}"
    );
    // The fourth is closed at once: no answer, and nothing forwarded.
    let answer = raw(addr, b"GET /x HTTP/1.1\r\nHost: api.example.com\r\n\r\n").await;
    assert_eq!(answer, "");
    assert!(upstream.take().is_empty());
    let metrics = gw
        .metrics_when(|t| t.contains("mesh_downstream_cx_overflow_total{"))
        .await;
    assert_eq!(
        series_value(
            &metrics,
            "mesh_downstream_cx_overflow_total",
            &[("listener", "gateway")]
        ),
        Some(1.0),
        "{metrics}"
    );
    // One held connection finishes its request; then a new connection is served.
    let mut first = held.remove(0);
    first
        .write_all(b"Host: api.example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    first.read_to_end(&mut out).await.unwrap();
    assert_eq!(status(&String::from_utf8_lossy(&out)), 200);
    let mut answer = String::new();
    for _ in 0..100 {
        answer = raw(
            addr,
            b"GET /x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        )
        .await;
        if status(&answer) == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(&answer), 200, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_drain_ends_the_process_at_once() {
    let world = World::new();
    // An upstream that accepts and never answers: the request stays in flight.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            conns.push(tcp);
        }
    });
    let (mut gw, http) = plain_gateway(&world, upstream, "limits: {drainTimeout: 1h}\n", "").await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /x HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .await
        .unwrap();
    // The request is in flight once the gateway counts the connection.
    gw.metrics_when(|t| {
        series_value(t, "mesh_active_connections", &[("listener", "gateway")]) == Some(1.0)
    })
    .await;
    gw.terminate();
    // Draining: the in-flight request holds the process (for up to an hour).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(gw.child.try_wait().unwrap().is_none(), "{}", gw.output());
    gw.terminate();
    let status = tokio::time::timeout(Duration::from_secs(30), gw.child.wait())
        .await
        .expect("a second SIGTERM did not end the process")
        .unwrap();
    assert_eq!(status.code(), Some(1), "{}", gw.output());
    assert!(gw.output().contains("second signal"), "{}", gw.output());
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_byte_chunked_megabyte_upload_passes_the_gateway_whole() {
    let world = World::new();
    let upstream = Recorder::start().await;
    let (gw, http) = plain_gateway(&world, upstream.addr, "", "").await;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    const SIZE: usize = 1 << 20;
    let mut request = b"POST /upload HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for i in 0..SIZE {
        request.extend_from_slice(b"1\r\n");
        request.push(b'a' + (i % 26) as u8);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let upload = tokio::spawn(async move {
        wr.write_all(&request).await.unwrap();
        wr
    });
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), rd.read_to_end(&mut out))
        .await
        .expect("no answer")
        .unwrap();
    let _wr = upload.await.unwrap();
    let answer = String::from_utf8_lossy(&out);
    assert_eq!(status(&answer), 200, "{answer}\n{}", gw.output());
    let bodies = upstream.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    assert_eq!(bodies[0].len(), SIZE);
    assert!(
        bodies[0]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == b'a' + (i % 26) as u8)
    );
}
