//! sluice's backend-side decapsulator (its own object, so a backend node loads none of the
//! balancer's maps).
//!
//! `sluice_decap`: an IPv4 or IPv6 packet carrying IPIP / IP6IP6 (or the mixed forms), sent
//! to one of this node's addresses from a configured load balancer's source prefix, loses its
//! outer header and goes to the kernel as the inner packet, as if it had arrived unwrapped.
//! Encapsulated packets for this node from any other source are dropped: without this check
//! anyone could inject packets with arbitrary inner sources. Everything else passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{HashMap, LpmTrie, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{DecapCounter, MAX_DECAP_ADDRS, ScopedAddr};
use lb_ebpf::unwrap::{Unwrapped, unwrap};

const MAX_ADDRS: usize = MAX_DECAP_ADDRS as usize;

/// (family, load-balancer source prefix) -> 1.
#[btf_map]
static DECAP_SOURCES: LpmTrie<ScopedAddr, u8, MAX_ADDRS> = LpmTrie::new();

/// (family, this node's address) -> 1: only packets addressed here are unwrapped.
#[btf_map]
static DECAP_LOCAL: HashMap<ScopedAddr, u8, MAX_ADDRS> = HashMap::new();

#[btf_map]
static DECAP_STATS: PerCpuArray<u64, { DecapCounter::COUNT as usize }> = PerCpuArray::new();

#[xdp]
pub fn sluice_decap(ctx: XdpContext) -> u32 {
    let (action, counter) = decap(&ctx);
    if let Some(value) = DECAP_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *value += 1 };
    }
    action
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, DecapCounter) {
    match unwrap(ctx, &DECAP_SOURCES, &DECAP_LOCAL) {
        Unwrapped::NotOurs => (xdp_action::XDP_PASS, DecapCounter::Passed),
        Unwrapped::Done => (xdp_action::XDP_PASS, DecapCounter::Decapsulated),
        Unwrapped::ForbiddenSource => (xdp_action::XDP_DROP, DecapCounter::DropSource),
        Unwrapped::Malformed => (xdp_action::XDP_DROP, DecapCounter::DropMalformed),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel reads this section: "Dual MIT/GPL" is on its list of GPL-compatible strings, so
// every helper stays open to the program, GPL-only ones included (e.g. aya-log's perf output).
// The code is MIT OR GPL-2.0 (lb-ebpf/Cargo.toml, LICENSE-MIT, LICENSE-GPL2).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
