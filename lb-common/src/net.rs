//! Protocol numbers, address families and addresses as the maps store them (raw words in
//! network order), and their conversions.

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Address families as stored in keys.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// An IPv4 or IPv6 address as its raw words sit in the packet (network order). IPv4 uses
/// word 0 and leaves words 1-3 zero; keys carry the family beside it, so `2001:db8::` and
/// an IPv4 address with the same first word never collide.
pub type Addr = [u32; 4];

/// Bytes added in front of a packet by encapsulation.
pub const IPIP_OVERHEAD: u32 = 20;
pub const IP6IP6_OVERHEAD: u32 = 40;

/// The data of an LPM trie key (the prefix length precedes it, as aya's `lpm_trie::Key` lays
/// out): a 32-bit scope, then an address. The scope is matched in full, so one trie holds
/// prefixes of many scopes: `SOURCE_RANGES` scopes by VIP id (a VIP's allowed client
/// prefixes), `DECAP_SOURCES` by family (load balancers' outer source prefixes).
/// `DECAP_LOCAL` (this node's addresses, exact match) uses it as a hash key. IPv4 uses
/// `addr[0..4]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScopedAddr {
    /// Big-endian, so that its bits are the first ones the trie matches.
    pub scope_be: u32,
    pub addr: [u8; 16],
}

impl ScopedAddr {
    /// Prefix length of a key matching the scope and the first `addr_bits` of the address.
    pub const fn prefix_len(addr_bits: u32) -> u32 {
        32 + addr_bits
    }
}

/// The `SOURCE_RANGES` scope of VIP `vip_id`'s prefixes of `family`: a client is looked up in
/// its own family's scope only, so a range of the other family (`::/0` beside IPv4 ranges)
/// never matches it.
#[inline(always)]
pub const fn source_range_scope(vip_id: u32, family: u8) -> u32 {
    ((family as u32) << 24) | (vip_id & 0x00ff_ffff)
}

/// An address as the maps store it (raw words in network order) and its family.
pub fn raw_addr(addr: core::net::IpAddr) -> (Addr, u8) {
    match addr {
        core::net::IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        core::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

/// The address of raw map words of `family`.
pub fn addr_from_raw(raw: &Addr, family: u8) -> core::net::IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (chunk, word) in o.as_chunks_mut::<4>().0.iter_mut().zip(raw) {
            *chunk = word.to_ne_bytes();
        }
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(o))
    } else {
        core::net::IpAddr::V4(core::net::Ipv4Addr::from(raw[0].to_ne_bytes()))
    }
}

/// An address as the 16 bytes of a [`ScopedAddr`] (IPv4 in the first four).
pub fn addr_bytes(addr: core::net::IpAddr) -> [u8; 16] {
    match addr {
        core::net::IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        core::net::IpAddr::V6(v6) => v6.octets(),
    }
}
