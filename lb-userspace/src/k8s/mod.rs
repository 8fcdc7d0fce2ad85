//! Kubernetes -> the desired model (no BPF here): `desired` is the pure mapping from Services,
//! EndpointSlices and Nodes to VIPs and backend nodes, `options` parses what Services and Nodes
//! ask for by annotation and spec (the health-check annotation included), `agent` runs the
//! watchers and the reconcile loop, `announce` elects one node per VIP address by Lease
//! (`--announce`; it writes only through dataplane's ANNOUNCE handle), `bgp_select` says what
//! this node announces over BGP (`--bgp`) and `bgp_peers` to which routers (the BGPPeers),
//! `crd_watch` watches the optional resources (IPAddressPools, BGPPeers) once they are
//! installed, `overlay` lays health checks and the nodes' load over the built model,
//! `watch_metrics` are the watches' instruments and `watch_probe` tells them when a watch is up.

pub mod agent;
pub mod allocator;
pub mod announce;
pub mod bgp_peers;
pub mod bgp_select;
pub mod crd_watch;
pub mod desired;
mod lease;
pub mod options;
pub mod overlay;
pub mod pools;
pub mod watch_metrics;
mod watch_probe;

pub use agent::{AgentConfig, ApplyFn, Pass, run};
pub use announce::AnnounceConfig;
pub use desired::{Built, build, changes};
pub use options::VipOptions;
