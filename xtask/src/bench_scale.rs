//! The scale section of `cargo xtask bench` (issue 27): `sluice_tests::scale`'s run with the
//! release agent, at the full size by default (1,000 nodes x 10,000 Service ports).

use anyhow::Result;
use sluice_tests::require_root;
use sluice_tests::scale::{self, Size};

pub fn run(size: Size) -> Result<()> {
    require_root();
    crate::bench_agent::use_release_sluice()?;
    println!(
        "\nscale: real kube-apiserver 1.20 + etcd in the lab's lb namespace, {} Node objects, {} Services x {} ports, one agent (release build)",
        size.nodes,
        size.services,
        scale::PORTS.len()
    );
    let figures = scale::run(size)?;
    for line in figures.lines() {
        println!("{line}");
    }
    Ok(())
}
