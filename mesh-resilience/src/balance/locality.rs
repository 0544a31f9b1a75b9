//! Locality-aware balancing (DestinationRule `localityLbSetting`, LB-1..LB-13 of this
//! crate's ISTIO.md): priorities for failover, locality weights for `distribute`.
//!
//! Each endpoint set is placed once, when it is updated:
//!
//! - **Failover** (on when the destination has outlier detection and locality balancing is
//!   not disabled, as in Istio): every endpoint gets a priority from how close its
//!   locality is to the proxy's (same subzone 0, same zone 1, same region 2, other region
//!   3, or 4 for a region that is not the `failover` target of the proxy's region), or
//!   from `failoverPriority` labels (the number of labels left when the first one
//!   differs from the proxy's, times 5, plus the locality priority when `failover` is
//!   also written). The priorities are then renumbered 0, 1, 2… without gaps. A request
//!   goes to a priority drawn by Envoy's priority load: each level's health is
//!   `min(100, 1.4 × 100 × healthy / total)`, the levels take load in order until 100 is
//!   given out, scaled up when the levels' health adds up to less than 100.
//! - **Distribute**: the first rule whose `from` matches the proxy's locality gives each
//!   destination locality a weight: a `to` key's weight is shared by the localities it
//!   matches (that no earlier key took) in proportion to their endpoints' weights,
//!   rounded up; localities no key matches get no traffic. A request goes to a locality
//!   drawn by `weight × min(1, 1.4 × healthy / total)` (Envoy's locality-weighted
//!   balancing with its overprovisioning factor).
//!
//! The policy (`ROUND_ROBIN`, `LEAST_REQUEST`, …) then picks within the chosen priority
//! or locality. Without either (the usual case), nothing here runs per request.

use std::collections::BTreeMap;

use mesh_core::{
    Endpoint, Labels, Locality, NETWORK_LABEL, REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL,
};
use rand::Rng;

/// Envoy's overprovisioning factor, in percent: a level or locality with at least
/// 100 / 1.4 ≈ 71 % of its endpoints healthy counts as fully healthy.
const OVERPROVISIONING: u64 = 140;

/// DestinationRule `localityLbSetting`. The default is Istio's mesh default: enabled,
/// with no rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityLb {
    /// `enabled` (Istio's default: true).
    pub enabled: bool,
    /// `distribute`: traffic shares by locality, per originating locality.
    pub distribute: Vec<Distribute>,
    /// `failover`: the region to fail over to, per originating region.
    pub failover: Vec<Failover>,
    /// `failoverPriority`: labels (`name` or `name=value`) ordering the priorities.
    pub failover_priority: Vec<String>,
}

impl Default for LocalityLb {
    fn default() -> Self {
        Self {
            enabled: true,
            distribute: Vec::new(),
            failover: Vec::new(),
            failover_priority: Vec::new(),
        }
    }
}

/// One `distribute` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Distribute {
    /// The originating locality pattern (`region/zone/*`).
    pub from: String,
    /// Destination locality patterns and their weights.
    pub to: BTreeMap<String, u32>,
}

/// One `failover` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    /// The originating region.
    pub from: String,
    /// The region to fail over to.
    pub to: String,
}

/// Where the proxy runs: its locality, network and labels (for `failoverPriority`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The proxy's locality.
    pub locality: Locality,
    /// The proxy's network; endpoints of another network are left out.
    pub network: Option<String>,
    /// The proxy's workload labels.
    pub labels: Labels,
}

impl Origin {
    /// The value of `label` for the proxy: its label, else for the topology labels its
    /// locality or network (as Istio adds them to proxy labels).
    fn label(&self, label: &str) -> Option<&str> {
        if let Some(v) = self.labels.get(label) {
            return Some(v);
        }
        let v = match label {
            REGION_LABEL => &self.locality.region,
            ZONE_LABEL => &self.locality.zone,
            SUBZONE_LABEL => &self.locality.subzone,
            NETWORK_LABEL => return self.network.as_deref(),
            _ => return None,
        };
        Some(v.as_str()).filter(|v| !v.is_empty())
    }

    /// Whether the proxy reaches `ep` directly: same network, or either network unset.
    pub fn reaches(&self, ep: &Endpoint) -> bool {
        match (&self.network, &ep.network) {
            (Some(mine), Some(theirs)) => mine.as_str() == &**theirs,
            _ => true,
        }
    }
}

/// The placement of one endpoint set.
#[derive(Debug, Default)]
pub(crate) enum Placement {
    /// All endpoints together.
    #[default]
    Flat,
    /// A priority per endpoint, `0..levels`.
    Priorities { level: Box<[u16]>, levels: u16 },
    /// A locality per endpoint (`NONE`: no traffic) and each locality's weight.
    Weights {
        group: Box<[u32]>,
        weight: Box<[u32]>,
    },
}

/// An endpoint that gets no traffic under `distribute`.
pub(crate) const NONE: u32 = u32::MAX;

/// What a request may pick from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    All,
    Level(u16),
    Group(u32),
}

impl Placement {
    /// Places `endpoints` for a proxy at `origin`. `failover`: the destination has
    /// outlier detection (Istio applies failover only then).
    pub(crate) fn new(
        lb: &LocalityLb,
        origin: &Origin,
        failover: bool,
        endpoints: &[&Endpoint],
    ) -> Self {
        if !lb.enabled || endpoints.is_empty() {
            return Placement::Flat;
        }
        if !lb.distribute.is_empty() {
            return distribute(lb, origin, endpoints);
        }
        if failover {
            return priorities(lb, origin, endpoints);
        }
        Placement::Flat
    }

    /// The scope of one pick, drawing a priority or locality by the healthy shares;
    /// `healthy(i)`: endpoint `i` may be picked; `skip(level)`: a level to treat as
    /// unhealthy (retries to remote localities). `None`: nothing is eligible.
    pub(crate) fn scope<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        healthy: &impl Fn(usize) -> bool,
        skip: &impl Fn(u16) -> bool,
    ) -> Option<Scope> {
        match self {
            Placement::Flat => Some(Scope::All),
            Placement::Priorities { level, levels } => {
                let health = |p: u16| -> u64 {
                    if skip(p) {
                        return 0;
                    }
                    let (mut up, mut all) = (0u64, 0u64);
                    for (i, l) in level.iter().enumerate() {
                        if *l == p {
                            all += 1;
                            up += u64::from(healthy(i));
                        }
                    }
                    (OVERPROVISIONING * up)
                        .checked_div(all)
                        .map_or(0, |h| h.min(100))
                };
                let total = (0..*levels).map(health).sum::<u64>().min(100);
                if total == 0 {
                    // Every level skipped or down: Envoy resets the retry's exclusions.
                    return (0..*levels)
                        .find(|p| level.iter().enumerate().any(|(i, l)| l == p && healthy(i)))
                        .map(Scope::Level);
                }
                let draw = rng.random_range(0..100u64);
                let (mut left, mut at) = (100u64, 0u64);
                let mut first = None;
                for p in 0..*levels {
                    let h = health(p);
                    let load = (h * 100 / total).min(left);
                    left -= load;
                    if h > 0 && first.is_none() {
                        first = Some(p);
                    }
                    if draw < at + load {
                        return Some(Scope::Level(p));
                    }
                    at += load;
                }
                // The rounding remainder goes to the first level with health (Envoy).
                first.map(Scope::Level)
            }
            Placement::Weights { group, weight } => {
                let effective = |g: usize| -> u64 {
                    let (mut up, mut all) = (0u64, 0u64);
                    for (i, x) in group.iter().enumerate() {
                        if *x as usize == g {
                            all += 1;
                            up += u64::from(healthy(i));
                        }
                    }
                    // weight × min(1, 1.4 × healthy / total), in hundredths.
                    (OVERPROVISIONING * up)
                        .checked_div(all)
                        .map_or(0, |h| u64::from(weight[g]) * h.min(100))
                };
                let total: u64 = (0..weight.len()).map(effective).sum();
                if total == 0 {
                    return None;
                }
                let mut draw = rng.random_range(0..total);
                for g in 0..weight.len() {
                    let w = effective(g);
                    if draw < w {
                        return Some(Scope::Group(g as u32));
                    }
                    draw -= w;
                }
                None
            }
        }
    }

    /// Whether endpoint `i` is in `scope`.
    pub(crate) fn contains(&self, scope: Scope, i: usize) -> bool {
        match (self, scope) {
            (_, Scope::All) => match self {
                Placement::Weights { group, .. } => group[i] != NONE,
                _ => true,
            },
            (Placement::Priorities { level, .. }, Scope::Level(p)) => level[i] == p,
            (Placement::Weights { group, .. }, Scope::Group(g)) => group[i] == g,
            _ => false,
        }
    }

    /// The priority of endpoint `i` (0 when there are none).
    pub(crate) fn level(&self, i: usize) -> u16 {
        match self {
            Placement::Priorities { level, .. } => level[i],
            _ => 0,
        }
    }

    /// Whether picks need a scope at all.
    pub(crate) fn is_flat(&self) -> bool {
        matches!(self, Placement::Flat)
    }
}

/// Istio's priority of `ep` for a proxy at `origin`, before renumbering.
fn locality_priority(origin: &Locality, ep: &Locality, failover: &[Failover]) -> u32 {
    let p = if origin.region != ep.region {
        3
    } else if origin.zone != ep.zone {
        2
    } else if origin.subzone != ep.subzone {
        1
    } else {
        0
    };
    if p == 3
        && let Some(rule) = failover.iter().find(|f| f.from == origin.region)
        && ep.region != rule.to
    {
        return 4;
    }
    p
}

/// The `failoverPriority` priority of `ep`: 0 when every label matches the proxy's,
/// else the number of labels from the first that differs to the end.
fn label_priority(origin: &Origin, ep: &Endpoint, labels: &[String]) -> u32 {
    for (j, spec) in labels.iter().enumerate() {
        let (name, fixed) = match spec.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (spec.as_str(), None),
        };
        let want = fixed.or_else(|| origin.label(name)).unwrap_or_default();
        if want != ep.label(name).unwrap_or_default() {
            return (labels.len() - j) as u32;
        }
    }
    0
}

fn priorities(lb: &LocalityLb, origin: &Origin, endpoints: &[&Endpoint]) -> Placement {
    let raw: Vec<u32> = endpoints
        .iter()
        .map(|ep| {
            if lb.failover_priority.is_empty() {
                locality_priority(&origin.locality, &ep.locality, &lb.failover)
            } else {
                let by_labels = label_priority(origin, ep, &lb.failover_priority) * 5;
                if lb.failover.is_empty() {
                    by_labels
                } else {
                    by_labels + locality_priority(&origin.locality, &ep.locality, &lb.failover)
                }
            }
        })
        .collect();
    let mut distinct = raw.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() <= 1 {
        return Placement::Flat;
    }
    let level = raw
        .iter()
        .map(|r| distinct.binary_search(r).unwrap_or_default() as u16)
        .collect();
    Placement::Priorities {
        level,
        levels: distinct.len() as u16,
    }
}

fn distribute(lb: &LocalityLb, origin: &Origin, endpoints: &[&Endpoint]) -> Placement {
    let Some(rule) = lb
        .distribute
        .iter()
        .find(|d| origin.locality.matches(&d.from))
    else {
        return Placement::Flat;
    };
    // The destination localities, each weighing the sum of its endpoints' weights.
    let mut localities: Vec<(&Locality, u64)> = Vec::new();
    let group: Vec<usize> = endpoints
        .iter()
        .map(
            |ep| match localities.iter().position(|(l, _)| **l == *ep.locality) {
                Some(g) => {
                    localities[g].1 += u64::from(ep.weight);
                    g
                }
                None => {
                    localities.push((&ep.locality, u64::from(ep.weight)));
                    localities.len() - 1
                }
            },
        )
        .collect();
    let mut weight: Vec<Option<u32>> = vec![None; localities.len()];
    for (pattern, share) in &rule.to {
        let matched: Vec<usize> = (0..localities.len())
            .filter(|&g| weight[g].is_none() && localities[g].0.matches(pattern))
            .collect();
        let total: u64 = matched.iter().map(|&g| localities[g].1).sum();
        for &g in &matched {
            let w = (localities[g].1 * u64::from(*share)).div_ceil(total.max(1));
            weight[g] = Some(u32::try_from(w).unwrap_or(u32::MAX));
        }
    }
    Placement::Weights {
        group: group
            .iter()
            .map(|&g| if weight[g].is_some() { g as u32 } else { NONE })
            .collect(),
        weight: weight.iter().map(|w| w.unwrap_or(0)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn ep(i: u8, locality: &str) -> Endpoint {
        Endpoint::new(([10, 0, 0, i], 80).into()).with_locality(Locality::parse(locality))
    }

    fn origin(locality: &str) -> Origin {
        Origin {
            locality: Locality::parse(locality),
            ..Origin::default()
        }
    }

    fn levels(p: &Placement) -> Vec<u16> {
        match p {
            Placement::Priorities { level, .. } => level.to_vec(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn priorities_follow_istio_and_are_renumbered_without_gaps() {
        let eps = [
            ep(1, "a/1/x"),
            ep(2, "a/1/y"),
            ep(3, "a/2"),
            ep(4, "b/1"),
            ep(5, "c/1"),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let lb = LocalityLb::default();
        let p = Placement::new(&lb, &origin("a/1/x"), true, &refs);
        assert_eq!(levels(&p), [0, 1, 2, 3, 3]);
        // Without outlier detection there is no failover.
        assert!(Placement::new(&lb, &origin("a/1/x"), false, &refs).is_flat());
        // `failover` a -> c puts b behind c.
        let lb = LocalityLb {
            failover: vec![Failover {
                from: "a".into(),
                to: "c".into(),
            }],
            ..LocalityLb::default()
        };
        let p = Placement::new(&lb, &origin("a/1/y"), true, &refs);
        assert_eq!(levels(&p), [1, 0, 2, 4, 3]);
        let disabled = LocalityLb {
            enabled: false,
            ..LocalityLb::default()
        };
        assert!(Placement::new(&disabled, &origin("a/1/x"), true, &refs).is_flat());
    }

    #[test]
    fn failover_priority_orders_by_the_first_label_that_differs() {
        let mut mine = origin("a/1");
        mine.labels.insert("tier".into(), "gold".into());
        let gold = |i, l| ep(i, l).with_labels(Labels::from([("tier".into(), "gold".into())]));
        let silver = ep(3, "a/1").with_labels(Labels::from([("tier".into(), "silver".into())]));
        let eps = [gold(1, "a/1"), gold(2, "b/1"), silver, ep(4, "b/1")];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let lb = LocalityLb {
            failover_priority: vec!["tier".into(), REGION_LABEL.into()],
            ..LocalityLb::default()
        };
        let p = Placement::new(&lb, &mine, true, &refs);
        assert_eq!(levels(&p), [0, 1, 2, 2]);
        // A fixed value overrides the proxy's.
        let lb = LocalityLb {
            failover_priority: vec!["tier=silver".into()],
            ..LocalityLb::default()
        };
        let p = Placement::new(&lb, &mine, true, &refs);
        assert_eq!(levels(&p), [1, 1, 0, 1]);
    }

    #[test]
    fn distribute_shares_a_key_among_the_localities_it_matches() {
        let eps = [
            ep(1, "a/1"),
            ep(2, "a/1").with_weight(3),
            ep(3, "a/2"),
            ep(4, "b/1"),
            ep(5, "c/1"),
        ];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let lb = LocalityLb {
            distribute: vec![Distribute {
                from: "a/1/*".into(),
                to: BTreeMap::from([("a/*".into(), 80), ("b/*".into(), 20)]),
            }],
            ..LocalityLb::default()
        };
        let Placement::Weights { group, weight } =
            Placement::new(&lb, &origin("a/1/z"), false, &refs)
        else {
            panic!("not weighted")
        };
        // a/1 weighs 4, a/2 weighs 1: 80 splits 64/16; b gets 20; c nothing.
        assert_eq!(&*group, [0, 0, 1, 2, NONE]);
        assert_eq!(&*weight, [64, 16, 20, 0]);
        // A proxy no rule is for: no weights.
        assert!(Placement::new(&lb, &origin("b/1"), false, &refs).is_flat());
    }

    #[test]
    fn priority_load_spills_over_by_the_overprovisioned_health() {
        // 10 endpoints at level 0, 10 at level 1.
        let level: Box<[u16]> = (0..20).map(|i| (i / 10) as u16).collect();
        let p = Placement::Priorities { level, levels: 2 };
        let mut rng = SmallRng::seed_from_u64(7);
        let share = |rng: &mut SmallRng, up0: usize| {
            let healthy = |i: usize| i >= 10 || i < up0;
            let n = 20_000;
            let local = (0..n)
                .filter(|_| p.scope(rng, &healthy, &|_| false) == Some(Scope::Level(0)))
                .count();
            local as f64 / n as f64
        };
        // 8 of 10 healthy: 1.4 × 80 % ≥ 100 %, all traffic stays.
        assert_eq!(share(&mut rng, 8), 1.0);
        // 5 of 10: health 70, level 1 takes the other 30.
        assert!((share(&mut rng, 5) - 0.70).abs() < 0.015);
        // None: everything fails over.
        assert_eq!(share(&mut rng, 0), 0.0);
        // Skipped levels are treated as down.
        let all = |_| true;
        assert_eq!(p.scope(&mut rng, &all, &|l| l == 0), Some(Scope::Level(1)));
        assert_eq!(p.scope(&mut rng, &all, &|_| true), Some(Scope::Level(0)));
    }

    #[test]
    fn networks_other_than_the_proxys_are_unreachable() {
        let mut mine = origin("a");
        let other = ep(1, "a").with_network("net-2");
        let unset = ep(2, "a");
        assert!(mine.reaches(&other) && mine.reaches(&unset));
        mine.network = Some("net-1".into());
        assert!(!mine.reaches(&other));
        assert!(mine.reaches(&unset));
        assert!(mine.reaches(&ep(3, "a").with_network("net-1")));
    }
}
