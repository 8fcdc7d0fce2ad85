//! Desired model -> BPF maps. Reads what the maps hold, plans every write (resolving MACs and
//! checking capacity) before the first one, then writes in an order that packets can never
//! observe half-done: new backend slots, then the new Maglev table (one atomic swap), then the
//! VIP entry, and only then frees what is gone. The connection table is never flushed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use aya::maps::{MapError, PerCpuValues};
use lb_common::{
    Backend as SlotValue, Counters, MAX_BACKENDS, MAX_VIPS, NO_BACKEND, VipFilter, VipInfo, VipKey,
    backend_state,
};

use crate::{
    dataplane::{Maps, TableWrite, install_maglev_tables},
    maglev::{self, MaglevBackend},
    model::{Backend, Desired, MacAddr, Vip, VipAddr},
    net::{Interface, resolve_neighbour},
};

/// How long to wait for a backend to answer ARP.
const NEIGHBOUR_TIMEOUT: Duration = Duration::from_secs(2);

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub backends_added: usize,
    pub backends_changed: usize,
    pub backends_removed: usize,
    pub tables_rebuilt: usize,
}

impl Summary {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
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
    VipKey {
        addr: u32::from_ne_bytes(vip.addr.octets()),
        port: vip.port.to_be(),
        proto: vip.protocol.number(),
        _pad: 0,
    }
}

/// A backend address as stored in the maps (network order).
pub fn raw_addr(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_raw(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// The maps' view of the world: VIPs by key and occupied backend slots by id.
pub struct Current {
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub slots: BTreeMap<u32, SlotValue>,
    /// The occupied slots of each VIP id, by backend address (so that a plan over N VIPs reads
    /// each VIP's slots directly instead of scanning all of them N times).
    by_vip: BTreeMap<u32, BTreeMap<Ipv4Addr, (u32, SlotValue)>>,
}

impl Current {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        let mut vips = BTreeMap::new();
        for entry in maps.vips.iter() {
            let (key, info) = entry.context("reading the VIPS map")?;
            vips.insert(key, info);
        }
        let mut slots = BTreeMap::new();
        let mut by_vip: BTreeMap<u32, BTreeMap<Ipv4Addr, (u32, SlotValue)>> = BTreeMap::new();
        for (id, value) in maps.read_backends()?.into_iter().enumerate() {
            if value.state != backend_state::EMPTY {
                slots.insert(id as u32, value);
                by_vip
                    .entry(value.vip_id)
                    .or_default()
                    .insert(addr_from_raw(value.addr), (id as u32, value));
            }
        }
        Ok(Self {
            vips,
            slots,
            by_vip,
        })
    }

    /// The occupied slots of VIP `vip_id`, by backend address.
    fn slots_of(&self, vip_id: u32) -> BTreeMap<Ipv4Addr, (u32, SlotValue)> {
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
}

/// Brings the maps to `desired`. On error nothing has been written if the error came from
/// planning (bad MAC, capacity); a syscall failure midway is reported with what was done.
pub fn reconcile(maps: &mut Maps, iface: &Interface, desired: &Desired) -> anyhow::Result<Summary> {
    let current = Current::read(maps)?;
    let plan = plan(&current, iface, desired)?;
    apply(maps, plan)
}

fn plan(current: &Current, iface: &Interface, desired: &Desired) -> anyhow::Result<Plan> {
    let table_size = desired.settings.maglev_table_size;
    let desired_keys: BTreeSet<VipKey> = desired.vips.iter().map(|v| vip_key(&v.key)).collect();
    // One neighbour lookup per backend address, however many VIPs it serves.
    let mut neighbours = Neighbours::default();

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
        for backend in &vip.backends {
            let mut value = slot_value(iface, &mut neighbours, vip, backend, id)?;
            if value.ifindex != iface.index {
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
            if !vip.backends.iter().any(|b| b.addr == *addr) {
                table_changed = true;
                plan.removed_slots.push(*slot);
            }
        }
        let live = backends
            .iter()
            .filter(|(_, v)| effective_weight(v) > 0)
            .count() as u32;
        let info = VipInfo {
            id,
            table_size,
            live_backends: live,
            flags: 0,
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

/// Resolved backend MACs and egress interfaces of one plan, by address.
type Neighbours = BTreeMap<Ipv4Addr, (MacAddr, Interface)>;

/// Where and how the program sends this backend's packets.
fn slot_value(
    iface: &Interface,
    neighbours: &mut Neighbours,
    vip: &Vip,
    backend: &Backend,
    vip_id: u32,
) -> anyhow::Result<SlotValue> {
    let (dst_mac, egress) = match backend.mac {
        // A configured MAC is on the attached interface's L2 segment.
        Some(mac) => (mac, iface.clone()),
        None => match neighbours.get(&backend.addr) {
            Some(known) => known.clone(),
            None => {
                let n = resolve_neighbour(backend.addr, NEIGHBOUR_TIMEOUT).map_err(|e| {
                    anyhow!(
                        "{}: backend {}: cannot find its MAC address: {e}; set `mac:` for it in the config or check that it is on a directly connected network",
                        vip.key, backend.addr
                    )
                })?;
                let egress = if n.device == iface.name {
                    iface.clone()
                } else {
                    Interface::by_name(&n.device)?
                };
                neighbours.insert(backend.addr, (n.mac, egress.clone()));
                (n.mac, egress)
            }
        },
    };
    let state = if backend.takes_new_flows() {
        backend_state::ACTIVE
    } else {
        backend_state::DRAINING
    };
    Ok(SlotValue {
        addr: raw_addr(backend.addr),
        vip_id,
        ifindex: egress.index,
        state,
        weight: backend.weight,
        dst_mac: dst_mac.0,
        src_mac: egress.mac.0,
        vip: vip_key(&vip.key),
    })
}

/// What a Maglev table is a function of: (backend id, weight) pairs and the size.
type TableInputs = (Vec<(u32, u32)>, u32);

fn apply(maps: &mut Maps, plan: Plan) -> anyhow::Result<Summary> {
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
                id: u32::from_be(v.addr),
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
    // 6. ... and only the remaining ones after the removals.
    if desired_filter != widened {
        write_filter(maps, &desired_filter)?;
    }
    Ok(summary)
}

fn vip_filter<'a>(keys: impl Iterator<Item = &'a VipKey>) -> VipFilter {
    let mut filter = VipFilter::default();
    for key in keys {
        filter.insert(key.addr);
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
