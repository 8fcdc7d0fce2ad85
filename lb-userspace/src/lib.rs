//! sluice's control plane. Data flows one way:
//! config / Kubernetes -> `model` (desired state) -> `reconcile` -> `dataplane` (BPF maps) -> XDP.
//! Only `dataplane` touches aya.

pub mod bgp;
pub mod config;
pub mod dataplane;
pub mod decap;
pub mod health;
pub mod http;
pub mod k8s;
pub mod maglev;
pub mod memory;
pub mod model;
pub mod net;
pub mod observe;
pub mod reconcile;
pub mod resolve;
