//! VIPs and their backends: the `VIPS`, `VIP_ADDRS`, `VIP_FILTER`, `BACKENDS` and `ANNOUNCE`
//! keys and values.

use crate::Addr;

/// Bits of the VIP address filter: a packet whose destination's bit is clear is for no VIP, and
/// is passed after one inlined array read instead of a hash lookup.
pub const VIP_FILTER_BITS: u32 = 4096;

/// The VIP address filter: one bit per hash bucket of destination addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipFilter {
    pub words: [u64; (VIP_FILTER_BITS / 64) as usize],
}

impl Default for VipFilter {
    fn default() -> Self {
        Self {
            words: [0; (VIP_FILTER_BITS / 64) as usize],
        }
    }
}

impl VipFilter {
    /// Bit of a destination address (raw words, network order), by Fibonacci hashing of the
    /// words folded together (an IPv4 address has words 1-3 zero, so it folds to itself).
    #[inline(always)]
    pub const fn bit(addr: &Addr) -> u32 {
        let folded = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
        folded.wrapping_mul(0x9e37_79b1) >> (32 - VIP_FILTER_BITS.trailing_zeros())
    }

    #[inline(always)]
    pub const fn may_contain(&self, addr: &Addr) -> bool {
        let bit = Self::bit(addr);
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    pub fn insert(&mut self, addr: &Addr) {
        let bit = Self::bit(addr);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
}

/// Key of the `VIPS` hash: address and port exactly as they sit in the packet (network order).
/// `VIP_ADDRS` uses the same key with port and proto 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6).
    pub family: u8,
}

impl VipKey {
    /// The `VIP_ADDRS` key of this VIP's address.
    #[inline(always)]
    pub const fn address_only(&self) -> Self {
        Self {
            addr: self.addr,
            port: 0,
            proto: 0,
            family: self.family,
        }
    }
}

/// [`VipInfo::flags`].
pub mod vip_flags {
    /// Session affinity by client address: the Maglev hash ignores the ports.
    pub const AFFINITY: u32 = 1;
    /// New flows are admitted only from the VIP's prefixes in `SOURCE_RANGES`.
    pub const SOURCE_RANGES: u32 = 2;
}

/// Value of the `VIPS` hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into `MAGLEV` and `VIP_STATS`.
    pub id: u32,
    /// Size of this VIP's Maglev table (the inner map's max_entries).
    pub table_size: u32,
    /// Backends that take new flows; 0 drops new flows (established ones keep going).
    pub live_backends: u32,
    pub flags: u32,
}

/// Value of the `ANNOUNCE` hash (key: a VIP address, [`VipKey::address_only`]): this node won
/// the address's election and answers ARP for it with `mac`, the attached interface's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Announce {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Backend slot states. The program only forwards to a slot that is not `EMPTY`.
pub mod backend_state {
    pub const EMPTY: u32 = 0;
    /// In the Maglev table: takes new flows.
    pub const ACTIVE: u32 = 1;
    /// Out of the Maglev table but still serving its established flows.
    pub const DRAINING: u32 = 2;
}

/// [`Backend::mode`]: how a backend's packets are forwarded.
pub mod forward_mode {
    /// L2 direct server return: MAC rewrite, IP header untouched.
    pub const L2: u8 = 0;
    /// Wrapped in an outer IPv4 header (IPIP, or IPv6-in-IPv4 for an IPv6 VIP).
    pub const IPIP_V4: u8 = 1;
    /// Wrapped in an outer IPv6 header (IP6IP6, or IPv4-in-IPv6 for an IPv4 VIP).
    pub const IPIP_V6: u8 = 2;
    /// This node itself: the packet goes to its own stack (`XDP_PASS`, untouched), where
    /// kube-proxy or a local listener takes it on.
    pub const LOCAL: u8 = 3;
}

/// Value of the `BACKENDS` array: where and how to send a packet of this backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend (node) address, raw; the outer destination in encapsulation mode.
    pub addr: Addr,
    /// Base of the outer source address range (encapsulation mode).
    pub encap_src: Addr,
    /// Host-order mask of the last 32 bits of `encap_src` that vary per flow, so that the
    /// backend's NIC spreads the flows over its receive queues (RSS hashes the outer header).
    pub encap_src_vary: u32,
    /// The VIP this slot belongs to: a flow entry pointing at a slot reused by another VIP
    /// must not follow it.
    pub vip_id: u32,
    /// Egress interface: `XDP_TX` when it is the ingress one, else `XDP_REDIRECT` via `TX_PORTS`.
    pub ifindex: u32,
    /// One of [`backend_state`].
    pub state: u32,
    /// Maglev weight as configured (the program ignores it; the control plane diffs on it).
    pub weight: u32,
    /// One of [`forward_mode`].
    pub mode: u8,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6) of `addr`.
    pub family: u8,
    /// Egress MTU: a packet that would exceed it once encapsulated gets an ICMP "too big" back.
    pub mtu: u16,
    /// Next hop's MAC (the backend's own in L2 mode).
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The VIP this slot serves: an established packet is forwarded only when its own
    /// (address, port, protocol) matches, which lets it skip the VIP lookup safely.
    pub vip: VipKey,
    /// Bumped each time the slot is given to another backend. A connection-table entry
    /// carries the generation it was recorded with: an entry of an earlier holder of the slot
    /// does not match, so its flow re-hashes instead of following the slot.
    pub generation: u32,
}
