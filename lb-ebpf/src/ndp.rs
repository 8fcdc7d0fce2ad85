//! IPv6 Neighbor Discovery (RFC 4861) for announced VIPs: the IPv6 counterpart of the ARP
//! reply. A Neighbor Solicitation for an address this node announces becomes, in place, the
//! Neighbor Advertisement "target is at our MAC" (Solicited and Override set, with the
//! Target Link-Layer Address option), sent back to the soliciting host with `XDP_TX`.
//!
//! Answered only when the solicitation is valid by RFC 4861 7.1.1 as far as it matters here:
//! hop limit 255 (it was not routed), ICMPv6 code 0, a correct checksum, options of a
//! non-zero length, no extension headers,
//! a specified source (an unspecified one is another host's duplicate address detection: the
//! kernel's business, as a gratuitous ARP is), and sent to the target itself or to its
//! solicited-node multicast address. ICMPv6 lengths other than 24 (no option) and 32 (one
//! 8-byte option, the source link-layer address) go to the kernel: such solicitations come
//! from duplicate address detection only.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use lb_common::{Addr, FAMILY_V6, GlobalCounter, IPPROTO_ICMPV6, VipKey};

use crate::{
    csum,
    packet::{self, EthHdr, IPV6_HLEN, Ipv6Hdr, L3},
};

pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
pub const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
/// Neighbor Discovery messages are sent with, and only accepted with, this hop limit.
pub const NDP_HOP_LIMIT: u8 = 255;
/// Advertisement flags (first byte of the reserved word): Solicited, Override.
pub const NA_FLAG_SOLICITED: u8 = 0x40;
pub const NA_FLAG_OVERRIDE: u8 = 0x20;
/// Option types: source / target link-layer address (8 bytes each on Ethernet).
pub const OPT_SOURCE_LL: u8 = 1;
pub const OPT_TARGET_LL: u8 = 2;
/// A solicitation or advertisement without options: type, code, checksum, flags, target.
const NDP_MSG_LEN: usize = 24;
/// ... and with one link-layer address option.
const NDP_MSG_OPT_LEN: usize = 32;
/// The advertisement's length after the link layer (14 bytes, or 18 with an 802.1Q tag).
const NA_LEN: usize = IPV6_HLEN + NDP_MSG_OPT_LEN;

/// A Neighbor Solicitation or Advertisement with one link-layer address option.
#[repr(C, packed(2))]
struct NdpMsg {
    kind: u8,
    code: u8,
    checksum: u16,
    /// Advertisement flags in the first byte; zero in a solicitation.
    flags: [u8; 4],
    target: Addr,
    opt_type: u8,
    opt_len: u8,
    opt_mac: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<NdpMsg>() == NDP_MSG_OPT_LEN);

/// `Some(answer)` when the frame is a Neighbor Solicitation for an address `announced` knows
/// (its MAC): the advertisement was written and is to be sent. `None`: not one, the caller
/// goes on as for any other packet. `l3` is the frame's parsed IPv6 header.
#[inline(always)]
pub fn neighbor_advert(
    ctx: &XdpContext,
    l3: &L3,
    announced: impl Fn(&VipKey) -> Option<[u8; 6]>,
) -> Option<(u32, GlobalCounter)> {
    // No extension headers: the message right after the IPv6 header. A tagged solicitation
    // is answered in place, so on its own VLAN.
    let ip_off = l3.ip_offset();
    let icmp_off = ip_off + IPV6_HLEN;
    if l3.proto != IPPROTO_ICMPV6 || l3.l4_off != icmp_off {
        return None;
    }
    let icmp_len = l3.len - IPV6_HLEN;
    if icmp_len != NDP_MSG_LEN && icmp_len != NDP_MSG_OPT_LEN {
        return None;
    }
    let ip = packet::ptr_at::<Ipv6Hdr>(ctx, ip_off)?;
    let head = packet::ptr_at::<[u16; NDP_MSG_LEN / 2]>(ctx, icmp_off)?;
    // SAFETY: bounds checked by ptr_at; read by value.
    let (hop_limit, head) = unsafe { ((*ip).hop_limit, *head) };
    let [kind, code] = head[0].to_ne_bytes();
    if kind != ICMPV6_NEIGHBOR_SOLICIT || code != 0 || hop_limit != NDP_HOP_LIMIT {
        return None;
    }
    if l3.src == [0; 4] {
        return None;
    }
    // The target: words 4..12 of the message.
    let t = [
        pair(head[4], head[5]),
        pair(head[6], head[7]),
        pair(head[8], head[9]),
        pair(head[10], head[11]),
    ];
    if l3.dst != t && l3.dst != solicited_node(&t) {
        return None;
    }
    let mut sum = pseudo_sum(&l3.src, &l3.dst, icmp_len);
    for w in head {
        sum += w as u64;
    }
    if icmp_len == NDP_MSG_OPT_LEN {
        let opt = packet::ptr_at::<[u16; 4]>(ctx, icmp_off + NDP_MSG_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let opt = unsafe { *opt };
        // An option's length (in 8 bytes) must not be 0 (7.1.1); this one is the last 8 bytes.
        if opt[0].to_ne_bytes()[1] != 1 {
            return None;
        }
        for w in opt {
            sum += w as u64;
        }
    }
    if csum::fold(sum) != 0xffff {
        return None;
    }
    let key = VipKey {
        addr: t,
        port: 0,
        proto: 0,
        family: FAMILY_V6,
    };
    let mac = announced(&key)?;
    Some(match advertise(ctx, ip_off, &l3.src, &t, mac) {
        Some(()) => (xdp_action::XDP_TX, GlobalCounter::NeighborAdvert),
        None => (xdp_action::XDP_DROP, GlobalCounter::DropInternal),
    })
}

/// Rewrites the solicitation (its IPv6 header at `ip_off`) into the advertisement of `target`
/// at `mac`, to `to`.
#[inline(always)]
fn advertise(
    ctx: &XdpContext,
    ip_off: usize,
    to: &Addr,
    target: &Addr,
    mac: [u8; 6],
) -> Option<()> {
    let len = ctx.data_end() - ctx.data();
    let frame_len = ip_off + NA_LEN;
    // A solicitation without the option is 8 bytes short of the advertisement.
    // SAFETY: the helper only moves data's end; pointers are derived after it.
    if len != frame_len
        && unsafe { bpf_xdp_adjust_tail(ctx.ctx, frame_len as i32 - len as i32) } != 0
    {
        return None;
    }
    let eth = packet::ptr_at_mut::<EthHdr>(ctx, 0)?;
    let ip = packet::ptr_at_mut::<Ipv6Hdr>(ctx, ip_off)?;
    let msg = packet::ptr_at_mut::<NdpMsg>(ctx, ip_off + IPV6_HLEN)?;
    let mut na = NdpMsg {
        kind: ICMPV6_NEIGHBOR_ADVERT,
        code: 0,
        checksum: 0,
        flags: [NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE, 0, 0, 0],
        target: *target,
        opt_type: OPT_TARGET_LL,
        opt_len: 1,
        opt_mac: mac,
    };
    // SAFETY: a packed(2) 32-byte message is sixteen 16-bit words.
    let words = unsafe { &*(&na as *const NdpMsg as *const [u16; NDP_MSG_OPT_LEN / 2]) };
    let mut sum = pseudo_sum(target, to, NDP_MSG_OPT_LEN);
    for w in words {
        sum += *w as u64;
    }
    na.checksum = !csum::fold(sum);
    let reply_ip = Ipv6Hdr {
        vtc_flow: (6u32 << 28).to_be(),
        payload_len: (NDP_MSG_OPT_LEN as u16).to_be(),
        nexthdr: IPPROTO_ICMPV6,
        hop_limit: NDP_HOP_LIMIT,
        saddr: *target,
        daddr: *to,
    };
    // SAFETY: bounds checked by ptr_at_mut; unaligned-safe writes.
    unsafe {
        (*eth).dst = (*eth).src;
        (*eth).src = mac;
        core::ptr::write_unaligned(ip, reply_ip);
        core::ptr::write_unaligned(msg, na);
    }
    Some(())
}

/// Two 16-bit words as loaded -> the 32-bit word as loaded (little-endian host).
#[inline(always)]
fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// ff02::1:ffXX:XXXX, the low 24 bits of `target` (RFC 4291 2.7.1), as loaded words.
#[inline(always)]
fn solicited_node(target: &Addr) -> Addr {
    [
        0xff02_0000u32.to_be(),
        0,
        1u32.to_be(),
        (0xff00_0000 | (u32::from_be(target[3]) & 0x00ff_ffff)).to_be(),
    ]
}

/// The ICMPv6 pseudo-header sum (addresses, length, next header) as 32-bit words as loaded.
#[inline(always)]
fn pseudo_sum(src: &Addr, dst: &Addr, len: usize) -> u64 {
    let mut sum = (len as u32).to_be() as u64 + (IPPROTO_ICMPV6 as u32).to_be() as u64;
    for i in 0..4 {
        sum += src[i] as u64 + dst[i] as u64;
    }
    sum
}
