//! `load-backend`: the load harness's backend. One thread (tokio current-thread
//! runtime) answers every request on `--listen` with `200` and a body of `--body-bytes`
//! bytes, over HTTP/1.1 keep-alive (or HTTP/2 with prior knowledge), `TCP_NODELAY`.
//!
//! ```text
//! load-backend --listen 127.0.0.1:18080 [--body-bytes 1024]
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;

/// The load harness's backend: `200` and a fixed body for every request, one thread.
#[derive(Parser)]
struct Args {
    /// The address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The size of every response body.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    benches::load::serve_on("load-backend", args.listen, |listener| {
        benches::load::serve_body(listener, body)
    })
}
