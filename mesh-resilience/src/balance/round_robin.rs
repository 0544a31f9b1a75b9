//! Round robin and random picks.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;

/// The next endpoint in turn among the eligible ones, so that skipping ejected
/// endpoints keeps the rotation even over the rest.
pub(crate) fn pick(
    n: usize,
    cursor: &AtomicUsize,
    eligible: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let m = (0..n).filter(|&i| eligible(i)).count();
    if m == 0 {
        return None;
    }
    let k = cursor.fetch_add(1, Ordering::Relaxed) % m;
    (0..n).filter(|&i| eligible(i)).nth(k)
}

/// A uniformly random eligible endpoint.
pub(crate) fn pick_random<R: Rng + ?Sized>(
    n: usize,
    rng: &mut R,
    eligible: &impl Fn(usize) -> bool,
) -> Option<usize> {
    super::p2c::random_eligible(n, rng, None, eligible)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_and_skips_ineligible() {
        let c = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6).map(|_| pick(3, &c, &|i| i != 1).unwrap()).collect();
        assert_eq!(picks, [0, 2, 0, 2, 0, 2]);
        let picks: Vec<_> = (0..3).map(|_| pick(3, &c, &|_| true).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2]);
    }
}
