//! The consistent-hash tables, built as Envoy builds them so that a hash picks the same
//! endpoint as Envoy for the same endpoint set.
//!
//! - Ring hash (ketama): every endpoint gets `ceil(minimumRingSize / N)` points (Envoy's
//!   scaling for equal weights, capped at 8M entries in all), the XXH64 of
//!   `"<ip>:<port>_<i>"`; a hash belongs to the first point at or after it, wrapping.
//! - Maglev: endpoints sorted by `"<ip>:<port>"` fill a prime-sized table in turns, each
//!   at the next free slot of its own permutation (offset = XXH64 seed 0, skip = XXH64
//!   seed 1); a hash belongs to slot `hash % size`.
//!
//! Both are rebuilt when the endpoint set changes. An ineligible endpoint (ejected, or
//! already tried by this request) is skipped by walking on from its entry to the next
//! entry of an eligible one, so only the keys of that endpoint move.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::hash::HashAlgorithm;
use super::xxhash::xxh64;

/// A built table; entries are indices into the endpoint set it was built from.
#[derive(Debug)]
pub(crate) enum Table {
    /// Points sorted by hash.
    Ring(Vec<(u64, u32)>),
    /// One endpoint per slot.
    Maglev(Vec<u32>),
}

impl Table {
    /// The table of `algorithm` over `endpoints` (distinct addresses).
    pub(crate) fn build(algorithm: HashAlgorithm, endpoints: &[SocketAddr]) -> Self {
        if algorithm.is_maglev() {
            Table::Maglev(maglev(algorithm.size(), endpoints))
        } else {
            Table::Ring(ring(algorithm.size(), endpoints))
        }
    }

    /// The endpoint for `hash`: the entry's endpoint, or the next entry's whose endpoint
    /// is `eligible`. `endpoints` is the size of the set.
    pub(crate) fn pick(
        &self,
        hash: u64,
        endpoints: usize,
        eligible: &impl Fn(usize) -> bool,
    ) -> Option<usize> {
        match self {
            Table::Ring(points) => {
                if points.is_empty() {
                    return None;
                }
                let at = points.partition_point(|p| p.0 < hash) % points.len();
                walk(points.len(), at, endpoints, &|i| points[i].1, eligible)
            }
            Table::Maglev(slots) => {
                if slots.is_empty() {
                    return None;
                }
                let at = (hash % slots.len() as u64) as usize;
                walk(slots.len(), at, endpoints, &|i| slots[i], eligible)
            }
        }
    }

    /// Each endpoint's share of the hash space (its expected share of uniformly spread keys).
    pub(crate) fn shares(&self, endpoints: usize) -> Vec<f64> {
        let mut shares = vec![0.0; endpoints];
        match self {
            Table::Ring(points) => {
                let span = 2f64.powi(64);
                let mut prev = points.last().map_or(0, |p| p.0);
                for (i, &(hash, ep)) in points.iter().enumerate() {
                    // The first point also owns the arc that wraps past the top.
                    let arc = if i == 0 {
                        span - prev as f64 + hash as f64
                    } else {
                        (hash - prev) as f64
                    };
                    shares[ep as usize] += arc / span;
                    prev = hash;
                }
            }
            Table::Maglev(slots) => {
                for &ep in slots {
                    shares[ep as usize] += 1.0 / slots.len() as f64;
                }
            }
        }
        shares
    }
}

/// The first eligible endpoint of the entries from `start` on (wrapping). After as many
/// misses as there are endpoints, checks that any endpoint is eligible at all, so a
/// table with nothing eligible is not walked to its end.
fn walk(
    len: usize,
    start: usize,
    endpoints: usize,
    entry: &impl Fn(usize) -> u32,
    eligible: &impl Fn(usize) -> bool,
) -> Option<usize> {
    for step in 0..len {
        let i = entry((start + step) % len) as usize;
        if eligible(i) {
            return Some(i);
        }
        if step + 1 == endpoints && !(0..endpoints).any(eligible) {
            return None;
        }
    }
    None
}

/// `"<ip>:<port>"` as Envoy writes a host address.
fn host_key(buf: &mut String, addr: SocketAddr) {
    buf.clear();
    let _ = write!(buf, "{addr}");
}

fn ring(minimum_size: u64, endpoints: &[SocketAddr]) -> Vec<(u64, u32)> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    // Envoy's arithmetic for equal weights, in the same floating-point steps: the least
    // weighted endpoint gets a whole number of points, and the ring is capped.
    let weight = 1.0 / endpoints.len() as f64;
    let scale =
        ((weight * minimum_size as f64).ceil() / weight).min(HashAlgorithm::MAX_RING_SIZE as f64);
    let mut points = Vec::with_capacity(scale.ceil() as usize);
    let (mut current, mut target) = (0.0f64, 0.0f64);
    let mut key = String::new();
    for (index, &addr) in endpoints.iter().enumerate() {
        host_key(&mut key, addr);
        key.push('_');
        let base = key.len();
        target += scale * weight;
        let mut i = 0u64;
        while current < target {
            key.truncate(base);
            let _ = write!(key, "{i}");
            points.push((xxh64(key.as_bytes(), 0), index as u32));
            i += 1;
            current += 1.0;
        }
    }
    points.sort_unstable_by_key(|p| p.0);
    points
}

fn maglev(size: u64, endpoints: &[SocketAddr]) -> Vec<u32> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    struct Build {
        index: u32,
        offset: u64,
        skip: u64,
        next: u64,
        target: f64,
    }
    let mut keyed: Vec<(String, u32)> = endpoints
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            let mut key = String::new();
            host_key(&mut key, addr);
            (key, i as u32)
        })
        .collect();
    keyed.sort();
    let mut builds: Vec<Build> = keyed
        .iter()
        .map(|(key, index)| Build {
            index: *index,
            offset: xxh64(key.as_bytes(), 0) % size,
            skip: xxh64(key.as_bytes(), 1) % (size - 1) + 1,
            next: 0,
            target: 0.0,
        })
        .collect();
    // Equal weights: Envoy's weighted turns reduce to every endpoint taking a slot per
    // turn, but the comparison is kept in its floating-point form to match it exactly.
    let weight = 1.0 / endpoints.len() as f64;
    let empty = u32::MAX;
    let mut slots = vec![empty; size as usize];
    let mut filled = 0u64;
    let mut turn = 1u32;
    while filled < size {
        for b in &mut builds {
            if filled == size {
                break;
            }
            if f64::from(turn) * weight < b.target {
                continue;
            }
            b.target += weight;
            let mut slot = (b.offset + b.skip * b.next) % size;
            while slots[slot as usize] != empty {
                b.next += 1;
                slot = (b.offset + b.skip * b.next) % size;
            }
            slots[slot as usize] = b.index;
            b.next += 1;
            filled += 1;
        }
        turn += 1;
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 8080)))
            .collect()
    }

    #[test]
    fn every_endpoint_gets_its_share_of_ring_points() {
        let Table::Ring(points) = Table::build(HashAlgorithm::default(), &addrs(3)) else {
            unreachable!()
        };
        // ceil(1024 / 3) = 342 points each.
        assert_eq!(points.len(), 3 * 342);
        for ep in 0..3 {
            assert_eq!(points.iter().filter(|p| p.1 == ep).count(), 342);
        }
        assert!(points.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(points.contains(&(xxh64(b"10.0.0.1:8080_0", 0), 0)));
        assert!(points.contains(&(xxh64(b"10.0.0.3:8080_341", 0), 2)));
    }

    #[test]
    fn a_hash_belongs_to_the_next_point_wrapping_at_the_top() {
        let t = Table::build(HashAlgorithm::ring_hash(2).unwrap(), &addrs(2));
        let Table::Ring(points) = &t else {
            unreachable!()
        };
        let all = |_| true;
        assert_eq!(t.pick(points[0].0, 2, &all), Some(points[0].1 as usize));
        assert_eq!(t.pick(points[0].0 + 1, 2, &all), Some(points[1].1 as usize));
        let last = points[points.len() - 1];
        assert_eq!(t.pick(last.0 + 1, 2, &all), Some(points[0].1 as usize));
    }

    #[test]
    fn maglev_fills_a_prime_table_evenly() {
        let t = Table::build(HashAlgorithm::maglev(251).unwrap(), &addrs(4));
        let Table::Maglev(slots) = &t else {
            unreachable!()
        };
        assert_eq!(slots.len(), 251);
        for ep in 0..4u32 {
            let n = slots.iter().filter(|s| **s == ep).count();
            assert!((62..=63).contains(&n), "endpoint {ep}: {n} slots");
        }
        let shares = t.shares(4);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn ineligible_endpoints_are_walked_past_and_nothing_eligible_is_none() {
        for algorithm in [
            HashAlgorithm::default(),
            HashAlgorithm::maglev(65_537).unwrap(),
        ] {
            let t = Table::build(algorithm, &addrs(3));
            for h in (0..100u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
                let first = t.pick(h, 3, &|_| true).unwrap();
                let other = t.pick(h, 3, &|i| i != first).unwrap();
                assert_ne!(other, first);
                assert_eq!(t.pick(h, 3, &|i| i == other), Some(other));
            }
            assert_eq!(t.pick(7, 3, &|_| false), None);
        }
        assert_eq!(
            Table::build(HashAlgorithm::default(), &[]).pick(1, 0, &|_| true),
            None
        );
    }

    #[test]
    fn a_removal_moves_other_keys_only_onto_points_the_rest_gained() {
        // 4 endpoints have 256 points each, 3 have 342: the 86 new points of each
        // remaining endpoint take over the keys just before them, as in Envoy.
        let four = Table::build(HashAlgorithm::default(), &addrs(4));
        let three = Table::build(HashAlgorithm::default(), &addrs(3));
        let (Table::Ring(old), Table::Ring(new)) = (&four, &three) else {
            unreachable!()
        };
        let old_points: std::collections::HashSet<u64> = old.iter().map(|p| p.0).collect();
        let all = |_| true;
        let mut moved = 0;
        for h in (0..20_000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
            let (was, now) = (
                four.pick(h, 4, &all).unwrap(),
                three.pick(h, 3, &all).unwrap(),
            );
            if was != 3 && was != now {
                let hit = new[new.partition_point(|p| p.0 < h) % new.len()].0;
                assert!(!old_points.contains(&hit), "moved onto an old point");
                moved += 1;
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn ring_shares_add_up_to_one() {
        let t = Table::build(HashAlgorithm::default(), &addrs(5));
        let shares = t.shares(5);
        assert!(
            (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{shares:?}"
        );
        assert!(shares.iter().all(|s| (0.1..0.3).contains(s)), "{shares:?}");
    }
}
