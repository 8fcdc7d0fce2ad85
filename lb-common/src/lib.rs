//! Everything the XDP program and the control plane must agree on: map names, keys, values,
//! limits and the flow hash. `#![no_std]` so the eBPF crate can use it; with the `user`
//! feature the types also implement `aya::Pod` for user space.
//!
//! One namespace (`lb_common::VipKey`, `lb_common::map_names`, ...): the modules split the
//! file by topic for reading, and everything public is re-exported here.
#![no_std]

mod counters;
mod flow;
mod layout;
mod limits;
mod maglev;
mod names;
mod net;
mod peer;
#[cfg(feature = "user")]
mod pod;
mod settings;
mod trace;
mod vip;

pub use counters::*;
pub use flow::*;
pub use layout::*;
pub use limits::*;
pub use maglev::*;
pub use names::*;
pub use net::*;
pub use peer::*;
pub use settings::*;
pub use trace::*;
pub use vip::*;
