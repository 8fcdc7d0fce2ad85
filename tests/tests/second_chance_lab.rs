//! Second chance with real packets (`--flow-state second-chance`, docs/design.md "Second
//! chance"): the 3-node agents lab (every node balances and serves, a real API server), the
//! client routing the VIP to node 0, conntrack active on every node (as kube-proxy's rules
//! make it). Long-lived TCP connections through a table change must all survive although no
//! node records a flow, and the change's moved connections must be handed on, most of them by
//! a pick that is not the first hop (node 0 forwarded the frame there):
//! - a node added: node 2 starts NotReady (draining: no slots) and becomes Ready;
//! - a node drained: node 1 becomes NotReady (its slots go to nodes 0 and 2, it keeps serving).
//!
//! Each change gets its own connections: one opened before the first change and still open
//! at the second would need two generations of tables (not built: docs/design.md).
//! Needs root and the lab lock.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sluice_tests::agents_lab::{AgentsLab, NODES, WebService, check_agents, node_name};
use sluice_tests::conn::LongConn;
use sluice_tests::{ECHO_PORT, SluiceProcess};

/// Long-lived connections per change: enough that each change moves several (a third or
/// half of them, by the table) and both the first hop and another pick hand some on.
const CONNECTIONS: usize = 36;
const CONVERGE: Duration = Duration::from_secs(60);
/// Echoes every connection must get after a change (one line every 100 ms).
const ECHOES_AFTER: u64 = 10;

struct Cluster {
    /// Declared first: the agents stop before the API server and the namespaces go.
    agents: Vec<SluiceProcess>,
    nodes: AgentsLab,
}

impl Cluster {
    /// The lab with node 2 NotReady, conntrack on in every node, the agents in second-chance
    /// mode, the client's VIP route via node 0.
    fn start() -> Result<Cluster> {
        let nodes = AgentsLab::start(WebService {
            echo: true,
            ..Default::default()
        })?;
        nodes
            .kube
            .node(&node_name(2), nodes.lab.backend_addr(2), false)?;
        let mut agents = Vec::new();
        for i in 0..NODES {
            nodes.lab.enable_backend_xdp_tx(i)?;
            conntrack_on(&nodes, i)?;
            agents.push(nodes.spawn_agent(i, &["--flow-state", "second-chance"])?);
        }
        nodes.lab.client_route_vip_via_backend(0)?;
        Ok(Cluster { agents, nodes })
    }

    /// Waits until every node's maps hold the VIP's echo port with node `i` in `states[i]`.
    fn converge(&mut self, states: [&str; NODES]) -> Result<()> {
        let lab = &self.nodes.lab;
        let vip = format!("{}:{ECHO_PORT}", lab.vip());
        let deadline = Instant::now() + CONVERGE;
        let mut last = String::new();
        while Instant::now() < deadline {
            check_agents(self.agents.iter_mut().map(Some))?;
            let mut all = true;
            for node in 0..NODES {
                let v = self
                    .nodes
                    .sluice(node, &["inspect", "backends"])
                    .unwrap_or(Value::Null);
                let rows = v["backends"].as_array().cloned().unwrap_or_default();
                for (i, want) in states.iter().enumerate() {
                    let addr = lab.backend_addr(i).to_string();
                    let found = rows.iter().any(|b| {
                        b["vip"].as_str().is_some_and(|s| s.starts_with(&vip))
                            && b["address"].as_str() == Some(addr.as_str())
                            && b["state"] == *want
                    });
                    if !found {
                        all = false;
                        last = format!("node {node}: backend {addr} not {want}: {v}");
                    }
                }
            }
            if all {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(300));
        }
        bail!("the nodes' maps did not reach {states:?} in {CONVERGE:?}; last: {last}")
    }

    /// Node `i`'s global counter `name`.
    fn counter(&self, i: usize, name: &str) -> Result<u64> {
        let v = self.nodes.sluice(i, &["inspect", "stats"])?;
        v.pointer(&format!("/global/{name}"))
            .and_then(Value::as_u64)
            .with_context(|| format!("node {i}: no counter {name} in inspect stats: {v}"))
    }

    /// Every node's `second_chance_handed_on`.
    fn handed_on(&self) -> Result<Vec<u64>> {
        (0..NODES)
            .map(|i| self.counter(i, "second_chance_handed_on"))
            .collect()
    }

    /// `CONNECTIONS` long-lived connections to the VIP's echo port, each answered once.
    fn open(&self) -> Result<Vec<LongConn>> {
        (0..CONNECTIONS)
            .map(|_| self.nodes.lab.long_conn_vip())
            .collect()
    }

    /// Node `i` Ready (takes new flows) or NotReady (drains).
    fn set_ready(&self, i: usize, ready: bool) -> Result<()> {
        self.nodes
            .kube
            .node(&node_name(i), self.nodes.lab.backend_addr(i), ready)
    }
}

/// Conntrack on in node `i`'s namespace: any rule with a `ct` expression does it (kube-proxy's
/// rules do on a real node).
fn conntrack_on(nodes: &AgentsLab, i: usize) -> Result<()> {
    let ns = nodes.lab.backend_ns(i);
    nodes
        .lab
        .exec_ok(ns, &["nft", "add", "table", "ip", "sc"])?;
    nodes.lab.exec_ok(
        ns,
        &[
            "nft",
            "add chain ip sc in { type filter hook input priority 0 ; }",
        ],
    )?;
    nodes.lab.exec_ok(
        ns,
        &[
            "nft", "add", "rule", "ip", "sc", "in", "ct", "state", "new", "counter",
        ],
    )?;
    Ok(())
}

/// Waits for `ECHOES_AFTER` more echoes on every connection, then stops them: every one clean
/// (no reset, no lost or wrong echo, the same backend throughout). Returns the backends'
/// names, in the connections' order.
fn finish_clean(conns: Vec<LongConn>, change: &str) -> Result<Vec<String>> {
    for c in &conns {
        c.wait_echoes(ECHOES_AFTER, Duration::from_secs(30))
            .with_context(|| format!("after {change}"))?;
    }
    let mut backends = Vec::new();
    let mut broken = Vec::new();
    for c in conns {
        let report = c.finish();
        if !report.is_clean() {
            broken.push(format!("{report:?}"));
        }
        backends.push(report.backends.first().cloned().unwrap_or_default());
    }
    ensure!(
        broken.is_empty(),
        "{} of {CONNECTIONS} connections broken by {change}: {broken:#?}",
        broken.len()
    );
    Ok(backends)
}

fn delta(after: &[u64], before: &[u64]) -> Vec<u64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

#[test]
fn long_lived_connections_survive_a_node_added_and_a_node_drained() -> Result<()> {
    sluice_tests::require_root();
    let mut c = Cluster::start()?;
    c.converge(["active", "active", "draining"])?;

    // A node added: node 2 takes slots from nodes 0 and 1. The connections that move are
    // sent by node 0 to node 2, which does not know them and hands them back.
    let conns = c.open()?;
    let before = c.handed_on()?;
    c.set_ready(2, true)?;
    c.converge(["active", "active", "active"])?;
    let backends = finish_clean(conns, "node 2 added")?;
    let added = delta(&c.handed_on()?, &before);
    println!(
        "node 2 added: {CONNECTIONS} connections (on {backends:?}), 0 broken, handed on by node: {added:?}"
    );
    ensure!(
        added[2] > 0 && added[0] == 0 && added[1] == 0,
        "only node 2, the new pick and not the first hop, hands on: {added:?}"
    );
    ensure!(
        !backends.iter().any(|b| b == "b2"),
        "a connection opened while node 2 drained was served by it: {backends:?}"
    );

    // A node drained: node 1's slots go to nodes 0 and 2, it keeps serving its connections.
    // Node 0 hands on those it now picks itself, node 2 those node 0 sends it.
    let conns = c.open()?;
    let before = c.handed_on()?;
    c.set_ready(1, false)?;
    c.converge(["active", "draining", "active"])?;
    let backends = finish_clean(conns, "node 1 drained")?;
    let drained = delta(&c.handed_on()?, &before);
    println!(
        "node 1 drained: {CONNECTIONS} connections (on {backends:?}), 0 broken, handed on by node: {drained:?}"
    );
    ensure!(
        drained[0] > 0 && drained[2] > 0,
        "both node 0 (first hop) and node 2 hand node 1's connections on: {drained:?}"
    );
    ensure!(
        drained[1] == 0,
        "node 1 keeps what it receives: {drained:?}"
    );
    Ok(())
}
