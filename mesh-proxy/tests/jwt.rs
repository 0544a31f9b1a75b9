//! RequestAuthentication through the real sidecar binary: a JWKS served over HTTP by
//! this test, tokens it signs (ES256), plaintext requests to the PERMISSIVE inbound
//! listener; AuthorizationPolicy on the validated token (ISTIO.md RA-04, RA-05, RA-08,
//! RA-09, RA-10).

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::*;

struct Signer {
    key: EncodingKey,
    jwk: Value,
    kid: &'static str,
}

impl Signer {
    fn new(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Signer {
            key: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
            kid,
        }
    }

    fn jwks(&self) -> String {
        json!({"keys": [self.jwk.clone()]}).to_string()
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.into());
        encode(&h, claims, &self.key).unwrap()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Serves `body` at every path on 127.0.0.1:0.
async fn jwks_server(body: String) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |_req: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// One request to `addr`: status, the `www-authenticate` header, body.
async fn request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "order-service");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let res = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let challenge = res
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        challenge,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

const ISS: &str = "https://issuer.example.com";

#[tokio::test]
async fn jwt_rules_and_request_principals_through_the_sidecar() {
    let world = World::new();
    let signer = Signer::new("k1");
    let inline = Signer::new("k2");
    let jwks = jwks_server(signer.jwks()).await;
    let app = App::start(Behaviour::Ok("app")).await;
    let config = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: production}}
spec:
  selector: {{matchLabels: {{app: order-service}}}}
  jwtRules:
  - issuer: {ISS}
    audiences: [orders]
    jwksUri: http://{jwks}/.well-known/jwks.json
  - issuer: inline-issuer
    jwks: '{inline_jwks}'
    fromHeaders: [{{name: x-service-token}}]
    forwardOriginalToken: true
    outputClaimToHeaders: [{{header: x-jwt-team, claim: team}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-token, namespace: production}}
spec:
  selector: {{matchLabels: {{app: order-service}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: ["/api/*"]}}}}]
  - to: [{{operation: {{paths: ["/admin"]}}}}]
    when:
    - key: request.auth.claims[groups]
      values: [admins]
  - from: [{{source: {{requestPrincipals: ["inline-issuer/*"]}}}}]
    to: [{{operation: {{paths: ["/service"]}}}}]
  - to: [{{operation: {{paths: ["/public"]}}}}]
"#,
        inline_jwks = inline.jwks(),
    );
    let dir = world.write_config("istio", "jwt.yaml", &config);
    let ports = Ports::new();
    let proxy = start_sidecar(&world, "order-service", &dir, ports, app.addr).await;
    let inbound = SocketAddr::from(([127, 0, 0, 1], proxy.ports.inbound));
    let bearer = |t: &str| vec![("authorization", format!("Bearer {t}"))];
    let good = signer.sign(&json!({"iss": ISS, "sub": "alice", "aud": "orders",
                                   "groups": ["dev", "admins"], "exp": now() + 600}));

    // requestPrincipals ["*"]: no token 403 (RA-04), a valid token 200.
    let (status, _, body) = request(inbound, "/api/orders", &[]).await;
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "{}",
        proxy.output()
    );
    let hits = app.hits();
    let (status, _, body) = request(inbound, "/api/orders", &bearer(&good)).await;
    assert_eq!((status, body.as_str()), (200, "app"), "{}", proxy.output());
    assert_eq!(app.hits(), hits + 1);
    // RA-08: the token does not reach the application.
    let seen = app.last_headers.lock().unwrap().last().cloned().unwrap();
    assert!(!seen.contains_key("authorization"), "{seen:?}");

    // Invalid tokens: 401 with a Bearer challenge, never the application (RA-05).
    let expired =
        signer.sign(&json!({"iss": ISS, "sub": "alice", "aud": "orders", "exp": now() - 600}));
    let wrong_aud = signer.sign(&json!({"iss": ISS, "sub": "alice", "aud": "billing"}));
    // Signed by another key under the issuer's key id.
    let forged = Signer::new("k1").sign(&json!({"iss": ISS, "sub": "alice", "aud": "orders"}));
    let hits = app.hits();
    for (token, message) in [
        (&expired, "Jwt is expired"),
        (&wrong_aud, "Audiences in Jwt are not allowed"),
        (&forged, "Jwt verification fails"),
    ] {
        // Even on a path that needs no token.
        let (status, challenge, body) = request(inbound, "/public", &bearer(token)).await;
        assert_eq!((status, body.as_str()), (401, message));
        assert_eq!(
            challenge,
            "Bearer realm=\"http://order-service/public\", error=\"invalid_token\""
        );
    }
    assert_eq!(app.hits(), hits);

    // Claims conditions (RA-10).
    let dev = signer.sign(&json!({"iss": ISS, "sub": "bob", "aud": ["orders"], "groups": "dev"}));
    assert_eq!(request(inbound, "/admin", &bearer(&good)).await.0, 200);
    assert_eq!(request(inbound, "/admin", &bearer(&dev)).await.0, 403);
    assert_eq!(request(inbound, "/admin", &[]).await.0, 403);
    assert_eq!(request(inbound, "/public", &[]).await.0, 200);

    // An inline key set, a custom header, forwardOriginalToken and a claim header.
    let service = inline.sign(&json!({"iss": "inline-issuer", "sub": "batch", "team": "billing"}));
    let (status, _, _) =
        request(inbound, "/service", &[("x-service-token", service.clone())]).await;
    assert_eq!(status, 200, "{}", proxy.output());
    let seen = app.last_headers.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen["x-service-token"], service.as_str());
    assert_eq!(seen["x-jwt-team"], "billing");
    // The first issuer's token does not open the service path.
    assert_eq!(request(inbound, "/service", &bearer(&good)).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_checks_tokens_before_routing() {
    let world = World::new();
    let signer = Signer::new("gw");
    let app = App::start(Behaviour::Ok("orders")).await;
    let order_ports = Ports::new();
    let yaml = format!(
        r#"{se}---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: api-gateway}}
spec:
  selector: {{istio: ingress}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [api.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api-routing}}
spec:
  hosts: [api.example.com]
  gateways: [api-gateway]
  http:
  - route:
    - destination: {{host: order-service, port: {{number: 8080}}}}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: edge-jwt}}
spec:
  selector: {{matchLabels: {{istio: ingress}}}}
  jwtRules:
  - issuer: {ISS}
    jwks: '{jwks}'
"#,
        se = service_entry(
            "order-service",
            8080,
            &[(order_ports.inbound, "v1", "order-service")]
        ),
        jwks = signer.jwks(),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let _sidecar = start_sidecar(&world, "order-service", &config, order_ports, app.addr).await;
    let gw_ports = Ports::new();
    let http = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: istio-ingressgateway, labels: {{istio: ingress}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: api-gateway\n  ports:\n    80: 127.0.0.1:{http}\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        admin = gw_ports.admin,
    );
    let gw = Proxy::start(&world, "gateway", "gateway", &settings, gw_ports).await;
    let edge = SocketAddr::from(([127, 0, 0, 1], http));
    let get = |headers: Vec<(&'static str, String)>| async move {
        let mut h = headers;
        h.push(("host", "api.example.com".into()));
        let tcp = tokio::net::TcpStream::connect(edge).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::get("/api/v1/orders");
        for (k, v) in &h {
            req = req.header(*k, v.as_str());
        }
        let res = sender
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let good = signer.sign(&json!({"iss": ISS, "sub": "edge-user", "exp": now() + 600}));
    let expired = signer.sign(&json!({"iss": ISS, "sub": "edge-user", "exp": now() - 600}));
    let (status, body) = get(vec![("authorization", format!("Bearer {good}"))]).await;
    assert_eq!((status, body.as_str()), (200, "orders"), "{}", gw.output());
    let seen = app.last_headers.lock().unwrap().last().cloned().unwrap();
    assert!(
        !seen.contains_key("authorization"),
        "the gateway removed the token"
    );
    let hits = app.hits();
    let (status, body) = get(vec![("authorization", format!("Bearer {expired}"))]).await;
    assert_eq!((status, body.as_str()), (401, "Jwt is expired"));
    assert_eq!(app.hits(), hits, "an invalid token is not routed");
    // No token: RequestAuthentication alone lets it through (RA-04).
    assert_eq!(get(vec![]).await.0, 200);
}
