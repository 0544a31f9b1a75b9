//! W3C Trace Context: `traceparent` and `tracestate` (ISTIO.md TR-05).
//!
//! `traceparent: 00-<32 lower-hex trace id>-<16 lower-hex parent id>-<2 hex flags>`. An
//! all-zero trace or parent id, version `ff`, wrong lengths or upper-case hex make the
//! header invalid: the hop starts a new trace. Later versions are read by their version-00
//! prefix, as the specification asks. Flag bit `0x01` is the sampling decision;
//! `tracestate` is propagated unchanged.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::{Incoming, Lookup, parse_hex_u64, parse_hex_u128, write_hex, write_hex_u64};

/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Extracts `traceparent` (and `tracestate`); `None` when absent or invalid.
pub fn extract<L: Lookup + ?Sized>(headers: &L) -> Option<Incoming> {
    let v = headers.value(&TRACEPARENT)?.as_bytes();
    if v.len() < 55 {
        return None;
    }
    let version = parse_hex_u64(&v[0..2], false)?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = parse_hex_u128(&v[3..35], false).filter(|t| *t != 0)?;
    let parent = parse_hex_u64(&v[36..52], false).filter(|s| *s != 0)?;
    let flags = parse_hex_u64(&v[53..55], false)?;
    Some(Incoming {
        ids: Some((trace_id, false, parent)),
        sampled: Some(flags & 1 == 1),
        debug: false,
        tracestate: headers.value(&TRACESTATE).cloned(),
        b3_values: None,
    })
}

/// The `traceparent` value of `ctx`.
pub(crate) fn traceparent_value(ctx: &super::HopContext) -> HeaderValue {
    // Hex digits and '-' are always valid header bytes.
    HeaderValue::from_bytes(&traceparent_bytes(ctx))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The `traceparent` of `ctx`.
pub(crate) fn traceparent_bytes(ctx: &super::HopContext) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let mut buf = [0u8; 32];
    write_hex(ctx.trace_id, &mut buf);
    out[3..35].copy_from_slice(&buf);
    let mut id = [0u8; 16];
    write_hex_u64(ctx.span_id, &mut id);
    out[36..52].copy_from_slice(&id);
    if ctx.sampled {
        out[54] = b'1';
    }
    out
}

/// Writes `traceparent` (and the incoming `tracestate`, unchanged) for `ctx`.
pub fn inject(ctx: &super::HopContext, headers: &mut HeaderMap) {
    headers.insert(TRACEPARENT.clone(), traceparent_value(ctx));
    if let Some(ts) = &ctx.tracestate {
        headers.insert(TRACESTATE.clone(), ts.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn reads_the_specification_example() {
        let mut h = tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        h.insert(&TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        let i = extract(&h).unwrap();
        assert_eq!(
            i.ids,
            Some((
                0x4bf92f3577b34da6a3ce929d0e0e4736,
                false,
                0x00f067aa0ba902b7
            ))
        );
        assert_eq!(i.sampled, Some(true));
        assert_eq!(i.tracestate.unwrap(), "congo=t61rcWkgMzE");
        let i = extract(&tp(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ))
        .unwrap();
        assert_eq!(i.sampled, Some(false));
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(extract(&tp(bad)).is_none(), "{bad}");
        }
    }

    #[test]
    fn future_versions_are_read_by_their_prefix() {
        let i = extract(&tp(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what",
        ))
        .unwrap();
        assert_eq!(i.ids.unwrap().2, 0x00f067aa0ba902b7);
    }
}
