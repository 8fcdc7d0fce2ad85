//! sluice's control plane. Data flows one way:
//! config / Kubernetes -> `model` (desired state) -> `reconcile` -> `dataplane` (BPF maps) -> XDP,
//! and `observe` reads the maps back (inspect, explain, trace, metrics). Only `dataplane` touches
//! aya.
//!
//! The modules form layers, bottom first; a module imports only from lower layers, so there is
//! no import cycle (`tests/layers.rs` checks it):
//!
//! 1. `model` (the vocabulary), `maglev` (the table builder), `http` (server and client),
//!    `ipam` (address pools), `node_state` (what a Node object says)
//! 2. `net` (rtnetlink), `memory` (a model's kernel memory)
//! 3. `dataplane` (the maps), `resolve` (where backends are)
//! 4. `reconcile` (model -> maps, and its `driver`), `health` (checks, load, the overlay),
//!    `bgp` (the speaker, no Kubernetes), `config` (file -> model), `decap`
//! 5. `observe` (the read side)
//! 6. `k8s` (the API source and the agent)

pub mod bgp;
pub mod config;
pub mod dataplane;
pub mod decap;
pub mod health;
pub mod http;
pub mod ipam;
pub mod k8s;
pub mod maglev;
pub mod memory;
pub mod model;
pub mod net;
pub mod node_state;
pub mod observe;
pub mod reconcile;
pub mod resolve;
