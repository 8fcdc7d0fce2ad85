//! Typed handles on the balancer's and the decapsulator's maps, opened from a loaded object
//! or from their pins.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::{Context as _, anyhow, bail};
use aya::Ebpf;
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{
    Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
};
use ipnet::IpNet;
use lb_common::{
    Announce, Backend, Counters, FAMILY_V4, FAMILY_V6, FlowKey, FlowKey4, FlowValue, GlobalCounter,
    MemberKey, MemberWeight, PeerFilter, PeerKey, RateWindow, ScopedAddr,
    Settings as DataplaneSettings, TableInfo, VipFilter, VipInfo, VipKey, VipRef, decap_map_names,
    map_names,
};

use super::maglev_table::MaglevMapping;
use super::pins::PinLayout;
use super::sys::{lookup_batch, lookup_hash_all};

/// Typed handles on every map, from a freshly loaded object or from pins. The aya handles stay
/// inside `dataplane`: the rest of sluice reads and writes through the methods below (reads for
/// the observers here, the reconcile's writes in `writes.rs`), in lb-common's types.
pub struct Maps {
    pub(super) vips: HashMap<MapData, VipKey, VipInfo>,
    pub(super) maglev: ArrayOfMaps<MapData>,
    pub(super) backends: Array<MapData, Backend>,
    pub(super) vip_by_id: Array<MapData, VipRef>,
    pub(super) tables: Array<MapData, TableInfo>,
    pub(super) table_members: HashMap<MapData, MemberKey, MemberWeight>,
    pub(super) flows: HashMap<MapData, FlowKey4, FlowValue>,
    pub(super) flows6: HashMap<MapData, FlowKey, FlowValue>,
    /// Second chance's records of the flows this node handed on (the program writes them).
    pub(super) handed_flows: HashMap<MapData, FlowKey, FlowValue>,
    pub(super) tx_ports: DevMapHash<MapData>,
    pub(super) vip_stats: PerCpuArray<MapData, Counters>,
    pub(super) backend_stats: PerCpuArray<MapData, Counters>,
    pub(super) global_stats: PerCpuArray<MapData, u64>,
    pub(super) vip_filter: Array<MapData, VipFilter>,
    pub(super) vip_addrs: HashMap<MapData, VipKey, u32>,
    pub(super) source_ranges: LpmTrie<MapData, ScopedAddr, u8>,
    /// Addresses this node answers ARP for (the agent's announcer writes it; see [`AnnounceMap`]).
    pub(super) announce: HashMap<MapData, VipKey, Announce>,
    /// MACs of the other sluice nodes (co-location: their VIP frames were balanced already).
    pub(super) peers: HashMap<MapData, PeerKey, u8>,
    pub(super) peer_filter: Array<MapData, PeerFilter>,
    /// Dataplane-wide settings (the flood guard's limit), and the guard's per-CPU windows.
    pub(super) settings: Array<MapData, DataplaneSettings>,
    pub(super) new_flows: PerCpuArray<MapData, RateWindow>,
    /// The inline decapsulator's address sets.
    pub(super) decap: DecapSets,
    /// Second descriptors of MAGLEV, BACKENDS and VIP_BY_ID, for batched calls (aya has no
    /// batch API).
    pub(super) maglev_fd: OwnedFd,
    pub(super) backends_fd: OwnedFd,
    pub(super) vip_by_id_fd: OwnedFd,
    pub(super) vips_fd: OwnedFd,
    pub(super) vip_addrs_fd: OwnedFd,
}

/// A second descriptor of an array map (of maps or of values) or a hash map, for the batched
/// calls.
fn second_fd(map: &Map, name: &str) -> anyhow::Result<OwnedFd> {
    let data = match map {
        Map::Array(data) | Map::ArrayOfMaps(data) | Map::HashMap(data) => data,
        _ => bail!("map {name} is not an array or a hash map"),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating the {name} map's descriptor"))
}

impl Maps {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::open(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })
    }

    pub fn from_pins(pins: &PinLayout) -> anyhow::Result<Self> {
        Self::open(|name| open_pinned(pins, name, "`sluice attach` or `sluice run`"))
    }

    fn open(mut take: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        let maglev = take(map_names::MAGLEV)?;
        let maglev_fd = second_fd(&maglev, map_names::MAGLEV)?;
        let backends = take(map_names::BACKENDS)?;
        let backends_fd = second_fd(&backends, map_names::BACKENDS)?;
        let vip_by_id = take(map_names::VIP_BY_ID)?;
        let vip_by_id_fd = second_fd(&vip_by_id, map_names::VIP_BY_ID)?;
        let vips = take(map_names::VIPS)?;
        let vips_fd = second_fd(&vips, map_names::VIPS)?;
        let vip_addrs = take(map_names::VIP_ADDRS)?;
        let vip_addrs_fd = second_fd(&vip_addrs, map_names::VIP_ADDRS)?;
        let layout = |name: &str, e| anyhow!("map {name} has an unexpected layout: {e}");
        Ok(Self {
            maglev_fd,
            backends_fd,
            vip_by_id_fd,
            vips_fd,
            vip_addrs_fd,
            backends: backends
                .try_into()
                .map_err(|e| layout(map_names::BACKENDS, e))?,
            maglev: maglev
                .try_into()
                .map_err(|e| layout(map_names::MAGLEV, e))?,
            vip_by_id: vip_by_id
                .try_into()
                .map_err(|e| layout(map_names::VIP_BY_ID, e))?,
            tables: typed!(take, map_names::TABLES),
            table_members: typed!(take, map_names::TABLE_MEMBERS),
            vips: vips.try_into().map_err(|e| layout(map_names::VIPS, e))?,
            flows: typed!(take, map_names::FLOWS),
            flows6: typed!(take, map_names::FLOWS6),
            handed_flows: typed!(take, map_names::HANDED_FLOWS),
            tx_ports: typed!(take, map_names::TX_PORTS),
            vip_stats: typed!(take, map_names::VIP_STATS),
            backend_stats: typed!(take, map_names::BACKEND_STATS),
            global_stats: typed!(take, map_names::GLOBAL_STATS),
            vip_filter: typed!(take, map_names::VIP_FILTER),
            vip_addrs: vip_addrs
                .try_into()
                .map_err(|e| layout(map_names::VIP_ADDRS, e))?,
            source_ranges: typed!(take, map_names::SOURCE_RANGES),
            announce: typed!(take, map_names::ANNOUNCE),
            peers: typed!(take, map_names::PEERS),
            peer_filter: typed!(take, map_names::PEER_FILTER),
            settings: typed!(take, map_names::SETTINGS),
            new_flows: typed!(take, map_names::NEW_FLOWS),
            decap: DecapSets {
                sources: typed!(take, map_names::DECAP_SOURCES),
                local: typed!(take, map_names::DECAP_LOCAL),
            },
        })
    }

    /// Every BACKENDS entry, in id order: one batched lookup instead of one syscall per entry,
    /// falling back to those on kernels without batched array lookups.
    pub fn read_backends(&self) -> anyhow::Result<Vec<Backend>> {
        read_array(&self.backends_fd, &self.backends, map_names::BACKENDS)
    }

    /// Every VIP_BY_ID entry, in VIP id order (cleared ones included).
    pub fn read_vip_refs(&self) -> anyhow::Result<Vec<VipRef>> {
        read_array(&self.vip_by_id_fd, &self.vip_by_id, map_names::VIP_BY_ID)
    }

    /// Table `id`'s description, `None` when the id holds no table (fingerprint 0).
    pub fn table(&self, id: u32) -> anyhow::Result<Option<TableInfo>> {
        let info = self
            .tables
            .get(&id, 0)
            .with_context(|| format!("reading table #{id} of TABLES"))?;
        Ok((info.fingerprint != 0).then_some(info))
    }

    /// Every table's members with their weights ([`lb_common::MEMBER_DRAINING`] set on the
    /// draining ones), by table id, in backend id order.
    pub fn table_members(&self) -> anyhow::Result<BTreeMap<u32, BTreeMap<u32, MemberWeight>>> {
        let mut members: BTreeMap<u32, BTreeMap<u32, MemberWeight>> = BTreeMap::new();
        for entry in self.table_members.iter() {
            let (key, weight) = entry.context("reading the TABLE_MEMBERS map")?;
            members
                .entry(key.table)
                .or_default()
                .insert(key.backend, weight);
        }
        Ok(members)
    }

    /// Backend `backend`'s weight in table `table` (`TABLE_MEMBERS`), `None` when it is no
    /// member: one lookup, for pollers that wait for a change to reach the maps.
    pub fn member_weight(&self, table: u32, backend: u32) -> anyhow::Result<Option<MemberWeight>> {
        match self.table_members.get(&MemberKey { table, backend }, 0) {
            Ok(w) => Ok(Some(w)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(anyhow!("reading the TABLE_MEMBERS map: {e}")),
        }
    }

    /// Reads table `id`'s Maglev picks (slot -> backend id), `size` slots. Opening an inner map
    /// by its id (BPF_MAP_GET_FD_BY_ID) needs CAP_SYS_ADMIN, which the agent's pod has not got:
    /// readers there rebuild the table from `TABLE_MEMBERS` instead.
    pub fn maglev_table(&self, id: u32, size: u32) -> anyhow::Result<Vec<u32>> {
        let inner: MapData = self
            .maglev
            .get(&id, 0)
            .map_err(|e| anyhow!("reading Maglev table #{id}: {e}"))?;
        let info = inner.info().context("reading a Maglev table's info")?;
        if info.max_entries() != lb_common::maglev_elements(size) {
            bail!(
                "Maglev table #{id} has {} elements, not the {} of {size} slots (changed meanwhile)",
                info.max_entries(),
                lb_common::maglev_elements(size)
            );
        }
        let mapping = MaglevMapping::new(&inner, size, libc::PROT_READ)?;
        Ok(mapping.read())
    }
}

/// A whole u32-keyed array map by one batched lookup, else entry by entry.
fn read_array<V: aya::Pod + Default>(
    fd: &OwnedFd,
    array: &Array<MapData, V>,
    name: &str,
) -> anyhow::Result<Vec<V>> {
    let n = array.len() as usize;
    let mut keys = vec![0u32; n];
    let mut values = vec![V::default(); n];
    if let Ok(count) = lookup_batch(fd, &mut keys, &mut values)
        && count == n
        && keys.iter().enumerate().all(|(i, k)| *k as usize == i)
    {
        return Ok(values);
    }
    array
        .iter()
        .map(|v| v.with_context(|| format!("reading the {name} map")))
        .collect()
}

/// Every entry of a hash map, batched (10,000 VIPs: a few syscalls instead of 20,000); by
/// iteration where the kernel refuses the batch.
fn read_hash<K: aya::Pod + Default + Ord, V: aya::Pod + Default>(
    fd: &OwnedFd,
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> anyhow::Result<BTreeMap<K, V>> {
    match lookup_hash_all::<K, V>(fd, 4096) {
        Ok(entries) => Ok(entries.into_iter().collect()),
        Err(_) => map
            .iter()
            .map(|entry| entry.with_context(|| format!("reading the {name} map")))
            .collect(),
    }
}

/// Typed reads for the observers (observe/): what they need of the maps, in lb-common's types
/// and anyhow errors, so that they need no aya.
impl Maps {
    /// The connection table's entry for `key` (either family), `None` when it holds none. A
    /// lookup from user space leaves the LRU's recency alone (the kernel's
    /// lookup_elem_sys_only): reading a flow does not keep its entry alive.
    pub fn flow(&self, key: &FlowKey) -> anyhow::Result<Option<FlowValue>> {
        let entry = if key.family == FAMILY_V4 {
            self.flows.get(&key.narrow(), 0)
        } else {
            self.flows6.get(key, 0)
        };
        match entry {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(anyhow!("reading the connection table: {e}")),
        }
    }

    /// Every connection-table entry, IPv4 then IPv6, IPv4 keys widened; `None` for an entry
    /// that could not be read (evicted while the table was walked).
    pub fn flow_entries(&self) -> impl Iterator<Item = Option<(FlowKey, FlowValue)>> + '_ {
        let v4 = self.flows.iter().map(|e| e.map(|(k, v)| (k.widen(), v)));
        v4.chain(self.flows6.iter()).map(Result::ok)
    }

    /// This node's record of a flow it handed on (second chance over several changes): the
    /// backend it went to, with the VIP's id and the backend's generation then. `None`: no
    /// record. Read without touching the LRU's recency.
    pub fn handed_flow(&self, key: &FlowKey) -> anyhow::Result<Option<FlowValue>> {
        match self.handed_flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(anyhow!("reading the HANDED_FLOWS map: {e}")),
        }
    }

    /// Every record of a flow this node handed on (`None`: one evicted while walked).
    pub fn handed_flows(&self) -> impl Iterator<Item = Option<(FlowKey, FlowValue)>> + '_ {
        self.handed_flows.iter().map(Result::ok)
    }

    /// The MAC this node answers ARP and Neighbor Solicitations with for `key` (an
    /// [`announce_key`]), if it announces that address.
    pub fn announced_mac(&self, key: &VipKey) -> anyhow::Result<Option<[u8; 6]>> {
        match self.announce.get(key, 0) {
            Ok(a) => Ok(Some(a.mac)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(anyhow!("reading the ANNOUNCE map: {e}")),
        }
    }

    /// Every address this node announces, with the MAC it answers with.
    pub fn announced(&self) -> anyhow::Result<Vec<(VipKey, Announce)>> {
        self.announce
            .iter()
            .map(|entry| entry.context("reading the ANNOUNCE map"))
            .collect()
    }

    /// How many peers (other sluice nodes' MACs) `PEERS` holds.
    pub fn peer_count(&self) -> usize {
        self.peers.keys().filter(Result::is_ok).count()
    }

    /// One VIP's entry, `None` when `VIPS` holds none for `key`.
    pub fn vip(&self, key: &VipKey) -> anyhow::Result<Option<VipInfo>> {
        match self.vips.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(anyhow!("reading the VIPS map: {e}")),
        }
    }

    /// Every VIP entry, by key.
    pub fn read_vips(&self) -> anyhow::Result<BTreeMap<VipKey, VipInfo>> {
        read_hash(&self.vips_fd, &self.vips, map_names::VIPS)
    }

    /// Every VIP_ADDRS entry: how many VIPs each address has.
    pub fn read_vip_addrs(&self) -> anyhow::Result<BTreeMap<VipKey, u32>> {
        read_hash(&self.vip_addrs_fd, &self.vip_addrs, map_names::VIP_ADDRS)
    }

    /// One backend entry as written.
    pub fn backend(&self, id: u32) -> anyhow::Result<Backend> {
        self.backends
            .get(&id, 0)
            .with_context(|| format!("reading backend #{id}"))
    }

    /// How many backend entries `BACKENDS` has (used or not).
    pub fn backend_capacity(&self) -> u32 {
        self.backends.len()
    }

    /// VIP id `id`'s `VIP_BY_ID` entry.
    pub fn vip_ref(&self, id: u32) -> anyhow::Result<VipRef> {
        self.vip_by_id
            .get(&id, 0)
            .with_context(|| format!("reading VIP #{id} of VIP_BY_ID"))
    }

    /// How many entries `SOURCE_RANGES` holds.
    pub fn source_range_count(&self) -> usize {
        self.source_ranges.keys().filter(Result::is_ok).count()
    }

    /// The VIP address filter as written.
    pub fn vip_filter(&self) -> anyhow::Result<VipFilter> {
        self.vip_filter.get(&0, 0).context("reading VIP_FILTER")
    }

    /// Connection-table entries (IPv4, IPv6), each table counted up to `limit`: a walk of the
    /// kernel's table, entries evicted meanwhile skipped.
    pub fn count_flows(&self, limit: usize) -> (usize, usize) {
        let v4 = self.flows.keys().filter(Result::is_ok).take(limit).count();
        let v6 = self.flows6.keys().filter(Result::is_ok).take(limit).count();
        (v4, v6)
    }

    /// A VIP's counters (`VIP_STATS`), summed over CPUs.
    pub fn vip_counters(&self, vip_id: u32) -> anyhow::Result<Counters> {
        let values = self
            .vip_stats
            .get(&vip_id, 0)
            .context("reading VIP_STATS")?;
        Ok(sum_counters(values.iter()))
    }

    /// A backend's counters (`BACKEND_STATS`, over every VIP it serves), summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> anyhow::Result<Counters> {
        let values = self
            .backend_stats
            .get(&id, 0)
            .context("reading BACKEND_STATS")?;
        Ok(sum_counters(values.iter()))
    }

    /// A global counter (`GLOBAL_STATS`), summed over CPUs.
    pub fn global_counter(&self, counter: GlobalCounter) -> anyhow::Result<u64> {
        let values = self
            .global_stats
            .get(&(counter as u32), 0)
            .context("reading GLOBAL_STATS")?;
        Ok(values.iter().sum())
    }

    /// The dataplane-wide settings as written (`SETTINGS`).
    pub fn settings(&self) -> anyhow::Result<DataplaneSettings> {
        self.settings.get(&0, 0).context("reading SETTINGS")
    }

    /// The flood guard's per-CPU windows (`NEW_FLOWS`), one per possible CPU.
    pub fn new_flow_windows(&self) -> anyhow::Result<Vec<RateWindow>> {
        let windows = self.new_flows.get(&0, 0).context("reading NEW_FLOWS")?;
        Ok(windows.iter().copied().collect())
    }
}

fn sum_counters<'a>(per_cpu: impl Iterator<Item = &'a Counters>) -> Counters {
    per_cpu.fold(Counters::default(), |acc, c| Counters {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

/// The `ANNOUNCE` map alone, opened from its pin: the agent's announcer owns this handle, apart
/// from the reconcile thread's [`Maps`] (each entry is written by one of them only).
pub struct AnnounceMap {
    map: HashMap<MapData, VipKey, Announce>,
}

impl AnnounceMap {
    pub fn from_pins(pins: &PinLayout) -> anyhow::Result<Self> {
        let take = |name: &str| open_pinned(pins, name, "`sluice agent`");
        Ok(Self {
            map: typed!(take, map_names::ANNOUNCE),
        })
    }

    /// The addresses answered for now.
    pub fn addresses(&self) -> anyhow::Result<Vec<std::net::IpAddr>> {
        self.map
            .keys()
            .map(|k| {
                let k = k.context("reading the ANNOUNCE map")?;
                Ok(lb_common::addr_from_raw(&k.addr, k.family))
            })
            .collect()
    }

    /// Answer ARP for `addr` with `mac` from now on.
    pub fn insert(&mut self, addr: std::net::IpAddr, mac: [u8; 6]) -> anyhow::Result<()> {
        let value = Announce { mac, _pad: [0; 2] };
        self.map
            .insert(&announce_key(addr), &value, 0)
            .map_err(|e| anyhow!("writing {addr} into the ANNOUNCE map: {e}"))
    }

    /// Stop answering for `addr` (absent already is fine).
    pub fn remove(&mut self, addr: std::net::IpAddr) -> anyhow::Result<()> {
        match self.map.remove(&announce_key(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(anyhow!("removing {addr} from the ANNOUNCE map: {e}")),
        }
    }
}

/// The `ANNOUNCE` key of an address.
pub fn announce_key(addr: std::net::IpAddr) -> VipKey {
    let (addr, family) = lb_common::raw_addr(addr);
    VipKey {
        addr,
        port: 0,
        proto: 0,
        family,
    }
    .address_only()
}

/// A map pinned by an attachment, with an error that says what to run when it is missing.
pub(super) fn open_pinned(pins: &PinLayout, name: &str, attach_with: &str) -> anyhow::Result<Map> {
    if !pins.has_maps() {
        bail!(
            "no sluice maps pinned in {}: is sluice attached there? ({attach_with}, and the same --pin-dir)",
            pins.maps_dir().display()
        );
    }
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|e| anyhow!("opening {}: {e}", path.display()))?;
    Map::from_map_data(data).map_err(|e| anyhow!("map {name}: {e}"))
}

/// The decapsulator's two address sets: (family, allowed outer source prefix) and (family,
/// this node's address). In the stand-alone decapsulator and in the balancer (inline decap).
pub struct DecapSets {
    pub sources: LpmTrie<MapData, ScopedAddr, u8>,
    pub local: HashMap<MapData, ScopedAddr, u8>,
}

impl DecapSets {
    /// Brings the two sets to `allow` and `local`: new entries first, then the stale ones go.
    pub fn sync(&mut self, allow: &[IpNet], local: &[std::net::IpAddr]) -> anyhow::Result<()> {
        let maps = self;
        let want_sources: BTreeSet<(u32, ScopedAddr)> = allow
            .iter()
            .map(|net| {
                let key = scoped_prefix(family(net), net);
                (key.prefix_len(), key.data())
            })
            .collect();
        let mut have_sources = BTreeSet::new();
        for key in maps.sources.keys() {
            let key = key.context("reading DECAP_SOURCES")?;
            have_sources.insert((key.prefix_len(), key.data()));
        }
        let want_local: BTreeSet<ScopedAddr> = local
            .iter()
            .map(|addr| ScopedAddr {
                scope_be: family(&IpNet::from(*addr)).to_be(),
                addr: addr_bytes(*addr),
            })
            .collect();
        let mut have_local = BTreeSet::new();
        for key in maps.local.keys() {
            have_local.insert(key.context("reading DECAP_LOCAL")?);
        }
        for (len, data) in want_sources.difference(&have_sources) {
            maps.sources
                .insert(&LpmKey::new(*len, *data), &1, 0)
                .context("writing DECAP_SOURCES")?;
        }
        for key in want_local.difference(&have_local) {
            maps.local
                .insert(key, &1, 0)
                .context("writing DECAP_LOCAL")?;
        }
        for (len, data) in have_sources.difference(&want_sources) {
            match maps.sources.remove(&LpmKey::new(*len, *data)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing from DECAP_SOURCES"),
            }
        }
        for key in have_local.difference(&want_local) {
            match maps.local.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing from DECAP_LOCAL"),
            }
        }
        Ok(())
    }
}

fn family(net: &IpNet) -> u32 {
    u32::from(if net.addr().is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    })
}

/// The stand-alone decapsulator's maps.
pub struct DecapMaps {
    sets: DecapSets,
    stats: PerCpuArray<MapData, u64>,
}

impl DecapMaps {
    /// Brings the allowed outer sources and the local addresses to `allow` and `local`.
    pub fn sync(&mut self, allow: &[IpNet], local: &[std::net::IpAddr]) -> anyhow::Result<()> {
        self.sets.sync(allow, local)
    }

    /// A decapsulator counter, summed over CPUs.
    pub fn counter(&self, counter: lb_common::DecapCounter) -> anyhow::Result<u64> {
        let values = self
            .stats
            .get(&(counter as u32), 0)
            .context("reading DECAP_STATS")?;
        Ok(values.iter().sum())
    }

    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::open(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the decapsulator object"))
        })
    }

    pub fn from_pins(pins: &PinLayout) -> anyhow::Result<Self> {
        Self::open(|name| open_pinned(pins, name, "`sluice decap`"))
    }

    fn open(mut take: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            sets: DecapSets {
                sources: typed!(take, decap_map_names::DECAP_SOURCES),
                local: typed!(take, decap_map_names::DECAP_LOCAL),
            },
            stats: typed!(take, decap_map_names::DECAP_STATS),
        })
    }
}

/// The LPM key of a prefix within a scope (VIP id, or address family).
pub fn scoped_prefix(scope: u32, net: &ipnet::IpNet) -> LpmKey<ScopedAddr> {
    let bits = u32::from(net.prefix_len());
    LpmKey::new(
        ScopedAddr::prefix_len(bits),
        ScopedAddr {
            scope_be: scope.to_be(),
            addr: addr_bytes(net.network()),
        },
    )
}

pub use lb_common::addr_bytes;
