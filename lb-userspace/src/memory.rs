//! What the maps cost in memory, and whether this process's memory cgroup can hold them. BPF
//! maps are charged to the cgroup of the process that creates them (the agent's pod), so a pod
//! limit below this is an OOM kill at start; the figures are measured (tests/tests/memory.rs)
//! and documented beside the DaemonSet's limit.

use std::fs;

use crate::model::Settings;

/// The process and the fixed-size maps.
const BASE: u64 = 64 << 20;
/// One connection-table entry: the IPv4 table's, plus its quarter-sized IPv6 sibling's share.
const PER_FLOW: u64 = 116;
/// One Maglev table slot (4-byte backend ids in a page-rounded, mmapable array, counted twice
/// for the table being replaced during a swap).
const PER_MAGLEV_SLOT: u64 = 8;
/// Per-CPU counters of every VIP and backend slot, per possible CPU.
const PER_CPU: u64 = (lb_common::MAX_VIPS as u64 + lb_common::MAX_BACKENDS as u64)
    * size_of::<lb_common::Counters>() as u64;

/// Memory the maps of `vips` VIPs take with `settings`, on `cpus` possible CPUs.
pub fn estimate(settings: &Settings, vips: usize, cpus: usize) -> u64 {
    BASE + u64::from(settings.flow_table_size) * PER_FLOW
        + vips as u64 * u64::from(settings.maglev_table_size) * PER_MAGLEV_SLOT
        + cpus as u64 * PER_CPU
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

/// A warning when the cgroup's limit cannot hold the maps for `vips` VIPs.
pub fn check(settings: &Settings, vips: usize) -> Option<String> {
    let limit = cgroup_limit()?;
    let cpus = possible_cpus()?;
    let need = estimate(settings, vips, cpus);
    (need > limit).then(|| {
        format!(
            "the memory limit ({} MiB) is below what the maps need for {vips} VIPs (~{} MiB: flow table {} x {PER_FLOW} B, Maglev {} slots x {PER_MAGLEV_SLOT} B per VIP, {cpus} CPUs): the kernel will kill this process; raise the pod's limit or lower --flow-table-size / --maglev-table-size (see deploy/30-daemonset.yaml)",
            limit >> 20,
            need >> 20,
            settings.flow_table_size,
            settings.maglev_table_size,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_matches_the_measured_figures() {
        // Measured with 2 possible CPUs (tests/tests/memory.rs): 300 VIPs and the defaults
        // charge 272 MiB of maps; the estimate adds the process's 64 MiB and stays above.
        let need = estimate(&Settings::default(), 300, 2) >> 20;
        assert!((272 + 40..=272 + 80).contains(&need), "{need} MiB");
        // Without VIPs, the connection table dominates: ~111 MiB for 1M entries.
        let flows = (estimate(&Settings::default(), 0, 0) - BASE) >> 20;
        assert!((105..=120).contains(&flows), "{flows} MiB");
    }
}
