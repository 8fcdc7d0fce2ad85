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
/// Most client prefixes over all VIPs' source ranges.
pub const MAX_SOURCE_RANGES: u32 = 16384;
/// Most load-balancer source prefixes and local addresses a decapsulator accepts.
pub const MAX_DECAP_ADDRS: u32 = 256;
/// Other sluice nodes on one segment (`PEERS`).
pub const MAX_PEERS: u32 = 1024;
/// Most interfaces a backend can be reached through by `XDP_REDIRECT`.
pub const MAX_TX_PORTS: u32 = 64;
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

/// Bits of the peer filter: far more than the nodes of one segment, so a client's frame almost
/// never needs the exact `PEERS` lookup.
pub const PEER_FILTER_BITS: u32 = 512;

/// The `PEERS` pre-filter (one array element, read without a hash lookup): one bit per hash
/// bucket of peer MACs. A frame whose source MAC's bit is clear is no peer's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerFilter {
    pub words: [u64; (PEER_FILTER_BITS / 64) as usize],
}

impl PeerFilter {
    #[inline(always)]
    pub const fn bit(mac: &[u8; 6]) -> u32 {
        let folded = u32::from_ne_bytes([mac[0] ^ mac[4], mac[1] ^ mac[5], mac[2], mac[3]]);
        folded.wrapping_mul(0x9e37_79b1) >> (32 - PEER_FILTER_BITS.trailing_zeros())
    }

    #[inline(always)]
    pub const fn may_contain(&self, mac: &[u8; 6]) -> bool {
        let bit = Self::bit(mac);
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    pub fn insert(&mut self, mac: &[u8; 6]) {
        let bit = Self::bit(mac);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
}

/// Names of the maps, as the loader and `sluice inspect` look them up (and as pinned in bpffs).
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS: &str = "BACKENDS";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOWS6: &str = "FLOWS6";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const ANNOUNCE: &str = "ANNOUNCE";
    /// MACs of the other sluice nodes: a frame from one of them was balanced already.
    pub const PEERS: &str = "PEERS";
    pub const PEER_FILTER: &str = "PEER_FILTER";
    /// Inline decapsulation (the balancer unwraps what other nodes sent it): the same maps as
    /// the stand-alone decapsulator's, by the same names.
    pub const DECAP_SOURCES: &str = super::decap_map_names::DECAP_SOURCES;
    pub const DECAP_LOCAL: &str = super::decap_map_names::DECAP_LOCAL;
    /// Dataplane-wide settings (the flood guard's limit) and the guard's per-CPU windows.
    pub const SETTINGS: &str = "SETTINGS";
    pub const NEW_FLOWS: &str = "NEW_FLOWS";
    /// `sluice trace`: the filter of the packets reported, their ring buffer and the per-CPU
    /// rate windows.
    pub const TRACE: &str = "TRACE";
    pub const TRACE_EVENTS: &str = "TRACE_EVENTS";
    pub const TRACE_RATE: &str = "TRACE_RATE";
    pub const ALL: [&str; 22] = [
        FLOWS6,
        VIP_FILTER,
        VIP_ADDRS,
        SOURCE_RANGES,
        VIPS,
        MAGLEV,
        BACKENDS,
        FLOWS,
        TX_PORTS,
        VIP_STATS,
        BACKEND_STATS,
        GLOBAL_STATS,
        ANNOUNCE,
        PEERS,
        PEER_FILTER,
        DECAP_SOURCES,
        DECAP_LOCAL,
        SETTINGS,
        NEW_FLOWS,
        TRACE,
        TRACE_EVENTS,
        TRACE_RATE,
    ];
}

/// Names of the decapsulator's maps (its own object, pinned under `<pin-dir>/<iface>/decap/`).
pub mod decap_map_names {
    pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
    pub const DECAP_LOCAL: &str = "DECAP_LOCAL";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const ALL: [&str; 3] = [DECAP_SOURCES, DECAP_LOCAL, DECAP_STATS];
}

/// Name of the balancer's XDP entry point in the object file.
pub const BALANCER_PROGRAM: &str = "sluice_balancer";
/// Name of the backend-side decapsulator's XDP entry point (in its own object).
pub const DECAP_PROGRAM: &str = "sluice_decap";

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

/// Key of the `VIPS` hash: address and port exactly as they sit in the packet (network order).
/// `VIP_ADDRS` uses the same key with port and proto 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
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

/// Slots of the decapsulator's `DECAP_STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// Not an encapsulated packet for this node: handed to the kernel untouched.
    Passed = 0,
    /// Outer header stripped, inner packet handed to the kernel.
    Decapsulated = 1,
    /// Dropped: encapsulated, for this node, but the outer source is not a configured load balancer.
    DropSource = 2,
    /// Dropped: encapsulated but truncated or inconsistent.
    DropMalformed = 3,
}

impl DecapCounter {
    pub const COUNT: u32 = 4;
    pub const ALL: [DecapCounter; Self::COUNT as usize] = [
        Self::Passed,
        Self::Decapsulated,
        Self::DropSource,
        Self::DropMalformed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Decapsulated => "decapsulated",
            Self::DropSource => "drop_source",
            Self::DropMalformed => "drop_malformed",
        }
    }
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

/// Key of the `PEERS` map: the MAC of another sluice node on the attached segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl PeerKey {
    pub const fn new(mac: [u8; 6]) -> Self {
        Self { mac, _pad: [0; 2] }
    }
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
    /// [`FAMILY_V4`] or [`FAMILY_V6`] of `addr`.
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
    /// Index into `BACKENDS`.
    pub backend: u32,
    /// The slot's [`Backend::generation`] when the flow was recorded.
    pub generation: u32,
}

/// The flood guard's default: connection-table inserts per second per CPU (Katran's default).
pub const DEFAULT_MAX_NEW_FLOWS_PER_CPU: u32 = 125_000;
/// The flood guard counts new flows per window of this length (one second).
pub const RATE_WINDOW_NS: u64 = 1_000_000_000;

/// Settings of the whole dataplane (`SETTINGS`, one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The flood guard: new flows recorded in the connection table per second and CPU; above
    /// it, new flows are forwarded by Maglev's pick without an entry. 0: no limit.
    pub max_new_flows_per_cpu: u32,
    pub _reserved: u32,
}

/// One CPU's flood-guard window (`NEW_FLOWS`): new flows seen since `start_ns`
/// (bpf_ktime_get_ns, CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub start_ns: u64,
    pub flows: u64,
}

/// The `sluice trace` session (`TRACE`, one element): which packets the balancer reports in
/// `TRACE_EVENTS`. Off (`until_ns` 0) unless a trace runs; then the established path pays one
/// array read and one comparison for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC) after which the filter lapses: the reader renews it
    /// every second, so a trace whose reader died stops within seconds. 0: no trace.
    pub until_ns: u64,
    /// With [`trace_match::VIP`]: the VIP's address and family; its port and protocol when
    /// they are not 0.
    pub vip: VipKey,
    /// With [`trace_match::CLIENT`]: the packet's source masked with `client_mask` must equal
    /// `client` (both raw, network order, of `client_family`).
    pub client: Addr,
    pub client_mask: Addr,
    /// With [`trace_match::BACKEND`]: the `BACKENDS` index the packet went to.
    pub backend: u32,
    /// Events per second per CPU; those above are counted `trace_lost_rate`.
    pub max_per_sec: u32,
    /// [`trace_match`] bits: the conditions that apply (all must hold).
    pub matches: u8,
    pub client_family: u8,
    pub _pad: [u8; 2],
    /// The reader's process id, as its own pid namespace numbers it: a second `sluice trace` is
    /// refused while this one holds it.
    pub owner_pid: u32,
    /// The inode of the reader's pid namespace (`/proc/self/ns/pid`; 0: unknown): `owner_pid`
    /// means something only to a process of the same namespace.
    pub owner_pidns: u32,
}

/// [`TraceFilter::matches`].
pub mod trace_match {
    pub const VIP: u8 = 1;
    pub const CLIENT: u8 = 2;
    pub const BACKEND: u8 = 4;
}

/// One traced packet (`TRACE_EVENTS`): its flow and what the balancer did with it and why.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// bpf_ktime_get_ns (CLOCK_MONOTONIC).
    pub time_ns: u64,
    /// The client -> VIP 5-tuple as parsed (network order).
    pub flow: FlowKey,
    /// The XDP action returned.
    pub action: u32,
    /// The `BACKENDS` index chosen, or [`NO_BACKEND`].
    pub backend: u32,
    /// The backend slot's generation at the decision (a connection-table entry names one).
    pub generation: u32,
    /// The Maglev slot consulted and the table's size; [`NO_SLOT`] when the table was not.
    pub slot: u32,
    pub table_size: u32,
    /// Ingress interface.
    pub ifindex: u32,
    /// Length of the IP packet as received.
    pub ip_len: u16,
    /// The [`GlobalCounter`] that counted the packet's fate: verdict and reason.
    pub counter: u8,
    /// One of [`trace_source`].
    pub source: u8,
    /// [`trace_flags`] bits.
    pub flags: u8,
    pub _pad: u8,
    pub cpu: u16,
}

/// Size of `TRACE_EVENTS`: ~2,900 events of 88 bytes (record header included) between two
/// reads of the trace process.
pub const TRACE_RING_BYTES: u32 = 256 * 1024;

/// [`TraceEvent::slot`] when no Maglev table was consulted.
pub const NO_SLOT: u32 = u32::MAX;

/// [`TraceEvent::source`]: what chose the backend.
pub mod trace_source {
    /// No backend was chosen (passed, dropped before a pick, or from a peer).
    pub const NONE: u8 = 0;
    /// The connection table's entry for the flow.
    pub const CONN_TABLE: u8 = 1;
    /// The VIP's Maglev table (a new flow, a SYN, or an entry that no longer matched).
    pub const MAGLEV: u8 = 2;
}

/// [`TraceEvent::flags`].
pub mod trace_flags {
    /// A TCP SYN without ACK (balanced afresh, never by the connection table).
    pub const SYN: u8 = 1;
    /// Maglev's pick was not recorded in the connection table: the flood guard held.
    pub const NOT_RECORDED: u8 = 2;
    /// The VIP has session affinity (the hash ignored the ports).
    pub const AFFINITY: u8 = 4;
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
    /// Dropped: an IP, TCP, UDP or ICMP header that is truncated or inconsistent.
    DropMalformed = 5,
    /// Dropped: a new flow for a VIP without a backend that takes new flows.
    DropNoBackend = 6,
    /// Dropped: a fragment for a VIP address (fragments cannot be hashed to a backend).
    DropFragment = 7,
    /// Dropped: the backend's egress interface is not in `TX_PORTS`, or a map was missing.
    DropInternal = 8,
    /// Dropped: a packet for a VIP address whose L4 header lies beyond the IPv6 extension
    /// headers sluice walks (or behind one it cannot walk, such as ESP).
    DropUnparsed = 9,
    /// Dropped: a new flow from a client outside the VIP's source ranges.
    DropSourceRange = 10,
    /// Dropped: too big once encapsulated, and the sender forbade fragmentation too late to
    /// tell it (IPv4 without DF).
    DropTooBig = 11,
    /// Answered: an ICMP echo request to a VIP address.
    IcmpEchoReply = 12,
    /// Answered: ICMP "fragmentation needed" / ICMPv6 "packet too big" to a client whose
    /// packet would exceed the egress MTU once encapsulated.
    IcmpTooBigSent = 13,
    /// Forwarded: an ICMP error about a VIP flow, to the backend that owns the flow.
    IcmpErrorForwarded = 14,
    /// Answered: an ARP request for an address this node announces (`ANNOUNCE`).
    ArpReply = 15,
    /// To this node's own stack: the pick was this node itself (`forward_mode::LOCAL`).
    Local = 16,
    /// To this node's own stack: a VIP frame from another sluice node (`PEERS`), balanced
    /// there already; never balanced twice.
    FromPeer = 17,
    /// To this node's own stack: unwrapped IPIP/IP6IP6 from another node (inline decap).
    Decapsulated = 18,
    /// Dropped: encapsulated to this node from a source outside `DECAP_SOURCES`.
    DropDecapSource = 19,
    /// Forwarded by Maglev's pick without a connection-table entry: the flood guard held this
    /// CPU over `Settings::max_new_flows_per_cpu`.
    FlowsNotRecorded = 20,
    /// Dropped: an ICMP error to a VIP address whose quoted packet was not sent from it.
    DropIcmpMismatch = 21,
    /// Answered: an IPv6 Neighbor Solicitation for an address this node announces (`ANNOUNCE`).
    NeighborAdvert = 22,
    /// `sluice trace`: events written to `TRACE_EVENTS`.
    TraceEvents = 23,
    /// `sluice trace`: matching packets not reported, over the trace's rate on their CPU.
    TraceLostRate = 24,
    /// `sluice trace`: matching packets not reported, the ring buffer full (a slow reader).
    TraceLostRing = 25,
}

impl GlobalCounter {
    pub const COUNT: u32 = 26;
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
        Self::DropUnparsed,
        Self::DropSourceRange,
        Self::DropTooBig,
        Self::IcmpEchoReply,
        Self::IcmpTooBigSent,
        Self::IcmpErrorForwarded,
        Self::ArpReply,
        Self::Local,
        Self::FromPeer,
        Self::Decapsulated,
        Self::DropDecapSource,
        Self::FlowsNotRecorded,
        Self::DropIcmpMismatch,
        Self::NeighborAdvert,
        Self::TraceEvents,
        Self::TraceLostRate,
        Self::TraceLostRing,
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
            Self::DropUnparsed => "drop_unparsed",
            Self::DropSourceRange => "drop_source_range",
            Self::DropTooBig => "drop_too_big",
            Self::IcmpEchoReply => "icmp_echo_reply",
            Self::IcmpTooBigSent => "icmp_too_big_sent",
            Self::IcmpErrorForwarded => "icmp_error_forwarded",
            Self::ArpReply => "arp_reply",
            Self::Local => "local",
            Self::FromPeer => "from_peer",
            Self::Decapsulated => "decapsulated",
            Self::DropDecapSource => "drop_decap_source",
            Self::FlowsNotRecorded => "flows_not_recorded",
            Self::DropIcmpMismatch => "drop_icmp_mismatch",
            Self::NeighborAdvert => "neighbor_advert",
            Self::TraceEvents => "trace_events",
            Self::TraceLostRate => "trace_lost_rate",
            Self::TraceLostRing => "trace_lost_ring",
        }
    }
}

// The layouts are an ABI between two compilers: pin them.
const _: () = assert!(size_of::<VipKey>() == 20);
const _: () = assert!(size_of::<VipInfo>() == 16);
const _: () = assert!(size_of::<Backend>() == 92);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<FlowKey4>() == 16);
const _: () = assert!(size_of::<ScopedAddr>() == 20);
const _: () = assert!(size_of::<FlowValue>() == 8);
const _: () = assert!(size_of::<Settings>() == 8);
const _: () = assert!(size_of::<RateWindow>() == 16);
const _: () = assert!(size_of::<Counters>() == 16);
const _: () = assert!(size_of::<TraceFilter>() == 80);
const _: () = assert!(size_of::<TraceEvent>() == 80);
const _: () = assert!(size_of::<VipFilter>() == 512);
const _: () = assert!(size_of::<Announce>() == 8);
const _: () = assert!(size_of::<PeerKey>() == 8);
const _: () = assert!(size_of::<PeerFilter>() == 64);

/// Bump when a map's meaning changes without its sizes changing (e.g. a key's field order).
/// 3: `FlowValue` carries the slot's generation; `SOURCE_RANGES` scopes carry the family.
/// 4: `SETTINGS` and `NEW_FLOWS` (the flood guard).
/// 5: Maglev tables hold two slots per 8-byte element.
/// 6: `TRACE`, `TRACE_EVENTS`, `TRACE_RATE` (`sluice trace`).
const MAP_LAYOUT_REVISION: u32 = 6;

/// Fingerprint of everything a pinned map's contents depend on: struct sizes, limits, counter
/// slots. A program whose fingerprint differs must not adopt maps pinned by another: it would
/// misread them. Kept beside the pins (see `PinLayout`), compared before adopting.
pub const MAP_LAYOUT: u32 = {
    let parts = [
        MAP_LAYOUT_REVISION,
        size_of::<VipKey>() as u32,
        size_of::<VipInfo>() as u32,
        size_of::<Backend>() as u32,
        size_of::<FlowKey>() as u32,
        size_of::<FlowKey4>() as u32,
        size_of::<FlowValue>() as u32,
        size_of::<Counters>() as u32,
        size_of::<VipFilter>() as u32,
        size_of::<ScopedAddr>() as u32,
        size_of::<Announce>() as u32,
        size_of::<PeerKey>() as u32,
        size_of::<PeerFilter>() as u32,
        size_of::<Settings>() as u32,
        size_of::<RateWindow>() as u32,
        size_of::<TraceFilter>() as u32,
        size_of::<TraceEvent>() as u32,
        MAX_PEERS,
        MAX_DECAP_ADDRS,
        GlobalCounter::COUNT,
        MAX_VIPS,
        MAX_BACKENDS,
        MAX_SOURCE_RANGES,
        MAX_TX_PORTS,
        map_names::ALL.len() as u32,
    ];
    let mut h = FLOW_HASH_SEED;
    let mut i = 0;
    while i < parts.len() {
        h = hash_round(h, parts[i]);
        i += 1;
    }
    hash_finish(h)
};

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

/// Seed and multiplier of the Maglev identity of an IPv6 backend (FNV-1a over its four words).
/// Like [`FLOW_HASH_SEED`], a wire contract: every load balancer must derive the same identity
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

    /// The Maglev hash of this flow; `affinity` leaves the ports out, so every connection of
    /// one client lands on one backend.
    #[inline(always)]
    pub const fn hash(&self, affinity: bool) -> u32 {
        let ports = if affinity { 0 } else { self.ports_word() };
        flow_hash(&self.src, &self.dst, ports, self.proto as u32, self.family)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)] plain integers and byte arrays with explicit padding fields.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::VipFilter {}
    unsafe impl aya::Pod for super::ScopedAddr {}
    unsafe impl aya::Pod for super::Announce {}
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::TraceEvent {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PeerFilter {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::RateWindow {}
}
