//! Kubernetes -> the desired model (no BPF here): `desired` is the pure mapping from Services,
//! EndpointSlices and Nodes to VIPs and backend nodes, `options` parses what Services and Nodes
//! ask for by annotation and spec, `agent` runs the watchers and the reconcile loop, and
//! `watch_probe` tells the agent's metrics when a watch is up.

pub mod agent;
pub mod desired;
pub mod options;
mod watch_probe;

pub use agent::{AgentConfig, ApplyFn, run};
pub use desired::{Built, build, changes};
pub use options::VipOptions;
