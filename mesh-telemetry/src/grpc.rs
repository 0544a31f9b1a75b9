//! gRPC message counting: the length-prefixed framing of gRPC over HTTP/2 (one flag
//! byte, a four-byte big-endian length, the message), followed across data frames of
//! any size without buffering.

use bytes::Buf;

/// Counts the gRPC messages of one direction of a stream.
///
/// A message is counted when its five-byte prefix is complete, so a stream cut inside a
/// message still counts the messages that began.
#[derive(Clone, Copy, Debug, Default)]
pub struct MessageCounter {
    /// Prefix bytes seen of the current message (0 while inside a message body).
    prefix: u8,
    /// The length read so far from the prefix.
    length: u32,
    /// Bytes of the current message still to skip.
    skip: u64,
    /// Messages begun.
    count: u64,
}

impl MessageCounter {
    /// Messages begun so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Follows the framing through `data` (every chunk of a possibly non-contiguous
    /// buffer; nothing is consumed).
    pub fn observe(&mut self, data: &impl Buf) {
        let mut slices = [std::io::IoSlice::new(&[]); 8];
        let n = data.chunks_vectored(&mut slices);
        let seen: usize = slices[..n].iter().map(|s| s.len()).sum();
        for s in &slices[..n] {
            self.bytes(s);
        }
        // Chunks past what one call hands out are payload or prefix alike: a prefix
        // split there is rare enough to be skipped as payload (counted approximately).
        let rest = data.remaining().saturating_sub(seen) as u64;
        self.skip = self.skip.saturating_sub(rest);
    }

    fn bytes(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let take = self.skip.min(data.len() as u64);
                self.skip -= take;
                data = &data[take as usize..];
                continue;
            }
            let b = data[0];
            data = &data[1..];
            if self.prefix > 0 {
                self.length = (self.length << 8) | u32::from(b);
            }
            self.prefix += 1;
            if self.prefix == 5 {
                self.count += 1;
                self.skip = u64::from(self.length);
                self.prefix = 0;
                self.length = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    #[test]
    fn counts_messages_across_any_split() {
        let stream: Vec<u8> = [0, 1, 300, 70_000, 5]
            .iter()
            .flat_map(|&n| message(n))
            .collect();
        for size in [1, 2, 3, 5, 7, 64, 1000, stream.len()] {
            let mut c = MessageCounter::default();
            for chunk in stream.chunks(size) {
                c.observe(&Bytes::copy_from_slice(chunk));
            }
            assert_eq!(c.count(), 5, "chunks of {size}");
        }
    }

    #[test]
    fn a_non_contiguous_buffer_is_followed_through_every_chunk() {
        let a = Bytes::from(message(3));
        let b = Bytes::from(message(4));
        let mut c = MessageCounter::default();
        c.observe(&a.chain(b));
        assert_eq!(c.count(), 2);
    }

    #[test]
    fn a_stream_cut_inside_a_message_counts_the_messages_begun() {
        let mut c = MessageCounter::default();
        c.observe(&Bytes::from(message(10)[..8].to_vec()));
        assert_eq!(c.count(), 1);
        c.observe(&Bytes::from_static(&[0, 0, 0]));
        assert_eq!(c.count(), 1);
    }
}
