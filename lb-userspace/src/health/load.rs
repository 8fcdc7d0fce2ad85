//! A node's load: measured (CPU pressure from `/proc/pressure/cpu` where the kernel has PSI,
//! else the load average per core; accept-queue overflows from `/proc/net/netstat` count as
//! saturation) or read from a file (`--load-file`, for tests), smoothed, run through the
//! control law, and published with the resulting multiplier on this node's Lease
//! `sluice-node-<node>` in the agent's namespace (the Role it already has for Leases).
//!
//! Every agent reads all nodes' Leases and applies the published multipliers, its own included,
//! so all nodes build the same tables. What a Lease says is trusted no further than it must be
//! (any node's credentials may write any Lease of the namespace, see the README's threat model):
//! - its load must be a finite number in `0..=`[`MAX_LOAD`] (the writer clamps what it measures),
//!   its multiplier a whole number, clamped to `control::FLOOR..=100`: a Lease can shrink its
//!   node's share to a tenth, never grow it past the node's base weight;
//! - only Leases of existing Nodes count (invented nodes cannot move the mean load);
//! - freshness is the READER's judgement: a Lease counts while this agent has seen it change
//!   within [`STALE_AFTER`] (by this agent's monotonic clock, [`LeaseClock`]) and its `renewTime`
//!   is not older than that by this node's wall clock (skew up to ~20 s tolerated); the writer's
//!   `leaseDurationSeconds` and a `renewTime` it claims are never enough. A stale Lease counts as
//!   unknown: multiplier 100, neutral, never "idle".
//!
//! A Lease that breaks these rules counts as absent and is reported (once per change).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use log::{info, warn};
use serde_json::json;
use tokio::sync::Notify;

use super::metrics::HealthMetrics;
use super::{NodeLoad, control};

/// Lease name prefix of the per-node load records.
pub const LEASE_PREFIX: &str = "sluice-node-";
/// The label that selects them (the agent watches only these).
pub const LEASE_LABEL: &str = "app.kubernetes.io/component";
pub const LEASE_LABEL_VALUE: &str = "sluice-node-load";
pub const LOAD_ANNOTATION: &str = "sluice.io/load";
pub const MULTIPLIER_ANNOTATION: &str = "sluice.io/weight-multiplier";
/// A Lease older than this counts as unknown (neutral).
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// The highest load a Lease may say (a node saturated four times over): the writer clamps to it,
/// a reader refuses anything above (or not finite, or negative).
pub const MAX_LOAD: f64 = 4.0;
/// Published at least this often even when nothing changed.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Default control period (`--load-interval`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// Where the load comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadSource {
    /// PSI, else load average per core; accept-queue overflows as a saturation signal.
    System,
    /// A file holding one number (0 idle .. 1 saturated): tests, or an external measurement.
    File(PathBuf),
}

/// What the load loop needs.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub node_name: String,
    /// The namespace of the Leases (the agent's own).
    pub namespace: String,
    pub source: LoadSource,
    /// The control period: one sample, one step of the law, at most one publication.
    pub interval: Duration,
    /// Whether this node is a Node of the cluster (set by the agent from its Node list): an
    /// agent that is no backend has no weight to shape and publishes nothing.
    pub is_node: Arc<std::sync::atomic::AtomicBool>,
}

/// Takes samples from a [`LoadSource`].
pub struct Sampler {
    source: LoadSource,
    overflows: Option<(u64, Instant)>,
}

impl Sampler {
    pub fn new(source: LoadSource) -> Self {
        Self {
            source,
            overflows: None,
        }
    }

    /// One reading and where it came from.
    pub fn sample(&mut self) -> anyhow::Result<(f64, String)> {
        match &self.source {
            LoadSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --load-file {}", path.display()))?;
                let v: f64 = text.trim().parse().map_err(|_| {
                    anyhow!(
                        "--load-file {}: {:?} is not a number",
                        path.display(),
                        text.trim()
                    )
                })?;
                anyhow::ensure!(
                    v.is_finite() && v >= 0.0,
                    "--load-file {}: {v} is not a load (0 or more)",
                    path.display()
                );
                Ok((v, "file".into()))
            }
            LoadSource::System => {
                let (mut load, mut what) = match std::fs::read_to_string("/proc/pressure/cpu")
                    .ok()
                    .and_then(|t| psi_some_avg10(&t))
                {
                    Some(p) => (p / 100.0, format!("cpu pressure {p:.1}%")),
                    None => {
                        let avg = std::fs::read_to_string("/proc/loadavg")
                            .context("reading /proc/loadavg")?;
                        let one: f64 =
                            avg.split_whitespace()
                                .next()
                                .and_then(|v| v.parse().ok())
                                .ok_or_else(|| anyhow!("/proc/loadavg: {avg:?} unreadable"))?;
                        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                        (
                            one / cores as f64,
                            format!("load average {one:.2} on {cores} cores"),
                        )
                    }
                };
                if let Some(total) = std::fs::read_to_string("/proc/net/netstat")
                    .ok()
                    .and_then(|t| listen_overflows(&t))
                {
                    let now = Instant::now();
                    if let Some((before, at)) = self.overflows
                        && total > before
                    {
                        let rate = (total - before) as f64
                            / now.duration_since(at).as_secs_f64().max(0.001);
                        // Accept queues overflowing: the node is saturated whatever the CPU says.
                        load = load.max(1.0);
                        what.push_str(&format!("; {rate:.1} accept-queue overflows/s"));
                    }
                    self.overflows = Some((total, now));
                }
                Ok((load, what))
            }
        }
    }
}

/// `some avg10=X` of a PSI file.
fn psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// TcpExt ListenOverflows of `/proc/net/netstat` (a header line, then a value line).
fn listen_overflows(text: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let header = lines.next()?;
    let values = lines.next()?;
    let i = header
        .split_whitespace()
        .position(|k| k == "ListenOverflows")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The Lease name of a node's load record.
pub fn lease_name(node: &str) -> String {
    format!("{LEASE_PREFIX}{node}")
}

/// When this agent last saw each Lease change, by its own monotonic clock: the reader, not the
/// writer, decides whether a Lease is fresh. Shared by everything that reads the Leases.
#[derive(Debug, Default)]
pub struct LeaseClock {
    /// By Lease name: what it said (its resourceVersion, else its content) and when that was
    /// first seen.
    seen: Mutex<BTreeMap<String, (String, Instant)>>,
}

impl LeaseClock {
    /// Notes what `leases` say at `now`; returns when each last changed. Leases gone are
    /// forgotten.
    pub(super) fn observe(&self, leases: &[Arc<Lease>], now: Instant) -> BTreeMap<String, Instant> {
        let Ok(mut seen) = self.seen.lock() else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for lease in leases {
            let Some(name) = lease.metadata.name.clone() else {
                continue;
            };
            let version = lease.metadata.resource_version.clone().unwrap_or_else(|| {
                format!(
                    "{:?} {:?}",
                    lease.metadata.annotations,
                    lease.spec.as_ref().and_then(|s| s.renew_time.as_ref())
                )
            });
            let at = match seen.get(&name) {
                Some((v, at)) if *v == version => *at,
                _ => now,
            };
            seen.insert(name.clone(), (version, at));
            out.insert(name, at);
        }
        seen.retain(|name, _| out.contains_key(name));
        out
    }
}

/// Whether a Lease counts as fresh for this reader: it has seen it change within
/// [`STALE_AFTER`] by its own clock (`changed`, from [`LeaseClock::observe`]) and its
/// `renewTime` is not older than that by this node's wall clock.
pub(super) fn is_fresh(
    lease: &Lease,
    changed: &BTreeMap<String, Instant>,
    wall: Timestamp,
    now: Instant,
) -> bool {
    let renewed = lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .is_some_and(|t| {
            (wall.as_millisecond() - t.0.as_millisecond()) < STALE_AFTER.as_millis() as i64
        });
    let seen_change = lease
        .metadata
        .name
        .as_ref()
        .and_then(|n| changed.get(n))
        .is_some_and(|at| now.saturating_duration_since(*at) < STALE_AFTER);
    renewed && seen_change
}

/// What the Leases say: the loads that count, and why the others do not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Readings {
    /// By node name: existing Nodes only, valid Leases only.
    pub loads: BTreeMap<String, NodeLoad>,
    /// "Lease NAME: what is wrong; ignored", for every Lease that does not count.
    pub problems: BTreeSet<String>,
}

/// A load as published: a finite number in `0..=MAX_LOAD`.
fn parse_load(v: &str) -> Result<f64, String> {
    let load: f64 = v
        .parse()
        .map_err(|_| format!("{LOAD_ANNOTATION} {v:?} is not a number"))?;
    if !load.is_finite() || !(0.0..=MAX_LOAD).contains(&load) {
        return Err(format!("{LOAD_ANNOTATION} {v:?} is outside 0..={MAX_LOAD}"));
    }
    Ok(load)
}

/// Every existing node's published load, by node name, judged fresh or stale by this reader:
/// `wall` and `now` are its clocks, `nodes` the names of the cluster's Nodes, `clock` what it
/// has seen of the Leases before.
pub fn node_loads(
    leases: &[Arc<Lease>],
    nodes: &BTreeSet<String>,
    clock: &LeaseClock,
    wall: Timestamp,
    now: Instant,
) -> Readings {
    let changed = clock.observe(leases, now);
    let mut out = Readings::default();
    for lease in leases {
        let Some(name) = lease.metadata.name.as_deref() else {
            continue;
        };
        let Some(node) = name.strip_prefix(LEASE_PREFIX) else {
            continue;
        };
        if !nodes.contains(node) {
            out.problems
                .insert(format!("Lease {name}: there is no Node {node:?}; ignored"));
            continue;
        }
        let annotations = lease.metadata.annotations.as_ref();
        let get = |k: &str| annotations.and_then(|a| a.get(k)).map(|v| v.trim());
        let (Some(load), Some(multiplier)) = (get(LOAD_ANNOTATION), get(MULTIPLIER_ANNOTATION))
        else {
            continue;
        };
        let load = match parse_load(load) {
            Ok(l) => l,
            Err(e) => {
                out.problems.insert(format!("Lease {name}: {e}; ignored"));
                continue;
            }
        };
        let Ok(multiplier) = multiplier.parse::<u32>() else {
            out.problems.insert(format!(
                "Lease {name}: {MULTIPLIER_ANNOTATION} {multiplier:?} is not a whole number; ignored"
            ));
            continue;
        };
        out.loads.insert(
            node.to_owned(),
            NodeLoad {
                load,
                multiplier: multiplier.clamp(control::FLOOR, 100),
                fresh: is_fresh(lease, &changed, wall, now),
            },
        );
    }
    out
}

/// The names of the cluster's Nodes.
pub fn node_names(nodes: &Store<Node>) -> BTreeSet<String> {
    nodes
        .state()
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect()
}

/// Samples, steps the law and publishes every `interval` until dropped (what it publishes
/// reaches the tables through [`follow`], this node's as every other's).
pub async fn run(
    client: Client,
    config: LoadConfig,
    leases: Store<Lease>,
    nodes: Store<Node>,
    clock: Arc<LeaseClock>,
    metrics: Option<HealthMetrics>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let name = lease_name(&config.node_name);
    let mut sampler = Sampler::new(config.source.clone());
    if leases.wait_until_ready().await.is_err() {
        warn!("load: the Lease watch stopped before its first list: not publishing");
        return;
    }
    // A restarted agent continues from what it published, if that is still fresh.
    let mut multiplier = node_loads(
        &leases.state(),
        &node_names(&nodes),
        &clock,
        Timestamp::now(),
        Instant::now(),
    )
    .loads
    .remove(&config.node_name)
    .filter(|l| l.fresh)
    .map_or(100, |l| l.multiplier);
    let mut smoothed: Option<f64> = None;
    let mut published: Option<(u32, Instant)> = None;
    let mut failing = false;
    let mut publish_failing = false;
    let mut was_node = true;
    info!(
        "load: publishing node {}'s load on Lease {}/{name} every {:?} at most (source: {:?})",
        config.node_name, config.namespace, config.interval, config.source
    );
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (own, what) = match sampler.sample() {
            Ok((v, what)) => (control::smooth(smoothed, v), what),
            Err(e) => {
                if !failing {
                    warn!("load: {e:#}; keeping multiplier {multiplier}%");
                    failing = true;
                }
                continue;
            }
        };
        failing = false;
        smoothed = Some(own);
        let now = Timestamp::now();
        let others: Vec<f64> = node_loads(
            &leases.state(),
            &node_names(&nodes),
            &clock,
            now,
            Instant::now(),
        )
        .loads
        .into_iter()
        .filter(|(n, l)| *n != config.node_name && l.fresh)
        .map(|(_, l)| l.load)
        .collect();
        let next = control::next(multiplier, own, &others);
        if next != multiplier {
            info!(
                "load: node {} load {own:.2} ({what}; mean of {} peers {:.2}): weight multiplier {multiplier}% -> {next}%",
                config.node_name,
                others.len(),
                others.iter().sum::<f64>() / others.len().max(1) as f64
            );
            multiplier = next;
        }
        if let Some(m) = &metrics {
            m.own_load(own, multiplier);
        }
        let due = published.is_none_or(|(m, at)| m != multiplier || at.elapsed() >= HEARTBEAT);
        let is_node = config.is_node.load(std::sync::atomic::Ordering::Relaxed);
        if is_node != was_node {
            if !is_node {
                info!(
                    "load: {} is not a Node of the cluster (yet): publishing nothing",
                    config.node_name
                );
            }
            was_node = is_node;
        }
        if due && is_node {
            // What readers accept: a finite load in 0..=MAX_LOAD.
            let shown = if own.is_finite() {
                own.clamp(0.0, MAX_LOAD)
            } else {
                0.0
            };
            match publish(&api, &name, &config.node_name, shown, multiplier).await {
                Ok(()) => {
                    if publish_failing {
                        info!("load: Lease {name} published again");
                    }
                    publish_failing = false;
                    published = Some((multiplier, Instant::now()));
                }
                Err(e) if !publish_failing => {
                    warn!(
                        "load: publishing Lease {name} failed (retrying every period; the others count it stale after {STALE_AFTER:?}): {e}"
                    );
                    publish_failing = true;
                }
                Err(_) => {}
            }
        }
    }
}

/// Wakes `changed` when what the Leases say (a node's multiplier, or whether it is fresh)
/// differs from the last look, which is taken every `interval`: a heartbeat that changes
/// nothing rebuilds nothing, however many nodes publish.
/// The loads shown (`/metrics`, `inspect backends`) are refreshed on every look.
/// Leases that do not count (invalid, or of no Node) are logged when they first appear.
pub async fn follow(
    leases: Store<Lease>,
    nodes: Store<Node>,
    clock: Arc<LeaseClock>,
    changed: Arc<Notify>,
    interval: Duration,
    metrics: Option<HealthMetrics>,
) {
    let mut last: BTreeMap<String, (u32, bool)> = BTreeMap::new();
    let mut logged: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Readings { loads, problems } = node_loads(
            &leases.state(),
            &node_names(&nodes),
            &clock,
            Timestamp::now(),
            Instant::now(),
        );
        for p in problems.difference(&logged) {
            warn!("load: {p}");
        }
        logged = problems;
        if let Some(m) = &metrics {
            m.set_nodes(loads.iter().map(|(n, l)| (n.clone(), l.clone())).collect());
            m.board.refresh_loads(&loads);
        }
        let view: BTreeMap<String, (u32, bool)> = loads
            .into_iter()
            .map(|(n, l)| (n, (l.multiplier, l.fresh)))
            .collect();
        if view != last {
            last = view;
            changed.notify_one();
        }
    }
}

async fn publish(
    api: &Api<Lease>,
    name: &str,
    node: &str,
    load: f64,
    multiplier: u32,
) -> Result<(), kube::Error> {
    let annotations = json!({
        LOAD_ANNOTATION: format!("{load:.3}"),
        MULTIPLIER_ANNOTATION: multiplier.to_string(),
    });
    patch_own_lease(api, name, node, annotations).await
}

/// Renews this node's Lease `name` with `annotations` (a merge patch: the other annotations,
/// written by the other publisher, stay), creating it if there is none.
pub(super) async fn patch_own_lease(
    api: &Api<Lease>,
    name: &str,
    node: &str,
    annotations: serde_json::Value,
) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": {LEASE_LABEL: LEASE_LABEL_VALUE, "app.kubernetes.io/name": "sluice"},
            "annotations": annotations,
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": STALE_AFTER.as_secs(),
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let lease: Lease =
                serde_json::from_value(body.clone()).map_err(kube::Error::SerdeError)?;
            match api.create(&PostParams::default(), &lease).await {
                // The other publisher created it meanwhile: patch that one.
                Err(kube::Error::Api(status)) if status.code == 409 => api
                    .patch(name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                    .map(drop),
                other => other.map(drop),
            }
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_psi_and_netstat() {
        let psi = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(psi_some_avg10(psi), Some(12.5));
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 20\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(listen_overflows(netstat), Some(17));
        assert_eq!(listen_overflows("IpExt: a\nIpExt: 1\n"), None);
    }

    #[test]
    fn file_source_and_errors() {
        let dir = std::env::temp_dir().join(format!("sluice-load-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("load");
        std::fs::write(&file, "0.75\n").unwrap();
        let mut s = Sampler::new(LoadSource::File(file.clone()));
        assert_eq!(s.sample().unwrap().0, 0.75);
        std::fs::write(&file, "busy").unwrap();
        let e = s.sample().unwrap_err().to_string();
        assert!(e.contains("--load-file") && e.contains("busy"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        // The real source reads something on any Linux.
        let (v, what) = Sampler::new(LoadSource::System).sample().unwrap();
        assert!(v >= 0.0, "{v} {what}");
    }

    /// A Lease of `node` saying `load` and multiplier `m`, renewed `age_s` ago by its writer's
    /// word.
    fn lease(node: &str, age_s: i64, load: &str, m: &str) -> Arc<Lease> {
        let renew = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(age_s);
        Arc::new(
            serde_json::from_value::<Lease>(json!({
                "metadata": {"name": lease_name(node),
                    "annotations": {LOAD_ANNOTATION: load, MULTIPLIER_ANNOTATION: m}},
                "spec": {"leaseDurationSeconds": 30, "renewTime": MicroTime(renew)},
            }))
            .unwrap(),
        )
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn fresh_and_stale_leases() {
        let clock = LeaseClock::default();
        let r = node_loads(
            &[
                lease("a", 1, "0.9", "40"),
                lease("b", 31, "0.9", "40"),
                lease("c", 1, "0.9", "3"),
                lease("d", 1, "0.9", "x"),
            ],
            &nodes(&["a", "b", "c", "d"]),
            &clock,
            Timestamp::now(),
            Instant::now(),
        );
        let loads = r.loads;
        assert!(loads["a"].fresh && loads["a"].multiplier == 40);
        assert!(!loads["b"].fresh);
        assert_eq!(loads["c"].multiplier, control::FLOOR);
        assert!(!loads.contains_key("d"));
        assert!(
            r.problems.iter().any(|p| p.contains("\"x\"")),
            "{:?}",
            r.problems
        );
    }

    /// Issue 25 item 5: what another node's credentials can write on a Lease. Each value must
    /// leave the Lease out (neutral: it neither sheds the node nor moves the others' mean), and
    /// say why.
    #[test]
    fn hostile_loads_do_not_count() {
        let mut counted = Vec::new();
        for bad in [
            "NaN", "nan", "inf", "-inf", "infinity", "1e308", "-0.5", "4.01",
        ] {
            let clock = LeaseClock::default();
            let r = node_loads(
                &[lease("a", 1, "0.2", "100"), lease("b", 1, bad, "10")],
                &nodes(&["a", "b"]),
                &clock,
                Timestamp::now(),
                Instant::now(),
            );
            assert!(r.loads["a"].fresh, "{bad:?}");
            let p: Vec<&String> = r.problems.iter().collect();
            if r.loads.contains_key("b")
                || !(p.len() == 1 && p[0].starts_with("Lease sluice-node-b: sluice.io/load"))
            {
                counted.push((bad, r.loads.get("b").cloned(), p.len()));
            }
        }
        assert!(counted.is_empty(), "hostile loads counted: {counted:?}");
        // The bounds themselves are loads.
        for ok in ["0", "4", "1.5"] {
            let r = node_loads(
                &[lease("b", 1, ok, "10")],
                &nodes(&["b"]),
                &LeaseClock::default(),
                Timestamp::now(),
                Instant::now(),
            );
            assert!(r.loads["b"].fresh && r.problems.is_empty(), "{ok}: {r:?}");
        }
        // A multiplier above 100 is 100: a Lease never grows its node past its base weight.
        let r = node_loads(
            &[lease("b", 1, "0.1", "100000")],
            &nodes(&["b"]),
            &LeaseClock::default(),
            Timestamp::now(),
            Instant::now(),
        );
        assert_eq!(r.loads["b"].multiplier, 100);
    }

    #[test]
    fn leases_of_nodes_that_do_not_exist_do_not_count() {
        let r = node_loads(
            &[
                lease("a", 1, "0.9", "40"),
                lease("ghost", 1, "0.0", "100"),
                lease("ghost2", 1, "4", "10"),
            ],
            &nodes(&["a"]),
            &LeaseClock::default(),
            Timestamp::now(),
            Instant::now(),
        );
        assert_eq!(r.loads.keys().collect::<Vec<_>>(), ["a"]);
        assert!(
            r.problems
                .contains("Lease sluice-node-ghost: there is no Node \"ghost\"; ignored"),
            "{:?}",
            r.problems
        );
    }

    /// A writer that claims a fresh renewTime (even one in the future) but stops changing its
    /// Lease goes stale by the reader's clock.
    #[test]
    fn a_stale_lease_claiming_a_fresh_renew_time_goes_stale_by_the_readers_clock() {
        let clock = LeaseClock::default();
        let forged = lease("b", -3600, "0.9", "10");
        let live = |age| lease("a", age, "0.2", "100");
        let t0 = Instant::now();
        let look = |leases: &[Arc<Lease>], at: Instant| {
            node_loads(leases, &nodes(&["a", "b"]), &clock, Timestamp::now(), at).loads
        };
        let first = look(&[live(1), forged.clone()], t0);
        assert!(
            first["a"].fresh && first["b"].fresh,
            "first sight: {first:?}"
        );
        // 20 s later: a renewed its Lease (it changed), b's is the same object.
        let mid = look(&[live(0), forged.clone()], t0 + Duration::from_secs(20));
        assert!(mid["a"].fresh && mid["b"].fresh);
        // 31 s after b last changed: stale, whatever its renewTime says; a is still fresh.
        let later = look(&[live(2), forged.clone()], t0 + Duration::from_secs(31));
        assert!(later["a"].fresh, "{later:?}");
        assert!(!later["b"].fresh, "b never changed for 31 s: {later:?}");
        // b writes again: fresh again.
        let again = look(
            &[live(2), lease("b", -3600, "0.8", "10")],
            t0 + Duration::from_secs(32),
        );
        assert!(again["b"].fresh);
    }
}
