//! The commands that look at an attached balancer (`inspect`, `trace`, `explain`) and the
//! decapsulator's `decap`.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::Subcommand;
use lb_userspace::{
    dataplane::{self, DecapMaps, Maps, PinLayout},
    decap,
    model::{IpNet, VipAddr},
    net::Interface,
    observe::{
        explain, inspect, metrics,
        read::{FlowFilter, agent_health},
        render::Format,
        trace,
    },
};
use log::info;

use super::{parse_interval, require_root};

#[derive(Subcommand)]
pub(crate) enum InspectWhat {
    /// VIPs with their backend counts and traffic.
    Vips,
    /// Backends of every VIP: state, weight, MAC, traffic; with the health and load columns
    /// (base weight, check, health, load, multiplier, why) of the agent or `run` serving
    /// /metrics at --agent.
    Backends {
        /// Where the agent (or `sluice run`) serves /metrics; "off" for the maps alone.
        #[arg(long, default_value = metrics::DEFAULT_METRICS_ADDR)]
        agent: String,
    },
    /// How a VIP's Maglev table divides its slots, e.g. `maglev 10.0.0.10:80/tcp`.
    Maglev { vip: String },
    /// Connection-table entries, optionally only some.
    Flows {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only flows of this VIP, e.g. `10.0.0.10:80/tcp`.
        #[arg(long)]
        vip: Option<VipAddr>,
        /// Only flows pinned to this backend address.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// Only flows from clients in this prefix, e.g. `192.0.2.0/24`.
        #[arg(long, value_name = "PREFIX")]
        client: Option<IpNet>,
    },
    /// Global, per-VIP and per-backend counters.
    Stats {
        /// Refresh in place with rates per second (JSON: one object per line) until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Time between refreshes of --watch, e.g. 500ms, 1s, 2s.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: Duration,
        /// Stop --watch after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// The decapsulator's counters and configuration (`sluice decap`).
    Decap,
    /// The addresses this node answers ARP for (`sluice agent --announce`).
    Announce,
    /// The agent's BGP sessions (`sluice agent --bgp`): state, uptime, prefixes, last error,
    /// BFD and the peers' settings, read from the agent's health address (no root needed).
    Bgp {
        /// Where the agent serves its health endpoints (its --health-addr).
        #[arg(long, default_value = super::DEFAULT_HEALTH_ADDR)]
        agent: String,
    },
}

/// `sluice explain`: the arguments first (a typo needs no root), then the pins.
pub(crate) fn explain(
    pin_root: &Path,
    client: &str,
    vip: &str,
    iface: Option<String>,
    format: Format,
    agent: &str,
) -> anyhow::Result<()> {
    let flow = explain::Flow::parse(client, vip)?;
    require_root()?;
    let iface = attached_iface(pin_root, iface, |i| PinLayout::new(pin_root, i))?;
    let pins = PinLayout::new(pin_root, &iface);
    pins.check_layout()?;
    let maps = Maps::from_pins(&pins)?;
    let mut inputs = explain::Inputs::read(&maps, &flow)?;
    // By name in this network namespace (the node's, in the agent's hostNetwork pod); not
    // found: the explanation says XDP_TX or XDP_REDIRECT and why.
    inputs.ingress_ifindex = Interface::by_name(&iface).ok().map(|i| i.index);
    inputs.health = agent_health(agent)?;
    let explanation = explain::explain(&flow, &inputs)?;
    let text = match format {
        Format::Json => {
            serde_json::to_string_pretty(&explanation).context("writing the explanation as JSON")?
        }
        Format::Table => explain::render_text(&explanation),
    };
    println!("{}", text.trim_end());
    Ok(())
}

/// `sluice inspect stats --watch`: rates over each interval, redrawn in place (a table) or one
/// JSON object per line.
fn watch_stats(
    maps: &Maps,
    format: Format,
    interval: Duration,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let mut before = inspect::stats(maps)?.json;
    let mut taken = Instant::now();
    for _ in 0..count.unwrap_or(u64::MAX) {
        thread::sleep(interval);
        let after = inspect::stats(maps)?.json;
        let now = Instant::now();
        let view = inspect::stats_rates(&before, &after, (now - taken).as_secs_f64());
        match format {
            Format::Json => println!("{}", view.json),
            // Home the cursor and clear the screen: the view replaces the last one.
            Format::Table => println!("\x1b[H\x1b[2J{}", view.table.trim_end()),
        }
        std::io::Write::flush(&mut std::io::stdout()).context("writing to stdout")?;
        (before, taken) = (after, now);
    }
    Ok(())
}

/// The interface to inspect: the given one, or the only one with state under `pin_root`.
fn attached_iface(
    pin_root: &Path,
    iface: Option<String>,
    layout: impl Fn(&str) -> PinLayout,
) -> anyhow::Result<String> {
    if let Some(iface) = iface {
        return Ok(iface);
    }
    let attached: Vec<String> = std::fs::read_dir(pin_root)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| layout(&e.file_name().to_string_lossy()).has_maps())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    match attached.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "sluice is not attached anywhere under {} (start it with `sluice run` or `sluice attach`, or pass the same --pin-dir)",
            pin_root.display()
        ),
        many => bail!(
            "sluice is attached to several interfaces ({}): choose one with --iface",
            many.join(", ")
        ),
    }
}

/// `sluice inspect`.
pub(crate) fn inspect(
    pin_root: &Path,
    iface: Option<String>,
    format: Format,
    what: InspectWhat,
) -> anyhow::Result<()> {
    if let InspectWhat::Bgp { agent } = &what {
        // In the agent's memory, not in maps: no root, no pins.
        println!(
            "{}",
            lb_userspace::observe::bgp::fetch(agent)?
                .render(format)
                .trim_end()
        );
        return Ok(());
    }
    require_root()?;
    if let InspectWhat::Decap = what {
        let decap_root = pin_root.join("decap");
        let iface = attached_iface(&decap_root, iface, |i| PinLayout::decap(pin_root, i))?;
        let maps = DecapMaps::from_pins(&PinLayout::decap(pin_root, &iface))?;
        println!("{}", inspect::decap(&maps)?.render(format).trim_end());
        return Ok(());
    }
    let iface = attached_iface(pin_root, iface, |i| PinLayout::new(pin_root, i))?;
    let pins = PinLayout::new(pin_root, &iface);
    let maps = Maps::from_pins(&pins)?;
    let view = match what {
        InspectWhat::Vips => inspect::vips(&maps)?,
        InspectWhat::Backends { agent } => inspect::backends_with_health(&maps, agent)?,
        InspectWhat::Maglev { vip } => {
            let vip: VipAddr = vip.parse().map_err(|e| anyhow!("{e}"))?;
            inspect::maglev(&maps, &vip)?
        }
        InspectWhat::Flows {
            limit,
            vip,
            backend,
            client,
        } => {
            let filter = FlowFilter {
                vip,
                backend,
                client,
            };
            inspect::flows(&maps, limit, &filter)?
        }
        InspectWhat::Stats {
            watch: true,
            interval,
            count,
        } => return watch_stats(&maps, format, interval, count),
        InspectWhat::Stats { .. } => inspect::stats(&maps)?,
        InspectWhat::Announce => inspect::announce(&maps)?,
        InspectWhat::Decap | InspectWhat::Bgp { .. } => unreachable!("handled above"),
    };
    println!("{}", view.render(format).trim_end());
    Ok(())
}

/// `sluice decap`: attach the decapsulator, or detach it.
pub(crate) fn decap(
    pin_root: &Path,
    iface: &str,
    allow: &[IpNet],
    generic: bool,
    detach: bool,
) -> anyhow::Result<()> {
    require_root()?;
    let pins = PinLayout::decap(pin_root, iface);
    if detach {
        dataplane::detach_pinned(&pins)?;
        info!("detached the decapsulator from {iface}");
        return Ok(());
    }
    decap::attach(&pins, &Interface::by_name(iface)?, allow, generic)
}

/// `sluice trace`.
pub(crate) fn trace(
    pin_root: &Path,
    iface: Option<String>,
    args: &trace::TraceArgs,
    format: Format,
) -> anyhow::Result<()> {
    require_root()?;
    let iface = attached_iface(pin_root, iface, |i| PinLayout::new(pin_root, i))?;
    trace::run(&iface, &PinLayout::new(pin_root, &iface), args, format)
}
