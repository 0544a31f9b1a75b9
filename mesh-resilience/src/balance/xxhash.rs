//! XXH64, the 64-bit xxHash, which Envoy uses for every consistent-hash key and for the
//! positions of endpoints on the ring and in the Maglev table. Using the same function
//! puts a key on the same endpoint as Envoy does for the same endpoint set.
//!
//! Written from the algorithm's public specification; streaming, so that several header
//! values hash as their concatenation without being copied together.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// The XXH64 of `data` with `seed`.
pub(crate) fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut h = Xxh64::new(seed);
    h.write(data);
    h.finish()
}

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, lane: u64) -> u64 {
    (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
}

fn read_u64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

fn read_u32(b: &[u8]) -> u64 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u64::from(u32::from_le_bytes(w))
}

/// An XXH64 state fed piece by piece; the result is that of the concatenated input.
#[derive(Clone, Debug)]
pub(crate) struct Xxh64 {
    seed: u64,
    lanes: [u64; 4],
    /// Bytes not yet consumed as a 32-byte stripe.
    buf: [u8; 32],
    buffered: usize,
    total: u64,
}

impl Xxh64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            seed,
            lanes: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            buf: [0; 32],
            buffered: 0,
            total: 0,
        }
    }

    fn stripe(lanes: &mut [u64; 4], stripe: &[u8]) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            *lane = round(*lane, read_u64(&stripe[i * 8..]));
        }
    }

    pub(crate) fn write(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        if self.buffered > 0 {
            let take = data.len().min(32 - self.buffered);
            self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < 32 {
                return;
            }
            let buf = self.buf;
            Self::stripe(&mut self.lanes, &buf);
            self.buffered = 0;
        }
        let mut stripes = data.chunks_exact(32);
        for s in &mut stripes {
            Self::stripe(&mut self.lanes, s);
        }
        let rest = stripes.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    pub(crate) fn finish(&self) -> u64 {
        let [v1, v2, v3, v4] = self.lanes;
        let mut acc = if self.total >= 32 {
            let mut acc = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            for v in [v1, v2, v3, v4] {
                acc = merge(acc, v);
            }
            acc
        } else {
            self.seed.wrapping_add(P5)
        };
        acc = acc.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buffered];
        while rest.len() >= 8 {
            acc ^= round(0, read_u64(rest));
            acc = acc.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            acc ^= read_u32(rest).wrapping_mul(P1);
            acc = acc.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            acc ^= u64::from(b).wrapping_mul(P5);
            acc = acc.rotate_left(11).wrapping_mul(P1);
        }
        acc ^= acc >> 33;
        acc = acc.wrapping_mul(P2);
        acc ^= acc >> 29;
        acc = acc.wrapping_mul(P3);
        acc ^ (acc >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values of the xxHash library (`XXH64(data, len, seed)`).
    const VECTORS: &[(&[u8], u64, u64)] = &[
        (b"", 0, 0xef46_db37_51d8_e999),
        (b"a", 0, 0xd24e_c4f1_a98c_6e5b),
        (b"abc", 0, 0x44bc_2cf5_ad77_0999),
        (
            b"Nobody inspects the spammish repetition",
            0,
            0xfbce_a83c_8a37_8bf1,
        ),
        (b"10.0.0.1:80_0", 0, 0x7504_1381_e737_1a08),
        (b"10.0.0.1:80", 1, 0xa456_919b_cbff_aa92),
        (
            b"0123456789abcdef0123456789abcdef0123456789",
            7,
            0x9cdb_6129_259b_938e,
        ),
    ];

    #[test]
    fn matches_the_reference_library() {
        for &(data, seed, want) in VECTORS {
            assert_eq!(
                xxh64(data, seed),
                want,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn streaming_in_any_pieces_equals_one_shot() {
        let data: Vec<u8> = (0..200u8).map(|i| i.wrapping_mul(37)).collect();
        for len in [0, 1, 5, 31, 32, 33, 64, 95, 200] {
            let whole = xxh64(&data[..len], 3);
            for cut in [1, 3, 8, 17, 32, 40] {
                let mut h = Xxh64::new(3);
                for piece in data[..len].chunks(cut) {
                    h.write(piece);
                }
                assert_eq!(h.finish(), whole, "len {len} in pieces of {cut}");
            }
        }
    }
}
