//! The balancer's BPF maps: the contract with user space (lb-userspace's dataplane), which
//! finds them by name (`export_name`, whatever module holds them).

use aya_ebpf::{
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf,
    },
    macros::btf_map,
};
use lb_common::{
    Announce, BPF_F_NO_COMMON_LRU, Backend, Counters, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_SIZE,
    FlowKey, FlowKey4, FlowValue, GlobalCounter, HANDED_FLOWS_SIZE, MAGLEV_INNER_FLAGS,
    MAX_BACKENDS, MAX_DECAP_ADDRS, MAX_PEERS, MAX_SOURCE_RANGES, MAX_TABLE_MEMBERS, MAX_TABLES,
    MAX_TX_PORTS, MAX_VIPS, MemberKey, MemberWeight, PeerFilter, PeerKey, RateWindow, ScopedAddr,
    Settings, TRACE_RING_BYTES, TableInfo, TraceEvent, TraceFilter, VipFilter, VipInfo, VipKey,
    VipRef, flow_table_size_v6, maglev_elements,
};

pub(crate) const MAX_VIPS_: usize = MAX_VIPS as usize;

/// (address, port, protocol) -> VIP.
#[btf_map]
pub(crate) static VIPS: HashMap<VipKey, VipInfo, MAX_VIPS_> = HashMap::new();

/// Table id -> a Maglev table (slot -> backend id), shared by every VIP with the same inputs
/// (`TABLES` describes it). User space fills a new inner array at a free id and points the
/// VIPs at it (`VipInfo::table`): a packet sees the old table or the new one, never a
/// half-written one. Maps are pinned (or not) by user space, not here.
#[btf_map]
pub(crate) static MAGLEV: ArrayOfMaps<
    Array<u64, { maglev_elements(DEFAULT_MAGLEV_SIZE) as usize }, { MAGLEV_INNER_FLAGS as usize }>,
    { MAX_TABLES as usize },
> = ArrayOfMaps::new();

/// Table id -> its description and the bits of its members (active and draining).
#[btf_map]
pub(crate) static TABLES: Array<TableInfo, { MAX_TABLES as usize }> = Array::new();

/// (table, backend) -> weight, for the readers only (the program never reads it; it is
/// declared here so that it is created and pinned with the others). Allocated as used.
#[btf_map]
pub(crate) static TABLE_MEMBERS: HashMap<
    MemberKey,
    MemberWeight,
    { MAX_TABLE_MEMBERS as usize },
    { lb_common::BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// VIP id -> its key and table: an established packet's check that its entry's VIP and
/// backend still hold, without the `VIPS` lookup.
#[btf_map]
pub(crate) static VIP_BY_ID: Array<VipRef, MAX_VIPS_> = Array::new();

/// Backend id -> where to send its packets (one entry per backend, shared by all VIPs).
#[btf_map]
pub(crate) static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// The connection table: 5-tuple -> backend id. Consulted first, so a flow keeps its backend
/// through every table change. Resized by the loader from the config. IPv4 flows, by a
/// compact key; IPv6 flows in `FLOWS6`.
#[btf_map]
pub(crate) static FLOWS: LruHashMap<
    FlowKey4,
    FlowValue,
    { DEFAULT_FLOW_TABLE_SIZE as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

#[btf_map]
pub(crate) static FLOWS6: LruHashMap<
    FlowKey,
    FlowValue,
    { flow_table_size_v6(DEFAULT_FLOW_TABLE_SIZE) as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Bitmap of VIP destination addresses (one element): lets non-VIP traffic skip the hash lookup.
#[btf_map]
pub(crate) static VIP_FILTER: Array<VipFilter, 1> = Array::new();

/// Every VIP address (port and protocol 0) -> number of VIPs on it: answers "is this packet
/// for a VIP at all" for packets without ports (echo requests, fragments).
#[btf_map]
pub(crate) static VIP_ADDRS: HashMap<VipKey, u32, MAX_VIPS_> = HashMap::new();

/// (VIP id, client prefix) -> 1: the clients a VIP with `vip_flags::SOURCE_RANGES` admits.
#[btf_map]
pub(crate) static SOURCE_RANGES: LpmTrie<ScopedAddr, u8, { MAX_SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// Egress ifindex -> device, for backends behind another interface than the ingress one.
#[btf_map]
pub(crate) static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

#[btf_map]
pub(crate) static VIP_STATS: PerCpuArray<Counters, MAX_VIPS_> = PerCpuArray::new();

#[btf_map]
pub(crate) static BACKEND_STATS: PerCpuArray<Counters, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// VIP address (port and protocol 0) -> the MAC this node answers ARP with: the addresses whose
/// election (a Lease per address) this node's agent won. Empty unless `sluice agent --announce`.
#[btf_map]
pub(crate) static ANNOUNCE: HashMap<VipKey, Announce, MAX_VIPS_> = HashMap::new();

#[btf_map]
pub(crate) static GLOBAL_STATS: PerCpuArray<u64, { GlobalCounter::COUNT as usize }> =
    PerCpuArray::new();

/// MACs of the other sluice nodes on the attached segment: their VIP frames were balanced
/// there already. Written by the agent (every node's MAC but this one's).
#[btf_map]
pub(crate) static PEERS: HashMap<PeerKey, u8, { MAX_PEERS as usize }> = HashMap::new();

/// Bits of the peers' MACs: a client's frame is known not to be a peer's without the hash
/// lookup (measured: the lookup alone cost the established path 12 ns).
#[btf_map]
pub(crate) static PEER_FILTER: Array<PeerFilter, 1> = Array::new();

/// Inline decapsulation, as `sluice decap` does it: (family, allowed outer source prefix) -> 1
/// and (family, this node's address) -> 1.
#[btf_map]
pub(crate) static DECAP_SOURCES: LpmTrie<ScopedAddr, u8, { MAX_DECAP_ADDRS as usize }> =
    LpmTrie::new();

#[btf_map]
pub(crate) static DECAP_LOCAL: HashMap<ScopedAddr, u8, { MAX_DECAP_ADDRS as usize }> =
    HashMap::new();

/// Settings of the whole dataplane (one element), written by user space.
#[btf_map]
pub(crate) static SETTINGS: Array<Settings, 1> = Array::new();

/// The flood guard's per-CPU window: new flows recorded in the current second.
#[btf_map]
pub(crate) static NEW_FLOWS: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// `sluice trace`'s filter (one element; `until_ns` 0 when no trace runs).
#[btf_map]
pub(crate) static TRACE: Array<TraceFilter, 1> = Array::new();

/// `sluice trace`'s events, read by the one trace process.
#[btf_map]
pub(crate) static TRACE_EVENTS: RingBuf<TraceEvent, { TRACE_RING_BYTES as usize }> = RingBuf::new();

/// Per-CPU windows of `TraceFilter::max_per_sec`.
#[btf_map]
pub(crate) static TRACE_RATE: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// The second chance's scratch (one element per CPU): its conntrack lookups' arguments and a
/// record's value, off the stack.
#[btf_map]
pub(crate) static CT_SCRATCH: PerCpuArray<super::conntrack::CtScratch, 1> = PerCpuArray::new();

/// Second chance over several changes (`handed.rs`): flow (client -> VIP) -> the backend this
/// node handed it on to, with that VIP's id and the backend's generation. Written only by the
/// program, on the rare path; the least recently used record goes when it is full.
#[btf_map]
pub(crate) static HANDED_FLOWS: LruHashMap<FlowKey, FlowValue, { HANDED_FLOWS_SIZE as usize }> =
    LruHashMap::new();
