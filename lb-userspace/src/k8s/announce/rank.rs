//! Which node should announce each VIP address: rendezvous (highest-random-weight) hashing of
//! (address, node name), with bounded loads. Every agent computes the same plan from the same
//! addresses and candidates, with no state and no coordination.
//!
//! Plain rendezvous hashing sends each address to its node of highest weight: when a node
//! leaves, only its addresses move. But its spread is random: 30 addresses over 3 nodes put
//! 13 or more on one node about every other time. So the plan gives each node at most
//! ceil(addresses / nodes) + [`SLACK`] addresses: the addresses, in their order, each take
//! their highest-weight node that still has room. When a node leaves, its addresses move, and
//! a few others: those the bound had held off a node they prefer (it rises), and those the
//! leaving node's addresses crowd out of a node now full (5 % of the moves, measured in the
//! unit test).
//!
//! The weight is a fixed function (FNV-1a over the address's bytes and the name, then the
//! splitmix64 finaliser to spread FNV's weak low bits): it must be the same in every agent of
//! every version that may run side by side during an upgrade, so it is spelt out here rather
//! than taken from a hasher whose output may change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// How many addresses a node may hold beyond an even share.
pub const SLACK: usize = 2;

/// The weight of `node` for `addr`: the higher, the more preferred.
pub fn weight(addr: IpAddr, node: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let addr_bytes = match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    // A separator, so that no (address, name) pair hashes the bytes of another.
    let bytes = addr_bytes.iter().chain(&[0xff]).chain(node.as_bytes());
    let fnv = bytes.fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    });
    splitmix64(fnv)
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `nodes` in order of weight for `addr` (highest first, ties by name, each once), whatever
/// order they come in.
pub fn ranking<'a>(addr: IpAddr, nodes: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = nodes.into_iter().map(|n| (weight(addr, n), n)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, n)| n).collect()
}

/// The most addresses one node is given: ceil(addresses / nodes) + [`SLACK`].
pub fn bound(addresses: usize, nodes: usize) -> usize {
    addresses.div_ceil(nodes.max(1)) + SLACK
}

/// Who announces what: each address's node order, the node it is given first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    order: BTreeMap<IpAddr, Vec<String>>,
}

impl Plan {
    /// The plan for `addrs` over `nodes` (the live candidates).
    pub fn new<'a>(addrs: &BTreeSet<IpAddr>, nodes: impl IntoIterator<Item = &'a str>) -> Plan {
        let nodes: BTreeSet<&str> = nodes.into_iter().collect();
        let bound = bound(addrs.len(), nodes.len());
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        let mut order = BTreeMap::new();
        for addr in addrs {
            let mut ranked = ranking(*addr, nodes.iter().copied());
            // Bounded: the first with room goes first, the rest keep their order (the
            // takeover waits of the others).
            if let Some(i) = ranked
                .iter()
                .position(|n| load.get(n).copied().unwrap_or(0) < bound)
            {
                let given = ranked.remove(i);
                *load.entry(given).or_default() += 1;
                ranked.insert(0, given);
            }
            order.insert(*addr, ranked.into_iter().map(str::to_owned).collect());
        }
        Plan { order }
    }

    /// The node given `addr` (`None`: not planned, or no candidate).
    pub fn preferred(&self, addr: IpAddr) -> Option<&str> {
        self.order.get(&addr)?.first().map(String::as_str)
    }

    /// `node`'s place in `addr`'s order (0: given it), `None` when it is no candidate.
    pub fn rank(&self, addr: IpAddr, node: &str) -> Option<usize> {
        self.order.get(&addr)?.iter().position(|n| n == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// 30 consecutive addresses from `10.a.b.32`, as the lab's pools are laid out.
    fn thirty(a: u8, b: u8) -> BTreeSet<IpAddr> {
        (0..30)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, a, b, 32 + i)))
            .collect()
    }

    fn given<'a>(plan: &'a Plan, addrs: &BTreeSet<IpAddr>) -> BTreeMap<IpAddr, &'a str> {
        addrs
            .iter()
            .map(|a| (*a, plan.preferred(*a).expect("planned")))
            .collect()
    }

    #[test]
    fn the_plan_depends_on_the_candidates_not_their_order() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            ranking(a, ["node-0", "node-1", "node-2"]),
            ranking(a, ["node-2", "node-0", "node-1", "node-0"])
        );
        let addrs = thirty(0, 128);
        let one = Plan::new(&addrs, ["node-0", "node-1", "node-2"]);
        let other = Plan::new(&addrs, ["node-2", "node-1", "node-0"]);
        assert_eq!(one, other);
        // Fixed across versions: the weight is spelt out, not a std hasher's.
        assert_eq!(
            weight(a, "node-0"),
            0xb1c1_a626_28ff_d97d,
            "{:#x}",
            weight(a, "node-0")
        );
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let plan = Plan::new(&BTreeSet::from([v6]), ["x", "y"]);
        assert_eq!(plan.rank(v6, "z"), None);
        assert!(plan.rank(v6, "y").is_some());
        assert!(Plan::new(&BTreeSet::from([v6]), []).preferred(v6).is_none());
    }

    /// 30 addresses over 3 nodes land on all 3, none with more than ceil(30/3)+2 = 12: for
    /// every one of 256 address ranges (plain rendezvous hashing breaks the bound for about
    /// half of them).
    #[test]
    fn thirty_addresses_spread_over_three_nodes() {
        let nodes = ["node-0", "node-1", "node-2"];
        let mut unbounded_over = 0;
        for b in 0..=255 {
            let addrs = thirty(7, b);
            let plan = Plan::new(&addrs, nodes);
            let mut count: BTreeMap<&str, usize> = BTreeMap::new();
            for n in given(&plan, &addrs).values() {
                *count.entry(n).or_default() += 1;
            }
            assert_eq!(count.len(), 3, "10.7.{b}.32: {count:?}");
            assert!(count.values().all(|c| *c <= 12), "10.7.{b}.32: {count:?}");
            let mut plain: BTreeMap<&str, usize> = BTreeMap::new();
            for a in &addrs {
                *plain.entry(ranking(*a, nodes)[0]).or_default() += 1;
            }
            unbounded_over += usize::from(plain.values().any(|c| *c > 12));
        }
        assert!(
            unbounded_over > 50,
            "the bound never mattered: {unbounded_over}"
        );
    }

    /// A node leaving moves its own addresses; of the others, only those the bound had held
    /// off a node they prefer, or that the leaving node's addresses now crowd out, and few:
    /// under 10 % of the moves (measured: 104 against 1920, 5.4 %), over 64 address ranges and
    /// each of 4 nodes leaving. (Plain rendezvous hashing moves none of them, and breaks the
    /// bound; assigning round-robin in address order moves most of them.)
    #[test]
    fn a_leaving_node_moves_its_own_addresses_and_few_others() {
        let all = ["node-0", "node-1", "node-2", "node-3"];
        let (mut own, mut others) = (0, 0);
        for b in 0..=63 {
            let addrs = thirty(9, b);
            let before_plan = Plan::new(&addrs, all);
            let before = given(&before_plan, &addrs);
            for gone in all {
                let rest: Vec<&str> = all.iter().copied().filter(|n| *n != gone).collect();
                let after_plan = Plan::new(&addrs, rest.iter().copied());
                let after = given(&after_plan, &addrs);
                for a in &addrs {
                    if before[a] == gone {
                        own += 1;
                    } else if after[a] != before[a] {
                        others += 1;
                    }
                }
            }
        }
        println!("{own} addresses moved off the leaving node, {others} others");
        assert!(others * 10 < own, "{others} others moved, {own} own");
    }
}
