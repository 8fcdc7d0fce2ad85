//! The backend side of `mode: ipip`: attach the decapsulator and keep its two address sets
//! (allowed load-balancer source prefixes, this node's own addresses) in step.

use std::collections::BTreeSet;

use anyhow::{Context as _, anyhow, bail};
use aya::maps::{MapError, lpm_trie::Key as LpmKey};
use lb_common::{DECAP_PROGRAM, DecapCounter, FAMILY_V4, FAMILY_V6, MAX_DECAP_ADDRS, ScopedAddr};
use log::info;
use serde_json::json;

use crate::{
    dataplane::{self, DecapMaps, DecapSets, PinLayout, addr_bytes, scoped_prefix},
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
        sync(&mut maps.sets, allow, &local)?;
        info!("updated the decapsulator on {}", iface.name);
        return Ok(());
    }
    pins.prepare()?;
    let mut ebpf = dataplane::load_decap(Some(pins))?;
    let mut maps = DecapMaps::from_ebpf(&mut ebpf)?;
    sync(&mut maps.sets, allow, &local)?;
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

fn family(net: &IpNet) -> u32 {
    u32::from(if net.addr().is_ipv4() {
        FAMILY_V4
    } else {
        FAMILY_V6
    })
}

/// Brings the two sets to `allow` and `local`: new entries first, then the stale ones go.
pub fn sync(
    maps: &mut DecapSets,
    allow: &[IpNet],
    local: &[std::net::IpAddr],
) -> anyhow::Result<()> {
    let want_sources: BTreeSet<(u32, ScopedAddr)> = allow
        .iter()
        .map(|net| {
            let key = scoped_prefix(family(net), net);
            (key.prefix_len(), key.data())
        })
        .collect();
    let mut have_sources = BTreeSet::new();
    for key in maps.sources.keys() {
        let key = key.context("reading DECAP_SOURCES")?;
        have_sources.insert((key.prefix_len(), key.data()));
    }
    let want_local: BTreeSet<ScopedAddr> = local
        .iter()
        .map(|addr| ScopedAddr {
            scope_be: family(&IpNet::from(*addr)).to_be(),
            addr: addr_bytes(*addr),
        })
        .collect();
    let mut have_local = BTreeSet::new();
    for key in maps.local.keys() {
        have_local.insert(key.context("reading DECAP_LOCAL")?);
    }
    for (len, data) in want_sources.difference(&have_sources) {
        maps.sources
            .insert(&LpmKey::new(*len, *data), &1, 0)
            .context("writing DECAP_SOURCES")?;
    }
    for key in want_local.difference(&have_local) {
        maps.local
            .insert(key, &1, 0)
            .context("writing DECAP_LOCAL")?;
    }
    for (len, data) in have_sources.difference(&want_sources) {
        match maps.sources.remove(&LpmKey::new(*len, *data)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing from DECAP_SOURCES"),
        }
    }
    for key in have_local.difference(&want_local) {
        match maps.local.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("removing from DECAP_LOCAL"),
        }
    }
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
