//! `sluice trace`: what the chain decided for a flow packet ([`Why`]), reported to
//! `TRACE_EVENTS` while a trace runs and the packet matches its filter, at most
//! `TraceFilter::max_per_sec` a second per CPU.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    programs::XdpContext,
};
use lb_common::{
    Backend, FlowKey, GlobalCounter, NO_BACKEND, NO_SLOT, TraceFilter, trace_flags, trace_match,
    trace_source,
};
use lb_ebpf::packet::Flow;

use super::maps::{TRACE, TRACE_EVENTS, TRACE_RATE};
use super::rate::within_rate;
use crate::count;

/// Why a flow packet went where it went, for `sluice trace` (inlined: it lives in registers).
pub(crate) struct Why {
    pub(crate) backend: u32,
    pub(crate) generation: u32,
    pub(crate) slot: u32,
    pub(crate) table_size: u32,
    pub(crate) source: u8,
    pub(crate) flags: u8,
}

impl Why {
    pub(crate) const NONE: Self = Self {
        backend: NO_BACKEND,
        generation: 0,
        slot: NO_SLOT,
        table_size: 0,
        source: trace_source::NONE,
        flags: 0,
    };

    #[inline(always)]
    pub(crate) fn chose(&mut self, source: u8, id: u32, backend: &Backend) {
        self.source = source;
        self.backend = id;
        self.generation = backend.generation;
    }
}

/// Reports the packet to `sluice trace` when a trace runs and the packet matches its filter.
/// With no trace running: one array read and one comparison.
#[inline(always)]
pub(crate) fn trace(
    ctx: &XdpContext,
    flow: &Flow,
    (action, counter): (u32, GlobalCounter),
    why: &Why,
) {
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
