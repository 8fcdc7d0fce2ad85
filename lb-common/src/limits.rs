//! How much one load balancer holds: the sizes of its maps.

/// Most VIPs (address, port, protocol) one load balancer serves (Cilium's default too). A VIP
/// id fits the 16 bits a connection-table entry keeps for it.
pub const MAX_VIPS: u32 = 65536;
/// Most distinct backends (a node's address and how it is reached), shared by every VIP that
/// has them: a 1,000-node cluster's `externalTrafficPolicy: Cluster` VIPs all use the same
/// 1,000. A multiple of 64 (tables keep one membership bit per backend).
pub const MAX_BACKENDS: u32 = 8192;
/// Most distinct Maglev tables. A table is addressed by its content (members, weights,
/// drains, size): VIPs with the same inputs share one, so this bounds distinct backend sets,
/// not VIPs.
pub const MAX_TABLES: u32 = 4096;
/// Most (table, backend) memberships over all tables: what `TABLE_MEMBERS` describes for the
/// readers (allocated as used).
pub const MAX_TABLE_MEMBERS: u32 = 1 << 18;
/// Most client prefixes over all VIPs' source ranges.
pub const MAX_SOURCE_RANGES: u32 = 16384;
/// Most load-balancer source prefixes and local addresses a decapsulator accepts.
pub const MAX_DECAP_ADDRS: u32 = 256;
/// Other sluice nodes on one segment (`PEERS`).
pub const MAX_PEERS: u32 = 1024;
/// Most interfaces a backend can be reached through by `XDP_REDIRECT`.
pub const MAX_TX_PORTS: u32 = 64;
/// Records of the flows a node handed on (`HANDED_FLOWS`, an LRU hash, second chance over
/// several changes): about 1/N of the flows a change moves, each recorded once, at the node
/// that handed it on. ~100 bytes an entry (6.5 MB), allocated in every mode.
pub const HANDED_FLOWS_SIZE: u32 = 65536;
