//! Who checks whom, and how many must agree: health checks whose cost does not grow with the
//! cluster (issue 27).
//!
//! The Ready nodes sit on a ring, ordered by a hash of their names (so neighbours on the ring
//! are not neighbours by name, rack or age). Each node probes itself and its [`SUCCESSORS`] next
//! nodes on the ring, and publishes on its own Lease which of them it finds down ([`super::votes`]).
//! So every node is watched by itself and its [`SUCCESSORS`] predecessors, and a node is down
//! for everyone when [`quorum`] of its watchers say so. Every agent reads the same Leases and
//! knows the same Nodes, so every agent reaches the same verdict and builds the same tables.
//!
//! Why these numbers (measured by the simulation in `sim.rs`, N = 1,000 and 5,000, 1 % loss):
//! - [`SUCCESSORS`] = 8: a node probes 9 targets per check, one per second each (the default
//!   interval): 9 probes per second, under the 10, whatever N is. Eight watchers besides
//!   itself leave a quorum of three reachable while up to five of them are dead at once.
//! - [`QUORUM`] = 3: with 1 % packet loss a probe fails ~4 % of the time (four packets), so a
//!   single watcher now and then sees three failures in a row of a live node (the simulation
//!   counts hundreds of such lone verdicts per run at N = 5,000), and holds it at least 5 s
//!   (the hold-down). A quorum of two makes that a drain whenever two of a node's nine watchers
//!   err in the same few seconds: the simulation at twice the loss (2 %) shows live nodes drained
//!   with two and none with three. A dead node is seen by all its watchers within 2.5 s (fall 3,
//!   interval 1 s, timeout 500 ms): waiting for the third-earliest of eight probe phases costs
//!   little (measured: worst 2.4 s from death to drained everywhere).
//! - Small clusters: with `SUCCESSORS >= N - 1` everyone probes everyone, and the quorum is at
//!   most the number of the other nodes (`N - 1`), so 3 nodes need 2 votes, 2 nodes need 1.

use std::collections::BTreeSet;

/// How many successors on the ring each node probes (besides itself).
pub const SUCCESSORS: usize = 8;
/// How many of a node's watchers must say it is down (at most the number of other nodes).
pub const QUORUM: usize = 3;

/// The Ready nodes in ring order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    /// Sorted by (hash of the name, name): the same order on every node.
    order: Vec<String>,
}

/// FNV-1a, 64 bits, then SplitMix64's finalizer: stable across versions and machines (the ring
/// must be the same everywhere; std's hashers promise no such thing). The finalizer matters:
/// FNV alone puts `node-1` and `node-2` (one last byte apart) side by side on the ring.
fn position(name: &str) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Ring {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Ring {
        let unique: BTreeSet<&str> = names.into_iter().collect();
        let mut order: Vec<String> = unique.into_iter().map(str::to_owned).collect();
        order.sort_by_cached_key(|n| (position(n), n.clone()));
        Ring { order }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index(name).is_some()
    }

    fn index(&self, name: &str) -> Option<usize> {
        // The order is by (position, name): a binary search finds a name.
        self.order
            .binary_search_by(|n| (position(n), n.as_str()).cmp(&(position(name), name)))
            .ok()
    }

    /// How many others each node probes here: [`SUCCESSORS`], or all the others if fewer.
    fn span(&self) -> usize {
        SUCCESSORS.min(self.order.len().saturating_sub(1))
    }

    /// Whom `me` probes: itself and its successors (nothing if it is not on the ring).
    pub fn watched_by(&self, me: &str) -> Vec<&str> {
        let Some(i) = self.index(me) else {
            return Vec::new();
        };
        let n = self.order.len();
        (0..=self.span())
            .map(|d| self.order[(i + d) % n].as_str())
            .collect()
    }

    /// Who probes `node`: itself and its predecessors (nothing if it is not on the ring).
    pub fn watchers(&self, node: &str) -> Vec<&str> {
        let Some(i) = self.index(node) else {
            return Vec::new();
        };
        let n = self.order.len();
        (0..=self.span())
            .map(|d| self.order[(i + n - d) % n].as_str())
            .collect()
    }

    /// Whether `writer`'s verdict on `node` counts (it is one of `node`'s watchers).
    pub fn watches(&self, writer: &str, node: &str) -> bool {
        let (Some(w), Some(x)) = (self.index(writer), self.index(node)) else {
            return false;
        };
        let n = self.order.len();
        (x + n - w) % n <= self.span()
    }

    /// How many watchers must say a node is down: [`QUORUM`], or all the other nodes when there
    /// are fewer; `None` for a ring of one (nobody else to ask: nothing is drained by vote).
    pub fn quorum(&self) -> Option<usize> {
        let others = self.order.len().saturating_sub(1);
        (others > 0).then(|| QUORUM.min(others))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn ring(names: &[String]) -> Ring {
        Ring::new(names.iter().map(String::as_str))
    }

    #[test]
    fn small_clusters_probe_everyone() {
        for n in 1..=SUCCESSORS + 1 {
            let all = names(n);
            let r = ring(&all);
            for me in &all {
                let mut w = r.watched_by(me);
                assert_eq!(w[0], me, "itself first");
                w.sort_unstable();
                let mut want: Vec<&str> = all.iter().map(String::as_str).collect();
                want.sort_unstable();
                assert_eq!(w, want, "{n} nodes: {me} probes everyone");
            }
            assert_eq!(r.quorum(), (n > 1).then(|| QUORUM.min(n - 1)));
        }
        // The lab's three nodes: two votes; two nodes: one.
        assert_eq!(ring(&names(3)).quorum(), Some(2));
        assert_eq!(ring(&names(2)).quorum(), Some(1));
    }

    #[test]
    fn large_clusters_probe_a_bounded_set_and_everyone_is_watched_alike() {
        for n in [10, 1_000, 5_000] {
            let all = names(n);
            let r = ring(&all);
            let mut watched: BTreeMap<&str, usize> = BTreeMap::new();
            for me in &all {
                let w = r.watched_by(me);
                assert_eq!(w.len(), SUCCESSORS + 1, "{n} nodes: {me} probes {w:?}");
                assert_eq!(w.iter().collect::<BTreeSet<_>>().len(), w.len());
                for t in &w {
                    *watched.entry(t).or_default() += 1;
                    assert!(r.watches(me, t), "{me} watches {t}");
                }
            }
            // Each node is probed by exactly itself and SUCCESSORS others.
            assert_eq!(watched.len(), n);
            assert!(watched.values().all(|c| *c == SUCCESSORS + 1));
            // `watchers` is the inverse of `watched_by`.
            for x in all.iter().step_by(97) {
                for w in r.watchers(x) {
                    assert!(r.watched_by(w).contains(&x.as_str()), "{w} watches {x}");
                }
                let outsider = all
                    .iter()
                    .find(|o| !r.watchers(x).contains(&o.as_str()))
                    .unwrap();
                assert!(!r.watches(outsider, x), "{outsider} is no watcher of {x}");
            }
            assert_eq!(r.quorum(), Some(QUORUM));
        }
    }

    #[test]
    fn the_same_ring_from_any_order_and_little_moves_on_churn() {
        let all = names(1_000);
        let mut reversed = all.clone();
        reversed.reverse();
        assert_eq!(ring(&all), ring(&reversed));
        // Not name order: neighbours by name are spread over the ring (node-i watches about
        // as many of node-(i+1)..node-(i+8) as chance would have it: 8 x 8/999 each, ~64 in
        // all; at most twice that).
        let r = ring(&all);
        let by_name: usize = (0..992)
            .map(|i| {
                let w = r.watched_by(&all[i]);
                (1..=SUCCESSORS)
                    .filter(|d| w.contains(&all[i + d].as_str()))
                    .count()
            })
            .sum();
        assert!(by_name < 128, "{by_name} of 7,936 name neighbours watched");
        // One node gone: only its watchers' assignments change.
        let without: Vec<String> = all.iter().filter(|n| *n != "node-500").cloned().collect();
        let r2 = ring(&without);
        let moved = without
            .iter()
            .filter(|n| r.watched_by(n) != r2.watched_by(n))
            .count();
        assert_eq!(moved, SUCCESSORS, "{moved} assignments moved");
        assert!(r2.watched_by("node-500").is_empty() && r2.watchers("node-500").is_empty());
    }
}
