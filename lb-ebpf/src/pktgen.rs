//! `sluice_pktgen`: the benchmark's traffic generator, not part of the load balancer.
//!
//! Run with BPF_PROG_TEST_RUN in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`), the kernel
//! hands it copies of one prebuilt Ethernet/IPv4/UDP frame; `XDP_TX` then sends each copy out of
//! the interface named by the test run's `ingress_ifindex`, as a real frame. The program gives
//! every frame the next UDP source port of a cycle of `PKTGEN_FLOWS[0]` ports, so the traffic is
//! many flows. The frame's UDP checksum must be 0 (none, legal in IPv4): ports change, it does not.
//! With `PKTGEN_FLOWS[2]` set (a flood of forged new flows), the low 16 bits of the IPv4 source
//! address change too, once per cycle of ports, and the IP checksum follows: up to 2^32 distinct
//! 5-tuples, each frame a new flow (L4 checksums are left stale: no host should answer them).
//!
//! Live-frames pages are recycled without being copied again: a page whose frame a hop
//! downstream rewrote (a DNAT's addresses, a load balancer's MACs) comes back with those bytes.
//! So the program first restores the headers from `PKTGEN_HEADERS` on every frame; without
//! that, recycled frames would go straight to a backend, or teach the bridge the wrong port.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray},
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Ethernet (14) + IPv4 without options (20): where the UDP source port starts.
const SPORT_OFFSET: usize = 34;
/// The IPv4 header checksum, and the low 16 bits of the source address.
const IP_CHECK_OFFSET: usize = 24;
const SRC_LOW_OFFSET: usize = 28;

/// The frame's first 48 bytes (Ethernet, IPv4, UDP and 6 bytes of payload), as 6 words.
#[btf_map]
static PKTGEN_HEADERS: Array<[u64; HEADER_WORDS], 1> = Array::new();

const HEADER_WORDS: usize = 6;

/// [number of flows (source ports), first source port, spoof sources (0 or 1)].
#[btf_map]
static PKTGEN_FLOWS: Array<u32, 3> = Array::new();

/// Frames sent so far on this CPU.
#[btf_map]
static PKTGEN_SEQ: PerCpuArray<u32, 1> = PerCpuArray::new();

#[xdp]
pub fn sluice_pktgen(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + HEADER_WORDS * 8 > end {
        return xdp_action::XDP_ABORTED;
    }
    let Some(headers) = PKTGEN_HEADERS.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    for (i, word) in headers.iter().enumerate() {
        // SAFETY: 48 bytes from `start` were bounds-checked above.
        unsafe { core::ptr::write_unaligned((start + i * 8) as *mut u64, *word) };
    }
    let flows = PKTGEN_FLOWS.get(0).copied().unwrap_or(1).max(1);
    let first = PKTGEN_FLOWS.get(1).copied().unwrap_or(1024);
    let spoof = PKTGEN_FLOWS.get(2).copied().unwrap_or(0) != 0;
    let Some(seq) = PKTGEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot, no other writer on this CPU while we run; the port's two bytes are
    // within the 48 checked above.
    unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        let port = (first.wrapping_add(n % flows) & 0xffff) as u16;
        core::ptr::write_unaligned((start + SPORT_OFFSET) as *mut u16, port.to_be());
        if spoof {
            let src = core::ptr::read_unaligned((start + SRC_LOW_OFFSET) as *const u16);
            let new = ((n / flows) as u16).to_be();
            let check = core::ptr::read_unaligned((start + IP_CHECK_OFFSET) as *const u16);
            core::ptr::write_unaligned((start + SRC_LOW_OFFSET) as *mut u16, new);
            core::ptr::write_unaligned(
                (start + IP_CHECK_OFFSET) as *mut u16,
                lb_ebpf::csum::replace16(check, src, new),
            );
        }
    }
    xdp_action::XDP_TX
}

/// Port whose IPv4/UDP datagrams `sluice_pktcount` counts and drops.
#[btf_map]
static PKTCOUNT_PORT: Array<u32, 1> = Array::new();

/// Counted datagrams by the last byte of their destination MAC (0..63), 64 = any other.
#[btf_map]
static PKTCOUNT: PerCpuArray<u64, 65> = PerCpuArray::new();

/// `sluice_pktcount`: the benchmark's counter at the load balancer's switch port. Counts the
/// generator's datagrams the load balancer sent out (by destination MAC) and drops them, so
/// that almost nothing else shares the CPU with the load balancer; passes everything else.
#[xdp]
pub fn sluice_pktcount(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Ethernet (14) + IPv4 without options (20) + UDP (8).
    if start + 42 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 42 bytes from `start` were bounds-checked above.
    let (ethertype, version_ihl, protocol, dport, mac5) = unsafe {
        (
            u16::from_be(core::ptr::read_unaligned((start + 12) as *const u16)),
            *((start + 14) as *const u8),
            *((start + 23) as *const u8),
            u16::from_be(core::ptr::read_unaligned((start + 36) as *const u16)),
            *((start + 5) as *const u8),
        )
    };
    let port = PKTCOUNT_PORT.get(0).copied().unwrap_or(0);
    if ethertype != 0x0800 || version_ihl != 0x45 || protocol != 17 || u32::from(dport) != port {
        return xdp_action::XDP_PASS;
    }
    let index = if mac5 < 64 { u32::from(mac5) } else { 64 };
    if let Some(n) = PKTCOUNT.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *n += 1 };
    }
    xdp_action::XDP_DROP
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
