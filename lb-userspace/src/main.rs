//! `sluice`: attach the XDP load balancer with a static config, and inspect its maps.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    config,
    dataplane::{self, DEFAULT_PIN_ROOT, Maps, PASS_PROGRAM, PinLayout},
    inspect::{self, Format},
    k8s,
    model::{Desired, Settings, VipAddr},
    net::Interface,
    reconcile,
};
use log::{error, info, warn};
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};

#[derive(Parser)]
#[command(name = "sluice", version, about = "XDP layer-4 load balancer")]
struct Cli {
    /// bpffs directory where sluice pins its maps and links (one subdirectory per interface).
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// Where to attach: what `run`, `attach` and `agent` all take.
#[derive(clap::Args)]
struct IfaceArgs {
    #[arg(long)]
    iface: String,
    /// Use generic (skb) XDP when the driver has no native XDP: slower, but works anywhere.
    #[arg(long)]
    generic: bool,
}

/// What `run` and `attach` both take.
#[derive(clap::Args)]
struct AttachArgs {
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    at: IfaceArgs,
}

/// What `agent` takes.
#[derive(clap::Args)]
struct AgentArgs {
    #[command(flatten)]
    at: IfaceArgs,
    /// kubeconfig of the API server; without it the in-cluster ServiceAccount is used.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (the DaemonSet passes spec.nodeName).
    #[arg(long)]
    node_name: Option<String>,
    /// Slots of every VIP's Maglev table (prime).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_SIZE)]
    maglev_table_size: u32,
    /// Entries of the connection table (applies when the maps are first created).
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_TABLE_SIZE)]
    flow_table_size: u32,
    /// Address of the health endpoints (GET /healthz, /readyz); "off" for none.
    #[arg(long, default_value = "127.0.0.1:9941")]
    health_addr: String,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to an interface and balance until SIGINT/SIGTERM; SIGHUP re-reads the config.
    Run(AttachArgs),
    /// Attach persistently (pinned link and maps) and exit; the program keeps forwarding.
    /// Run it again with a changed config to apply the difference.
    Attach(AttachArgs),
    /// Balance the Services of a Kubernetes cluster: watch Services, EndpointSlices and Nodes and
    /// keep the maps in step until SIGTERM. Attaches persistently (pinned, like `attach`), so a
    /// restarted or upgraded agent adopts the maps and no established flow is dropped.
    Agent(AgentArgs),
    /// Detach a persistent attachment and remove its pins.
    Detach {
        #[arg(long)]
        iface: String,
    },
    /// Show what the maps hold.
    Inspect {
        /// The attached interface (needed when several are attached).
        #[arg(long, global = true)]
        iface: Option<String>,
        #[arg(
            short = 'o',
            long = "output",
            value_enum,
            default_value = "table",
            global = true
        )]
        format: Format,
        #[command(subcommand)]
        what: InspectWhat,
    },
    /// Attach a program that only returns XDP_PASS (pinned). A veth delivers XDP_TX frames only
    /// when its peer has an XDP program: labs put this one there.
    XdpPass {
        #[arg(long)]
        iface: String,
        /// Remove it instead.
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Subcommand)]
enum InspectWhat {
    /// VIPs with their backend counts and traffic.
    Vips,
    /// Backends of every VIP: state, weight, MAC, traffic.
    Backends,
    /// How a VIP's Maglev table divides its slots, e.g. `maglev 10.0.0.10:80/tcp`.
    Maglev { vip: String },
    /// Connection-table entries.
    Flows {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Global, per-VIP and per-backend counters.
    Stats,
}

fn main() -> ExitCode {
    // kube's client logs every dropped connection at warn/error; the agent reports watch
    // failures itself, once per failure, with what it does about them.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,kube_client=off"),
    )
    .format_timestamp_millis()
    .init();
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and why, without a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => run(&cli.pin_dir, &a.config, &a.at.iface, a.at.generic),
        Command::Attach(a) => attach(&cli.pin_dir, &a.config, &a.at.iface, a.at.generic),
        Command::Agent(a) => agent(&cli.pin_dir, a),
        Command::Detach { iface } => {
            require_root()?;
            dataplane::detach_pinned(&PinLayout::new(&cli.pin_dir, &iface))?;
            info!("detached sluice from {iface}");
            Ok(())
        }
        Command::Inspect {
            iface,
            format,
            what,
        } => {
            require_root()?;
            let pins = PinLayout::new(&cli.pin_dir, &attached_iface(&cli.pin_dir, iface)?);
            let maps = Maps::from_pins(&pins)?;
            let view = match what {
                InspectWhat::Vips => inspect::vips(&maps)?,
                InspectWhat::Backends => inspect::backends(&maps)?,
                InspectWhat::Maglev { vip } => {
                    let vip: VipAddr = vip.parse().map_err(|e| anyhow!("{e}"))?;
                    inspect::maglev(&maps, &vip)?
                }
                InspectWhat::Flows { limit } => inspect::flows(&maps, limit)?,
                InspectWhat::Stats => inspect::stats(&maps)?,
            };
            println!("{}", view.render(format).trim_end());
            Ok(())
        }
        Command::XdpPass { iface, detach } => xdp_pass(&cli.pin_dir, &iface, detach),
    }
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "sluice needs root (CAP_BPF and CAP_NET_ADMIN) to load XDP programs and read their maps: run it with sudo"
        );
    }
    Ok(())
}

/// Validates everything a user gave before any BPF object is touched.
fn prepare(config: &Path, iface: &str) -> anyhow::Result<(Desired, Interface)> {
    let desired = config::load(config)?;
    require_root()?;
    let iface = Interface::by_name(iface)?;
    Ok((desired, iface))
}

fn load_fresh(pins: &PinLayout, desired: &Desired) -> anyhow::Result<(aya::Ebpf, Maps)> {
    pins.prepare()?;
    if pins.has_maps() {
        info!(
            "adopting the maps pinned in {} (their flows are kept)",
            pins.maps_dir().display()
        );
    }
    let mut ebpf = dataplane::load(Some(pins), desired.settings.flow_table_size)?;
    let maps = Maps::from_ebpf(&mut ebpf)?;
    Ok((ebpf, maps))
}

fn run(pin_root: &Path, config: &Path, iface_name: &str, generic: bool) -> anyhow::Result<()> {
    let (desired, iface) = prepare(config, iface_name)?;
    let pins = PinLayout::new(pin_root, &iface.name);
    if pins.has_link() {
        bail!(
            "sluice is attached to {0} persistently: update it with `sluice attach --config FILE --iface {0}`, or `sluice detach --iface {0}` first",
            iface.name
        );
    }
    // Signals are caught before anything is attached, so no signal can leave state behind.
    let mut signals =
        Signals::new([SIGHUP, SIGINT, SIGTERM]).context("installing signal handlers")?;
    let (mut ebpf, mut maps) = load_fresh(&pins, &desired)?;
    let summary = reconcile::reconcile(&mut maps, &iface, &desired)?;
    info!("{}: {summary}", config.display());
    let link = dataplane::attach(&mut ebpf, lb_common::BALANCER_PROGRAM, &iface, generic)?;
    info!(
        "balancing on {} ({} mode), {} VIPs; SIGHUP reloads {}",
        iface.name,
        if generic { "generic" } else { "native" },
        desired.vips.len(),
        config.display()
    );
    let mut flow_table_size = desired.settings.flow_table_size;
    for signal in signals.forever() {
        if signal != SIGHUP {
            info!("signal {signal}: detaching from {}", iface.name);
            break;
        }
        match config::load(config) {
            Err(e) => error!("reload refused, keeping the running config: {e}"),
            Ok(new) => {
                if new.settings.flow_table_size != flow_table_size {
                    warn!(
                        "flow_table_size {} -> {} takes effect only on restart",
                        flow_table_size, new.settings.flow_table_size
                    );
                    flow_table_size = new.settings.flow_table_size;
                }
                match reconcile::reconcile(&mut maps, &iface, &new) {
                    Ok(s) => info!("reloaded {}: {s}", config.display()),
                    Err(e) => error!("reload of {} failed: {e:#}", config.display()),
                }
            }
        }
    }
    drop(link);
    drop(maps);
    drop(ebpf);
    pins.remove()
}

fn attach(pin_root: &Path, config: &Path, iface_name: &str, generic: bool) -> anyhow::Result<()> {
    let (desired, iface) = prepare(config, iface_name)?;
    let pins = PinLayout::new(pin_root, &iface.name);
    attach_persistent(&pins, &iface, &desired, generic)?;
    Ok(())
}

/// Brings the persistent (pinned) attachment on `iface` to `desired`: adopts the one pinned there
/// (its maps and flows), or loads the program, fills its maps and attaches it with a pinned link.
/// The state outlives the process. Shared by `attach` and `agent`.
fn attach_persistent(
    pins: &PinLayout,
    iface: &Interface,
    desired: &Desired,
    generic: bool,
) -> anyhow::Result<Maps> {
    if pins.has_link() {
        let mut maps = Maps::from_pins(pins)?;
        let summary = reconcile::reconcile(&mut maps, iface, desired)?;
        info!("updated {}: {summary}", iface.name);
        return Ok(maps);
    }
    let (mut ebpf, mut maps) = load_fresh(pins, desired)?;
    let summary = reconcile::reconcile(&mut maps, iface, desired)?;
    let link = dataplane::attach(&mut ebpf, lb_common::BALANCER_PROGRAM, iface, generic)?;
    link.pin(pins.link())
        .map_err(|e| anyhow!("pinning the XDP link at {}: {e}", pins.link().display()))?;
    info!(
        "attached to {} ({} mode): {summary}; state pinned in {}",
        iface.name,
        if generic { "generic" } else { "native" },
        pins.dir().display()
    );
    Ok(maps)
}

fn agent(pin_root: &Path, args: AgentArgs) -> anyhow::Result<()> {
    let settings = Settings {
        maglev_table_size: args.maglev_table_size,
        flow_table_size: args.flow_table_size,
    };
    config::validate_settings(&settings).map_err(|e| anyhow!("{e}"))?;
    let health_addr = match args.health_addr.as_str() {
        "off" => None,
        a => Some(a.parse().map_err(|e| {
            anyhow!("--health-addr {a:?}: {e}: expected ADDRESS:PORT like 127.0.0.1:9941, or off")
        })?),
    };
    require_root()?;
    let iface = Interface::by_name(&args.at.iface)?;
    let pins = PinLayout::new(pin_root, &iface.name);
    pins.prepare()?;
    let generic = args.at.generic;
    // Attached on the first complete model, so a restart never applies a partial view.
    let mut maps: Option<Maps> = None;
    let apply: k8s::ApplyFn = Box::new(move |desired| match &mut maps {
        Some(maps) => Ok(reconcile::reconcile(maps, &iface, desired)?.to_string_if_changed()),
        None => {
            maps = Some(attach_persistent(&pins, &iface, desired, generic)?);
            Ok(format!("attached with {} VIPs", desired.vips.len()))
        }
    });
    k8s::run(
        k8s::AgentConfig {
            kubeconfig: args.kubeconfig,
            settings,
            health_addr,
            node_name: args.node_name,
        },
        apply,
    )
}

fn xdp_pass(pin_root: &Path, iface_name: &str, detach: bool) -> anyhow::Result<()> {
    require_root()?;
    let pins = PinLayout::new(pin_root, iface_name);
    if detach {
        return dataplane::detach_pinned(&pins);
    }
    let iface = Interface::by_name(iface_name)?;
    pins.prepare()?;
    // A minimal connection table: this object only lends its pass program.
    let mut ebpf = dataplane::load(None, 1024)?;
    let link = dataplane::attach(&mut ebpf, PASS_PROGRAM, &iface, false)?;
    link.pin(pins.link())
        .map_err(|e| anyhow!("pinning the XDP link at {}: {e}", pins.link().display()))?;
    info!("XDP_PASS program attached to {}", iface.name);
    Ok(())
}

/// The interface to inspect: the given one, or the only one with state under the pin root.
fn attached_iface(pin_root: &Path, iface: Option<String>) -> anyhow::Result<String> {
    if let Some(iface) = iface {
        return Ok(iface);
    }
    let attached: Vec<String> = std::fs::read_dir(pin_root)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| PinLayout::new(pin_root, &e.file_name().to_string_lossy()).has_maps())
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
