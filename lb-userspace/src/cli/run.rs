//! `sluice run` (the file-config loop: SIGHUP reloads) and `sluice attach` (pinned, then
//! exit), with the interface arguments they and `agent` share; `detach` and `xdp-pass`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use lb_userspace::{
    config,
    dataplane::{self, PASS_PROGRAM, PinLayout},
    health::metrics::HealthMetrics,
    model::Desired,
    net::{Interface, NextHopRefresh},
    observe::metrics,
    reconcile::{
        Unreachable,
        driver::{ReconcileMetrics, Reconciler},
    },
};
use log::{error, info, warn};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};

use super::require_root;

/// Where to attach: what `run`, `attach` and `agent` all take.
#[derive(clap::Args)]
pub(crate) struct IfaceArgs {
    /// The interface to attach to, or `auto`: the agent takes the one that carries the Node's
    /// InternalIP (`run` and `attach`: the default route's); a Node annotated
    /// `sluice.io/iface=NAME` uses NAME whatever this says.
    #[arg(long)]
    pub(crate) iface: String,
    /// Use generic (skb) XDP when the driver has no native XDP: slower, but works anywhere.
    #[arg(long)]
    pub(crate) generic: bool,
}

/// What `run` and `attach` both take.
#[derive(clap::Args)]
pub(crate) struct AttachArgs {
    #[arg(long)]
    pub(crate) config: PathBuf,
    #[command(flatten)]
    pub(crate) at: IfaceArgs,
}

/// Validates everything a user gave before any BPF object is touched.
fn prepare(config: &Path, iface: &str) -> anyhow::Result<(Desired, Interface)> {
    let desired = config::load(config)?;
    require_root()?;
    let iface = open_iface(iface)?;
    Ok((desired, iface))
}

/// How often `run` looks at pending signals.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

pub(crate) fn run(
    pin_root: &Path,
    args: &AttachArgs,
    metrics_addr: SocketAddr,
) -> anyhow::Result<()> {
    let (config, generic) = (args.config.as_path(), args.at.generic);
    let (desired, iface) = prepare(config, &args.at.iface)?;
    let pins = PinLayout::new(pin_root, &iface.name);
    // Signals are caught before anything is attached, so no signal can leave state behind.
    let mut signals =
        Signals::new([SIGHUP, SIGINT, SIGTERM]).context("installing signal handlers")?;
    let health_metrics = HealthMetrics::default();
    let control = ReconcileMetrics::default();
    let instruments = metrics::Instruments::default()
        .with({
            let c = control.clone();
            move |r| c.register(r)
        })
        .with({
            let h = health_metrics.clone();
            move |r| h.register(r)
        });
    let metrics = metrics::serve(
        metrics_addr,
        &pins,
        instruments,
        vec![health_metrics.backends_route()],
    )?;
    // Probes only when some VIP asks for them (`health_check:`).
    let checks = lb_userspace::health::StaticChecks::start(Some(health_metrics))?;
    let mut reconciler = Reconciler::new(
        iface.clone(),
        pins.clone(),
        generic,
        Unreachable::Fail,
        control,
    );
    let summary = reconciler.apply(&checks.overlay(&desired))?;
    info!("{}: {summary}", config.display());
    info!(
        "balancing on {} ({} mode), {} VIPs; SIGHUP reloads {}",
        iface.name,
        if generic { "generic" } else { "native" },
        desired.vips.len(),
        config.display()
    );
    let mut flow_table_size = desired.settings.connection_table_size();
    let mut running = desired;
    let mut refresh = NextHopRefresh::default();
    'serve: loop {
        for signal in signals.pending() {
            if signal != SIGHUP {
                info!("signal {signal}: detaching from {}", iface.name);
                break 'serve;
            }
            match config::load(config) {
                Err(e) => error!("reload refused, keeping the running config: {e}"),
                Ok(new) => {
                    // The flow state decides it too (second chance keeps the smallest).
                    let wanted = new.settings.connection_table_size();
                    if wanted != flow_table_size {
                        warn!(
                            "the connection table's size {flow_table_size} -> {wanted} takes effect at the next start (its entries are carried over)"
                        );
                        flow_table_size = wanted;
                    }
                    match reconciler.apply(&checks.overlay(&new)) {
                        Ok(s) => info!("reloaded {}: {s}", config.display()),
                        Err(e) => error!("reload of {} failed: {e:#}", config.display()),
                    }
                    running = new;
                }
            }
        }
        if checks.take_changed() {
            match reconciler.apply(&checks.overlay(&running)) {
                Ok(s) if !s.is_empty() => info!("health checks changed the maps: {s}"),
                Ok(_) => {}
                Err(e) => warn!("applying a health change failed (retrying on the next): {e:#}"),
            }
        }
        // Next hops move under the same model: resolved again now and then.
        if refresh.due() {
            match reconciler.refresh(&checks.overlay(&running)) {
                Ok(s) if !s.is_empty() => info!("next hops refreshed: {s}"),
                Ok(_) => {}
                Err(e) => warn!("refreshing next hops failed (keeping the old ones): {e:#}"),
            }
        }
        thread::sleep(SIGNAL_POLL);
    }
    drop(metrics);
    reconciler.release();
    dataplane::detach_pinned(&pins)
}

pub(crate) fn attach(
    pin_root: &Path,
    config: &Path,
    iface_name: &str,
    generic: bool,
) -> anyhow::Result<()> {
    let (desired, iface) = prepare(config, iface_name)?;
    let pins = PinLayout::new(pin_root, &iface.name);
    Reconciler::new(
        iface,
        pins,
        generic,
        Unreachable::Fail,
        ReconcileMetrics::default(),
    )
    .apply(&desired)?;
    Ok(())
}

pub(crate) fn xdp_pass(pin_root: &Path, iface_name: &str, detach: bool) -> anyhow::Result<()> {
    require_root()?;
    let pins = PinLayout::new(pin_root, iface_name);
    if detach {
        return dataplane::detach_pinned(&pins);
    }
    let iface = open_iface(iface_name)?;
    pins.prepare()?;
    // A minimal connection table: this object only lends its pass program.
    let mut ebpf = dataplane::load(None, lb_common::MIN_FLOW_TABLE_SIZE)?;
    let link = dataplane::attach(&mut ebpf, PASS_PROGRAM, &iface, false)?;
    link.pin(pins.link())
        .map_err(|e| anyhow!("pinning the XDP link at {}: {e}", pins.link().display()))?;
    info!("XDP_PASS program attached to {}", iface.name);
    Ok(())
}

/// `sluice detach`.
pub(crate) fn detach(pin_root: &Path, iface: &str) -> anyhow::Result<()> {
    require_root()?;
    dataplane::detach_pinned(&PinLayout::new(pin_root, iface))?;
    info!("detached sluice from {iface}");
    Ok(())
}

/// `--iface` of `run` and `attach`: a name, or `auto` (the default route's interface: no Node
/// to ask).
fn open_iface(flag: &str) -> anyhow::Result<Interface> {
    let facts = lb_userspace::net::choose::facts(None, Vec::new())?;
    let (iface, choice) = lb_userspace::net::choose::open(flag, &facts)?;
    if flag != iface.name {
        log::info!("attaching to {}: {}", iface.name, choice.why);
    }
    Ok(iface)
}
