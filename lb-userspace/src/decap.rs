//! The backend side of `mode: ipip`: attach the decapsulator and keep its two address sets
//! (allowed load-balancer source prefixes, this node's own addresses) in step. Its counters
//! are read by `observe::inspect::decap`.

use anyhow::{anyhow, bail};
use lb_common::{DECAP_PROGRAM, MAX_DECAP_ADDRS};
use log::info;

use crate::{
    dataplane::{self, DecapMaps, PinLayout},
    model::IpNet,
    net::{Interface, local_addresses},
};

/// Attaches the decapsulator to `iface` (pinned), or updates the running one's sets.
pub fn attach(
    pins: &PinLayout,
    iface: &Interface,
    allow: &[IpNet],
    generic: bool,
) -> anyhow::Result<()> {
    for net in allow {
        if net.trunc() != *net {
            bail!(
                "--allow {net}: host bits are set; write {} (a load balancer's encap_source prefix or its address)",
                net.trunc()
            );
        }
    }
    if allow.is_empty() {
        bail!(
            "give at least one --allow PREFIX: the load balancers this node accepts packets from"
        );
    }
    let local = local_addresses()?;
    if local.len() + allow.len() > MAX_DECAP_ADDRS as usize {
        bail!("at most {MAX_DECAP_ADDRS} allowed prefixes and local addresses");
    }
    if pins.has_link() {
        let mut maps = DecapMaps::from_pins(pins)?;
        maps.sync(allow, &local)?;
        info!("updated the decapsulator on {}", iface.name);
        return Ok(());
    }
    pins.prepare()?;
    let mut ebpf = dataplane::load_decap(Some(pins))?;
    let mut maps = DecapMaps::from_ebpf(&mut ebpf)?;
    maps.sync(allow, &local)?;
    let link = dataplane::attach(&mut ebpf, DECAP_PROGRAM, iface, generic)?;
    link.pin(pins.link())
        .map_err(|e| anyhow!("pinning the XDP link at {}: {e}", pins.link().display()))?;
    info!(
        "decapsulating on {} for {} local addresses, from {}",
        iface.name,
        local.len(),
        allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
