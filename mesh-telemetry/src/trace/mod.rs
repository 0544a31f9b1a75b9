//! Trace context: extraction, a new span per hop, sampling, injection, `x-request-id`.
//!
//! Each hop through the proxy is one span: [`Propagator::propagate`] reads the incoming
//! context (single `b3` header first, then the `x-b3-*` headers, then W3C `traceparent`;
//! a malformed header is skipped), creates a new span id whose parent is the incoming span
//! (ISTIO.md TR-04: no shared span context between client and server spans), decides
//! sampling, removes every incoming trace header and writes the new context in the
//! configured [`Formats`] plus the format the request came with.
//!
//! Sampling (TR-06, TR-07): an incoming decision (`x-b3-sampled`, `x-b3-flags`, the `b3`
//! sampling state, the `traceparent` sampled flag) is honoured; otherwise the
//! [`Sampler`]'s percentage decides with the caller's random number generator (so tests
//! fix the seed); a request carrying `x-client-trace-id` is always sampled, as Envoy's
//! 100 % client sampling in Istio does. The default is Istio's 1 %; values outside 0–100
//! fall back to 1 %. Incoming 64-bit B3 trace ids are preserved; new traces get 128-bit
//! ids.
//!
//! `x-request-id` (TR-01) is kept when present and generated as a UUID v4 when absent.
//! We choose the random sampler over Envoy's request-id-derived decision (Istio's
//! `useRequestIdForTraceSampling`): the decision is made once, here, and travels in the
//! trace headers.

pub mod b3;
pub mod export;
pub mod forward;
pub mod w3c;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;

/// `x-request-id`.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-client-trace-id`: a client asking for its request to be traced.
pub static CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");

/// Header lookup for the extractors: a [`HeaderMap`], or the trace headers picked out of
/// one in a single pass ([`TraceHeaderScan`]).
pub trait Lookup {
    /// The first value of `name`.
    fn value(&self, name: &HeaderName) -> Option<&HeaderValue>;
}

impl Lookup for HeaderMap {
    fn value(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.get(name)
    }
}

const SCANNED: usize = 9;

fn scanned_names() -> [&'static HeaderName; SCANNED] {
    [
        &b3::SINGLE,
        &b3::TRACE_ID,
        &b3::SPAN_ID,
        &b3::PARENT_SPAN_ID,
        &b3::SAMPLED,
        &b3::FLAGS,
        &w3c::TRACEPARENT,
        &w3c::TRACESTATE,
        &CLIENT_TRACE_ID,
    ]
}

/// The first value of every trace header, found by one walk over the map instead of one
/// hash lookup per name.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceHeaderScan<'a> {
    values: [Option<&'a HeaderValue>; SCANNED],
    /// Whether some trace header has more than one value.
    repeated: bool,
}

/// The index in [`scanned_names`] of a trace header name.
fn scanned_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "b3" => 0,
        "x-b3-traceid" => 1,
        "x-b3-spanid" => 2,
        "x-b3-parentspanid" => 3,
        "x-b3-sampled" => 4,
        "x-b3-flags" => 5,
        "traceparent" => 6,
        "tracestate" => 7,
        "x-client-trace-id" => 8,
        _ => return None,
    })
}

impl<'a> TraceHeaderScan<'a> {
    /// Scans `headers`.
    pub fn new(headers: &'a HeaderMap) -> Self {
        let mut values = [None; SCANNED];
        let mut repeated = false;
        for (name, value) in headers {
            let Some(i) = scanned_index(name) else {
                continue;
            };
            // The first value wins (TR-02).
            match values[i] {
                None => values[i] = Some(value),
                Some(_) => repeated = true,
            }
        }
        Self { values, repeated }
    }

    fn present(&self, i: usize) -> bool {
        self.values[i].is_some()
    }
}

impl Lookup for TraceHeaderScan<'_> {
    fn value(&self, name: &HeaderName) -> Option<&HeaderValue> {
        let names = scanned_names();
        // The extractors pass the statics themselves: compare addresses before bytes.
        names
            .iter()
            .position(|n| std::ptr::eq(*n, name))
            .or_else(|| names.iter().position(|n| *n == name))
            .and_then(|i| self.values[i])
    }
}

/// What the incoming headers said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    /// `(trace id, trace id is 64-bit, span id)` when a valid context was present.
    pub ids: Option<(u128, bool, u64)>,
    /// The incoming sampling decision.
    pub sampled: Option<bool>,
    /// Debug (B3 `x-b3-flags: 1` or `b3: …-d`).
    pub debug: bool,
    /// W3C `tracestate`, propagated unchanged.
    pub tracestate: Option<HeaderValue>,
    /// The incoming `x-b3-traceid` and `x-b3-spanid` values when already canonical
    /// (lower-hex): injection reuses them instead of encoding and allocating again.
    pub b3_values: Option<(HeaderValue, HeaderValue)>,
}

/// The span of this hop: what is injected downstream and exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopContext {
    /// Trace id (for 64-bit ids the high half is zero).
    pub trace_id: u128,
    /// Whether the trace id is the 64-bit form (rendered with 16 hex digits in B3).
    pub trace_id_64: bool,
    /// This hop's span id.
    pub span_id: u64,
    /// The incoming span, parent of this hop's span; `None` for a new trace.
    pub parent_span_id: Option<u64>,
    /// Whether the trace is sampled (exported).
    pub sampled: bool,
    /// Debug sampling.
    pub debug: bool,
    /// W3C `tracestate`.
    pub tracestate: Option<HeaderValue>,
    /// The incoming trace id and parent span id as canonical B3 header values, if any.
    pub b3_values: Option<(HeaderValue, HeaderValue)>,
}

impl HopContext {
    /// The trace id as lower-hex (16 or 32 digits).
    pub fn trace_id_hex(&self) -> String {
        let mut buf = [0u8; 32];
        write_hex(self.trace_id, &mut buf);
        let s = if self.trace_id_64 {
            &buf[16..]
        } else {
            &buf[..]
        };
        String::from_utf8_lossy(s).into_owned()
    }
}

/// Sampling percentage with 0.01 % precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    per_10k: u32,
}

impl Default for Sampler {
    /// Istio's default: 1 %.
    fn default() -> Self {
        Self { per_10k: 100 }
    }
}

impl Sampler {
    /// Samples `percent` % of new traces; values that are not within 0–100 fall back to
    /// 1 % (Istio treats out-of-range values so).
    pub fn percent(percent: f64) -> Self {
        if !(0.0..=100.0).contains(&percent) {
            return Self::default();
        }
        Self {
            per_10k: (percent * 100.0).round() as u32,
        }
    }

    /// The percentage.
    pub fn as_percent(&self) -> f64 {
        f64::from(self.per_10k) / 100.0
    }

    /// A random decision.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> bool {
        rng.random_range(0..10_000u32) < self.per_10k
    }
}

/// Which header formats to write downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Formats {
    /// `x-b3-*` headers.
    pub b3_multi: bool,
    /// The single `b3` header.
    pub b3_single: bool,
    /// W3C `traceparent`/`tracestate`.
    pub w3c: bool,
}

impl Default for Formats {
    /// B3 multi-header (Istio's Zipkin default) and W3C (its OpenTelemetry provider).
    fn default() -> Self {
        Self {
            b3_multi: true,
            b3_single: false,
            w3c: true,
        }
    }
}

/// Which format carried the incoming context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    None,
    B3Single,
    B3Multi,
    W3c,
}

/// Reads the incoming context. Returns an empty [`Incoming`] when no valid one is present.
pub fn extract(headers: &HeaderMap) -> Incoming {
    extract_with_source(&TraceHeaderScan::new(headers)).0
}

fn extract_with_source<L: Lookup + ?Sized>(headers: &L) -> (Incoming, Source) {
    // The first format with valid ids wins; otherwise the first one with only a
    // decision. Later formats are not parsed once a context is found.
    let mut decision_only: Option<(Incoming, Source)> = None;
    let mut consider = |found: Option<Incoming>, source: Source| match found {
        Some(i) if i.ids.is_some() => Some((i, source)),
        Some(i) => {
            decision_only.get_or_insert((i, source));
            None
        }
        None => None,
    };
    if let Some(found) = consider(b3::extract_single(headers), Source::B3Single) {
        return found;
    }
    if let Some(found) = consider(b3::extract_multi(headers), Source::B3Multi) {
        return found;
    }
    if let Some(found) = consider(w3c::extract(headers), Source::W3c) {
        return found;
    }
    decision_only.unwrap_or((Incoming::default(), Source::None))
}

fn nonzero_u64<R: Rng + ?Sized>(rng: &mut R) -> u64 {
    loop {
        let v = rng.random::<u64>();
        if v != 0 {
            return v;
        }
    }
}

/// The context of this hop: a new span under the incoming one, or a new trace.
pub fn next_hop<R: Rng + ?Sized>(incoming: Incoming, sampler: &Sampler, rng: &mut R) -> HopContext {
    let sampled = match incoming.sampled {
        Some(d) => d || incoming.debug,
        None => incoming.debug || sampler.sample(rng),
    };
    let span_id = nonzero_u64(rng);
    match incoming.ids {
        Some((trace_id, short, parent)) => HopContext {
            trace_id,
            trace_id_64: short,
            span_id,
            parent_span_id: Some(parent),
            sampled,
            debug: incoming.debug,
            tracestate: incoming.tracestate,
            b3_values: incoming.b3_values,
        },
        None => {
            let trace_id = (u128::from(nonzero_u64(rng)) << 64) | u128::from(rng.random::<u64>());
            HopContext {
                trace_id,
                trace_id_64: false,
                span_id,
                parent_span_id: None,
                sampled,
                debug: incoming.debug,
                tracestate: None,
                b3_values: None,
            }
        }
    }
}

/// Removes every trace-context header (before injecting the new context).
pub fn clear(headers: &mut HeaderMap) {
    for name in [
        &b3::TRACE_ID,
        &b3::SPAN_ID,
        &b3::PARENT_SPAN_ID,
        &b3::SAMPLED,
        &b3::FLAGS,
        &b3::SINGLE,
        &w3c::TRACEPARENT,
        &w3c::TRACESTATE,
    ] {
        headers.remove(name);
    }
}

/// Writes `ctx` in `formats`.
pub fn inject(ctx: &HopContext, formats: Formats, headers: &mut HeaderMap) {
    if formats.b3_multi {
        b3::inject_multi(ctx, headers);
    }
    if formats.b3_single {
        b3::inject_single(ctx, headers);
    }
    if formats.w3c {
        w3c::inject(ctx, headers);
    }
}

/// Extract, new span per hop, sample, inject: the per-request trace step of the layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Propagator {
    /// The sampling percentage for requests without a decision.
    pub sampler: Sampler,
    /// Formats written downstream (the incoming format is always written too).
    pub formats: Formats,
}

impl Propagator {
    /// A propagator sampling `percent` % of new traces with the default formats.
    pub fn with_sampling(percent: f64) -> Self {
        Self {
            sampler: Sampler::percent(percent),
            formats: Formats::default(),
        }
    }

    /// Rewrites `headers` for the next hop and returns this hop's context.
    pub fn propagate<R: Rng + ?Sized>(&self, headers: &mut HeaderMap, rng: &mut R) -> HopContext {
        let scan = TraceHeaderScan::new(headers);
        let (mut incoming, source) = extract_with_source(&scan);
        // Envoy's client sampling (100 % in Istio): a client-supplied trace id forces a
        // sampled trace unless a decision already travels with the request (TR-07).
        if incoming.sampled.is_none() && scan.present(8) {
            incoming.sampled = Some(true);
        }
        // Which incoming trace headers exist (indices of `scanned_names`, the client
        // trace id excluded: it is not ours to rewrite).
        let mut present = [false; 8];
        for (i, p) in present.iter_mut().enumerate() {
            *p = scan.present(i);
        }
        let repeated = scan.repeated;
        let ctx = next_hop(incoming, &self.sampler, rng);
        let mut formats = self.formats;
        match source {
            Source::B3Single => formats.b3_single = true,
            Source::B3Multi => formats.b3_multi = true,
            Source::W3c => formats.w3c = true,
            Source::None => {}
        }
        let names = scanned_names();
        // Bit `i`: the header at index `i` of `scanned_names` is written.
        let mut pending: u16 = (0..8)
            .filter(|i| wanted(&ctx, formats, *i))
            .fold(0, |m, i| m | 1 << i);
        let fresh = Fresh::new(&ctx, pending);
        if !repeated && present.iter().any(|p| *p) {
            // Every incoming trace header has one value: overwrite those in place, in
            // one walk, instead of a hashed insert per name.
            for (name, value) in headers.iter_mut() {
                if let Some(i) = scanned_index(name).filter(|i| pending & 1 << i != 0) {
                    *value = fresh.take(i).unwrap_or_else(|| encode(&ctx, i));
                    pending &= !(1 << i);
                }
            }
        }
        // Remove the incoming headers that are not written; `insert` replaces the others
        // (all their values).
        for (i, p) in present.iter().enumerate() {
            if *p && !wanted(&ctx, formats, i) {
                headers.remove(names[i]);
            }
        }
        if pending != 0 {
            // One growth of the map instead of one per inserted header.
            headers.reserve(pending.count_ones() as usize);
            for (i, name) in names.iter().enumerate().take(8) {
                if pending & 1 << i != 0 {
                    let v = fresh.take(i).unwrap_or_else(|| encode(&ctx, i));
                    headers.insert((*name).clone(), v);
                }
            }
        }
        ctx
    }
}

/// Whether `ctx` in `formats` writes the trace header at index `i` of
/// [`scanned_names`].
fn wanted(ctx: &HopContext, formats: Formats, i: usize) -> bool {
    match i {
        0 => formats.b3_single,
        1 | 2 => formats.b3_multi,
        3 => formats.b3_multi && ctx.parent_span_id.is_some(),
        4 => formats.b3_multi && !ctx.debug,
        5 => formats.b3_multi && ctx.debug,
        6 => formats.w3c,
        7 => formats.w3c && ctx.tracestate.is_some(),
        _ => false,
    }
}

/// The freshly encoded values of one hop (ids, `b3`, `traceparent`) in one shared
/// allocation, sliced into header values, instead of one allocation per value. Used when
/// at least two values are encoded.
#[derive(Default)]
struct Fresh {
    bytes: Bytes,
    /// `start..end` in `bytes` by index of [`scanned_names`]; empty when not here.
    ranges: [(u8, u8); 8],
}

impl Fresh {
    fn new(ctx: &HopContext, pending: u16) -> Self {
        // `b3`, `x-b3-spanid` and `traceparent` are always encoded here; the trace and
        // parent ids only when the incoming values are not reused.
        let reused = if ctx.b3_values.is_some() { 0 } else { 0b1010 };
        let mask = pending & (0b0100_0101 | reused);
        if mask.count_ones() < 2 {
            return Self::default();
        }
        let mut buf = [0u8; b3::SINGLE_MAX + 32 + 16 + 16 + 55];
        let mut ranges = [(0u8, 0u8); 8];
        let mut n = 0;
        for i in [0, 1, 2, 3, 6] {
            if mask & 1 << i == 0 {
                continue;
            }
            let mut put = |bytes: &[u8]| {
                buf[n..n + bytes.len()].copy_from_slice(bytes);
                ranges[i] = (n as u8, (n + bytes.len()) as u8);
                n += bytes.len();
            };
            let mut id = [0u8; 16];
            match i {
                0 => {
                    let (b, len) = b3::single_bytes(ctx);
                    put(&b[..len]);
                }
                1 => {
                    let (b, len) = b3::trace_id_bytes(ctx);
                    put(&b[..len]);
                }
                2 => {
                    write_hex_u64(ctx.span_id, &mut id);
                    put(&id);
                }
                3 => {
                    write_hex_u64(ctx.parent_span_id.unwrap_or_default(), &mut id);
                    put(&id);
                }
                _ => put(&w3c::traceparent_bytes(ctx)),
            }
        }
        Self {
            bytes: Bytes::from_owner(buf),
            ranges,
        }
    }

    /// The value at index `i`, when encoded here.
    fn take(&self, i: usize) -> Option<HeaderValue> {
        let (start, end) = self.ranges[i];
        if start == end {
            return None;
        }
        HeaderValue::from_maybe_shared(self.bytes.slice(usize::from(start)..usize::from(end))).ok()
    }
}

/// The value [`inject`] writes for the trace header at index `i` of [`scanned_names`],
/// when [`wanted`].
fn encode(ctx: &HopContext, i: usize) -> HeaderValue {
    match i {
        0 => b3::single_value(ctx),
        1 => b3::trace_id_value(ctx),
        2 => b3::span_id_value(ctx.span_id),
        3 => match (&ctx.b3_values, ctx.parent_span_id) {
            (Some((_, parent)), _) => parent.clone(),
            (None, Some(parent)) => b3::span_id_value(parent),
            (None, None) => HeaderValue::from_static("0"),
        },
        4 => HeaderValue::from_static(if ctx.sampled { "1" } else { "0" }),
        5 => HeaderValue::from_static("1"),
        6 => w3c::traceparent_value(ctx),
        _ => ctx
            .tracestate
            .clone()
            .unwrap_or_else(|| HeaderValue::from_static("")),
    }
}

/// Whether `name` carries a value new with every request or trace: `x-request-id`,
/// `x-client-trace-id`, `b3`, `x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`,
/// `traceparent`.
pub fn is_per_request_id(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-request-id"
            | "x-client-trace-id"
            | "b3"
            | "x-b3-traceid"
            | "x-b3-spanid"
            | "x-b3-parentspanid"
            | "traceparent"
    )
}

/// Marks the per-request ids ([`is_per_request_id`]) so that HTTP/2's HPACK sends them
/// as literals never indexed (RFC 7541 §6.2.3) instead of adding them to the
/// connection's dynamic table. A value that never repeats would only evict the fields
/// that do (the peer metadata, the authority, the user agent), which then travel in
/// full again; both ends also skip the table updates. One pass over the names.
pub fn never_index_per_request_ids(headers: &mut HeaderMap) {
    for (name, value) in headers.iter_mut() {
        if is_per_request_id(name) {
            value.set_sensitive(true);
        }
    }
}

/// Returns the request's `x-request-id`, inserting a new UUID v4 when absent or empty.
pub fn ensure_request_id<R: Rng + ?Sized>(headers: &mut HeaderMap, rng: &mut R) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID).filter(|v| !v.is_empty()) {
        return v.clone();
    }
    let v = new_request_id(rng);
    headers.insert(REQUEST_ID.clone(), v.clone());
    v
}

/// A new UUID v4 from `rng`, as a header value.
pub fn new_request_id<R: Rng + ?Sized>(rng: &mut R) -> HeaderValue {
    let bytes: [u8; 16] = rng.random();
    let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let s = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Forwards the trace headers of an incoming request onto an outgoing one: the
/// application-side "interceptor" that keeps a trace connected across a service (see
/// [`forward`] for the same as a pair of layers).
///
/// Copies `x-request-id`, the `x-b3-*` headers, `b3`, `traceparent`, `tracestate` and
/// `x-ot-span-context` (the headers Istio asks applications to propagate).
///
/// ```
/// use http::Request;
/// let incoming = Request::builder()
///     .header("x-request-id", "abc")
///     .header("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124")
///     .header("x-b3-spanid", "a2fb4a1d1a96d312")
///     .header("x-b3-sampled", "1")
///     .body(())
///     .unwrap();
/// let mut outgoing = Request::builder().uri("http://ratings:9080/").body(()).unwrap();
/// mesh_telemetry::trace::forward_trace_headers(incoming.headers(), outgoing.headers_mut());
/// assert_eq!(outgoing.headers()["x-b3-spanid"], "a2fb4a1d1a96d312");
/// assert_eq!(outgoing.headers()["x-request-id"], "abc");
/// ```
pub fn forward_trace_headers(from: &HeaderMap, to: &mut HeaderMap) {
    static OT: HeaderName = HeaderName::from_static("x-ot-span-context");
    for name in [
        &REQUEST_ID,
        &b3::TRACE_ID,
        &b3::SPAN_ID,
        &b3::PARENT_SPAN_ID,
        &b3::SAMPLED,
        &b3::FLAGS,
        &b3::SINGLE,
        &w3c::TRACEPARENT,
        &w3c::TRACESTATE,
        &OT,
    ] {
        if let Some(v) = from.get(name) {
            to.insert(name.clone(), v.clone());
        }
    }
}

/// Hex digit values by byte: `0..=15` for `0-9a-f`, `16 | v` for `A-F`, `0xff` otherwise.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 0x10 | (10 + i as u8);
        i += 1;
    }
    t
};

/// Lanes (bytes) of `x` holding a value within `lo..=hi`, as `0x80` in that lane. Every
/// lane of `x` must be below `0x80` (no carries cross lanes).
const fn lanes_in(x: u64, lo: u8, hi: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let above_lo = x + ONES * (0x80 - lo as u64);
    let above_hi = x + ONES * (0x7f - hi as u64);
    above_lo & !above_hi & (ONES * 0x80)
}

/// Eight hex digits at once (SWAR): `(value, tags)` with the tags of [`HEX_VALUE`] ORed
/// (`0x10` set for an upper-case digit, `0xff` for a non-digit).
fn parse_hex_8(chunk: [u8; 8]) -> (u32, u8) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // The first digit is the most significant: big-endian lanes.
    let x = u64::from_be_bytes(chunk);
    if x & (ONES * 0x80) != 0 {
        return (0, 0xff);
    }
    let digit = lanes_in(x, b'0', b'9');
    let lower = lanes_in(x, b'a', b'f');
    let upper = lanes_in(x, b'A', b'F');
    if digit | lower | upper != ONES * 0x80 {
        return (0, 0xff);
    }
    // '0'..'9' → low nibble; 'a'..'f' and 'A'..'F' → low nibble + 9.
    let mut v = (x & (ONES * 0x0f)) + ((lower | upper) >> 7) * 9;
    v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
    v = (v | (v >> 16)) & 0x0000_0000_ffff_ffff;
    (v as u32, if upper != 0 { 0x10 } else { 0 })
}

/// Parses up to 16 hex digits; also says whether they were all lower-case (canonical).
pub(crate) fn parse_hex_u64_canonical(s: &[u8], upper_ok: bool) -> Option<(u64, bool)> {
    if let Ok(sixteen) = <[u8; 16]>::try_from(s) {
        // Ids are 16 or 32 digits: eight at a time.
        let (hi_chunk, lo_chunk) = sixteen.split_at(8);
        let (hi, t1) = parse_hex_8(hi_chunk.try_into().ok()?);
        let (lo, t2) = parse_hex_8(lo_chunk.try_into().ok()?);
        let value = (u64::from(hi) << 32) | u64::from(lo);
        return match t1 | t2 {
            0 => Some((value, true)),
            0x10 if upper_ok => Some((value, false)),
            _ => None,
        };
    }
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    let mut acc = 0u64;
    let mut tags = 0u8;
    for b in s {
        let v = HEX_VALUE[usize::from(*b)];
        tags |= v;
        acc = (acc << 4) | u64::from(v & 0xf);
    }
    match tags {
        0..=0xf => Some((acc, true)),
        0x10..=0x1f if upper_ok => Some((acc, false)),
        _ => None,
    }
}

/// Parses up to 16 hex digits.
pub(crate) fn parse_hex_u64(s: &[u8], upper_ok: bool) -> Option<u64> {
    parse_hex_u64_canonical(s, upper_ok).map(|(v, _)| v)
}

/// Parses exactly 32 hex digits.
pub(crate) fn parse_hex_u128(s: &[u8], upper_ok: bool) -> Option<u128> {
    if s.len() != 32 {
        return None;
    }
    let hi = parse_hex_u64(&s[..16], upper_ok)?;
    let lo = parse_hex_u64(&s[16..], upper_ok)?;
    Some((u128::from(hi) << 64) | u128::from(lo))
}

/// Writes `v` as 16 lower-hex digits, two digits per table lookup.
pub(crate) fn write_hex_u64(v: u64, buf: &mut [u8; 16]) {
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        t
    };
    for (pair, byte) in buf.chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[usize::from(byte)]);
    }
}

/// Writes `v` as 32 lower-hex digits.
pub(crate) fn write_hex(v: u128, buf: &mut [u8; 32]) {
    let (hi, lo) = buf.split_at_mut(16);
    if let (Ok(hi), Ok(lo)) = (<&mut [u8; 16]>::try_from(hi), <&mut [u8; 16]>::try_from(lo)) {
        write_hex_u64((v >> 64) as u64, hi);
        write_hex_u64(v as u64, lo);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn per_request_ids_are_marked_never_indexed_and_nothing_else() {
        let ids = [
            "x-request-id",
            "x-client-trace-id",
            "b3",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "traceparent",
        ];
        let others = [
            "x-b3-sampled",
            "tracestate",
            "x-envoy-peer-metadata",
            "user-agent",
        ];
        let mut h = HeaderMap::new();
        for name in ids.iter().chain(&others) {
            h.append(*name, HeaderValue::from_static("v"));
        }
        never_index_per_request_ids(&mut h);
        let marked: Vec<&str> = h
            .iter()
            .filter(|(_, v)| v.is_sensitive())
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(marked, ids);
    }
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn b3_multi_hop_keeps_trace_and_parents_the_incoming_span() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]);
        let p = Propagator {
            sampler: Sampler::percent(0.0),
            formats: Formats {
                b3_multi: true,
                b3_single: false,
                w3c: false,
            },
        };
        let ctx = p.propagate(&mut h, &mut rng);
        assert!(ctx.sampled, "incoming accept wins over 0 % sampling");
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_ne!(h["x-b3-spanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-spanid"].len(), 16);
        assert_eq!(
            u64::from_str_radix(h["x-b3-spanid"].to_str().unwrap(), 16).unwrap(),
            ctx.span_id
        );
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(h.get("traceparent").is_none());
    }

    #[test]
    fn b3_64_bit_trace_ids_stay_64_bit() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut h = headers(&[
            ("x-b3-traceid", "48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]);
        let ctx = Propagator::default().propagate(&mut h, &mut rng);
        assert!(ctx.trace_id_64);
        assert_eq!(h["x-b3-traceid"], "48485a3953bb6124");
        // W3C needs 32 digits: the 64-bit id is left-padded.
        assert_eq!(
            &h["traceparent"].to_str().unwrap()[..35],
            "00-000000000000000048485a3953bb6124"
        );
    }

    #[test]
    fn upper_case_b3_ids_are_forwarded_in_lower_case() {
        let mut rng = SmallRng::seed_from_u64(12);
        let mut h = headers(&[
            ("x-b3-traceid", "463AC35C9F6413AD48485A3953BB6124"),
            ("x-b3-spanid", "A2FB4A1D1A96D312"),
        ]);
        Propagator::default().propagate(&mut h, &mut rng);
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
    }

    #[test]
    fn b3_single_is_preferred_and_answered_in_kind() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut h = headers(&[
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d"),
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]);
        let ctx = Propagator::default().propagate(&mut h, &mut rng);
        assert!(ctx.debug && ctx.sampled);
        let b3 = h["b3"].to_str().unwrap().to_owned();
        let parts: Vec<&str> = b3.split('-').collect();
        assert_eq!(parts[0], "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(parts[2], "d");
        assert_eq!(parts[3], "e457b5a2e4d86bd1");
        assert_eq!(h["x-b3-flags"], "1");
        assert!(
            h.get("x-b3-sampled").is_none(),
            "debug is not sent with sampled"
        );
    }

    #[test]
    fn w3c_hop_keeps_tracestate_and_sets_new_parent_id() {
        let mut rng = SmallRng::seed_from_u64(4);
        let mut h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let ctx = Propagator::with_sampling(100.0).propagate(&mut h, &mut rng);
        assert!(!ctx.sampled, "incoming not-sampled flag wins over 100 %");
        let tp = h["traceparent"].to_str().unwrap();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(tp.ends_with("-00"));
        assert_eq!(&tp[36..52], format!("{:016x}", ctx.span_id));
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(h["x-b3-parentspanid"], "00f067aa0ba902b7");
    }

    #[test]
    fn invalid_context_starts_a_new_trace() {
        let mut rng = SmallRng::seed_from_u64(5);
        let mut h = headers(&[
            (
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ),
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb612"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]);
        let ctx = Propagator::with_sampling(0.0).propagate(&mut h, &mut rng);
        assert_eq!(ctx.parent_span_id, None);
        assert!(
            !ctx.trace_id_64 && ctx.trace_id >> 64 != 0,
            "new 128-bit id"
        );
        assert!(!ctx.sampled);
        assert!(h.get("x-b3-parentspanid").is_none());
        assert_eq!(h["x-b3-traceid"].len(), 32);
    }

    #[test]
    fn stale_incoming_headers_do_not_survive_the_hop() {
        let mut rng = SmallRng::seed_from_u64(10);
        let mut h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-b3-traceid", "bad"),
            ("x-b3-flags", "1"),
            ("b3", "not-valid"),
            ("x-client-trace-id", "keep"),
        ]);
        let p = Propagator {
            sampler: Sampler::percent(0.0),
            formats: Formats {
                b3_multi: true,
                b3_single: false,
                w3c: true,
            },
        };
        let ctx = p.propagate(&mut h, &mut rng);
        assert!(!ctx.debug && ctx.sampled);
        assert!(
            h.get("x-b3-flags").is_none(),
            "the debug flag came with an ignored context"
        );
        assert!(h.get("b3").is_none());
        assert_eq!(h["x-b3-traceid"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(h["x-b3-sampled"], "1");
        assert_eq!(h["x-client-trace-id"], "keep");
        assert!(h.get("tracestate").is_none());
    }

    #[test]
    fn decision_only_headers_are_honoured() {
        let mut rng = SmallRng::seed_from_u64(6);
        let mut h = headers(&[("b3", "0")]);
        let ctx = Propagator::with_sampling(100.0).propagate(&mut h, &mut rng);
        assert!(!ctx.sampled && ctx.parent_span_id.is_none());
        assert_eq!(h["x-b3-sampled"], "0");
        let mut h = headers(&[("x-b3-sampled", "1")]);
        assert!(
            Propagator::with_sampling(0.0)
                .propagate(&mut h, &mut rng)
                .sampled
        );
    }

    #[test]
    fn client_trace_id_forces_sampling_but_not_over_a_decision() {
        let mut rng = SmallRng::seed_from_u64(9);
        let p = Propagator::with_sampling(0.0);
        let mut h = headers(&[("x-client-trace-id", "abc")]);
        assert!(p.propagate(&mut h, &mut rng).sampled);
        let mut h = headers(&[("x-client-trace-id", "abc"), ("x-b3-sampled", "0")]);
        assert!(!p.propagate(&mut h, &mut rng).sampled);
    }

    #[test]
    fn sampler_bounds_and_precision() {
        assert_eq!(Sampler::default().as_percent(), 1.0);
        assert_eq!(Sampler::percent(150.0).as_percent(), 1.0);
        assert_eq!(Sampler::percent(-1.0).as_percent(), 1.0);
        assert_eq!(Sampler::percent(f64::NAN).as_percent(), 1.0);
        assert_eq!(Sampler::percent(0.01).as_percent(), 0.01);
        let mut rng = SmallRng::seed_from_u64(7);
        assert!((0..10_000).all(|_| Sampler::percent(100.0).sample(&mut rng)));
        assert!((0..10_000).all(|_| !Sampler::percent(0.0).sample(&mut rng)));
    }

    /// The sampled count k of n Bernoulli(p) trials passes a one-degree-of-freedom
    /// chi-square test, (k − np)² / (np(1 − p)) ≤ 20.25 (|z| ≤ 4.5: a correct sampler fails
    /// it with probability < 1e-5), at fixed seeds.
    #[test]
    fn sampling_percentages_within_statistical_bound() {
        let n = 100_000u32;
        for (pct, seed) in [(1.0, 11u64), (10.0, 12), (50.0, 13), (0.25, 14)] {
            let mut rng = SmallRng::seed_from_u64(seed);
            let p = Propagator::with_sampling(pct);
            let mut sampled = 0u32;
            for _ in 0..n {
                let mut h = HeaderMap::new();
                sampled += u32::from(p.propagate(&mut h, &mut rng).sampled);
            }
            let prob = pct / 100.0;
            let mean = f64::from(n) * prob;
            let sd = (f64::from(n) * prob * (1.0 - prob)).sqrt();
            assert!(
                (f64::from(sampled) - mean).abs() <= 4.5 * sd,
                "{pct} %: {sampled} sampled of {n}, expected {mean} ± {}",
                4.5 * sd
            );
        }
    }

    fn append_all(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// In-place rewriting (one value per trace header) and the insert path (repeated
    /// headers) both leave exactly what removing every trace header and injecting the
    /// hop's context in the effective formats leaves.
    #[test]
    fn propagation_equals_clear_then_inject() {
        let all = Formats {
            b3_multi: true,
            b3_single: true,
            w3c: true,
        };
        let b3_only = Formats {
            b3_multi: true,
            b3_single: false,
            w3c: false,
        };
        let b3_and_w3c = Formats::default();
        #[allow(clippy::type_complexity)]
        let cases: &[(Formats, &[(&'static str, &'static str)], Formats)] = &[
            (
                Formats::default(),
                &[
                    ("host", "reviews:9080"),
                    ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
                    ("x-b3-spanid", "a2fb4a1d1a96d312"),
                    ("x-b3-parentspanid", "0020000000000001"),
                    ("x-b3-sampled", "1"),
                    ("user-agent", "curl/8.5.0"),
                ],
                b3_and_w3c,
            ),
            (
                Formats::default(),
                &[
                    ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
                    ("x-b3-traceid", "0000000000000000000000000000000a"),
                    ("x-b3-spanid", "A2FB4A1D1A96D312"),
                    ("x-b3-sampled", "0"),
                    ("x-b3-sampled", "1"),
                ],
                b3_and_w3c,
            ),
            (
                b3_only,
                &[
                    ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d"),
                    ("x-b3-flags", "1"),
                    ("x-b3-sampled", "1"),
                    (
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    ),
                    ("tracestate", "congo=t61rcWkgMzE"),
                    ("x-client-trace-id", "keep"),
                ],
                Formats {
                    b3_multi: true,
                    b3_single: true,
                    w3c: false,
                },
            ),
            (
                b3_only,
                &[
                    (
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                    ),
                    ("tracestate", "congo=t61rcWkgMzE"),
                    ("x-b3-parentspanid", "stale"),
                ],
                b3_and_w3c,
            ),
            (
                all,
                &[
                    ("x-b3-traceid", "48485a3953bb6124"),
                    ("x-b3-spanid", "a2fb4a1d1a96d312"),
                    ("x-b3-flags", "1"),
                    ("tracestate", "orphan=1"),
                ],
                all,
            ),
            (
                b3_only,
                &[("x-b3-traceid", "bad"), ("b3", "0"), ("host", "x")],
                Formats {
                    b3_multi: true,
                    b3_single: true,
                    w3c: false,
                },
            ),
            (Formats::default(), &[], b3_and_w3c),
        ];
        let mut names: Vec<HeaderName> = scanned_names().into_iter().cloned().collect();
        names.extend([HeaderName::from_static("host"), http::header::USER_AGENT]);
        for (seed, (formats, pairs, effective)) in cases.iter().enumerate() {
            let p = Propagator {
                sampler: Sampler::percent(50.0),
                formats: *formats,
            };
            let mut rewritten = append_all(pairs);
            let mut rng = SmallRng::seed_from_u64(seed as u64);
            let ctx = p.propagate(&mut rewritten, &mut rng);
            let mut expected = append_all(pairs);
            clear(&mut expected);
            inject(&ctx, *effective, &mut expected);
            assert_eq!(
                rewritten.len(),
                expected.len(),
                "case {seed}: {rewritten:?}"
            );
            for name in &names {
                let got: Vec<_> = rewritten.get_all(name).iter().collect();
                let want: Vec<_> = expected.get_all(name).iter().collect();
                assert_eq!(got, want, "case {seed}, {name}");
            }
        }
    }

    #[test]
    fn hex_writing_matches_the_formatter() {
        for v in [0u64, 1, 0xa2fb4a1d1a96d312, u64::MAX, 0x0020000000000001] {
            let mut buf = [0u8; 16];
            write_hex_u64(v, &mut buf);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), format!("{v:016x}"));
        }
        let v = 0x463ac35c9f6413ad48485a3953bb6124u128;
        let mut buf = [0u8; 32];
        write_hex(v, &mut buf);
        assert_eq!(std::str::from_utf8(&buf).unwrap(), format!("{v:032x}"));
    }

    #[test]
    fn hex_parsing_accepts_exactly_hex_digits() {
        assert_eq!(
            parse_hex_u64_canonical(b"a2fb4a1d1a96d312", false),
            Some((0xa2fb4a1d1a96d312, true))
        );
        assert_eq!(
            parse_hex_u64_canonical(b"A2FB4a1d1a96d312", true),
            Some((0xa2fb4a1d1a96d312, false))
        );
        assert_eq!(parse_hex_u64(b"A2FB4a1d1a96d312", false), None);
        assert_eq!(
            parse_hex_u64(b"0123456789abcdef", false),
            Some(0x0123456789abcdef)
        );
        assert_eq!(parse_hex_u64(b"f", false), Some(0xf));
        for bad in [
            &b""[..],
            b"0123456789abcdef0",
            b"12g4",
            b"12-4",
            b"12 4",
            b"\xff1",
        ] {
            assert_eq!(parse_hex_u64(bad, true), None, "{bad:?}");
        }
        // Every byte: exactly 0-9, a-f (and A-F when allowed) are digits.
        for b in 0..=255u8 {
            let lower = b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            let upper = (b'A'..=b'F').contains(&b);
            assert_eq!(parse_hex_u64(&[b], false).is_some(), lower, "{b}");
            assert_eq!(parse_hex_u64(&[b], true).is_some(), lower || upper, "{b}");
        }
        // The 16-digit (SWAR) path against the byte-at-a-time one: every byte at every
        // position.
        let base = *b"0123456789abcdef";
        for pos in 0..16 {
            for b in 0..=255u8 {
                let mut s = base;
                s[pos] = b;
                for upper_ok in [false, true] {
                    let bytewise = (|| {
                        let mut acc = 0u64;
                        let mut canonical = true;
                        for c in s {
                            let v = char::from(c).to_digit(16)?;
                            if c.is_ascii_uppercase() {
                                if !upper_ok {
                                    return None;
                                }
                                canonical = false;
                            }
                            acc = (acc << 4) | u64::from(v);
                        }
                        Some((acc, canonical))
                    })();
                    assert_eq!(
                        parse_hex_u64_canonical(&s, upper_ok),
                        bytewise,
                        "{s:?} {upper_ok}"
                    );
                }
            }
        }
        assert_eq!(
            parse_hex_u128(b"463ac35c9f6413ad48485a3953bb6124", false),
            Some(0x463ac35c9f6413ad48485a3953bb6124)
        );
    }

    #[test]
    fn request_id_is_generated_only_when_absent() {
        let mut rng = SmallRng::seed_from_u64(8);
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h, &mut rng);
        let parsed = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
        assert_eq!(h["x-request-id"], id);
        let mut h = headers(&[("x-request-id", "keep-me")]);
        assert_eq!(ensure_request_id(&mut h, &mut rng), "keep-me");
    }
}
