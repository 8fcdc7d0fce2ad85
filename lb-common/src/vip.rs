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

/// Value of the `VIPS` hash. Replaced whole when the VIP moves to another table, so a packet
/// reads the table and its size together.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into `VIP_BY_ID` and `VIP_STATS`.
    pub id: u32,
    /// Index into `MAGLEV` and `TABLES`: the table this VIP's new flows are picked from.
    pub table: u32,
    /// Size of that Maglev table (the inner map's slots).
    pub table_size: u32,
    /// Backends that take new flows; 0 drops new flows (established ones keep going).
    pub live_backends: u32,
    pub flags: u32,
    /// The table this VIP pointed at before `table` ([`NO_TABLE`] when none): kept (not freed)
    /// while the VIP names it, so that second-chance mode can find a flow's previous pick.
    /// One generation: it is replaced at the VIP's next table change.
    pub previous_table: u32,
}

/// [`VipInfo::previous_table`] of a VIP that has none.
pub const NO_TABLE: u32 = u32::MAX;

impl Default for VipInfo {
    fn default() -> Self {
        Self {
            id: 0,
            table: 0,
            table_size: 0,
            live_backends: 0,
            flags: 0,
            previous_table: NO_TABLE,
        }
    }
}

/// Value of the `VIP_BY_ID` array: what an established packet checks instead of the `VIPS`
/// lookup. Its flow entry names a VIP id; the id still names the flow's VIP when `key` is the
/// packet's (address, port, protocol), and the entry's backend is still one of the VIP's when
/// it is a member of `table`. Cleared (key zero) when the VIP goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipRef {
    pub key: VipKey,
    pub table: u32,
}

/// Value of the `TABLES` array: a Maglev table's description, addressed by content. Written
/// before any VIP points at the table and never changed while one does: a change of members,
/// weights or size is another table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// Of what the table was built from (0: none, the id is free).
    pub fingerprint: u64,
    pub size: u32,
    /// Members, draining ones included (their flows still reach them).
    pub members: u32,
    /// One bit per backend id: set for every member, active or draining.
    pub bits: [u64; (crate::MAX_BACKENDS / 64) as usize],
}

impl Default for TableInfo {
    fn default() -> Self {
        Self {
            fingerprint: 0,
            size: 0,
            members: 0,
            bits: [0; (crate::MAX_BACKENDS / 64) as usize],
        }
    }
}

impl TableInfo {
    /// Is backend `id` a member (active or draining)?
    #[inline(always)]
    pub const fn has(&self, id: u32) -> bool {
        let word = (id / 64) as usize;
        word < self.bits.len() && self.bits[word] & (1 << (id % 64)) != 0
    }

    pub fn add(&mut self, id: u32) {
        if let Some(word) = self.bits.get_mut((id / 64) as usize) {
            *word |= 1 << (id % 64);
        }
    }
}

/// Key of `TABLE_MEMBERS`: a backend of a table, described for the readers (`inspect`,
/// `explain`, `/metrics`); the program never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberKey {
    pub table: u32,
    pub backend: u32,
}

/// Value of `TABLE_MEMBERS`: the backend's weight in the table, with [`MEMBER_DRAINING`] set
/// when it takes no new flows (its weight is then what it would be when it comes back).
pub type MemberWeight = u32;
pub const MEMBER_DRAINING: u32 = 1 << 31;

/// The weight a member has in its table's picks: 0 while draining.
pub const fn member_pick_weight(weight: MemberWeight) -> u32 {
    if weight & MEMBER_DRAINING != 0 {
        0
    } else {
        weight
    }
}

/// Value of the `ANNOUNCE` hash (key: a VIP address, [`VipKey::address_only`]): this node won
/// the address's election and answers ARP for it with `mac`, the attached interface's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Announce {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Backend entry states. The program only forwards to an entry that is not `EMPTY`; whether
/// a backend takes a VIP's new flows is its table's business (members with weight 0 or
/// draining are not in the picks).
pub mod backend_state {
    pub const EMPTY: u32 = 0;
    /// Held by a backend that at least one table has as a member.
    pub const IN_USE: u32 = 1;
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

/// Value of the `BACKENDS` array: where and how to send a packet of this backend. One entry
/// per backend, shared by every VIP and table that has it (Katran's reals).
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
    /// Egress interface: `XDP_TX` when it is the ingress one, else `XDP_REDIRECT` via `TX_PORTS`.
    pub ifindex: u32,
    /// One of [`backend_state`].
    pub state: u32,
    /// One of [`forward_mode`].
    pub mode: u8,
    /// [`FAMILY_V4`](crate::FAMILY_V4) or [`FAMILY_V6`](crate::FAMILY_V6) of `addr`.
    pub family: u8,
    /// Egress MTU: a packet that would exceed it once encapsulated gets an ICMP "too big" back.
    pub mtu: u16,
    /// Next hop's MAC (the backend's own in L2 mode).
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Bumped each time the entry is given to another backend. A connection-table entry
    /// carries the generation it was recorded with: an entry of an earlier holder of the slot
    /// does not match, so its flow re-hashes instead of following the slot.
    pub generation: u32,
}
