//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use mesh_core::body::{self, BoxBody};
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_core::error::BoxError;
use mesh_routing::{CompileOptions, RequestView, RouteAction, RouteTable, Routing, Target};
use tower::util::BoxCloneSyncService;

/// Loads YAML text into a validated configuration, panicking with the diagnostics.
pub fn config(yaml: &str) -> MeshConfig {
    match MeshConfig::from_yaml_str("test.yaml", yaml, &LoadOptions::default()) {
        Ok((config, _)) => config,
        Err(errors) => panic!(
            "config rejected:\n{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// Loads fixture files of mesh-core.
pub fn fixtures(paths: &[&str]) -> MeshConfig {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-core/tests/fixtures");
    let paths: Vec<_> = paths.iter().map(|p| root.join(p)).collect();
    match MeshConfig::load(&paths, &LoadOptions::default()) {
        Ok((config, _)) => config,
        Err(errors) => panic!(
            "fixtures rejected:\n{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// Compiles for the sidecar.
pub fn routing(config: &MeshConfig) -> Routing {
    Routing::compile(config, &CompileOptions::default()).expect("compiles")
}

/// A request with `headers`.
pub fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<BoxBody> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body::empty()).expect("valid request")
}

/// The table's decision for a request: `Ok(route name or "-")` plus the destinations
/// (`host|subset|port` with weights) of a forwarding route, or `Err("NR")`.
pub fn decide(table: &RouteTable, req: &Request<BoxBody>) -> Result<String, &'static str> {
    let view = RequestView::from_request(req, None);
    let sel = table.select(&view).map_err(|_| "NR")?;
    let name = sel.route.name.clone().unwrap_or_else(|| "-".into());
    Ok(match &sel.route.action {
        RouteAction::Forward(w) => {
            let dests: Vec<String> = w
                .items()
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let k = &table.destinations()[t.destination];
                    format!(
                        "{}|{}|{}@{:.0}",
                        k.host,
                        k.subset.as_deref().unwrap_or(""),
                        k.port.map(|p| p.to_string()).unwrap_or_default(),
                        w.share(i) * 100.0
                    )
                })
                .collect();
            format!("{name} -> {}", dests.join(","))
        }
        RouteAction::Redirect(r) => format!("{name} -> redirect {}", r.status.as_u16()),
        RouteAction::Direct(d) => format!("{name} -> direct {}", d.status.as_u16()),
    })
}

/// What a recording destination saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `host|subset|port` of the destination.
    pub destination: String,
    /// The request as it arrived.
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    pub policy: Option<mesh_core::extensions::RoutePolicy>,
    pub body: bytes::Bytes,
}

/// A destination service type used in tests.
pub type Dest = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Makes destination services that record each request and answer 200 with the
/// destination name in `x-destination`; also counts how many services were made.
#[derive(Clone, Default)]
pub struct Recorder {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub made: Arc<Mutex<Vec<String>>>,
}

pub fn key_name(target: &Target) -> String {
    format!(
        "{}|{}|{}",
        target.key.host,
        target.key.subset.as_deref().unwrap_or(""),
        target.key.port.map(|p| p.to_string()).unwrap_or_default()
    )
}

impl Recorder {
    pub fn make(&self) -> impl Fn(&Arc<Target>) -> Dest + Clone + use<> {
        let seen = Arc::clone(&self.seen);
        let made = Arc::clone(&self.made);
        move |target: &Arc<Target>| {
            let name = key_name(target);
            made.lock().unwrap().push(name.clone());
            let seen = Arc::clone(&seen);
            BoxCloneSyncService::new(tower::service_fn(move |req: Request<BoxBody>| {
                let seen = Arc::clone(&seen);
                let name = name.clone();
                async move {
                    let (parts, b) = req.into_parts();
                    let body = http_body_util::BodyExt::collect(b).await?.to_bytes();
                    seen.lock().unwrap().push(Seen {
                        destination: name.clone(),
                        method: parts.method,
                        uri: parts.uri,
                        headers: parts.headers,
                        policy: parts
                            .extensions
                            .get::<mesh_core::extensions::RoutePolicy>()
                            .cloned(),
                        body,
                    });
                    let mut res = Response::new(body::full(name.clone()));
                    res.headers_mut()
                        .insert("x-destination", name.parse().unwrap());
                    Ok::<_, BoxError>(res)
                }
            }))
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Chi-square statistic of `observed` counts against `shares`.
pub fn chi_square(observed: &[usize], shares: &[f64]) -> f64 {
    let n: usize = observed.iter().sum();
    observed
        .iter()
        .zip(shares)
        .map(|(&o, &p)| {
            let e = p * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

/// Critical value of chi-square with 1 degree of freedom at p = 0.001.
pub const CHI2_1DF_P001: f64 = 10.828;
