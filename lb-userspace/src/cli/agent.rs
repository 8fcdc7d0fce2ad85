//! `sluice agent`: its arguments (BGP's among them) and its wiring of the Kubernetes agent.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail};
use lb_userspace::{
    bgp, config,
    dataplane::PinLayout,
    health::metrics::HealthMetrics,
    k8s,
    k8s::watch_metrics::WatchMetrics,
    model::{FlowState, Settings},
    net::{self, Interface},
    observe::metrics,
    reconcile::{
        Unreachable,
        driver::{ReconcileMetrics, Reconciler},
    },
};
use log::{info, warn};

use super::{parse_interval, require_root, run::IfaceArgs};

/// What `agent` takes.
#[derive(clap::Args)]
pub(crate) struct AgentArgs {
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
    /// Entries of the connection table (table mode; second-chance mode creates the smallest,
    /// 1024). A change applies at the next start, the recorded flows carried over.
    #[arg(long, default_value_t = lb_common::DEFAULT_FLOW_TABLE_SIZE)]
    flow_table_size: u32,
    /// The flood guard: new flows recorded in the connection table per second and CPU; above
    /// it, new flows are forwarded by Maglev's pick alone. 0: no limit.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_NEW_FLOWS_PER_CPU)]
    max_new_flows_per_cpu: u32,
    /// How flows keep their backends through table changes: table (a connection-table entry
    /// per flow), second-chance (none; this node's conntrack decides, docs/design.md) or auto
    /// (second chance where this node's conntrack tracks its connections, else table).
    #[arg(long, default_value = "table")]
    flow_state: FlowState,
    /// Address of the health endpoints (GET /healthz, /readyz); "off" for none.
    #[arg(long, default_value = super::DEFAULT_HEALTH_ADDR)]
    health_addr: String,
    /// Announce the VIPs on the L2 segment: one node per address, elected by a Lease, answers
    /// ARP for it from XDP (and only forwards). Off: announce them with MetalLB or BGP instead.
    /// Needs --node-name.
    #[arg(long)]
    announce: bool,
    /// How long an announcement Lease lasts without renewal (3s to 5m; renewed every 30 %):
    /// a dead holder's addresses move after this long. Shorter costs more API writes.
    #[arg(long, default_value = "10s", value_parser = parse_lease_duration)]
    announce_lease_duration: Duration,
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
    /// A file holding the TCP-MD5 password (RFC 2385, 1 to 80 bytes; a final newline is not
    /// part of it) of every --bgp-peers peer. BGPPeer resources name a Secret instead.
    #[arg(long)]
    bgp_password_file: Option<PathBuf>,
}

impl BgpArgs {
    fn config(&self, iface: &Interface) -> anyhow::Result<Option<bgp::SpeakerConfig>> {
        if !self.bgp {
            return Ok(None);
        }
        let asn = self
            .bgp_asn
            .ok_or_else(|| anyhow!("--bgp needs --bgp-asn NUMBER (this cluster's AS)"))?;
        let mut peers =
            bgp::parse_peers(&self.bgp_peers).map_err(|e| anyhow!("--bgp-peers: {e}"))?;
        if let Some(file) = &self.bgp_password_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow!("--bgp-password-file {}: {e}", file.display()))?;
            let password = bgp::Password::new(&text)
                .map_err(|e| anyhow!("--bgp-password-file {}: {e}", file.display()))?;
            for p in &mut peers {
                p.options.password = Some(password.clone());
            }
        }
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
        // The timing holds for BGPPeers with BFD on too; --bgp-bfd turns it on for --bgp-peers.
        if !(10..=10_000).contains(&self.bgp_bfd_interval) || self.bgp_bfd_multiplier == 0 {
            bail!(
                "--bgp-bfd-interval {} / --bgp-bfd-multiplier {}: expected 10 to 10000 ms and 1 to 255",
                self.bgp_bfd_interval,
                self.bgp_bfd_multiplier
            );
        }
        config.bfd = bgp::bfd::BfdConfig {
            interval: Duration::from_millis(u64::from(self.bgp_bfd_interval)),
            multiplier: self.bgp_bfd_multiplier,
        };
        for p in &mut config.peers {
            p.options.bfd = self.bgp_bfd;
        }
        Ok(Some(config))
    }
}

/// `--maglev-table-size`: a number, or "auto" (`None`).
#[derive(Clone, Copy, Debug)]
struct TableSize(Option<u32>);

fn parse_lease_duration(text: &str) -> Result<Duration, String> {
    let d = lb_userspace::model::parse_duration(text)?;
    let range = k8s::announce::LEASE_DURATION_RANGE;
    if !range.contains(&d) {
        return Err(format!(
            "lease duration {text:?} is outside {:?}..={:?}",
            range.start(),
            range.end()
        ));
    }
    Ok(d)
}

fn parse_table_size(s: &str) -> Result<TableSize, String> {
    match s {
        "auto" => Ok(TableSize(None)),
        n => n
            .parse()
            .map(|n| TableSize(Some(n)))
            .map_err(|_| format!("{s:?}: expected a prime number of slots, or auto")),
    }
}

pub(crate) fn agent(pin_root: &Path, args: AgentArgs) -> anyhow::Result<()> {
    let settings = Settings {
        maglev_table_size: args.maglev_table_size.0,
        flow_table_size: args.flow_table_size,
        max_new_flows_per_cpu: args.max_new_flows_per_cpu,
        flow_state: args.flow_state,
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
    // Which interface: the node's annotation, --iface, or (auto) the one of its InternalIP.
    let node_facts = match &args.node_name {
        Some(name) => match k8s::agent::own_node_addressing(args.kubeconfig.as_deref(), name) {
            Ok(found) => found,
            Err(e) => {
                warn!("choosing the interface without the Node's say: {e:#}");
                (None, Vec::new())
            }
        },
        None => (None, Vec::new()),
    };
    let facts = net::choose::facts(node_facts.0, node_facts.1)?;
    let (iface, choice) = net::choose::open(&args.at.iface, &facts)?;
    info!("attaching to {}: {}", iface.name, choice.why);
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
    // The BGP speaker's: its sessions, and BFD's drops when BFD runs.
    let instruments = match bgp.as_ref() {
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
        lease_duration: args.announce_lease_duration,
    });
    let announcing = announce.is_some();
    // Attached on the first complete model, so a restart never applies a partial view.
    let mut reconciler = Reconciler::new(iface, pins, generic, Unreachable::Drain, control.clone());
    let apply: k8s::ApplyFn = Box::new(move |desired, pass| {
        let first = reconciler.maps_mut().is_none();
        let summary = match pass {
            k8s::Pass::Change => reconciler.apply(desired)?,
            k8s::Pass::Refresh => reconciler.refresh(desired)?,
        };
        if first
            && !announcing
            && let Some(maps) = reconciler.maps_mut()
        {
            // Entries left by an earlier `--announce` run would keep answering ARP.
            maps.clear_announced()?;
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
            interface: format!("interface {}: {}", choice.name, choice.why),
        },
        apply,
    )
}
