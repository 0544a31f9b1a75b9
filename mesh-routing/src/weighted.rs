//! Weighted choice among a route's destinations (VS-30..VS-33).
//!
//! Weights are relative: a destination receives `weight / sum(weights)`. A single
//! destination receives everything whatever its weight; with several, a destination of
//! weight 0 (or omitted) receives nothing. A pick is a binary search over cumulative
//! weights (O(log n)), driven by an rng the caller injects so tests can fix the seed.
//!
//! # Errors
//!
//! [`Weighted::new`] fails with [`WeightError`] for no destinations or, with more than
//! one, a zero total.
//!
//! # Example
//!
//! ```
//! use mesh_routing::Weighted;
//! use rand::{SeedableRng, rngs::SmallRng};
//!
//! let split = Weighted::new(vec![("v1", 95), ("v2", 5)]).unwrap();
//! let mut rng = SmallRng::seed_from_u64(7);
//! let v2 = (0..10_000).filter(|_| *split.pick(&mut rng) == "v2").count();
//! assert!((400..600).contains(&v2));
//! // With several destinations, weight 0 receives nothing.
//! assert_eq!(Weighted::new(vec![("v1", 0), ("v2", 100)]).unwrap().items(), &["v2"]);
//! ```

use rand::Rng;

/// The weights cannot form a distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WeightError {
    /// The route has no destination.
    #[error("route has no destination")]
    Empty,
    /// Several destinations whose weights add up to 0 (Istio: "total destination weight = 0").
    #[error("total destination weight = 0")]
    ZeroTotal,
}

/// Items chosen at random in proportion to their weights.
#[derive(Clone, Debug)]
pub struct Weighted<T> {
    items: Box<[T]>,
    /// `cumulative[i]` = sum of the weights of items `0..=i`.
    cumulative: Box<[u64]>,
    total: u64,
}

impl<T> Weighted<T> {
    /// Builds the distribution from `(item, weight)` pairs, following VS-31/VS-32.
    pub fn new(entries: Vec<(T, u32)>) -> Result<Self, WeightError> {
        if entries.is_empty() {
            return Err(WeightError::Empty);
        }
        if entries.len() == 1 {
            let items: Box<[T]> = entries.into_iter().map(|(t, _)| t).collect();
            return Ok(Self {
                items,
                cumulative: Box::new([1]),
                total: 1,
            });
        }
        let mut items = Vec::with_capacity(entries.len());
        let mut cumulative = Vec::with_capacity(entries.len());
        let mut total = 0u64;
        for (item, weight) in entries {
            if weight == 0 {
                continue;
            }
            total += u64::from(weight);
            items.push(item);
            cumulative.push(total);
        }
        if total == 0 {
            return Err(WeightError::ZeroTotal);
        }
        Ok(Self {
            items: items.into(),
            cumulative: cumulative.into(),
            total,
        })
    }

    /// A distribution with one item.
    pub fn single(item: T) -> Self {
        Self {
            items: Box::new([item]),
            cumulative: Box::new([1]),
            total: 1,
        }
    }

    /// Picks an item; consumes no randomness when only one item can be chosen.
    pub fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> &T {
        if self.items.len() == 1 {
            return &self.items[0];
        }
        let x = rng.random_range(0..self.total);
        let idx = self.cumulative.partition_point(|&c| c <= x);
        &self.items[idx]
    }

    /// The items that can be chosen (weight-0 items of a multi-item route are gone).
    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// The items, mutably (their weights stay as they are).
    pub fn items_mut(&mut self) -> &mut [T] {
        &mut self.items
    }

    /// The share of `items()[i]` in `[0, 1]`.
    pub fn share(&self, i: usize) -> f64 {
        let prev = if i == 0 { 0 } else { self.cumulative[i - 1] };
        (self.cumulative[i] - prev) as f64 / self.total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn counts(w: &Weighted<&'static str>, n: usize, seed: u64) -> Vec<usize> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut counts = vec![0; w.items().len()];
        for _ in 0..n {
            let picked = w.pick(&mut rng);
            let i = w.items().iter().position(|x| x == picked).unwrap();
            counts[i] += 1;
        }
        counts
    }

    fn chi_square(observed: &[usize], shares: &[f64]) -> f64 {
        let n: usize = observed.iter().sum();
        observed
            .iter()
            .zip(shares)
            .map(|(&o, &p)| {
                let e = p * n as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn single_destination_takes_everything_even_with_weight_zero() {
        let w = Weighted::new(vec![("a", 0)]).unwrap();
        assert_eq!(counts(&w, 100, 1), vec![100]);
    }

    #[test]
    fn zero_weight_destinations_are_dropped_when_several() {
        let w = Weighted::new(vec![("v1", 0), ("v2", 100)]).unwrap();
        assert_eq!(w.items(), &["v2"]);
        assert_eq!(counts(&w, 1000, 2), vec![1000]);
    }

    #[test]
    fn all_zero_weights_with_several_destinations_are_rejected() {
        assert_eq!(
            Weighted::new(vec![("a", 0), ("b", 0)]).unwrap_err(),
            WeightError::ZeroTotal
        );
        assert_eq!(Weighted::<u8>::new(vec![]).unwrap_err(), WeightError::Empty);
    }

    #[test]
    fn weights_are_relative_not_percentages() {
        let w = Weighted::new(vec![("a", 1), ("b", 3)]).unwrap();
        assert!((w.share(0) - 0.25).abs() < 1e-12);
        let observed = counts(&w, 20_000, 7);
        // df = 1, p = 0.001 critical value.
        assert!(chi_square(&observed, &[0.25, 0.75]) < 10.83, "{observed:?}");
    }

    #[test]
    fn three_way_split_passes_chi_square() {
        let w = Weighted::new(vec![("a", 50), ("b", 30), ("c", 20)]).unwrap();
        let observed = counts(&w, 30_000, 42);
        // df = 2, p = 0.001 critical value.
        assert!(
            chi_square(&observed, &[0.5, 0.3, 0.2]) < 13.82,
            "{observed:?}"
        );
    }

    #[test]
    fn boundaries_map_to_the_right_item() {
        // With weights 1 and 1, draws 0 and 1 must go to different items.
        let w = Weighted::new(vec![("a", 1), ("b", 1)]).unwrap();
        struct Fixed(u64);
        impl rand::RngCore for Fixed {
            fn next_u32(&mut self) -> u32 {
                self.0 as u32
            }
            fn next_u64(&mut self) -> u64 {
                self.0
            }
            fn fill_bytes(&mut self, dst: &mut [u8]) {
                dst.fill(0);
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for raw in [0u64, u64::MAX, 1 << 63, (1 << 63) - 1] {
            seen.insert(*w.pick(&mut Fixed(raw)));
        }
        assert_eq!(seen.len(), 2);
    }
}
