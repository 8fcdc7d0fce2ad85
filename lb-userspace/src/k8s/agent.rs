//! The agent's loop: list+watch Services, EndpointSlices and Nodes, rebuild the model when they
//! change (bursts coalesced), and hand it to a reconcile thread that owns the maps.
//!
//! Resilience comes from the watchers and from keeping the last state: while the API server is
//! unreachable the maps keep what they have (the dataplane forwards on) and the watchers retry with
//! backoff; a `410 Gone` (compacted history) makes a watcher relist, after which the model is
//! rebuilt from the fresh lists. Nothing is applied before all three lists are complete, so a
//! restarted agent never shrinks the maps it adopts to a partial view.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use log::{debug, error, info, warn};
use serde::de::DeserializeOwned;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;

use super::allocator::{self, AllocatorConfig};
use super::announce::{self, AnnounceConfig};
use super::desired::{self, AddressPolicy, Built, SERVICE_NAME_LABEL};
use super::pools::{ClassPolicy, pool_spec};
use super::watch_metrics::WatchMetrics;
use super::watch_probe::WatchProbeLayer;
use crate::http;
use crate::model::{Desired, Settings};
use crate::net::NextHopRefresh;
use crate::reconcile::Summary;

/// Quiet time after the last event before the model is rebuilt: one rebuild per burst.
pub const DEBOUNCE: Duration = Duration::from_millis(10);
/// A burst that never goes quiet is still applied this often.
const MAX_DELAY: Duration = Duration::from_millis(500);
/// Retry delays of a failed reconcile (doubling), and of a pass that left nodes unresolved.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
const UNRESOLVED_RETRY: Duration = Duration::from_secs(5);
/// The agent's event loop beats this often; `/healthz` fails once no beat came for
/// [`HEALTHZ_STALL`] (the DaemonSet's liveness probe restarts the pod ~30 s later).
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEALTHZ_STALL: Duration = Duration::from_secs(15);
/// How long shutdown waits for the announcement leases to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the agent reaches the API server and what it builds.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// A kubeconfig file; `None`: the in-cluster ServiceAccount (or $KUBECONFIG, ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    pub settings: Settings,
    /// Where `GET /healthz` and `GET /readyz` are answered (loopback; the DaemonSet's probes).
    pub health_addr: Option<SocketAddr>,
    /// This node's name (logged; the holder identity of announcement Leases).
    pub node_name: Option<String>,
    /// `--announce`: elect one node per VIP address and answer ARP from it.
    pub announce: Option<AnnounceConfig>,
    /// Where the watches' state goes (`/metrics`, composed by the caller, which also records
    /// the reconciles); `None`: not counted.
    pub watches: Option<WatchMetrics>,
    /// `--bgp`: announce the VIPs this node can serve to BGP routers (needs `node_name`).
    pub bgp: Option<crate::bgp::SpeakerConfig>,
    /// Health checks and load-aware weights.
    pub health: crate::health::AgentHealth,
    /// Which Services are sluice's (`loadBalancerClass`), and the address allocator's election
    /// (`None`: this agent never allocates).
    pub class: ClassPolicy,
    pub allocator: Option<AllocatorConfig>,
    /// The attached interface and why it was chosen, as `/readyz` says it.
    pub interface: String,
}

/// How long the first apply waits for the nodes' load Leases (after the other lists).
const LEASES_FIRST_LIST: Duration = Duration::from_secs(5);

/// Applies one model to the dataplane (backends that cannot be resolved drain on their last
/// known MAC, or wait); returns what changed. Runs on the reconcile thread, which owns it (and
/// the maps inside it).
pub type ApplyFn = Box<dyn FnMut(&Desired, Pass) -> anyhow::Result<Summary> + Send>;

/// Why the reconcile thread applies a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// A new model: what earlier applies found (next hops, what the maps hold) is reused.
    Change,
    /// The periodic refresh ([`NextHopRefresh`]): everything asked of the kernel afresh.
    Refresh,
}

#[derive(Default)]
struct Health {
    /// The first full model has been applied, and the last apply succeeded.
    ready: AtomicBool,
    /// What the last apply could not do (no room in the maps, nodes without an ARP answer),
    /// one line each: `/readyz` shows it (ready all the same: everything else is applied).
    degraded: std::sync::Mutex<Vec<String>>,
    /// The last beat of the agent's event loop (the runtime that runs the watches, the main
    /// loop, the announcer and the allocator; BGP and the probes run on [`Timers`]); `None`
    /// before the first.
    beat: std::sync::Mutex<Option<Instant>>,
    /// The last beat of the [`Timers`] thread (BGP, BFD, probes); `None` before it starts.
    timers_beat: std::sync::Mutex<Option<Instant>>,
}

impl Health {
    fn beat(&self) {
        if let Ok(mut beat) = self.beat.lock() {
            *beat = Some(Instant::now());
        }
    }
    fn timers_beat(&self) {
        if let Ok(mut beat) = self.timers_beat.lock() {
            *beat = Some(Instant::now());
        }
    }
}

/// The `timers` thread: a current-thread runtime of its own for what must keep sub-second time
/// (the BGP sessions' keepalives and hold timers, BFD at 100 ms x 3, the health probes), so
/// that the agent's runtime can spend hundreds of milliseconds in a model build of thousands
/// of Services (or a relist's burst) without delaying them. Both sides talk only through tokio
/// sync channels (`watch`, `Notify`), which work across runtimes. Dropping it stops the thread
/// (tasks still spawned on it are dropped): keep it until the speaker's shutdown has returned.
pub(crate) struct Timers {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Timers {
    pub(crate) fn start() -> anyhow::Result<Timers> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the timers' runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // A current-thread runtime runs its tasks only while a thread is inside `block_on`.
        let thread = std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                });
            })
            .context("starting the timers thread")?;
        Ok(Timers {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where the timed tasks are spawned.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("the timers thread panicked");
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT. `apply` is first called once the initial lists are
/// complete (so it may attach then).
pub fn run(config: AgentConfig, apply: ApplyFn) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(config, apply))
}

async fn client(config: &AgentConfig) -> anyhow::Result<Client> {
    client_for(config.kubeconfig.as_deref(), config.watches.as_ref()).await
}

async fn client_for(
    kubeconfig: Option<&std::path::Path>,
    watches: Option<&WatchMetrics>,
) -> anyhow::Result<Client> {
    let kube_config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "finding the API server: not in a cluster (no ServiceAccount token) and no kubeconfig; pass --kubeconfig FILE",
        )?,
    };
    info!("API server {}", kube_config.cluster_url);
    let builder = kube::client::ClientBuilder::try_from(kube_config)
        .context("building the Kubernetes client")?;
    Ok(match watches {
        Some(watches) => builder
            .with_layer(&WatchProbeLayer(watches.clone()))
            .build(),
        None => builder.build(),
    })
}

/// What this node's Node object says about its interface, read once before attaching: its
/// `sluice.io/iface` annotation and its InternalIP addresses (`net::choose` decides).
pub fn own_node_addressing(
    kubeconfig: Option<&std::path::Path>,
    node_name: &str,
) -> anyhow::Result<(Option<String>, Vec<std::net::IpAddr>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = client_for(kubeconfig, None).await?;
        let nodes: Api<Node> = Api::all(client);
        let node = tokio::time::timeout(Duration::from_secs(10), nodes.get(node_name))
            .await
            .map_err(|_| anyhow::anyhow!("reading node {node_name}: no answer in 10 s"))?
            .with_context(|| format!("reading node {node_name}"))?;
        let annotation = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::net::choose::IFACE_ANNOTATION))
            .cloned();
        let ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Ok((annotation, ips))
    })
}

/// Starts a list+watch of `api` into a store; every change wakes `changed`. Plain list+watch:
/// streaming lists need Kubernetes >= 1.27 and gain little for an agent's few object kinds.
pub(super) fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    metrics: Option<WatchMetrics>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let kind = K::kind(&()).into_owned();
    let resource = K::plural(&()).into_owned();
    if let Some(m) = &metrics {
        m.declare(&resource);
    }
    let (reader, writer) = reflector::store();
    let cache = reader.clone();
    let stream = watcher(api, config)
        // Managed fields are most of an object's bytes and nothing the agent reads.
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream.into_stream());
        let mut failing = false;
        let mut listed = false;
        while let Some(event) = stream.next().await {
            if let Some(m) = &metrics {
                match &event {
                    Ok(watcher::Event::Init) if listed => m.relist(&resource),
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                    Ok(watcher::Event::InitDone) => m.set_objects(&resource, cache.len()),
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                        m.event(&resource);
                        m.set_objects(&resource, cache.len());
                    }
                    Err(_) => {
                        m.error(&resource);
                        m.set_up(&resource, false);
                    }
                }
            }
            match event {
                Ok(watcher::Event::Init) => {
                    listed = true;
                    if failing {
                        info!("{kind} watch: relisting");
                    }
                }
                Ok(watcher::Event::InitApply(_)) => {}
                Ok(event) => {
                    if failing {
                        info!("{kind} watch: connected again");
                        failing = false;
                    }
                    if let watcher::Event::Apply(o) | watcher::Event::Delete(o) = &event {
                        debug!("{kind} {} changed", o.name_any());
                    }
                    changed.notify_one();
                }
                Err(e) => {
                    // The backoff retries; the maps keep the last state meanwhile.
                    warn!("{kind} watch failed (retrying with backoff, forwarding unchanged): {e}");
                    failing = true;
                }
            }
        }
    });
    reader
}

async fn run_async(config: AgentConfig, apply: ApplyFn) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let health = Arc::new(Health::default());
    // Answered until the agent returns.
    let _health_server = match config.health_addr {
        Some(addr) => Some(serve_health(
            addr,
            health.clone(),
            config.bgp.as_ref().map(|b| b.metrics.clone()),
            config.interface.clone(),
        )?),
        None => None,
    };
    // The heartbeat `/healthz` reads: it beats only while this runtime gets to run its tasks.
    tokio::spawn({
        let health = health.clone();
        async move {
            loop {
                health.beat();
                tokio::time::sleep(HEARTBEAT).await;
            }
        }
    });
    let client = client(&config).await?;
    let changed = Arc::new(Notify::new());
    let watches = config.watches.clone();
    let services = watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        watches.clone(),
    );
    let slices = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_NAME_LABEL),
        changed.clone(),
        watches.clone(),
    );
    let nodes = watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        watches,
    );
    info!(
        "node {}: waiting for the first lists of Services, EndpointSlices and Nodes",
        config.node_name.as_deref().unwrap_or("(unnamed)")
    );
    let pools = super::pools::watch_pools(&client, changed.clone(), config.watches.clone()).await;
    // BGP: the BGPPeers (and the Secrets with their passwords) pick this node's routers.
    let bgp_peers = match &config.bgp {
        Some(_) => Some(
            super::bgp_peers::watch_resources(
                &client,
                &config.health.namespace,
                changed.clone(),
                config.watches.clone(),
            )
            .await,
        ),
        None => None,
    };
    let mut peer_selection = super::bgp_peers::PeerSelection::default();
    let mut pool_adverts = super::bgp_select::PoolAdverts::default();
    let ready = async {
        services.wait_until_ready().await?;
        slices.wait_until_ready().await?;
        if let Some(p) = pools.get() {
            p.wait_until_ready().await?;
        }
        nodes.wait_until_ready().await
    };
    tokio::select! {
        r = ready => r.map_err(|e| anyhow!("a watcher stopped before its first list: {e}"))?,
        _ = sigterm.recv() => { info!("SIGTERM before the first sync: exiting"); return Ok(()); }
        _ = sigint.recv() => { info!("SIGINT before the first sync: exiting"); return Ok(()); }
    }

    // BGP, BFD and the probes keep time on a thread of their own (dropped last: after the
    // speaker's shutdown and the prober).
    let timers = Timers::start()?;
    timers.handle().spawn({
        let health = health.clone();
        async move {
            loop {
                health.timers_beat();
                tokio::time::sleep(HEARTBEAT).await;
            }
        }
    });
    // Health: probes of this node's share of the backends; the nodes' Leases (their loads and
    // their health votes) and this node's publishers.
    let checks = config.health.checks;
    // With a name to vote under, a verdict change goes to the votes' publisher first (it wakes
    // `changed` after); without one, this agent only reads the others' votes.
    let voter = config.node_name.clone().filter(|_| checks);
    let probe_changed = if voter.is_some() {
        Arc::new(Notify::new())
    } else {
        changed.clone()
    };
    let prober = Arc::new(crate::health::probe::Prober::new(
        timers.handle().clone(),
        probe_changed.clone(),
        config.health.metrics.clone(),
    ));
    let lease_events = Arc::new(Notify::new());
    let leases = (config.health.load_aware || checks).then(|| {
        watch(
            Api::<Lease>::namespaced(client.clone(), &config.health.namespace),
            watcher::Config::default().labels(&format!(
                "{}={}",
                crate::health::load::LEASE_LABEL,
                crate::health::load::LEASE_LABEL_VALUE
            )),
            // Not `changed`: heartbeats alone must not rebuild; `follow` and `votes::follow`
            // look at what they say.
            lease_events.clone(),
            None,
        )
    });
    // When each Lease last changed, by this agent's clock (the reader judges freshness).
    let lease_clock = Arc::new(crate::health::load::LeaseClock::default());
    let votes = checks.then(crate::health::votes::SharedDrained::default);
    let (names_tx, names_rx) = tokio::sync::watch::channel(BTreeMap::<IpAddr, String>::new());
    if let Some(store) = &leases {
        if tokio::time::timeout(LEASES_FIRST_LIST, store.wait_until_ready())
            .await
            .is_err()
        {
            warn!(
                "no list of the nodes' Leases in namespace {} within {LEASES_FIRST_LIST:?}: starting with neutral weights and no node drained by vote",
                config.health.namespace
            );
        }
        if let Some(votes) = &votes {
            tokio::spawn(crate::health::votes::follow(
                store.clone(),
                nodes.clone(),
                lease_clock.clone(),
                lease_events.clone(),
                votes.clone(),
                changed.clone(),
            ));
        }
        if config.health.load_aware {
            tokio::spawn(crate::health::load::follow(
                store.clone(),
                nodes.clone(),
                lease_clock.clone(),
                changed.clone(),
                config.health.follow_every,
                config.health.metrics.clone(),
            ));
        }
        if let Some(load) = config
            .health
            .load
            .clone()
            .filter(|_| config.health.load_aware)
        {
            tokio::spawn(crate::health::load::run(
                client.clone(),
                load,
                store.clone(),
                nodes.clone(),
                lease_clock.clone(),
                config.health.metrics.clone(),
            ));
        }
    }
    if let Some(node) = voter.clone() {
        tokio::spawn(crate::health::votes::publish(
            client.clone(),
            config.health.namespace.clone(),
            node,
            prober.clone(),
            names_rx,
            probe_changed.clone(),
            changed.clone(),
        ));
    } else if checks {
        warn!("no --node-name: this agent probes no node and applies the others' verdicts");
    }

    let (tx, rx) = mpsc::channel::<Desired>();
    let reconciler = {
        let health = health.clone();
        std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || reconcile_loop(rx, apply, &health))
            .context("starting the reconcile thread")?
    };

    // The announcer follows the served addresses; `stop` makes it release its leases.
    let (addrs_tx, addrs_rx) = tokio::sync::watch::channel(announce::Announceable::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let announcer = config
        .announce
        .clone()
        .map(|a| tokio::spawn(announce::run(client.clone(), a, addrs_rx, stop_rx.clone())));

    let speaker = start_bgp(&config, &health, timers.handle())?;

    // The address allocator: elected on one agent, it writes the Services' status.
    let alloc_changed = Arc::new(Notify::new());
    let allocator = config.allocator.clone().map(|a| {
        tokio::spawn(allocator::run(
            client.clone(),
            a,
            pools.clone(),
            alloc_changed.clone(),
            stop_rx.clone(),
        ))
    });

    let mut last = Built::default();
    // Each Service's VIPs, rebuilt only when its objects change.
    let mut build_cache = desired::BuildCache::default();
    let mut logged_problems = BTreeSet::new();
    let mut logged_mode = None;
    // The first model is always sent, even an empty one: its apply attaches.
    let mut first = true;
    loop {
        let policy = AddressPolicy {
            pools: pools
                .get()
                .map(|p| p.state().iter().map(|p| pool_spec(p)).collect())
                .unwrap_or_default(),
            class: config.class,
        };
        let mut built = desired::build_with(
            &mut build_cache,
            &services.state(),
            &slices.state(),
            &nodes.state(),
            config.settings,
            &policy,
        );
        let mode = built.addressing.is_some();
        if logged_mode != Some(mode) {
            logged_mode = Some(mode);
            if mode {
                info!("address pools: serving and announcing only addresses of the IPAddressPools");
            } else {
                info!(
                    "no IPAddressPool: serving the addresses another controller (e.g. MetalLB) wrote into the Services, announcing none of them"
                );
            }
        }
        if built.addressing != last.addressing {
            alloc_changed.notify_one();
        }
        if let Some(load) = &config.health.load {
            let is_node = built.node_names.values().any(|n| *n == load.node_name);
            load.is_node.store(is_node, Ordering::Relaxed);
        }
        names_tx.send_if_modified(|old| {
            std::mem::replace(old, built.node_names.clone()) != built.node_names
        });
        let lease_state = leases.as_ref().map(Store::state);
        super::overlay::agent_overlay(
            &mut built,
            &prober,
            lease_state.as_deref(),
            &lease_clock,
            &config.health,
            config.node_name.as_deref(),
            votes.as_ref(),
        );
        // Unchanged lists keep the last model's allocations: the comparison below, the change
        // log and the plan then cost a pointer compare per unchanged VIP.
        built.desired.share_backends_with(&last.desired);
        for problem in built.problems.difference(&logged_problems) {
            warn!("{problem}");
        }
        logged_problems = built.problems.clone();
        if first || built.desired != last.desired {
            first = false;
            for change in desired::changes(&last, &built) {
                let (namespace, name) = change.service.split_once('/').unwrap_or(("", ""));
                tracing::info!(
                    namespace,
                    name,
                    vip = %change.vip,
                    node = change.node.as_deref(),
                    "{change}"
                );
            }
            if tx.send(built.desired.clone()).is_err() {
                // The reconcile thread is gone (it logged why): let the DaemonSet restart us.
                break;
            }
        }
        // What the L2 announcer contends for: only pool addresses, and none while this node
        // must not attract VIP traffic (a node missing from the API, as in the labs, may
        // announce); which nodes must not, by the shared state every agent reads alike.
        let announceable = built.announceable();
        let barred = announce::barred_nodes(&nodes.state(), votes.as_ref().map(|v| v.get().1));
        let wanted = announce::Announceable {
            addrs: built
                .desired
                .vips
                .iter()
                .map(|v| v.key.addr)
                .filter(|a| announceable.contains(a))
                .collect(),
            blocked: config
                .node_name
                .as_deref()
                .and_then(|me| barred.get(me).cloned()),
            barred,
        };
        addrs_tx.send_if_modified(|old| std::mem::replace(old, wanted) != *old);
        if let (Some(speaker), Some(node)) = (&speaker, &config.node_name) {
            let mut intent =
                super::bgp_select::intent(&services.state(), &nodes.state(), &built, node);
            // Only pool addresses are ever announced.
            let announceable = built.announceable();
            intent.addrs.retain(|a| announceable.contains(a));
            if let Some(p) = pools.get() {
                intent.adverts = pool_adverts.of(&p.state(), &built, &intent.addrs);
            }
            speaker.set(intent);
            if let Some(resources) = bgp_peers.as_ref().and_then(|r| r.get()) {
                let nodes = nodes.state();
                let me = nodes
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some(node.as_str()));
                speaker.set_extra_peers(peer_selection.peers(
                    &resources.peers.state(),
                    me.map(|n| &**n),
                    resources.secrets.as_ref().map(|s| s.state()).as_deref(),
                ));
            }
        }
        last = built;

        tokio::select! {
            _ = changed.notified() => {}
            _ = sigterm.recv() => { info!("SIGTERM: exiting; the dataplane keeps forwarding with the last state"); break; }
            _ = sigint.recv() => { info!("SIGINT: exiting; the dataplane keeps forwarding with the last state"); break; }
        }
        // Coalesce: wait until the events stop for DEBOUNCE (at most MAX_DELAY in all).
        let burst = Instant::now();
        while burst.elapsed() < MAX_DELAY
            && tokio::time::timeout(DEBOUNCE, changed.notified())
                .await
                .is_ok()
        {}
    }
    if let Some(speaker) = speaker {
        // Routers first: graceful shutdown, withdraw, close; XDP keeps forwarding meanwhile.
        speaker.shutdown().await;
    }
    let _ = stop_tx.send(true);
    if let Some(allocator) = allocator
        && tokio::time::timeout(RELEASE_TIMEOUT, allocator)
            .await
            .is_err()
    {
        warn!(
            "releasing the allocator's lease took over {RELEASE_TIMEOUT:?}: it expires by itself"
        );
    }
    if let Some(announcer) = announcer
        && tokio::time::timeout(RELEASE_TIMEOUT, announcer)
            .await
            .is_err()
    {
        warn!(
            "releasing the announcement leases took over {RELEASE_TIMEOUT:?}: they expire by themselves"
        );
    }
    drop(tx);
    reconciler
        .join()
        .map_err(|_| anyhow!("the reconcile thread panicked"))
}

/// Starts the BGP speaker (`--bgp`); it announces once the first model is in the maps.
fn start_bgp(
    config: &AgentConfig,
    health: &Arc<Health>,
    timers: &tokio::runtime::Handle,
) -> anyhow::Result<Option<crate::bgp::Speaker>> {
    let Some(bgp) = config.bgp.clone() else {
        return Ok(None);
    };
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let health = health.clone();
    tokio::spawn(async move {
        while !health.ready.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = ready_tx.send(true);
    });
    crate::bgp::Speaker::start(bgp, ready_rx, timers).map(Some)
}

/// `/healthz`'s answer for the last beats of the event loop and of the timers thread (`None`:
/// not started yet, healthy).
fn healthz_reply(beat: Option<Instant>, timers_beat: Option<Instant>, now: Instant) -> http::Reply {
    for (what, beat) in [("event loop", beat), ("timers thread", timers_beat)] {
        if let Some(since) = beat.map(|b| now.saturating_duration_since(b))
            && since > HEALTHZ_STALL
        {
            return http::Reply::text(
                503,
                format!(
                    "stalled: the agent's {what} has not run for {}s\n",
                    since.as_secs()
                ),
            );
        }
    }
    http::Reply::text(200, "ok\n")
}

/// Applies the newest model; retries failures with backoff, keeping the last applied state; applies
/// the running one again every [`crate::net::NEXT_HOP_REFRESH`] (next hops move under it).
fn reconcile_loop(rx: mpsc::Receiver<Desired>, mut apply: ApplyFn, health: &Health) {
    let mut pending: Option<Desired> = None;
    // The model in the maps: applied again when next hops are due a refresh.
    let mut applied: Option<Desired> = None;
    let mut refresh = NextHopRefresh::default();
    let mut retry = RETRY_FIRST;
    let mut unresolved: BTreeSet<IpAddr> = BTreeSet::new();
    let mut left_out = Vec::new();
    loop {
        let next = match &pending {
            None => rx.recv_timeout(refresh.wait()),
            Some(_) => rx.recv_timeout(retry),
        };
        match next {
            Ok(mut desired) => {
                // Only the newest model matters.
                while let Ok(newer) = rx.try_recv() {
                    desired = newer;
                }
                pending = Some(desired);
                retry = RETRY_FIRST;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // Due also while changes keep coming: one of them then refreshes.
        let pass = if refresh.due() {
            Pass::Refresh
        } else {
            Pass::Change
        };
        if pending.is_none() && pass == Pass::Refresh {
            pending = applied.take();
        }
        let Some(desired) = &pending else { continue };
        let started = Instant::now();
        match apply(desired, pass) {
            Ok(summary) => {
                if !summary.is_empty() {
                    info!("maps updated in {:?}: {summary}", started.elapsed());
                }
                if summary.left_out != left_out {
                    if summary.left_out.is_empty() {
                        info!("everything fits the maps again");
                    } else {
                        warn!(
                            "the maps have no room for {} item(s), applied without them: {}",
                            summary.left_out.len(),
                            summary
                                .left_out
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; ")
                        );
                    }
                    left_out = summary.left_out.clone();
                }
                let mut degraded: Vec<String> = summary
                    .left_out
                    .iter()
                    .map(|item| format!("left out (no room in the maps): {item}"))
                    .collect();
                degraded.extend(
                    summary
                        .unresolved
                        .iter()
                        .map(|addr| format!("node {addr}: unresolved (no ARP answer or route)")),
                );
                if let Ok(mut shown) = health.degraded.lock() {
                    *shown = degraded;
                }
                if summary.unresolved != unresolved {
                    for addr in summary.unresolved.difference(&unresolved) {
                        warn!(
                            "node {addr}: no ARP answer (or no route): draining on its last known MAC, or left out until it answers"
                        );
                    }
                    for addr in unresolved.difference(&summary.unresolved) {
                        info!("node {addr}: resolved again");
                    }
                    unresolved = summary.unresolved;
                }
                health.ready.store(true, Ordering::Relaxed);
                if unresolved.is_empty() {
                    applied = pending.take();
                } else {
                    retry = UNRESOLVED_RETRY;
                }
            }
            Err(e) => {
                health.ready.store(false, Ordering::Relaxed);
                error!(
                    "applying the model failed, the maps keep their last state; retrying in {retry:?}: {e:#}"
                );
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// `GET /healthz` (liveness): 200 "ok" while the agent's event loop and its timers thread run
/// (each beat within [`HEALTHZ_STALL`]), 503 naming how long it has not once it is stuck. It says nothing of the
/// API server or the maps: a lost API keeps the dataplane forwarding with the last state, and a
/// restart would not bring the API back. `GET /readyz`: 200 once the model from the API is in
/// the maps and the last apply succeeded, else 503; its body lists what is degraded (what the
/// last apply could not do, BGP sessions that are not established with their last error).
fn serve_health(
    addr: SocketAddr,
    health: Arc<Health>,
    bgp: Option<crate::bgp::BgpMetrics>,
    interface: String,
) -> anyhow::Result<http::Server> {
    let healthz: http::Handler = {
        let health = health.clone();
        Box::new(move || {
            let beat = health.beat.lock().ok().and_then(|b| *b);
            let timers_beat = health.timers_beat.lock().ok().and_then(|b| *b);
            healthz_reply(beat, timers_beat, Instant::now())
        })
    };
    let bgp_view = crate::bgp::view::handler(bgp.clone());
    let readyz: http::Handler = Box::new(move || {
        if health.ready.load(Ordering::Relaxed) {
            let mut body = format!("ready\n{interface}\n");
            if let Ok(degraded) = health.degraded.lock() {
                for line in degraded.iter() {
                    body.push_str(line);
                    body.push('\n');
                }
            }
            for line in bgp.iter().flat_map(|b| b.degraded_lines()) {
                body.push_str(&line);
                body.push('\n');
            }
            http::Reply::text(200, body)
        } else {
            http::Reply::text(503, "not synced\n")
        }
    });
    let server = http::serve(
        addr,
        "health",
        "--health-addr",
        vec![
            ("/healthz", healthz),
            ("/readyz", readyz),
            (crate::bgp::view::PATH, bgp_view),
        ],
    )?;
    info!("health probes on http://{addr}/healthz and /readyz, BGP sessions on /bgp");
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::bfd::{self, Bfd, BfdConfig, BfdPeer, Link, Packet, State};
    use serde_json::json;
    use std::net::Ipv4Addr;

    #[test]
    fn healthz_fails_once_the_event_loop_stalls() {
        let now = Instant::now();
        let recent = Some(now - Duration::from_secs(2));
        let old = Some(now - HEALTHZ_STALL - Duration::from_secs(5));
        let ok = healthz_reply(recent, recent, now);
        assert_eq!((ok.status, ok.body.as_str()), (200, "ok\n"));
        assert_eq!(healthz_reply(None, None, now).status, 200);
        assert_eq!(healthz_reply(recent, None, now).status, 200);
        let stalled = healthz_reply(old, recent, now);
        assert_eq!(stalled.status, 503);
        assert_eq!(
            stalled.body,
            "stalled: the agent's event loop has not run for 20s\n"
        );
        let stalled = healthz_reply(recent, old, now);
        assert_eq!(
            (stalled.status, stalled.body.as_str()),
            (
                503,
                "stalled: the agent's timers thread has not run for 20s\n"
            )
        );
    }

    /// What the watchers hold.
    type Cluster = (Vec<Arc<Service>>, Vec<Arc<EndpointSlice>>, Vec<Arc<Node>>);

    /// A cluster as big as issue 25 asks: `n` LoadBalancer Services of two ports each (every
    /// other one `externalTrafficPolicy: Local`), one EndpointSlice of three endpoints each,
    /// over 20 nodes. Each `round` moves every endpoint to another node (a rolling restart:
    /// every Local Service's weights change).
    fn big_cluster(n: usize, round: usize) -> Cluster {
        let nodes: Vec<Arc<Node>> = (0..20)
            .map(|i| {
                Arc::new(
                    serde_json::from_value(json!({
                        "metadata": {"name": format!("n{i}")},
                        "status": {
                            "addresses": [{"type": "InternalIP", "address": format!("10.0.0.{}", i + 1)}],
                            "conditions": [{"type": "Ready", "status": "True"}],
                        },
                    }))
                    .expect("node"),
                )
            })
            .collect();
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for i in 0..n {
            let name = format!("svc{i}");
            let ip = format!("172.16.{}.{}", i / 250, i % 250 + 1);
            let policy = if i % 2 == 0 { "Local" } else { "Cluster" };
            services.push(Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "load"},
                    "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                             "ports": [{"name": "http", "port": 80, "protocol": "TCP"},
                                       {"name": "https", "port": 443, "protocol": "TCP"}]},
                    "status": {"loadBalancer": {"ingress": [{"ip": ip}]}},
                }))
                .expect("service"),
            ));
            let endpoints: Vec<serde_json::Value> = (0..3)
                .map(|e| {
                    json!({"addresses": [format!("10.{}.{}.{}", 1 + e, i / 250, i % 250 + 1)],
                           "nodeName": format!("n{}", (i + e * 7 + round) % 20),
                           "conditions": {"ready": true, "serving": true, "terminating": false}})
                })
                .collect();
            slices.push(Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-abcde"), "namespace": "load",
                                 "labels": {SERVICE_NAME_LABEL: name}},
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                              {"name": "https", "port": 8443, "protocol": "TCP"}],
                }))
                .expect("slice"),
            ));
        }
        (services, slices, nodes)
    }

    /// The synchronous part of one pass of `run_async`'s loop after a change (without the
    /// health overlay and the logging): the build, the changes against the last model, the
    /// comparison, the copy for the reconcile thread, the BGP intent.
    fn model_pass((services, slices, nodes): &Cluster, last: &Built) -> Built {
        let built = desired::build(
            services,
            slices,
            nodes,
            Settings::default(),
            &AddressPolicy::default(),
        );
        let changes = desired::changes(last, &built);
        if built.desired != last.desired {
            std::hint::black_box((changes.len(), built.desired.clone()));
        }
        let announceable = built.announceable();
        let intent = super::super::bgp_select::intent(services, nodes, &built, "n0");
        std::hint::black_box((announceable, intent));
        built
    }

    /// What a router saw of a sluice BFD session while the agent's runtime was busy.
    struct Seen {
        /// The longest time between two control packets from sluice.
        max_gap: Duration,
        /// Packets from sluice that said anything but Up once the session was Up (its side of
        /// a flap).
        flaps: usize,
        /// Gaps of the detection time or more: the router's side of a flap (it would have
        /// declared the session down).
        router_downs: usize,
        packets: usize,
        /// The longest time between two probes of a backend checked every [`PROBE_EVERY`].
        max_probe_gap: Duration,
        probes: usize,
        /// The longest model build meanwhile, and how many ran.
        max_build: Duration,
        builds: usize,
        /// The first pass (against an empty model), before the measured load.
        first_pass: Duration,
        /// The longest the router's thread (a plain OS thread, idle but for 2 ms wake-ups) was
        /// not run: a stall of the whole machine, which no runtime design can avoid.
        machine_stall: Duration,
    }

    impl Seen {
        /// BFD sent within the detection time and never flapped; no probe interval passed
        /// without a probe.
        fn on_time(&self) -> Result<(), String> {
            if self.max_gap >= DETECTION {
                return Err(format!(
                    "BFD went {:?} without sending (detection time {DETECTION:?})",
                    self.max_gap
                ));
            }
            if (self.flaps, self.router_downs) != (0, 0) {
                return Err(format!(
                    "the BFD session flapped: {} non-Up packets from sluice, {} detection timeouts",
                    self.flaps, self.router_downs
                ));
            }
            if self.max_probe_gap >= 2 * PROBE_EVERY {
                return Err(format!(
                    "a probe interval ({PROBE_EVERY:?}) went without a probe: {:?} between two",
                    self.max_probe_gap
                ));
            }
            Ok(())
        }

        fn report(&self) -> String {
            format!(
                "first model pass {:?}, then {} passes of 5,000 Services (a burst touching all of them) on the agent's runtime (longest {:?}); BFD: {} packets, largest gap {:?}, {} gap(s) >= {DETECTION:?} (router declares down), {} non-Up packet(s) from sluice; probes: {}, largest gap {:?} (every {PROBE_EVERY:?}); the router's own thread stalled up to {:?}",
                self.first_pass,
                self.builds,
                self.max_build,
                self.packets,
                self.max_gap,
                self.router_downs,
                self.flaps,
                self.probes,
                self.max_probe_gap,
                self.machine_stall
            )
        }
    }

    const DETECTION: Duration = Duration::from_millis(300);
    const PROBE_EVERY: Duration = Duration::from_millis(100);

    /// Runs sluice's BFD (100 ms x 3) on `timers` against a router on a thread of its own
    /// (plain UDP on loopback, TTL 255, never late), brings it Up, then spends `load` on the
    /// calling runtime the way the agent's loop does after a relist or a burst of changes:
    /// `desired::build` of 5,000 Services (synchronous, as in `run_async`), yielding between
    /// builds. A health probe (TCP, every [`PROBE_EVERY`]) runs on `timers` too. Returns what
    /// the router and the probed backend saw meanwhile.
    async fn bfd_while_building(timers: &tokio::runtime::Handle, load: Duration) -> Seen {
        let clusters = [big_cluster(5000, 0), big_cluster(5000, 1)];
        let router = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        router.set_ttl(255).unwrap();
        router
            .set_read_timeout(Some(Duration::from_millis(2)))
            .unwrap();
        let sockets = {
            let _in = timers.enter();
            bfd::Sockets::open(&[Ipv4Addr::LOCALHOST.into()], 0).unwrap()
        };
        let bfd_at = sockets.local_addrs()[0];
        let (link_tx, mut link) = tokio::sync::watch::channel(Link::Waiting);
        let cfg = BfdConfig {
            interval: Duration::from_millis(100),
            multiplier: 3,
        };
        let peer = BfdPeer {
            addr: Ipv4Addr::LOCALHOST.into(),
            port: router.local_addr().unwrap().port(),
            link: link_tx,
        };
        let bfd = Bfd::new(cfg, sockets, vec![peer]).unwrap();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = timers.spawn(bfd.run(stop_rx));

        // The router: answers as RFC 5880's state machine would, every 100 ms, and records
        // when each packet of sluice's arrived and what state it said.
        let done = Arc::new(AtomicBool::new(false));
        let router_thread = std::thread::spawn({
            let done = done.clone();
            move || {
                let mut seen: Vec<(Instant, State)> = Vec::new();
                let (mut sluice_disc, mut sluice_state) = (0u32, State::Down);
                let mut next_tx = Instant::now();
                let mut buf = [0u8; 64];
                // The longest this thread itself was not run (it wakes every 2 ms).
                let (mut stall, mut last_turn) = (Duration::ZERO, Instant::now());
                while !done.load(Ordering::Relaxed) {
                    stall = stall.max(last_turn.elapsed());
                    last_turn = Instant::now();
                    if let Ok((n, _)) = router.recv_from(&mut buf)
                        && let Some(p) = Packet::decode(&buf[..n])
                    {
                        seen.push((Instant::now(), p.state));
                        sluice_disc = p.my_disc;
                        sluice_state = p.state;
                    }
                    if Instant::now() >= next_tx && sluice_disc != 0 {
                        let state = match sluice_state {
                            State::Down => State::Init,
                            State::Init | State::Up => State::Up,
                            State::AdminDown => State::Down,
                        };
                        let p = Packet {
                            diag: 0,
                            state,
                            poll: false,
                            final_: false,
                            detect_mult: 3,
                            my_disc: 0x5eed_0001,
                            your_disc: sluice_disc,
                            desired_min_tx: 100_000,
                            required_min_rx: 100_000,
                        };
                        let _ = router.send_to(&p.encode(), bfd_at);
                        next_tx = Instant::now() + Duration::from_millis(100);
                    }
                }
                (seen, stall)
            }
        });
        // The backend: records when each probe connects.
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_port = backend.local_addr().unwrap().port();
        backend.set_nonblocking(true).unwrap();
        let backend_thread = std::thread::spawn({
            let done = done.clone();
            move || {
                let mut accepted = Vec::new();
                while !done.load(Ordering::Relaxed) {
                    match backend.accept() {
                        Ok(_) => accepted.push(Instant::now()),
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
                accepted
            }
        });
        let prober =
            crate::health::probe::Prober::new(timers.clone(), Arc::new(Notify::new()), None);
        let mut check =
            crate::model::HealthCheck::new(crate::model::CheckProtocol::Tcp, backend_port, "");
        check.interval = PROBE_EVERY;
        prober.set_targets(&std::collections::BTreeMap::from([(
            (IpAddr::from(Ipv4Addr::LOCALHOST), check),
            BTreeSet::from(["load/svc0".into()]),
        )]));
        let up = tokio::time::timeout(Duration::from_secs(5), link.wait_for(|l| *l == Link::Up))
            .await
            .is_ok();
        assert!(up, "the BFD session never came Up: {:?}", *link.borrow());
        // The first pass (against nothing: every VIP and backend is a change), then a burst
        // of changes to every Service, pass after pass; all measured.
        let started = Instant::now();
        let mut last = model_pass(&clusters[1], &Built::default());
        let first_pass = started.elapsed();
        let (mut max_build, mut builds) = (Duration::ZERO, 0);
        while builds < 2 || started.elapsed() < load {
            let t = Instant::now();
            last = model_pass(&clusters[builds % 2], &last);
            max_build = max_build.max(t.elapsed());
            builds += 1;
            tokio::task::yield_now().await;
        }
        let ended = Instant::now();
        // A moment for the last packets to arrive.
        tokio::time::sleep(Duration::from_millis(150)).await;
        done.store(true, Ordering::Relaxed);
        let (seen, machine_stall) = router_thread.join().unwrap();
        let accepted = backend_thread.join().unwrap();
        drop(prober);
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;

        let from = seen
            .iter()
            .position(|(_, s)| *s == State::Up)
            .expect("sluice said Up");
        // Every gap that ended after the load began (the one it began in included), and the
        // one still open when it ended.
        let gaps_of = |times: &[Instant]| -> Vec<Duration> {
            let mut gaps: Vec<Duration> = times
                .windows(2)
                .filter(|w| w[1] >= started)
                .map(|w| w[1].duration_since(w[0]))
                .collect();
            if let Some(last) = times.iter().rfind(|t| **t <= ended) {
                gaps.push(ended.duration_since(*last));
            }
            gaps
        };
        let gaps = gaps_of(&seen[from..].iter().map(|(t, _)| *t).collect::<Vec<_>>());
        let probe_gaps = gaps_of(&accepted);
        Seen {
            max_gap: gaps.iter().copied().max().unwrap_or(Duration::MAX),
            flaps: seen[from..].iter().filter(|(_, s)| *s != State::Up).count(),
            router_downs: gaps.iter().filter(|g| **g >= DETECTION).count(),
            packets: gaps.len(),
            max_probe_gap: probe_gaps.iter().copied().max().unwrap_or(Duration::MAX),
            probes: probe_gaps.len(),
            max_build,
            builds,
            first_pass,
            machine_stall,
        }
    }

    /// Issue 25: a model build of 5,000 Services takes hundreds of milliseconds; on the
    /// agent's runtime it would hold BFD's transmissions past the detection time (300 ms)
    /// and the routers would drop the node. On the `timers` thread they keep time.
    #[tokio::test(flavor = "current_thread")]
    async fn bfd_keeps_time_on_the_timers_thread_while_the_agent_builds_5000_services() {
        let (services, slices, nodes) = big_cluster(5000, 0);
        let t = Instant::now();
        let built = desired::build(
            &services,
            &slices,
            &nodes,
            Settings::default(),
            &AddressPolicy::default(),
        );
        eprintln!(
            "desired::build of 5,000 Services x 2 ports ({} VIPs, 20 nodes): {:?}",
            built.desired.vips.len(),
            t.elapsed()
        );
        assert_eq!(built.desired.vips.len(), 10_000);
        let (services1, slices1, nodes1) = big_cluster(5000, 1);
        let other = desired::build(
            &services1,
            &slices1,
            &nodes1,
            Settings::default(),
            &AddressPolicy::default(),
        );
        let t = Instant::now();
        let changes = desired::changes(&built, &other).len();
        let changes_took = t.elapsed();
        let t = Instant::now();
        let intent = super::super::bgp_select::intent(&services, &nodes, &built, "n0");
        eprintln!(
            "desired::changes after every endpoint moved ({changes} lines): {changes_took:?}; bgp_select::intent ({} addresses): {:?}",
            intent.addrs.len(),
            t.elapsed()
        );
        drop((built, other));

        let timers = Timers::start().unwrap();
        // The host is shared (2 cores, other builds, this suite's other tests): a run in which
        // an independent idle thread was not scheduled for 100 ms either says nothing of the
        // runtimes, and is run again (at most 3 times in all).
        for attempt in 1..=3 {
            let seen = bfd_while_building(timers.handle(), Duration::from_secs(3)).await;
            eprintln!("timers thread: {}", seen.report());
            assert!(seen.builds >= 2, "the load did not run");
            match seen.on_time() {
                Ok(()) => return,
                Err(late) if seen.machine_stall >= PROBE_EVERY && attempt < 3 => {
                    eprintln!("{late}, but the machine stalled too: once more");
                }
                Err(late) => panic!("{late} ({})", seen.report()),
            }
        }
    }

    /// The mutation: BFD and the probe on the agent's own runtime (as before the `timers`
    /// thread). Run it with `--ignored` to see the figures; it asserts that something is late
    /// (in the test profile: BFD gaps of 0.45-1.2 s, the session flaps on both sides; with
    /// lb-userspace optimized: BFD gaps of ~270 ms, probes ~290 ms apart instead of 100 ms).
    #[tokio::test(flavor = "current_thread")]
    #[ignore = "shows the failure the timers thread fixes (timing of this machine)"]
    async fn bfd_on_the_agents_runtime_misses_its_detection_time() {
        let seen =
            bfd_while_building(&tokio::runtime::Handle::current(), Duration::from_secs(3)).await;
        eprintln!("agent's runtime: {}", seen.report());
        assert!(seen.on_time().is_err(), "nothing was late");
    }
}
