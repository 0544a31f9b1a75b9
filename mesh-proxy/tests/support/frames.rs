//! Raw HTTP/2 frames (RFC 9113 §3.4, §4.1, §6) for tests that speak the protocol byte by
//! byte.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The client connection preface (§3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types.
pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const PRIORITY: u8 = 2;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

/// Flags.
pub const END_STREAM: u8 = 1;
pub const ACK: u8 = 1;
pub const END_HEADERS: u8 = 4;
pub const PADDED: u8 = 8;
/// The HEADERS flag for a priority block (not the PRIORITY frame type).
pub const PRIORITY_FLAG: u8 = 0x20;

/// One frame: the 9-octet header, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Writes one frame; a write error is left to the reads that follow to see.
pub async fn write_frame(
    io: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) {
    let _ = io.write_all(&frame(kind, flags, stream, payload)).await;
}

/// Reads one frame: (type, flags, stream, payload); `None` at the end of input.
pub async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// The header block fragment of a HEADERS frame's payload: without its padding and
/// priority fields (§6.2); `None` when the payload is shorter than they say.
pub fn header_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let (pad, rest) = if flags & PADDED != 0 {
        let (&n, rest) = payload.split_first()?;
        (usize::from(n), rest)
    } else {
        (0, payload)
    };
    let rest = if flags & PRIORITY_FLAG != 0 {
        rest.get(5..)?
    } else {
        rest
    };
    rest.get(..rest.len().checked_sub(pad)?)
}
