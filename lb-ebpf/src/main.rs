//! sluice's XDP programs.
//!
//! `sluice_balancer`, one pass per packet, each step an inlined function that either decides the
//! packet's fate or hands it on (Katran's shape):
//!
//!   parse (Ethernet / IPv4 / TCP|UDP) -> VIP lookup -> connection table -> Maglev pick -> L2 forward
//!
//! Not for a VIP: `XDP_PASS`, untouched. For a VIP: rewritten and sent with `XDP_TX` or
//! `XDP_REDIRECT`, or dropped and counted by reason. No per-packet logging; every loop-free.
//!
//! `sluice_pass`: returns `XDP_PASS`. A veth only delivers `XDP_TX` frames when its peer has an
//! XDP program; labs attach this one there (`sluice xdp-pass`).
#![no_std]
#![no_main]

mod packet;
mod pktgen;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, ArrayOfMaps, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{
    BPF_F_NO_COMMON_LRU, Backend, Counters, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_SIZE, FlowKey,
    FlowValue, GlobalCounter, MAGLEV_INNER_FLAGS, MAX_BACKENDS, MAX_TX_PORTS, MAX_VIPS, NO_BACKEND,
    VipFilter, VipInfo, VipKey, backend_state,
};
use packet::{EthHdr, Parsed};

const MAX_VIPS_: usize = MAX_VIPS as usize;

/// (address, port, protocol) -> VIP.
#[btf_map]
static VIPS: HashMap<VipKey, VipInfo, MAX_VIPS_> = HashMap::new();

/// VIP id -> that VIP's Maglev table (slot -> backend id). User space builds a new inner array
/// and swaps it in with one update of the outer slot: a packet sees the old table or the new
/// one, never a half-written one. Maps are pinned (or not) by user space, not here.
#[btf_map]
static MAGLEV: ArrayOfMaps<
    Array<u32, { DEFAULT_MAGLEV_SIZE as usize }, { MAGLEV_INNER_FLAGS as usize }>,
    MAX_VIPS_,
> = ArrayOfMaps::new();

/// Backend id -> where to send its packets.
#[btf_map]
static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// The connection table: 5-tuple -> backend id. Consulted first, so a flow keeps its backend
/// through every table change. Resized by the loader from the config.
#[btf_map]
static FLOWS: LruHashMap<
    FlowKey,
    FlowValue,
    { DEFAULT_FLOW_TABLE_SIZE as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Bitmap of VIP destination addresses (one element): lets non-VIP traffic skip the hash lookup.
#[btf_map]
static VIP_FILTER: Array<VipFilter, 1> = Array::new();

/// Egress ifindex -> device, for backends behind another interface than the ingress one.
#[btf_map]
static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

#[btf_map]
static VIP_STATS: PerCpuArray<Counters, MAX_VIPS_> = PerCpuArray::new();

#[btf_map]
static BACKEND_STATS: PerCpuArray<Counters, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
static GLOBAL_STATS: PerCpuArray<u64, { GlobalCounter::COUNT as usize }> = PerCpuArray::new();

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
    let flow = match packet::parse(ctx) {
        Parsed::Flow(flow) => flow,
        Parsed::NotForUs => return (xdp_action::XDP_PASS, GlobalCounter::Passed),
        Parsed::Malformed => return (xdp_action::XDP_DROP, GlobalCounter::DropMalformed),
    };
    match VIP_FILTER.get(0) {
        Some(filter) if filter.may_contain(flow.key.dst) => {}
        _ => return (xdp_action::XDP_PASS, GlobalCounter::Passed),
    }
    let vip_key = VipKey {
        addr: flow.key.dst,
        port: flow.key.dport,
        proto: flow.key.proto,
        _pad: 0,
    };
    let bytes = (ctx.data_end() - ctx.data()) as u64;

    // Fast path: an established flow whose backend still serves this very VIP.
    if let Some((id, backend)) = established_backend(&flow.key, &vip_key) {
        count(GlobalCounter::FlowHit);
        add(&VIP_STATS, backend.vip_id, bytes);
        if flow.fragment {
            return (xdp_action::XDP_DROP, GlobalCounter::DropFragment);
        }
        add(&BACKEND_STATS, id, bytes);
        return forward(ctx, &backend);
    }

    let Some(vip) = VIPS.get_ptr(&vip_key) else {
        return (xdp_action::XDP_PASS, GlobalCounter::Passed);
    };
    // SAFETY: a hash value pointer stays valid for this program run (RCU).
    let vip = unsafe { *vip };
    add(&VIP_STATS, vip.id, bytes);
    if flow.fragment {
        // A fragment's ports cannot be trusted to hash the same as the rest of its datagram.
        return (xdp_action::XDP_DROP, GlobalCounter::DropFragment);
    }
    count(GlobalCounter::FlowMiss);
    let Some((id, backend)) = pick_backend(&flow.key, &vip) else {
        return (xdp_action::XDP_DROP, GlobalCounter::DropNoBackend);
    };
    add(&BACKEND_STATS, id, bytes);
    forward(ctx, &backend)
}

/// The connection table's backend for this flow, if its slot still serves this VIP. A slot
/// that was freed (backend or VIP removed) or reused by another VIP does not match: the flow
/// takes the slow path and re-hashes (or passes, if its VIP is gone).
#[inline(always)]
fn established_backend(key: &FlowKey, vip_key: &VipKey) -> Option<(u32, Backend)> {
    let entry = FLOWS.get_ptr(key)?;
    // SAFETY: read once, by value; a concurrent LRU eviction only makes it stale.
    let id = unsafe { (*entry).backend };
    let backend = *BACKENDS.get(id)?;
    (backend.state != backend_state::EMPTY && backend.vip == *vip_key).then_some((id, backend))
}

/// A new Maglev pick for the flow, recorded in the connection table.
#[inline(always)]
fn pick_backend(key: &FlowKey, vip: &VipInfo) -> Option<(u32, Backend)> {
    if vip.live_backends == 0 || vip.table_size == 0 {
        return None;
    }
    let slot = key.hash() % vip.table_size;
    let id = *MAGLEV.get_value(vip.id, &slot)?;
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.state != backend_state::ACTIVE || backend.vip_id != vip.id {
        return None;
    }
    let value = FlowValue {
        backend: id,
        _reserved: 0,
    };
    // A full table evicts its least recently used entry; insert fails only on memory pressure,
    // and then the flow is still forwarded (Maglev picks the same backend next time).
    let _ = FLOWS.insert(key, &value, 0);
    Some((id, backend))
}

/// L2 direct server return: the frame goes to the backend's MAC from ours, IP header untouched.
#[inline(always)]
fn forward(ctx: &XdpContext, backend: &Backend) -> (u32, GlobalCounter) {
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
