//! The control law: each node's agent turns ITS OWN load (and the loads the others publish)
//! into its weight multiplier, a percentage of its base weight.
//!
//! - Bounded: never below [`FLOOR`] (one bad reading cannot starve a node), never above 100.
//! - Only a BUSY node (load >= [`BUSY`]) that is clearly above the mean of the fresh loads
//!   (by more than [`DEADBAND`]) steps down; a node below [`BUSY`] or clearly below the mean
//!   steps back up; in between it holds (hysteresis: small differences move nothing).
//! - Rate-limited: one step per control period, at most [`MAX_STEP`] points, proportional to the
//!   excess, in multiples of [`QUANTUM`] (fewer, coarser table changes).
//!
//! When everybody is equally busy nothing moves (shifting load cannot help); the lightest nodes
//! sit at 100 and the heavier ones settle where their load is within the dead band of the mean.

/// Lowest multiplier, percent.
pub const FLOOR: u32 = 10;
/// Multipliers are multiples of this (percent).
pub const QUANTUM: u32 = 5;
/// Largest change per control period (percentage points).
pub const MAX_STEP: u32 = 20;
/// Below this load a node is not busy: it never sheds, and drifts back to 100.
pub const BUSY: f64 = 0.5;
/// Differences from the mean load smaller than this move nothing.
pub const DEADBAND: f64 = 0.1;
/// Points per unit of excess load (0.6 above the mean: 30 points, capped at MAX_STEP).
const GAIN: f64 = 50.0;

/// The next multiplier of a node whose multiplier is `current`, whose (smoothed) load is `own`
/// and whose peers published `others` (fresh ones only).
pub fn next(current: u32, own: f64, others: &[f64]) -> u32 {
    let current = current.clamp(FLOOR, 100);
    let own = if own.is_finite() { own.max(0.0) } else { 0.0 };
    let fresh: Vec<f64> = others
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .map(|l| l.max(0.0))
        .collect();
    let mean = (own + fresh.iter().sum::<f64>()) / (fresh.len() + 1) as f64;
    let excess = own - mean;
    let step = |e: f64| {
        let points = (e.abs() * GAIN / f64::from(QUANTUM)).ceil() as u32 * QUANTUM;
        points.clamp(QUANTUM, MAX_STEP)
    };
    let target = if own < BUSY || excess < -DEADBAND {
        // Back up by how far it is from being busy, or below the mean, whichever is more.
        current + step((BUSY - own).max(-excess))
    } else if excess > DEADBAND {
        current.saturating_sub(step(excess))
    } else {
        current
    };
    quantize(target)
}

fn quantize(m: u32) -> u32 {
    (m / QUANTUM * QUANTUM).clamp(FLOOR, 100)
}

/// Exponential smoothing of the raw samples (one per control period): a spike must last to
/// move a weight.
pub fn smooth(previous: Option<f64>, sample: f64) -> f64 {
    match previous {
        Some(p) if p.is_finite() => 0.5 * p + 0.5 * sample,
        _ => sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_busy_node_goes_to_the_floor_and_back() {
        let mut m = 100;
        let mut steps = Vec::new();
        for _ in 0..8 {
            m = next(m, 0.95, &[0.05, 0.05]);
            steps.push(m);
        }
        assert_eq!(steps, [80, 60, 40, 20, 10, 10, 10, 10]);
        let mut back = Vec::new();
        for _ in 0..6 {
            m = next(m, 0.05, &[0.05, 0.05]);
            back.push(m);
        }
        assert_eq!(back, [30, 50, 70, 90, 100, 100]);
        // Near the busy line the steps are small.
        assert_eq!(next(50, 0.45, &[0.45, 0.45]), 55);
        // The idle ones never move.
        assert_eq!(next(100, 0.05, &[0.95, 0.05]), 100);
        // Everybody busy: nothing to gain by moving.
        assert_eq!(next(100, 0.9, &[0.92, 0.88]), 100);
        // Nonsense readings count as idle.
        assert_eq!(next(40, f64::NAN, &[f64::INFINITY]), 60);
    }

    /// A deterministic noise source (no dependency): xorshift.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % 10_000) as f64 / 10_000.0
        }
    }

    /// Many nodes of different capacity share a demand in proportion to their multipliers;
    /// each node's load is its share of the demand over its capacity, plus noise and its own
    /// background. Every node runs the law on its own smoothed load and the others' published
    /// loads (of the previous round, as the Leases would give them).
    fn simulate(nodes: usize, rounds: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<Vec<f64>>) {
        let mut noise = Noise(seed);
        let capacity: Vec<f64> = (0..nodes)
            .map(|i| if i % 5 == 0 { 0.4 } else { 1.0 })
            .collect();
        let background: Vec<f64> = (0..nodes).map(|i| if i == 1 { 0.6 } else { 0.0 }).collect();
        let demand = 0.6 * nodes as f64;
        let mut m = vec![100u32; nodes];
        let mut smoothed: Vec<Option<f64>> = vec![None; nodes];
        let mut published = vec![0.0f64; nodes];
        let (mut ms, mut loads) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let total: f64 = m.iter().map(|&x| f64::from(x)).sum();
            let raw: Vec<f64> = (0..nodes)
                .map(|i| {
                    let share = f64::from(m[i]) / total;
                    share * demand / capacity[i] + background[i] + (noise.next() - 0.5) * 0.1
                })
                .collect();
            for i in 0..nodes {
                smoothed[i] = Some(smooth(smoothed[i], raw[i]));
            }
            let snapshot = published.clone();
            for i in 0..nodes {
                let own = smoothed[i].unwrap_or(0.0);
                let others: Vec<f64> = (0..nodes)
                    .filter(|&j| j != i)
                    .map(|j| snapshot[j])
                    .collect();
                m[i] = next(m[i], own, &others);
                published[i] = own;
            }
            ms.push(m.clone());
            loads.push(raw);
        }
        (ms, loads)
    }

    #[test]
    fn simulation_converges_and_never_starves() {
        for seed in [1, 7, 42, 1234] {
            let nodes = 50;
            let (ms, loads) = simulate(nodes, 400, seed);
            // Never starved, never above neutral.
            for round in &ms {
                assert!(round.iter().all(|&m| (10..=100).contains(&m)), "{round:?}");
            }
            // The weak nodes (capacity 0.4) and the one with background load shed.
            let last = ms.last().unwrap();
            assert!(last[0] < 100 && last[1] < 100, "{last:?}");
            assert!(last[2] == 100, "{last:?}");
            // Spread of the loads: the busiest node ends far closer to the mean than at first.
            let spread = |l: &Vec<f64>| {
                let mean = l.iter().sum::<f64>() / l.len() as f64;
                l.iter().map(|x| x - mean).fold(0.0f64, f64::max)
            };
            let first = spread(&loads[0]);
            let end: f64 = loads[300..].iter().map(spread).sum::<f64>() / 100.0;
            assert!(
                end < first / 2.0,
                "seed {seed}: max excess {first:.2} at first, {end:.2} at the end"
            );
            // Settled: over the last 100 rounds no multiplier swings by more than two quanta,
            // and changes are rare (the noise alone would move them every round without the
            // dead band).
            let changes: usize = ms[300..]
                .windows(2)
                .map(|w| w[0].iter().zip(&w[1]).filter(|(a, b)| a != b).count())
                .sum();
            for node in 0..nodes {
                let seen: Vec<u32> = ms[300..].iter().map(|r| r[node]).collect();
                let (lo, hi) = (seen.iter().min(), seen.iter().max());
                let swing = hi.unwrap_or(&0) - lo.unwrap_or(&0);
                assert!(
                    swing <= 2 * QUANTUM,
                    "seed {seed}: node {node} swings by {swing} points: {seen:?}"
                );
            }
            assert!(
                changes <= 2 * nodes,
                "seed {seed}: {changes} multiplier changes in the last 100 rounds"
            );
            println!(
                "seed {seed}: max excess load {first:.2} -> {end:.2}; {changes} changes in the last 100 rounds; weak nodes at {:?}",
                (0..nodes).step_by(5).map(|i| last[i]).collect::<Vec<_>>()
            );
        }
    }
}
