//! Desired model -> BPF maps. Resolves where the backends are (`resolve`, the only step that
//! asks the kernel), reads what the maps hold, plans every write (a pure function of both,
//! checking capacity) before the first one, then writes in an order that packets can
//! never observe half-done: new backend slots, address sets and source ranges, then the new
//! Maglev table (one atomic swap), then the VIP entry, and only then frees what is gone. The
//! connection table is never flushed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, anyhow, bail};
use aya::maps::{MapError, PerCpuValues, lpm_trie::Key as LpmKey};
use lb_common::{
    Addr, Backend as SlotValue, Counters, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_DECAP_ADDRS,
    MAX_PEERS, MAX_SOURCE_RANGES, MAX_VIPS, NO_BACKEND, PeerKey, ScopedAddr, VipFilter, VipInfo,
    VipKey, backend_state, forward_mode, vip_flags,
};

use crate::{
    dataplane::{Maps, TableWrite, install_maglev_tables, scoped_prefix},
    decap,
    maglev::{self, MaglevBackend},
    model::{Backend, Desired, ForwardingMode, IpNet, Settings, Vip, VipAddr},
    net::Interface,
    resolve::{Resolved, Target, resolve},
};

/// A `SOURCE_RANGES` entry: (prefix length, scoped address).
type RangeKey = (u32, ScopedAddr);

/// What to do with a backend that cannot be resolved now (no ARP answer, no route).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// Refuse the whole state, change nothing (a config file: the operator fixes it).
    Fail,
    /// Keep it on its last known MAC, draining (its flows stay, it gets no new ones), or
    /// leave it out if it never had one; retry later (the agent: nodes come and go).
    Drain,
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub backends_added: usize,
    pub backends_changed: usize,
    pub backends_removed: usize,
    pub tables_rebuilt: usize,
    /// Backends that could not be resolved: draining on their last known MAC, or left out.
    pub unresolved: BTreeSet<IpAddr>,
}

impl Summary {
    /// Nothing was written.
    pub fn is_empty(&self) -> bool {
        Self {
            unresolved: BTreeSet::new(),
            ..self.clone()
        } == Self::default()
    }

    /// The summary as a line, or "" when nothing changed.
    pub fn to_string_if_changed(&self) -> String {
        if self.is_empty() {
            String::new()
        } else {
            self.to_string()
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vips +{} -{}, backends +{} ~{} -{}, maglev tables rebuilt {}",
            self.vips_added,
            self.vips_removed,
            self.backends_added,
            self.backends_changed,
            self.backends_removed,
            self.tables_rebuilt
        )
    }
}

/// The key of a VIP as the program sees it.
pub fn vip_key(vip: &VipAddr) -> VipKey {
    let (addr, family) = raw_addr(vip.addr);
    VipKey {
        addr,
        port: vip.port.to_be(),
        proto: vip.protocol.number(),
        family,
    }
}

/// An address as stored in the maps (raw words in network order) and its family.
pub fn raw_addr(addr: IpAddr) -> (Addr, u8) {
    match addr {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

pub fn addr_from_raw(raw: &Addr, family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (chunk, word) in o.as_chunks_mut::<4>().0.iter_mut().zip(raw) {
            *chunk = word.to_ne_bytes();
        }
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::from(raw[0].to_ne_bytes()))
    }
}

/// The Maglev identity of a backend: every load balancer derives the same one from the
/// address alone, so all of them build the same table.
pub fn maglev_id(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            o.as_chunks::<4>()
                .0
                .iter()
                .map(|c| u32::from_be_bytes(*c))
                .fold(0x6b43_a9b5, |h, w| (h ^ w).wrapping_mul(0x0100_0193))
        }
    }
}

/// The maps' view of the world: VIPs by key, occupied backend slots by id, VIP addresses and
/// source ranges.
pub struct Current {
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub slots: BTreeMap<u32, SlotValue>,
    pub vip_addrs: BTreeMap<VipKey, u32>,
    pub source_ranges: BTreeSet<RangeKey>,
    /// The occupied slots of each VIP id, by backend address (so that a plan over N VIPs reads
    /// each VIP's slots directly instead of scanning all of them N times).
    by_vip: BTreeMap<u32, BTreeMap<IpAddr, (u32, SlotValue)>>,
}

impl Current {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        let mut vips = BTreeMap::new();
        for entry in maps.vips.iter() {
            let (key, info) = entry.context("reading the VIPS map")?;
            vips.insert(key, info);
        }
        let mut slots = BTreeMap::new();
        let mut by_vip: BTreeMap<u32, BTreeMap<IpAddr, (u32, SlotValue)>> = BTreeMap::new();
        for (id, value) in maps.read_backends()?.into_iter().enumerate() {
            if value.state != backend_state::EMPTY {
                slots.insert(id as u32, value);
                by_vip
                    .entry(value.vip_id)
                    .or_default()
                    .insert(addr_from_raw(&value.addr, value.family), (id as u32, value));
            }
        }
        let mut vip_addrs = BTreeMap::new();
        for entry in maps.vip_addrs.iter() {
            let (key, count) = entry.context("reading the VIP_ADDRS map")?;
            vip_addrs.insert(key, count);
        }
        let mut source_ranges = BTreeSet::new();
        for key in maps.source_ranges.keys() {
            let key = key.context("reading the SOURCE_RANGES map")?;
            source_ranges.insert((key.prefix_len(), key.data()));
        }
        Ok(Self {
            vips,
            slots,
            vip_addrs,
            source_ranges,
            by_vip,
        })
    }

    /// The occupied slots of VIP `vip_id`, by backend address.
    fn slots_of(&self, vip_id: u32) -> BTreeMap<IpAddr, (u32, SlotValue)> {
        self.by_vip.get(&vip_id).cloned().unwrap_or_default()
    }
}

/// One VIP's planned state.
struct VipPlan {
    key: VipKey,
    id: u32,
    is_new: bool,
    /// Backends in desired order with their slot ids and slot values.
    backends: Vec<(u32, SlotValue)>,
    rebuild_table: bool,
    info: VipInfo,
}

/// Everything to write, computed without touching a map.
struct Plan {
    vips: Vec<VipPlan>,
    /// Slots to write (new or changed), with whether each is new.
    slot_writes: Vec<(u32, SlotValue, bool)>,
    tx_ports: BTreeSet<u32>,
    removed_vips: Vec<(VipKey, u32)>,
    removed_slots: Vec<u32>,
    /// `VIP_ADDRS` as it must end up.
    vip_addrs: BTreeMap<VipKey, u32>,
    /// `SOURCE_RANGES` as it must end up.
    source_ranges: BTreeSet<RangeKey>,
}

/// Empties the `ANNOUNCE` map (an agent without `--announce` answers ARP for nothing).
pub fn clear_announce(maps: &mut Maps) -> anyhow::Result<()> {
    let keys: Vec<VipKey> = maps
        .announce
        .keys()
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("reading the ANNOUNCE map: {e}"))?;
    for key in keys {
        match maps.announce.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => bail!("removing an entry of the ANNOUNCE map: {e}"),
        }
    }
    Ok(())
}

/// Brings the maps to `desired`. On error nothing has been written if the error came from
/// resolving (with [`Unreachable::Fail`]) or planning (capacity); a syscall failure midway is
/// reported with what was done.
pub fn reconcile(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    unreachable: Unreachable,
) -> anyhow::Result<Summary> {
    let resolved = resolve(iface, desired)?;
    if unreachable == Unreachable::Fail
        && let Some(((addr, mode), why)) = resolved.failures.iter().next()
    {
        let vip = desired
            .vips
            .iter()
            .find(|v| v.mode == *mode && v.backends.iter().any(|b| b.addr == *addr))
            .map(|v| v.key.to_string())
            .unwrap_or_default();
        bail!("{vip}: backend {addr}: {why}");
    }
    reconcile_resolved(maps, iface, desired, &resolved)
}

/// [`reconcile`] after the resolve step: plan (pure) and apply.
pub fn reconcile_resolved(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
) -> anyhow::Result<Summary> {
    let current = Current::read(maps)?;
    let plan = plan(&current, iface, desired, resolved)?;
    let mut summary = apply(maps, current, plan)?;
    sync_colocation(maps, desired, resolved)?;
    summary.unresolved = resolved.unresolved();
    Ok(summary)
}

/// The co-location maps: `PEERS` (other nodes' MACs: their VIP frames were balanced already)
/// and the inline decapsulator's sets (this node's addresses; the peers and the configured
/// encap source prefixes as allowed outer sources). Empty without peers.
fn sync_colocation(maps: &mut Maps, desired: &Desired, resolved: &Resolved) -> anyhow::Result<()> {
    let want: BTreeSet<PeerKey> = resolved
        .peer_macs
        .iter()
        .take(MAX_PEERS as usize)
        .map(|mac| PeerKey::new(mac.0))
        .collect();
    let mut have = BTreeSet::new();
    for key in maps.peers.keys() {
        have.insert(key.context("reading the PEERS map")?);
    }
    for key in want.difference(&have) {
        maps.peers.insert(key, &1, 0).context("writing PEERS")?;
    }
    for key in have.difference(&want) {
        match maps.peers.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing from PEERS"),
        }
    }
    let (mut allow, mut local) = (Vec::new(), Vec::new());
    if !desired.peers.is_empty() {
        allow.extend(desired.peers.iter().map(|a| IpNet::from(*a)));
        allow.extend(desired.settings.encap_source_v4.map(IpNet::V4));
        allow.extend(desired.settings.encap_source_v6.map(IpNet::V6));
        local.extend(resolved.local.iter().copied());
    }
    let room = MAX_DECAP_ADDRS as usize;
    allow.truncate(room);
    local.truncate(room.saturating_sub(allow.len()));
    decap::sync(&mut maps.decap, &allow, &local)
}

fn plan(
    current: &Current,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
) -> anyhow::Result<Plan> {
    let table_size = desired.settings.maglev_table_size;
    let desired_keys: BTreeSet<VipKey> = desired.vips.iter().map(|v| vip_key(&v.key)).collect();

    // Ids kept by surviving VIPs and slots; new ones come from what is free now (slots freed
    // by this reconcile are not reused in it: their old flows must re-hash, not follow).
    let mut used_vip_ids: BTreeSet<u32> = current.vips.values().map(|i| i.id).collect();
    let mut used_slots: BTreeSet<u32> = current.slots.keys().copied().collect();
    let mut next_vip_id = 0u32;
    let mut next_slot = 0u32;

    let mut plan = Plan {
        vips: Vec::new(),
        slot_writes: Vec::new(),
        tx_ports: BTreeSet::new(),
        removed_vips: Vec::new(),
        removed_slots: Vec::new(),
        vip_addrs: BTreeMap::new(),
        source_ranges: BTreeSet::new(),
    };

    for vip in &desired.vips {
        let key = vip_key(&vip.key);
        let (id, is_new, old_info) = match current.vips.get(&key) {
            Some(info) => (info.id, false, Some(*info)),
            None => {
                let id =
                    allocate(&mut used_vip_ids, &mut next_vip_id, MAX_VIPS).ok_or_else(|| {
                        anyhow!("{}: no free VIP id: at most {MAX_VIPS} VIPs", vip.key)
                    })?;
                (id, true, None)
            }
        };
        let existing = if is_new {
            BTreeMap::new()
        } else {
            current.slots_of(id)
        };

        let mut backends = Vec::with_capacity(vip.backends.len());
        let mut table_changed = is_new;
        let mut kept = BTreeSet::new();
        for backend in &vip.backends {
            let mut value = match resolved.targets.get(&(backend.addr, vip.mode)) {
                Some(target) => slot_value(iface, &desired.settings, target, vip, backend, id)?,
                // Not resolvable now: its last known slot, draining (its flows stay), or
                // left out when it never had one.
                None => match existing.get(&backend.addr) {
                    Some((_, old)) => SlotValue {
                        state: backend_state::DRAINING,
                        ..*old
                    },
                    None => continue,
                },
            };
            kept.insert(backend.addr);
            if value.mode != forward_mode::LOCAL && value.ifindex != iface.index {
                plan.tx_ports.insert(value.ifindex);
            }
            let slot = match existing.get(&backend.addr) {
                Some((slot, old)) => {
                    table_changed |= effective_weight(old) != effective_weight(&value);
                    if *old != value {
                        plan.slot_writes.push((*slot, value, false));
                    }
                    *slot
                }
                None => {
                    table_changed = true;
                    let slot = allocate(&mut used_slots, &mut next_slot, MAX_BACKENDS)
                        .ok_or_else(|| {
                            anyhow!("{}: no free backend slot: at most {MAX_BACKENDS} backends over all VIPs", vip.key)
                        })?;
                    plan.slot_writes.push((slot, value, true));
                    slot
                }
            };
            value.vip_id = id;
            backends.push((slot, value));
        }
        for (addr, (slot, _)) in &existing {
            if !kept.contains(addr) {
                table_changed = true;
                plan.removed_slots.push(*slot);
            }
        }
        let live = backends
            .iter()
            .filter(|(_, v)| effective_weight(v) > 0)
            .count() as u32;
        let mut flags = 0;
        if vip.client_affinity {
            flags |= vip_flags::AFFINITY;
        }
        if !vip.source_ranges.is_empty() {
            flags |= vip_flags::SOURCE_RANGES;
        }
        for net in &vip.source_ranges {
            let key = scoped_prefix(id, net);
            plan.source_ranges.insert((key.prefix_len(), key.data()));
        }
        *plan.vip_addrs.entry(key.address_only()).or_insert(0) += 1;
        let info = VipInfo {
            id,
            table_size,
            live_backends: live,
            flags,
        };
        let rebuild_table = table_changed || old_info.is_none_or(|o| o.table_size != table_size);
        plan.vips.push(VipPlan {
            key,
            id,
            is_new,
            backends,
            rebuild_table,
            info,
        });
    }

    for (key, info) in &current.vips {
        if !desired_keys.contains(key) {
            plan.removed_vips.push((*key, info.id));
            plan.removed_slots
                .extend(current.slots_of(info.id).values().map(|(slot, _)| *slot));
        }
    }
    // Slots whose VIP no longer exists at all (left by an interrupted run): free them too.
    let live_ids: BTreeSet<u32> = current.vips.values().map(|i| i.id).collect();
    plan.removed_slots.extend(
        current
            .slots
            .iter()
            .filter(|(_, s)| !live_ids.contains(&s.vip_id))
            .map(|(slot, _)| *slot),
    );
    if plan.source_ranges.len() > MAX_SOURCE_RANGES as usize {
        bail!(
            "{} source ranges over all VIPs: at most {MAX_SOURCE_RANGES}",
            plan.source_ranges.len()
        );
    }
    Ok(plan)
}

/// Lowest id not in `used`, below `limit`, marking it used.
fn allocate(used: &mut BTreeSet<u32>, cursor: &mut u32, limit: u32) -> Option<u32> {
    while *cursor < limit {
        let id = *cursor;
        *cursor += 1;
        if used.insert(id) {
            return Some(id);
        }
    }
    None
}

/// The weight that counts for the Maglev table: zero when draining.
fn effective_weight(slot: &SlotValue) -> u32 {
    if slot.state == backend_state::ACTIVE {
        slot.weight
    } else {
        0
    }
}

/// Where and how the program sends this backend's packets, from where it was resolved.
fn slot_value(
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
fn encap_source(
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
type TableInputs = (Vec<(u32, u32)>, u32);

fn apply(maps: &mut Maps, current: Current, plan: Plan) -> anyhow::Result<Summary> {
    let Current {
        vip_addrs: current_vip_addrs,
        source_ranges: current_ranges,
        ..
    } = current;
    let mut summary = Summary::default();
    let cpus = cpu_count(maps)?;

    // 1. TX ports for backends behind other interfaces.
    for ifindex in &plan.tx_ports {
        maps.tx_ports
            .insert(*ifindex, *ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to TX_PORTS"))?;
    }

    // 2. Backend slots: new ones are not referenced by any table yet; changed ones take effect
    //    for the flows that already point at them.
    for (slot, value, is_new) in &plan.slot_writes {
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

    // 3. The address filter admits every VIP address, old and new, before any VIP is added...
    let desired_filter = vip_filter(plan.vips.iter().map(|v| &v.key));
    let widened = vip_filter(
        plan.vips
            .iter()
            .map(|v| &v.key)
            .chain(plan.removed_vips.iter().map(|(k, _)| k)),
    );
    write_filter(maps, &widened)?;

    // 3b. Addresses and source ranges the new VIP entries will rely on.
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

    // 4. Tables (one atomic swap each), then the VIP entries that point at them. VIPs with the
    //    same backends and weights (every VIP of a Kubernetes cluster's nodes, for one) have the
    //    same table: it is built once per reconcile.
    let mut built: HashMap<TableInputs, Vec<u32>> = HashMap::new();
    let mut rebuilt: Vec<(&VipPlan, TableInputs, Vec<u32>)> = Vec::new();
    for vip in plan.vips.iter().filter(|v| v.rebuild_table) {
        let inputs: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .map(|(_, v)| MaglevBackend {
                id: maglev_id(addr_from_raw(&v.addr, v.family)),
                weight: effective_weight(v),
            })
            .collect();
        let key: TableInputs = (
            inputs.iter().map(|b| (b.id, b.weight)).collect(),
            vip.info.table_size,
        );
        built
            .entry(key.clone())
            .or_insert_with(|| maglev::build_table(&inputs, vip.info.table_size));
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
            })
        })
        .collect();
    summary.tables_rebuilt += tables.len();
    install_maglev_tables(maps, &tables)?;
    for vip in &plan.vips {
        if vip.is_new {
            maps.vip_stats
                .set(vip.id, zeros(cpus)?, 0)
                .with_context(|| format!("resetting counters of VIP #{}", vip.id))?;
            summary.vips_added += 1;
        }
        maps.vips
            .insert(&vip.key, &vip.info, 0)
            .with_context(|| format!("writing VIP #{}", vip.id))?;
    }

    // 5. What is gone: VIP entries first (no packet can reach their tables after this), then
    //    the slots (flows pointing at them re-hash on their next packet).
    for (key, id) in &plan.removed_vips {
        match maps.vips.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("removing VIP #{id}")),
        }
        summary.vips_removed += 1;
    }
    // Release the tables' memory: a one-slot empty table stands in until the id is reused.
    let empty: Vec<TableWrite<'_>> = plan
        .removed_vips
        .iter()
        .map(|(_, id)| TableWrite {
            vip_id: *id,
            picks: &[NO_BACKEND],
            backends: &[],
        })
        .collect();
    install_maglev_tables(maps, &empty)?;
    for slot in &plan.removed_slots {
        maps.backends
            .set(*slot, &SlotValue::default(), 0)
            .with_context(|| format!("clearing backend slot {slot}"))?;
        summary.backends_removed += 1;
    }
    // 5b. Source ranges and addresses no VIP refers to any more.
    for (prefix_len, data) in current_ranges.difference(&plan.source_ranges) {
        match maps.source_ranges.remove(&LpmKey::new(*prefix_len, *data)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing a source range"),
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
    // 6. ... and only the remaining ones after the removals.
    if desired_filter != widened {
        write_filter(maps, &desired_filter)?;
    }
    Ok(summary)
}

fn vip_filter<'a>(keys: impl Iterator<Item = &'a VipKey>) -> VipFilter {
    let mut filter = VipFilter::default();
    for key in keys {
        filter.insert(&key.addr);
    }
    filter
}

/// Rewrites the filter. Bits that stay set are rewritten with the same value, so no packet can
/// see a VIP's bit clear while its entry exists.
fn write_filter(maps: &mut Maps, filter: &VipFilter) -> anyhow::Result<()> {
    if maps.vip_filter.get(&0, 0).ok().as_ref() == Some(filter) {
        return Ok(());
    }
    maps.vip_filter
        .set(0, filter, 0)
        .context("writing the VIP address filter")
}

fn cpu_count(maps: &Maps) -> anyhow::Result<usize> {
    Ok(maps
        .vip_stats
        .get(&0, 0)
        .context("reading VIP_STATS")?
        .len())
}

fn zeros(cpus: usize) -> anyhow::Result<PerCpuValues<Counters>> {
    PerCpuValues::try_from(vec![Counters::default(); cpus]).context("building per-CPU zeros")
}
