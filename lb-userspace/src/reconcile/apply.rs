//! The apply: a plan written to the maps in named phases ([`Phase`]), in an order no packet
//! can observe half-done, each phase leaving a state the next reconcile completes.

use std::collections::HashMap;

use lb_common::{Backend as BackendValue, VipFilter, VipKey, VipRef};

use super::plan::{Colocation, Plan, TableInputs};
use super::{Hook, Phase, Summary};
use crate::dataplane::{Maps, Snapshot, TableWrite, free_maglev_tables, install_maglev_tables};
use crate::maglev;

pub(super) fn apply(
    maps: &mut Maps,
    current: &Snapshot,
    plan: &Plan,
    hook: Hook<'_>,
) -> anyhow::Result<Summary> {
    let Snapshot {
        vips: current_vips,
        vip_addrs: current_vip_addrs,
        source_ranges: current_ranges,
        vip_refs: current_refs,
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

    // Backend entries the new tables have: new ones are in no table yet; changed ones (a new
    // MAC) take effect for the flows that already reach them.
    for (id, value, is_new) in &plan.backends {
        if *is_new {
            maps.reset_backend_counters(*id)?;
            summary.backends_added += 1;
        } else {
            summary.backends_changed += 1;
        }
        maps.write_backend(*id, value)?;
    }
    hook(Phase::NewBackends)?;

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
    for range in plan.source_ranges.difference(current_ranges) {
        maps.add_source_range(range)?;
    }
    for range in &plan.early_stale_ranges {
        maps.remove_source_range(range)?;
    }
    hook(Phase::AddressesAndRanges)?;

    // New tables, each whole before any VIP points at it. Tables whose picks are the same
    // (the same Maglev ids and weights at the same size, on other backend ids) are computed once.
    let mut built: HashMap<TableInputs, Vec<u32>> = HashMap::new();
    for table in &plan.tables {
        let key: TableInputs = (
            table.inputs.iter().map(|b| (b.id, b.weight)).collect(),
            table.info.size,
        );
        built
            .entry(key)
            .or_insert_with(|| maglev::build_table(&table.inputs, table.info.size));
    }
    let writes: Vec<TableWrite<'_>> = plan
        .tables
        .iter()
        .filter_map(|table| {
            let key: TableInputs = (
                table.inputs.iter().map(|b| (b.id, b.weight)).collect(),
                table.info.size,
            );
            Some(TableWrite {
                table: table.id,
                picks: built.get(&key)?,
                backends: &table.backends,
                info: table.info,
                members: &table.members,
            })
        })
        .collect();
    summary.tables_rebuilt += writes.len();
    install_maglev_tables(maps, &writes)?;
    hook(Phase::Tables)?;

    // ... then the VIPs point at them: an established flow's check (VIP_BY_ID) first, so that
    // a new VIP's first flows find it; a VIP's entry (key, table and size) is one atomic write.
    for vip in &plan.vips {
        let id = vip.info.id;
        if vip.is_new {
            maps.reset_vip_counters(id)?;
            summary.vips_added += 1;
        }
        let vip_ref = VipRef {
            key: vip.key,
            table: vip.info.table,
        };
        if current_refs.get(&id) != Some(&vip_ref) {
            maps.write_vip_ref(id, &vip_ref)?;
        }
        if current_vips.get(&vip.key) != Some(&vip.info) {
            maps.write_vip(&vip.key, &vip.info)?;
        }
    }
    hook(Phase::VipEntries)?;

    // What is gone: a removed VIP's established flows stop matching first (they take the slow
    // path, still balanced by its entry), then the entry goes.
    for id in &plan.cleared_refs {
        maps.write_vip_ref(*id, &VipRef::default())?;
    }
    for (key, id) in &plan.removed_vips {
        maps.remove_vip(key, *id)?;
        summary.vips_removed += 1;
    }
    hook(Phase::VipsRemoved)?;
    let freed: Vec<u32> = plan.freed_tables.iter().copied().collect();
    free_maglev_tables(maps, &freed)?;
    hook(Phase::TablesFreed)?;
    // Backends no table has: flows still naming them re-hash on their next packet.
    for (id, generation) in &plan.freed_backends {
        let cleared = BackendValue {
            generation: *generation,
            ..BackendValue::default()
        };
        maps.write_backend(*id, &cleared)?;
        summary.backends_removed += 1;
    }
    hook(Phase::BackendsFreed)?;

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
