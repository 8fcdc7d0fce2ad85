//! The observers: everything that reads the running balancer and shows it, none of which
//! changes it. One read layer ([`read`]: typed reads of the pinned maps and of the agent's
//! health overlay), one way to show ([`render`]), and the commands and endpoint built on them:
//! [`inspect`] (`sluice inspect`), [`explain`] (`sluice explain`: one flow's decision
//! replayed), [`trace`] (`sluice trace`: decisions live) and [`metrics`] (`/metrics`).
//!
//! Layering: observe reads `dataplane`, `model`, `health`'s rows and `reconcile`'s read-only
//! helpers; nothing below it imports it (only `main.rs`, `k8s` and the reconcile driver may).

pub mod bgp;
pub mod explain;
pub mod inspect;
pub mod metrics;
pub mod read;
pub mod render;
pub mod trace;
