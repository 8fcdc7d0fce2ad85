//! The lab's addressing accessors that the benchmark (`cargo xtask bench`) builds frames with:
//! they must name what the kernel really has. Needs root.

use anyhow::{Context, Result, ensure};
use sluice_tests::{Lab, LabConfig, lab::NS_IFACE, require_root};

/// The MAC address and peer of `dev` in namespace `ns`, from `ip -j link show`.
fn link(lab: &Lab, ns: &str, dev: &str) -> Result<serde_json::Value> {
    let out = lab.exec_ok(ns, &["ip", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j: not JSON")?;
    Ok(v[0].clone())
}

#[test]
fn lab_macs_and_client_peer_are_the_kernels() -> Result<()> {
    require_root();
    let lab = Lab::build(LabConfig {
        backends: 1,
        udp: false,
    })?;
    let client = link(&lab, lab.client_ns(), NS_IFACE)?;
    ensure!(
        client["address"] == lab.client_mac().as_str(),
        "client MAC: lab says {}, kernel {}",
        lab.client_mac(),
        client["address"]
    );
    let lb = link(&lab, lab.lb_ns(), NS_IFACE)?;
    ensure!(
        lb["address"] == lab.lb_mac().as_str(),
        "lb MAC: lab says {}, kernel {}",
        lab.lb_mac(),
        lb["address"]
    );
    // The client's peer is the switch port whose other end is the client's eth0.
    let peer = link(&lab, lab.switch_ns(), lab.client_peer_iface())?;
    ensure!(
        peer["master"] == "br0" && peer["ifindex"] == client["link_index"],
        "{} is not the client's peer on br0: {peer} / {client}",
        lab.client_peer_iface()
    );
    Ok(())
}
