//! Health and load: active health checks of the backends (`probe`), the nodes' measured load and
//! its publication on a Lease per node (`load`), the control law that turns loads into weight
//! multipliers (`control`), their instruments (`metrics`), and here the pure step that lays
//! both over a model: a failing backend drains, a loaded node's weight shrinks. What a check is
//! (`model::HealthCheck`) belongs to the model; the sources parse it (config, k8s annotations),
//! and the agent's overlay of its Kubernetes model is `k8s::overlay`. Below `k8s` and `observe`:
//! this module imports only `model` and `http`.
//!
//! Every node must build the SAME Maglev tables (co-location relies on it), so what is applied
//! is only what is read from the API server: each node's agent publishes its multiplier and its
//! health votes on its Lease, and every agent, that one included, applies what the Leases say.
//! A node is probed only by its watchers on the health ring (`ring`: itself and 8 others), and
//! drained when a quorum of them vote it down (`votes`); `sim` is the simulation (N = 1,000 and
//! 5,000, loss, churn) that chose the numbers and tests the bounds.

pub mod control;
pub mod load;
pub mod metrics;
pub mod probe;
pub mod ring;
#[cfg(test)]
mod sim;
pub mod votes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Backend, Backends, Desired, HealthCheck, ListId, Vip, VipAddr};

/// What a check says about a backend now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No verdict yet (counts as up: a fresh agent does not drain what it has not checked).
    Unknown,
    Up,
    Down,
    /// Nothing to check against (the implicit check's port never answered): counts as up.
    Unchecked,
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
            Self::Unchecked => "unchecked",
        }
    }
}

/// A verdict and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub health: Health,
    pub reason: String,
}

/// A node's load as its Lease says.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeLoad {
    /// The load the node measured (0 idle, 1 saturated; may exceed 1).
    pub load: f64,
    /// Percent of the base weight (`control::FLOOR`..=100).
    pub multiplier: u32,
    /// Published recently enough to count; a stale one counts as unknown (multiplier 100).
    pub fresh: bool,
}

/// One backend of one VIP, as the overlay left it: what `inspect backends` and `/metrics` show.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub vip: String,
    pub backend: String,
    pub node: Option<String>,
    pub base_weight: u32,
    pub check: Option<String>,
    pub health: Health,
    pub load: Option<f64>,
    /// Percent applied (100: neutral).
    pub multiplier: u32,
    pub effective_weight: u32,
    pub drain: bool,
    /// Why the effective weight or state is what it is.
    pub why: String,
}

/// The rows of the VIPs that share one backend list, check and load-awareness (their `vip`
/// left empty: [`StatusGroup::expand`] fills it): a cluster's 10,000 VIP ports on 1,000 nodes
/// are a few groups of 1,000 rows, not 10 million.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusGroup {
    pub vips: Vec<String>,
    pub rows: Vec<BackendStatus>,
}

impl StatusGroup {
    /// One row per (VIP, backend).
    pub fn expand(&self) -> impl Iterator<Item = BackendStatus> + '_ {
        self.vips.iter().flat_map(|vip| {
            self.rows.iter().map(|row| BackendStatus {
                vip: vip.clone(),
                ..row.clone()
            })
        })
    }

    /// How many (VIP, backend) rows the group stands for.
    pub fn memberships(&self) -> usize {
        self.vips.len() * self.rows.len()
    }
}

/// The last overlay's groups (shared with `/metrics` and `/health/backends`).
#[derive(Clone, Debug, Default)]
pub struct StatusBoard(Arc<Mutex<Vec<StatusGroup>>>);

impl StatusBoard {
    pub fn set(&self, groups: Vec<StatusGroup>) {
        if let Ok(mut g) = self.0.lock() {
            *g = groups;
        }
    }

    /// Updates the rows' load column from fresh readings (the weights change only by overlay).
    pub fn refresh_loads(&self, loads: &BTreeMap<String, NodeLoad>) {
        if let Ok(mut groups) = self.0.lock() {
            for row in groups.iter_mut().flat_map(|g| g.rows.iter_mut()) {
                if let Some(l) = row.node.as_ref().and_then(|n| loads.get(n)) {
                    row.load = l.fresh.then_some(l.load);
                }
            }
        }
    }

    pub fn groups(&self) -> Vec<StatusGroup> {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// Lays health verdicts and load multipliers over `desired`:
/// - a backend whose check is down drains (its established flows stay, it gets no new ones),
///   unless every backend of the VIP is down: then none is drained (failing open, as cloud load
///   balancers do: a checker that sees everything dead is more likely wrong than the backends);
/// - a backend's weight is multiplied by its node's published multiplier (percent), and each
///   VIP's weights are divided by their greatest common divisor (Maglev depends only on the
///   ratios); when every multiplier is neutral the base weights stay exactly as they were.
///
/// `verdict(addr, check)`, `load_aware(vip)` and `load(addr)` (`None`: no multiplier, neutral)
/// are the caller's. Pure: the same inputs give the same model on every node. Worked once per
/// group of VIPs with the same backend list, check and load-awareness (every
/// `externalTrafficPolicy: Cluster` VIP of a family is one group), and those VIPs keep sharing
/// one list.
pub fn overlay(
    desired: &mut Desired,
    node_names: &BTreeMap<IpAddr, String>,
    verdict: &dyn Fn(IpAddr, &HealthCheck) -> Verdict,
    load_aware: &dyn Fn(&VipAddr) -> bool,
    load: &dyn Fn(IpAddr) -> Option<NodeLoad>,
) -> Vec<StatusGroup> {
    type GroupKey = (ListId, Option<HealthCheck>, bool);
    let mut groups: Vec<(Backends, StatusGroup)> = Vec::new();
    let mut index: HashMap<GroupKey, usize> = HashMap::new();
    for vip in &mut desired.vips {
        let aware = load_aware(&vip.key);
        let key = (vip.backends.id(), vip.health_check.clone(), aware);
        let at = *index.entry(key).or_insert_with(|| {
            let load = |addr| if aware { load(addr) } else { None };
            let (backends, rows) = overlay_list(
                &vip.backends,
                vip.health_check.as_ref(),
                node_names,
                verdict,
                &load,
            );
            groups.push((
                backends,
                StatusGroup {
                    vips: Vec::new(),
                    rows,
                },
            ));
            groups.len() - 1
        });
        let (backends, group) = &mut groups[at];
        vip.backends = backends.clone();
        group.vips.push(vip.key.to_string());
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

/// [`overlay`] of one backend list: the list as the VIPs that have it get it, and its rows.
fn overlay_list(
    list: &Backends,
    check: Option<&HealthCheck>,
    node_names: &BTreeMap<IpAddr, String>,
    verdict: &dyn Fn(IpAddr, &HealthCheck) -> Verdict,
    load: &dyn Fn(IpAddr) -> Option<NodeLoad>,
) -> (Backends, Vec<BackendStatus>) {
    let verdicts: Vec<Option<Verdict>> = list
        .iter()
        .map(|b| check.map(|c| verdict(b.addr, c)))
        .collect();
    let all_down = !verdicts.is_empty()
        && verdicts
            .iter()
            .all(|v| v.as_ref().is_some_and(|v| v.health == Health::Down));
    let mut backends: Vec<Backend> = list.to_vec();
    let mut effective: Vec<u64> = Vec::with_capacity(list.len());
    let mut whys: Vec<Vec<String>> = Vec::with_capacity(list.len());
    let mut loads = Vec::with_capacity(list.len());
    for (b, v) in backends.iter_mut().zip(&verdicts) {
        let mut why = Vec::new();
        if b.drain {
            why.push("drained by its source (API or config)".to_owned());
        }
        if let Some(v) = v {
            if v.health == Health::Down {
                if all_down {
                    why.push(format!(
                        "check down ({}), but every backend is down: failing open",
                        v.reason
                    ));
                } else {
                    b.drain = true;
                    why.push(format!("check down: {}", v.reason));
                }
            } else if v.health == Health::Unchecked {
                why.push(format!("not checked: {}", v.reason));
            } else if v.health == Health::Unknown {
                why.push(format!("health unknown: {}", v.reason));
            }
        }
        let l = load(b.addr);
        let multiplier = match &l {
            Some(l) if l.fresh => {
                if l.multiplier < 100 {
                    why.push(format!(
                        "node load {:.2}: weight x{}%",
                        l.load, l.multiplier
                    ));
                }
                l.multiplier.clamp(control::FLOOR, 100)
            }
            Some(_) => {
                why.push("load unknown (stale Lease): neutral".to_owned());
                100
            }
            None => 100,
        };
        effective.push(u64::from(b.weight) * u64::from(multiplier));
        whys.push(why);
        loads.push((l, multiplier));
    }
    // All neutral: the base weights exactly as they were (nothing to scale).
    let neutral = loads.iter().all(|(_, m)| *m == 100);
    let divisor = if neutral {
        100
    } else {
        effective
            .iter()
            .copied()
            .filter(|w| *w > 0)
            .fold(0, gcd)
            .max(1)
    };
    let mut rows = Vec::with_capacity(backends.len());
    for (i, b) in backends.iter_mut().enumerate() {
        let base = b.weight;
        b.weight = u32::try_from(effective[i] / divisor).unwrap_or(u32::MAX);
        let (l, multiplier) = &loads[i];
        let why = if whys[i].is_empty() {
            "base weight".to_owned()
        } else {
            whys[i].join("; ")
        };
        rows.push(BackendStatus {
            vip: String::new(),
            backend: b.addr.to_string(),
            node: node_names.get(&b.addr).cloned(),
            base_weight: base,
            check: check.map(ToString::to_string),
            health: verdicts[i].as_ref().map_or(Health::Unchecked, |v| v.health),
            load: l.as_ref().filter(|l| l.fresh).map(|l| l.load),
            multiplier: *multiplier,
            effective_weight: if b.drain { 0 } else { b.weight },
            drain: b.drain,
            why,
        });
    }
    // Unchanged: the same allocation, so the VIPs keep sharing it with the last model.
    (list.replaced_by(backends), rows)
}

/// What the agent does about health and load (its flags).
#[derive(Clone, Debug)]
pub struct AgentHealth {
    /// `--health-checks`: probe the backends (else no check drains anything).
    pub checks: bool,
    /// `--load-aware`: apply the nodes' published multipliers (and publish this node's).
    pub load_aware: bool,
    /// Publishing this node's load (needs its name); `None`: only apply the others'.
    pub load: Option<load::LoadConfig>,
    /// The namespace of the nodes' load Leases.
    pub namespace: String,
    /// How often what the Leases say is looked at (the control period).
    pub follow_every: Duration,
    pub metrics: Option<metrics::HealthMetrics>,
}

/// Health checks for `sluice run` (a static config): the probes run on a thread of their own;
/// [`StaticChecks::take_changed`] says when a verdict changed since the last overlay.
pub struct StaticChecks {
    prober: probe::Prober,
    dirty: Arc<std::sync::atomic::AtomicBool>,
    metrics: Option<metrics::HealthMetrics>,
    _thread: std::thread::JoinHandle<()>,
}

impl StaticChecks {
    pub fn start(metrics: Option<metrics::HealthMetrics>) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the health checks' runtime")?;
        let changed = Arc::new(tokio::sync::Notify::new());
        let dirty = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let prober = probe::Prober::new(runtime.handle().clone(), changed.clone(), metrics.clone());
        let flag = dirty.clone();
        // Drives the probes (spawned on this runtime) for as long as the process lives.
        let thread = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || {
                runtime.block_on(async move {
                    loop {
                        changed.notified().await;
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .context("starting the health-check thread")?;
        Ok(Self {
            prober,
            dirty,
            metrics,
            _thread: thread,
        })
    }

    /// Whether a verdict changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.dirty.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// `desired` with failing backends drained (the probes follow its checks).
    pub fn overlay(&self, desired: &Desired) -> Desired {
        let mut out = desired.clone();
        self.prober.set_targets(&targets(
            &out,
            &|vip| vip.key.to_string().into(),
            &|_, _| true,
        ));
        let groups = overlay(
            &mut out,
            &BTreeMap::new(),
            &|addr, check| self.prober.verdict(addr, check),
            &|_| false,
            &|_| None,
        );
        if let Some(m) = &self.metrics {
            m.board.set(groups);
        }
        out
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The (address, check) pairs a model asks to probe that `keep` keeps, each with the groups
/// that ask for it: `group(vip)` names who owns a VIP (its Service; the VIP itself in a static
/// config). A group's probes share its own concurrency ([`probe::SHARE`]), never another
/// group's. Worked per backend list: 10,000 Services on one list of 1,000 nodes are 1,000
/// targets asked by 10,000 groups, and only the kept ones get their groups.
pub fn targets(
    desired: &Desired,
    group: &dyn Fn(&Vip) -> probe::Group,
    keep: &dyn Fn(IpAddr, &HealthCheck) -> bool,
) -> BTreeMap<probe::Target, BTreeSet<probe::Group>> {
    let mut per_list: HashMap<(ListId, &HealthCheck), (&Backends, BTreeSet<probe::Group>)> =
        HashMap::new();
    for vip in &desired.vips {
        let Some(check) = vip.health_check.as_ref() else {
            continue;
        };
        per_list
            .entry((vip.backends.id(), check))
            .or_insert_with(|| (&vip.backends, BTreeSet::new()))
            .1
            .insert(group(vip));
    }
    let mut out: BTreeMap<probe::Target, BTreeSet<probe::Group>> = BTreeMap::new();
    for ((_, check), (list, groups)) in per_list {
        for b in list.iter().filter(|b| keep(b.addr, check)) {
            out.entry((b.addr, check.clone()))
                .or_default()
                .extend(groups.iter().cloned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, CheckProtocol, Vip};

    fn model(check: Option<HealthCheck>, weights: &[u32]) -> Desired {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend {
                addr: IpAddr::from([10, 0, 0, i as u8 + 1]),
                mac: None,
                weight: *w,
                drain: false,
            })
            .collect::<Vec<_>>();
        let mut vip = Vip::new("10.9.0.1:80/tcp".parse().unwrap(), backends);
        vip.health_check = check;
        Desired {
            vips: vec![vip],
            ..Desired::default()
        }
    }

    fn verdict(h: Health) -> Verdict {
        Verdict {
            health: h,
            reason: "test".into(),
        }
    }

    #[test]
    fn a_down_backend_drains_unless_all_are_down() {
        let check = HealthCheck::new(CheckProtocol::Tcp, 80, "/");
        let mut d = model(Some(check.clone()), &[1, 1, 1]);
        let down = IpAddr::from([10, 0, 0, 2]);
        let rows = overlay(
            &mut d,
            &BTreeMap::new(),
            &|a, _| verdict(if a == down { Health::Down } else { Health::Up }),
            &|_| false,
            &|_| None,
        )
        .remove(0)
        .rows;
        let drains: Vec<bool> = d.vips[0].backends.iter().map(|b| b.drain).collect();
        assert_eq!(drains, [false, true, false]);
        assert!(rows[1].why.contains("check down"), "{rows:?}");
        let mut d = model(Some(check), &[1, 1, 1]);
        overlay(
            &mut d,
            &BTreeMap::new(),
            &|_, _| verdict(Health::Down),
            &|_| false,
            &|_| None,
        );
        assert!(d.vips[0].backends.iter().all(|b| !b.drain), "fail open");
        // Unknown (e.g. disputed) drains nothing and says why.
        let mut d = model(Some(HealthCheck::new(CheckProtocol::Tcp, 80, "/")), &[1, 1]);
        let rows = overlay(
            &mut d,
            &BTreeMap::new(),
            &|_, _| verdict(Health::Unknown),
            &|_| false,
            &|_| None,
        )
        .remove(0)
        .rows;
        assert!(d.vips[0].backends.iter().all(|b| !b.drain));
        assert!(rows[0].why.contains("health unknown: test"), "{rows:?}");
    }

    #[test]
    fn multipliers_scale_weights_and_neutral_keeps_them() {
        let mut d = model(None, &[1, 1, 1]);
        overlay(
            &mut d,
            &BTreeMap::new(),
            &|_, _| unreachable!(),
            &|_| true,
            &|_| {
                Some(NodeLoad {
                    load: 0.1,
                    multiplier: 100,
                    fresh: true,
                })
            },
        );
        let w: Vec<u32> = d.vips[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [1, 1, 1]);
        // Neutral keeps base weights as they are, common divisor and all.
        let mut d = model(None, &[4, 2, 2]);
        overlay(
            &mut d,
            &BTreeMap::new(),
            &|_, _| unreachable!(),
            &|_| true,
            &|_| None,
        );
        let w: Vec<u32> = d.vips[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [4, 2, 2]);
        let mut d = model(None, &[2, 2, 1]);
        let busy = IpAddr::from([10, 0, 0, 1]);
        let stale = IpAddr::from([10, 0, 0, 3]);
        let rows = overlay(
            &mut d,
            &BTreeMap::new(),
            &|_, _| unreachable!(),
            &|_| true,
            &|a| {
                Some(NodeLoad {
                    load: 0.9,
                    multiplier: if a == busy { 10 } else { 40 },
                    fresh: a != stale,
                })
            },
        )
        .remove(0)
        .rows;
        let w: Vec<u32> = d.vips[0].backends.iter().map(|b| b.weight).collect();
        // 2x10, 2x40, 1x100 (stale: neutral) -> 20:80:100 -> /20.
        assert_eq!(w, [1, 4, 5]);
        assert!(rows[2].why.contains("stale"), "{rows:?}");
    }

    #[test]
    fn vips_sharing_a_list_are_worked_once_and_keep_sharing_it() {
        let check = HealthCheck::new(CheckProtocol::Tcp, 80, "/");
        let mut d = model(Some(check.clone()), &[1, 1, 1]);
        let mut second = d.vips[0].clone();
        second.key = "10.9.0.2:80/tcp".parse().unwrap();
        let mut unchecked = d.vips[0].clone();
        unchecked.key = "10.9.0.3:80/tcp".parse().unwrap();
        unchecked.health_check = None;
        d.vips.extend([second, unchecked]);
        let down = IpAddr::from([10, 0, 0, 2]);
        let asked = std::cell::Cell::new(0);
        let groups = overlay(
            &mut d,
            &BTreeMap::new(),
            &|a, _| {
                asked.set(asked.get() + 1);
                verdict(if a == down { Health::Down } else { Health::Up })
            },
            &|_| false,
            &|_| None,
        );
        // Once per backend of the one checked list, not once per VIP.
        assert_eq!(asked.get(), 3);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[0].vips, ["10.9.0.1:80/tcp", "10.9.0.2:80/tcp"]);
        assert_eq!(groups[0].memberships(), 6);
        let expanded: Vec<BackendStatus> = groups[0].expand().collect();
        assert_eq!(expanded[4].vip, "10.9.0.2:80/tcp");
        assert!(expanded[4].drain, "{expanded:?}");
        assert!(d.vips[0].backends.same(&d.vips[1].backends));
        assert!(d.vips[1].backends[1].drain);
        // Without a check nothing changed: the list is the one it had.
        assert!(!d.vips[2].backends.same(&d.vips[0].backends));
        assert!(d.vips[2].backends.iter().all(|b| !b.drain));
    }
}
