//! Power of two choices (Envoy's LEAST_REQUEST with two candidates).

use rand::{Rng, RngCore};

/// A random index in `0..n` (`n > 0`) by widening multiplication (Lemire): one 64-bit
/// draw and a multiply, with a bias below `n / 2^64`, far under any observable level.
fn index<R: RngCore + ?Sized>(rng: &mut R, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// A uniformly random index in `0..n` that satisfies `eligible` and is not `exclude`.
///
/// A few random draws find one quickly when most indices are eligible; otherwise the
/// eligible indices are counted and one is drawn among them, so the result stays uniform
/// and the search always ends.
pub(crate) fn random_eligible<R: Rng + ?Sized>(
    n: usize,
    rng: &mut R,
    exclude: Option<usize>,
    eligible: &impl Fn(usize) -> bool,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    let ok = |i: usize| Some(i) != exclude && eligible(i);
    for _ in 0..8 {
        let i = index(rng, n);
        if ok(i) {
            return Some(i);
        }
    }
    let count = (0..n).filter(|&i| ok(i)).count();
    if count == 0 {
        return None;
    }
    let k = index(rng, count);
    (0..n).filter(|&i| ok(i)).nth(k)
}

/// Picks two distinct eligible endpoints at random and returns the one with fewer
/// requests in flight (the first on a tie); the only eligible one when there is one.
pub(crate) fn pick<R: Rng + ?Sized>(
    n: usize,
    rng: &mut R,
    eligible: &impl Fn(usize) -> bool,
    load: &impl Fn(usize) -> usize,
) -> Option<usize> {
    let a = random_eligible(n, rng, None, eligible)?;
    match random_eligible(n, rng, Some(a), eligible) {
        Some(b) if load(b) < load(a) => Some(b),
        _ => Some(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn index_stays_in_range_and_reaches_every_value() {
        let mut rng = SmallRng::seed_from_u64(9);
        for n in [1usize, 2, 3, 7, 100] {
            let mut seen = vec![0u32; n];
            for _ in 0..200 * n {
                seen[index(&mut rng, n)] += 1;
            }
            // Each value is expected 200 times; a fair draw never falls below half of it.
            assert!(seen.iter().all(|&c| c > 100), "n={n}: {seen:?}");
        }
        assert_eq!(index(&mut rng, 1), 0);
    }

    #[test]
    fn prefers_the_less_loaded_of_two() {
        let mut rng = SmallRng::seed_from_u64(1);
        let loads = [5usize, 0, 5, 5];
        let mut hits = [0; 4];
        for _ in 0..1000 {
            let i = pick(4, &mut rng, &|_| true, &|i| loads[i]).unwrap();
            hits[i] += 1;
        }
        // Index 1 wins whenever it is one of the two candidates: P = 1/2.
        assert!(hits[1] > 400, "{hits:?}");
    }

    #[test]
    fn never_picks_ineligible_endpoints() {
        let mut rng = SmallRng::seed_from_u64(2);
        for _ in 0..1000 {
            let i = pick(100, &mut rng, &|i| i % 10 != 0, &|_| 0).unwrap();
            assert_ne!(i % 10, 0);
        }
        assert_eq!(pick(3, &mut rng, &|i| i == 2, &|_| 0), Some(2));
        assert_eq!(pick(3, &mut rng, &|_| false, &|_| 0), None);
        assert_eq!(pick(0, &mut rng, &|_| true, &|_| 0), None);
    }
}
