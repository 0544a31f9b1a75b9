//! `load-floor`: the floor of the load harness, the least an HTTP/1.1 reverse proxy
//! built on hyper does per request. One thread (tokio current-thread runtime), a hyper
//! 1.x HTTP/1.1 server on `--listen` and a pooled hyper-util client (`TCP_NODELAY`,
//! keep-alive) to `--upstream`; no tower layers, no header rewriting beyond the request
//! target, bodies streamed both ways.
//!
//! ```text
//! load-floor --listen 127.0.0.1:18083 --upstream 127.0.0.1:18080
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A bare hyper reverse proxy: the floor the harness compares the proxies against.
#[derive(Parser)]
struct Args {
    /// The address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The backend every request goes to.
    #[arg(long)]
    upstream: SocketAddr,
}

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    match format!("http://{upstream}{path}").parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    }
    Ok(match client.request(req).await {
        Ok(res) => res.map(BodyExt::boxed_unsync),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    })
}

fn status(code: StatusCode) -> Response<Body> {
    let mut res = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *res.status_mut() = code;
    res
}

fn main() -> ExitCode {
    let args = Args::parse();
    let upstream = args.upstream;
    benches::load::serve_on("load-floor", args.listen, |listener| async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(connector);
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let client = client.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req| forward(client.clone(), upstream, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}
