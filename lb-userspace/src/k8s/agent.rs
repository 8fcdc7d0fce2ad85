//! The agent's loop: list+watch Services, EndpointSlices and Nodes, rebuild the model when they
//! change (bursts coalesced), and hand it to a reconcile thread that owns the maps.
//!
//! Resilience comes from the watchers and from keeping the last state: while the API server is
//! unreachable the maps keep what they have (the dataplane forwards on) and the watchers retry with
//! backoff; a `410 Gone` (compacted history) makes a watcher relist, after which the model is
//! rebuilt from the fresh lists. Nothing is applied before all three lists are complete, so a
//! restarted agent never shrinks the maps it adopts to a partial view.

use std::collections::BTreeSet;
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
use super::pools::{ClassPolicy, IPAddressPool, pool_spec};
use super::watch_metrics::WatchMetrics;
use super::watch_probe::WatchProbeLayer;
use crate::http;
use crate::model::{Desired, Settings};
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
}

/// How long the first apply waits for the nodes' load Leases (after the other lists).
const LEASES_FIRST_LIST: Duration = Duration::from_secs(5);

/// Applies one model to the dataplane (backends that cannot be resolved drain on their last
/// known MAC, or wait); returns what changed. Runs on the reconcile thread, which owns it (and
/// the maps inside it).
pub type ApplyFn = Box<dyn FnMut(&Desired) -> anyhow::Result<Summary> + Send>;

#[derive(Default)]
struct Health {
    /// The first full model has been applied, and the last apply succeeded.
    ready: AtomicBool,
    /// What the last apply could not do (no room in the maps, nodes without an ARP answer),
    /// one line each: `/readyz` shows it (ready all the same: everything else is applied).
    degraded: std::sync::Mutex<Vec<String>>,
    /// The last beat of the agent's event loop (the runtime that runs the watches, the main
    /// loop, BGP and the announcer); `None` before the first.
    beat: std::sync::Mutex<Option<Instant>>,
}

impl Health {
    fn beat(&self) {
        if let Ok(mut beat) = self.beat.lock() {
            *beat = Some(Instant::now());
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
    let kube_config = match &config.kubeconfig {
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
    Ok(match &config.watches {
        Some(watches) => builder
            .with_layer(&WatchProbeLayer(watches.clone()))
            .build(),
        None => builder.build(),
    })
}

/// Starts a list+watch of `api` into a store; every change wakes `changed`. Plain list+watch:
/// streaming lists need Kubernetes >= 1.27 and gain little for an agent's few object kinds.
fn watch<K>(
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

/// Watches the IPAddressPools when the resource is installed; `None` (logged) when it is not,
/// or when this agent may not read it: sluice then owns no address.
async fn watch_pools(
    client: &Client,
    changed: Arc<Notify>,
    metrics: Option<WatchMetrics>,
) -> Option<Store<IPAddressPool>> {
    let api: Api<IPAddressPool> = Api::all(client.clone());
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Some(watch(api, watcher::Config::default(), changed, metrics)),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            info!(
                "the IPAddressPool resource (sluice.io) is not installed: sluice owns no address (apply deploy/05-crd-ipaddresspools.yaml and a pool to let it assign and announce)"
            );
            None
        }
        Err(e) => {
            warn!(
                "cannot list IPAddressPools ({e}): sluice owns no address until it can (check the ClusterRole)"
            );
            None
        }
    }
}

async fn run_async(config: AgentConfig, apply: ApplyFn) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let health = Arc::new(Health::default());
    // Answered until the agent returns.
    let _health_server = match config.health_addr {
        Some(addr) => Some(serve_health(addr, health.clone())?),
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
    let pools = watch_pools(&client, changed.clone(), config.watches.clone()).await;
    let ready = async {
        services.wait_until_ready().await?;
        slices.wait_until_ready().await?;
        if let Some(p) = &pools {
            p.wait_until_ready().await?;
        }
        nodes.wait_until_ready().await
    };
    tokio::select! {
        r = ready => r.map_err(|e| anyhow!("a watcher stopped before its first list: {e}"))?,
        _ = sigterm.recv() => { info!("SIGTERM before the first sync: exiting"); return Ok(()); }
        _ = sigint.recv() => { info!("SIGINT before the first sync: exiting"); return Ok(()); }
    }

    // Health: probes of the backends; the nodes' load Leases (and this node's publisher).
    let prober = crate::health::probe::Prober::new(
        tokio::runtime::Handle::current(),
        changed.clone(),
        config.health.metrics.clone(),
    );
    let leases = config.health.load_aware.then(|| {
        watch(
            Api::<Lease>::namespaced(client.clone(), &config.health.namespace),
            watcher::Config::default().labels(&format!(
                "{}={}",
                crate::health::load::LEASE_LABEL,
                crate::health::load::LEASE_LABEL_VALUE
            )),
            // Not `changed`: heartbeats alone must not rebuild; `follow` looks at what they say.
            Arc::new(Notify::new()),
            None,
        )
    });
    // When each Lease last changed, by this agent's clock (the reader judges freshness).
    let lease_clock = Arc::new(crate::health::load::LeaseClock::default());
    if let Some(store) = &leases {
        if tokio::time::timeout(LEASES_FIRST_LIST, store.wait_until_ready())
            .await
            .is_err()
        {
            warn!(
                "no list of the load Leases in namespace {} within {LEASES_FIRST_LIST:?}: starting with neutral weights",
                config.health.namespace
            );
        }
        tokio::spawn(crate::health::load::follow(
            store.clone(),
            nodes.clone(),
            lease_clock.clone(),
            changed.clone(),
            config.health.follow_every,
            config.health.metrics.clone(),
        ));
        if let Some(load) = config.health.load.clone() {
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

    let (tx, rx) = mpsc::channel::<Desired>();
    let reconciler = {
        let health = health.clone();
        std::thread::Builder::new()
            .name("reconcile".into())
            .spawn(move || reconcile_loop(rx, apply, &health))
            .context("starting the reconcile thread")?
    };

    // The announcer follows the served addresses; `stop` makes it release its leases.
    let (addrs_tx, addrs_rx) = tokio::sync::watch::channel(BTreeSet::<IpAddr>::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let announcer = config
        .announce
        .clone()
        .map(|a| tokio::spawn(announce::run(client.clone(), a, addrs_rx, stop_rx.clone())));

    let speaker = start_bgp(&config, &health)?;

    // The address allocator: elected on one agent, it writes the Services' status.
    let alloc_changed = Arc::new(Notify::new());
    let allocator = match (&pools, config.allocator.clone()) {
        (Some(store), Some(a)) => Some(tokio::spawn(allocator::run(
            client.clone(),
            a,
            store.clone(),
            alloc_changed.clone(),
            stop_rx.clone(),
        ))),
        _ => None,
    };

    let mut last = Built::default();
    let mut logged_problems = BTreeSet::new();
    let mut logged_mode = None;
    // The first model is always sent, even an empty one: its apply attaches.
    let mut first = true;
    loop {
        let policy = AddressPolicy {
            pools: pools
                .as_ref()
                .map(|p| p.state().iter().map(|p| pool_spec(p)).collect())
                .unwrap_or_default(),
            class: config.class,
        };
        let mut built = desired::build(
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
        let lease_state = leases.as_ref().map(Store::state);
        super::overlay::agent_overlay(
            &mut built,
            &prober,
            lease_state.as_deref(),
            &lease_clock,
            &config.health,
        );
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
            let announceable = built.announceable();
            let addrs: BTreeSet<IpAddr> = built
                .desired
                .vips
                .iter()
                .map(|v| v.key.addr)
                .filter(|a| announceable.contains(a))
                .collect();
            addrs_tx.send_if_modified(|old| std::mem::replace(old, addrs) != *old);
            if tx.send(built.desired.clone()).is_err() {
                // The reconcile thread is gone (it logged why): let the DaemonSet restart us.
                break;
            }
        }
        if let (Some(speaker), Some(node)) = (&speaker, &config.node_name) {
            let mut intent =
                super::bgp_select::intent(&services.state(), &nodes.state(), &built, node);
            // Only pool addresses are ever announced.
            let announceable = built.announceable();
            intent.addrs.retain(|a| announceable.contains(a));
            speaker.set(intent);
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
    crate::bgp::Speaker::start(bgp, ready_rx).map(Some)
}

/// `/healthz`'s answer for the event loop's last beat (`None`: not started yet, healthy).
fn healthz_reply(beat: Option<Instant>, now: Instant) -> http::Reply {
    match beat.map(|b| now.saturating_duration_since(b)) {
        Some(since) if since > HEALTHZ_STALL => http::Reply::text(
            503,
            format!(
                "stalled: the agent's event loop has not run for {}s\n",
                since.as_secs()
            ),
        ),
        _ => http::Reply::text(200, "ok\n"),
    }
}

/// Applies the newest model; retries failures with backoff, keeping the last applied state.
fn reconcile_loop(rx: mpsc::Receiver<Desired>, mut apply: ApplyFn, health: &Health) {
    let mut pending: Option<Desired> = None;
    let mut retry = RETRY_FIRST;
    let mut unresolved: BTreeSet<IpAddr> = BTreeSet::new();
    let mut left_out = Vec::new();
    loop {
        let next = match &pending {
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
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
        let Some(desired) = &pending else { continue };
        let started = Instant::now();
        match apply(desired) {
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
                    pending = None;
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

/// `GET /healthz` (liveness): 200 "ok" while the agent's event loop runs (it beat within
/// [`HEALTHZ_STALL`]), 503 naming how long it has not once it is stuck. It says nothing of the
/// API server or the maps: a lost API keeps the dataplane forwarding with the last state, and a
/// restart would not bring the API back. `GET /readyz`: 200 once the model from the API is in
/// the maps and the last apply succeeded, else 503.
fn serve_health(addr: SocketAddr, health: Arc<Health>) -> anyhow::Result<http::Server> {
    let healthz: http::Handler = {
        let health = health.clone();
        Box::new(move || {
            let beat = health.beat.lock().ok().and_then(|b| *b);
            healthz_reply(beat, Instant::now())
        })
    };
    let readyz: http::Handler = Box::new(move || {
        if health.ready.load(Ordering::Relaxed) {
            let mut body = String::from("ready\n");
            if let Ok(degraded) = health.degraded.lock() {
                for line in degraded.iter() {
                    body.push_str(line);
                    body.push('\n');
                }
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
        vec![("/healthz", healthz), ("/readyz", readyz)],
    )?;
    info!("health probes on http://{addr}/healthz and /readyz");
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_once_the_event_loop_stalls() {
        let now = Instant::now();
        let ok = healthz_reply(Some(now - Duration::from_secs(2)), now);
        assert_eq!((ok.status, ok.body.as_str()), (200, "ok\n"));
        assert_eq!(healthz_reply(None, now).status, 200);
        let stalled = healthz_reply(Some(now - HEALTHZ_STALL - Duration::from_secs(5)), now);
        assert_eq!(stalled.status, 503);
        assert_eq!(
            stalled.body,
            "stalled: the agent's event loop has not run for 20s\n"
        );
    }
}
