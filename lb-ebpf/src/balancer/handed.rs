//! Second chance over several changes: the records of the flows this node handed on
//! (`HANDED_FLOWS`, flow -> the node it went to), docs/design.md "Several changes".
//!
//! A node that hands a flow on to the previous table's pick records where it sent it. At a
//! later change that node is the previous pick of the flow's next pick, which hands it here:
//! the record sends it on to the node that has it. Each node on such a chain recorded the
//! node before it, so the chain ends at the flow's owner, however many changes it went
//! through. Only the rare moved flow is recorded (one insert per flow and node), and a record
//! is read only on second chance's paths: a handed-on frame, or a non-SYN picked for this
//! node of a VIP whose table changed.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Backend, FAMILY_V4, FlowKey, FlowValue, backend_state, forward_mode, trace_flags, trace_source,
};
use lb_ebpf::{
    csum,
    packet::{self, Flow},
};

use super::conntrack;
use super::maps::{BACKENDS, CT_SCRATCH, HANDED_FLOWS};
use super::trace::Why;

/// What this node's record says of a flow.
pub(crate) enum Record {
    /// No record (or a dead one: its node's entry now holds another backend).
    None,
    /// A record, but this node's conntrack knows the flow: it is this node's now (a 5-tuple
    /// reused by a new connection that began here). The record is deleted.
    Known,
    /// Handed on before to this node: on to it again.
    To(u32, &'static Backend),
}

/// This node's record of the flow, checked against its conntrack (asked only when there is a
/// record: the rare path).
#[inline(always)]
pub(crate) fn record_of(ctx: &XdpContext, key: &FlowKey, why: &mut Why) -> Record {
    let Some(record) = HANDED_FLOWS.get_ptr(key) else {
        return Record::None;
    };
    // SAFETY: read once, by value; a concurrent LRU eviction only makes it stale.
    let FlowValue {
        backend: id,
        generation,
        ..
    } = unsafe { *record };
    why.flags |= trace_flags::CONNTRACK_ASKED;
    if conntrack::knows(ctx, key) {
        why.flags |= trace_flags::CONNTRACK_HIT;
        let _ = HANDED_FLOWS.remove(key);
        return Record::Known;
    }
    let id = u32::from(id);
    match BACKENDS.get(id) {
        Some(backend)
            if backend.state != backend_state::EMPTY
                && backend.generation == generation
                && backend.mode != forward_mode::LOCAL =>
        {
            why.chose(trace_source::HANDED_RECORD, id, backend);
            Record::To(id, backend)
        }
        // The node it named is gone (its slot freed or taken by another backend).
        _ => {
            let _ = HANDED_FLOWS.remove(key);
            Record::None
        }
    }
}

/// Records that this node hands the flow (of VIP `vip_id`) on to backend `id`. The value is
/// built in the per-CPU scratch: the balancer's stack has no room for it.
#[inline(always)]
pub(crate) fn record(key: &FlowKey, vip_id: u32, id: u32, backend: &Backend) {
    let Some(scratch) = CT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's element, used only for the duration of this call. Ids fit 16 bits
    // (`MAX_BACKENDS`, `MAX_VIPS`: checked in lb-common).
    unsafe {
        (*scratch).record = FlowValue {
            backend: id as u16,
            vip: vip_id as u16,
            generation: backend.generation,
        };
        // A full table evicts its least recently used record (the oldest chains break first).
        let _ = HANDED_FLOWS.insert(key, &(*scratch).record, 0);
    }
}

/// Takes one hop off the packet's IP TTL / hop limit before a record sends a handed-on frame on
/// again: records can form a cycle (an owner whose conntrack entry expired records the node
/// that holds its record), and this bounds it. False, the packet untouched, when the hop limit is down to 1
/// (or the header is not there): the packet then goes to this node's stack.
#[inline(always)]
pub(crate) fn take_a_hop(ctx: &XdpContext, flow: &Flow) -> bool {
    let ip = flow.l3.ip_offset();
    if flow.l3.family == FAMILY_V4 {
        let Some(hdr) = packet::ptr_at_mut::<packet::Ipv4Hdr>(ctx, ip) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at_mut; fields read and written in place.
        unsafe {
            let ttl = (*hdr).ttl;
            if ttl <= 1 {
                return false;
            }
            // TTL and protocol form one 16-bit word of the checksummed header, as loaded.
            let old = u16::from_ne_bytes([ttl, (*hdr).protocol]);
            let new = u16::from_ne_bytes([ttl - 1, (*hdr).protocol]);
            (*hdr).ttl = ttl - 1;
            (*hdr).check = csum::replace16((*hdr).check, old, new);
        }
    } else {
        let Some(hdr) = packet::ptr_at_mut::<packet::Ipv6Hdr>(ctx, ip) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe {
            let hops = (*hdr).hop_limit;
            if hops <= 1 {
                return false;
            }
            (*hdr).hop_limit = hops - 1;
        }
    }
    true
}
