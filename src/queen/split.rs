//! A model no single hive can hold, split across hives (DESIGN.md §12): which
//! hives, and how many layers each. Pure over a [`ClusterState`], like the
//! rest of placement; [`super::placement::place`] asks for a plan when no hive
//! fits the model whole, as it is or after eviction.

use super::placement::{entry, usable, Allowed, Placement};
use super::registry::HiveConn;
use super::view::{ClusterState, HiveView};
use crate::protocol::{HiveSnapshot, SplitCostMb};

/// A model split across hives (DESIGN.md §12): the worker's hive keeps the
/// first `own_layers`, each lender the next share, in order (the last one
/// the output layer too).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub own_layers: u32,
    pub lenders: Vec<Share>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub hive: HiveConn,
    pub layers: u32,
    pub memory_mb: u64,
}

/// Whether a hive can take part in a split: llama.cpp's RPC backend built
/// in, and the queen's own build (the RPC protocol needs equal builds).
fn can_split(s: &HiveSnapshot) -> bool {
    s.backends.iter().any(|b| b == "rpc") && s.version == env!("CARGO_PKG_VERSION")
}

/// A model no single hive can hold, split across the fewest hives whose
/// free budgets together hold it, its layers in proportion to those budgets.
/// The worker goes to a hive that has the file (the lenders are sent their
/// layers by it); `None` when even every hive together cannot hold it.
pub fn plan(state: &ClusterState, model: &str, allowed: &Allowed) -> Option<Placement> {
    let able: Vec<(&HiveView, &HiveSnapshot)> = usable(state, allowed)
        .filter(|(_, s)| can_split(s))
        .collect();
    let mut hosts: Vec<(&HiveView, SplitCostMb, u64)> = able
        .iter()
        .filter_map(|(h, s)| Some((*h, entry(s, model)?.split?, s.ram.free_mb())))
        .collect();
    hosts.sort_by_key(|(h, _, free)| (std::cmp::Reverse(*free), h.conn.name.clone()));
    for lenders_wanted in 1..able.len() {
        for (host, cost, host_free) in &hosts {
            let mut lenders: Vec<(&HiveView, u64)> = able
                .iter()
                .filter(|(h, _)| h.conn.name != host.conn.name)
                .map(|(h, s)| (*h, s.ram.free_mb()))
                .collect();
            lenders.sort_by_key(|(h, free)| (std::cmp::Reverse(*free), h.conn.name.clone()));
            lenders.truncate(lenders_wanted);
            // The output layer goes to the last device: the roomiest lender.
            lenders.reverse();
            if lenders.len() < lenders_wanted {
                continue;
            }
            let frees: Vec<u64> = lenders.iter().map(|(_, f)| *f).collect();
            let Some(layers) = divide(cost, *host_free, &frees) else {
                continue;
            };
            let last = lenders.len() - 1;
            let shares = lenders
                .iter()
                .zip(&layers[1..])
                .enumerate()
                .map(|(i, ((h, _), &l))| Share {
                    hive: h.conn.clone(),
                    layers: l,
                    memory_mb: cost.lender_need(l, i == last),
                })
                .collect();
            return Some(Placement {
                hive: host.conn.clone(),
                gpu: None,
                evict: Vec::new(),
                need_mb: cost.host_need(layers[0]),
                split: Some(Split {
                    own_layers: layers[0],
                    lenders: shares,
                }),
            });
        }
    }
    None
}

/// A model's layers divided between the worker's hive (first) and the
/// lenders (the last taking the output layer), in proportion to their free
/// memory, none beyond what fits it, every lender at least one; `None` when
/// they cannot hold them all.
fn divide(cost: &SplitCostMb, host_free: u64, lender_free: &[u64]) -> Option<Vec<u32>> {
    let room = |free: u64, fixed: u64| -> Option<u32> {
        let left = free.checked_sub(fixed)?;
        if cost.layer_mb <= 0.0 {
            return Some(cost.layers);
        }
        Some(
            (left as f64 / cost.layer_mb)
                .floor()
                .min(f64::from(cost.layers)) as u32,
        )
    };
    let mut caps = vec![room(host_free, cost.host_mb)?];
    for (i, &free) in lender_free.iter().enumerate() {
        let last = i + 1 == lender_free.len();
        let fixed = cost.device_mb + if last { cost.output_mb } else { 0 };
        caps.push(room(free, fixed).filter(|&c| c >= 1)?);
    }
    let n = cost.layers;
    if caps.iter().map(|&c| u64::from(c)).sum::<u64>() < u64::from(n) {
        return None;
    }
    let weights: Vec<f64> = std::iter::once(host_free)
        .chain(lender_free.iter().copied())
        .map(|f| f as f64)
        .collect();
    // Proportional shares, capped; what a capped one cannot take goes to the others.
    let mut share = vec![0f64; caps.len()];
    let mut open: Vec<usize> = (0..caps.len()).collect();
    let mut left = f64::from(n);
    while !open.is_empty() && left > 1e-9 {
        let total: f64 = open.iter().map(|&i| weights[i]).sum();
        let mut capped = Vec::new();
        for &i in &open {
            let want = left * weights[i] / total;
            if share[i] + want >= f64::from(caps[i]) {
                capped.push(i);
            }
        }
        if capped.is_empty() {
            for &i in &open {
                share[i] += left * weights[i] / total;
            }
            break;
        }
        for &i in &capped {
            left -= f64::from(caps[i]) - share[i];
            share[i] = f64::from(caps[i]);
        }
        open.retain(|i| !capped.contains(i));
    }
    // Whole layers: floors, then the largest remainders with room.
    let mut layers: Vec<u32> = share.iter().map(|s| s.floor() as u32).collect();
    let mut order: Vec<usize> = (0..caps.len()).collect();
    order.sort_by(|&a, &b| (share[b] - share[b].floor()).total_cmp(&(share[a] - share[a].floor())));
    while layers.iter().sum::<u32>() < n {
        let i = order.iter().copied().find(|&i| layers[i] < caps[i])?;
        layers[i] += 1;
        order.retain(|&j| j != i);
        order.push(i);
    }
    // Every lender holds something, taken from whoever has the most.
    for i in 1..layers.len() {
        if layers[i] == 0 {
            let from = (0..layers.len()).max_by_key(|&j| layers[j])?;
            if layers[from] <= 1 {
                return None;
            }
            layers[from] -= 1;
            layers[i] += 1;
        }
    }
    Some(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;
    use crate::queen::placement::fixtures::*;

    fn layers(p: &Placement) -> Vec<(String, u32)> {
        let split = p.split.as_ref().expect("a split");
        std::iter::once((p.hive.name.clone(), split.own_layers))
            .chain(
                split
                    .lenders
                    .iter()
                    .map(|s| (s.hive.name.clone(), s.layers)),
            )
            .collect()
    }

    #[test]
    fn a_model_no_hive_can_hold_is_split_across_the_fewest_hives_by_free_budget() {
        // 790 MB whole; the two roomiest together hold it, the third is not needed.
        let s = state(vec![
            hive("a", 600, vec![splittable(M)], vec![]),
            hive("b", 500, vec![], vec![]),
            hive("c", 300, vec![], vec![]),
        ]);
        let p = placed(&s, 790).unwrap();
        // 30 × 600/1100 = 16.4 and 30 × 500/1100 = 13.6.
        assert_eq!(layers(&p), [("a".into(), 16), ("b".into(), 14)]);
        assert_eq!(p.need_mb, 150 + 16 * 20);
        let b = &p.split.as_ref().unwrap().lenders[0];
        assert_eq!(b.memory_mb, 30 + 40 + 14 * 20);
        assert!(p.evict.is_empty());
    }

    #[test]
    fn a_split_gives_no_hive_more_than_fits_and_uses_more_hives_when_it_must() {
        let s = state(vec![
            hive("a", 300, vec![splittable(M)], vec![]),
            hive("b", 400, vec![], vec![]),
            hive("c", 250, vec![], vec![]),
            hive("d", 100, vec![], vec![]),
        ]);
        let p = placed(&s, 790).unwrap();
        let got = layers(&p);
        // a holds (300-150)/20 = 7; b and c lend, c (the smaller) first and b,
        // the roomiest, last with the output layer: (400-70)/20 = 16, (250-30)/20 = 11.
        assert_eq!(got[0], ("a".into(), 7));
        assert_eq!(got.iter().map(|(_, l)| l).sum::<u32>(), 30);
        assert_eq!(got.last().unwrap().0, "b");
        assert!(got.iter().all(|(h, _)| h != "d"));
        let split = p.split.as_ref().unwrap();
        for share in &split.lenders {
            let free = if share.hive.name == "b" { 400 } else { 250 };
            assert!(share.memory_mb <= free, "{share:?}");
        }
    }

    #[test]
    fn only_hives_of_this_build_with_rpc_lend_and_a_split_that_cannot_fit_is_an_error() {
        // Each of them, with a, would hold it.
        let mut other = hive("other", 500, vec![], vec![]);
        std::sync::Arc::make_mut(other.snapshot.as_mut().unwrap()).version = "0.0.9".into();
        let mut plain = hive("plain", 500, vec![], vec![]);
        std::sync::Arc::make_mut(plain.snapshot.as_mut().unwrap()).backends = vec!["cpu".into()];
        let s = state(vec![
            hive("a", 600, vec![splittable(M)], vec![]),
            other,
            plain,
        ]);
        let e = placed(&s, 790).unwrap_err();
        assert_eq!(e.code, ErrorCode::InsufficientMemory);
        let s = state(vec![
            hive("a", 200, vec![splittable(M)], vec![]),
            hive("b", 200, vec![], vec![]),
        ]);
        assert!(placed(&s, 790).is_err());
    }

    #[test]
    fn dividing_layers_follows_free_memory_within_what_fits() {
        let cost = splittable(M).split.unwrap();
        assert_eq!(divide(&cost, 1000, &[1000]), Some(vec![15, 15]));
        // The worker's hive can hold only 2 layers: the lender takes the rest.
        assert_eq!(divide(&cost, 190, &[2000]), Some(vec![2, 28]));
        // A lender that cannot hold one layer takes no part.
        assert_eq!(divide(&cost, 1000, &[80]), None);
        assert_eq!(divide(&cost, 100, &[2000]), None);
    }
}
