//! The plan: a pure function of the desired state, where its backends are (`Resolved`) and
//! what the maps hold (`Snapshot`): every write, its slot and VIP ids, what does not fit.
//! No kernel, no I/O, so every rule has a unit test without root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{anyhow, bail};
use lb_common::{
    Addr, Backend as SlotValue, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_DECAP_ADDRS, MAX_PEERS,
    MAX_SOURCE_RANGES, MAX_VIPS, PeerKey, Settings as DataplaneSettings, VipInfo, VipKey,
    addr_from_raw, backend_state, forward_mode, maglev_id, raw_addr, source_range_scope, vip_flags,
};

use super::LeftOut;
use crate::dataplane::{RangeKey, Snapshot, scoped_prefix};
use crate::maglev::MaglevBackend;
use crate::model::{Backend, Desired, ForwardingMode, IpNet, Settings, Vip, vip_key};
use crate::net::Interface;
use crate::resolve::{Resolved, Target};

/// One VIP's planned state.
pub(super) struct VipPlan {
    pub(super) key: VipKey,
    pub(super) id: u32,
    pub(super) is_new: bool,
    /// Backends in desired order with their slot ids and slot values.
    pub(super) backends: Vec<(u32, SlotValue)>,
    /// What its table is built from, and whether the installed one is something else.
    pub(super) inputs: Vec<MaglevBackend>,
    pub(super) fingerprint: u64,
    pub(super) rebuild_table: bool,
    pub(super) info: VipInfo,
}

/// Everything to write, computed without touching a map.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) vips: Vec<VipPlan>,
    /// Slot writes before the tables (with whether each slot is new): new slots, and slots the
    /// new tables point at (active: they take new flows from the swap on).
    pub(super) slots_before: Vec<(u32, SlotValue, bool)>,
    /// Slot writes after the tables: slots that stop taking new flows (draining, weight 0).
    /// Until the table that no longer points at them is in, they must still accept the flows
    /// the old one sends them.
    pub(super) slots_after: Vec<(u32, SlotValue)>,
    pub(super) tx_ports: BTreeSet<u32>,
    pub(super) removed_vips: Vec<(VipKey, u32)>,
    /// Slots to clear, with the generation they keep.
    pub(super) removed_slots: BTreeMap<u32, u32>,
    /// Tables to release (a one-slot empty table): removed VIPs', and those of VIP ids no VIP
    /// has (an interrupted reconcile's).
    pub(super) emptied_tables: BTreeSet<u32>,
    /// `VIP_ADDRS` as it must end up.
    pub(super) vip_addrs: BTreeMap<VipKey, u32>,
    /// `SOURCE_RANGES` as it must end up.
    pub(super) source_ranges: BTreeSet<RangeKey>,
    /// Stale ranges of VIPs that keep filtering by source: removed before the VIP entries are
    /// written, so that a VIP admits only what it lists from then on. Other stale ranges go
    /// with the removals.
    pub(super) early_stale_ranges: BTreeSet<RangeKey>,
    /// Whether this plan frees anything (a VIP id, slot, address or range) that a second pass
    /// could use for what was left out.
    pub(super) frees: bool,
    pub(super) left_out: Vec<LeftOut>,
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

/// Everything a reconcile writes, from what the maps hold and where the backends are. Pure.
///
/// Order rules (each has a unit test): a slot is written before any table points at it, and
/// marked as taking no new flows (draining, weight 0) only after the table that leaves it out
/// is in; a table is rebuilt whenever the installed one was built from other inputs (its
/// fingerprint), whatever the slots say; removals and drains need no room and are always
/// planned; what does not fit (VIPs, slots, addresses, source ranges, counted while old and
/// new entries coexist) is left out and listed, never failing the rest.
pub(super) fn plan(
    current: &Snapshot,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
) -> anyhow::Result<Plan> {
    let desired_keys: BTreeSet<VipKey> = desired.vips.iter().map(|v| vip_key(&v.key)).collect();

    // Ids kept by surviving VIPs and slots; new ones come from what is free now (ids and slots
    // freed by this reconcile are not reused in it: their old flows must re-hash, not follow,
    // and old tables may still point at them).
    let mut vip_ids = Ids::new(current.vips.values().map(|i| i.id), MAX_VIPS);
    let mut slot_ids = Ids::new(current.slots.keys().copied(), MAX_BACKENDS);
    // Room while the old entries are still there (they go last).
    let mut addr_room = (MAX_VIPS as usize).saturating_sub(current.vip_addrs.len());
    let mut range_room = (MAX_SOURCE_RANGES as usize).saturating_sub(current.source_ranges.len());
    let mut plan = Plan::default();

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

        let existing = if is_new {
            BTreeMap::new()
        } else {
            current.slots_of(id)
        };
        let mut backends = Vec::with_capacity(vip.backends.len());
        let mut kept = BTreeSet::new();
        for backend in &vip.backends {
            let resolved_value = match resolved.targets.get(&(backend.addr, vip.mode)) {
                Some(target) => Some(slot_value(
                    iface,
                    &desired.settings,
                    target,
                    vip,
                    backend,
                    id,
                )?),
                None => None,
            };
            let (slot, value) = match (existing.get(&backend.addr), resolved_value) {
                (Some((slot, old)), Some(value)) => (
                    *slot,
                    SlotValue {
                        generation: old.generation,
                        ..value
                    },
                ),
                // Not resolvable now: its last known slot, draining (its flows stay).
                (Some((slot, old)), None) => (
                    *slot,
                    SlotValue {
                        state: backend_state::DRAINING,
                        ..*old
                    },
                ),
                // ... or left out when it never had one.
                (None, None) => continue,
                (None, Some(value)) => {
                    let Some(slot) = slot_ids.take() else {
                        plan.left_out.push(LeftOut::Backend {
                            vip: vip.key,
                            backend: backend.addr,
                        });
                        continue;
                    };
                    // A new holder of the slot: flows of earlier ones do not match it.
                    let previous = current.generations.get(&slot).copied().unwrap_or(0);
                    let value = SlotValue {
                        generation: previous.wrapping_add(1).max(1),
                        ..value
                    };
                    plan.slots_before.push((slot, value, true));
                    (slot, value)
                }
            };
            if let Some((_, old)) = existing.get(&backend.addr)
                && *old != value
            {
                if effective_weight(&value) > 0 {
                    plan.slots_before.push((slot, value, false));
                } else {
                    plan.slots_after.push((slot, value));
                }
            }
            kept.insert(backend.addr);
            if value.mode != forward_mode::LOCAL && value.ifindex != iface.index {
                plan.tx_ports.insert(value.ifindex);
            }
            backends.push((slot, value));
        }
        for (addr, (slot, old)) in &existing {
            if !kept.contains(addr) {
                plan.removed_slots.insert(*slot, old.generation);
            }
        }
        let inputs: Vec<MaglevBackend> = backends
            .iter()
            .map(|(_, v)| MaglevBackend {
                id: maglev_id(addr_from_raw(&v.addr, v.family)),
                weight: effective_weight(v),
            })
            .collect();
        let table_size = desired.settings.maglev_table_size_for(vip.backends.len());
        let fingerprint = table_fingerprint(&backends, &inputs, table_size);
        let mut flags = 0;
        if vip.client_affinity {
            flags |= vip_flags::AFFINITY;
        }
        if !vip.source_ranges.is_empty() {
            flags |= vip_flags::SOURCE_RANGES;
        }
        let info = VipInfo {
            id,
            table_size,
            live_backends: inputs.iter().filter(|b| b.weight > 0).count() as u32,
            flags,
        };
        plan.vips.push(VipPlan {
            key,
            id,
            is_new,
            rebuild_table: is_new || current.tables.get(&id) != Some(&fingerprint),
            backends,
            inputs,
            fingerprint,
            info,
        });
    }

    let planned_ids: BTreeSet<u32> = plan.vips.iter().map(|v| v.id).collect();
    for (key, info) in &current.vips {
        if !desired_keys.contains(key) {
            plan.removed_vips.push((*key, info.id));
            plan.emptied_tables.insert(info.id);
            plan.removed_slots.extend(
                current
                    .slots_of(info.id)
                    .values()
                    .map(|(slot, v)| (*slot, v.generation)),
            );
        }
    }
    // Slots whose VIP no longer exists at all (left by an interrupted run): free them, and the
    // table of their VIP id unless a VIP of this plan has it.
    let live_ids: BTreeSet<u32> = current.vips.values().map(|i| i.id).collect();
    for (slot, value) in &current.slots {
        if !live_ids.contains(&value.vip_id) {
            plan.removed_slots.insert(*slot, value.generation);
            if !planned_ids.contains(&value.vip_id) {
                plan.emptied_tables.insert(value.vip_id);
            }
        }
    }
    let filtering: BTreeSet<u32> = plan
        .vips
        .iter()
        .filter(|v| v.info.flags & vip_flags::SOURCE_RANGES != 0)
        .map(|v| v.id)
        .collect();
    plan.early_stale_ranges = current
        .source_ranges
        .difference(&plan.source_ranges)
        .filter(|r| filtering.contains(&range_vip(r)))
        .copied()
        .collect();
    plan.frees = !plan.removed_vips.is_empty()
        || !plan.removed_slots.is_empty()
        || current
            .vip_addrs
            .keys()
            .any(|k| !plan.vip_addrs.contains_key(k))
        || !current.source_ranges.is_subset(&plan.source_ranges);
    Ok(plan)
}

/// The weight that counts for the Maglev table: zero when draining.
pub(crate) fn effective_weight(slot: &SlotValue) -> u32 {
    if slot.state == backend_state::ACTIVE {
        slot.weight
    } else {
        0
    }
}

/// Bumped when the Maglev builder changes what it builds from the same inputs.
pub(super) const TABLE_FORMAT: u64 = 1;

/// Of everything a VIP's installed table is a function of: the builder, the size, and each
/// backend's slot, Maglev id and weight in order (FNV-1a, never 0: 0 is "no fingerprint").
pub(super) fn table_fingerprint(
    backends: &[(u32, SlotValue)],
    inputs: &[MaglevBackend],
    size: u32,
) -> u64 {
    let mut words = vec![TABLE_FORMAT, u64::from(size), backends.len() as u64];
    for ((slot, _), input) in backends.iter().zip(inputs) {
        words.push(u64::from(*slot));
        words.push(u64::from(input.id) << 32 | u64::from(input.weight));
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for word in words {
        for byte in word.to_le_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h.max(1)
}

/// Where and how the program sends this backend's packets, from where it was resolved.
pub(super) fn slot_value(
    iface: &Interface,
    settings: &Settings,
    target: &Target,
    vip: &Vip,
    backend: &Backend,
    vip_id: u32,
) -> anyhow::Result<SlotValue> {
    let (addr, family) = raw_addr(backend.addr);
    let state = if backend.takes_new_flows() {
        backend_state::ACTIVE
    } else {
        backend_state::DRAINING
    };
    let mut value = SlotValue {
        addr,
        vip_id,
        state,
        weight: backend.weight,
        family,
        vip: vip_key(&vip.key),
        ..SlotValue::default()
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

/// What a Maglev table is a function of: (backend id, weight) pairs and the size.
pub(super) type TableInputs = (Vec<(u32, u32)>, u32);

#[cfg(test)]
mod tests;

/// The co-location maps and the dataplane's settings as they must end up: `PEERS` (other
/// nodes' MACs: their VIP frames were balanced already), the inline decapsulator's sets (this
/// node's addresses; the peers and the configured encap source prefixes as allowed outer
/// sources; both empty without peers) and `SETTINGS` (the flood guard's limit).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Colocation {
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
            _reserved: 0,
        },
    }
}
