//! Pinned connection tables of another size than the one wanted are replaced at load by tables
//! of the wanted size, their entries carried over. The size changes with `flow_table_size`, and
//! with the flow state: second chance records no flow and keeps the smallest table
//! (`Settings::connection_table_size`), so a node that leaves or enters that mode gets its
//! memory back, or its table, at the restart that applies it, without a detach.
//!
//! How: the old pin is renamed aside (`<NAME>-resized`) before the load, so the loader creates
//! the map afresh at the pin's path; the entries are copied over after the load; the old pin is
//! then removed. The old program keeps the old tables until the new one replaces it in the link:
//! a flow it records in between is not carried (it is picked by Maglev again, the same backend
//! while its VIP's table holds). A load that fails puts the old pins back.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use aya::maps::{HashMap, Map, MapData};
use aya::{Ebpf, Pod};
use lb_common::{FlowKey, FlowKey4, FlowValue, map_names};

use super::pins::PinLayout;

/// A pinned connection table set aside for one of another size.
pub(super) struct SetAside {
    name: &'static str,
    pinned: PathBuf,
    aside: PathBuf,
    old: MapData,
    /// Entries: the old table's (as the kernel made it) and the one wanted.
    from: u32,
    to: u32,
}

impl SetAside {
    /// Its old name back (a load that failed).
    fn restore(&self) {
        let _ = fs::rename(&self.aside, &self.pinned);
    }
}

/// What the kernel makes of `entries` for a per-CPU LRU (`BPF_F_NO_COMMON_LRU`): rounded up to
/// a multiple of the possible CPUs, so that every CPU's list holds as many.
fn kernel_entries(entries: u32) -> anyhow::Result<u32> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(path, e)| anyhow!("reading {path}: {e}"))?
        .get() as u32;
    Ok(entries.div_ceil(cpus).saturating_mul(cpus))
}

/// Renames aside each pinned table of `sizes` (name, entries wanted) whose size differs.
pub(super) fn set_aside(
    pins: &PinLayout,
    sizes: [(&'static str, u32); 2],
) -> anyhow::Result<Vec<SetAside>> {
    let mut out: Vec<SetAside> = Vec::new();
    for (name, to) in sizes {
        let pinned = pins.map(name);
        let aside = pins.map(&format!("{name}-resized"));
        // Left by a start that died between its load and the copy: its entries are lost.
        if aside.exists() {
            fs::remove_file(&aside).with_context(|| format!("unpinning {}", aside.display()))?;
        }
        if !pinned.exists() {
            continue;
        }
        let old = MapData::from_pin(&pinned)
            .map_err(|e| anyhow!("opening the pinned {name} map: {e}"))?;
        let from = old
            .info()
            .map_err(|e| anyhow!("reading the pinned {name} map's info: {e}"))?
            .max_entries();
        if from == kernel_entries(to)? {
            continue;
        }
        if let Err(e) = fs::rename(&pinned, &aside) {
            out.iter().for_each(SetAside::restore);
            return Err(e).with_context(|| format!("setting {} aside", pinned.display()));
        }
        out.push(SetAside {
            name,
            pinned,
            aside,
            old,
            from,
            to,
        });
    }
    Ok(out)
}

/// A load failed: the tables set aside get their pins back.
pub(super) fn restore(set_aside: &[SetAside]) {
    set_aside.iter().for_each(SetAside::restore);
}

/// Copies each old table's entries into the new one of the same name in `ebpf` (at most the
/// new one's size), then removes the old pin; logs each table resized.
pub(super) fn carry_over(ebpf: &mut Ebpf, set_aside: Vec<SetAside>) -> anyhow::Result<()> {
    for table in set_aside {
        let new = ebpf
            .map_mut(table.name)
            .ok_or_else(|| anyhow!("map {} missing from the object", table.name))?;
        let old = Map::LruHashMap(table.old);
        let n = if table.name == map_names::FLOWS {
            copy::<FlowKey4>(old, new, table.to)
        } else {
            copy::<FlowKey>(old, new, table.to)
        }
        .with_context(|| format!("carrying the {} entries over", table.name))?;
        fs::remove_file(&table.aside)
            .with_context(|| format!("unpinning {}", table.aside.display()))?;
        log::info!(
            "connection table {} resized from {} to {} entries ({n} flows carried over)",
            table.name,
            table.from,
            table.to
        );
    }
    Ok(())
}

/// Copies up to `limit` entries of `old` into `new`; an entry evicted meanwhile is skipped.
fn copy<K: Pod>(old: Map, new: &mut Map, limit: u32) -> anyhow::Result<u64> {
    let old: HashMap<MapData, K, FlowValue> =
        HashMap::try_from(old).map_err(|e| anyhow!("the old table: {e}"))?;
    let mut new: HashMap<&mut MapData, K, FlowValue> =
        HashMap::try_from(new).map_err(|e| anyhow!("the new table: {e}"))?;
    let mut n = 0;
    for (key, value) in old.iter().flatten().take(limit as usize) {
        new.insert(&key, &value, 0)
            .map_err(|e| anyhow!("inserting an entry: {e}"))?;
        n += 1;
    }
    Ok(n)
}
