//! RequestAuthentication end to end through the layers: tokens signed here (RS256 keys
//! from `openssl`, ES256 keys from rcgen), key sets inline and from a real HTTP server on
//! 127.0.0.1 that rotates its keys, on tokio's paused clock; and AuthorizationPolicy on
//! the validated token.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use mesh_core::config::{ClaimToHeader, JwtHeader, JwtRule, LoadOptions, MeshConfig};
use mesh_tls::authn::{Authenticator, AuthnLayer, JwksCache, JwtProvider, RequestAuth};
use mesh_tls::authz::{
    Action, AuthzLayer, Condition, Policy, PolicySet, RequestAttributes, Rule, ServerName, Source,
};
use serde_json::{Value, json};
use tower::{Layer, ServiceExt};

const ISS: &str = "https://issuer.example.com";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A signing key and its public JWK.
struct Signer {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn es256(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        assert_eq!(raw.len(), 65);
        Signer {
            alg: Algorithm::ES256,
            kid: kid.into(),
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                        "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
        }
    }

    /// An RSA key from the `openssl` command (ring cannot generate RSA keys); `None`
    /// when it is missing outside CI.
    fn rs256(kid: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("k.pem");
        let der = dir.path().join("k.der");
        let run = |args: &[&str]| std::process::Command::new("openssl").args(args).output();
        match run(&["genrsa", "-out", pem.to_str()?, "2048"]) {
            Ok(o) if o.status.success() => {}
            other => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "openssl is needed: {other:?}"
                );
                eprintln!("skipped: openssl is not available");
                return None;
            }
        }
        let o = run(&[
            "rsa",
            "-in",
            pem.to_str()?,
            "-traditional",
            "-outform",
            "DER",
            "-out",
            der.to_str()?,
        ])
        .unwrap();
        assert!(o.status.success(), "{o:?}");
        let o = run(&["rsa", "-in", pem.to_str()?, "-noout", "-modulus"]).unwrap();
        let text = String::from_utf8(o.stdout).unwrap();
        let hex = text.trim().strip_prefix("Modulus=").unwrap();
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        Some(Signer {
            alg: Algorithm::RS256,
            kid: kid.into(),
            key: EncodingKey::from_rsa_der(&std::fs::read(der).unwrap()),
            jwk: json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": b64(&n), "e": "AQAB"}),
        })
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        encode(&h, claims, &self.key).unwrap()
    }
}

fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISS, "sub": sub, "aud": ["orders"], "exp": now() + 3600, "iat": now()})
}

fn rule(jwks: &str) -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        jwks: Some(jwks.into()),
        ..JwtRule::default()
    }
}

fn authenticator(rules: &[JwtRule], cache: &JwksCache) -> Authenticator {
    let providers = rules
        .iter()
        .enumerate()
        .map(|(i, r)| JwtProvider::compile("ns/jwt", &format!("jwtRules[{i}]."), r, cache).unwrap())
        .collect();
    let a = Authenticator::new(providers);
    a.start();
    a
}

/// What the application saw.
#[derive(Debug, Default, Clone)]
struct Seen {
    principal: Option<String>,
    headers: http::HeaderMap,
}

type Reply = (StatusCode, String, http::HeaderMap, Option<Seen>);

/// Sends `req` through AuthnLayer (and AuthzLayer over `policies`) to an application
/// that records what it received.
async fn send(auth: Authenticator, policies: PolicySet, req: Request<()>) -> Reply {
    let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
    let app_seen = seen.clone();
    let app = tower::service_fn(move |req: Request<()>| {
        let seen = app_seen.clone();
        async move {
            *seen.lock().unwrap() = Some(Seen {
                principal: req
                    .extensions()
                    .get::<RequestAuth>()
                    .and_then(|a| a.principal().map(str::to_owned)),
                headers: req.headers().clone(),
            });
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let svc = AuthnLayer::new(auth).layer(AuthzLayer::new(policies).layer(app));
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let seen = seen.lock().unwrap().clone();
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        headers,
        seen,
    )
}

fn get(uri: &str, token: Option<&str>) -> Request<()> {
    let mut b = Request::get(uri).header("host", "orders.shop");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).unwrap()
}

#[tokio::test]
async fn es256_and_rs256_tokens_are_validated_and_the_token_is_removed() {
    let es = Signer::es256("ec-1");
    let mut signers = vec![&es];
    let rs = Signer::rs256("rsa-1");
    if let Some(rs) = &rs {
        signers.push(rs);
    }
    let cache = JwksCache::default();
    for s in &signers {
        let auth = authenticator(&[rule(&jwks(&signers))], &cache);
        let token = s.sign(&claims("alice"));
        let (status, _, _, seen) = send(auth, PolicySet::allow_all(), get("/", Some(&token))).await;
        assert_eq!(status, StatusCode::OK, "{:?}", s.alg);
        let seen = seen.unwrap();
        assert_eq!(
            seen.principal.as_deref(),
            Some("https://issuer.example.com/alice")
        );
        assert!(
            !seen.headers.contains_key("authorization"),
            "RA-08: the token is removed"
        );
    }
}

#[tokio::test]
async fn invalid_tokens_get_401_with_a_bearer_challenge_and_no_token_passes() {
    let es = Signer::es256("ec-1");
    let other = Signer::es256("ec-1");
    let mut r = rule(&jwks(&[&es]));
    r.audiences = vec!["orders".into()];
    let cache = JwksCache::default();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            es.sign(&json!({"iss": ISS, "sub": "a", "aud": "orders", "exp": now() - 3600})),
            "Jwt is expired",
        ),
        (
            "not yet valid",
            es.sign(&json!({"iss": ISS, "sub": "a", "aud": "orders", "nbf": now() + 3600})),
            "Jwt not yet valid",
        ),
        (
            "wrong issuer",
            es.sign(&json!({"iss": "https://evil.example.com", "sub": "a", "aud": "orders"})),
            "Jwt issuer is not configured",
        ),
        (
            "wrong audience",
            es.sign(&json!({"iss": ISS, "sub": "a", "aud": ["billing"]})),
            "Audiences in Jwt are not allowed",
        ),
        (
            "bad signature",
            other.sign(&json!({"iss": ISS, "sub": "a", "aud": "orders"})),
            "Jwt verification fails",
        ),
        (
            "malformed",
            "not.a-token".to_owned(),
            "Jwt is not in the form of Header.Payload.Signature",
        ),
    ];
    for (what, token, body) in cases {
        let auth = authenticator(&[r.clone()], &cache);
        let (status, text, headers, seen) =
            send(auth, PolicySet::allow_all(), get("/pay?x=1", Some(&token))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(text, body, "{what}");
        assert_eq!(
            headers["www-authenticate"],
            "Bearer realm=\"http://orders.shop/pay\", error=\"invalid_token\"",
            "{what}"
        );
        assert!(seen.is_none(), "{what}: the application is not called");
    }
    // Within the 60 s clock skew, an expiry just passed is accepted.
    let auth = authenticator(&[r.clone()], &cache);
    let token = es.sign(&json!({"iss": ISS, "sub": "a", "aud": "orders", "exp": now() - 30}));
    let (status, ..) = send(auth, PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(status, StatusCode::OK);
    // RA-04: no token passes, unauthenticated.
    let auth = authenticator(&[r], &cache);
    let (status, _, _, seen) = send(auth, PolicySet::allow_all(), get("/", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.unwrap().principal, None);
}

#[tokio::test]
async fn tokens_are_read_from_configured_headers_params_and_cookies() {
    let es = Signer::es256("k");
    let token = es.sign(&claims("bob"));
    let cache = JwksCache::default();
    let mut r = rule(&jwks(&[&es]));
    r.from_headers = vec![JwtHeader {
        name: "x-jwt".into(),
        prefix: Some("Token ".into()),
    }];
    r.from_params = vec!["jwt".into()];
    r.from_cookies = vec!["session".into()];
    let ok = |req: Request<()>| {
        let auth = authenticator(&[r.clone()], &cache);
        async move {
            let (status, _, _, seen) = send(auth, PolicySet::allow_all(), req).await;
            (status, seen.and_then(|s| s.principal))
        }
    };
    let want = (StatusCode::OK, Some(format!("{ISS}/bob")));
    let header = Request::get("/")
        .header("x-jwt", format!("token {token}"))
        .body(())
        .unwrap();
    assert_eq!(
        ok(header).await,
        want,
        "header with a prefix (case-insensitive)"
    );
    let param = Request::get(format!("/a?b=1&jwt={token}"))
        .body(())
        .unwrap();
    assert_eq!(ok(param).await, want, "query parameter");
    let cookie = Request::get("/")
        .header("cookie", format!("theme=dark; session={token}"))
        .body(())
        .unwrap();
    assert_eq!(ok(cookie).await, want, "cookie");
    // Configured locations replace the defaults: a Bearer token is not read.
    let (status, principal) = ok(get("/", Some(&token))).await;
    assert_eq!((status, principal), (StatusCode::OK, None));
    // A header without the prefix carries no token.
    let bare = Request::get("/")
        .header("x-jwt", token.clone())
        .body(())
        .unwrap();
    assert_eq!(ok(bare).await, (StatusCode::OK, None));
    // Defaults: the access_token parameter (RA-03).
    let auth = authenticator(&[rule(&jwks(&[&es]))], &cache);
    let (status, _, _, seen) = send(
        auth,
        PolicySet::allow_all(),
        Request::get(format!("/?access_token={token}"))
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.unwrap().principal, Some(format!("{ISS}/bob")));
}

#[tokio::test]
async fn forwarding_output_headers_and_cors_preflight() {
    let es = Signer::es256("k");
    let cache = JwksCache::default();
    let mut r = rule(&jwks(&[&es]));
    r.forward_original_token = Some(true);
    r.output_payload_to_header = Some("x-jwt-payload".into());
    r.output_claim_to_headers = vec![
        ClaimToHeader {
            header: "x-sub".into(),
            claim: "sub".into(),
        },
        ClaimToHeader {
            header: "x-tier".into(),
            claim: "org.tier".into(),
        },
    ];
    let c = json!({"iss": ISS, "sub": "carol", "org": {"tier": "gold"}});
    let token = es.sign(&c);
    let auth = authenticator(&[r.clone()], &cache);
    let (status, _, _, seen) = send(auth, PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(status, StatusCode::OK);
    let h = seen.unwrap().headers;
    assert_eq!(
        h["authorization"],
        format!("Bearer {token}"),
        "forwardOriginalToken"
    );
    assert_eq!(h["x-jwt-payload"], token.split('.').nth(1).unwrap());
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h["x-jwt-payload"].as_bytes())
        .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&payload).unwrap(), c);
    assert_eq!(h["x-sub"], "carol");
    assert_eq!(h["x-tier"], "gold");
    // A client cannot forge the output headers.
    let auth = authenticator(&[r.clone()], &cache);
    let forged = Request::get("/").header("x-sub", "admin").body(()).unwrap();
    let (_, _, _, seen) = send(auth, PolicySet::allow_all(), forged).await;
    assert!(!seen.unwrap().headers.contains_key("x-sub"));
    // CORS preflight bypasses the check, even with an expired token.
    let expired = es.sign(&json!({"iss": ISS, "sub": "a", "exp": now() - 3600}));
    let preflight = Request::options("/")
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("authorization", format!("Bearer {expired}"))
        .header("x-sub", "admin")
        .body(())
        .unwrap();
    let auth = authenticator(&[r.clone()], &cache);
    let (status, _, _, seen) = send(auth, PolicySet::allow_all(), preflight).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !seen.unwrap().headers.contains_key("x-sub"),
        "outputs are stripped from preflights too"
    );
    let not_preflight = Request::options("/")
        .header("authorization", format!("Bearer {expired}"))
        .body(())
        .unwrap();
    let auth = authenticator(&[r], &cache);
    let (status, ..) = send(auth, PolicySet::allow_all(), not_preflight).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(start_paused = true)]
async fn expiry_follows_tokios_clock() {
    let es = Signer::es256("k");
    let cache = JwksCache::default();
    let auth = authenticator(&[rule(&jwks(&[&es]))], &cache);
    let token = es.sign(&json!({"iss": ISS, "sub": "a", "exp": now() + 600, "nbf": now() + 300}));
    let (status, text, ..) =
        send(auth.clone(), PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::UNAUTHORIZED, "Jwt not yet valid")
    );
    tokio::time::advance(Duration::from_secs(300)).await;
    let (status, ..) = send(auth.clone(), PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::advance(Duration::from_secs(700)).await;
    let (status, text, ..) = send(auth, PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::UNAUTHORIZED, "Jwt is expired")
    );
}

/// A JWKS (and OpenID discovery) server on 127.0.0.1:0 whose key set can be changed
/// or taken down; counts the key-set requests.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<Option<String>>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: Option<String>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (b, h) = (b.clone(), h.clone());
                            async move {
                                let doc = if req.uri().path() == "/.well-known/openid-configuration"
                                {
                                    Some(
                                        json!({"issuer": format!("http://{addr}"),
                                    "jwks_uri": format!("http://{addr}/keys")})
                                        .to_string(),
                                    )
                                } else {
                                    h.fetch_add(1, Ordering::SeqCst);
                                    b.lock().unwrap().clone()
                                };
                                let res = match doc {
                                    Some(d) => Response::new(Full::new(Bytes::from(d))),
                                    None => {
                                        let mut r = Response::new(Full::new(Bytes::new()));
                                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                        r
                                    }
                                };
                                Ok::<_, Infallible>(res)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, body, hits }
    }

    fn set(&self, body: Option<String>) {
        *self.body.lock().unwrap() = body;
    }
}

fn remote_rule(uri: String) -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        jwks_uri: Some(uri),
        ..JwtRule::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_rotated_key_is_picked_up_at_the_next_refresh() {
    let a = Signer::es256("a");
    let b = Signer::es256("b");
    let server = JwksServer::start(Some(jwks(&[&a]))).await;
    let cache = JwksCache::default();
    let auth = authenticator(
        &[remote_rule(format!("http://{}/keys", server.addr))],
        &cache,
    );
    let (status, ..) = send(
        auth.clone(),
        PolicySet::allow_all(),
        get("/", Some(&a.sign(&claims("x")))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "key a, fetched");
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    // The issuer rotates to key b: tokens signed with b fail until the next refresh.
    server.set(Some(jwks(&[&b])));
    let token_b = b.sign(&claims("y"));
    let (status, text, ..) = send(
        auth.clone(),
        PolicySet::allow_all(),
        get("/", Some(&token_b)),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (
            StatusCode::UNAUTHORIZED,
            "Jwks doesn't have key to match kid or alg from Jwt"
        )
    );
    tokio::time::sleep(Duration::from_secs(19 * 60)).await;
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        1,
        "no refresh before 20 minutes"
    );
    tokio::time::sleep(Duration::from_secs(60 + 1)).await;
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        2,
        "refreshed at 20 minutes"
    );
    let (status, _, _, seen) = send(
        auth.clone(),
        PolicySet::allow_all(),
        get("/", Some(&token_b)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "key b after the refresh");
    assert_eq!(seen.unwrap().principal, Some(format!("{ISS}/y")));
    // A reload with the same cache shares the fetched set: no new fetch.
    let again = authenticator(
        &[remote_rule(format!("http://{}/keys", server.addr))],
        &cache,
    );
    let (status, ..) = send(again, PolicySet::allow_all(), get("/", Some(&token_b))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_jwks_fails_closed_then_recovers_on_the_backoff_schedule() {
    let a = Signer::es256("a");
    let server = JwksServer::start(None).await;
    let cache = JwksCache::default();
    let auth = authenticator(
        &[remote_rule(format!("http://{}/keys", server.addr))],
        &cache,
    );
    let token = a.sign(&claims("x"));
    // RA-14: a request with a token is refused; one without passes.
    let (status, text, ..) =
        send(auth.clone(), PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::UNAUTHORIZED, "Jwks remote fetch is failed")
    );
    let (status, ..) = send(auth.clone(), PolicySet::allow_all(), get("/", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        3,
        "three attempts per refresh"
    );
    // The first refresh ended at t=2 s (attempts 1 s apart); the next comes 1 minute
    // later (attempts at 62, 63, 64 s), the one after 2 minutes after that (184 s).
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        3,
        "nothing before the minute"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        6,
        "second refresh at 1 minute"
    );
    server.set(Some(jwks(&[&a])));
    tokio::time::sleep(Duration::from_secs(115)).await;
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        6,
        "third refresh after 2 minutes"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), 7);
    let (status, ..) = send(auth, PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn keys_are_discovered_from_the_issuers_openid_configuration() {
    let a = Signer::es256("a");
    let server = JwksServer::start(Some(jwks(&[&a]))).await;
    let issuer = format!("http://{}", server.addr);
    let cache = JwksCache::default();
    let auth = authenticator(
        &[JwtRule {
            issuer: issuer.clone(),
            ..JwtRule::default()
        }],
        &cache,
    );
    let token = a.sign(&json!({"iss": issuer, "sub": "d"}));
    let (status, _, _, seen) = send(auth, PolicySet::allow_all(), get("/", Some(&token))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.unwrap().principal, Some(format!("{issuer}/d")));
}

#[tokio::test]
async fn several_rules_each_validate_their_issuers_tokens() {
    let a = Signer::es256("a");
    let b = Signer::es256("b");
    let cache = JwksCache::default();
    let second = JwtRule {
        issuer: "issuer-2".into(),
        jwks: Some(jwks(&[&b])),
        from_headers: vec![JwtHeader {
            name: "x-second".into(),
            prefix: None,
        }],
        ..JwtRule::default()
    };
    let rules = [rule(&jwks(&[&a])), second];
    let t2 = b.sign(&json!({"iss": "issuer-2", "sub": "s2"}));
    let req = Request::get("/")
        .header("x-second", t2.clone())
        .body(())
        .unwrap();
    let (status, _, _, seen) =
        send(authenticator(&rules, &cache), PolicySet::allow_all(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.unwrap().principal.as_deref(), Some("issuer-2/s2"));
    // A valid token of issuer 2 in the location only rule 1 reads: unknown issuer there.
    let (status, text, ..) = send(
        authenticator(&rules, &cache),
        PolicySet::allow_all(),
        get("/", Some(&t2)),
    )
    .await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::UNAUTHORIZED, "Jwt issuer is not configured")
    );
    // Both tokens valid: passes, the first rule's token gives the principal.
    let req = Request::get("/")
        .header("authorization", format!("Bearer {}", a.sign(&claims("s1"))))
        .header("x-second", t2)
        .body(())
        .unwrap();
    let (status, _, _, seen) =
        send(authenticator(&rules, &cache), PolicySet::allow_all(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen.unwrap().principal, Some(format!("{ISS}/s1")));
}

fn allow_when(source: Source, when: Vec<Condition>) -> PolicySet {
    let p = Policy::new(
        "shop",
        "jwt",
        Action::Allow,
        vec![Rule {
            from: (source != Source::default()).then(|| vec![source]),
            to: None,
            when,
        }],
    );
    PolicySet::compile([&p]).unwrap()
}

#[tokio::test]
async fn authorization_requires_and_matches_the_validated_token() {
    let es = Signer::es256("k");
    let cache = JwksCache::default();
    let auth = || authenticator(&[rule(&jwks(&[&es]))], &cache);
    let need_token = || {
        allow_when(
            Source {
                request_principals: vec!["*".into()],
                ..Source::default()
            },
            vec![],
        )
    };
    // RA-04 with `requestPrincipals: ["*"]`: no token 403, a valid token 200.
    let (status, text, ..) = send(auth(), need_token(), get("/", None)).await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    let (status, ..) = send(auth(), need_token(), get("/", Some(&es.sign(&claims("a"))))).await;
    assert_eq!(status, StatusCode::OK);
    // Claims conditions: nested, lists, space-delimited scope.
    let c = json!({"iss": ISS, "sub": "a", "groups": ["dev", "ops"], "scope": "read write",
                   "org": {"team": "payments"}, "azp": "web", "aud": "orders"});
    let token = es.sign(&c);
    for (key, value, allowed) in [
        ("request.auth.claims[groups]", "ops", true),
        ("request.auth.claims[groups]", "admin", false),
        ("request.auth.claims[scope]", "write", true),
        ("request.auth.claims[scope]", "read write", false),
        ("request.auth.claims[org][team]", "pay*", true),
        ("request.auth.claims[org]", "payments", false),
        ("request.auth.presenter", "web", true),
        ("request.auth.audiences", "orders", true),
        (
            "request.auth.principal",
            "https://issuer.example.com/a",
            true,
        ),
        ("request.auth.principal", "*/b", false),
    ] {
        let set = allow_when(Source::default(), vec![Condition::values(key, &[value])]);
        let (status, ..) = send(auth(), set, get("/", Some(&token))).await;
        assert_eq!(status == StatusCode::OK, allowed, "{key} = {value}");
    }
}

#[test]
fn request_principal_forms_follow_istio() {
    let auth = |iss: &str, sub: Option<&str>| {
        let mut m = serde_json::Map::new();
        m.insert("iss".into(), iss.into());
        if let Some(s) = sub {
            m.insert("sub".into(), s.into());
        }
        RequestAuth::new(m, Arc::from(vec![]))
    };
    let headers = http::HeaderMap::new();
    let decide = |value: &str, ra: Option<&RequestAuth>, not: bool| {
        let source = if not {
            Source {
                not_request_principals: vec![value.into()],
                ..Source::default()
            }
        } else {
            Source {
                request_principals: vec![value.into()],
                ..Source::default()
            }
        };
        let set = allow_when(source, vec![]);
        set.evaluate(&RequestAttributes {
            method: "GET",
            path: "/",
            host: None,
            headers: &headers,
            peer: None,
            connection: None,
            remote_ip: None,
            server_name: ServerName::Unknown,
            request_auth: ra,
        })
        .allowed
    };
    let google = auth("https://accounts.google.com", Some("1234"));
    let mail = auth("issuer", Some("me@example.com"));
    let no_sub = auth("issuer", None);
    for (value, who, want) in [
        ("*", &google, true),
        ("*", &no_sub, false),
        ("https://accounts.google.com/1234", &google, true),
        ("https://accounts.google.com/12345", &google, false),
        ("*/1234", &google, true),
        ("*google.com/1234", &google, true),
        ("*google.com/1", &google, false),
        ("https://accounts.google.com/*", &google, true),
        ("https://accounts.google.com/12*", &google, true),
        ("*@example.com", &mail, true),
        ("*@example.com", &google, false),
        ("iss*", &mail, true),
        ("https://accounts*", &google, false),
    ] {
        assert_eq!(decide(value, Some(who), false), want, "{value}");
    }
    assert!(!decide("*", None, false), "no token: no request principal");
    assert!(
        decide("*", None, true),
        "notRequestPrincipals [*] admits a request without a token"
    );
    assert!(!decide("*", Some(&google), true));
}

#[test]
fn jwt_fields_are_inert_on_tcp() {
    let allow = allow_when(
        Source {
            request_principals: vec!["*".into()],
            ..Source::default()
        },
        vec![],
    );
    let info = mesh_core::extensions::ConnectionInfo {
        remote: "10.0.0.1:4000".parse().unwrap(),
        local: "10.0.0.2:8080".parse().unwrap(),
        security: mesh_core::extensions::ConnectionSecurity::None,
    };
    assert!(
        !allow
            .evaluate_connection(None, &info, ServerName::Unknown)
            .allowed,
        "ALLOW rule dropped"
    );
    let deny = Policy::new(
        "shop",
        "deny",
        Action::Deny,
        vec![Rule {
            from: Some(vec![Source {
                request_principals: vec!["x/y".into()],
                ..Source::default()
            }]),
            to: Some(vec![mesh_tls::authz::Operation {
                ports: vec!["8080".into()],
                ..Default::default()
            }]),
            when: vec![],
        }],
    );
    let set = PolicySet::compile([&deny]).unwrap();
    assert!(
        !set.evaluate_connection(None, &info, ServerName::Unknown)
            .allowed,
        "DENY field dropped, port applies"
    );
    let other = mesh_core::extensions::ConnectionInfo {
        local: "10.0.0.2:9090".parse().unwrap(),
        ..info
    };
    assert!(
        set.evaluate_connection(None, &other, ServerName::Unknown)
            .allowed
    );
}

#[test]
fn rules_load_from_yaml_and_select_workloads() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: mesh-wide, namespace: istio-system}
spec:
  jwtRules:
  - issuer: root-issuer
    jwks: '{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "1"}]}'
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  jwtRules:
  - issuer: orders-issuer
    jwksUri: http://127.0.0.1:1/keys
"#;
    let opts = LoadOptions {
        root_namespace: "istio-system".into(),
        ..LoadOptions::default()
    };
    let (config, _) = MeshConfig::from_yaml_str("ra.yaml", yaml, &opts).unwrap();
    let labels = |app: &str| [("app".to_owned(), app.to_owned())].into();
    let cache = JwksCache::default();
    let orders = Authenticator::from_config(&config, "shop", &labels("orders"), &cache).unwrap();
    let issuers: Vec<_> = orders
        .providers()
        .iter()
        .map(|p| format!("{p:?}"))
        .collect();
    assert_eq!(issuers.len(), 2);
    assert!(issuers[0].contains("orders-issuer") && issuers[1].contains("root-issuer"));
    let other = Authenticator::from_config(&config, "shop", &labels("cart"), &cache).unwrap();
    assert_eq!(other.providers().len(), 1);
    // A jwks that is not a key set is located by the loader.
    let bad = yaml.replace(
        r#"'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "1"}]}'"#,
        "'{\"keys\": []}'",
    );
    let errs = MeshConfig::from_yaml_str("ra.yaml", &bad, &opts).unwrap_err();
    assert_eq!(
        errs[0].to_string(),
        "ra.yaml:8:11: error: document 1, RequestAuthentication/istio-system/mesh-wide, \
         spec.jwtRules[0].jwks: jwks has no keys; every token would be rejected"
    );
}
