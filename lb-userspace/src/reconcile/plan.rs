//! The plan: a pure function of the desired state, where its backends are (`Resolved`) and
//! what the maps hold (`Snapshot`): every write, its backend, table and VIP ids, what does not
//! fit. No kernel, no I/O, so every rule has a unit test without root.
//!
//! Backends are shared by every VIP (one entry per address and way of reaching it), and Maglev
//! tables by content (members, weights, drains, size): the VIPs of a cluster's nodes all point
//! at one table, so per-node state grows with the nodes plus the VIPs, not their product.

use std::collections::{BTreeMap, BTreeSet, HashMap, hash_map::Entry};
use std::net::IpAddr;

use anyhow::{anyhow, bail};
use lb_common::{
    Addr, Backend as BackendValue, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_DECAP_ADDRS, MAX_PEERS,
    MAX_SOURCE_RANGES, MAX_TABLES, MAX_VIPS, MEMBER_DRAINING, MemberWeight, NO_TABLE, PeerKey,
    Settings as DataplaneSettings, TableInfo, VipInfo, VipKey, VipRef, addr_from_raw,
    backend_state, forward_mode, maglev_id, member_pick_weight, raw_addr, source_range_scope,
    vip_flags,
};

use super::LeftOut;
use crate::dataplane::{RangeKey, Snapshot, fnv1a, scoped_prefix, table_picks};
use crate::maglev::MaglevBackend;
use crate::model::{
    Backend, Desired, FlowState, ForwardingMode, IpNet, ListId, Settings, Vip, vip_key,
};
use crate::net::Interface;
use crate::resolve::{Resolved, Target};

/// One VIP's planned entry.
pub(super) struct VipPlan {
    pub(super) key: VipKey,
    pub(super) is_new: bool,
    /// Its `VIPS` value: id, table and the table's size.
    pub(super) info: VipInfo,
}

/// A table to install at a free id, before any VIP points at it.
pub(super) struct TablePlan {
    pub(super) id: u32,
    /// Members in backend id order, with their Maglev inputs and `TABLE_MEMBERS` weights.
    pub(super) backends: Vec<u32>,
    pub(super) inputs: Vec<MaglevBackend>,
    pub(super) members: Vec<(u32, MemberWeight)>,
    pub(super) info: TableInfo,
}

/// Everything to write, computed without touching a map.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) vips: Vec<VipPlan>,
    /// Backend entries written before the tables (with whether each is new): no table points
    /// at a new one yet, and a changed one (a new MAC) serves its flows from then on.
    pub(super) backends: Vec<(u32, BackendValue, bool)>,
    /// Tables with new contents, at ids no VIP points at.
    pub(super) tables: Vec<TablePlan>,
    pub(super) tx_ports: BTreeSet<u32>,
    pub(super) removed_vips: Vec<(VipKey, u32)>,
    /// `VIP_BY_ID` entries to clear: removed VIPs', and those no VIP has (an interrupted run's).
    pub(super) cleared_refs: BTreeSet<u32>,
    /// Tables no VIP points at once the VIP entries are written.
    pub(super) freed_tables: BTreeSet<u32>,
    /// Backend entries no table has any more, with the generation they keep.
    pub(super) freed_backends: BTreeMap<u32, u32>,
    /// `VIP_ADDRS` as it must end up.
    pub(super) vip_addrs: BTreeMap<VipKey, u32>,
    /// `SOURCE_RANGES` as it must end up.
    pub(super) source_ranges: BTreeSet<RangeKey>,
    /// Stale ranges of VIPs that keep filtering by source: removed before the VIP entries are
    /// written, so that a VIP admits only what it lists from then on. Other stale ranges go
    /// with the removals.
    pub(super) early_stale_ranges: BTreeSet<RangeKey>,
    /// Whether this plan frees anything (a VIP id, backend, table, address or range) that a
    /// second pass could use for what was left out.
    pub(super) frees: bool,
    pub(super) left_out: Vec<LeftOut>,
}

impl Plan {
    /// What the maps hold once this plan, made against `current`, is applied in full (the
    /// apply's own model): the next reconcile of the same process plans against it instead of
    /// reading 10,000 VIPs back from the kernel.
    pub(super) fn applied_to(&self, current: Snapshot) -> Snapshot {
        let Snapshot {
            vips,
            backends,
            tables,
            picks,
            generations,
            vip_refs,
            ..
        } = current;
        let mut next = Snapshot {
            vips,
            vip_refs,
            generations,
            vip_addrs: self.vip_addrs.clone(),
            source_ranges: self.source_ranges.clone(),
            ..Snapshot::default()
        };
        // Backends: written and freed entries change, the rest stay.
        let mut backends = backends;
        for (id, value, _) in &self.backends {
            backends.insert(*id, *value);
        }
        for id in self.freed_backends.keys() {
            backends.remove(id);
        }
        for (id, value) in backends {
            next.add_backend(id, value);
        }
        for (id, generation) in &self.freed_backends {
            next.generations.insert(*id, *generation);
        }
        for (key, _) in &self.removed_vips {
            next.vips.remove(key);
        }
        for id in &self.cleared_refs {
            next.vip_refs.remove(id);
        }
        for vip in &self.vips {
            next.vips.insert(vip.key, vip.info);
            next.vip_refs.insert(
                vip.info.id,
                VipRef {
                    key: vip.key,
                    table: vip.info.table,
                },
            );
        }
        // As `Snapshot::read`: the tables some VIP names (its current and previous ones).
        let mut tables = tables;
        for id in &self.freed_tables {
            tables.remove(id);
        }
        tables.extend(self.tables.iter().map(|t| (t.id, t.info)));
        let in_use = named_tables(next.vips.values());
        tables.retain(|id, _| in_use.contains(id));
        next.tables = tables;
        // As `Snapshot::read`: the picks of the tables some VIP names.
        let mut picks = picks;
        picks.extend(
            self.tables
                .iter()
                .map(|t| (t.id, table_picks(t.members.iter().copied(), t.info.size))),
        );
        picks.retain(|id, _| next.tables.contains_key(id));
        next.picks = picks;
        next
    }
}

/// Ids handed out lowest first, below a limit; ids in use (or freed by this plan) are skipped.
pub(super) struct Ids {
    pub(super) used: BTreeSet<u32>,
    pub(super) cursor: u32,
    pub(super) limit: u32,
}

impl Ids {
    fn new(used: impl IntoIterator<Item = u32>, limit: u32) -> Self {
        Self {
            used: used.into_iter().collect(),
            cursor: 0,
            limit,
        }
    }

    fn take(&mut self) -> Option<u32> {
        while self.cursor < self.limit {
            let id = self.cursor;
            self.cursor += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    fn give_back(&mut self, id: u32) {
        self.used.remove(&id);
        self.cursor = self.cursor.min(id);
    }
}

/// The `SOURCE_RANGES` key of a VIP's prefix (scoped by VIP id and the prefix's family).
pub(super) fn range_key(vip_id: u32, net: &IpNet) -> RangeKey {
    let family = if net.addr().is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    };
    let key = scoped_prefix(source_range_scope(vip_id, family), net);
    (key.prefix_len(), key.data())
}

/// The VIP id of a `SOURCE_RANGES` key.
pub(super) fn range_vip(key: &RangeKey) -> u32 {
    u32::from_be(key.1.scope_be) & 0x00ff_ffff
}

/// What a backend list comes to in the maps: planned once per list, shared by its VIPs.
struct ListPlan {
    /// (backend id, address, weight with the drain flag), in backend id order.
    members: Vec<(u32, IpAddr, MemberWeight)>,
    /// Backends that found no free entry (left out).
    missing: Vec<IpAddr>,
    table_size: u32,
    fingerprint: u64,
    /// What its picks are a function of ([`table_picks`]).
    picks: u64,
    /// Members that take new flows (the VIP entry's `live_backends`).
    live: u32,
}

/// Everything a reconcile writes, from what the maps hold and where the backends are. Pure.
///
/// Order rules (each has a unit test): a backend entry is written before any table has it; a
/// table is installed whole at an id no VIP points at, then the VIPs are pointed at it (one
/// atomic write each), and only then are the tables and backends no VIP uses any more freed;
/// a table is reused whenever an installed one has the same contents (its fingerprint), so a
/// change rebuilds each distinct table once; removals and drains need no room and are always
/// planned; what does not fit (VIPs, backends, tables, addresses, source ranges, counted while
/// old and new entries coexist) is left out and listed, never failing the rest.
pub(super) fn plan(
    current: &Snapshot,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
) -> anyhow::Result<Plan> {
    let desired_keys: BTreeSet<VipKey> = desired.vips.iter().map(|v| vip_key(&v.key)).collect();
    let flow_state = resolved.flow_state(desired);

    // Ids kept by surviving VIPs, backends and tables; new ones come from what is free now (ids
    // freed by this reconcile are not reused in it: their old flows must re-hash, not follow,
    // and packets may still read what they point at).
    let mut vip_ids = Ids::new(current.vips.values().map(|i| i.id), MAX_VIPS);
    let mut backend_ids = Ids::new(current.backends.keys().copied(), MAX_BACKENDS);
    let mut table_ids = Ids::new(named_tables(current.vips.values()), MAX_TABLES);
    let installed: BTreeMap<(IpAddr, u8), u32> = current
        .backends
        .iter()
        .map(|(id, b)| ((addr_from_raw(&b.addr, b.family), b.mode), *id))
        .collect();
    let mut by_fingerprint: BTreeMap<u64, u32> = current
        .tables
        .iter()
        .map(|(id, t)| (t.fingerprint, *id))
        .collect();
    let mut planned_backends: BTreeMap<(IpAddr, u8), u32> = BTreeMap::new();
    // Room while the old entries are still there (they go last).
    let mut addr_room = (MAX_VIPS as usize).saturating_sub(current.vip_addrs.len());
    let mut range_room = (MAX_SOURCE_RANGES as usize).saturating_sub(current.source_ranges.len());
    let mut plan = Plan::default();
    let mut lists: HashMap<(ListId, ForwardingMode), ListPlan> = HashMap::new();

    for vip in &desired.vips {
        let key = vip_key(&vip.key);
        let old_info = current.vips.get(&key).copied();
        let is_new = old_info.is_none();
        let id = match old_info {
            Some(info) => info.id,
            None => match vip_ids.take() {
                Some(id) => id,
                None => {
                    plan.left_out.push(LeftOut::Vip { vip: vip.key });
                    continue;
                }
            },
        };

        let addr_key = key.address_only();
        let new_addr =
            !current.vip_addrs.contains_key(&addr_key) && !plan.vip_addrs.contains_key(&addr_key);
        let wanted: BTreeSet<RangeKey> =
            vip.source_ranges.iter().map(|n| range_key(id, n)).collect();
        let new_ranges = wanted.difference(&current.source_ranges).count();
        if is_new && ((new_addr && addr_room == 0) || new_ranges > range_room) {
            vip_ids.give_back(id);
            plan.left_out.push(LeftOut::Vip { vip: vip.key });
            continue;
        }

        // Its members: each backend's shared entry (written once, whatever the VIPs that have
        // it) and its weight in this VIP's table; worked out once per list (and mode).
        let list_key = (vip.backends.id(), vip.mode);
        if let Entry::Vacant(slot) = lists.entry(list_key) {
            let mut members: Vec<(u32, IpAddr, MemberWeight)> =
                Vec::with_capacity(vip.backends.len());
            let mut missing = Vec::new();
            for backend in &vip.backends {
                let mut weight = backend.weight & !MEMBER_DRAINING;
                if !backend.takes_new_flows() {
                    weight |= MEMBER_DRAINING;
                }
                let id = match resolved.targets.get(&(backend.addr, vip.mode)) {
                    Some(target) => {
                        let value = backend_value(iface, &desired.settings, target, vip, backend)?;
                        let target_key = (backend.addr, value.mode);
                        if let Some(id) = planned_backends.get(&target_key) {
                            *id
                        } else {
                            let id = match installed.get(&target_key) {
                                Some(id) => {
                                    let old = current.backends[id];
                                    let value = BackendValue {
                                        generation: old.generation,
                                        ..value
                                    };
                                    if value != old {
                                        plan.backends.push((*id, value, false));
                                    }
                                    *id
                                }
                                None => {
                                    let Some(id) = backend_ids.take() else {
                                        missing.push(backend.addr);
                                        continue;
                                    };
                                    // A new holder of the entry: flows of earlier ones do not match it.
                                    let previous =
                                        current.generations.get(&id).copied().unwrap_or(0);
                                    let value = BackendValue {
                                        generation: previous.wrapping_add(1).max(1),
                                        ..value
                                    };
                                    plan.backends.push((id, value, true));
                                    id
                                }
                            };
                            if value.mode != forward_mode::LOCAL && value.ifindex != iface.index {
                                plan.tx_ports.insert(value.ifindex);
                            }
                            planned_backends.insert(target_key, id);
                            id
                        }
                    }
                    // Not resolvable now: its last known entry, draining (its flows stay), or left
                    // out when it never had one.
                    None => match last_known(&installed, backend.addr, vip.mode) {
                        Some(id) => {
                            weight |= MEMBER_DRAINING;
                            id
                        }
                        None => continue,
                    },
                };
                members.push((id, backend.addr, weight));
            }
            members.sort_by_key(|(id, _, _)| *id);
            members.dedup_by_key(|(id, _, _)| *id);
            let table_size = desired.settings.maglev_table_size_for(vip.backends.len());
            let fingerprint = table_fingerprint(&members, table_size);
            let picks = table_picks(members.iter().map(|(b, _, w)| (*b, *w)), table_size);
            let live = members
                .iter()
                .filter(|(_, _, w)| *w != 0 && w & MEMBER_DRAINING == 0)
                .count() as u32;
            slot.insert(ListPlan {
                members,
                missing,
                table_size,
                fingerprint,
                picks,
                live,
            });
        }
        let ListPlan {
            members,
            missing,
            table_size,
            fingerprint,
            picks,
            live,
        } = &lists[&list_key];
        let (table_size, fingerprint, picks, live_backends) =
            (*table_size, *fingerprint, *picks, *live);
        for backend in missing {
            plan.left_out.push(LeftOut::Backend {
                vip: vip.key,
                backend: *backend,
            });
        }

        // Its table: one with these contents if installed or planned already, else a new one.
        let table = match by_fingerprint.get(&fingerprint) {
            Some(table) => Some(*table),
            None => table_ids.take().inspect(|table| {
                plan.tables
                    .push(table_plan(*table, members, table_size, fingerprint));
                by_fingerprint.insert(fingerprint, *table);
            }),
        };
        let Some(table) = table else {
            plan.left_out.push(LeftOut::Table { vip: vip.key });
            match old_info {
                // Keeps the table it has until there is room.
                Some(info) => plan.vips.push(VipPlan { key, is_new, info }),
                None => vip_ids.give_back(id),
            }
            continue;
        };

        if new_addr {
            addr_room = addr_room.saturating_sub(1);
        }
        let ranges = if new_ranges <= range_room {
            range_room -= new_ranges;
            wanted
        } else {
            // Fail closed: of the new list, only what is installed already.
            plan.left_out.push(LeftOut::SourceRanges { vip: vip.key });
            wanted
                .intersection(&current.source_ranges)
                .copied()
                .collect()
        };
        plan.source_ranges.extend(ranges);
        *plan.vip_addrs.entry(addr_key).or_insert(0) += 1;

        let mut flags = 0;
        if vip.client_affinity {
            flags |= vip_flags::AFFINITY;
        }
        if !vip.source_ranges.is_empty() {
            flags |= vip_flags::SOURCE_RANGES;
        }
        plan.vips.push(VipPlan {
            key,
            is_new,
            info: VipInfo {
                id,
                table,
                table_size,
                live_backends,
                flags,
                previous_table: match flow_state {
                    FlowState::SecondChance => previous_table(current, old_info, table, picks),
                    // Nothing reads it: the connection table keeps the flows.
                    FlowState::Table | FlowState::Auto => NO_TABLE,
                },
            },
        });
    }

    for (key, info) in &current.vips {
        if !desired_keys.contains(key) {
            plan.removed_vips.push((*key, info.id));
            plan.cleared_refs.insert(info.id);
        }
    }
    let planned_ids: BTreeSet<u32> = plan.vips.iter().map(|v| v.info.id).collect();
    plan.cleared_refs.extend(
        current
            .vip_refs
            .keys()
            .filter(|id| !planned_ids.contains(id)),
    );

    // What the VIPs use once pointed at their tables (previous tables included); the rest is
    // freed after that.
    let final_tables = named_tables(plan.vips.iter().map(|v| &v.info));
    plan.freed_tables = named_tables(current.vips.values())
        .difference(&final_tables)
        .copied()
        .collect();
    let mut used = BTreeSet::new();
    for table in &plan.tables {
        used.extend(table.backends.iter().copied());
    }
    for table in &final_tables {
        if let Some(info) = current.tables.get(table) {
            used.extend((0..MAX_BACKENDS).filter(|b| info.has(*b)));
        }
    }
    // A backend taken for a VIP that was then left out is not written at all.
    plan.backends.retain(|(id, _, _)| used.contains(id));
    plan.freed_backends = current
        .backends
        .iter()
        .filter(|(id, _)| !used.contains(id))
        .map(|(id, b)| (*id, b.generation))
        .collect();

    let filtering: BTreeSet<u32> = plan
        .vips
        .iter()
        .filter(|v| v.info.flags & vip_flags::SOURCE_RANGES != 0)
        .map(|v| v.info.id)
        .collect();
    plan.early_stale_ranges = current
        .source_ranges
        .difference(&plan.source_ranges)
        .filter(|r| filtering.contains(&range_vip(r)))
        .copied()
        .collect();
    plan.frees = !plan.removed_vips.is_empty()
        || !plan.freed_backends.is_empty()
        || !plan.freed_tables.is_empty()
        || current
            .vip_addrs
            .keys()
            .any(|k| !plan.vip_addrs.contains_key(k))
        || !current.source_ranges.is_subset(&plan.source_ranges);
    Ok(plan)
}

/// Every table the VIPs name: the ones they pick from and their previous ones. None of them
/// is freed or given new contents while a VIP names it.
pub(super) fn named_tables<'a>(vips: impl Iterator<Item = &'a VipInfo>) -> BTreeSet<u32> {
    vips.flat_map(|info| [info.table, info.previous_table])
        .filter(|table| *table != NO_TABLE)
        .collect()
}

/// A VIP's previous table once it points at `table`, whose picks are `picks` (second-chance
/// mode): the one it leaves when it moves, else the one it had (one generation: a move
/// replaces it). A move to a table with the same picks (a draining member removed, or one
/// draining that had no slot) moved no flow: the previous table stays, still naming where
/// the last change's flows began (a node drained, then removed, keeps its connections). Only
/// a table that is installed whole is named ([`NO_TABLE`] otherwise, e.g. for a new VIP).
fn previous_table(current: &Snapshot, old: Option<VipInfo>, table: u32, picks: u64) -> u32 {
    let previous = match old {
        Some(old) if old.table != table && current.picks.get(&old.table) != Some(&picks) => {
            old.table
        }
        Some(old) if old.previous_table != table => old.previous_table,
        _ => NO_TABLE,
    };
    if current.tables.contains_key(&previous) {
        previous
    } else {
        NO_TABLE
    }
}

/// The installed entry of a backend that cannot be resolved now, reached the way `mode` asks
/// (or this node itself).
fn last_known(
    installed: &BTreeMap<(IpAddr, u8), u32>,
    addr: IpAddr,
    mode: ForwardingMode,
) -> Option<u32> {
    let modes: &[u8] = match mode {
        ForwardingMode::L2 => &[forward_mode::L2, forward_mode::LOCAL],
        ForwardingMode::Ipip => &[
            forward_mode::IPIP_V4,
            forward_mode::IPIP_V6,
            forward_mode::LOCAL,
        ],
    };
    modes
        .iter()
        .find_map(|m| installed.get(&(addr, *m)).copied())
}

/// A table of `members` (in backend id order) at id `id`.
fn table_plan(
    id: u32,
    members: &[(u32, IpAddr, MemberWeight)],
    size: u32,
    fingerprint: u64,
) -> TablePlan {
    let mut info = TableInfo {
        fingerprint,
        size,
        members: members.len() as u32,
        ..TableInfo::default()
    };
    for (backend, _, _) in members {
        info.add(*backend);
    }
    TablePlan {
        id,
        backends: members.iter().map(|(b, _, _)| *b).collect(),
        inputs: members
            .iter()
            .map(|(_, addr, weight)| MaglevBackend {
                id: maglev_id(*addr),
                weight: member_pick_weight(*weight),
            })
            .collect(),
        members: members.iter().map(|(b, _, w)| (*b, *w)).collect(),
        info,
    }
}

/// Bumped when the Maglev builder changes what it builds from the same inputs.
/// 2: tables shared by content, members in backend id order.
pub(super) const TABLE_FORMAT: u64 = 2;

/// Of everything a table is a function of: the builder, the size, and each member's backend
/// id, Maglev id and weight with its drain flag, in backend id order (FNV-1a, never 0: 0 is "no
/// table"). Equal fingerprints: one table serves both.
pub(super) fn table_fingerprint(members: &[(u32, IpAddr, MemberWeight)], size: u32) -> u64 {
    let mut words = vec![TABLE_FORMAT, u64::from(size), members.len() as u64];
    for (backend, addr, weight) in members {
        words.push(u64::from(*backend));
        words.push(u64::from(maglev_id(*addr)) << 32 | u64::from(*weight));
    }
    fnv1a(words).max(1)
}

/// Where and how the program sends this backend's packets, from where it was resolved: the
/// entry every VIP that has the backend shares.
pub(super) fn backend_value(
    iface: &Interface,
    settings: &Settings,
    target: &Target,
    vip: &Vip,
    backend: &Backend,
) -> anyhow::Result<BackendValue> {
    let (addr, family) = raw_addr(backend.addr);
    let mut value = BackendValue {
        addr,
        state: backend_state::IN_USE,
        family,
        ..BackendValue::default()
    };
    let (mac, egress, source) = match target {
        Target::Local => {
            // This node itself: no rewrite, no egress (the packet stays on the ingress).
            value.mode = forward_mode::LOCAL;
            value.ifindex = iface.index;
            return Ok(value);
        }
        Target::Remote {
            mac,
            egress,
            source,
        } => (mac, egress, source),
    };
    value.dst_mac = mac.0;
    value.ifindex = egress.index;
    value.src_mac = egress.mac.0;
    match vip.mode {
        ForwardingMode::L2 => value.mode = forward_mode::L2,
        ForwardingMode::Ipip => {
            let (src, vary) = encap_source(settings, backend.addr, *source, egress)
                .map_err(|e| anyhow!("{}: backend {}: {e}", vip.key, backend.addr))?;
            value.mode = if backend.addr.is_ipv4() {
                forward_mode::IPIP_V4
            } else {
                forward_mode::IPIP_V6
            };
            value.encap_src = src;
            value.encap_src_vary = vary;
            value.mtu = u16::try_from(egress.mtu).unwrap_or(u16::MAX);
        }
    }
    Ok(value)
}

/// The outer source base and the mask of its last 32 bits that vary per flow: the configured
/// prefix of the backend's family, else the kernel's source for the route (not varied).
pub(super) fn encap_source(
    settings: &Settings,
    backend: IpAddr,
    own: Option<IpAddr>,
    egress: &Interface,
) -> anyhow::Result<(Addr, u32)> {
    let configured = match backend {
        IpAddr::V4(_) => settings
            .encap_source_v4
            .map(|net| (IpAddr::V4(net.network()), 32 - u32::from(net.prefix_len()))),
        IpAddr::V6(_) => settings
            .encap_source_v6
            .map(|net| (IpAddr::V6(net.network()), 128 - u32::from(net.prefix_len()))),
    };
    let (base, host_bits) = match configured {
        Some(found) => found,
        None => {
            let Some(own) = own else {
                bail!(
                    "no IPv{} address on {} to use as the outer source; add one or set encap_source_v{}",
                    if backend.is_ipv4() { 4 } else { 6 },
                    egress.name,
                    if backend.is_ipv4() { 4 } else { 6 }
                );
            };
            (own, 0)
        }
    };
    let vary = if host_bits >= 32 {
        u32::MAX
    } else {
        (1u32 << host_bits) - 1
    };
    Ok((raw_addr(base).0, vary))
}

/// What a Maglev table's picks are a function of: (Maglev id, weight) pairs and the size.
pub(super) type TableInputs = (Vec<(u32, u32)>, u32);

#[cfg(test)]
mod tests;

/// The co-location maps and the dataplane's settings as they must end up: `PEERS` (other
/// nodes' MACs: their VIP frames were balanced already), the inline decapsulator's sets (this
/// node's addresses; the peers and the configured encap source prefixes as allowed outer
/// sources; both empty without peers) and `SETTINGS` (the flood guard's limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Colocation {
    pub(super) peers: BTreeSet<PeerKey>,
    pub(super) decap_allow: Vec<IpNet>,
    pub(super) decap_local: Vec<IpAddr>,
    pub(super) settings: DataplaneSettings,
}

/// [`Colocation`] from the desired state and the resolved peers; what the maps have no room
/// for is cut (peers beyond `MAX_PEERS`, decap addresses beyond `MAX_DECAP_ADDRS`, the allowed
/// sources first).
pub(super) fn plan_colocation(desired: &Desired, resolved: &Resolved) -> Colocation {
    let peers = resolved
        .peer_macs
        .iter()
        .take(MAX_PEERS as usize)
        .map(|mac| PeerKey::new(mac.0))
        .collect();
    let (mut decap_allow, mut decap_local) = (Vec::new(), Vec::new());
    if !desired.peers.is_empty() {
        decap_allow.extend(desired.peers.iter().map(|a| IpNet::from(*a)));
        decap_allow.extend(desired.settings.encap_source_v4.map(IpNet::V4));
        decap_allow.extend(desired.settings.encap_source_v6.map(IpNet::V6));
        decap_local.extend(resolved.local.iter().copied());
    }
    let room = MAX_DECAP_ADDRS as usize;
    decap_allow.truncate(room);
    decap_local.truncate(room.saturating_sub(decap_allow.len()));
    Colocation {
        peers,
        decap_allow,
        decap_local,
        settings: DataplaneSettings {
            max_new_flows_per_cpu: desired.settings.max_new_flows_per_cpu,
            flow_state: resolved.flow_state(desired).raw(),
        },
    }
}
