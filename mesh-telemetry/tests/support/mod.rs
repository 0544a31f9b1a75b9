//! Test helpers: a Prometheus text parser, fixtures and a loopback hyper server.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_core::Identity;
use mesh_telemetry::{DestinationService, Workload};
use tokio::net::TcpListener;

/// One sample line of an exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (sample lines only).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name_end, mut labels) = match line.find('{') {
            Some(i) => (i, BTreeMap::new()),
            None => (line.find(' ').expect("value"), BTreeMap::new()),
        };
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let mut chars = rest[1..].char_indices();
            let mut key = String::new();
            let end;
            loop {
                let (i, c) = chars.next().expect("label");
                match c {
                    '}' => {
                        end = i + 2;
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|x| x.1), Some('"'));
                        let mut value = String::new();
                        loop {
                            let (_, c) = chars.next().expect("value char");
                            match c {
                                '\\' => match chars.next().expect("escape").1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                '"' => break,
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            }
            rest = &rest[end..];
        }
        let value = rest.trim().parse().expect("sample value");
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Samples named `name` whose labels include every pair of `want`.
pub fn select<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The single sample named `name` with `want`; panics unless exactly one exists.
pub fn one(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let found = select(samples, name, want);
    assert_eq!(found.len(), 1, "{name} {want:?}: {found:#?}");
    found[0].value
}

/// Bucket counts `(le, cumulative count)` of a histogram series, sorted by bound.
pub fn buckets(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut b: Vec<(f64, f64)> = select(samples, &format!("{name}_bucket"), want)
        .into_iter()
        .map(|s| {
            let le = s.labels["le"].as_str();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le")
            };
            (le, s.value)
        })
        .collect();
    b.sort_by(|a, b| a.0.total_cmp(&b.0));
    b
}

pub fn productpage() -> Workload {
    Workload::new("productpage-v1", "default")
        .with_app("productpage")
        .with_version("v1")
        .with_principal(
            Identity::parse("spiffe://cluster.local/ns/default/sa/bookinfo-productpage").unwrap(),
        )
}

pub fn reviews() -> Workload {
    Workload::new("reviews-v2", "default")
        .with_app("reviews")
        .with_version("v2")
        .with_principal(
            Identity::parse("spiffe://cluster.local/ns/default/sa/bookinfo-reviews").unwrap(),
        )
}

pub fn reviews_service() -> DestinationService {
    DestinationService::from_host("reviews.default.svc.cluster.local")
}

/// Serves `handler` over HTTP/1 and HTTP/2 on 127.0.0.1:0 until the test ends.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// Collects a body into bytes.
pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes()
}
