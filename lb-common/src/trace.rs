//! `sluice trace`: the filter user space writes and the events the balancer reports.

use crate::{Addr, FlowKey, VipKey};

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
    /// The `BACKENDS` index chosen, or [`NO_BACKEND`](crate::NO_BACKEND).
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
    /// The [`GlobalCounter`](crate::GlobalCounter) that counted the packet's fate: verdict and reason.
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
    /// Second chance: the VIP's previous table, whose pick the packet was handed on to (this
    /// node's conntrack did not know the flow).
    pub const PREVIOUS_TABLE: u8 = 3;
    /// Second chance over several changes: this node's record of a flow it handed on at an
    /// earlier change (`HANDED_FLOWS`), followed again (this node's conntrack did not know it).
    pub const HANDED_RECORD: u8 = 4;
}

/// [`TraceEvent::flags`].
pub mod trace_flags {
    /// A TCP SYN without ACK (balanced afresh, never by the connection table).
    pub const SYN: u8 = 1;
    /// Maglev's pick was not recorded in the connection table: the flood guard held, or the
    /// node runs in second-chance mode (records nothing).
    pub const NOT_RECORDED: u8 = 2;
    /// The VIP has session affinity (the hash ignored the ports).
    pub const AFFINITY: u8 = 4;
    /// Second chance: this node's conntrack was asked (its answer: [`CONNTRACK_HIT`]).
    pub const CONNTRACK_ASKED: u8 = 8;
    /// Second chance: this node's conntrack knew the flow (kept here, not handed on).
    pub const CONNTRACK_HIT: u8 = 16;
    /// A peer's frame (balanced there, the first hop) that this node, its pick, checked for
    /// second chance.
    pub const FROM_PEER: u8 = 32;
    /// A frame another node handed on to this one (second chance, from that node's handed-on
    /// MAC): passed to this node's stack, never handed on again.
    pub const HANDED_ON: u8 = 64;
    /// A peer's first-hop frame whose sender's table picked this node while this node's picks
    /// another (one agent applied a change before the other): conntrack asked, a miss handed
    /// on to this node's own pick.
    pub const TABLES_DISAGREE: u8 = 128;
}
