//! Names of the maps and programs in the object files (as the loader finds them and as
//! pinned in bpffs).

/// Names of the maps, as the loader and `sluice inspect` look them up (and as pinned in bpffs).
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const BACKENDS: &str = "BACKENDS";
    /// VIP id -> its key and table (what an established packet checks).
    pub const VIP_BY_ID: &str = "VIP_BY_ID";
    /// Table id -> its description and members' bits; (table, backend) -> weight.
    pub const TABLES: &str = "TABLES";
    pub const TABLE_MEMBERS: &str = "TABLE_MEMBERS";
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
    /// The second chance's per-CPU scratch for its conntrack lookups.
    pub const CT_SCRATCH: &str = "CT_SCRATCH";
    /// Second chance over several changes: flow -> the node this node handed it on to.
    pub const HANDED_FLOWS: &str = "HANDED_FLOWS";
    pub const ALL: [&str; 27] = [
        FLOWS6,
        VIP_FILTER,
        VIP_ADDRS,
        SOURCE_RANGES,
        VIPS,
        MAGLEV,
        BACKENDS,
        VIP_BY_ID,
        TABLES,
        TABLE_MEMBERS,
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
        CT_SCRATCH,
        HANDED_FLOWS,
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
/// Name of the balancer object's conntrack probe (never attached: run with
/// BPF_PROG_TEST_RUN on a frame that is a [`crate::FlowKey`]; `flow_state: auto`).
pub const CONNTRACK_PROBE_PROGRAM: &str = "sluice_conntrack_probe";
/// Name of the backend-side decapsulator's XDP entry point (in its own object).
pub const DECAP_PROGRAM: &str = "sluice_decap";
