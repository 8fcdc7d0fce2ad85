//! ICMP sluice writes itself: "too big" to a client whose packet does not fit once
//! encapsulated (PMTU discovery), and echo replies for VIP addresses. (ICMP errors about a VIP
//! flow are forwarded by the chain, `icmp_error` in main.rs.)

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, GlobalCounter, IPPROTO_ICMP, IPPROTO_ICMPV6};
use lb_ebpf::{
    csum,
    packet::{
        self, DEFAULT_TTL, ETH_P_IP, ETH_P_IPV6, EthHdr, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY,
        ICMP_FRAG_NEEDED, ICMP_HLEN, ICMPV6_ECHO_REPLY, ICMPV6_PKT_TOOBIG, IPV4_HLEN, IPV6_HLEN,
        IcmpHdr, Ipv4Hdr, Ipv6Hdr, L3,
    },
};

/// Bytes of the offending packet quoted in an ICMP "too big": its IP header (options
/// included) and the start of its L4 header, which is what the sender needs to find its socket.
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 128;

/// The packet does not fit the egress MTU once encapsulated: tell the client (PMTU
/// discovery), as a router on the path would. IPv4 without DF may not be told, only dropped.
#[inline(always)]
pub(crate) fn too_big(ctx: &XdpContext, l3: &L3, mtu: u32) -> (u32, GlobalCounter) {
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
/// the offending IP packet's start lands right after them (and the link layer) as the quote,
/// then trims the tail. Writes the reply's link layer: the MACs swapped, the 802.1Q tag kept
/// (the reply goes back on the client's VLAN), `proto`.
#[inline(always)]
fn make_room_for_icmp(
    ctx: &XdpContext,
    l2: usize,
    headers: usize,
    quote: usize,
    proto: u16,
) -> Option<()> {
    let eth = packet::ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (dst, src) = unsafe { ((*eth).dst, (*eth).src) };
    // SAFETY: the helpers only move data's start and end; pointers are re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(headers as i32)) } != 0 {
        return None;
    }
    let len = ctx.data_end() - ctx.data();
    let want = l2 + headers + quote;
    if len < want || unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - len as i32) } != 0 {
        return None;
    }
    // The old link layer is `headers` bytes in, to be overwritten by the new headers.
    packet::relink(ctx, headers, 0, l2, proto)?;
    let eth = packet::ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        (*eth).dst = src;
        (*eth).src = dst;
    }
    Some(())
}

#[inline(always)]
fn too_big_v4(ctx: &XdpContext, l3: &L3, mtu: u32) -> Option<()> {
    const HEADERS: usize = IPV4_HLEN + ICMP_HLEN;
    let l2 = l3.ip_offset();
    make_room_for_icmp(ctx, l2, HEADERS, QUOTE_V4, ETH_P_IP)?;
    let ip = Ipv4Hdr::new(HEADERS + QUOTE_V4, IPPROTO_ICMP, l3.dst[0], l3.src[0]);
    let out = packet::ptr_at_mut::<Ipv4Hdr>(ctx, l2)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { core::ptr::write_unaligned(out, ip) };
    let icmp = IcmpHdr {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        checksum: 0,
        rest: [0, (mtu as u16).to_be()],
    };
    icmp_sum::<{ ICMP_HLEN + QUOTE_V4 }>(ctx, l2 + IPV4_HLEN, icmp, 0)
}

#[inline(always)]
fn too_big_v6(ctx: &XdpContext, l3: &L3, mtu: u32) -> Option<()> {
    const HEADERS: usize = IPV6_HLEN + ICMP_HLEN;
    let l2 = l3.ip_offset();
    make_room_for_icmp(ctx, l2, HEADERS, QUOTE_V6, ETH_P_IPV6)?;
    let ip = Ipv6Hdr {
        vtc_flow: (6u32 << 28).to_be(),
        payload_len: ((ICMP_HLEN + QUOTE_V6) as u16).to_be(),
        nexthdr: IPPROTO_ICMPV6,
        hop_limit: DEFAULT_TTL,
        saddr: l3.dst,
        daddr: l3.src,
    };
    let out = packet::ptr_at_mut::<Ipv6Hdr>(ctx, l2)?;
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
    icmp_sum::<{ ICMP_HLEN + QUOTE_V6 }>(ctx, l2 + IPV6_HLEN, icmp, pseudo)
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
pub(crate) fn echo_reply(ctx: &XdpContext, l3: &L3) -> (u32, GlobalCounter) {
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
            let ip = packet::ptr_at_mut::<Ipv4Hdr>(ctx, l3.ip_offset())?;
            (*ip).saddr = l3.dst[0];
            (*ip).daddr = l3.src[0];
            // TTL shares a 16-bit word with the protocol.
            let old = u16::from_ne_bytes([(*ip).ttl, (*ip).protocol]);
            (*ip).ttl = DEFAULT_TTL;
            let new = u16::from_ne_bytes([DEFAULT_TTL, (*ip).protocol]);
            (*ip).check = csum::replace16((*ip).check, old, new);
            ICMP_ECHO_REPLY
        } else {
            let ip = packet::ptr_at_mut::<Ipv6Hdr>(ctx, l3.ip_offset())?;
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
