//! Health checks and load-aware weights, as deployed: three node namespaces each run `sluice
//! agent` against a real kube-apiserver (the colocation lab of `colocation.rs`), each node a
//! backend of one LoadBalancer Service checked by `sluice.io/health-check: http:80/` (nginx on
//! every node; the lab has no kube-proxy for the default :10256/healthz), the client routing the
//! VIP to node 0. Each agent reads its load from a file (`--load-file`); the control law and
//! its period (2 s) are the defaults.
//!
//! 1. Node 2 reports high load: its share of the Maglev table (and of real new connections)
//!    falls from ~1/3 to at most 10 % within 30 s, identically on every node, stays put (no
//!    oscillation), and comes back when the load goes; no established connection is lost.
//! 2. Node 2's link goes down: the time until the other nodes drain it (no new flows) is
//!    measured (target 3 s with the default interval/timeout/fall); established connections on
//!    the other nodes survive, and every new connection is answered afterwards.
//!
//! Needs root.

use std::ops::Deref;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sluice_tests::agents_lab::{AgentsLab, NODES, WebService, check_agents};
use sluice_tests::{HTTP_PORT, Lab, LabConfig, SluiceProcess, require_root};

const CONVERGE: Duration = Duration::from_secs(60);
/// The bound for a loaded node's share to fall.
const SHED_WITHIN: Duration = Duration::from_secs(30);
/// The promise for a dead node: drained everywhere within 3 s (default interval, timeout, fall).
const DRAIN_WITHIN: Duration = Duration::from_secs(3);

struct Cluster {
    /// Declared first: the agents stop before the API server and the namespaces go.
    agents: Vec<SluiceProcess>,
    nodes: AgentsLab,
}

impl Deref for Cluster {
    type Target = AgentsLab;
    fn deref(&self) -> &AgentsLab {
        &self.nodes
    }
}

impl Cluster {
    fn start() -> Result<Cluster> {
        let check = format!("http:{HTTP_PORT}/");
        let nodes = AgentsLab::start(WebService {
            annotations: &[("sluice.io/health-check", &check)],
            echo: true,
            ..Default::default()
        })?;
        let mut agents = Vec::new();
        for i in 0..NODES {
            set_load(&nodes.lab, i, 0.05)?;
            nodes.lab.enable_backend_xdp_tx(i)?;
            let load_file = load_file(&nodes.lab, i).to_string_lossy().into_owned();
            agents.push(nodes.spawn_agent(i, &["--load-file", &load_file])?);
        }
        nodes.lab.client_route_vip_via_backend(0)?;
        Ok(Cluster { agents, nodes })
    }

    fn check_agents(&mut self) -> Result<()> {
        check_agents(self.agents.iter_mut().map(Some))
    }

    /// Node `i`'s rows of the HTTP VIP in `inspect backends` (with the agent's columns).
    fn backends(&self, i: usize) -> Result<Vec<Value>> {
        let vip = format!("{}:{HTTP_PORT}/tcp", self.lab.vip());
        let v = self.sluice(i, &["inspect", "backends"])?;
        Ok(v["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["vip"] == vip.as_str())
            .cloned()
            .collect())
    }

    /// Node `i`'s view of the HTTP VIP's table: (fingerprint, slots of node 2 / all slots).
    fn table(&self, i: usize) -> Result<(String, f64)> {
        let vip = format!("{}:{HTTP_PORT}/tcp", self.lab.vip());
        let v = self.sluice(i, &["inspect", "maglev", &vip])?;
        let fingerprint = v["table_fingerprint"]
            .as_str()
            .with_context(|| format!("no table_fingerprint: {v}"))?
            .to_owned();
        let (mut two, mut all) = (0u64, 0u64);
        let node2 = self.lab.backend_addr(2).to_string();
        for b in v["backends"].as_array().into_iter().flatten() {
            let slots = b["table_slots"].as_u64().unwrap_or_default();
            all += slots;
            if b["backend"] == node2.as_str() {
                two += slots;
            }
        }
        Ok((fingerprint, two as f64 / all.max(1) as f64))
    }

    /// Waits until every node's maps hold the VIP with all three nodes active.
    fn converge(&mut self) -> Result<()> {
        let deadline = Instant::now() + CONVERGE;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_agents()?;
            let mut all = true;
            for i in 0..NODES {
                let rows = self.backends(i).unwrap_or_default();
                let active = rows.iter().filter(|b| b["state"] == "active").count();
                if active < NODES {
                    all = false;
                    last = format!("node {i}: {rows:?}");
                }
            }
            if all {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(300));
        }
        bail!("the nodes' maps did not converge to 3 active backends in {CONVERGE:?}; last: {last}")
    }

    /// Polls until node 2's share of every node's table satisfies `ok`, the tables identical;
    /// returns how long that took.
    fn wait_share(
        &mut self,
        what: &str,
        within: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < within {
            self.check_agents()?;
            let tables: Vec<(String, f64)> =
                (0..NODES).map(|i| self.table(i)).collect::<Result<_>>()?;
            if tables.iter().all(|t| t.0 == tables[0].0) && ok(tables[0].1) {
                return Ok(started.elapsed());
            }
            last = format!(
                "node 2's share per node: {:?}",
                tables.iter().map(|t| t.1).collect::<Vec<_>>()
            );
            thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "{what}: not within {within:?}; {last}; node 0's rows: {:?}",
            self.backends(0)
        )
    }

    /// Share of `n` new connections answered by each node.
    fn spread(&self, n: usize) -> Result<Vec<f64>> {
        let bodies = self.lab.curl_vip(n)?;
        Ok((0..NODES)
            .map(|i| {
                let name = self.lab.backend_name(i);
                bodies.iter().filter(|b| **b == name).count() as f64 / n as f64
            })
            .collect())
    }
}

fn load_file(lab: &Lab, i: usize) -> PathBuf {
    lab.dir().join(format!("load-node{i}"))
}

fn set_load(lab: &Lab, i: usize, load: f64) -> Result<()> {
    // Written whole by a rename, so that the agent never reads half a number.
    let tmp = lab.dir().join(format!("load-node{i}.tmp"));
    std::fs::write(&tmp, format!("{load}\n"))?;
    std::fs::rename(&tmp, load_file(lab, i))?;
    Ok(())
}

/// Long-lived connections until at least `per_node` land on each node (at most 30 tries).
fn open_long_conns(c: &Cluster, per_node: usize) -> Result<Vec<sluice_tests::conn::LongConn>> {
    let mut conns = Vec::new();
    for _ in 0..30 {
        let counts: Vec<usize> = (0..NODES)
            .map(|i| {
                let name = c.lab.backend_name(i);
                conns
                    .iter()
                    .filter(|x: &&sluice_tests::conn::LongConn| x.backend() == name)
                    .count()
            })
            .collect();
        if counts.iter().all(|n| *n >= per_node) {
            break;
        }
        conns.push(c.lab.long_conn_vip()?);
    }
    Ok(conns)
}

#[test]
fn a_busy_node_sheds_new_flows_and_a_dead_one_drains() -> Result<()> {
    let mut c = Cluster::start()?;
    c.converge()?;
    // The health columns are there, from each agent.
    let rows = c.backends(0)?;
    ensure!(
        rows.iter()
            .all(|r| r["health"] == "up" && r["check"] == "http:80/"),
        "health columns: {rows:?}"
    );

    // ---- 1. Load ----
    let before = c.wait_share("an even table", CONVERGE, |s| (0.28..0.39).contains(&s))?;
    let spread = c.spread(90)?;
    println!("spread before: {spread:?} (table even after {before:?})");
    ensure!(spread[2] > 0.15, "node 2 got {spread:?} before any load");
    let conns = open_long_conns(&c, 1)?;
    let busy = Instant::now();
    set_load(&c.lab, 2, 0.95)?;
    let shed = c.wait_share("node 2's share at most 10 %", SHED_WITHIN, |s| s <= 0.10)?;
    println!("node 2 at load 0.95: table share <= 10 % after {shed:?}");
    let rows = c.backends(0)?;
    let node2 = c.lab.backend_addr(2).to_string();
    let row = rows
        .iter()
        .find(|r| r["address"] == node2.as_str())
        .context("node 2's row")?;
    ensure!(
        row["why"].as_str().is_some_and(|w| w.contains("node load")),
        "why: {row}"
    );
    // The law goes on to its floor (10 %: the file's load does not answer to the weight), then
    // stays there: no table change on any node for a while (no oscillation).
    let floor = Instant::now();
    loop {
        let m = c
            .backends(0)?
            .iter()
            .find(|r| r["address"] == node2.as_str())
            .and_then(|r| r["multiplier_percent"].as_u64());
        if m == Some(10) {
            break;
        }
        ensure!(
            floor.elapsed() < SHED_WITHIN,
            "node 2's multiplier stuck at {m:?}"
        );
        thread::sleep(Duration::from_millis(250));
    }
    // 10 of 210: every node's table at the floor, the same.
    c.wait_share("node 2 at the floor", SHED_WITHIN, |s| s < 0.06)?;
    let spread = c.spread(100)?;
    println!(
        "node 2 at the floor (10 %) {:?} after its load rose; new connections {spread:?}",
        busy.elapsed()
    );
    ensure!(
        busy.elapsed() <= SHED_WITHIN && spread[2] <= 0.10,
        "node 2 still got {spread:?} of new connections after {:?}",
        busy.elapsed()
    );
    // Watched for the 2 minutes the issue asks: a control law that oscillates moves a table.
    let (fingerprint, _) = c.table(0)?;
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(120) {
        for i in 0..NODES {
            let (f, share) = c.table(i)?;
            ensure!(
                f == fingerprint,
                "node {i}'s table moved while the load stayed (share {share:.3}) after {:?}",
                settle.elapsed()
            );
        }
        thread::sleep(Duration::from_secs(1));
    }
    set_load(&c.lab, 2, 0.05)?;
    let back = c.wait_share("node 2 back to ~1/3", SHED_WITHIN * 2, |s| s >= 0.30)?;
    let spread = c.spread(90)?;
    println!(
        "load gone: node 2 back to a third of the table after {back:?} (busy phase {:?}); new connections {spread:?}",
        busy.elapsed()
    );
    ensure!(
        spread[2] > 0.15,
        "node 2 got {spread:?} after its load went"
    );
    for conn in conns {
        let r = conn.finish();
        ensure!(
            r.is_clean(),
            "an established connection was hurt by the weight changes: {r:?}"
        );
    }

    // ---- 2. Link down ----
    let conns = open_long_conns(&c, 1)?;
    let sw_port = "sw-b2";
    let down = Instant::now();
    c.lab
        .exec_ok(c.lab.switch_ns(), &["ip", "link", "set", sw_port, "down"])?;
    let mut drained = [None, None];
    while drained.iter().any(Option::is_none) && down.elapsed() < Duration::from_secs(30) {
        for (i, d) in drained.iter_mut().enumerate() {
            if d.is_none()
                && c.backends(i)?
                    .iter()
                    .any(|r| r["address"] == node2.as_str() && r["state"] == "draining")
            {
                *d = Some(down.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    println!(
        "link of node 2 down: drained on node 0 after {:?}, on node 1 after {:?}",
        drained[0], drained[1]
    );
    let (Some(d0), Some(d1)) = (drained[0], drained[1]) else {
        bail!(
            "node 2 not drained within 30 s: {drained:?}; node 0's rows {:?}",
            c.backends(0)
        );
    };
    // The promise (README, issue 27): drained everywhere within 3 s. Here that is two votes
    // (nodes 0 and 1, the quorum of three nodes) published and read back through the API.
    ensure!(
        d0.max(d1) <= DRAIN_WITHIN,
        "drained after {d0:?} / {d1:?}, more than {DRAIN_WITHIN:?}"
    );
    // No new connection is sent into the dead link: every one is answered.
    let spread = c.spread(60)?;
    ensure!(
        spread[2] == 0.0,
        "node 2 answered {spread:?} with its link down?"
    );
    let (f0, _) = c.table(0)?;
    let (f1, _) = c.table(1)?;
    ensure!(f0 == f1, "nodes 0 and 1 disagree about node 2");
    let node2_name = c.lab.backend_name(2);
    for conn in conns {
        let on_two = conn.backend() == node2_name;
        let r = conn.finish();
        ensure!(
            on_two || r.is_clean(),
            "a connection to node 0 or 1 was hurt: {r:?}"
        );
    }
    // Recovery: the link comes back, the node takes new flows again (after the hold-down).
    let up = Instant::now();
    c.lab
        .exec_ok(c.lab.switch_ns(), &["ip", "link", "set", sw_port, "up"])?;
    let back = c.wait_share("node 2 back after its link", CONVERGE, |s| s >= 0.30)?;
    println!(
        "link of node 2 up: back in the tables after {back:?} ({:?})",
        up.elapsed()
    );
    Ok(())
}

/// `sluice run` with `health_check:` in its config: a backend whose link goes down drains
/// (measured), every new connection is answered meanwhile, and it comes back with its link.
#[test]
fn static_config_health_check_drains_a_dead_backend() -> Result<()> {
    require_root();
    let lab = Lab::build(LabConfig {
        backends: 3,
        udp: false,
    })?;
    let backends: Vec<_> = (0..3).map(sluice_tests::BackendSpec::active).collect();
    let config = lab.write_config(&backends)?;
    let text = std::fs::read_to_string(&config)?.replace(
        "    protocol: tcp\n",
        &format!(
            "    protocol: tcp\n    health_check: {{protocol: http, port: {HTTP_PORT}, path: /}}\n"
        ),
    );
    std::fs::write(&config, text)?;
    let mut run = lab.run_sluice_with(&config, Duration::from_secs(60))?;
    let vip = format!("{}:{HTTP_PORT}/tcp", lab.vip());
    let node2 = lab.backend_addr(2).to_string();
    let rows = |lab: &Lab| -> Result<Vec<Value>> {
        let out = lab.sluice_ok(&["inspect", "backends", "-o", "json"])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| b["vip"] == vip.as_str())
            .cloned()
            .collect())
    };
    let wait = |what: &str, ok: &dyn Fn(&[Value]) -> bool| -> Result<Duration> {
        let started = Instant::now();
        loop {
            let r = rows(&lab)?;
            if ok(&r) {
                return Ok(started.elapsed());
            }
            ensure!(started.elapsed() < Duration::from_secs(30), "{what}: {r:?}");
            thread::sleep(Duration::from_millis(50));
        }
    };
    wait("all three up", &|r| {
        r.len() == 3
            && r.iter()
                .all(|b| b["health"] == "up" && b["state"] == "active")
    })?;
    let down = Instant::now();
    lab.exec_ok(lab.switch_ns(), &["ip", "link", "set", "sw-b2", "down"])?;
    let drained = wait("backend 2 draining", &|r| {
        r.iter()
            .any(|b| b["address"] == node2.as_str() && b["state"] == "draining")
    })?;
    println!("sluice run: backend 2's link down -> drained after {drained:?}");
    ensure!(
        drained <= DRAIN_WITHIN,
        "drained after {drained:?}, more than {DRAIN_WITHIN:?}"
    );
    let bodies = lab.curl_vip(30)?;
    ensure!(
        !bodies.iter().any(|b| *b == lab.backend_name(2)),
        "{bodies:?}"
    );
    lab.exec_ok(lab.switch_ns(), &["ip", "link", "set", "sw-b2", "up"])?;
    let back = wait("backend 2 back", &|r| {
        r.iter()
            .any(|b| b["address"] == node2.as_str() && b["state"] == "active")
    })?;
    println!(
        "sluice run: link up again -> active after {back:?} ({:?} after it went down)",
        down.elapsed()
    );
    ensure!(
        run.try_wait()?.is_none(),
        "sluice run died: {}",
        run.log_text()
    );
    ensure!(
        run.log_text().contains("health: backend"),
        "no health log line: {}",
        run.log_text()
    );
    Ok(())
}
