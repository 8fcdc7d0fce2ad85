//! The apply: a plan written to the maps in named phases ([`Phase`]), in an order no packet
//! can observe half-done, each phase leaving a state the next reconcile completes.

use std::collections::HashMap;

use lb_common::{Backend as SlotValue, NO_BACKEND, VipFilter, VipInfo, VipKey};

use super::plan::{Colocation, Plan, TableInputs, VipPlan};
use super::{Hook, Phase, Summary};
use crate::dataplane::{Maps, Snapshot, TableWrite, install_maglev_tables};
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

    // TX ports for backends behind other interfaces.
    for ifindex in &plan.tx_ports {
        maps.add_tx_port(*ifindex)?;
    }
    hook(Phase::TxPorts)?;

    // Backend slots the new tables point at: new ones are not referenced by any table yet;
    // changed ones take effect for the flows that already point at them.
    for (slot, value, is_new) in &plan.slots_before {
        if *is_new {
            maps.reset_slot_counters(*slot)?;
            summary.backends_added += 1;
        } else {
            summary.backends_changed += 1;
        }
        maps.write_slot(*slot, value)?;
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
    maps.write_vip_filter(&widened)?;
    hook(Phase::FilterWidened)?;

    // Addresses and source ranges the new VIP entries rely on; ranges a filtering VIP no
    // longer lists go now, after the new ones are in.
    for (key, count) in &plan.vip_addrs {
        if current_vip_addrs.get(key) != Some(count) {
            maps.write_vip_addr(key, *count)?;
        }
    }
    for range in plan.source_ranges.difference(&current_ranges) {
        maps.add_source_range(range)?;
    }
    for range in &plan.early_stale_ranges {
        maps.remove_source_range(range)?;
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
            maps.write_vip(&vip.key, &narrowed)?;
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
            maps.reset_vip_counters(vip.id)?;
            summary.vips_added += 1;
        }
        if current_vips.get(&vip.key) != Some(&vip.info) {
            maps.write_vip(&vip.key, &vip.info)?;
        }
    }
    hook(Phase::VipEntries)?;

    // Slots that take no new flows any more: only now that no table sends them any.
    for (slot, value) in &plan.slots_after {
        maps.write_slot(*slot, value)?;
        summary.backends_changed += 1;
    }
    hook(Phase::DrainedSlots)?;

    // What is gone: VIP entries first (no packet can reach their tables after this), then
    // the slots (flows pointing at them re-hash on their next packet).
    for (key, id) in &plan.removed_vips {
        maps.remove_vip(key, *id)?;
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
        maps.write_slot(*slot, &cleared)?;
        summary.backends_removed += 1;
    }
    hook(Phase::SlotsFreed)?;

    // Source ranges and addresses no VIP refers to any more.
    for range in current_ranges.difference(&plan.source_ranges) {
        if !plan.early_stale_ranges.contains(range) {
            maps.remove_source_range(range)?;
        }
    }
    for key in current_vip_addrs.keys() {
        if !plan.vip_addrs.contains_key(key) {
            maps.remove_vip_addr(key)?;
        }
    }
    hook(Phase::StaleAddressesAndRanges)?;

    // ... and the filter admits only the remaining ones (whatever an interrupted run left).
    maps.write_vip_filter(&desired_filter)?;
    hook(Phase::FilterNarrowed)?;
    Ok(summary)
}

pub(super) fn vip_filter<'a>(keys: impl Iterator<Item = &'a VipKey>) -> VipFilter {
    let mut filter = VipFilter::default();
    for key in keys {
        filter.insert(&key.addr);
    }
    filter
}

/// Writes [`Colocation`]: `PEERS` (ordered with its filter by the dataplane), the decapsulator's
/// sets and `SETTINGS`, each only where it differs.
pub(super) fn apply_colocation(maps: &mut Maps, want: &Colocation) -> anyhow::Result<()> {
    maps.sync_peers(&want.peers)?;
    maps.sync_decap(&want.decap_allow, &want.decap_local)?;
    maps.write_settings(want.settings)
}
