//! What the maps cost in memory, and whether this process's memory cgroup can hold them. BPF
//! maps are charged to the cgroup of the process that creates them (the agent's pod), so a pod
//! limit below this is an OOM kill at start; the figures are measured (tests/tests/memory.rs)
//! and documented beside the DaemonSet's limit.

use std::fs;

use crate::model::{Desired, Settings};

/// The process and the fixed-size maps (VIPs, addresses, backends, table descriptions,
/// `VIP_BY_ID`: sized for `MAX_VIPS`, `MAX_BACKENDS` and `MAX_TABLES` whatever is used).
const BASE: u64 = 80 << 20;
/// One connection-table entry: the IPv4 table's, plus its quarter-sized IPv6 sibling's share.
const PER_FLOW: u64 = 116;
/// One Maglev table slot: a 4-byte backend id, two per 8-byte element of an mmapable array.
const PER_MAGLEV_SLOT: u64 = 4;
/// A table's own overhead: its page rounding and the map's structure.
const PER_MAGLEV_TABLE: u64 = 8192;
/// One (table, backend) membership in `TABLE_MEMBERS` (a hash element, allocated as used).
const PER_MEMBER: u64 = 96;
/// Per-CPU counters of every VIP and backend entry, per possible CPU.
const PER_CPU: u64 = (lb_common::MAX_VIPS as u64 + lb_common::MAX_BACKENDS as u64)
    * size_of::<lb_common::Counters>() as u64;

/// The distinct Maglev tables a model needs: their sizes and members. VIPs with the same
/// backends and weights share one (every `externalTrafficPolicy: Cluster` VIP of a cluster),
/// so this grows with distinct backend sets, not with VIPs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub sizes: Vec<u32>,
    pub members: usize,
}

/// Memory the maps take with `settings` and these tables, on `cpus` possible CPUs.
pub fn estimate(settings: &Settings, tables: &Tables, cpus: usize) -> u64 {
    let slots: u64 = tables.sizes.iter().map(|s| u64::from(*s)).sum();
    BASE + u64::from(settings.connection_table_size()) * PER_FLOW
        + slots * PER_MAGLEV_SLOT
        + tables.sizes.len() as u64 * PER_MAGLEV_TABLE
        + tables.members as u64 * PER_MEMBER
        + cpus as u64 * PER_CPU
}

/// The distinct tables of `desired`.
pub fn tables(desired: &Desired) -> Tables {
    let mut seen = std::collections::HashSet::new();
    let mut out = Tables::default();
    for (list, mode) in desired.distinct_backend_lists() {
        if seen.insert(crate::model::table_key(mode, list)) {
            out.sizes
                .push(desired.settings.maglev_table_size_for(list.len()));
            out.members += list.len();
        }
    }
    out
}

/// This process's memory cgroup limit, if it has one (cgroup v2 or v1). Inside a container the
/// runtime mounts the process's own cgroup at the hierarchy's root, so the root is tried too.
pub fn cgroup_limit() -> Option<u64> {
    let own = fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (root, file) = match controllers {
            "" => ("/sys/fs/cgroup", "memory.max"),
            c if c.split(',').any(|c| c == "memory") => {
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            }
            _ => continue,
        };
        let text = fs::read_to_string(format!("{root}{path}/{file}"))
            .or_else(|_| fs::read_to_string(format!("{root}/{file}")))
            .ok()?;
        // "max" (v2) or a huge page-rounded number (v1) mean no limit.
        return text.trim().parse().ok().filter(|l| *l < u64::MAX >> 2);
    }
    None
}

/// The number of possible CPUs (`0-63,128`-style ranges): per-CPU maps hold one value each.
fn possible_cpus() -> Option<usize> {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").ok()?;
    let mut n = 0;
    for range in text.trim().split(',') {
        n += match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1,
            None => 1,
        };
    }
    Some(n)
}

/// A warning when the cgroup's limit cannot hold the maps `desired` needs.
pub fn check(desired: &Desired) -> Option<String> {
    let limit = cgroup_limit()?;
    let cpus = possible_cpus()?;
    let tables = tables(desired);
    let need = estimate(&desired.settings, &tables, cpus);
    let slots: u64 = tables.sizes.iter().map(|s| u64::from(*s)).sum();
    (need > limit).then(|| {
        format!(
            "the memory limit ({} MiB) is below what the maps need for {} VIPs (~{} MiB: flow table {} x {PER_FLOW} B, {} distinct Maglev tables of {slots} slots x {PER_MAGLEV_SLOT} B, {cpus} CPUs): the kernel will kill this process; raise the pod's limit or lower --flow-table-size / --maglev-table-size (see deploy/base/30-daemonset.yaml)",
            limit >> 20,
            desired.vips.len(),
            need >> 20,
            desired.settings.connection_table_size(),
            tables.sizes.len(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Vip, VipAddr};

    #[test]
    fn estimate_matches_the_measured_figures() {
        // Measured with 2 possible CPUs (tests/tests/memory.rs): 300 VIPs of the same 3 nodes
        // (one 4093-slot table) and the defaults charge 162 MiB of maps (peak 189 MiB while
        // attaching); the estimate adds the process and stays above.
        let one = Tables {
            sizes: vec![4093],
            members: 3,
        };
        let need = estimate(&Settings::default(), &one, 2) >> 20;
        assert!((190..=215).contains(&need), "{need} MiB");
        // Without VIPs, the connection table dominates: ~111 MiB for 1M entries.
        let flows = (estimate(&Settings::default(), &Tables::default(), 0) - BASE) >> 20;
        assert!((105..=120).contains(&flows), "{flows} MiB");
        // Second chance records no flow: the smallest table, whatever the size says; `auto`
        // may run table mode and keeps it.
        let with = |flow_state| Settings {
            flow_state,
            ..Settings::default()
        };
        let none = estimate(
            &with(crate::model::FlowState::SecondChance),
            &Tables::default(),
            0,
        );
        assert_eq!(
            none - BASE,
            u64::from(lb_common::MIN_FLOW_TABLE_SIZE) * PER_FLOW
        );
        let auto = estimate(&with(crate::model::FlowState::Auto), &Tables::default(), 0);
        assert_eq!((auto - BASE) >> 20, flows);
    }

    #[test]
    fn vips_with_the_same_backends_count_one_table() {
        let backends = |n: u8| -> Vec<Backend> {
            (1..=n)
                .map(|i| Backend {
                    addr: std::net::IpAddr::from([10, 0, 0, i]),
                    mac: None,
                    weight: 1,
                    drain: false,
                })
                .collect()
        };
        let vip = |i: u32, n: u8| {
            Vip::new(
                VipAddr {
                    addr: std::net::IpAddr::from([10, 1, (i / 250) as u8, (i % 250) as u8]),
                    port: 80,
                    protocol: crate::model::Protocol::Tcp,
                },
                backends(n),
            )
        };
        let mut vips: Vec<Vip> = (0..1000).map(|i| vip(i, 100)).collect();
        vips.push(vip(1000, 3));
        let desired = Desired {
            vips,
            ..Desired::default()
        };
        let t = tables(&desired);
        assert_eq!(t.sizes.len(), 2, "{t:?}");
        assert_eq!(t.members, 103);
    }
}
