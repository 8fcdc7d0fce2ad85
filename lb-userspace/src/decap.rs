//! The backend side of `mode: ipip`: attach the decapsulator and keep its two address sets
//! (allowed load-balancer source prefixes, this node's own addresses) in step.

use anyhow::{Context as _, anyhow, bail};
use lb_common::{DECAP_PROGRAM, DecapCounter, MAX_DECAP_ADDRS};
use log::info;
use serde_json::json;

use crate::{
    dataplane::{self, DecapMaps, PinLayout},
    inspect::{View, render_table},
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
        maps.sets.sync(allow, &local)?;
        info!("updated the decapsulator on {}", iface.name);
        return Ok(());
    }
    pins.prepare()?;
    let mut ebpf = dataplane::load_decap(Some(pins))?;
    let mut maps = DecapMaps::from_ebpf(&mut ebpf)?;
    maps.sets.sync(allow, &local)?;
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

/// The decapsulator's counters.
pub fn view(maps: &DecapMaps) -> anyhow::Result<View> {
    let mut counters = serde_json::Map::new();
    let mut rows = Vec::new();
    for counter in DecapCounter::ALL {
        let total: u64 = maps
            .stats
            .get(&(counter as u32), 0)
            .context("reading DECAP_STATS")?
            .iter()
            .sum();
        counters.insert(counter.name().to_owned(), json!(total));
        rows.push(vec![counter.name().to_owned(), total.to_string()]);
    }
    Ok(View {
        json: json!({ "counters": counters }),
        table: render_table(&["COUNTER", "PACKETS"], rows.into_iter()),
    })
}
