//! What the maps cost in memory, and whether this process's memory cgroup can hold them. BPF
//! maps are charged to the cgroup of the process that creates them (the agent's pod), so a pod
//! limit below this is an OOM kill at start; the figures are measured (tests/tests/memory.rs)
//! and documented beside the DaemonSet's limit.

use std::fs;

use crate::model::{Desired, Settings};

/// The process and the fixed-size maps.
const BASE: u64 = 64 << 20;
/// One connection-table entry: the IPv4 table's, plus its quarter-sized IPv6 sibling's share.
const PER_FLOW: u64 = 116;
/// One Maglev table slot: a 4-byte backend id, two per 8-byte element of an mmapable array.
const PER_MAGLEV_SLOT: u64 = 4;
/// A table's own overhead: its page rounding, the map's structure and its fingerprint.
const PER_MAGLEV_TABLE: u64 = 8192;
/// Per-CPU counters of every VIP and backend slot, per possible CPU.
const PER_CPU: u64 = (lb_common::MAX_VIPS as u64 + lb_common::MAX_BACKENDS as u64)
    * size_of::<lb_common::Counters>() as u64;

/// Memory the maps take with `settings` and Maglev tables of these sizes, on `cpus` possible
/// CPUs.
pub fn estimate(settings: &Settings, table_sizes: &[u32], cpus: usize) -> u64 {
    let slots: u64 = table_sizes.iter().map(|s| u64::from(*s)).sum();
    BASE + u64::from(settings.flow_table_size) * PER_FLOW
        + slots * PER_MAGLEV_SLOT
        + table_sizes.len() as u64 * PER_MAGLEV_TABLE
        + cpus as u64 * PER_CPU
}

/// Every VIP's Maglev table size.
pub fn table_sizes(desired: &Desired) -> Vec<u32> {
    desired
        .vips
        .iter()
        .map(|v| desired.settings.maglev_table_size_for(v.backends.len()))
        .collect()
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
    let sizes = table_sizes(desired);
    let need = estimate(&desired.settings, &sizes, cpus);
    let slots: u64 = sizes.iter().map(|s| u64::from(*s)).sum();
    (need > limit).then(|| {
        format!(
            "the memory limit ({} MiB) is below what the maps need for {} VIPs (~{} MiB: flow table {} x {PER_FLOW} B, {slots} Maglev slots x {PER_MAGLEV_SLOT} B, {cpus} CPUs): the kernel will kill this process; raise the pod's limit or lower --flow-table-size / --maglev-table-size (see deploy/base/30-daemonset.yaml)",
            limit >> 20,
            desired.vips.len(),
            need >> 20,
            desired.settings.flow_table_size,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_matches_the_measured_figures() {
        // Measured with 2 possible CPUs (tests/tests/memory.rs): 300 VIPs of 3 nodes (4093-slot
        // tables) and the defaults charge 124 MiB of maps; the estimate adds the process's
        // 64 MiB and stays above.
        let need = estimate(&Settings::default(), &[4093; 300], 2) >> 20;
        assert!((124 + 40..=124 + 80).contains(&need), "{need} MiB");
        // Without VIPs, the connection table dominates: ~111 MiB for 1M entries.
        let flows = (estimate(&Settings::default(), &[], 0) - BASE) >> 20;
        assert!((105..=120).contains(&flows), "{flows} MiB");
    }
}
