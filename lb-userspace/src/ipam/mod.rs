//! IP address management: the addresses sluice owns (pools) and which Service holds which.
//! Pure (no I/O, no Kubernetes types): `k8s::pools` turns the API's objects into its inputs,
//! and the allocating agent writes its answer into the Services' status.
//!
//! Without any pool, sluice owns no address: it serves what another controller (MetalLB's)
//! wrote and announces nothing of its own choosing (see `k8s::desired`).

mod allocate;
mod pools;

pub use allocate::{Allocation, Claim, Family, Notice, PortProto, allocate};
pub use pools::{AddrRange, Pool, PoolSpec, Pools};

#[cfg(test)]
mod tests;
