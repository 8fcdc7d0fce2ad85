//! Dataplane-wide settings and the flood guard's per-CPU rate windows.

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
    /// One of [`flow_state`]: how a node keeps a flow on its backend through table changes.
    pub flow_state: u32,
}

/// [`Settings::flow_state`].
pub mod flow_state {
    /// Every new flow is recorded in the connection table (`FLOWS`), which then decides.
    pub const TABLE: u32 = 0;
    /// No flow is recorded: a node picks by its VIP's current table, and a non-SYN picked for
    /// this node whose pick changed with the table is kept here when this node's conntrack
    /// knows it, else handed on to the previous table's pick (once).
    pub const SECOND_CHANCE: u32 = 1;
}

/// One CPU's flood-guard window (`NEW_FLOWS`): new flows seen since `start_ns`
/// (bpf_ktime_get_ns, CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub start_ns: u64,
    pub flows: u64,
}
