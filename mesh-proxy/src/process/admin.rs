//! The admin server (127.0.0.1:15000 by default).
//!
//! | path | answer |
//! |---|---|
//! | `GET /stats/prometheus`, `GET /metrics` | Prometheus text: Istio standard metrics, the proxy's own, and Envoy's per-route `envoy_vhost_route_*` for `statPrefix` blocks |
//! | `GET /stats` | latency percentiles per destination (`?format=json` for JSON), then `vhost.<vh>.route.<statPrefix>.*` counters |
//! | `GET /healthz/ready` | 200 `LIVE` while serving, 503 `DRAINING` during shutdown |
//! | `GET /config_dump` | JSON: active config version, load time and resources |
//! | `GET /clusters` | per destination and endpoint: health, ejection, requests in flight (`?format=json`) |
//! | `GET /certs` | JSON: identity, serial, validity of the workload certificate |
//! | `POST /rotate` | rotate the workload certificate now (issuer or certificate directory) |
//!
//! Only loopback clients get every path. Others (the kubelet's probes and Prometheus,
//! when the admin server listens on the pod's address, as in an injected pod) get
//! `/healthz/ready`, `/ready`, `/stats/prometheus` and `/metrics`, what Istio serves to
//! the pod network on its status and metrics ports; any other path answers 404.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use mesh_core::body::{self, BoxBody};
use mesh_telemetry::{MetricsRegistry, Telemetry};
use mesh_tls::CertStore;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::mesh::{Active, Mesh};
use crate::stack::Destinations;

/// What the admin server reads.
#[derive(Clone)]
pub struct Admin {
    /// Telemetry.
    pub telemetry: Telemetry,
    /// The workload certificate.
    pub store: Arc<CertStore>,
    /// The active configuration.
    pub active: Arc<ArcSwap<Active>>,
    /// Live destinations.
    pub destinations: Destinations,
    /// Cancelled when draining.
    pub draining: CancellationToken,
}

impl Admin {
    /// The admin view of `mesh`.
    pub fn new(mesh: &Mesh) -> Self {
        Self {
            telemetry: mesh.telemetry().clone(),
            store: mesh.certificates().clone(),
            active: mesh.active(),
            destinations: mesh.destinations().clone(),
            draining: mesh.shutdown_token(),
        }
    }
}

/// Serves the admin API on `listener` until `stop`.
pub fn spawn(
    listener: tokio::net::TcpListener,
    admin: Admin,
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use tower::ServiceExt;
    tokio::spawn(crate::serve::run(
        listener,
        crate::serve::Options::internal(builder, stop),
        move |tcp, peer| {
            let admin = admin.clone();
            let local = peer.ip().to_canonical().is_loopback();
            let svc = tower::service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move {
                    if local || PUBLIC_PATHS.contains(&req.uri().path()) {
                        admin.handle(req).await
                    } else {
                        Ok(reply(
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "not found\n".into(),
                        ))
                    }
                }
            });
            async move { Some((tcp, svc.map_err(|e| -> mesh_core::BoxError { match e {} }))) }
        },
    ))
}

/// The paths served to clients that are not on loopback.
const PUBLIC_PATHS: [&str; 4] = ["/healthz/ready", "/ready", "/stats/prometheus", "/metrics"];

fn reply(status: StatusCode, content_type: &'static str, text: String) -> Response<BoxBody> {
    let mut res = Response::new(body::full(text));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    res
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Admin {
    /// Publishes outlier state into the proxy metrics, just before a scrape.
    fn refresh_metrics(&self, metrics: &MetricsRegistry) {
        for d in self.destinations.list() {
            let Some(detector) = d.balance.detector() else {
                continue;
            };
            let m = metrics.proxy().destination(&d.key.to_string());
            let ejected = i64::try_from(detector.ejected_count()).unwrap_or(i64::MAX);
            m.ejected.set(ejected);
            let total = detector.ejections_total();
            let seen = m.ejections.get();
            if total > seen {
                m.ejections.inc_by(total - seen);
            }
            let overflow = detector.ejections_overflow();
            let seen = m.ejection_overflows.get();
            if overflow > seen {
                m.ejection_overflows.inc_by(overflow - seen);
            }
        }
        let leaf = self.store.current().leaf.clone();
        let expiry = i64::try_from(unix(leaf.not_after)).unwrap_or(i64::MAX);
        metrics
            .proxy()
            .set_certificate_expiry(leaf.identity.as_str(), expiry);
    }

    fn clusters(&self, json_format: bool) -> Response<BoxBody> {
        let mut text = String::new();
        let mut list = Vec::new();
        for d in self.destinations.list() {
            let name = d.key.to_string();
            let mut endpoints = Vec::new();
            for ep in d.balance.endpoints() {
                let ejected = d.balance.is_ejected(ep.address);
                let in_flight = d.balance.in_flight(ep.address);
                let health = if ejected {
                    "/failed_outlier_check"
                } else {
                    "healthy"
                };
                text.push_str(&format!(
                    "{name}::{}::health_flags::{health}\n{name}::{}::rq_active::{in_flight}\n",
                    ep.address, ep.address
                ));
                endpoints.push(json!({
                    "address": ep.address.to_string(),
                    "labels": &*ep.labels,
                    "identities": ep.identities.iter().map(|i| i.as_str().to_owned()).collect::<Vec<_>>(),
                    "ejected": ejected,
                    "in_flight": in_flight,
                }));
            }
            let detector = d.balance.detector();
            list.push(json!({
                "name": name,
                "lb": format!("{:?}", d.balance.lb_policy()),
                "outlier_detection": detector.is_some(),
                "ejections_total": detector.map_or(0, |x| x.ejections_total()),
                "ejected": detector.map_or(0, |x| x.ejected_count()),
                "in_flight": d.pool.in_flight(),
                "pending": d.pool.pending(),
                "endpoints": endpoints,
            }));
        }
        if json_format {
            reply(
                StatusCode::OK,
                "application/json",
                json!({ "clusters": list }).to_string(),
            )
        } else {
            reply(StatusCode::OK, "text/plain", text)
        }
    }

    fn config_dump(&self) -> Response<BoxBody> {
        let active = self.active.load();
        let c = &active.config;
        let mut resources = Vec::new();
        let mut push = |kind: &str, ns: &str, name: &str| {
            resources.push(json!({"kind": kind, "namespace": ns, "name": name}));
        };
        for r in c.virtual_services() {
            push("VirtualService", &r.metadata.namespace, &r.metadata.name);
        }
        for r in c.destination_rules() {
            push("DestinationRule", &r.metadata.namespace, &r.metadata.name);
        }
        for r in c.service_entries() {
            push("ServiceEntry", &r.metadata.namespace, &r.metadata.name);
        }
        for r in c.gateways() {
            push("Gateway", &r.metadata.namespace, &r.metadata.name);
        }
        for r in c.peer_authentications() {
            push(
                "PeerAuthentication",
                &r.metadata.namespace,
                &r.metadata.name,
            );
        }
        for r in c.authorization_policies() {
            push(
                "AuthorizationPolicy",
                &r.metadata.namespace,
                &r.metadata.name,
            );
        }
        let body = json!({
            "version": format!("{:016x}", active.version),
            "loaded_at": unix(active.loaded_at),
            "resources": resources,
        });
        reply(StatusCode::OK, "application/json", body.to_string())
    }

    fn certs(&self) -> Response<BoxBody> {
        let leaf = self.store.current().leaf.clone();
        let body = json!({
            "identity": leaf.identity.as_str(),
            "serial": leaf.serial.to_string(),
            "not_before": unix(leaf.not_before),
            "not_after": unix(leaf.not_after),
            "trust_domains": self.store.trust_bundle().trust_domains(),
        });
        reply(StatusCode::OK, "application/json", body.to_string())
    }

    /// Answers one admin request.
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
        let json_format = req.uri().query().is_some_and(|q| q.contains("format=json"));
        let res = match (req.method(), req.uri().path()) {
            (&Method::GET, "/stats/prometheus" | "/metrics") => {
                self.refresh_metrics(self.telemetry.metrics());
                let mut text = self.telemetry.encode_metrics();
                text.push_str(&mesh_routing::stats::render_prometheus());
                reply(StatusCode::OK, MetricsRegistry::CONTENT_TYPE, text)
            }
            (&Method::GET, "/stats") => {
                if json_format {
                    reply(
                        StatusCode::OK,
                        "application/json",
                        self.telemetry.latency().render_json(),
                    )
                } else {
                    let mut text = self.telemetry.latency().render_text();
                    text.push_str(&mesh_routing::stats::render_text());
                    reply(StatusCode::OK, "text/plain", text)
                }
            }
            (&Method::GET, "/healthz/ready" | "/ready") => {
                if self.draining.is_cancelled() {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "DRAINING\n".into(),
                    )
                } else {
                    reply(StatusCode::OK, "text/plain", "LIVE\n".into())
                }
            }
            (&Method::GET, "/config_dump") => self.config_dump(),
            (&Method::GET, "/clusters") => self.clusters(json_format),
            (&Method::GET, "/certs") => self.certs(),
            (&Method::POST, "/rotate") => {
                let before = self.store.serial();
                self.store.rotate_now();
                reply(
                    StatusCode::OK,
                    "application/json",
                    json!({"rotating": true, "previous_serial": before.to_string()}).to_string(),
                )
            }
            (
                _,
                "/stats/prometheus" | "/metrics" | "/stats" | "/healthz/ready" | "/config_dump"
                | "/clusters" | "/certs" | "/rotate",
            ) => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n".into(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        };
        Ok(res)
    }
}
