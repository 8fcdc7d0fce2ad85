//! sluice as it is deployed: every node balances AND serves. Three node namespaces each run
//! `sluice agent` (a real kube-apiserver, the agent's own ServiceAccount), every node is a
//! backend of the same LoadBalancer Service and accepts the VIP on its own stack (as
//! kube-proxy would), and the client routes the VIP to one node (as a BGP router would).
//! Connections must succeed and spread over all three nodes, each client frame must cause at
//! most one more frame on the segment (counted by the switch, not by sluice), and the three
//! nodes' Maglev tables must be identical; then the same with an `ipip` Service. Needs root.

use std::ops::Deref;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::net::NEXT_HOP_REFRESH;
use serde_json::Value;
use sluice_tests::agents_lab::{AgentsLab, NODES, WebService, check_agents};
use sluice_tests::{HTTP_PORT, SluiceProcess};

const REQUESTS: usize = 60;
const CONVERGE: Duration = Duration::from_secs(30);

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
        Cluster::start_with(&[])
    }

    /// The agents run with `extra` arguments.
    fn start_with(extra: &[&str]) -> Result<Cluster> {
        let nodes = AgentsLab::start(WebService::default())?;
        let mut agents = Vec::new();
        for i in 0..NODES {
            nodes.lab.enable_backend_xdp_tx(i)?;
            agents.push(nodes.spawn_agent(i, extra)?);
        }
        nodes.lab.client_route_vip_via_backend(0)?;
        Ok(Cluster { agents, nodes })
    }

    /// Node `i`'s Maglev table of the Service's VIP: its fingerprint (the table as backend
    /// addresses in slot order) and each backend's share.
    fn table(&self, i: usize) -> Result<(String, Vec<(String, u64)>)> {
        let vip = format!("{}:{HTTP_PORT}/tcp", self.lab.vip());
        let v = self.sluice(i, &["inspect", "maglev", &vip])?;
        let fingerprint = v["table_fingerprint"]
            .as_str()
            .with_context(|| format!("no table_fingerprint: {v}"))?
            .to_owned();
        let mut shares: Vec<(String, u64)> = v["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["backend"].as_str().unwrap_or_default().to_owned(),
                    b["table_slots"].as_u64().unwrap_or_default(),
                )
            })
            .collect();
        shares.sort();
        Ok((fingerprint, shares))
    }

    /// Node `i`'s global counter `name`.
    fn counter(&self, i: usize, name: &str) -> Result<u64> {
        let v = self.sluice(i, &["inspect", "stats"])?;
        v.pointer(&format!("/global/{name}"))
            .and_then(Value::as_u64)
            .with_context(|| format!("node {i}: no counter {name} in inspect stats: {v}"))
    }

    /// Waits until every node's maps hold the VIP with all three nodes, forwarding by `mode`.
    fn converge(&mut self, mode: &str) -> Result<()> {
        let deadline = Instant::now() + CONVERGE;
        let mut last = String::new();
        while Instant::now() < deadline {
            check_agents(self.agents.iter_mut().map(Some))?;
            let mut all = true;
            for i in 0..NODES {
                let v = self
                    .sluice(i, &["inspect", "backends"])
                    .unwrap_or(Value::Null);
                let rows = v["backends"].as_array().cloned().unwrap_or_default();
                let vip = self.lab.vip().to_string();
                let ours: Vec<&Value> = rows
                    .iter()
                    .filter(|b| {
                        b["vip"].as_str().is_some_and(|s| s.starts_with(&vip))
                            && b["state"] == "active"
                            && (b["mode"] == mode || b["mode"] == "local")
                    })
                    .collect();
                if ours.len() < NODES {
                    all = false;
                    last = format!("node {i}: {v}");
                }
            }
            if all {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(300));
        }
        bail!("the nodes' maps did not converge to 3 backends in {CONVERGE:?}; last: {last}")
    }

    /// Counts VIP frames on the switch per ingress port (client, node 0..2): the segment's own
    /// view, independent of sluice's counters.
    fn count_frames(&self) -> Result<()> {
        let sw = self.lab.switch_ns();
        let vip = self.lab.vip().to_string();
        let mut rules = String::from(
            "table bridge colo {\n  chain frames {\n    type filter hook prerouting priority 0;\n",
        );
        for port in ["sw-c", "sw-b0", "sw-b1", "sw-b2"] {
            // A VIP frame as the client sends it or node 0 rewrites it (l2), or wrapped (ipip).
            rules.push_str(&format!("    iifname \"{port}\" ip daddr {vip} counter\n"));
            rules.push_str(&format!("    iifname \"{port}\" ip protocol 4 counter\n"));
        }
        rules.push_str("  }\n}\n");
        let file = self.lab.dir().join("colo.nft");
        std::fs::write(&file, rules)?;
        let _ = self
            .lab
            .exec(sw, &["nft", "delete", "table", "bridge", "colo"]);
        self.lab
            .exec_ok(sw, &["nft", "-f", &file.to_string_lossy()])?;
        Ok(())
    }

    /// Frames to the VIP forwarded by the switch, by ingress port name.
    fn frames(&self) -> Result<Vec<(String, u64)>> {
        let out = self.lab.exec_ok(
            self.lab.switch_ns(),
            &["nft", "-j", "list", "table", "bridge", "colo"],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let mut found = Vec::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(rule) = item.get("rule") else {
                continue;
            };
            let expr = rule["expr"].as_array().cloned().unwrap_or_default();
            let port = expr
                .iter()
                .find_map(|e| {
                    e.pointer("/match/right")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            let packets = expr
                .iter()
                .find_map(|e| e.pointer("/counter/packets").and_then(Value::as_u64))
                .unwrap_or(0);
            found.push((port, packets));
        }
        ensure!(found.len() == 8, "nft counters: {v}");
        let mut by_port: Vec<(String, u64)> = Vec::new();
        for (port, n) in found {
            match by_port.iter_mut().find(|(p, _)| *p == port) {
                Some((_, total)) => *total += n,
                None => by_port.push((port, n)),
            }
        }
        Ok(by_port)
    }
}

/// Sends `REQUESTS` connections and checks: all answered, by all three nodes; the client's
/// VIP frames went to node 0 only and only node 0 sent VIP frames on (each at most once).
fn check_spread_and_single_balancing(c: &Cluster) -> Result<()> {
    c.count_frames()?;
    let bodies = c.lab.curl_vip(REQUESTS)?;
    ensure!(
        bodies.len() == REQUESTS,
        "{} answers of {REQUESTS}",
        bodies.len()
    );
    for i in 0..NODES {
        let name = c.lab.backend_name(i);
        let n = bodies.iter().filter(|b| b.contains(&name)).count();
        ensure!(
            n >= REQUESTS / 10,
            "node {i} ({name}) answered {n} of {REQUESTS}: {bodies:?}"
        );
    }
    let frames = c.frames()?;
    let get = |port: &str| {
        frames
            .iter()
            .find(|(p, _)| p == port)
            .map_or(0, |(_, n)| *n)
    };
    let (from_client, from_0) = (get("sw-c"), get("sw-b0"));
    ensure!(from_client > 0, "no client frames counted: {frames:?}");
    // Node 0 sends on only what it did not keep: never more than the client sent.
    let diag = (0..NODES)
        .map(|i| {
            let n = |k| c.counter(i, k).unwrap_or(u64::MAX);
            format!(
                "node {i}: tx {} local {} from_peer {} decapsulated {}",
                n("tx"),
                n("local"),
                n("from_peer"),
                n("decapsulated")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    ensure!(
        from_0 > 0 && from_0 < from_client,
        "frames {frames:?}; {diag}"
    );
    // Nodes 1 and 2 never balance again what node 0 balanced.
    ensure!(
        get("sw-b1") == 0 && get("sw-b2") == 0,
        "balanced twice: {frames:?}"
    );
    Ok(())
}

#[test]
fn every_node_balances_and_serves() -> Result<()> {
    let mut c = Cluster::start()?;
    c.converge("l2")?;
    // Every node computed the same table from the same API state, itself included.
    let tables: Vec<_> = (0..NODES).map(|i| c.table(i)).collect::<Result<_>>()?;
    ensure!(
        tables.iter().all(|t| *t == tables[0]),
        "Maglev tables differ: {tables:?}"
    );
    ensure!(
        tables[0].1.len() == NODES,
        "not every node owns slots: {tables:?}"
    );
    check_spread_and_single_balancing(&c)?;
    ensure!(
        c.counter(0, "local")? > 0,
        "node 0 never kept a flow for itself"
    );
    for i in 1..NODES {
        ensure!(
            c.counter(i, "from_peer")? > 0,
            "node {i} got nothing from node 0"
        );
        ensure!(c.counter(i, "tx")? == 0, "node {i} forwarded something");
    }

    // The same Service by IPIP: node 0 encapsulates, the others unwrap inline.
    c.kube.kubectl_ok(&[
        "annotate",
        "service",
        "web",
        "sluice.io/forwarding-mode=ipip",
        "--overwrite",
    ])?;
    c.converge("ipip")?;
    check_spread_and_single_balancing(&c)?;
    for i in 1..NODES {
        ensure!(
            c.counter(i, "decapsulated")? > 0,
            "node {i} unwrapped nothing"
        );
        ensure!(c.counter(i, "tx")? == 0, "node {i} forwarded something");
    }
    let tables: Vec<_> = (0..NODES).map(|i| c.table(i)).collect::<Result<_>>()?;
    ensure!(
        tables.iter().all(|t| *t == tables[0]),
        "ipip Maglev tables differ: {tables:?}"
    );
    Ok(())
}

/// The MAC node 2's eth0 takes in [`a_nodes_new_mac_reaches_the_maps_within_the_refresh`].
const NEW_MAC: &str = "02:5c:77:00:00:02";
/// The agents' next-hop refresh (30 s), and room for the apply and the reads.
const REFRESH_BOUND: Duration = NEXT_HOP_REFRESH.saturating_add(Duration::from_secs(10));

impl Cluster {
    /// The MAC node `i`'s maps forward the VIP's connections for node `node` to.
    fn mac_in_maps(&self, i: usize, node: usize) -> Result<String> {
        let v = self.sluice(i, &["inspect", "backends"])?;
        let (vip, addr) = (
            format!("{}:{HTTP_PORT}/tcp", self.lab.vip()),
            self.lab.backend_addr(node).to_string(),
        );
        let row = v["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["vip"] == vip.as_str() && b["address"] == addr.as_str())
            .with_context(|| format!("node {i}: no row of {addr} for {vip}: {v}"))?;
        row["mac"]
            .as_str()
            .map(str::to_lowercase)
            .with_context(|| format!("node {i}: no MAC in {row}"))
    }
}

/// A node's MAC changes under the same address (a new NIC): the kernel learns it from the
/// node's gratuitous ARP (`arp_notify`, as a host that announces its change), and the
/// balancing node's agent, whose model did not change, writes it into its maps within the
/// next-hop refresh; connections reach the node again. Load-aware weights are off: a load
/// change would rebuild the model and resolve again by itself, hiding a missing refresh.
#[test]
fn a_nodes_new_mac_reaches_the_maps_within_the_refresh() -> Result<()> {
    // A bounded wait measured against the refresh period.
    let _timing = sluice_tests::timing_lock();
    let mut c = Cluster::start_with(&["--load-aware=false"])?;
    c.converge("l2")?;
    let old = c.mac_in_maps(0, 2)?;
    ensure!(old != NEW_MAC, "node 2 already has {NEW_MAC}");
    let ns = c.lab.backend_ns(2).to_owned();
    c.lab
        .exec_ok(&ns, &["sysctl", "-qw", "net.ipv4.conf.eth0.arp_notify=1"])?;
    c.lab.exec_ok(
        &ns,
        &["ip", "link", "set", "dev", "eth0", "address", NEW_MAC],
    )?;
    let changed = Instant::now();
    loop {
        check_agents(c.agents.iter_mut().map(Some))?;
        let now = c.mac_in_maps(0, 2)?;
        if now == NEW_MAC {
            break;
        }
        ensure!(
            changed.elapsed() < REFRESH_BOUND,
            "node 0's maps still send node 2's connections to {now} (was {old}) {REFRESH_BOUND:?} after its MAC became {NEW_MAC}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    let took = changed.elapsed();
    check_spread_and_single_balancing(&c)?;
    eprintln!(
        "node 0's maps took node 2's new MAC {NEW_MAC} (was {old}) after {:.1} s; {REQUESTS} connections answered by every node again",
        took.as_secs_f64()
    );
    Ok(())
}
