//! Counters: per VIP and backend, the balancer's global slots and the decapsulator's.

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
    /// Second-chance mode: a non-SYN whose pick changed with its VIP's table, picked for this
    /// node, that this node's conntrack knows: to the stack (the flow is this node's).
    SecondChanceHit = 26,
    /// Second-chance mode: such a packet conntrack does not know: handed on to the previous
    /// table's pick (which takes it as balanced by a peer, never hands it on again).
    SecondChanceHandedOn = 27,
    /// Second-chance mode: a packet of a flow this node handed on at an earlier change
    /// (`HANDED_FLOWS`), sent on to that node again, marked handed on.
    SecondChanceRecordFollowed = 28,
    /// Second-chance mode: a record would have sent the packet on, but its hop limit was down
    /// to 1 (records that form a cycle): passed to this node's stack instead.
    SecondChanceHopLimit = 29,
}

impl GlobalCounter {
    pub const COUNT: u32 = 30;
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
        Self::SecondChanceHit,
        Self::SecondChanceHandedOn,
        Self::SecondChanceRecordFollowed,
        Self::SecondChanceHopLimit,
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
            Self::SecondChanceHit => "second_chance_hit",
            Self::SecondChanceHandedOn => "second_chance_handed_on",
            Self::SecondChanceRecordFollowed => "second_chance_record_followed",
            Self::SecondChanceHopLimit => "second_chance_hop_limit",
        }
    }
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
