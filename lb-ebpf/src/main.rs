//! sluice's balancer object.
//!
//! `sluice_balancer`, one pass per packet, each step an inlined function that either decides the
//! packet's fate or hands it on (Katran's shape):
//!
//!   parse (Ethernet / IPv4|IPv6 / TCP|UDP|ICMP) -> VIP address filter -> from a peer?
//!     -> connection table (not for a SYN) -> VIP lookup -> source ranges -> Maglev pick
//!     -> record (flood guard) -> forward (this node: its own stack | L2 rewrite | IPIP/IP6IP6 encap)
//!     -> trace (only while `sluice trace` runs: a matching packet's decision to `TRACE_EVENTS`)
//!
//! Every node balances AND serves (the agent is a DaemonSet), so a packet is balanced at most
//! once: a pick of this node itself goes to its own stack (`XDP_PASS`, counted `local`), a VIP
//! frame from another sluice node's MAC (`PEERS`) was balanced there and goes to the stack too
//! (`from_peer`), whatever this node's connection table holds, and IPIP/IP6IP6 from another
//! node is unwrapped inline (`DECAP_*`, the stand-alone decapsulator's logic) and passed.
//!
//! A TCP SYN skips the connection table: a new connection is balanced afresh, whatever an old
//! one on the same 5-tuple left there. A new flow is recorded unless the flood guard holds
//! (`SETTINGS`, `NEW_FLOWS`: new flows per second and CPU); then Maglev's pick alone carries it.
//!
//! Also: ARP requests and IPv6 Neighbor Solicitations (`ndp.rs`) for an address this node
//! announces (`ANNOUNCE`, the agent's election) are answered; echo requests to a VIP address
//! are answered; ICMP errors quoting a VIP flow go to the backend that owns the flow (never
//! answered with ICMP); a packet too big to encapsulate gets ICMP "too big" back.
//! Not for a VIP address: `XDP_PASS`, untouched, however malformed. For a VIP: rewritten and
//! sent with `XDP_TX` or `XDP_REDIRECT`, or dropped and counted by reason. No per-packet
//! logging; loops are bounded. The stack is near the verifier's 512 bytes (496): new
//! per-packet state belongs in a per-CPU map, not on the stack.
//!
//! `sluice_pass`: returns `XDP_PASS`. A veth only delivers `XDP_TX` frames when its peer has an
//! XDP program; labs attach this one there (`sluice xdp-pass`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf,
        lpm_trie::Key,
    },
    helpers::{
        bpf_csum_diff, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    Announce, BPF_F_NO_COMMON_LRU, Backend, Counters, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_SIZE,
    FAMILY_V4, FlowKey, FlowKey4, FlowValue, GlobalCounter, IP6IP6_OVERHEAD, IPIP_OVERHEAD,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_IPV6, MAGLEV_INNER_FLAGS, MAX_BACKENDS,
    MAX_DECAP_ADDRS, MAX_PEERS, MAX_SOURCE_RANGES, MAX_TX_PORTS, MAX_VIPS, NO_BACKEND, NO_SLOT,
    PeerFilter, PeerKey, RATE_WINDOW_NS, RateWindow, ScopedAddr, Settings, TRACE_RING_BYTES,
    TraceEvent, TraceFilter, VipFilter, VipInfo, VipKey, backend_state, flow_table_size_v6,
    forward_mode, maglev_elements, source_range_scope, trace_flags, trace_match, trace_source,
    vip_flags,
};
use lb_ebpf::{
    csum, ndp,
    packet::{
        self, ARP_OP_REPLY, ArpHdr, DEFAULT_TTL, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, EthHdr,
        Flow, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_FRAG_NEEDED, ICMP_HLEN, ICMPV6_ECHO_REPLY,
        ICMPV6_PKT_TOOBIG, IPV4_HLEN, IPV6_HLEN, IcmpHdr, Ipv4Hdr, Ipv6Hdr, L3, Parsed,
    },
    unwrap::{Unwrapped, unwrap},
};

const MAX_VIPS_: usize = MAX_VIPS as usize;

/// (address, port, protocol) -> VIP.
#[btf_map]
static VIPS: HashMap<VipKey, VipInfo, MAX_VIPS_> = HashMap::new();

/// VIP id -> that VIP's Maglev table (slot -> backend id). User space builds a new inner array
/// and swaps it in with one update of the outer slot: a packet sees the old table or the new
/// one, never a half-written one. Maps are pinned (or not) by user space, not here.
#[btf_map]
static MAGLEV: ArrayOfMaps<
    Array<u64, { maglev_elements(DEFAULT_MAGLEV_SIZE) as usize }, { MAGLEV_INNER_FLAGS as usize }>,
    MAX_VIPS_,
> = ArrayOfMaps::new();

/// Backend id -> where to send its packets.
#[btf_map]
static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// The connection table: 5-tuple -> backend id. Consulted first, so a flow keeps its backend
/// through every table change. Resized by the loader from the config. IPv4 flows, by a
/// compact key; IPv6 flows in `FLOWS6`.
#[btf_map]
static FLOWS: LruHashMap<
    FlowKey4,
    FlowValue,
    { DEFAULT_FLOW_TABLE_SIZE as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

#[btf_map]
static FLOWS6: LruHashMap<
    FlowKey,
    FlowValue,
    { flow_table_size_v6(DEFAULT_FLOW_TABLE_SIZE) as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Bitmap of VIP destination addresses (one element): lets non-VIP traffic skip the hash lookup.
#[btf_map]
static VIP_FILTER: Array<VipFilter, 1> = Array::new();

/// Every VIP address (port and protocol 0) -> number of VIPs on it: answers "is this packet
/// for a VIP at all" for packets without ports (echo requests, fragments).
#[btf_map]
static VIP_ADDRS: HashMap<VipKey, u32, MAX_VIPS_> = HashMap::new();

/// (VIP id, client prefix) -> 1: the clients a VIP with `vip_flags::SOURCE_RANGES` admits.
#[btf_map]
static SOURCE_RANGES: LpmTrie<ScopedAddr, u8, { MAX_SOURCE_RANGES as usize }> = LpmTrie::new();

/// Egress ifindex -> device, for backends behind another interface than the ingress one.
#[btf_map]
static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

#[btf_map]
static VIP_STATS: PerCpuArray<Counters, MAX_VIPS_> = PerCpuArray::new();

#[btf_map]
static BACKEND_STATS: PerCpuArray<Counters, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// VIP address (port and protocol 0) -> the MAC this node answers ARP with: the addresses whose
/// election (a Lease per address) this node's agent won. Empty unless `sluice agent --announce`.
#[btf_map]
static ANNOUNCE: HashMap<VipKey, Announce, MAX_VIPS_> = HashMap::new();

#[btf_map]
static GLOBAL_STATS: PerCpuArray<u64, { GlobalCounter::COUNT as usize }> = PerCpuArray::new();

/// MACs of the other sluice nodes on the attached segment: their VIP frames were balanced
/// there already. Written by the agent (every node's MAC but this one's).
#[btf_map]
static PEERS: HashMap<PeerKey, u8, { MAX_PEERS as usize }> = HashMap::new();

/// Bits of the peers' MACs: a client's frame is known not to be a peer's without the hash
/// lookup (measured: the lookup alone cost the established path 12 ns).
#[btf_map]
static PEER_FILTER: Array<PeerFilter, 1> = Array::new();

/// Inline decapsulation, as `sluice decap` does it: (family, allowed outer source prefix) -> 1
/// and (family, this node's address) -> 1.
#[btf_map]
static DECAP_SOURCES: LpmTrie<ScopedAddr, u8, { MAX_DECAP_ADDRS as usize }> = LpmTrie::new();

#[btf_map]
static DECAP_LOCAL: HashMap<ScopedAddr, u8, { MAX_DECAP_ADDRS as usize }> = HashMap::new();

/// Settings of the whole dataplane (one element), written by user space.
#[btf_map]
static SETTINGS: Array<Settings, 1> = Array::new();

/// The flood guard's per-CPU window: new flows recorded in the current second.
#[btf_map]
static NEW_FLOWS: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

/// `sluice trace`'s filter (one element; `until_ns` 0 when no trace runs).
#[btf_map]
static TRACE: Array<TraceFilter, 1> = Array::new();

/// `sluice trace`'s events, read by the one trace process.
#[btf_map]
static TRACE_EVENTS: RingBuf<TraceEvent, { TRACE_RING_BYTES as usize }> = RingBuf::new();

/// Per-CPU windows of `TraceFilter::max_per_sec`.
#[btf_map]
static TRACE_RATE: PerCpuArray<RateWindow, 1> = PerCpuArray::new();

#[xdp]
pub fn sluice_balancer(ctx: XdpContext) -> u32 {
    let (action, counter) = balance(&ctx);
    count(counter);
    action
}

#[xdp]
pub fn sluice_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The whole decision: the XDP action and the global counter that records why.
#[inline(always)]
fn balance(ctx: &XdpContext) -> (u32, GlobalCounter) {
    // One instance of everything below per family: the IPv4 one is compiled knowing the
    // family, so it carries no IPv6 work (measured: the shared instance cost IPv4 ~20 ns).
    match packet::eth_proto(ctx) {
        Some(ETH_P_IP) => balance_ip(ctx, packet::parse_ipv4(ctx, ETH_HLEN, vip_addressed)),
        Some(ETH_P_IPV6) => {
            let ip = packet::parse_ipv6(ctx, ETH_HLEN, vip_addressed);
            // A Neighbor Solicitation for an announced address: IPv6's ARP (ndp.rs).
            if let Ok((l3, true)) = &ip
                && let Some(answer) = ndp::neighbor_advert(ctx, l3, announced_mac)
            {
                return answer;
            }
            balance_ip(ctx, ip)
        }
        Some(ETH_P_ARP) => arp_reply(ctx),
        // Shorter than an Ethernet header, ...: not a frame sluice forwards.
        _ => (xdp_action::XDP_PASS, GlobalCounter::Passed),
    }
}

#[inline(always)]
fn balance_ip(ctx: &XdpContext, ip: Result<(L3, bool), Parsed>) -> (u32, GlobalCounter) {
    // Encapsulated by another node for this one: unwrap and hand to the stack, never balance.
    if let Ok((l3, _)) = &ip
        && (l3.proto == IPPROTO_IPIP || l3.proto == IPPROTO_IPV6)
    {
        match unwrap(ctx, &DECAP_SOURCES, &DECAP_LOCAL) {
            Unwrapped::NotOurs => {}
            Unwrapped::Done => return (xdp_action::XDP_PASS, GlobalCounter::Decapsulated),
            Unwrapped::ForbiddenSource => {
                return (xdp_action::XDP_DROP, GlobalCounter::DropDecapSource);
            }
            Unwrapped::Malformed => return (xdp_action::XDP_DROP, GlobalCounter::DropMalformed),
        }
    }
    // Every packet sluice acts on is addressed to a VIP address: the one-bit filter lets all
    // other traffic go before its L4 header is even read.
    let filter = VIP_FILTER.get(0);
    let may_be_ours = |l3: &L3| filter.is_some_and(|f| f.may_contain(&l3.dst));
    match packet::parse_l4(ctx, ip, may_be_ours, vip_addressed) {
        Parsed::Flow(flow) => {
            let mut why = Why::NONE;
            let verdict = if from_peer(ctx) {
                (xdp_action::XDP_PASS, GlobalCounter::FromPeer)
            } else {
                balance_flow(ctx, &flow, &mut why)
            };
            trace(ctx, &flow, verdict, &why);
            verdict
        }
        Parsed::IcmpError(_) if from_peer(ctx) => (xdp_action::XDP_PASS, GlobalCounter::FromPeer),
        Parsed::EchoRequest(l3) if is_vip_address(&l3) => echo_reply(ctx, &l3),
        // Traced by the flow it quotes (client -> VIP); its counter says it was ICMP.
        Parsed::IcmpError(flow) => {
            let mut why = Why::NONE;
            let verdict = icmp_error(ctx, &flow, &mut why);
            trace(ctx, &flow, verdict, &why);
            verdict
        }
        Parsed::NoL4 { l3, fragment } if is_vip_address(&l3) => {
            // Katran's policy: fragments of a VIP flow cannot be hashed (no ports in later
            // ones), so none is forwarded, and none can reach a wrong backend.
            let reason = if fragment {
                GlobalCounter::DropFragment
            } else {
                GlobalCounter::DropUnparsed
            };
            (xdp_action::XDP_DROP, reason)
        }
        // Only a packet for a VIP address is sluice's to drop; the rest is the kernel's.
        Parsed::Malformed { for_vip: true } => (xdp_action::XDP_DROP, GlobalCounter::DropMalformed),
        _ => (xdp_action::XDP_PASS, GlobalCounter::Passed),
    }
}

/// Why a flow packet went where it went, for `sluice trace` (inlined: it lives in registers).
struct Why {
    backend: u32,
    generation: u32,
    slot: u32,
    table_size: u32,
    source: u8,
    flags: u8,
}

impl Why {
    const NONE: Self = Self {
        backend: NO_BACKEND,
        generation: 0,
        slot: NO_SLOT,
        table_size: 0,
        source: trace_source::NONE,
        flags: 0,
    };

    #[inline(always)]
    fn chose(&mut self, source: u8, id: u32, backend: &Backend) {
        self.source = source;
        self.backend = id;
        self.generation = backend.generation;
    }
}

/// A TCP or UDP packet: established flow, else new flow, else not ours.
#[inline(always)]
fn balance_flow(ctx: &XdpContext, flow: &Flow, why: &mut Why) -> (u32, GlobalCounter) {
    if flow.l3.first_fragment {
        return if is_vip_address(&flow.l3) {
            (xdp_action::XDP_DROP, GlobalCounter::DropFragment)
        } else {
            (xdp_action::XDP_PASS, GlobalCounter::Passed)
        };
    }
    let vip_key = vip_key_of(&flow.key);
    let bytes = (ctx.data_end() - ctx.data()) as u64;

    // Fast path: an established flow whose backend still serves this very VIP. A SYN opens a
    // new connection and is balanced afresh (Katran's rule): a reused 5-tuple (NAT gateways
    // cycle ports) never follows a stale entry to a backend that takes no new flows, and a
    // retransmitted SYN gets the same pick as long as the table is unchanged.
    if !flow.syn
        && let Some((id, backend)) = established_backend(&flow.key, &vip_key)
    {
        why.chose(trace_source::CONN_TABLE, id, backend);
        count(GlobalCounter::FlowHit);
        add(&VIP_STATS, backend.vip_id, bytes);
        add(&BACKEND_STATS, id, bytes);
        return forward(ctx, &flow.l3, &flow.key, backend, true);
    }

    let Some(vip) = VIPS.get_ptr(&vip_key) else {
        return (xdp_action::XDP_PASS, GlobalCounter::Passed);
    };
    // SAFETY: a hash value pointer stays valid for this program run (RCU).
    let vip = unsafe { *vip };
    add(&VIP_STATS, vip.id, bytes);
    count(GlobalCounter::FlowMiss);
    if vip.flags & vip_flags::SOURCE_RANGES != 0 && !source_admitted(&flow.key, vip.id) {
        return (xdp_action::XDP_DROP, GlobalCounter::DropSourceRange);
    }
    let Some((id, backend)) = pick_backend(&flow.key, &vip, why) else {
        return (xdp_action::XDP_DROP, GlobalCounter::DropNoBackend);
    };
    why.chose(trace_source::MAGLEV, id, backend);
    if !record_flow(&flow.key, id, backend, flow.syn) {
        why.flags |= trace_flags::NOT_RECORDED;
    }
    add(&BACKEND_STATS, id, bytes);
    forward(ctx, &flow.l3, &flow.key, backend, true)
}

/// Was the frame sent by another sluice node (which balanced it already)?
#[inline(always)]
fn from_peer(ctx: &XdpContext) -> bool {
    // The frame's bounds are read afresh (volatile): LLVM would otherwise reuse what it proved
    // while parsing and drop the check, which the verifier needs on this new pointer.
    // SAFETY: `ctx.ctx` is the program's context, valid for this run.
    let (data, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if data + ETH_HLEN > end {
        return false;
    }
    // SAFETY: the Ethernet header lies within the frame, checked above.
    let src = unsafe { (*(data as *const EthHdr)).src };
    PEER_FILTER.get(0).is_some_and(|f| f.may_contain(&src))
        && PEERS.get_ptr(&PeerKey::new(src)).is_some()
}

#[inline(always)]
fn vip_key_of(key: &FlowKey) -> VipKey {
    VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    }
}

/// Is this address (a `VIP_ADDRS` key) a VIP address? The one-bit filter first, so that
/// non-VIP traffic costs no hash lookup.
#[inline(always)]
fn vip_addressed(key: &VipKey) -> bool {
    VIP_FILTER.get(0).is_some_and(|f| f.may_contain(&key.addr)) && VIP_ADDRS.get_ptr(key).is_some()
}

/// Is the packet's destination a VIP address (any port)? (The filter already passed it.)
#[inline(always)]
fn is_vip_address(l3: &L3) -> bool {
    VIP_ADDRS.get_ptr(&l3.dst_key()).is_some()
}

/// Is the client inside one of the VIP's source ranges (of its own family)?
#[inline(always)]
fn source_admitted(key: &FlowKey, vip_id: u32) -> bool {
    let bits = if key.family == FAMILY_V4 { 32 } else { 128 };
    // SAFETY: [u32; 4] and [u8; 16] have the same size; bytes keep the packet's order.
    let addr: [u8; 16] = unsafe { core::mem::transmute(key.src) };
    let lookup = Key::new(
        ScopedAddr::prefix_len(bits),
        ScopedAddr {
            scope_be: source_range_scope(vip_id, key.family).to_be(),
            addr,
        },
    );
    SOURCE_RANGES.get(&lookup).is_some()
}

/// The connection table's backend for this flow, if its slot still holds the backend it was
/// recorded with, for this VIP. A slot that was freed (backend or VIP removed) or given to
/// another backend since (another generation) does not match: the flow takes the slow path
/// and re-hashes (or passes, if its VIP is gone).
#[inline(always)]
fn established_backend(key: &FlowKey, vip_key: &VipKey) -> Option<(u32, &'static Backend)> {
    let entry = if key.family == FAMILY_V4 {
        FLOWS.get_ptr(&key.narrow())?
    } else {
        FLOWS6.get_ptr(key)?
    };
    // SAFETY: read once, by value; a concurrent LRU eviction only makes it stale.
    let FlowValue {
        backend: id,
        generation,
    } = unsafe { *entry };
    // An array value lives as long as the map; it is read in place, not copied.
    let backend = BACKENDS.get(id)?;
    (backend.state != backend_state::EMPTY
        && backend.generation == generation
        && backend.vip == *vip_key)
        .then_some((id, backend))
}

/// The Maglev pick for the flow: the backend every node's table gives it.
#[inline(always)]
fn pick_backend(key: &FlowKey, vip: &VipInfo, why: &mut Why) -> Option<(u32, &'static Backend)> {
    if vip.live_backends == 0 || vip.table_size == 0 {
        return None;
    }
    let affinity = vip.flags & vip_flags::AFFINITY != 0;
    let slot = key.hash(affinity) % vip.table_size;
    why.slot = slot;
    why.table_size = vip.table_size;
    if affinity {
        why.flags |= trace_flags::AFFINITY;
    }
    // Two slots per element (`MAGLEV_SLOTS_PER_ELEMENT`): the even one in the low half.
    let pair = *MAGLEV.get_value(vip.id, &(slot / 2))?;
    let id = (pair >> ((slot & 1) * 32)) as u32;
    if id == NO_BACKEND {
        return None;
    }
    let backend = BACKENDS.get(id)?;
    if backend.state != backend_state::ACTIVE || backend.vip_id != vip.id {
        return None;
    }
    Some((id, backend))
}

/// Records a new flow's pick in the connection table, unless the flood guard holds this CPU
/// over its rate of new flows: then the flow rides on Maglev's consistent pick alone (the same
/// backend while the table is unchanged), and a SYN's stale entry, if any, is removed so that
/// the connection's later packets follow the SYN and not the entry. False when not recorded.
#[inline(always)]
fn record_flow(key: &FlowKey, id: u32, backend: &Backend, syn: bool) -> bool {
    if !new_flow_admitted() {
        count(GlobalCounter::FlowsNotRecorded);
        // A lookup first: it takes no lock, a removal does, and a forged SYN has no entry.
        if syn {
            let _ = if key.family == FAMILY_V4 {
                let key = key.narrow();
                FLOWS.get_ptr(&key).map(|_| FLOWS.remove(&key))
            } else {
                FLOWS6.get_ptr(key).map(|_| FLOWS6.remove(key))
            };
        }
        return false;
    }
    let value = FlowValue {
        backend: id,
        generation: backend.generation,
    };
    // A full table evicts its least recently used entry; insert fails only on memory
    // pressure, and then the flow is still forwarded (Maglev picks the same backend).
    let _ = if key.family == FAMILY_V4 {
        FLOWS.insert(&key.narrow(), &value, 0)
    } else {
        FLOWS6.insert(key, &value, 0)
    };
    true
}

/// Reports the packet to `sluice trace` when a trace runs and the packet matches its filter.
/// With no trace running: one array read and one comparison.
#[inline(always)]
fn trace(ctx: &XdpContext, flow: &Flow, (action, counter): (u32, GlobalCounter), why: &Why) {
    let Some(filter) = TRACE.get(0) else {
        return;
    };
    if filter.until_ns == 0 || !trace_matches(filter, &flow.key, why.backend) {
        return;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now > filter.until_ns {
        return;
    }
    if !within_rate(&TRACE_RATE, now, filter.max_per_sec) {
        count(GlobalCounter::TraceLostRate);
        return;
    }
    let Some(mut entry) = TRACE_EVENTS.reserve(0) else {
        count(GlobalCounter::TraceLostRing);
        return;
    };
    // Written in place, field by field: a whole TraceEvent would not fit beside the stack
    // the rest of the program already uses.
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved ring-buffer record of TraceEvent's size; every
    // field is written before the record is submitted.
    unsafe {
        (*event).time_ns = now;
        (*event).flow = flow.key;
        (*event).action = action;
        (*event).backend = why.backend;
        (*event).generation = why.generation;
        (*event).slot = why.slot;
        (*event).table_size = why.table_size;
        (*event).ifindex = ctx.ingress_ifindex() as u32;
        (*event).ip_len = flow.l3.len as u16;
        (*event).counter = counter as u8;
        (*event).source = why.source;
        (*event).flags = why.flags | if flow.syn { trace_flags::SYN } else { 0 };
        (*event)._pad = 0;
        (*event).cpu = bpf_get_smp_processor_id() as u16;
    }
    entry.submit(0);
    count(GlobalCounter::TraceEvents);
}

/// Does the flow (sent to `backend`) match every condition of the trace's filter?
#[inline(always)]
fn trace_matches(filter: &TraceFilter, key: &FlowKey, backend: u32) -> bool {
    if filter.matches & trace_match::VIP != 0 {
        let vip = &filter.vip;
        if vip.family != key.family
            || vip.addr != key.dst
            || (vip.port != 0 && vip.port != key.dport)
            || (vip.proto != 0 && vip.proto != key.proto)
        {
            return false;
        }
    }
    if filter.matches & trace_match::CLIENT != 0 {
        let (net, mask) = (&filter.client, &filter.client_mask);
        if filter.client_family != key.family
            || key.src[0] & mask[0] != net[0]
            || key.src[1] & mask[1] != net[1]
            || key.src[2] & mask[2] != net[2]
            || key.src[3] & mask[3] != net[3]
        {
            return false;
        }
    }
    filter.matches & trace_match::BACKEND == 0 || filter.backend == backend
}

/// One more event in this CPU's one-second window of `windows`: false when over `limit`
/// (0: no limit). Shared by the flood guard and the trace's rate.
#[inline(always)]
fn within_rate(windows: &PerCpuArray<RateWindow, 1>, now: u64, limit: u32) -> bool {
    if limit == 0 {
        return true;
    }
    let Some(window) = windows.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot, no other writer on this CPU while we run.
    unsafe {
        if now.wrapping_sub((*window).start_ns) >= RATE_WINDOW_NS {
            (*window).start_ns = now;
            (*window).flows = 0;
        }
        (*window).flows += 1;
        (*window).flows <= limit as u64
    }
}

/// The flood guard (Katran's new-connection rate limit): at most
/// `Settings::max_new_flows_per_cpu` connection-table inserts per second on this CPU. A flood
/// of forged new flows then costs a Maglev lookup each and cannot evict the real flows.
#[inline(always)]
fn new_flow_admitted() -> bool {
    let limit = match SETTINGS.get(0) {
        Some(settings) if settings.max_new_flows_per_cpu != 0 => settings.max_new_flows_per_cpu,
        _ => return true,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    within_rate(&NEW_FLOWS, now, limit)
}

/// Sends the packet on to `backend`: L2 rewrite or encapsulation, then out. A packet too big to
/// encapsulate is answered with ICMP "too big" when `may_answer`, else dropped: an ICMP error
/// is never answered with one.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    l3: &L3,
    key: &FlowKey,
    backend: &Backend,
    may_answer: bool,
) -> (u32, GlobalCounter) {
    if backend.mode == forward_mode::LOCAL {
        return (xdp_action::XDP_PASS, GlobalCounter::Local);
    }
    if backend.mode != forward_mode::L2 {
        let outer_v4 = backend.mode == forward_mode::IPIP_V4;
        let overhead = if outer_v4 {
            IPIP_OVERHEAD
        } else {
            IP6IP6_OVERHEAD
        };
        let mtu = backend.mtu as u32;
        if mtu != 0 && l3.len as u32 + overhead > mtu {
            if !may_answer {
                return (xdp_action::XDP_DROP, GlobalCounter::DropTooBig);
            }
            return too_big(ctx, l3, mtu - overhead);
        }
        if encapsulate(ctx, l3, key, backend, outer_v4).is_none() {
            return (xdp_action::XDP_DROP, GlobalCounter::DropInternal);
        }
    }
    let Some(eth) = packet::ptr_at_mut::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, GlobalCounter::DropMalformed);
    };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        (*eth).dst = backend.dst_mac;
        (*eth).src = backend.src_mac;
    }
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        return (xdp_action::XDP_TX, GlobalCounter::Tx);
    }
    match TX_PORTS.redirect(backend.ifindex, 0) {
        Ok(action) => (action, GlobalCounter::Redirected),
        Err(_) => (xdp_action::XDP_DROP, GlobalCounter::DropInternal),
    }
}

/// Per-flow entropy for the outer header: the outer source's varied bits and the IPv6 flow
/// label, so that the backend's NIC (RSS) and the routers (ECMP) spread the flows.
#[inline(always)]
fn flow_entropy(key: &FlowKey) -> u32 {
    // A full avalanche (lowbias32): every bit of the ports reaches the low bits, which are the
    // ones the outer source varies.
    let mut h = key.src[0] ^ key.src[3] ^ key.ports_word();
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// Puts an outer IPv4 or IPv6 header in front of the IP packet (the Ethernet header is
/// rewritten by the caller). `None` if the headroom could not grow.
#[inline(always)]
fn encapsulate(
    ctx: &XdpContext,
    l3: &L3,
    key: &FlowKey,
    backend: &Backend,
    outer_v4: bool,
) -> Option<()> {
    let overhead = if outer_v4 { IPV4_HLEN } else { IPV6_HLEN };
    // SAFETY: the helper only moves data's start; every pointer is re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return None;
    }
    let entropy = flow_entropy(key);
    let inner_proto = if l3.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    let mut src = backend.encap_src;
    let last = if outer_v4 { 0 } else { 3 };
    let base = u32::from_be(src[last]);
    src[last] = ((base & !backend.encap_src_vary) | (entropy & backend.encap_src_vary)).to_be();

    let eth = packet::ptr_at_mut::<EthHdr>(ctx, 0)?;
    // RFC 6040 normal mode: the outer header carries the inner DSCP and ECN, so ECN marks
    // and QoS survive the tunnel; DF as the inner packet asks (IPv6 is never fragmented on
    // the path), so PMTU discovery keeps working through it.
    if outer_v4 {
        let mut ip = Ipv4Hdr::new(l3.len + IPV4_HLEN, inner_proto, src[0], backend.addr[0]);
        ip.set_tos_df(l3.tos, l3.dont_fragment);
        let out = packet::ptr_at_mut::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at_mut; unaligned-safe writes.
        unsafe {
            (*eth).proto = ETH_P_IP.to_be();
            core::ptr::write_unaligned(out, ip);
        }
    } else {
        let ip = Ipv6Hdr {
            vtc_flow: ((6u32 << 28) | ((l3.tos as u32) << 20) | (entropy >> 12)).to_be(),
            payload_len: (l3.len as u16).to_be(),
            nexthdr: inner_proto,
            hop_limit: DEFAULT_TTL,
            saddr: src,
            daddr: backend.addr,
        };
        let out = packet::ptr_at_mut::<Ipv6Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at_mut; unaligned-safe writes.
        unsafe {
            (*eth).proto = ETH_P_IPV6.to_be();
            core::ptr::write_unaligned(out, ip);
        }
    }
    Some(())
}

/// Bytes of the offending packet quoted in an ICMP "too big": its IP header (options
/// included) and the start of its L4 header, which is what the sender needs to find its socket.
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 128;

/// The packet does not fit the egress MTU once encapsulated: tell the client (PMTU
/// discovery), as a router on the path would. IPv4 without DF may not be told, only dropped.
#[inline(always)]
fn too_big(ctx: &XdpContext, l3: &L3, mtu: u32) -> (u32, GlobalCounter) {
    if !l3.dont_fragment {
        return (xdp_action::XDP_DROP, GlobalCounter::DropTooBig);
    }
    let sent = if l3.family == FAMILY_V4 {
        too_big_v4(ctx, l3, mtu)
    } else {
        too_big_v6(ctx, l3, mtu)
    };
    match sent {
        Some(()) => (xdp_action::XDP_TX, GlobalCounter::IcmpTooBigSent),
        None => (xdp_action::XDP_DROP, GlobalCounter::DropInternal),
    }
}

/// Reuses the frame for the ICMP message: grows the head by the new IP and ICMP headers, so
/// the offending IP packet's start lands right after them as the quote, then trims the tail.
/// Returns the MACs to swap in.
#[inline(always)]
fn make_room_for_icmp(
    ctx: &XdpContext,
    headers: usize,
    quote: usize,
) -> Option<([u8; 6], [u8; 6])> {
    let eth = packet::ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let macs = unsafe { ((*eth).dst, (*eth).src) };
    // SAFETY: the helpers only move data's start and end; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(headers as i32)) } != 0 {
        return None;
    }
    let len = ctx.data_end() - ctx.data();
    let want = ETH_HLEN + headers + quote;
    if len < want || unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - len as i32) } != 0 {
        return None;
    }
    Some(macs)
}

#[inline(always)]
fn write_reply_eth(ctx: &XdpContext, macs: ([u8; 6], [u8; 6]), proto: u16) -> Option<()> {
    let eth = packet::ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        (*eth).dst = macs.1;
        (*eth).src = macs.0;
        (*eth).proto = proto.to_be();
    }
    Some(())
}

#[inline(always)]
fn too_big_v4(ctx: &XdpContext, l3: &L3, mtu: u32) -> Option<()> {
    const HEADERS: usize = IPV4_HLEN + ICMP_HLEN;
    let macs = make_room_for_icmp(ctx, HEADERS, QUOTE_V4)?;
    write_reply_eth(ctx, macs, ETH_P_IP)?;
    let ip = Ipv4Hdr::new(HEADERS + QUOTE_V4, IPPROTO_ICMP, l3.dst[0], l3.src[0]);
    let out = packet::ptr_at_mut::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { core::ptr::write_unaligned(out, ip) };
    let icmp = IcmpHdr {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        checksum: 0,
        rest: [0, (mtu as u16).to_be()],
    };
    icmp_sum::<{ ICMP_HLEN + QUOTE_V4 }>(ctx, ETH_HLEN + IPV4_HLEN, icmp, 0)
}

#[inline(always)]
fn too_big_v6(ctx: &XdpContext, l3: &L3, mtu: u32) -> Option<()> {
    const HEADERS: usize = IPV6_HLEN + ICMP_HLEN;
    let macs = make_room_for_icmp(ctx, HEADERS, QUOTE_V6)?;
    write_reply_eth(ctx, macs, ETH_P_IPV6)?;
    let ip = Ipv6Hdr {
        vtc_flow: (6u32 << 28).to_be(),
        payload_len: ((ICMP_HLEN + QUOTE_V6) as u16).to_be(),
        nexthdr: IPPROTO_ICMPV6,
        hop_limit: DEFAULT_TTL,
        saddr: l3.dst,
        daddr: l3.src,
    };
    let out = packet::ptr_at_mut::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { core::ptr::write_unaligned(out, ip) };
    let icmp = IcmpHdr {
        kind: ICMPV6_PKT_TOOBIG,
        code: 0,
        checksum: 0,
        // The 32-bit MTU field: high half zero (MTUs here fit 16 bits).
        rest: [0, (mtu as u16).to_be()],
    };
    // The ICMPv6 checksum covers a pseudo-header: addresses, length, next header.
    let (s, d) = (l3.src, l3.dst);
    let mut pseudo = s[0] as u64 + s[1] as u64 + s[2] as u64 + s[3] as u64;
    pseudo += d[0] as u64 + d[1] as u64 + d[2] as u64 + d[3] as u64;
    pseudo += (((ICMP_HLEN + QUOTE_V6) as u32).to_be()) as u64;
    pseudo += ((IPPROTO_ICMPV6 as u32).to_be()) as u64;
    icmp_sum::<{ ICMP_HLEN + QUOTE_V6 }>(ctx, ETH_HLEN + IPV6_HLEN, icmp, pseudo)
}

/// Writes the ICMP header at `off` and its checksum over the header and the `N - 8` quoted
/// bytes after it (plus `pseudo`, a partial sum of 32-bit words as loaded).
#[inline(always)]
fn icmp_sum<const N: usize>(
    ctx: &XdpContext,
    off: usize,
    icmp: IcmpHdr,
    pseudo: u64,
) -> Option<()> {
    let hdr = packet::ptr_at_mut::<IcmpHdr>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { core::ptr::write_unaligned(hdr, icmp) };
    let body = packet::ptr_at_mut::<[u8; N]>(ctx, off)?;
    // SAFETY: `body` spans N bytes of the packet, checked above; N is a multiple of 4.
    let partial = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, body as *mut u32, N as u32, 0) };
    if partial < 0 {
        return None;
    }
    let sum = !csum::fold(pseudo + partial as u64);
    // SAFETY: bounds checked by ptr_at_mut above.
    unsafe { (*hdr).checksum = sum };
    Some(())
}

/// Answers an echo request to a VIP address in place: swap addresses, reset the TTL, turn the
/// request into a reply (checksums patched incrementally), and send it back out.
#[inline(always)]
fn echo_reply(ctx: &XdpContext, l3: &L3) -> (u32, GlobalCounter) {
    match echo_rewrite(ctx, l3) {
        Some(()) => (xdp_action::XDP_TX, GlobalCounter::IcmpEchoReply),
        None => (xdp_action::XDP_DROP, GlobalCounter::DropMalformed),
    }
}

#[inline(always)]
fn echo_rewrite(ctx: &XdpContext, l3: &L3) -> Option<()> {
    let eth = packet::ptr_at_mut::<EthHdr>(ctx, 0)?;
    let icmp = packet::ptr_at_mut::<IcmpHdr>(ctx, l3.l4_offset())?;
    // SAFETY: bounds checked by ptr_at_mut; header pointers are within the frame.
    unsafe {
        let (dst, src) = ((*eth).dst, (*eth).src);
        (*eth).dst = src;
        (*eth).src = dst;
        let reply = if l3.family == FAMILY_V4 {
            let ip = packet::ptr_at_mut::<Ipv4Hdr>(ctx, ETH_HLEN)?;
            (*ip).saddr = l3.dst[0];
            (*ip).daddr = l3.src[0];
            // TTL shares a 16-bit word with the protocol.
            let old = u16::from_ne_bytes([(*ip).ttl, (*ip).protocol]);
            (*ip).ttl = DEFAULT_TTL;
            let new = u16::from_ne_bytes([DEFAULT_TTL, (*ip).protocol]);
            (*ip).check = csum::replace16((*ip).check, old, new);
            ICMP_ECHO_REPLY
        } else {
            let ip = packet::ptr_at_mut::<Ipv6Hdr>(ctx, ETH_HLEN)?;
            (*ip).saddr = l3.dst;
            (*ip).daddr = l3.src;
            (*ip).hop_limit = DEFAULT_TTL;
            ICMPV6_ECHO_REPLY
        };
        // Swapping source and destination leaves the ICMPv6 pseudo-header sum unchanged.
        let old = u16::from_ne_bytes([(*icmp).kind, (*icmp).code]);
        (*icmp).kind = reply;
        let new = u16::from_ne_bytes([reply, (*icmp).code]);
        (*icmp).checksum = csum::replace16((*icmp).checksum, old, new);
    }
    Some(())
}

/// The MAC this node answers ARP and Neighbor Solicitations with for `key`'s address, if it
/// announces it.
#[inline(always)]
fn announced_mac(key: &VipKey) -> Option<[u8; 6]> {
    // SAFETY: a hash value pointer stays valid for this program run (RCU); read by value.
    ANNOUNCE.get_ptr(key).map(|a| unsafe { (*a).mac })
}

/// An ARP request for an announced address becomes, in place, the reply: "VIP is at our MAC",
/// sent back to the requester. Anything else ARP (other addresses, replies, other hardware or
/// protocol types, truncated) goes to the kernel untouched.
#[inline(always)]
fn arp_reply(ctx: &XdpContext) -> (u32, GlobalCounter) {
    let pass = (xdp_action::XDP_PASS, GlobalCounter::Passed);
    let (Some(eth), Some(arp)) = (
        packet::ptr_at_mut::<EthHdr>(ctx, 0),
        packet::ptr_at_mut::<ArpHdr>(ctx, ETH_HLEN),
    ) else {
        return pass;
    };
    // SAFETY: bounds checked by ptr_at_mut; ArpHdr is 2-aligned and so is its offset.
    unsafe {
        if !(*arp).is_ipv4_ethernet_request() {
            return pass;
        }
        let (sender, target) = ((*arp).spa, (*arp).tpa);
        // Another host announcing the address itself (gratuitous ARP): nothing to answer.
        if sender == target {
            return pass;
        }
        let key = VipKey {
            addr: [u32::from_ne_bytes(target), 0, 0, 0],
            port: 0,
            proto: 0,
            family: FAMILY_V4,
        };
        let Some(ours) = ANNOUNCE.get_ptr(&key) else {
            return pass;
        };
        let mac = (*ours).mac;
        let requester = (*arp).sha;
        (*arp).op = ARP_OP_REPLY.to_be();
        (*arp).tha = requester;
        (*arp).tpa = sender;
        (*arp).sha = mac;
        (*arp).spa = target;
        (*eth).dst = requester;
        (*eth).src = mac;
    }
    (xdp_action::XDP_TX, GlobalCounter::ArpReply)
}

/// An ICMP error about a VIP flow (a router could not deliver a backend's reply, or asks for
/// a smaller MTU): hand it to the backend that owns the flow, so its TCP stack hears it.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, flow: &Flow, why: &mut Why) -> (u32, GlobalCounter) {
    // The quoted packet was sent from the VIP the error is addressed to; an error whose quote
    // names another address is not about a flow of this VIP (forged, or not ours at all).
    if flow.key.dst != flow.l3.dst {
        return if is_vip_address(&flow.l3) {
            (xdp_action::XDP_DROP, GlobalCounter::DropIcmpMismatch)
        } else {
            (xdp_action::XDP_PASS, GlobalCounter::Passed)
        };
    }
    let vip_key = vip_key_of(&flow.key);
    let backend = match established_backend(&flow.key, &vip_key) {
        Some((id, backend)) => {
            why.chose(trace_source::CONN_TABLE, id, backend);
            backend
        }
        None => {
            let Some(vip) = VIPS.get_ptr(&vip_key) else {
                return (xdp_action::XDP_PASS, GlobalCounter::Passed);
            };
            // SAFETY: a hash value pointer stays valid for this program run (RCU).
            let vip = unsafe { *vip };
            // Not in the table (another load balancer took the flow): Maglev picks the
            // backend every load balancer would.
            match pick_backend(&flow.key, &vip, why) {
                Some((id, backend)) => {
                    why.chose(trace_source::MAGLEV, id, backend);
                    backend
                }
                None => return (xdp_action::XDP_DROP, GlobalCounter::DropNoBackend),
            }
        }
    };
    match forward(ctx, &flow.l3, &flow.key, backend, false) {
        (xdp_action::XDP_DROP, reason) => (xdp_action::XDP_DROP, reason),
        (action, _) => (action, GlobalCounter::IcmpErrorForwarded),
    }
}

#[inline(always)]
fn count(counter: GlobalCounter) {
    if let Some(value) = GLOBAL_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn add<const N: usize>(stats: &PerCpuArray<Counters, N>, index: u32, bytes: u64) {
    if let Some(counters) = stats.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
