//! IPIP / IP6IP6 encapsulation towards a backend across L3: the outer header, with per-flow
//! entropy for the backend's RSS and the routers' ECMP.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Backend, FAMILY_V4, FlowKey, IPPROTO_IPIP, IPPROTO_IPV6};
use lb_ebpf::packet::{
    self, DEFAULT_TTL, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr, L3,
};

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

/// Puts an outer IPv4 or IPv6 header in front of the IP packet, after the link layer and its
/// 802.1Q tag if any (the MACs are written by the caller). `None` if the headroom could not grow.
#[inline(always)]
pub(crate) fn encapsulate(
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
    // The outer header goes after the link layer, 802.1Q tag included (the old one is now
    // `overhead` bytes in, and the outer header will overwrite it).
    let l2 = l3.ip_offset();
    let outer_proto = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 };
    packet::relink(ctx, overhead, 0, l2, outer_proto)?;
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

    // RFC 6040 normal mode: the outer header carries the inner DSCP and ECN, so ECN marks
    // and QoS survive the tunnel; DF as the inner packet asks (IPv6 is never fragmented on
    // the path), so PMTU discovery keeps working through it.
    if outer_v4 {
        let mut ip = Ipv4Hdr::new(l3.len + IPV4_HLEN, inner_proto, src[0], backend.addr[0]);
        ip.set_tos_df(l3.tos, l3.dont_fragment);
        let out = packet::ptr_at_mut::<Ipv4Hdr>(ctx, l2)?;
        // SAFETY: bounds checked by ptr_at_mut; unaligned-safe write.
        unsafe { core::ptr::write_unaligned(out, ip) };
    } else {
        let ip = Ipv6Hdr {
            vtc_flow: ((6u32 << 28) | ((l3.tos as u32) << 20) | (entropy >> 12)).to_be(),
            payload_len: (l3.len as u16).to_be(),
            nexthdr: inner_proto,
            hop_limit: DEFAULT_TTL,
            saddr: src,
            daddr: backend.addr,
        };
        let out = packet::ptr_at_mut::<Ipv6Hdr>(ctx, l2)?;
        // SAFETY: bounds checked by ptr_at_mut; unaligned-safe write.
        unsafe { core::ptr::write_unaligned(out, ip) };
    }
    Some(())
}
