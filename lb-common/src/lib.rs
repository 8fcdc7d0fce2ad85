//! Everything the XDP program and the control plane must agree on: map names, keys, values,
//! limits and the flow hash. `#![no_std]` so the eBPF crate can use it; with the `user`
//! feature the types also implement `aya::Pod` for user space.
#![no_std]

use core::mem::size_of;

/// Most VIPs (address, port, protocol) one load balancer serves.
pub const MAX_VIPS: u32 = 1024;
/// Most backend slots in all. A slot is one backend of one VIP, so that removing a backend from
/// one VIP re-hashes exactly that VIP's flows and nothing else.
pub const MAX_BACKENDS: u32 = 16384;
/// Most interfaces a backend can be reached through by `XDP_REDIRECT`.
pub const MAX_TX_PORTS: u32 = 64;
/// Maglev lookup table size per VIP (prime). The Maglev paper keeps M > 100 x N backends.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;
/// Largest table size accepted: 1,000,003 (prime) slots x 4 bytes is 4 MB per VIP.
pub const MAX_MAGLEV_SIZE: u32 = 1_000_003;
/// Connection-table entries unless configured otherwise.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
/// Value of a Maglev slot that holds no backend.
pub const NO_BACKEND: u32 = u32::MAX;
/// `BPF_F_INNER_MAP`: lets the inner Maglev arrays differ in size from the template.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: user space writes a whole Maglev table with one memcpy instead of M syscalls.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every inner Maglev array (the kernel requires them equal to the template's).
pub const MAGLEV_INNER_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists for the connection table, so inserting a new flow
/// does not take a lock shared by all CPUs.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

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
    /// Bit of a destination address (raw, network order), by Fibonacci hashing.
    #[inline(always)]
    pub const fn bit(addr: u32) -> u32 {
        addr.wrapping_mul(0x9e37_79b1) >> (32 - VIP_FILTER_BITS.trailing_zeros())
    }

    #[inline(always)]
    pub const fn may_contain(&self, addr: u32) -> bool {
        let bit = Self::bit(addr);
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    pub fn insert(&mut self, addr: u32) {
        let bit = Self::bit(addr);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
}

/// Names of the maps, as the loader and `sluice inspect` look them up (and as pinned in bpffs).
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const ALL: [&str; 9] = [
        VIP_FILTER,
        VIPS,
        MAGLEV,
        BACKENDS,
        FLOWS,
        TX_PORTS,
        VIP_STATS,
        BACKEND_STATS,
        GLOBAL_STATS,
    ];
}

/// Name of the balancer's XDP entry point in the object file.
pub const BALANCER_PROGRAM: &str = "sluice_balancer";

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of the `VIPS` hash: addresses and ports exactly as they sit in the packet (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
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

/// Backend slot states. The program only forwards to a slot that is not `EMPTY`.
pub mod backend_state {
    pub const EMPTY: u32 = 0;
    /// In the Maglev table: takes new flows.
    pub const ACTIVE: u32 = 1;
    /// Out of the Maglev table but still serving its established flows.
    pub const DRAINING: u32 = 2;
}

/// Value of the `BACKENDS` array: where and how to send a packet of this backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address (network order); informational for the L2 path.
    pub addr: u32,
    /// The VIP this slot belongs to: a flow entry pointing at a slot reused by another VIP
    /// must not follow it.
    pub vip_id: u32,
    /// Egress interface: `XDP_TX` when it is the ingress one, else `XDP_REDIRECT` via `TX_PORTS`.
    pub ifindex: u32,
    /// One of [`backend_state`].
    pub state: u32,
    /// Maglev weight as configured (the program ignores it; the control plane diffs on it).
    pub weight: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The VIP this slot serves: an established packet is forwarded only when its own
    /// (address, port, protocol) matches, which lets it skip the VIP lookup safely.
    pub vip: VipKey,
}

/// Key of the `FLOWS` connection table (network order, as in the packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of the `FLOWS` connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Index into `BACKENDS`.
    pub backend: u32,
    pub _reserved: u32,
}

/// Per-VIP and per-backend traffic counters (per CPU in the maps; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// Slots of the `GLOBAL_STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalCounter {
    /// Not for a VIP: handed to the kernel untouched.
    Passed = 0,
    /// Forwarded with `XDP_TX`.
    Tx = 1,
    /// Forwarded with `XDP_REDIRECT`.
    Redirected = 2,
    /// Connection-table hit / miss (VIP traffic only).
    FlowHit = 3,
    FlowMiss = 4,
    /// Dropped: an IPv4, TCP or UDP header that is truncated or inconsistent.
    DropMalformed = 5,
    /// Dropped: a new flow for a VIP without a backend that takes new flows.
    DropNoBackend = 6,
    /// Dropped: an IPv4 fragment of a VIP flow (fragments cannot be hashed to a backend).
    DropFragment = 7,
    /// Dropped: the backend's egress interface is not in `TX_PORTS`, or a map was missing.
    DropInternal = 8,
}

impl GlobalCounter {
    pub const COUNT: u32 = 9;
    pub const ALL: [GlobalCounter; Self::COUNT as usize] = [
        Self::Passed,
        Self::Tx,
        Self::Redirected,
        Self::FlowHit,
        Self::FlowMiss,
        Self::DropMalformed,
        Self::DropNoBackend,
        Self::DropFragment,
        Self::DropInternal,
    ];

    /// Stable name, used by `sluice inspect stats` and its JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Tx => "tx",
            Self::Redirected => "redirected",
            Self::FlowHit => "flow_hit",
            Self::FlowMiss => "flow_miss",
            Self::DropMalformed => "drop_malformed",
            Self::DropNoBackend => "drop_no_backend",
            Self::DropFragment => "drop_fragment",
            Self::DropInternal => "drop_internal",
        }
    }
}

// The layouts are an ABI between two compilers: pin them.
const _: () = assert!(size_of::<VipKey>() == 8);
const _: () = assert!(size_of::<VipInfo>() == 16);
const _: () = assert!(size_of::<Backend>() == 40);
const _: () = assert!(size_of::<FlowKey>() == 16);
const _: () = assert!(size_of::<FlowValue>() == 8);
const _: () = assert!(size_of::<Counters>() == 16);
const _: () = assert!(size_of::<VipFilter>() == 512);

/// Seed of the flow hash. Every load balancer must use the same one so that they all pick the
/// same backend for a flow (a fixed constant, not a per-boot random).
pub const FLOW_HASH_SEED: u32 = 0x5eed_1ce5;

/// Hash of a flow's 5-tuple, as the XDP program computes it (murmur3-style 32-bit mixing).
/// Inputs are the raw header words in network order; `ports` is `sport << 16 | dport` of the
/// raw big-endian fields as loaded. User space calls the same function to predict a flow's
/// backend, so the two never disagree.
#[inline(always)]
pub const fn flow_hash(src: u32, dst: u32, ports: u32, proto: u32) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = hash_round(h, src);
    h = hash_round(h, dst);
    h = hash_round(h, ports);
    h = hash_round(h, proto);
    hash_finish(h ^ 16)
}

#[inline(always)]
const fn hash_round(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn hash_finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

impl FlowKey {
    /// The `ports` word of [`flow_hash`].
    #[inline(always)]
    pub const fn ports_word(&self) -> u32 {
        ((self.sport as u32) << 16) | self.dport as u32
    }

    #[inline(always)]
    pub const fn hash(&self) -> u32 {
        flow_hash(self.src, self.dst, self.ports_word(), self.proto as u32)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)] plain integers and byte arrays with explicit padding fields.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::VipFilter {}
}
