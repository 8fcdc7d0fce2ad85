//! Flows: the connection table's keys and values and the flow hash (a wire contract: every
//! node and user space compute the same one).

use crate::{Addr, FAMILY_V4, FAMILY_V6};

/// Connection-table entries unless configured otherwise.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists for the connection table, so inserting a new flow
/// does not take a lock shared by all CPUs.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

/// `BPF_F_NO_PREALLOC`: a hash map that allocates its elements as they are inserted.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Key of the `FLOWS` connection table (network order, as in the packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Key of the IPv4 connection table `FLOWS`: the IPv4 words of a [`FlowKey`] only, so that an
/// IPv4 lookup hashes and compares 16 bytes instead of 40 (IPv6 flows live in `FLOWS6`, keyed
/// by the whole [`FlowKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey4 {
    /// The full key of an IPv4 flow.
    pub const fn widen(&self) -> FlowKey {
        FlowKey {
            src: [self.src, 0, 0, 0],
            dst: [self.dst, 0, 0, 0],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }
}

impl FlowKey {
    /// The `FLOWS` key of an IPv4 flow.
    #[inline(always)]
    pub const fn narrow(&self) -> FlowKey4 {
        FlowKey4 {
            src: self.src[0],
            dst: self.dst[0],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Entries of `FLOWS6` for a connection table of `flow_table_size` (IPv4) entries: IPv6 is
/// the smaller share of traffic on the networks sluice serves, and its entries are larger.
pub const fn flow_table_size_v6(flow_table_size: u32) -> u32 {
    let quarter = flow_table_size / 4;
    if quarter < MIN_FLOW_TABLE_SIZE {
        MIN_FLOW_TABLE_SIZE
    } else {
        quarter
    }
}

/// The smallest connection table (of either family) sluice creates.
pub const MIN_FLOW_TABLE_SIZE: u32 = 1024;

/// Value of the `FLOWS` connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Index into `BACKENDS` (below [`MAX_BACKENDS`](crate::MAX_BACKENDS)).
    pub backend: u16,
    /// The VIP's id (below [`MAX_VIPS`](crate::MAX_VIPS)): its `VIP_BY_ID` entry says whether
    /// the id still names this flow's VIP and which table's members it may reach.
    pub vip: u16,
    /// The backend's [`Backend::generation`](crate::Backend::generation) when the flow was
    /// recorded.
    pub generation: u32,
}

const _: () = assert!(crate::MAX_BACKENDS <= 1 << 16 && crate::MAX_VIPS <= 1 << 16);

/// Seed of the flow hash. Every load balancer must use the same one so that they all pick the
/// same backend for a flow (a fixed constant, not a per-boot random).
pub const FLOW_HASH_SEED: u32 = 0x5eed_1ce5;

/// Hash of a flow's 5-tuple, as the XDP program computes it (murmur3-style 32-bit mixing).
/// Inputs are the raw header words in network order; `ports` is `sport << 16 | dport` of the
/// raw big-endian fields as loaded (0 for session affinity by client address). An IPv4 flow
/// hashes only word 0 of each address, so IPv4 costs what it did before IPv6 existed. User
/// space calls the same function to predict a flow's backend, so the two never disagree.
#[inline(always)]
pub const fn flow_hash(src: &Addr, dst: &Addr, ports: u32, proto: u32, family: u8) -> u32 {
    let mut h = FLOW_HASH_SEED;
    h = hash_round(h, src[0]);
    h = hash_round(h, dst[0]);
    if family == FAMILY_V6 {
        h = hash_round(h, src[1]);
        h = hash_round(h, src[2]);
        h = hash_round(h, src[3]);
        h = hash_round(h, dst[1]);
        h = hash_round(h, dst[2]);
        h = hash_round(h, dst[3]);
    }
    h = hash_round(h, ports);
    h = hash_round(h, proto);
    hash_finish(h ^ 16)
}

#[inline(always)]
pub(crate) const fn hash_round(h: u32, k: u32) -> u32 {
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
pub(crate) const fn hash_finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

impl FlowKey {
    /// The key of a flow as the program builds it from a packet: addresses as the maps store
    /// them, ports (given in host order) in network order, the IP protocol number.
    pub fn of(
        src: core::net::IpAddr,
        sport: u16,
        dst: core::net::IpAddr,
        dport: u16,
        proto: u8,
    ) -> FlowKey {
        let (src, family) = crate::raw_addr(src);
        let (dst, _) = crate::raw_addr(dst);
        FlowKey {
            src,
            dst,
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            family,
            _pad: [0; 2],
        }
    }

    /// The `ports` word of [`flow_hash`].
    #[inline(always)]
    pub const fn ports_word(&self) -> u32 {
        ((self.sport as u32) << 16) | self.dport as u32
    }

    /// The Maglev hash of this flow; `affinity` leaves the ports out, so every connection of
    /// one client lands on one backend.
    #[inline(always)]
    pub const fn hash(&self, affinity: bool) -> u32 {
        let ports = if affinity { 0 } else { self.ports_word() };
        flow_hash(&self.src, &self.dst, ports, self.proto as u32, self.family)
    }
}
