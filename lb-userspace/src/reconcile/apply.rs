//! The apply: a plan written to the maps in named phases ([`Phase`]), in an order no packet
//! can observe half-done, each phase leaving a state the next reconcile completes.

use std::collections::HashMap;

use anyhow::Context as _;
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{MapError, PerCpuValues};
use lb_common::{Backend as SlotValue, Counters, NO_BACKEND, VipFilter, VipInfo, VipKey};

use super::plan::{Plan, TableInputs, VipPlan};
use super::{Hook, Phase, Summary};
use crate::dataplane::{Maps, RangeKey, Snapshot, TableWrite, install_maglev_tables};
use crate::maglev;

pub(super) fn apply(
    maps: &mut Maps,
    current: Snapshot,
    plan: Plan,
    hook: Hook<'_>,
) -> anyhow::Result<Summary> {
    let Snapshot {
        vips: current_vips,
        vip_addrs: current_vip_addrs,
        source_ranges: current_ranges,
        ..
    } = current;
    let mut summary = Summary {
        left_out: plan.left_out.clone(),
        ..Summary::default()
    };
    let cpus = cpu_count(maps)?;

    // TX ports for backends behind other interfaces.
    for ifindex in &plan.tx_ports {
        maps.tx_ports
            .insert(*ifindex, *ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to TX_PORTS"))?;
    }
    hook(Phase::TxPorts)?;

    // Backend slots the new tables point at: new ones are not referenced by any table yet;
    // changed ones take effect for the flows that already point at them.
    for (slot, value, is_new) in &plan.slots_before {
        if *is_new {
            maps.backend_stats
                .set(*slot, zeros(cpus)?, 0)
                .with_context(|| format!("resetting counters of backend slot {slot}"))?;
            summary.backends_added += 1;
        } else {
            summary.backends_changed += 1;
        }
        maps.backends
            .set(*slot, value, 0)
            .with_context(|| format!("writing backend slot {slot}"))?;
    }
    hook(Phase::NewSlots)?;

    // The address filter admits every VIP address, old and new, before any VIP is added...
    let desired_filter = vip_filter(plan.vips.iter().map(|v| &v.key));
    let widened = vip_filter(
        plan.vips
            .iter()
            .map(|v| &v.key)
            .chain(plan.removed_vips.iter().map(|(k, _)| k)),
    );
    write_filter(maps, &widened)?;
    hook(Phase::FilterWidened)?;

    // Addresses and source ranges the new VIP entries rely on; ranges a filtering VIP no
    // longer lists go now, after the new ones are in.
    for (key, count) in &plan.vip_addrs {
        if current_vip_addrs.get(key) != Some(count) {
            maps.vip_addrs
                .insert(key, count, 0)
                .context("writing VIP_ADDRS")?;
        }
    }
    for (prefix_len, data) in plan.source_ranges.difference(&current_ranges) {
        maps.source_ranges
            .insert(&LpmKey::new(*prefix_len, *data), &1, 0)
            .context("writing SOURCE_RANGES")?;
    }
    for range in &plan.early_stale_ranges {
        remove_range(maps, range)?;
    }
    hook(Phase::AddressesAndRanges)?;

    // A table that shrinks (its VIP lost backends and with them a tier): the entry's smaller
    // size goes first, so that no packet indexes the smaller table with the larger size (a
    // slot beyond it: a drop). Meanwhile the old, larger table is read within its first slots:
    // backends it still lists, all still in place. A table that grows is swapped in first
    // (below), for the same reason the other way round.
    for vip in &plan.vips {
        if let Some(old) = current_vips.get(&vip.key)
            && vip.info.table_size < old.table_size
        {
            let narrowed = VipInfo {
                table_size: vip.info.table_size,
                ..*old
            };
            maps.vips
                .insert(&vip.key, &narrowed, 0)
                .with_context(|| format!("writing VIP #{}", vip.id))?;
        }
    }
    hook(Phase::SizesShrunk)?;

    // Tables (one atomic swap each), each with the fingerprint of its inputs. VIPs with the
    // same backends and weights (every VIP of a Kubernetes cluster's nodes, for one) have the
    // same table: it is built once per reconcile.
    let mut built: HashMap<TableInputs, Vec<u32>> = HashMap::new();
    let mut rebuilt: Vec<(&VipPlan, TableInputs, Vec<u32>)> = Vec::new();
    for vip in plan.vips.iter().filter(|v| v.rebuild_table) {
        let key: TableInputs = (
            vip.inputs.iter().map(|b| (b.id, b.weight)).collect(),
            vip.info.table_size,
        );
        built
            .entry(key.clone())
            .or_insert_with(|| maglev::build_table(&vip.inputs, vip.info.table_size));
        let slots = vip.backends.iter().map(|(slot, _)| *slot).collect();
        rebuilt.push((vip, key, slots));
    }
    let tables: Vec<TableWrite<'_>> = rebuilt
        .iter()
        .filter_map(|(vip, key, slots)| {
            Some(TableWrite {
                vip_id: vip.id,
                picks: built.get(key)?,
                backends: slots,
                fingerprint: vip.fingerprint,
            })
        })
        .collect();
    summary.tables_rebuilt += tables.len();
    install_maglev_tables(maps, &tables)?;
    hook(Phase::Tables)?;

    // ... then the VIP entries that point at them.
    for vip in &plan.vips {
        if vip.is_new {
            maps.vip_stats
                .set(vip.id, zeros(cpus)?, 0)
                .with_context(|| format!("resetting counters of VIP #{}", vip.id))?;
            summary.vips_added += 1;
        }
        if current_vips.get(&vip.key) != Some(&vip.info) {
            maps.vips
                .insert(&vip.key, &vip.info, 0)
                .with_context(|| format!("writing VIP #{}", vip.id))?;
        }
    }
    hook(Phase::VipEntries)?;

    // Slots that take no new flows any more: only now that no table sends them any.
    for (slot, value) in &plan.slots_after {
        maps.backends
            .set(*slot, value, 0)
            .with_context(|| format!("writing backend slot {slot}"))?;
        summary.backends_changed += 1;
    }
    hook(Phase::DrainedSlots)?;

    // What is gone: VIP entries first (no packet can reach their tables after this), then
    // the slots (flows pointing at them re-hash on their next packet).
    for (key, id) in &plan.removed_vips {
        match maps.vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing VIP #{id}")),
        }
        summary.vips_removed += 1;
    }
    // Release the tables' memory: a one-slot empty table stands in until the id is reused.
    let empty: Vec<TableWrite<'_>> = plan
        .emptied_tables
        .iter()
        .map(|id| TableWrite {
            vip_id: *id,
            picks: &[NO_BACKEND],
            backends: &[],
            fingerprint: 0,
        })
        .collect();
    install_maglev_tables(maps, &empty)?;
    hook(Phase::VipsRemoved)?;
    for (slot, generation) in &plan.removed_slots {
        let cleared = SlotValue {
            generation: *generation,
            ..SlotValue::default()
        };
        maps.backends
            .set(*slot, &cleared, 0)
            .with_context(|| format!("clearing backend slot {slot}"))?;
        summary.backends_removed += 1;
    }
    hook(Phase::SlotsFreed)?;

    // Source ranges and addresses no VIP refers to any more.
    for range in current_ranges.difference(&plan.source_ranges) {
        if !plan.early_stale_ranges.contains(range) {
            remove_range(maps, range)?;
        }
    }
    for key in current_vip_addrs.keys() {
        if !plan.vip_addrs.contains_key(key) {
            match maps.vip_addrs.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a VIP address"),
            }
        }
    }
    hook(Phase::StaleAddressesAndRanges)?;

    // ... and the filter admits only the remaining ones (whatever an interrupted run left).
    write_filter(maps, &desired_filter)?;
    hook(Phase::FilterNarrowed)?;
    Ok(summary)
}

pub(super) fn remove_range(maps: &mut Maps, (prefix_len, data): &RangeKey) -> anyhow::Result<()> {
    match maps.source_ranges.remove(&LpmKey::new(*prefix_len, *data)) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e).context("removing a source range"),
    }
}

pub(super) fn vip_filter<'a>(keys: impl Iterator<Item = &'a VipKey>) -> VipFilter {
    let mut filter = VipFilter::default();
    for key in keys {
        filter.insert(&key.addr);
    }
    filter
}

/// Rewrites the filter. Bits that stay set are rewritten with the same value, so no packet can
/// see a VIP's bit clear while its entry exists.
pub(super) fn write_filter(maps: &mut Maps, filter: &VipFilter) -> anyhow::Result<()> {
    if maps.vip_filter.get(&0, 0).ok().as_ref() == Some(filter) {
        return Ok(());
    }
    maps.vip_filter
        .set(0, filter, 0)
        .context("writing the VIP address filter")
}

pub(super) fn cpu_count(maps: &Maps) -> anyhow::Result<usize> {
    Ok(maps
        .vip_stats
        .get(&0, 0)
        .context("reading VIP_STATS")?
        .len())
}

pub(super) fn zeros(cpus: usize) -> anyhow::Result<PerCpuValues<Counters>> {
    PerCpuValues::try_from(vec![Counters::default(); cpus]).context("building per-CPU zeros")
}
