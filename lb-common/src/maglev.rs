//! The Maglev tables as the maps hold them (sizes, tiers, slot packing) and the backend
//! identity the tables are built from (a wire contract between nodes).

/// The largest Maglev table size sluice picks by itself (prime), and the template's size.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65537;
/// The Maglev table sizes a VIP gets when none is configured: primes about doubling, of which
/// the smallest over [`MAGLEV_SLOTS_PER_BACKEND`] x the VIP's backends, else the largest. A
/// wire contract: every node of a cluster must pick the same size for the same backend set, as
/// the picks (and so a flow's backend) depend on it.
pub const MAGLEV_TIERS: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65537];
/// Slots per backend the tiers keep at least. 100 (the Maglev paper's bound) already spreads
/// within 1%, but a smaller table also moves more flows between backends that stay when one is
/// added (measured, 3 -> 4 backends: 1.57% at 509 slots, 0.76% at 4093, 0.09% at 65537; 10 ->
/// 11: 3.73%, 0.44% at 16381): 1000 keeps that under ~1% and a 3-node table at 16 KiB.
pub const MAGLEV_SLOTS_PER_BACKEND: u32 = 1000;

/// The tier of a VIP with `backends` backends (draining ones and weight 0 included, so that
/// draining never changes a table's size).
pub const fn maglev_tier(backends: usize) -> u32 {
    let mut i = 0;
    while i < MAGLEV_TIERS.len() {
        if MAGLEV_TIERS[i] as u64 >= backends as u64 * MAGLEV_SLOTS_PER_BACKEND as u64 {
            return MAGLEV_TIERS[i];
        }
        i += 1;
    }
    MAGLEV_TIERS[MAGLEV_TIERS.len() - 1]
}
/// Largest table size accepted: 1,000,003 (prime) slots x 4 bytes is 4 MB per VIP.
pub const MAX_MAGLEV_SIZE: u32 = 1_000_003;

/// Value of a Maglev slot that holds no backend.
pub const NO_BACKEND: u32 = u32::MAX;
/// `BPF_F_INNER_MAP`: lets the inner Maglev arrays differ in size from the template.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: user space writes a whole Maglev table with one memcpy instead of M syscalls.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every inner Maglev array (the kernel requires them equal to the template's).
pub const MAGLEV_INNER_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
/// Maglev slots per element of an inner array: the kernel spaces array values 8 bytes apart
/// whatever their size, so a 4-byte backend id per element would leave half of every table
/// (and of the cache lines a new flow touches) empty. Slot `s` is the low half of element
/// `s / 2` when `s` is even, the high half when odd (little-endian, as the BPF target is).
pub const MAGLEV_SLOTS_PER_ELEMENT: u32 = 2;

/// Elements of the inner array that holds a table of `slots` slots (the fingerprint beside
/// them not included).
pub const fn maglev_elements(slots: u32) -> u32 {
    slots.div_ceil(MAGLEV_SLOTS_PER_ELEMENT)
}

/// Seed and multiplier of the Maglev identity of an IPv6 backend (FNV-1a over its four words).
/// Like [`FLOW_HASH_SEED`](crate::FLOW_HASH_SEED), a wire contract: every load balancer must derive the same identity
/// from the same address, or their Maglev tables differ.
pub const MAGLEV_ID_SEED: u32 = 0x6b43_a9b5;
pub const MAGLEV_ID_PRIME: u32 = 0x0100_0193;

/// The Maglev identity of a backend, from its address alone: an IPv4 address as its number,
/// an IPv6 one folded from its words.
pub fn maglev_id(addr: core::net::IpAddr) -> u32 {
    match addr {
        core::net::IpAddr::V4(v4) => u32::from(v4),
        core::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut h = MAGLEV_ID_SEED;
            for c in o.as_chunks::<4>().0 {
                h = (h ^ u32::from_be_bytes(*c)).wrapping_mul(MAGLEV_ID_PRIME);
            }
            h
        }
    }
}
