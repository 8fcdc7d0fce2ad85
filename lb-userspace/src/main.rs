//! `sluice`: attach the XDP load balancer with a static config, and inspect its maps.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use lb_userspace::{
    bgp, config,
    dataplane::{self, DEFAULT_PIN_ROOT, DecapMaps, Maps, PASS_PROGRAM, PinLayout},
    decap,
    health::metrics::HealthMetrics,
    k8s,
    k8s::watch_metrics::WatchMetrics,
    model::{Desired, IpNet, Settings, VipAddr},
    net::Interface,
    observe::{
        explain, inspect, metrics,
        read::{FlowFilter, agent_health},
        render::Format,
        trace,
    },
    reconcile::{
        self, Unreachable,
        driver::{ReconcileMetrics, Reconciler},
    },
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
    /// The DaemonSet sets SLUICE_PIN_DIR: it mounts only the host's /sys/fs/bpf/sluice, so
    /// `kubectl exec ... sluice inspect` in the pod finds the pins too.
    #[arg(long, global = true, default_value = DEFAULT_PIN_ROOT, env = "SLUICE_PIN_DIR")]
    pin_dir: PathBuf,
    /// How logs (on stderr) are written: text lines, or one JSON object per line. What is
    /// logged: RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// Slots of every VIP's Maglev table (a prime), or "auto": per VIP, the smallest of 251,
    /// 509, ..., 65537 over 1000 slots per backend.
    #[arg(long, default_value = "auto", value_parser = parse_table_size)]
    maglev_table_size: TableSize,
    /// Entries of the connection table (applies when the maps are first created).
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_TABLE_SIZE)]
    flow_table_size: u32,
    /// The flood guard: new flows recorded in the connection table per second and CPU; above
    /// it, new flows are forwarded by Maglev's pick alone. 0: no limit.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_NEW_FLOWS_PER_CPU)]
    max_new_flows_per_cpu: u32,
    /// Address of the health endpoints (GET /healthz, /readyz); "off" for none.
    #[arg(long, default_value = "127.0.0.1:9941")]
    health_addr: String,
    /// Announce the VIPs on the L2 segment: one node per address, elected by a Lease, answers
    /// ARP for it from XDP (and only forwards). Off: announce them with MetalLB or BGP instead.
    /// Needs --node-name.
    #[arg(long)]
    announce: bool,
    /// Serve LoadBalancer Services without a `spec.loadBalancerClass` (besides those of class
    /// sluice.io/lb); false beside another implementation that takes those.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    serve_unclassed: bool,
    /// Take part in the address allocator's election (one agent writes the Services' pool
    /// addresses; needs --node-name and IPAddressPools).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    allocate: bool,
    /// Namespace of the announcement, allocator and node-load Leases [default: the pod's own,
    /// else sluice-system].
    #[arg(long)]
    lease_namespace: Option<String>,
    /// Probe the backend nodes (kube-proxy's healthz, a Local Service's healthCheckNodePort, or
    /// the Service's sluice.io/health-check annotation); a failing node drains.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    health_checks: bool,
    /// Shape weights by the nodes' measured load (published on a Lease per node); false
    /// neither publishes nor applies.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    load_aware: bool,
    /// Read this node's load from a file holding one number (0 idle .. 1 saturated) instead
    /// of /proc (tests, or an external measurement).
    #[arg(long)]
    load_file: Option<PathBuf>,
    /// The load control period: one sample, one step of the control law, at most one
    /// publication (a heartbeat every 10 s).
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    load_interval: Duration,
    /// Where to serve Prometheus metrics (`/metrics`); loopback unless told otherwise (with
    /// hostNetwork, 0.0.0.0:9477 exposes it on the node's addresses).
    #[arg(long, default_value = metrics::DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
    #[command(flatten)]
    bgp: BgpArgs,
}

/// `sluice agent --bgp`: announce the VIPs this node can serve to BGP routers (README "BGP").
#[derive(clap::Args)]
struct BgpArgs {
    /// Announce the VIPs by BGP (outgoing sessions only; port 179 is never bound). Takes an
    /// optional true/false so that a ConfigMap value can turn it on or off. Needs --node-name.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_name = "BOOL")]
    bgp: bool,
    /// This node's AS number (the same on every node: identical AS_PATHs keep routers' ECMP).
    #[arg(long)]
    bgp_asn: Option<u32>,
    /// The routers: comma-separated ADDRESS=ASN, ADDRESS:PORT=ASN or [IPV6]:PORT=ASN.
    #[arg(long, default_value = "")]
    bgp_peers: String,
    /// BGP router ID [default: the first IPv4 address of --iface].
    #[arg(long)]
    bgp_router_id: Option<std::net::Ipv4Addr>,
    /// Hold time proposed to the routers, in seconds (0, or 3 and more).
    #[arg(long, default_value_t = lb_userspace::bgp::DEFAULT_HOLD_TIME)]
    bgp_hold_time: u16,
    /// Standard communities added to every route: comma-separated HIGH:LOW (at most 256).
    #[arg(long, default_value = "")]
    bgp_communities: String,
    /// When draining (SIGTERM, cordon, exclusion label): seconds between the graceful-shutdown
    /// announcement (community 65535:0) and the withdrawal.
    #[arg(long, default_value_t = lb_userspace::bgp::DEFAULT_DRAIN_WAIT.as_secs_f64())]
    bgp_drain_wait: f64,
    /// BFD (single hop, UDP 3784) with every peer: a silent router or node is noticed in
    /// interval x multiplier instead of the hold time. Takes an optional true/false.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_name = "BOOL")]
    bgp_bfd: bool,
    /// BFD transmit and receive interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    bgp_bfd_interval: u32,
    /// BFD detection multiplier: missed packets before the peer counts as down.
    #[arg(long, default_value_t = 3)]
    bgp_bfd_multiplier: u8,
}

impl BgpArgs {
    fn config(&self, iface: &Interface) -> anyhow::Result<Option<bgp::SpeakerConfig>> {
        if !self.bgp {
            return Ok(None);
        }
        let asn = self
            .bgp_asn
            .ok_or_else(|| anyhow!("--bgp needs --bgp-asn NUMBER (this cluster's AS)"))?;
        let peers = bgp::parse_peers(&self.bgp_peers).map_err(|e| anyhow!("--bgp-peers: {e}"))?;
        let communities = bgp::parse_communities(&self.bgp_communities)
            .map_err(|e| anyhow!("--bgp-communities: {e}"))?;
        let router_id = match self.bgp_router_id {
            Some(id) => id,
            None => iface
                .addresses()?
                .into_iter()
                .find_map(|a| match a {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    std::net::IpAddr::V6(_) => None,
                })
                .ok_or_else(|| {
                    anyhow!(
                        "--bgp: interface {} has no IPv4 address to use as the router ID: pass --bgp-router-id",
                        iface.name
                    )
                })?,
        };
        if !(0.0..=3600.0).contains(&self.bgp_drain_wait) {
            bail!(
                "--bgp-drain-wait {}: expected seconds from 0 to 3600",
                self.bgp_drain_wait
            );
        }
        let mut config = bgp::SpeakerConfig::new(
            asn,
            router_id,
            peers,
            self.bgp_hold_time,
            communities,
            Duration::from_secs_f64(self.bgp_drain_wait),
        )
        .map_err(|e| anyhow!("{e}"))?;
        if self.bgp_bfd {
            if !(10..=10_000).contains(&self.bgp_bfd_interval) || self.bgp_bfd_multiplier == 0 {
                bail!(
                    "--bgp-bfd-interval {} / --bgp-bfd-multiplier {}: expected 10 to 10000 ms and 1 to 255",
                    self.bgp_bfd_interval,
                    self.bgp_bfd_multiplier
                );
            }
            config.bfd = Some(bgp::bfd::BfdConfig {
                interval: Duration::from_millis(u64::from(self.bgp_bfd_interval)),
                multiplier: self.bgp_bfd_multiplier,
            });
        }
        Ok(Some(config))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Attach to an interface and balance until SIGINT/SIGTERM; SIGHUP re-reads the config.
    Run {
        #[command(flatten)]
        attach: AttachArgs,
        /// Where to serve Prometheus metrics (`/metrics`); loopback unless told otherwise.
        #[arg(long, default_value = metrics::DEFAULT_METRICS_ADDR)]
        metrics_addr: SocketAddr,
    },
    /// Attach persistently (pinned link and maps) and exit; the program keeps forwarding.
    /// Run it again with a changed config to apply the difference.
    Attach(AttachArgs),
    /// Balance the Services of a Kubernetes cluster: watch Services, EndpointSlices and Nodes and
    /// keep the maps in step until SIGTERM. Attaches persistently (pinned, like `attach`), so a
    /// restarted or upgraded agent adopts the maps and no established flow is dropped.
    Agent(Box<AgentArgs>),
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
    /// Show the balancer's decision for each matching packet, live: client, VIP, verdict and
    /// its reason, the backend, and whether the connection table or Maglev (which slot)
    /// chose it. Until Ctrl-C, --count or --duration; then the events lost are told.
    /// Off when no trace runs; one trace at a time per interface.
    Trace {
        /// The attached interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Only packets for this VIP, e.g. `10.0.0.10:80/tcp`.
        #[arg(long)]
        vip: Option<VipAddr>,
        /// Only packets from clients in this prefix, or from this one address.
        #[arg(long, value_name = "PREFIX", value_parser = trace::parse_client)]
        client: Option<IpNet>,
        /// Only packets sent to this backend address.
        #[arg(long)]
        backend: Option<std::net::IpAddr>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long, e.g. 10s.
        #[arg(long, value_parser = parse_interval)]
        duration: Option<Duration>,
        /// Events reported per second and CPU at most (1 or more), or `unlimited`; the rest are
        /// counted lost. 0 is refused.
        #[arg(long, default_value = "1000", value_parser = trace::parse_rate)]
        rate: u32,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
    },
    /// Without sending a packet: what the attached balancer would do with a new flow from
    /// CLIENT to VIP and why (hash, Maglev slot, backend, weights as installed, source ranges,
    /// affinity), and what the connection table holds for it now. Reads the pinned maps.
    Explain {
        /// The client's address and source port, e.g. `192.0.2.7:40312` or `[2001:db8::7]:40312`.
        client: String,
        /// The VIP, e.g. `10.0.0.10:80/tcp` (the protocol defaults to tcp).
        vip: String,
        /// The attached interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        format: Format,
        /// Where the agent (or `sluice run`) serves /metrics, for the backends' health and load
        /// columns; "off" for the maps alone.
        #[arg(long, default_value = metrics::DEFAULT_METRICS_ADDR)]
        agent: String,
    },
    /// On a backend node of `mode: ipip` VIPs: attach the decapsulator (pinned), which strips
    /// the outer header of packets sent to this node by the allowed load balancers. Run it
    /// again to change the list.
    Decap {
        #[arg(long)]
        iface: String,
        /// Outer source prefix of a load balancer (its encap_source_v4/v6, or its address as
        /// /32 or /128). Repeat for each; packets from other sources are dropped.
        #[arg(
            long = "allow",
            value_name = "PREFIX",
            required_unless_present = "detach"
        )]
        allow: Vec<IpNet>,
        #[arg(long)]
        generic: bool,
        /// Remove it instead.
        #[arg(long)]
        detach: bool,
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
}

/// Logs go to stderr through `tracing`; the `log` call sites reach it through tracing-log.
fn init_logging(format: LogFormat) {
    // kube's client logs every dropped connection at warn/error; the agent reports watch
    // failures itself, once per failure, with what it does about them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off"));
    // Colours only for a terminal, not in files and log pipelines.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("warning: logging not set up: {e}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    init_logging(format);
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed and why, without a backtrace; in JSON like every other.
            match format {
                LogFormat::Text => eprintln!("error: {e:#}"),
                LogFormat::Json => tracing::error!("{e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            attach: a,
            metrics_addr,
        } => run(&cli.pin_dir, &a, metrics_addr),
        Command::Attach(a) => attach(&cli.pin_dir, &a.config, &a.at.iface, a.at.generic),
        Command::Agent(a) => agent(&cli.pin_dir, *a),
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
            if let InspectWhat::Decap = what {
                let decap_root = cli.pin_dir.join("decap");
                let iface =
                    attached_iface(&decap_root, iface, |i| PinLayout::decap(&cli.pin_dir, i))?;
                let maps = DecapMaps::from_pins(&PinLayout::decap(&cli.pin_dir, &iface))?;
                println!("{}", inspect::decap(&maps)?.render(format).trim_end());
                return Ok(());
            }
            let iface = attached_iface(&cli.pin_dir, iface, |i| PinLayout::new(&cli.pin_dir, i))?;
            let pins = PinLayout::new(&cli.pin_dir, &iface);
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
                InspectWhat::Decap => unreachable!("handled above"),
            };
            println!("{}", view.render(format).trim_end());
            Ok(())
        }
        Command::Decap {
            iface,
            allow,
            generic,
            detach,
        } => {
            require_root()?;
            let pins = PinLayout::decap(&cli.pin_dir, &iface);
            if detach {
                dataplane::detach_pinned(&pins)?;
                info!("detached the decapsulator from {iface}");
                return Ok(());
            }
            decap::attach(&pins, &Interface::by_name(&iface)?, &allow, generic)
        }
        Command::XdpPass { iface, detach } => xdp_pass(&cli.pin_dir, &iface, detach),
        Command::Trace {
            iface,
            vip,
            client,
            backend,
            count,
            duration,
            rate,
            format,
        } => {
            require_root()?;
            let iface = attached_iface(&cli.pin_dir, iface, |i| PinLayout::new(&cli.pin_dir, i))?;
            let args = trace::TraceArgs {
                filter: FlowFilter {
                    vip,
                    backend,
                    client,
                },
                count,
                rate,
                duration,
            };
            trace::run(&iface, &PinLayout::new(&cli.pin_dir, &iface), &args, format)
        }
        Command::Explain {
            client,
            vip,
            iface,
            format,
            agent,
        } => explain(&cli.pin_dir, &client, &vip, iface, format, &agent),
    }
}

/// `sluice explain`: the arguments first (a typo needs no root), then the pins.
fn explain(
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

/// `500ms`, `1s`, `2.5s` (the model's one duration grammar, as config and annotations write
/// it): at least 100 ms.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration =
        lb_userspace::model::parse_duration(text).map_err(|e| format!("invalid interval: {e}"))?;
    if duration < Duration::from_millis(100) {
        return Err(format!("interval {text:?} is below 100ms"));
    }
    Ok(duration)
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

/// How often `run` re-resolves backends' MACs and routes.
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(30);
/// How often `run` looks at pending signals.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

fn run(pin_root: &Path, args: &AttachArgs, metrics_addr: SocketAddr) -> anyhow::Result<()> {
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
    let mut flow_table_size = desired.settings.flow_table_size;
    let mut running = desired;
    let mut refreshed = Instant::now();
    'serve: loop {
        for signal in signals.pending() {
            if signal != SIGHUP {
                info!("signal {signal}: detaching from {}", iface.name);
                break 'serve;
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
                    match reconciler.apply(&checks.overlay(&new)) {
                        Ok(s) => info!("reloaded {}: {s}", config.display()),
                        Err(e) => error!("reload of {} failed: {e:#}", config.display()),
                    }
                    running = new;
                }
            }
        }
        // Neighbours and routes move (a next hop's MAC, a failed-over gateway): resolve them
        // again now and then; only what changed is written.
        if checks.take_changed() {
            match reconciler.apply(&checks.overlay(&running)) {
                Ok(s) if !s.is_empty() => info!("health checks changed the maps: {s}"),
                Ok(_) => {}
                Err(e) => warn!("applying a health change failed (retrying on the next): {e:#}"),
            }
        }
        if refreshed.elapsed() >= NEXT_HOP_REFRESH {
            refreshed = Instant::now();
            match reconciler.apply(&checks.overlay(&running)) {
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

fn attach(pin_root: &Path, config: &Path, iface_name: &str, generic: bool) -> anyhow::Result<()> {
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

/// `--maglev-table-size`: a number, or "auto" (`None`).
#[derive(Clone, Copy, Debug)]
struct TableSize(Option<u32>);

fn parse_table_size(s: &str) -> Result<TableSize, String> {
    match s {
        "auto" => Ok(TableSize(None)),
        n => n
            .parse()
            .map(|n| TableSize(Some(n)))
            .map_err(|_| format!("{s:?}: expected a prime number of slots, or auto")),
    }
}

fn agent(pin_root: &Path, args: AgentArgs) -> anyhow::Result<()> {
    let settings = Settings {
        maglev_table_size: args.maglev_table_size.0,
        flow_table_size: args.flow_table_size,
        max_new_flows_per_cpu: args.max_new_flows_per_cpu,
        ..Settings::default()
    };
    config::validate_settings(&settings).map_err(|e| anyhow!("{e}"))?;
    let health_addr = match args.health_addr.as_str() {
        "off" => None,
        a => Some(a.parse().map_err(|e| {
            anyhow!("--health-addr {a:?}: {e}: expected ADDRESS:PORT like 127.0.0.1:9941, or off")
        })?),
    };
    let node_name = args.node_name.clone();
    let announce_node = match (args.announce, node_name) {
        (false, _) => None,
        (true, Some(n)) => Some(n),
        (true, None) => bail!(
            "--announce needs --node-name NAME: it is the holder of the VIPs' Leases (the DaemonSet passes spec.nodeName)"
        ),
    };
    if args.bgp.bgp && args.node_name.is_none() {
        bail!(
            "--bgp needs --node-name NAME: it decides what this node announces (the DaemonSet passes spec.nodeName)"
        );
    }
    require_root()?;
    let iface = Interface::by_name(&args.at.iface)?;
    let bgp = args.bgp.config(&iface)?;
    let pins = PinLayout::new(pin_root, &iface.name);
    let health_metrics = HealthMetrics::default();
    let control = ReconcileMetrics::default();
    let watches = WatchMetrics::default();
    // In the order /metrics always listed them: reconciles, watches, health.
    let instruments = metrics::Instruments::default()
        .with({
            let c = control.clone();
            move |r| c.register(r)
        })
        .with({
            let w = watches.clone();
            move |r| w.register(r)
        })
        .with({
            let h = health_metrics.clone();
            move |r| h.register(r)
        });
    // The BGP speaker's (BFD's drops), when BFD runs.
    let instruments = match bgp.as_ref().filter(|b| b.bfd.is_some()) {
        Some(b) => instruments.with({
            let m = b.metrics.clone();
            move |r| m.register(r)
        }),
        None => instruments,
    };
    let health_routes = vec![health_metrics.backends_route()];
    let lease_namespace = k8s::announce::lease_namespace(args.lease_namespace.clone());
    let load = match (&args.node_name, args.load_aware) {
        (Some(node_name), true) => Some(lb_userspace::health::load::LoadConfig {
            node_name: node_name.clone(),
            namespace: lease_namespace.clone(),
            source: match &args.load_file {
                Some(path) => lb_userspace::health::load::LoadSource::File(path.clone()),
                None => lb_userspace::health::load::LoadSource::System,
            },
            interval: args.load_interval,
            is_node: Default::default(),
        }),
        (None, true) => {
            warn!("no --node-name: this node's load is not published (the others' still apply)");
            None
        }
        (_, false) => None,
    };
    let health = lb_userspace::health::AgentHealth {
        checks: args.health_checks,
        load_aware: args.load_aware,
        load,
        namespace: lease_namespace.clone(),
        follow_every: args.load_interval,
        metrics: Some(health_metrics),
    };
    // Served until the agent returns; before the first sync without the dataplane's figures.
    let _metrics = metrics::serve(args.metrics_addr, &pins, instruments, health_routes)?;
    pins.prepare()?;
    let generic = args.at.generic;
    let class = k8s::pools::ClassPolicy {
        unclassed: args.serve_unclassed,
    };
    let allocator = match (&args.node_name, args.allocate) {
        (Some(node_name), true) => Some(k8s::allocator::AllocatorConfig {
            namespace: lease_namespace.clone(),
            node_name: node_name.clone(),
            class,
        }),
        (None, true) => {
            warn!("no --node-name: this agent never allocates addresses (the others still do)");
            None
        }
        (_, false) => None,
    };
    let announce = announce_node.map(|node_name| k8s::AnnounceConfig {
        namespace: lease_namespace,
        node_name,
        iface: iface.clone(),
        pins: pins.clone(),
    });
    let announcing = announce.is_some();
    // Attached on the first complete model, so a restart never applies a partial view.
    let mut reconciler = Reconciler::new(iface, pins, generic, Unreachable::Drain, control.clone());
    let apply: k8s::ApplyFn = Box::new(move |desired| {
        let first = reconciler.maps_mut().is_none();
        let summary = reconciler.apply(desired)?;
        if first
            && !announcing
            && let Some(maps) = reconciler.maps_mut()
        {
            // Entries left by an earlier `--announce` run would keep answering ARP.
            reconcile::clear_announce(maps)?;
        }
        Ok(summary)
    });
    k8s::run(
        k8s::AgentConfig {
            kubeconfig: args.kubeconfig,
            settings,
            health_addr,
            node_name: args.node_name,
            announce,
            watches: Some(watches),
            bgp,
            health,
            class,
            allocator,
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
    let mut ebpf = dataplane::load(None, lb_common::MIN_FLOW_TABLE_SIZE)?;
    let link = dataplane::attach(&mut ebpf, PASS_PROGRAM, &iface, false)?;
    link.pin(pins.link())
        .map_err(|e| anyhow!("pinning the XDP link at {}: {e}", pins.link().display()))?;
    info!("XDP_PASS program attached to {}", iface.name);
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
