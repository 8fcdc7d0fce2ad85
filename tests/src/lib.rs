//! sluice's network-namespace lab and the helpers of its integration tests.
//!
//! [`lab::Lab`] builds a client, a load balancer and backends on one L2 segment, in namespaces of
//! their own, and tears it all down on drop. The integration tests in `tests/` and the demo
//! (`cargo xtask demo`) use it. Everything here needs root; see [`require_root`].

pub mod agents_lab;
pub mod bgp_lab;
pub mod cluster;
pub mod cmd;
pub mod conn;
pub mod image;
pub mod kube;
pub mod lab;
pub mod netns;
pub mod nft;
pub mod pktgen;
pub mod routed_lab;
pub mod runs;
pub mod scale;
pub mod servers;

pub use conn::{LongConn, LongConnReport};
pub use lab::{
    BackendSpec, CurlResult, HTTP_PORT, Lab, LabConfig, SluiceProcess, UDP_FIRST_PORT,
    require_root, sluice_binary,
};
pub use nft::VipCounters;
pub use runs::timing_lock;
pub use servers::{ECHO_PORT, UDP_PORT};
pub mod fixtures;
pub mod fuzz;
