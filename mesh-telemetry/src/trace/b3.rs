//! Zipkin B3 propagation: the multi-header form (`x-b3-traceid`, `x-b3-spanid`,
//! `x-b3-parentspanid`, `x-b3-sampled`, `x-b3-flags`) and the single `b3` header
//! (ISTIO.md TR-02, TR-03).
//!
//! Readers are lenient where the B3 specification allows (`true`/`false` sampling values,
//! upper-case hex); anything malformed (wrong lengths, non-hex, all-zero ids) yields no
//! context, so the hop starts a new trace.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Incoming, Lookup, parse_hex_u64_canonical, write_hex, write_hex_u64};

/// `x-b3-traceid`.
pub static TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// `x-b3-spanid`.
pub static SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// `x-b3-parentspanid`.
pub static PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// `x-b3-sampled`.
pub static SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// `x-b3-flags`.
pub static FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
/// `b3` (single header).
pub static SINGLE: HeaderName = HeaderName::from_static("b3");

/// A B3 trace id (16 or 32 hex digits, not zero): `(id, is 64-bit, was lower-case)`.
fn trace_id(s: &[u8]) -> Option<(u128, bool, bool)> {
    let (id, canonical) = match s.len() {
        16 => parse_hex_u64_canonical(s, true).map(|(v, c)| (u128::from(v), c))?,
        32 => {
            let (hi, c1) = parse_hex_u64_canonical(&s[..16], true)?;
            let (lo, c2) = parse_hex_u64_canonical(&s[16..], true)?;
            ((u128::from(hi) << 64) | u128::from(lo), c1 && c2)
        }
        _ => return None,
    };
    (id != 0).then_some((id, s.len() == 16, canonical))
}

/// A B3 span id (16 hex digits, not zero): `(id, was lower-case)`.
fn span_id(s: &[u8]) -> Option<(u64, bool)> {
    if s.len() != 16 {
        return None;
    }
    parse_hex_u64_canonical(s, true).filter(|(id, _)| *id != 0)
}

/// Extracts the multi-header form; `None` when no `x-b3-*` header is present.
pub fn extract_multi<L: Lookup + ?Sized>(headers: &L) -> Option<Incoming> {
    let sampled = headers.value(&SAMPLED).map(|v| match v.as_bytes() {
        b"1" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    });
    let debug = headers.value(&FLAGS).is_some_and(|v| v.as_bytes() == b"1");
    let tid = headers.value(&TRACE_ID);
    let sid = headers.value(&SPAN_ID);
    if tid.is_none() && sid.is_none() && sampled.is_none() && !debug {
        return None;
    }
    let mut b3_values = None;
    let ids = match (tid, sid) {
        (Some(t), Some(s)) => match (trace_id(t.as_bytes()), span_id(s.as_bytes())) {
            (Some((t_id, short, t_canonical)), Some((s_id, s_canonical))) => {
                if t_canonical && s_canonical {
                    b3_values = Some((t.clone(), s.clone()));
                }
                Some((t_id, short, s_id))
            }
            _ => None,
        },
        _ => None,
    };
    let sampled = sampled.flatten();
    Some(Incoming {
        ids,
        sampled: if debug { Some(true) } else { sampled },
        debug,
        tracestate: None,
        b3_values,
    })
}

/// Extracts the single `b3` header; `None` when absent or malformed.
pub fn extract_single<L: Lookup + ?Sized>(headers: &L) -> Option<Incoming> {
    let v = headers.value(&SINGLE)?.as_bytes();
    let state = |s: &[u8]| match s {
        b"1" => Some((Some(true), false)),
        b"0" => Some((Some(false), false)),
        b"d" => Some((Some(true), true)),
        _ => None,
    };
    let mut parts = v.split(|b| *b == b'-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        // Only a sampling decision: `b3: 0`, `b3: 1`, `b3: d`.
        let (sampled, debug) = state(first)?;
        return Some(Incoming {
            ids: None,
            sampled,
            debug,
            tracestate: None,
            b3_values: None,
        });
    };
    let (t, short, _) = trace_id(first)?;
    let (s, _) = span_id(second)?;
    let (sampled, debug) = match parts.next() {
        Some(st) => state(st)?,
        None => (None, false),
    };
    if let Some(parent) = parts.next() {
        span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        ids: Some((t, short, s)),
        sampled,
        debug,
        tracestate: None,
        b3_values: None,
    })
}

fn value(bytes: &[u8]) -> HeaderValue {
    // Hex digits and '-' are always valid header bytes.
    HeaderValue::from_bytes(bytes).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The trace id of `ctx` in B3 form: `(digits, length)`, 16 or 32 lower-hex digits.
pub(crate) fn trace_id_bytes(ctx: &super::HopContext) -> ([u8; 32], usize) {
    let mut buf = [0u8; 32];
    write_hex(ctx.trace_id, &mut buf);
    if ctx.trace_id_64 {
        buf.copy_within(16.., 0);
        (buf, 16)
    } else {
        (buf, 32)
    }
}

/// The `x-b3-traceid` value of `ctx`: the incoming value when it is reused.
pub(crate) fn trace_id_value(ctx: &super::HopContext) -> HeaderValue {
    match &ctx.b3_values {
        Some((trace, _)) => trace.clone(),
        None => {
            let (buf, n) = trace_id_bytes(ctx);
            value(&buf[..n])
        }
    }
}

/// A span id as an `x-b3-spanid`/`x-b3-parentspanid` value.
pub(crate) fn span_id_value(id: u64) -> HeaderValue {
    let mut buf = [0u8; 16];
    write_hex_u64(id, &mut buf);
    value(&buf)
}

/// The `x-b3-traceid`, `x-b3-spanid` and `x-b3-parentspanid` values of `ctx`.
fn multi_values(ctx: &super::HopContext) -> (HeaderValue, HeaderValue, Option<HeaderValue>) {
    let trace = trace_id_value(ctx);
    let span = span_id_value(ctx.span_id);
    let parent = match &ctx.b3_values {
        // Same trace, and the incoming span is our parent: reuse the incoming value.
        Some((_, parent)) => Some(parent.clone()),
        None => ctx.parent_span_id.map(span_id_value),
    };
    (trace, span, parent)
}

/// Writes the multi-header form of `ctx`.
pub fn inject_multi(ctx: &super::HopContext, headers: &mut HeaderMap) {
    let (trace, span, parent) = multi_values(ctx);
    headers.insert(TRACE_ID.clone(), trace);
    if let Some(parent) = parent {
        headers.insert(PARENT_SPAN_ID.clone(), parent);
    }
    headers.insert(SPAN_ID.clone(), span);
    if ctx.debug {
        // Debug implies accept; B3 says not to also send x-b3-sampled.
        headers.insert(FLAGS.clone(), HeaderValue::from_static("1"));
    } else {
        headers.insert(
            SAMPLED.clone(),
            HeaderValue::from_static(if ctx.sampled { "1" } else { "0" }),
        );
    }
}

/// The longest single `b3` header: 128-bit trace id, span id, state, parent span id.
pub(crate) const SINGLE_MAX: usize = 32 + 1 + 16 + 2 + 1 + 16;

/// The single `b3` header of `ctx`: `(bytes, length)`.
pub(crate) fn single_bytes(ctx: &super::HopContext) -> ([u8; SINGLE_MAX], usize) {
    let mut out = [0u8; SINGLE_MAX];
    let (t, mut n) = trace_id_bytes(ctx);
    out[..n].copy_from_slice(&t[..n]);
    out[n] = b'-';
    n += 1;
    let mut id = [0u8; 16];
    write_hex_u64(ctx.span_id, &mut id);
    out[n..n + 16].copy_from_slice(&id);
    n += 16;
    out[n] = b'-';
    out[n + 1] = if ctx.debug {
        b'd'
    } else if ctx.sampled {
        b'1'
    } else {
        b'0'
    };
    n += 2;
    if let Some(parent) = ctx.parent_span_id {
        out[n] = b'-';
        n += 1;
        write_hex_u64(parent, &mut id);
        out[n..n + 16].copy_from_slice(&id);
        n += 16;
    }
    (out, n)
}

/// The single `b3` header value of `ctx`.
pub(crate) fn single_value(ctx: &super::HopContext) -> HeaderValue {
    let (out, n) = single_bytes(ctx);
    value(&out[..n])
}

/// Writes the single `b3` header of `ctx`.
pub fn inject_single(ctx: &super::HopContext, headers: &mut HeaderMap) {
    headers.insert(SINGLE.clone(), single_value(ctx));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn multi_reads_128_and_64_bit_ids() {
        let h = map(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-parentspanid", "0020000000000001"),
            ("x-b3-sampled", "1"),
        ]);
        let i = extract_multi(&h).unwrap();
        assert_eq!(
            i.ids,
            Some((
                0x463ac35c9f6413ad48485a3953bb6124,
                false,
                0xa2fb4a1d1a96d312
            ))
        );
        assert_eq!(i.sampled, Some(true));
        let h = map(&[
            ("x-b3-traceid", "48485A3953BB6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "false"),
        ]);
        let i = extract_multi(&h).unwrap();
        assert_eq!(i.ids, Some((0x48485a3953bb6124, true, 0xa2fb4a1d1a96d312)));
        assert_eq!(i.sampled, Some(false));
    }

    #[test]
    fn multi_first_value_wins_and_flags_mean_debug() {
        let h = map(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-traceid", "0000000000000000000000000000000a"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]);
        let i = extract_multi(&h).unwrap();
        assert_eq!(i.ids.unwrap().0, 0x463ac35c9f6413ad48485a3953bb6124);
        assert!(i.debug);
        assert_eq!(i.sampled, Some(true));
    }

    #[test]
    fn malformed_multi_ids_are_ignored() {
        for (t, s) in [
            ("00000000000000000000000000000000", "a2fb4a1d1a96d312"),
            ("463ac35c9f6413ad48485a3953bb612", "a2fb4a1d1a96d312"),
            ("463ac35c9f6413ad48485a3953bb6124", "0000000000000000"),
            ("463ac35c9f6413ad48485a3953bb6124", "a2fb4a1d1a96d31"),
            ("463ac35c9f6413ad48485a3953bb612g", "a2fb4a1d1a96d312"),
        ] {
            let i = extract_multi(&map(&[("x-b3-traceid", t), ("x-b3-spanid", s)])).unwrap();
            assert_eq!(i.ids, None, "{t} {s}");
        }
        assert!(extract_multi(&HeaderMap::new()).is_none());
    }

    #[test]
    fn single_header_forms() {
        let i = extract_single(&map(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]))
        .unwrap();
        assert_eq!(
            i.ids,
            Some((
                0x80f198ee56343ba864fe8b2a57d3eff7,
                false,
                0xe457b5a2e4d86bd1
            ))
        );
        assert_eq!(i.sampled, Some(true));
        let i = extract_single(&map(&[("b3", "e457b5a2e4d86bd1-e457b5a2e4d86bd1-d")])).unwrap();
        assert!(i.debug && i.ids.unwrap().1);
        let i = extract_single(&map(&[("b3", "0")])).unwrap();
        assert_eq!((i.ids, i.sampled), (None, Some(false)));
        let i = extract_single(&map(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1",
        )]))
        .unwrap();
        assert_eq!(i.sampled, None);
        for bad in [
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-x",
            "80f198ee56343ba864fe8b2a57d3eff7",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-extra",
            "80f198ee56343ba864fe8b2a57d3eff7-0000000000000000-1",
            "2",
        ] {
            assert!(extract_single(&map(&[("b3", bad)])).is_none(), "{bad}");
        }
    }
}
