//! `sluice`: attach the XDP load balancer with a static config, and inspect its maps.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use lb_userspace::{
    dataplane::DEFAULT_PIN_ROOT,
    model::{IpNet, VipAddr},
    observe::{metrics, read::FlowFilter, render::Format, trace},
};

mod cli;

use cli::{
    agent::{self, AgentArgs},
    inspect::{self, InspectWhat},
    parse_interval,
    run::{self, AttachArgs},
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

/// Set (to anything) in the environment: parse the arguments, exit 0 when they are valid (clap's
/// usage error and exit 2 otherwise), and do nothing else. Hidden; tests/tests/docs.rs uses it
/// to check every `sluice ...` example of the docs against the real command line.
const PARSE_ONLY_VAR: &str = "SLUICE_PARSE_ONLY";

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os(PARSE_ONLY_VAR).is_some() {
        return ExitCode::SUCCESS;
    }
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
        } => run::run(&cli.pin_dir, &a, metrics_addr),
        Command::Attach(a) => run::attach(&cli.pin_dir, &a.config, &a.at.iface, a.at.generic),
        Command::Agent(a) => agent::agent(&cli.pin_dir, *a),
        Command::Detach { iface } => run::detach(&cli.pin_dir, &iface),
        Command::Inspect {
            iface,
            format,
            what,
        } => inspect::inspect(&cli.pin_dir, iface, format, what),
        Command::Decap {
            iface,
            allow,
            generic,
            detach,
        } => inspect::decap(&cli.pin_dir, &iface, &allow, generic, detach),
        Command::XdpPass { iface, detach } => run::xdp_pass(&cli.pin_dir, &iface, detach),
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
            inspect::trace(&cli.pin_dir, iface, &args, format)
        }
        Command::Explain {
            client,
            vip,
            iface,
            format,
            agent,
        } => inspect::explain(&cli.pin_dir, &client, &vip, iface, format, &agent),
    }
}
