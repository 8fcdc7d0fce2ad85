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

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Desired, HealthCheck, Vip, VipAddr};

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

/// The last overlay's rows (shared with `/metrics` and `/health/backends`).
#[derive(Clone, Debug, Default)]
pub struct StatusBoard(Arc<Mutex<Vec<BackendStatus>>>);

impl StatusBoard {
    pub fn set(&self, rows: Vec<BackendStatus>) {
        if let Ok(mut r) = self.0.lock() {
            *r = rows;
        }
    }

    /// Updates the rows' load column from fresh readings (the weights change only by overlay).
    pub fn refresh_loads(&self, loads: &BTreeMap<String, NodeLoad>) {
        if let Ok(mut rows) = self.0.lock() {
            for row in rows.iter_mut() {
                if let Some(l) = row.node.as_ref().and_then(|n| loads.get(n)) {
                    row.load = l.fresh.then_some(l.load);
                }
            }
        }
    }

    pub fn rows(&self) -> Vec<BackendStatus> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
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
/// `verdict(addr, check)` and `load(vip, addr)` (`None`: no multiplier, neutral) are the
/// caller's. Pure: the same inputs give the same model on every node.
pub fn overlay(
    desired: &mut Desired,
    node_names: &BTreeMap<IpAddr, String>,
    verdict: &dyn Fn(IpAddr, &HealthCheck) -> Verdict,
    load: &dyn Fn(&VipAddr, IpAddr) -> Option<NodeLoad>,
) -> Vec<BackendStatus> {
    let mut rows = Vec::new();
    for vip in &mut desired.vips {
        let verdicts: Vec<Option<Verdict>> = vip
            .backends
            .iter()
            .map(|b| vip.health_check.as_ref().map(|c| verdict(b.addr, c)))
            .collect();
        let all_down = !verdicts.is_empty()
            && verdicts
                .iter()
                .all(|v| v.as_ref().is_some_and(|v| v.health == Health::Down));
        let mut effective: Vec<u64> = Vec::with_capacity(vip.backends.len());
        let mut whys: Vec<Vec<String>> = Vec::with_capacity(vip.backends.len());
        let mut loads = Vec::with_capacity(vip.backends.len());
        for (b, v) in vip.backends.iter_mut().zip(&verdicts) {
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
            let l = load(&vip.key, b.addr);
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
        for (i, b) in vip.backends.iter_mut().enumerate() {
            let base = b.weight;
            b.weight = u32::try_from(effective[i] / divisor).unwrap_or(u32::MAX);
            let (l, multiplier) = &loads[i];
            let why = if whys[i].is_empty() {
                "base weight".to_owned()
            } else {
                whys[i].join("; ")
            };
            rows.push(BackendStatus {
                vip: vip.key.to_string(),
                backend: b.addr.to_string(),
                node: node_names.get(&b.addr).cloned(),
                base_weight: base,
                check: vip.health_check.as_ref().map(ToString::to_string),
                health: verdicts[i].as_ref().map_or(Health::Unchecked, |v| v.health),
                load: l.as_ref().filter(|l| l.fresh).map(|l| l.load),
                multiplier: *multiplier,
                effective_weight: if b.drain { 0 } else { b.weight },
                drain: b.drain,
                why,
            });
        }
    }
    rows
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
        self.prober
            .set_targets(&targets(&out, &|vip| vip.key.to_string()));
        let rows = overlay(
            &mut out,
            &BTreeMap::new(),
            &|addr, check| self.prober.verdict(addr, check),
            &|_, _| None,
        );
        if let Some(m) = &self.metrics {
            m.board.set(rows);
        }
        out
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The (address, check) pairs a model asks to probe, each with the groups that ask for it:
/// `group(vip)` names who owns a VIP (its Service; the VIP itself in a static config). A
/// group's probes share its own concurrency ([`probe::SHARE`]), never another group's.
pub fn targets(
    desired: &Desired,
    group: &dyn Fn(&Vip) -> probe::Group,
) -> BTreeMap<probe::Target, BTreeSet<probe::Group>> {
    let mut out: BTreeMap<probe::Target, BTreeSet<probe::Group>> = BTreeMap::new();
    for vip in &desired.vips {
        let Some(check) = vip.health_check.as_ref() else {
            continue;
        };
        let owner = group(vip);
        for b in &vip.backends {
            out.entry((b.addr, check.clone()))
                .or_default()
                .insert(owner.clone());
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
            .collect();
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
            &|_, _| None,
        );
        let drains: Vec<bool> = d.vips[0].backends.iter().map(|b| b.drain).collect();
        assert_eq!(drains, [false, true, false]);
        assert!(rows[1].why.contains("check down"), "{rows:?}");
        let mut d = model(Some(check), &[1, 1, 1]);
        overlay(
            &mut d,
            &BTreeMap::new(),
            &|_, _| verdict(Health::Down),
            &|_, _| None,
        );
        assert!(d.vips[0].backends.iter().all(|b| !b.drain), "fail open");
        // Unknown (e.g. disputed) drains nothing and says why.
        let mut d = model(Some(HealthCheck::new(CheckProtocol::Tcp, 80, "/")), &[1, 1]);
        let rows = overlay(
            &mut d,
            &BTreeMap::new(),
            &|_, _| verdict(Health::Unknown),
            &|_, _| None,
        );
        assert!(d.vips[0].backends.iter().all(|b| !b.drain));
        assert!(rows[0].why.contains("health unknown: test"), "{rows:?}");
    }

    #[test]
    fn multipliers_scale_weights_and_neutral_keeps_them() {
        let mut d = model(None, &[1, 1, 1]);
        overlay(&mut d, &BTreeMap::new(), &|_, _| unreachable!(), &|_, _| {
            Some(NodeLoad {
                load: 0.1,
                multiplier: 100,
                fresh: true,
            })
        });
        let w: Vec<u32> = d.vips[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [1, 1, 1]);
        // Neutral keeps base weights as they are, common divisor and all.
        let mut d = model(None, &[4, 2, 2]);
        overlay(&mut d, &BTreeMap::new(), &|_, _| unreachable!(), &|_, _| {
            None
        });
        let w: Vec<u32> = d.vips[0].backends.iter().map(|b| b.weight).collect();
        assert_eq!(w, [4, 2, 2]);
        let mut d = model(None, &[2, 2, 1]);
        let busy = IpAddr::from([10, 0, 0, 1]);
        let stale = IpAddr::from([10, 0, 0, 3]);
        let rows = overlay(&mut d, &BTreeMap::new(), &|_, _| unreachable!(), &|_, a| {
            Some(NodeLoad {
                load: 0.9,
                multiplier: if a == busy { 10 } else { 40 },
                fresh: a != stale,
            })
        });
        let w: Vec<u32> = d.vips[0].backends.iter().map(|b| b.weight).collect();
        // 2x10, 2x40, 1x100 (stale: neutral) -> 20:80:100 -> /20.
        assert_eq!(w, [1, 4, 5]);
        assert!(rows[2].why.contains("stale"), "{rows:?}");
    }
}
