//! Issue 27's scale run (`sluice_tests::scale`) at a size that keeps `./x test` short: Node
//! objects, Services of two ports under `externalTrafficPolicy: Cluster` and their slices on
//! the real API server, one agent. It fails when the agent leaves anything out of the maps (a
//! VIP without all its nodes, or an item `/readyz` lists as left out for lack of room), or when
//! a slice change or a burst of NotReady nodes does not reach the maps within 30 s; it prints
//! the figures and asserts no timing (`cargo xtask bench --scale-only` gives the full size's figures).
//!
//! `SLUICE_SCALE=NODESxSERVICES` (e.g. `1000x5000`) runs another size. Needs root; run it
//! under the lab lock: `flock /tmp/sluice-lab.lock cargo test -p sluice-tests --test scale`.

use anyhow::{Context, Result};
use sluice_tests::require_root;
use sluice_tests::scale::{self, Size};

/// 100 nodes x 100 Service ports: 10,000 backends, which today's maps (16,384 backend slots)
/// hold; ~1 minute on the 2-core VM.
const DEFAULT: Size = Size {
    nodes: 100,
    services: 50,
    slice_changes: 20,
    node_burst: 20,
};

fn size() -> Result<Size> {
    let Ok(text) = std::env::var("SLUICE_SCALE") else {
        return Ok(DEFAULT);
    };
    let (nodes, services) = text
        .split_once('x')
        .context("SLUICE_SCALE: expected NODESxSERVICES, e.g. 1000x5000")?;
    let nodes: usize = nodes.trim().parse().context("SLUICE_SCALE: nodes")?;
    Ok(Size {
        nodes,
        services: services.trim().parse().context("SLUICE_SCALE: services")?,
        node_burst: DEFAULT.node_burst.min(nodes.saturating_sub(2)),
        ..DEFAULT
    })
}

#[test]
fn agent_syncs_every_node_of_every_service_port_and_follows_changes() -> Result<()> {
    require_root();
    let figures = scale::run(size()?)?;
    for line in figures.lines() {
        println!("{line}");
    }
    Ok(())
}
