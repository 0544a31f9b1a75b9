//! Power of two choices (Envoy's LEAST_REQUEST with two candidates).

use rand::Rng;

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
        let i = rng.random_range(0..n);
        if ok(i) {
            return Some(i);
        }
    }
    let count = (0..n).filter(|&i| ok(i)).count();
    if count == 0 {
        return None;
    }
    let k = rng.random_range(0..count);
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
