//! How much one load balancer holds: the sizes of its maps.

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
