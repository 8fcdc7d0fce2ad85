//! Health and load: active health checks of the backends (`probe`), the nodes' measured load and
//! its publication on a Lease per node (`load`), the control law that turns loads into weight
//! multipliers (`control`), and here the pure step that lays both over a model: a failing
//! backend drains, a loaded node's weight shrinks.
//!
//! Every node must build the SAME Maglev tables (co-location relies on it), so the multipliers
//! applied are only those read from the API server (each node's agent publishes its own on its
//! Lease; every agent, that one included, applies what the Leases say). Health verdicts are each
//! observer's own: tables differ only while observers disagree about a backend.

pub mod control;
pub mod load;
pub mod probe;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Desired, VipAddr};

/// How a backend is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckProtocol {
    /// A TCP connection is accepted.
    Tcp,
    /// An HTTP/1.0 GET answers 2xx or 3xx.
    Http,
}

/// One health check: `{protocol, port, path, interval, timeout, fall, rise}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HealthCheck {
    pub protocol: CheckProtocol,
    pub port: u16,
    /// HTTP only.
    pub path: String,
    #[serde(serialize_with = "as_millis")]
    pub interval: Duration,
    #[serde(serialize_with = "as_millis")]
    pub timeout: Duration,
    /// Consecutive failures that take a backend down.
    pub fall: u32,
    /// Consecutive successes that bring it back.
    pub rise: u32,
    /// A Kubernetes convention chosen by default (kube-proxy's healthz), not asked for: while
    /// nothing has ever listened on its port (a cluster without kube-proxy) it is not held
    /// against the node.
    #[serde(skip)]
    pub implicit: bool,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// kube-proxy's health endpoint (`--healthz-bind-address`, port 10256).
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;

impl HealthCheck {
    /// The defaults of the issue and the README: 1 s apart, 500 ms to answer, 3 down, 2 up.
    pub fn new(protocol: CheckProtocol, port: u16, path: &str) -> Self {
        Self {
            protocol,
            port,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            fall: 3,
            rise: 2,
            implicit: false,
        }
    }

    /// Checks that are wrong whatever the backend: the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("port: 0 is not a port (1-65535)".into());
        }
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(300) {
            return Err(format!(
                "interval: {:?} is outside 100ms..300s",
                self.interval
            ));
        }
        if self.timeout < Duration::from_millis(10) || self.timeout > self.interval {
            return Err(format!(
                "timeout: {:?} must be at least 10ms and at most the interval ({:?})",
                self.timeout, self.interval
            ));
        }
        if !(1..=100).contains(&self.fall) || !(1..=100).contains(&self.rise) {
            return Err(format!(
                "fall {} / rise {}: each must be 1 to 100",
                self.fall, self.rise
            ));
        }
        if self.protocol == CheckProtocol::Http
            && (!self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b >= 0x7f))
        {
            return Err(format!(
                "path: {:?} must start with / and hold no spaces or control characters",
                self.path
            ));
        }
        Ok(())
    }
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            CheckProtocol::Tcp => write!(f, "tcp:{}", self.port),
            CheckProtocol::Http => write!(f, "http:{}{}", self.port, self.path),
        }
    }
}

/// A duration as the config and the annotation write it: `500ms`, `1s`, `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!("{text:?} is not a duration like 500ms or 1s"));
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms or 1s"))?;
    if !value.is_finite() || value < 0.0 || value > 86_400.0 {
        return Err(format!("{text:?} is not a duration like 500ms or 1s"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// The `sluice.io/health-check` annotation: `off`, or `tcp:PORT` / `http:PORT[/PATH]`, then
/// optionally `interval=1s timeout=500ms fall=3 rise=2` separated by spaces. `None`: off.
pub fn parse_annotation(text: &str) -> Result<Option<HealthCheck>, String> {
    let mut words = text.split_whitespace();
    let Some(first) = words.next() else {
        return Err("empty: write off, tcp:PORT or http:PORT/PATH".into());
    };
    if first.eq_ignore_ascii_case("off") {
        return match words.next() {
            None => Ok(None),
            Some(w) => Err(format!("{w:?} after off")),
        };
    }
    let hint = "write off, tcp:PORT or http:PORT/PATH, then optionally interval=1s timeout=500ms fall=3 rise=2";
    let (protocol, rest) = first
        .split_once(':')
        .ok_or_else(|| format!("{first:?}: {hint}"))?;
    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => CheckProtocol::Tcp,
        "http" => CheckProtocol::Http,
        _ => return Err(format!("{first:?}: {hint}")),
    };
    let (port, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if protocol == CheckProtocol::Tcp && path != "/" {
        return Err(format!("{first:?}: a tcp check has no path"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{first:?}: port {port:?} is not 1-65535"))?;
    let mut check = HealthCheck::new(protocol, port, path);
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| format!("{word:?}: {hint}"))?;
        let count = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("{key}={value:?} is not a whole number"))
        };
        match key {
            "interval" => check.interval = parse_duration(value)?,
            "timeout" => check.timeout = parse_duration(value)?,
            "fall" => check.fall = count()?,
            "rise" => check.rise = count()?,
            _ => return Err(format!("{word:?}: unknown key {key:?}; {hint}")),
        }
    }
    check.validate()?;
    Ok(Some(check))
}

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
    pub metrics: Option<crate::metrics::HealthMetrics>,
}

/// The agent's overlay of one freshly built model: probes follow the model's targets, failing
/// backends drain, the Leases' multipliers apply (per Service opt-out), and the rows go to
/// `/metrics` and `inspect backends`.
pub fn agent_overlay(
    built: &mut crate::k8s::Built,
    prober: &probe::Prober,
    leases: Option<&[Arc<k8s_openapi::api::coordination::v1::Lease>]>,
    config: &AgentHealth,
) {
    let crate::k8s::Built {
        desired,
        sources,
        node_names,
        ..
    } = built;
    if !config.checks {
        for vip in &mut desired.vips {
            vip.health_check = None;
        }
    }
    prober.set_targets(&targets(desired));
    let loads = match leases {
        Some(l) if config.load_aware => load::node_loads(l, k8s_openapi::jiff::Timestamp::now()),
        _ => BTreeMap::new(),
    };
    if let Some(m) = &config.metrics {
        m.set_nodes(loads.iter().map(|(n, l)| (n.clone(), l.clone())).collect());
    }
    let rows = overlay(
        desired,
        node_names,
        &|addr, check| prober.verdict(addr, check),
        &|vip, addr| {
            if !sources.get(vip).is_none_or(|s| s.options.load_aware) {
                return None;
            }
            node_names.get(&addr).and_then(|n| loads.get(n)).cloned()
        },
    );
    if let Some(m) = &config.metrics {
        m.board.set(rows);
    }
}

/// Health checks for `sluice run` (a static config): the probes run on a thread of their own;
/// [`StaticChecks::take_changed`] says when a verdict changed since the last overlay.
pub struct StaticChecks {
    prober: probe::Prober,
    dirty: Arc<std::sync::atomic::AtomicBool>,
    metrics: Option<crate::metrics::HealthMetrics>,
    _thread: std::thread::JoinHandle<()>,
}

impl StaticChecks {
    pub fn start(metrics: Option<crate::metrics::HealthMetrics>) -> anyhow::Result<Self> {
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
        self.prober.set_targets(&targets(&out));
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

/// The set of (address, check) pairs a model asks to probe.
pub fn targets(desired: &Desired) -> BTreeSet<(IpAddr, HealthCheck)> {
    desired
        .vips
        .iter()
        .filter_map(|v| v.health_check.as_ref().map(|c| (v, c)))
        .flat_map(|(v, c)| v.backends.iter().map(move |b| (b.addr, c.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Vip};

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
    fn annotation_forms_and_errors() {
        assert_eq!(parse_annotation("off"), Ok(None));
        let c = parse_annotation("http:10256/healthz").unwrap().unwrap();
        assert_eq!(c, HealthCheck::new(CheckProtocol::Http, 10256, "/healthz"));
        let c = parse_annotation("tcp:80 interval=2s timeout=300ms fall=2 rise=5")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.protocol, c.port, c.interval, c.timeout, c.fall, c.rise),
            (
                CheckProtocol::Tcp,
                80,
                Duration::from_secs(2),
                Duration::from_millis(300),
                2,
                5
            )
        );
        assert_eq!(c.to_string(), "tcp:80");
        for bad in [
            "",
            "udp:53",
            "http:x/",
            "http:0/",
            "tcp:80/x",
            "http:80 fall=0",
            "http:80 timeout=2s",
            "http:80 colour=red",
            "off now",
        ] {
            assert!(parse_annotation(bad).is_err(), "{bad:?}");
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

    #[test]
    fn static_config_health_check_defaults_and_errors() {
        let config = |check: &str| {
            format!(
                "vips:\n  - address: 10.0.0.10\n    port: 80\n    health_check: {check}\n    backends:\n      - address: 10.0.1.2\n        mac: 02:00:00:00:01:02\n"
            )
        };
        let d = crate::config::parse(&config("{protocol: http}"), "t.yaml").unwrap();
        let c = d.vips[0].health_check.clone().unwrap();
        assert_eq!(c, HealthCheck::new(CheckProtocol::Http, 10256, "/healthz"));
        assert!(!c.implicit);
        let d = crate::config::parse(
            &config("{protocol: tcp, port: 80, interval: 2s, timeout: 250ms, fall: 1, rise: 4}"),
            "t.yaml",
        )
        .unwrap();
        let c = d.vips[0].health_check.clone().unwrap();
        assert_eq!(
            (c.port, c.interval, c.timeout, c.fall, c.rise),
            (80, Duration::from_secs(2), Duration::from_millis(250), 1, 4)
        );
        for (bad, needle) in [
            ("{port: 80}", "health_check.protocol"),
            ("{protocol: icmp}", "unknown protocol"),
            ("{protocol: http, interval: soon}", "not a duration"),
            ("{protocol: http, timeout: 2s}", "at most the interval"),
            ("{protocol: http, fall: 0}", "health_check.fall"),
            ("{protocol: http, colour: red}", "unknown key"),
        ] {
            let e = crate::config::parse(&config(bad), "t.yaml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("t.yaml:"), "{bad}: {e}");
        }
    }
}
