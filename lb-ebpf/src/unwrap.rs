//! Decapsulation of what sluice's load balancers send (IPIP, IP6IP6 and the mixed forms),
//! shared by the stand-alone decapsulator (`decap.rs`) and the balancer's inline decap (one XDP
//! program per interface serves both roles on a node that balances and serves).
//!
//! A packet addressed to one of this node's addresses (`local`) from an allowed load-balancer
//! source prefix (`sources`) loses its outer header and goes to the kernel as the inner packet.
//! Encapsulated packets for this node from anyone else are dropped: without this check anyone
//! could inject packets with arbitrary inner sources. Everything else is not ours.

use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, lpm_trie::Key},
    helpers::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use lb_common::{Addr, FAMILY_V4, FAMILY_V6, IPPROTO_IPIP, IPPROTO_IPV6, ScopedAddr};

use crate::csum;
use crate::packet::{
    self, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_MF_OFFSET, IPV4_HLEN, IPV4_VERSION_IHL, IPV6_HLEN,
    Ipv4Hdr, Ipv6Hdr,
};

/// What became of a frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unwrapped {
    /// Not an encapsulated packet for this node: the caller's business.
    NotOurs,
    /// Unwrapped in place: hand the inner packet to the kernel.
    Done,
    /// For this node, from a source outside the allowed prefixes.
    ForbiddenSource,
    /// For this node and allowed, but the inner header is not what the outer one announced.
    Malformed,
}

/// The outer header: (family, source, destination, inner protocol, header length).
struct Outer {
    /// The link layer's length (14, or 18 with an 802.1Q tag): where the outer header starts.
    /// (A byte: it fits the struct's padding; the balancer's stack is near its limit.)
    l2: u8,
    family: u8,
    src: Addr,
    dst: Addr,
    inner: u8,
    len: usize,
    /// The outer header's ECN field (RFC 6040: a CE mark set on the path reaches the inner).
    ecn: u8,
}

/// Unwraps the frame if it is encapsulated, addressed to a `local` address and sent from an
/// allowed `sources` prefix.
#[inline(always)]
pub fn unwrap<const S: usize, const L: usize>(
    ctx: &XdpContext,
    sources: &LpmTrie<ScopedAddr, u8, S>,
    local: &HashMap<ScopedAddr, u8, L>,
) -> Unwrapped {
    let outer = match packet::link_layer(ctx) {
        Some((ETH_P_IP, l2)) => outer_v4(ctx, l2),
        Some((ETH_P_IPV6, l2)) => outer_v6(ctx, l2),
        _ => None,
    };
    let Some(outer) = outer else {
        return Unwrapped::NotOurs;
    };
    if outer.inner != IPPROTO_IPIP && outer.inner != IPPROTO_IPV6 {
        return Unwrapped::NotOurs;
    }
    if local.get_ptr(&scoped(outer.family, &outer.dst)).is_none() {
        // Not for this node: the kernel routes or drops it as it would without us.
        return Unwrapped::NotOurs;
    }
    let bits = if outer.family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        ScopedAddr::prefix_len(bits),
        scoped(outer.family, &outer.src),
    );
    if sources.get(&key).is_none() {
        return Unwrapped::ForbiddenSource;
    }
    match strip(ctx, &outer) {
        Some(()) => Unwrapped::Done,
        None => Unwrapped::Malformed,
    }
}

#[inline(always)]
fn scoped(family: u8, addr: &Addr) -> ScopedAddr {
    ScopedAddr {
        scope_be: (family as u32).to_be(),
        // SAFETY: [u32; 4] and [u8; 16] have the same size; bytes keep the packet's order.
        addr: unsafe { core::mem::transmute::<Addr, [u8; 16]>(*addr) },
    }
}

#[inline(always)]
fn outer_v4(ctx: &XdpContext, l2: usize) -> Option<Outer> {
    let ip = packet::ptr_at::<Ipv4Hdr>(ctx, l2)?;
    // SAFETY: bounds checked by ptr_at; fields read by value from a packed struct.
    let (version_ihl, tos, frag_off, protocol, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).tos,
            u16::from_be((*ip).frag_off),
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    // sluice writes a plain 20-byte outer header and never fragments it; anything else is
    // left to the kernel.
    if version_ihl != IPV4_VERSION_IHL || frag_off & IP_MF_OFFSET != 0 {
        return None;
    }
    Some(Outer {
        l2: l2 as u8,
        family: FAMILY_V4,
        src: [saddr, 0, 0, 0],
        dst: [daddr, 0, 0, 0],
        inner: protocol,
        len: IPV4_HLEN,
        ecn: tos & ECN_MASK,
    })
}

#[inline(always)]
fn outer_v6(ctx: &XdpContext, l2: usize) -> Option<Outer> {
    let ip = packet::ptr_at::<Ipv6Hdr>(ctx, l2)?;
    // SAFETY: bounds checked by ptr_at; fields read by value from a packed struct.
    let (vtc_flow, nexthdr, saddr, daddr) =
        unsafe { ((*ip).vtc_flow, (*ip).nexthdr, (*ip).saddr, (*ip).daddr) };
    if u32::from_be(vtc_flow) >> 28 != 6 {
        return None;
    }
    Some(Outer {
        l2: l2 as u8,
        family: FAMILY_V6,
        src: saddr,
        dst: daddr,
        inner: nexthdr,
        len: IPV6_HLEN,
        ecn: (u32::from_be(vtc_flow) >> 20) as u8 & ECN_MASK,
    })
}

/// ECN field values (the low two bits of the IPv4 TOS / IPv6 traffic class).
const ECN_MASK: u8 = 0b11;
const ECN_CE: u8 = 0b11;

/// RFC 6040 decapsulation: congestion experienced on the tunnel's path becomes CE on an
/// ECN-capable inner packet; a not-ECN-capable one is dropped (`None`), as the RFC asks, since
/// its sender could not hear the mark.
#[inline(always)]
fn mark_congestion(ctx: &XdpContext, inner_off: usize, version: u8) -> Option<()> {
    if version == 4 {
        let ip = packet::ptr_at_mut::<Ipv4Hdr>(ctx, inner_off)?;
        // SAFETY: bounds checked by ptr_at_mut; fields read and written by value.
        unsafe {
            let (ihl, tos) = ((*ip).version_ihl, (*ip).tos);
            if tos & ECN_MASK == 0 {
                return None;
            }
            let old = u16::from_ne_bytes([ihl, tos]);
            let new = u16::from_ne_bytes([ihl, tos | ECN_CE]);
            (*ip).tos = tos | ECN_CE;
            (*ip).check = csum::replace16((*ip).check, old, new);
        }
    } else {
        // The traffic class spans bytes 0 and 1; its ECN bits are bits 4 and 5 of byte 1.
        let second = packet::ptr_at_mut::<u8>(ctx, inner_off + 1)?;
        // SAFETY: bounds checked by ptr_at_mut.
        unsafe {
            if (*second >> 4) & ECN_MASK == 0 {
                return None;
            }
            *second |= ECN_CE << 4;
        }
    }
    Some(())
}

/// Moves the Ethernet header (and its 802.1Q tag: the inner packet stays on its VLAN) forward
/// over the outer IP header and trims the frame's head. The inner header must be there and of
/// the announced version.
#[inline(always)]
fn strip(ctx: &XdpContext, outer: &Outer) -> Option<()> {
    let (inner_proto, version) = if outer.inner == IPPROTO_IPIP {
        (ETH_P_IP, 4)
    } else {
        (ETH_P_IPV6, 6)
    };
    let l2 = outer.l2 as usize;
    let inner_off = l2 + outer.len;
    let inner_first = packet::ptr_at::<u8>(ctx, inner_off)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { *inner_first } >> 4 != version {
        return None;
    }
    if outer.ecn == ECN_CE {
        mark_congestion(ctx, inner_off, version)?;
    }
    let eth = packet::ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let (dst, src) = unsafe { ((*eth).dst, (*eth).src) };
    packet::relink(ctx, 0, outer.len, l2, inner_proto)?;
    let moved = packet::ptr_at_mut::<EthHdr>(ctx, outer.len)?;
    // SAFETY: bounds checked by ptr_at_mut; the new header overlaps only the outer IP header.
    unsafe {
        (*moved).dst = dst;
        (*moved).src = src;
    }
    // SAFETY: the helper only moves data's start.
    (unsafe { bpf_xdp_adjust_head(ctx.ctx, outer.len as i32) } == 0).then_some(())
}
