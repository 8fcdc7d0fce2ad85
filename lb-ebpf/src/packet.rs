//! Header parsing with the bounds checks the verifier needs. Headers are read through
//! `packed(2)` structs: after the 14-byte Ethernet header, IPv4 and L4 fields are only 2-byte
//! aligned, and 2-byte loads are what the hardware and the verifier both accept.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// More-fragments flag and fragment offset bits of `frag_off`.
const IP_MF_OFFSET: u16 = 0x3fff;

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

/// The first eight bytes of TCP and UDP: ports, then (UDP) length or (TCP) sequence number.
#[repr(C, packed(2))]
pub struct PortsHdr {
    pub source: u16,
    pub dest: u16,
    pub udp_len: u16,
    pub _rest: u16,
}

const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Byte 12 of the TCP header holds the data offset (header length in words) in its top nibble.
const TCP_DOFF_BYTE: usize = 12;

pub struct Flow {
    pub key: FlowKey,
    /// IPv4 first fragment (ports present but the datagram is split).
    pub fragment: bool,
}

pub enum Parsed {
    /// A TCP or UDP packet over IPv4 with its 5-tuple.
    Flow(Flow),
    /// Not IPv4 TCP/UDP (ARP, IPv6, ICMP, ...) or a non-first fragment: the kernel's business.
    NotForUs,
    /// Truncated or inconsistent IPv4/TCP/UDP headers: the kernel would discard it too.
    Malformed,
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

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        // Shorter than an Ethernet header: not a frame we could forward.
        return Parsed::NotForUs;
    };
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return Parsed::NotForUs;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at; fields are read by value from a packed struct.
    let (version_ihl, tot_len, frag_off, protocol, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be((*ip).tot_len) as usize,
            u16::from_be((*ip).frag_off),
            (*ip).protocol,
            (*ip).saddr,
            (*ip).daddr,
        )
    };
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < core::mem::size_of::<Ipv4Hdr>() || tot_len < ihl {
        return Parsed::Malformed;
    }
    // The IP datagram must fit in the frame (a frame may carry Ethernet padding after it).
    if ctx.data() + ETH_HLEN + tot_len > ctx.data_end() {
        return Parsed::Malformed;
    }
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Parsed::NotForUs;
    }
    let fragment = frag_off & IP_MF_OFFSET != 0;
    if fragment && frag_off & 0x1fff != 0 {
        // A later fragment has no L4 header: nothing to hash on.
        return Parsed::NotForUs;
    }

    let l4 = ETH_HLEN + ihl;
    let l4_len = tot_len - ihl;
    let Some(ports) = ptr_at::<PortsHdr>(ctx, l4) else {
        return Parsed::Malformed;
    };
    // SAFETY: bounds checked by ptr_at.
    let (sport, dport, udp_len) = unsafe { ((*ports).source, (*ports).dest, (*ports).udp_len) };
    if protocol == IPPROTO_TCP {
        let Some(doff) = ptr_at::<u8>(ctx, l4 + TCP_DOFF_BYTE) else {
            return Parsed::Malformed;
        };
        // SAFETY: bounds checked by ptr_at.
        let tcp_hlen = ((unsafe { *doff } >> 4) as usize) * 4;
        if l4_len < TCP_MIN_HLEN || tcp_hlen < TCP_MIN_HLEN || tcp_hlen > l4_len {
            return Parsed::Malformed;
        }
    } else {
        let udp_len = u16::from_be(udp_len) as usize;
        // A first fragment carries only part of the datagram its length field describes.
        if l4_len < UDP_HLEN || udp_len < UDP_HLEN || (!fragment && udp_len > l4_len) {
            return Parsed::Malformed;
        }
    }
    Parsed::Flow(Flow {
        key: FlowKey {
            src: saddr,
            dst: daddr,
            sport,
            dport,
            proto: protocol,
            _pad: [0; 3],
        },
        fragment,
    })
}
