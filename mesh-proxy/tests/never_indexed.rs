//! The per-request ids on the wire (RFC 7541 §6.2.3): a sidecar forwarding to an HTTP/2
//! upstream sends `x-request-id`, `x-client-trace-id`, `b3`, `x-b3-traceid`,
//! `x-b3-spanid`, `x-b3-parentspanid` and `traceparent` as literals never indexed, so
//! they never enter the connection's dynamic table, while the fields that repeat from
//! request to request (`:authority`, `x-b3-sampled`, an application's header) are added
//! to it once and then sent as one-octet references. The upstream is h2c (prior
//! knowledge) in raw frames: it reads the preface, SETTINGS, HEADERS and CONTINUATION
//! frames and decodes each header block with its own HPACK decoder (httlib-hpack, not
//! the h2 crate the sidecar encodes with), which reports every field's representation.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use httlib_hpack::Decoder;
use support::frames::{
    ACK, CONTINUATION, END_HEADERS, END_STREAM, GOAWAY, HEADERS, PING, PREFACE, SETTINGS,
    header_fragment, read_frame, write_frame,
};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// How a field is represented in its header block (RFC 7541 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repr {
    /// §6.1: a reference to an entry of the static or the dynamic table.
    Indexed,
    /// §6.2.1: a literal, added to the dynamic table.
    Incremental,
    /// §6.2.2: a literal, not added.
    WithoutIndexing,
    /// §6.2.3: a literal, not added here nor by any later hop.
    NeverIndexed,
}

#[derive(Clone, Debug)]
struct Field {
    name: String,
    value: String,
    repr: Repr,
}

/// One request's header block as the upstream received it.
#[derive(Clone, Debug)]
struct Block {
    /// The upstream connection that carried it, counted from 1.
    connection: usize,
    stream: u32,
    /// How many frames carried it: its HEADERS and any CONTINUATION.
    frames: usize,
    fields: Vec<Field>,
}

impl Block {
    /// The one field named `name`.
    fn one(&self, name: &str) -> &Field {
        let found: Vec<&Field> = self.fields.iter().filter(|f| f.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "{name} once in stream {}: {self:#?}",
            self.stream
        );
        found[0]
    }
}

/// Decodes one complete header block with its connection's `decoder`. The decoder flags
/// the literals that are added to the table and those never indexed; the others are
/// told apart by their first octet (§6.1: an index reference has its top bit set), so
/// the block is decoded one representation at a time.
fn decode(decoder: &mut Decoder<'_>, mut block: Vec<u8>) -> Result<Vec<Field>, String> {
    let mut fields = Vec::new();
    while let Some(&first) = block.first() {
        let mut one = Vec::with_capacity(1);
        decoder
            .decode_exact(&mut block, &mut one)
            .map_err(|e| format!("undecodable header block: {e:?}"))?;
        // A dynamic table size update (§6.3) is no field.
        if one.len() > 1 {
            return Err(format!("{} fields decoded as one", one.len()));
        }
        for (name, value, flags) in one {
            let repr = if flags & Decoder::NEVER_INDEXED != 0 {
                Repr::NeverIndexed
            } else if flags & Decoder::WITH_INDEXING != 0 {
                Repr::Incremental
            } else if first & 0x80 != 0 {
                Repr::Indexed
            } else {
                Repr::WithoutIndexing
            };
            fields.push(Field {
                name: String::from_utf8_lossy(&name).into_owned(),
                value: String::from_utf8_lossy(&value).into_owned(),
                repr,
            });
        }
    }
    Ok(fields)
}

/// An h2c upstream (prior knowledge) in raw frames on 127.0.0.1:0. Each connection has
/// its own HPACK decoder at the default table size (4,096 octets: its SETTINGS are
/// empty); every header block is decoded and recorded, and its stream answered with
/// `:status: 200` and END_STREAM. Whatever breaks the protocol (a wrong preface, a first
/// frame other than SETTINGS, a frame inside a header block, an undecodable block) is
/// recorded as an error.
struct HpackUpstream {
    addr: SocketAddr,
    blocks: Arc<Mutex<Vec<Result<Block, String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HpackUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HpackUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let blocks = Arc::new(Mutex::new(Vec::new()));
        let record = blocks.clone();
        let task = tokio::spawn(async move {
            let mut connection = 0;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                connection += 1;
                let record = record.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(tcp, connection, &record).await {
                        record
                            .lock()
                            .unwrap()
                            .push(Err(format!("connection {connection}: {e}")));
                    }
                });
            }
        });
        Self { addr, blocks, task }
    }

    /// The first `n` header blocks, once there are that many (or after 20 s: a guard
    /// against hanging); fails on a recorded error.
    async fn blocks(&self, n: usize) -> Vec<Block> {
        for _ in 0..2000 {
            if self.blocks.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let blocks = self.blocks.lock().unwrap().clone();
        assert!(blocks.len() >= n, "{} of {n} header blocks", blocks.len());
        blocks
            .into_iter()
            .take(n)
            .map(|b| b.unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }
}

/// One upstream connection, until the client ends it (`Ok`) or breaks the protocol.
async fn serve(
    mut tcp: tokio::net::TcpStream,
    connection: usize,
    record: &Mutex<Vec<Result<Block, String>>>,
) -> Result<(), String> {
    let mut preface = [0u8; 24];
    tcp.read_exact(&mut preface)
        .await
        .map_err(|e| format!("no preface: {e}"))?;
    if preface != PREFACE {
        return Err(format!("preface {preface:?}"));
    }
    write_frame(&mut tcp, SETTINGS, 0, 0, &[]).await;
    let mut decoder = Decoder::with_dynamic_size(4096);
    // The header block being received: stream, fragments so far, frames.
    let mut pending: Option<(u32, Vec<u8>, usize)> = None;
    let mut first = true;
    while let Some((kind, flags, stream, payload)) = read_frame(&mut tcp).await {
        // The preface ends with a SETTINGS frame (RFC 9113 §3.4).
        if std::mem::take(&mut first) && kind != SETTINGS {
            return Err(format!("first frame of type {kind}, not SETTINGS"));
        }
        // A header block is contiguous: only its CONTINUATION frames until END_HEADERS
        // (§6.10).
        if let Some((open, ..)) = &pending
            && (kind != CONTINUATION || stream != *open)
        {
            return Err(format!(
                "frame of type {kind} on stream {stream} inside the header block of stream {open}"
            ));
        }
        match kind {
            SETTINGS if flags & ACK == 0 => write_frame(&mut tcp, SETTINGS, ACK, 0, &[]).await,
            PING if flags & ACK == 0 => write_frame(&mut tcp, PING, ACK, 0, &payload).await,
            HEADERS => {
                let fragment = header_fragment(flags, &payload)
                    .ok_or_else(|| format!("HEADERS on stream {stream}: bad padding"))?;
                pending = Some((stream, fragment.to_vec(), 1));
            }
            CONTINUATION => {
                let Some((_, block, frames)) = &mut pending else {
                    return Err(format!("CONTINUATION on stream {stream} without HEADERS"));
                };
                block.extend_from_slice(&payload);
                *frames += 1;
            }
            GOAWAY => return Ok(()),
            _ => {}
        }
        if flags & END_HEADERS != 0
            && matches!(kind, HEADERS | CONTINUATION)
            && let Some((stream, block, frames)) = pending.take()
        {
            let fields =
                decode(&mut decoder, block).map_err(|e| format!("stream {stream}: {e}"))?;
            record.lock().unwrap().push(Ok(Block {
                connection,
                stream,
                frames,
                fields,
            }));
            // `:status: 200` (static table index 8).
            write_frame(&mut tcp, HEADERS, END_HEADERS | END_STREAM, stream, &[0x88]).await;
        }
    }
    Ok(())
}

/// The fields that carry a value new with every request or trace (as the sidecar's
/// telemetry names them), all of which the sidecar writes or forwards here.
const PER_REQUEST_IDS: [&str; 7] = [
    "x-request-id",
    "x-client-trace-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "traceparent",
];

/// Fields with the same value on every request.
const REPEATING: [&str; 3] = [":authority", "x-b3-sampled", "x-tenant"];

const TRACE_ID: &str = "463ac35c9f6413ad48485a3953bb6124";
const SPAN_ID: &str = "a2fb4a1d1a96d312";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_ids_reach_the_wire_never_indexed_while_repeating_fields_are_indexed() {
    let world = World::new();
    let up = HpackUpstream::start().await;
    // An `HTTP2` port: requests go as HTTP/2 with prior knowledge.
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ledger, namespace: production}}
spec:
  hosts: [ledger]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http2, protocol: HTTP2}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http2: {port}}}}}
",
        port = up.addr.port()
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = start_sidecar(&world, "order-service", &config, Ports::new(), nowhere).await;
    let client = Client::new(proxy.outbound());

    // Each request continues the same incoming trace, in the single `b3` header, so the
    // sidecar writes `b3` as well as the `x-b3-*` headers and `traceparent`, parents its
    // span under the incoming one (`x-b3-parentspanid`), keeps `x-client-trace-id` and
    // adds an `x-request-id`. The trace id, the parent span id and the client trace id
    // repeat exactly: were they indexed, the later requests would send them as references.
    let b3 = format!("{TRACE_ID}-{SPAN_ID}-1");
    let headers = [
        ("b3", b3.as_str()),
        ("x-client-trace-id", "checkout-7"),
        ("x-tenant", "acme"),
    ];
    // The third request's block is larger than the upstream's 16,384-octet frames, so
    // it comes in HEADERS and CONTINUATION frames.
    let padding = "0123456789abcdefghijklmnopqrstuvwxyzABCDEF".repeat(600);
    let mut third = headers.to_vec();
    third.push(("x-padding", padding.as_str()));
    for (i, extra) in [headers.to_vec(), headers.to_vec(), third]
        .iter()
        .enumerate()
    {
        let (status, body) = client
            .request("GET", "ledger", "/v1/balance", extra)
            .await
            .unwrap();
        assert_eq!(status, 200, "request {}: {body}\n{}", i + 1, proxy.output());
    }

    let blocks = up.blocks(3).await;
    // One connection, so one dynamic table, for all three requests.
    for b in &blocks {
        assert_eq!(b.connection, 1, "{b:#?}");
    }
    assert_eq!(
        blocks.iter().map(|b| b.stream).collect::<Vec<_>>(),
        [1, 3, 5]
    );
    assert_eq!(blocks[0].frames, 1);
    assert!(blocks[2].frames > 1, "one frame: {}", blocks[2].frames);
    assert_eq!(blocks[2].one("x-padding").value, padding);

    for (i, b) in blocks.iter().enumerate() {
        for name in PER_REQUEST_IDS {
            let f = b.one(name);
            assert_eq!(
                f.repr,
                Repr::NeverIndexed,
                "{name} in request {}: {:#?}",
                i + 1,
                b.fields
            );
        }
        // The values are the ones the sidecar means to send: the decoder read them right.
        assert_eq!(b.one("x-b3-traceid").value, TRACE_ID);
        assert_eq!(b.one("x-b3-parentspanid").value, SPAN_ID);
        assert_eq!(b.one("x-client-trace-id").value, "checkout-7");
        let span = &b.one("x-b3-spanid").value;
        assert_ne!(span, SPAN_ID);
        assert_eq!(b.one("b3").value, format!("{TRACE_ID}-{span}-1-{SPAN_ID}"));
        assert_eq!(
            b.one("traceparent").value,
            format!("00-{TRACE_ID}-{span}-01")
        );
        assert_eq!(b.one("x-request-id").value.len(), 36, "a UUID");

        // The repeating fields use the table: added by the first request, referenced by
        // the later ones.
        let expected = if i == 0 {
            Repr::Incremental
        } else {
            Repr::Indexed
        };
        for name in REPEATING {
            let f = b.one(name);
            assert_eq!(f.repr, expected, "{name} in request {}: {f:?}", i + 1);
        }
        assert_eq!(b.one(":authority").value, "ledger");
        assert_eq!(b.one("x-tenant").value, "acme");
    }
    // Every request got a new request id and a new span.
    for name in ["x-request-id", "x-b3-spanid"] {
        let values: std::collections::BTreeSet<&str> =
            blocks.iter().map(|b| b.one(name).value.as_str()).collect();
        assert_eq!(values.len(), 3, "{name}: {values:?}");
    }
}
