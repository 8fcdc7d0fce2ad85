//! Code shared by sluice's two XDP objects: the balancer (`main.rs`) and the backend-side
//! decapsulator (`decap.rs`). Built only for the BPF target.
#![no_std]

pub mod csum;
pub mod ndp;
pub mod packet;
pub mod unwrap;
