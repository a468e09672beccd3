//! Mixed precision as a multiple-choice knapsack: each layer picks one bit width, each choice
//! costs bytes and adds sensitivity; the Pareto frontier holds every assignment no other beats
//! on both. Dynamic programming over layers keeps only non-dominated partial assignments.

use serde::Serialize;

/// One option for one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub bits: u8,
    /// Bytes this layer occupies with this choice.
    pub bytes: u64,
    /// Its sensitivity (e.g. KL of the output when only this layer is quantized so).
    pub sensitivity: f64,
}

/// A whole-model assignment on the frontier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub bytes: u64,
    pub sensitivity: f64,
    /// Bits per layer, in layer order.
    pub bits: Vec<u8>,
}

/// The Pareto frontier of `base + sum(bytes)` against `sum(sensitivity)`, sorted by bytes
/// ascending with sensitivity strictly descending. `options[i]` are layer i's choices (non-empty).
pub fn frontier(base: u64, options: &[Vec<Choice>]) -> Vec<Point> {
    let mut states: Vec<(u64, f64, Vec<u8>)> = vec![(base, 0.0, Vec::new())];
    for (i, opts) in options.iter().enumerate() {
        assert!(!opts.is_empty(), "layer {i} has no choices");
        let mut next: Vec<(u64, f64, Vec<u8>)> = Vec::with_capacity(states.len() * opts.len());
        for (b, s, bits) in &states {
            for c in opts {
                let mut nb = Vec::with_capacity(options.len());
                nb.extend_from_slice(bits);
                nb.push(c.bits);
                next.push((b + c.bytes, s + c.sensitivity, nb));
            }
        }
        next.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        states.clear();
        let mut best = f64::INFINITY;
        for st in next {
            if st.1 < best {
                best = st.1;
                states.push(st);
            }
        }
    }
    states
        .into_iter()
        .map(|(bytes, sensitivity, bits)| Point {
            bytes,
            sensitivity,
            bits,
        })
        .collect()
}

/// The least sensitive point that fits `budget` bytes (None: nothing fits).
pub fn pick(frontier: &[Point], budget: u64) -> Option<&Point> {
    frontier.iter().rfind(|p| p.bytes <= budget)
}

/// A choice with a second cost (bit-operations: MACs x weight bits x activation bits).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BopsChoice {
    pub bits: u8,
    pub bytes: u64,
    pub bops: u64,
    pub sensitivity: f64,
}

/// A whole-model assignment with both costs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BopsPoint {
    pub bytes: u64,
    pub bops: u64,
    pub sensitivity: f64,
    pub bits: Vec<u8>,
}

/// Every assignment not dominated in (bytes, bops, sensitivity), by the same dynamic programme
/// with three-way dominance pruning (a staircase of bops -> least sensitivity over the states
/// already kept, which all cost fewer or equal bytes).
pub fn frontier_with_bops(base_bytes: u64, options: &[Vec<BopsChoice>]) -> Vec<BopsPoint> {
    use std::collections::BTreeMap;
    let mut states: Vec<BopsPoint> = vec![BopsPoint {
        bytes: base_bytes,
        bops: 0,
        sensitivity: 0.0,
        bits: Vec::new(),
    }];
    for (i, opts) in options.iter().enumerate() {
        assert!(!opts.is_empty(), "layer {i} has no choices");
        let mut next = Vec::with_capacity(states.len() * opts.len());
        for st in &states {
            for c in opts {
                let mut bits = Vec::with_capacity(options.len());
                bits.extend_from_slice(&st.bits);
                bits.push(c.bits);
                next.push(BopsPoint {
                    bytes: st.bytes + c.bytes,
                    bops: st.bops + c.bops,
                    sensitivity: st.sensitivity + c.sensitivity,
                    bits,
                });
            }
        }
        next.sort_by(|a, b| {
            a.bytes
                .cmp(&b.bytes)
                .then(a.bops.cmp(&b.bops))
                .then(a.sensitivity.total_cmp(&b.sensitivity))
        });
        states.clear();
        // bops -> least sensitivity among kept states; sensitivities fall as bops rise.
        let mut stair: BTreeMap<u64, f64> = BTreeMap::new();
        for p in next {
            if stair
                .range(..=p.bops)
                .next_back()
                .is_some_and(|(_, &s)| s <= p.sensitivity)
            {
                continue;
            }
            let worse: Vec<u64> = stair
                .range(p.bops..)
                .take_while(|(_, &s)| s >= p.sensitivity)
                .map(|(&b, _)| b)
                .collect();
            for b in worse {
                stair.remove(&b);
            }
            stair.insert(p.bops, p.sensitivity);
            states.push(p);
        }
    }
    states
}

/// The least sensitive assignment within both budgets (None: nothing fits).
pub fn pick_with_bops(points: &[BopsPoint], max_bytes: u64, max_bops: u64) -> Option<&BopsPoint> {
    points
        .iter()
        .filter(|p| p.bytes <= max_bytes && p.bops <= max_bops)
        .min_by(|a, b| a.sensitivity.total_cmp(&b.sensitivity))
}

/// Why no assignment fits the budgets, with the figures a user needs to choose a feasible one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Infeasible {
    /// The BOPs budget is below every layer at its fewest bits.
    Bops { budget: u64, least: u64, bits: u8 },
    /// Each budget alone can be met, but not both together.
    Both { bytes: u64 },
    /// The byte budget is below the smallest frontier point.
    Bytes {
        budget: u64,
        smallest: u64,
        bits: u8,
    },
}

/// Diagnose an empty choice: `smallest` is the frontier's smallest size, `least_bops` the
/// bit-operations with every layer at `fewest_bits`.
pub fn diagnose(
    budget: u64,
    bops_budget: Option<u64>,
    smallest: u64,
    least_bops: u64,
    fewest_bits: u8,
) -> Infeasible {
    match bops_budget {
        Some(b) if b < least_bops => Infeasible::Bops {
            budget: b,
            least: least_bops,
            bits: fewest_bits,
        },
        Some(_) if budget >= smallest => Infeasible::Both { bytes: budget },
        _ => Infeasible::Bytes {
            budget,
            smallest,
            bits: fewest_bits,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn brute(base: u64, options: &[Vec<Choice>], budget: u64) -> Option<f64> {
        let o: Vec<Vec<BopsChoice>> = options
            .iter()
            .map(|l| {
                l.iter()
                    .map(|c| BopsChoice {
                        bits: c.bits,
                        bytes: c.bytes,
                        bops: 0,
                        sensitivity: c.sensitivity,
                    })
                    .collect()
            })
            .collect();
        brute_with_bops(base, &o, budget, u64::MAX)
    }

    fn brute_with_bops(
        base: u64,
        o: &[Vec<BopsChoice>],
        max_bytes: u64,
        max_bops: u64,
    ) -> Option<f64> {
        let n = o.len();
        let mut idx = vec![0usize; n];
        let mut best: Option<f64> = None;
        loop {
            let bytes: u64 = base + (0..n).map(|i| o[i][idx[i]].bytes).sum::<u64>();
            let bops: u64 = (0..n).map(|i| o[i][idx[i]].bops).sum::<u64>();
            let s: f64 = (0..n).map(|i| o[i][idx[i]].sensitivity).sum();
            if bytes <= max_bytes && bops <= max_bops && best.is_none_or(|b| s < b) {
                best = Some(s);
            }
            let mut k = 0;
            loop {
                if k == n {
                    return best;
                }
                idx[k] += 1;
                if idx[k] < o[k].len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
        }
    }

    proptest! {
        #[test]
        fn two_budgets_are_optimal(
            raw in proptest::collection::vec(proptest::collection::vec((1u64..50, 1u64..60, 0u32..1000), 1..4), 1..6),
            max_bytes in 0u64..250,
            max_bops in 0u64..250,
        ) {
            let o: Vec<Vec<BopsChoice>> = raw
                .iter()
                .map(|l| l.iter().enumerate().map(|(k, &(b, p, s))| BopsChoice { bits: k as u8, bytes: b, bops: p, sensitivity: f64::from(s) / 100.0 }).collect())
                .collect();
            let f = frontier_with_bops(10, &o);
            let got = pick_with_bops(&f, max_bytes, max_bops).map(|p| p.sensitivity);
            let want = brute_with_bops(10, &o, max_bytes, max_bops);
            match (got, want) {
                (Some(a), Some(b)) => prop_assert!((a - b).abs() < 1e-9, "{} vs {}", a, b),
                (a, b) => prop_assert_eq!(a.is_some(), b.is_some()),
            }
        }

        #[test]
        fn frontier_is_monotone_and_optimal(
            raw in proptest::collection::vec(proptest::collection::vec((1u64..50, 0u32..1000), 1..4), 1..6),
            budget in 0u64..250,
        ) {
            let options: Vec<Vec<Choice>> = raw
                .iter()
                .map(|l| l.iter().enumerate().map(|(k, &(b, s))| Choice { bits: k as u8, bytes: b, sensitivity: f64::from(s) / 100.0 }).collect())
                .collect();
            let f = frontier(10, &options);
            for w in f.windows(2) {
                prop_assert!(w[0].bytes < w[1].bytes || (w[0].bytes == w[1].bytes && w[0].sensitivity > w[1].sensitivity));
                prop_assert!(w[0].sensitivity > w[1].sensitivity);
            }
            for p in &f {
                let bytes: u64 = 10 + p.bits.iter().enumerate().map(|(i, &k)| options[i][k as usize].bytes).sum::<u64>();
                prop_assert_eq!(bytes, p.bytes);
            }
            // The two-cost programme with a bops budget no constraint reaches agrees.
            let with_bops: Vec<Vec<BopsChoice>> = options.iter().map(|l| l.iter().map(|c| BopsChoice { bits: c.bits, bytes: c.bytes, bops: c.bytes * 3 % 7, sensitivity: c.sensitivity }).collect()).collect();
            let bops_front = frontier_with_bops(10, &with_bops);
            let got_with_bops = pick_with_bops(&bops_front, budget, u64::MAX).map(|p| p.sensitivity);
            let got = pick(&f, budget).map(|p| p.sensitivity);
            prop_assert_eq!(got.map(|v| (v * 1e6).round()), got_with_bops.map(|v| (v * 1e6).round()));
            let want = brute(10, &options, budget);
            match (got, want) {
                (Some(a), Some(b)) => prop_assert!((a - b).abs() < 1e-9, "{} vs {}", a, b),
                (a, b) => prop_assert_eq!(a.is_some(), b.is_some()),
            }
        }
    }
}
