//! Header layouts and parsing, with the bounds checks the verifier needs. Headers are read
//! through `packed(2)` structs: after the 14-byte Ethernet header, IP and L4 fields are only
//! 2-byte aligned, and 2-byte loads are what the hardware and the verifier both accept.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Addr, FAMILY_V4, FAMILY_V6, FlowKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    VipKey,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
/// IEEE 802.1Q: a VLAN tag (TPID 0x8100, then the 16-bit TCI) between the source MAC and the
/// carried protocol. One tag is parsed; a second one (QinQ: 0x88a8 outside, or 0x8100 twice)
/// is a protocol sluice does not know, and the frame passes untouched (docs/design.md).
pub const ETH_P_8021Q: u16 = 0x8100;
/// The Ethernet header with one 802.1Q tag.
pub const VLAN_ETH_HLEN: usize = ETH_HLEN + 4;
const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_OP_REQUEST: u16 = 1;
pub const ARP_OP_REPLY: u16 = 2;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// More-fragments flag and fragment offset bits of IPv4 `frag_off`.
pub const IP_MF_OFFSET: u16 = 0x3fff;
/// Version 4 and a 20-byte header: what sluice writes, and all the decapsulator unwraps.
pub const IPV4_VERSION_IHL: u8 = 0x45;
/// TTL / hop limit of what sluice writes (outer headers, ICMP answers): Linux's default.
pub const DEFAULT_TTL: u8 = 64;
const IP_OFFSET: u16 = 0x1fff;
pub const IP_DF: u16 = 0x4000;

/// IPv6 extension headers walked before giving up on finding the L4 header. Real traffic
/// carries at most one or two; a longer chain addressed to a VIP is dropped and counted.
const MAX_IPV6_EXT_HEADERS: usize = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
pub const ICMPV6_TIME_EXCEED: u8 = 3;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
pub const ICMP_HLEN: usize = 8;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: u16,
}

#[repr(C, packed(2))]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

impl Ipv4Hdr {
    /// A header without options for an IP packet of `tot_len` bytes, its checksum filled in.
    #[inline(always)]
    pub fn new(tot_len: usize, protocol: u8, saddr: u32, daddr: u32) -> Self {
        let mut ip = Self {
            version_ihl: IPV4_VERSION_IHL,
            tos: 0,
            tot_len: (tot_len as u16).to_be(),
            id: 0,
            frag_off: 0,
            ttl: DEFAULT_TTL,
            protocol,
            check: 0,
            saddr,
            daddr,
        };
        // SAFETY: a packed(2) 20-byte header is ten 16-bit words.
        ip.check = crate::csum::of_words(unsafe { &*(&ip as *const Self as *const [u16; 10]) });
        ip
    }

    /// Sets TOS (DSCP and ECN) and the DF bit, patching the checksum.
    #[inline(always)]
    pub fn set_tos_df(&mut self, tos: u8, df: bool) {
        let old_tos = u16::from_ne_bytes([self.version_ihl, self.tos]);
        self.tos = tos;
        let new_tos = u16::from_ne_bytes([self.version_ihl, tos]);
        let old_frag = self.frag_off;
        self.frag_off = if df { IP_DF.to_be() } else { 0 };
        let check = crate::csum::replace16(self.check, old_tos, new_tos);
        self.check = crate::csum::replace16(check, old_frag, self.frag_off);
    }
}

#[repr(C, packed(2))]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20), big-endian.
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: Addr,
    pub daddr: Addr,
}

/// An ARP packet (RFC 826) for Ethernet and IPv4, as it follows the Ethernet header. Every
/// 16-bit field sits at an even offset; the addresses are bytes.
#[repr(C)]
pub struct ArpHdr {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

impl ArpHdr {
    /// "Who has tpa? Tell spa", between Ethernet and IPv4 addresses.
    #[inline(always)]
    pub fn is_ipv4_ethernet_request(&self) -> bool {
        self.htype == ARP_HTYPE_ETHERNET.to_be()
            && self.ptype == ETH_P_IP.to_be()
            && self.hlen == 6
            && self.plen == 4
            && self.op == ARP_OP_REQUEST.to_be()
    }
}

const _: () = assert!(core::mem::size_of::<ArpHdr>() == 28);

/// The first eight bytes of TCP and UDP: ports, then (UDP) length or (TCP) sequence number.
#[repr(C, packed(2))]
pub struct PortsHdr {
    pub source: u16,
    pub dest: u16,
    pub udp_len: u16,
    pub _rest: u16,
}

/// ICMP and ICMPv6 share this 8-byte header layout.
#[repr(C, packed(2))]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub checksum: u16,
    /// Echo: identifier and sequence. Errors: unused / next-hop MTU (v4), MTU (v6).
    pub rest: [u16; 2],
}

const TCP_MIN_HLEN: usize = 20;
/// Bytes of a quoted TCP/UDP header an ICMP error must carry: the two ports.
const QUOTED_PORTS_LEN: usize = 4;
const UDP_HLEN: usize = 8;
/// Byte 12 of the TCP header holds the data offset (header length in words) in its top nibble;
/// byte 13 the flags.
const TCP_DOFF_BYTE: usize = 12;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// What the IP layer says about a packet.
#[derive(Clone, Copy)]
pub struct L3 {
    pub family: u8,
    /// Offset of the IP header: the link layer's length, 14, or 18 after an 802.1Q tag.
    /// (A byte: it fits the struct's padding, and the stack is near the verifier's limit.)
    pub ip_off: u8,
    pub src: Addr,
    pub dst: Addr,
    /// The L4 protocol (after any IPv6 extension headers).
    pub proto: u8,
    /// Offset of the L4 header from the frame's start.
    pub l4_off: usize,
    /// Length of the IP packet, header included (Ethernet padding excluded).
    pub len: usize,
    /// A first fragment: ports present, but the datagram is split.
    pub first_fragment: bool,
    /// IPv4 "don't fragment" (IPv6 routers never fragment: always true).
    pub dont_fragment: bool,
    /// IPv4 TOS / IPv6 traffic class: DSCP and ECN, copied to an outer header (RFC 6040).
    pub tos: u8,
}

/// XDP frames here fit in a page: no offset into one reaches 4096.
const FRAME_OFFSET_MASK: usize = 0xfff;

impl L3 {
    /// `ip_off`: the IP header's offset, also the link-layer header's length.
    #[inline(always)]
    pub fn ip_offset(&self) -> usize {
        self.ip_off as usize
    }

    /// `l4_off`, visibly below 4096 to the verifier. In a BPF subprogram the offset arrives
    /// through the caller's stack, where the verifier may have lost its bounds; masking keeps
    /// packet-pointer arithmetic provably bounded and changes no real offset (parsing checked
    /// it against the frame's end).
    #[inline(always)]
    pub fn l4_offset(&self) -> usize {
        self.l4_off & FRAME_OFFSET_MASK
    }

    /// The VIP_ADDRS key of the destination.
    #[inline(always)]
    pub fn dst_key(&self) -> VipKey {
        addr_key(self.family, self.dst)
    }
}

pub struct Flow {
    pub key: FlowKey,
    pub l3: L3,
    /// A TCP SYN without ACK: a new connection, whatever the connection table remembers of
    /// an earlier one on the same 5-tuple.
    pub syn: bool,
}

pub enum Parsed {
    /// A TCP or UDP packet with its 5-tuple.
    Flow(Flow),
    /// An ICMP or ICMPv6 echo request (answered when it is for a VIP address).
    EchoRequest(L3),
    /// An ICMP error quoting a TCP or UDP packet; `key` is the quoted flow turned around to
    /// the client -> VIP direction, the way the connection table knows it.
    IcmpError(Flow),
    /// A packet whose L4 header is not available: a later fragment, or an IPv6 extension
    /// chain sluice does not walk to its end. Dropped if it is for a VIP address.
    NoL4 { l3: L3, fragment: bool },
    /// Not TCP/UDP/ICMP over IP (ARP, other protocols, other ICMP types): the kernel's business.
    NotForUs,
    /// Truncated or inconsistent headers, and whether the IP header was readable and addressed
    /// to a VIP address (the caller's `is_vip` said so). Only a packet for a VIP address is
    /// sluice's to drop; anything else goes to the kernel untouched, whatever it is (IPv4 BIG
    /// TCP's `tot_len` 0 and IPv6 jumbograms look malformed here, and are not).
    Malformed { for_vip: bool },
}

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|p| p as *mut T)
}

/// The protocol the frame carries and the offset of its header (the link layer's length):
/// after the Ethernet header, or after its one 802.1Q tag. `None` if the frame is shorter than
/// that (a truncated tag included): not a frame sluice acts on.
#[inline(always)]
pub fn link_layer(ctx: &XdpContext) -> Option<(u16, usize)> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let proto = u16::from_be(unsafe { (*eth).proto });
    if proto != ETH_P_8021Q {
        return Some((proto, ETH_HLEN));
    }
    // The tag: TCI, then the carried protocol.
    let inner = ptr_at::<[u16; 2]>(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    Some((u16::from_be(unsafe { (*inner)[1] }), VLAN_ETH_HLEN))
}

/// Rewrites, for a frame whose head moved (`bpf_xdp_adjust_head`), what follows the MACs of
/// the link-layer header now at `new_at`: the 802.1Q tag of the one at `old_at` if it had one
/// (`l2`, its length, says so), then `proto`. So a frame keeps its VLAN whatever headers sluice
/// adds or removes after the link layer. The tag is read before anything is written, and the
/// caller calls this before overwriting the old header. The MACs are the caller's.
#[inline(always)]
pub fn relink(ctx: &XdpContext, old_at: usize, new_at: usize, l2: usize, proto: u16) -> Option<()> {
    let after_macs = new_at + ETH_HLEN - 2;
    if l2 == ETH_HLEN {
        let field = ptr_at_mut::<u16>(ctx, after_macs)?;
        // SAFETY: bounds checked by ptr_at_mut; the offset is even.
        unsafe { *field = proto.to_be() };
        return Some(());
    }
    let tci = ptr_at::<u16>(ctx, old_at + ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let tci = unsafe { *tci };
    let fields = ptr_at_mut::<[u16; 3]>(ctx, after_macs)?;
    // SAFETY: bounds checked by ptr_at_mut; the offset is even.
    unsafe { *fields = [ETH_P_8021Q.to_be(), tci, proto.to_be()] };
    Some(())
}

/// Returns the L3 facts and whether the L4 header is present (not a later fragment).
#[inline(always)]
pub fn parse_ipv4(
    ctx: &XdpContext,
    offset: usize,
    is_vip: impl Fn(&VipKey) -> bool,
) -> Result<(L3, bool), Parsed> {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, offset) else {
        return Err(Parsed::Malformed { for_vip: false });
    };
    // SAFETY: bounds checked by ptr_at; fields are read by value from a packed struct.
    let (version_ihl, tos, tot_len, frag_off, protocol, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).tos,
            u16::from_be((*ip).tot_len) as usize,
            u16::from_be((*ip).frag_off),
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    let malformed = || {
        Err(Parsed::Malformed {
            for_vip: is_vip(&addr_key(FAMILY_V4, [daddr, 0, 0, 0])),
        })
    };
    if version_ihl >> 4 != 4 || ihl < IPV4_HLEN || tot_len < ihl {
        return malformed();
    }
    // The IP datagram must fit in the frame (a frame may carry Ethernet padding after it).
    if ctx.data() + offset + tot_len > ctx.data_end() {
        return malformed();
    }
    let fragment = frag_off & IP_MF_OFFSET != 0;
    let l3 = L3 {
        family: FAMILY_V4,
        ip_off: offset as u8,
        src: [saddr, 0, 0, 0],
        dst: [daddr, 0, 0, 0],
        proto: protocol,
        l4_off: offset + ihl,
        len: tot_len,
        first_fragment: fragment,
        dont_fragment: frag_off & IP_DF != 0,
        tos,
    };
    Ok((l3, frag_off & IP_OFFSET == 0))
}

/// Walks at most [`MAX_IPV6_EXT_HEADERS`] extension headers to the L4 header. A chain that
/// does not end within them reports `has_l4 = false` with `proto` set to the unwalked header.
#[inline(always)]
pub fn parse_ipv6(
    ctx: &XdpContext,
    offset: usize,
    is_vip: impl Fn(&VipKey) -> bool,
) -> Result<(L3, bool), Parsed> {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, offset) else {
        return Err(Parsed::Malformed { for_vip: false });
    };
    // SAFETY: bounds checked by ptr_at; fields are read by value from a packed struct.
    let (vtc_flow, payload_len, mut next, saddr, daddr) = unsafe {
        (
            u32::from_be((*ip).vtc_flow),
            u16::from_be((*ip).payload_len) as usize,
            (*ip).nexthdr,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let malformed = || Parsed::Malformed {
        for_vip: is_vip(&addr_key(FAMILY_V6, daddr)),
    };
    // Jumbograms (payload_len 0 with a hop-by-hop option) end up here too: passed unless they
    // are for a VIP address, which never takes them.
    if vtc_flow >> 28 != 6 || ctx.data() + offset + IPV6_HLEN + payload_len > ctx.data_end() {
        return Err(malformed());
    }
    let mut l3 = L3 {
        family: FAMILY_V6,
        ip_off: offset as u8,
        src: saddr,
        dst: daddr,
        proto: next,
        l4_off: offset + IPV6_HLEN,
        len: IPV6_HLEN + payload_len,
        first_fragment: false,
        dont_fragment: true,
        tos: (vtc_flow >> 20) as u8,
    };
    let end = offset + IPV6_HLEN + payload_len;
    let mut off = offset + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let hdr_len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
                let Some(ext) = ptr_at::<[u8; 4]>(ctx, off) else {
                    return Err(malformed());
                };
                // SAFETY: bounds checked by ptr_at.
                let ext = unsafe { *ext };
                let len = match next {
                    NEXTHDR_FRAGMENT => {
                        let frag = u16::from_be_bytes([ext[2], ext[3]]);
                        if frag & !7 != 0 {
                            // A later fragment: the L4 header is in the first one.
                            l3.proto = ext[0];
                            l3.l4_off = off + 8;
                            return Ok((l3, false));
                        }
                        // A second fragment header must not clear what the first said.
                        l3.first_fragment |= frag & 1 != 0;
                        8
                    }
                    NEXTHDR_AUTH => (ext[1] as usize + 2) * 4,
                    _ => (ext[1] as usize + 1) * 8,
                };
                next = ext[0];
                len
            }
            _ => {
                l3.proto = next;
                l3.l4_off = off;
                return if off > end {
                    Err(malformed())
                } else {
                    Ok((l3, true))
                };
            }
        };
        off += hdr_len;
        if off > end {
            return Err(malformed());
        }
    }
    match next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
            l3.proto = next;
            l3.l4_off = off;
            Ok((l3, false))
        }
        _ => {
            l3.proto = next;
            l3.l4_off = off;
            Ok((l3, true))
        }
    }
}

/// Ports of a TCP or UDP header at `l3.l4_off`, checked against the IP length, and whether
/// it is a TCP SYN without ACK.
#[inline(always)]
fn parse_ports(ctx: &XdpContext, l3: &L3, l4_len: usize) -> Option<(u16, u16, bool)> {
    let l4 = l3.l4_off;
    let ports = ptr_at::<PortsHdr>(ctx, l4)?;
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport, udp_len) = unsafe { ((*ports).source, (*ports).dest, (*ports).udp_len) };
    if l3.proto == IPPROTO_TCP {
        // Data offset and flags: one 2-byte load.
        let word = ptr_at::<[u8; 2]>(ctx, l4 + TCP_DOFF_BYTE)?;
        // SAFETY: bounds checked by ptr_at.
        let [doff, flags] = unsafe { *word };
        let tcp_hlen = ((doff >> 4) as usize) * 4;
        if l4_len < TCP_MIN_HLEN || tcp_hlen < TCP_MIN_HLEN || tcp_hlen > l4_len {
            return None;
        }
        return Some((sport, dport, flags & (TCP_SYN | TCP_ACK) == TCP_SYN));
    } else {
        let udp_len = u16::from_be(udp_len) as usize;
        // A first fragment carries only part of the datagram its length field describes.
        if l4_len < UDP_HLEN || udp_len < UDP_HLEN || (!l3.first_fragment && udp_len > l4_len) {
            return None;
        }
    }
    Some((sport, dport, false))
}

/// The VIP_ADDRS key of an address (port and protocol 0).
#[inline(always)]
fn addr_key(family: u8, addr: Addr) -> VipKey {
    VipKey {
        addr,
        port: 0,
        proto: 0,
        family,
    }
}

#[inline(always)]
fn flow_key(l3: &L3, sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        src: l3.src,
        dst: l3.dst,
        sport,
        dport,
        proto: l3.proto,
        family: l3.family,
        _pad: [0; 2],
    }
}

/// Parses what follows the IP layer (`parse_ipv4` or `parse_ipv6`'s result). `may_be_ours`
/// sees the IP layer first: when it says no (the destination is no VIP address), the packet is
/// `NotForUs` without its L4 header being read; `is_vip` (exact) decides whether a malformed L4
/// header is the balancer's to drop. Callers inline this once per family, so the IPv4 instance
/// is compiled with the family and the upper address words as constants.
#[inline(always)]
pub fn parse_l4(
    ctx: &XdpContext,
    ip: Result<(L3, bool), Parsed>,
    may_be_ours: impl Fn(&L3) -> bool,
    is_vip: impl Fn(&VipKey) -> bool,
) -> Parsed {
    let (l3, has_l4) = match ip {
        Ok(parsed) => parsed,
        Err(verdict) => return verdict,
    };
    if !may_be_ours(&l3) {
        return Parsed::NotForUs;
    }
    if !has_l4 {
        return Parsed::NoL4 {
            l3,
            fragment: l3.proto != NEXTHDR_HOP
                && l3.proto != NEXTHDR_ROUTING
                && l3.proto != NEXTHDR_DEST
                && l3.proto != NEXTHDR_AUTH,
        };
    }
    // IPv4 header length was checked against tot_len; IPv6 l4_off against the payload.
    let l4_len = l3.len - (l3.l4_off - l3.ip_offset());
    match (l3.family, l3.proto) {
        (_, IPPROTO_TCP | IPPROTO_UDP) => match parse_ports(ctx, &l3, l4_len) {
            Some((sport, dport, syn)) => Parsed::Flow(Flow {
                key: flow_key(&l3, sport, dport),
                l3,
                syn,
            }),
            None => Parsed::Malformed {
                for_vip: is_vip(&l3.dst_key()),
            },
        },
        (FAMILY_V4, IPPROTO_ICMP) | (FAMILY_V6, IPPROTO_ICMPV6) => {
            parse_icmp(ctx, l3, l4_len, is_vip)
        }
        _ => Parsed::NotForUs,
    }
}

#[inline(always)]
fn parse_icmp(ctx: &XdpContext, l3: L3, l4_len: usize, is_vip: impl Fn(&VipKey) -> bool) -> Parsed {
    if l3.first_fragment || l4_len < ICMP_HLEN {
        // Fragmented ICMP is not something a client or router sends to a VIP.
        return Parsed::NotForUs;
    }
    let malformed = || Parsed::Malformed {
        for_vip: is_vip(&l3.dst_key()),
    };
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, l3.l4_offset()) else {
        return malformed();
    };
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*icmp).kind };
    let (echo, error) = if l3.family == FAMILY_V4 {
        (
            kind == ICMP_ECHO_REQUEST,
            kind == ICMP_DEST_UNREACH || kind == ICMP_TIME_EXCEEDED,
        )
    } else {
        (
            kind == ICMPV6_ECHO_REQUEST,
            kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PKT_TOOBIG || kind == ICMPV6_TIME_EXCEED,
        )
    };
    if echo {
        return Parsed::EchoRequest(l3);
    }
    if !error {
        return Parsed::NotForUs;
    }
    // The quoted packet: its IP header, then at least the 8 bytes that hold the ports. It
    // was sent by a backend (source = VIP), so turn it around to the client -> VIP flow.
    let inner_off = l3.l4_offset() + ICMP_HLEN;
    let inner = if l3.family == FAMILY_V4 {
        quoted_ipv4(ctx, inner_off)
    } else {
        quoted_ipv6(ctx, inner_off)
    };
    let Some((inner_src, inner_dst, inner_proto, ports_off)) = inner else {
        return malformed();
    };
    if inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP {
        return Parsed::NotForUs;
    }
    // The quote must lie inside the error's own IP packet, not in the frame's padding after
    // it (found by the fuzz test: such a frame was forwarded on ports read from padding).
    if ports_off + QUOTED_PORTS_LEN > l3.l4_off + l4_len {
        return malformed();
    }
    let Some(ports) = ptr_at::<PortsHdr>(ctx, ports_off) else {
        return malformed();
    };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport) = unsafe { ((*ports).source, (*ports).dest) };
    let key = FlowKey {
        src: inner_dst,
        dst: inner_src,
        sport: dport,
        dport: sport,
        proto: inner_proto,
        family: l3.family,
        _pad: [0; 2],
    };
    Parsed::IcmpError(Flow {
        key,
        l3,
        syn: false,
    })
}

/// (source, destination, protocol, offset of the ports) of a quoted IPv4 header.
#[inline(always)]
fn quoted_ipv4(ctx: &XdpContext, off: usize) -> Option<(Addr, Addr, u8, usize)> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let (version_ihl, protocol, saddr, daddr) =
        unsafe { ((*ip).version_ihl, (*ip).protocol, (*ip).saddr, (*ip).daddr) };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return None;
    }
    Some(([saddr, 0, 0, 0], [daddr, 0, 0, 0], protocol, off + ihl))
}

/// The same for a quoted IPv6 header (extension headers in a quote are not walked).
#[inline(always)]
fn quoted_ipv6(ctx: &XdpContext, off: usize) -> Option<(Addr, Addr, u8, usize)> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, off)?;
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow, nexthdr, saddr, daddr) =
        unsafe { ((*ip).vtc_flow, (*ip).nexthdr, (*ip).saddr, (*ip).daddr) };
    if u32::from_be(vtc_flow) >> 28 != 6 {
        return None;
    }
    Some((saddr, daddr, nexthdr, off + IPV6_HLEN))
}
