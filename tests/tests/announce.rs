//! The L2 election over the agents lab's three nodes (`sluice agent --announce` on each, a
//! real kube-apiserver, the agents' own ServiceAccount): 30 pool addresses spread over the
//! three, and a cordoned node or a node whose interface goes down loses its addresses to the
//! others, measured where it matters, in the client's neighbour table (the new holders'
//! gratuitous ARPs move the entries; the client sends nothing meanwhile). Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::k8s::announce::{LEASE_DURATION, LEASE_LABEL, LEASE_LABEL_VALUE, RENEW_EVERY};
use serde_json::json;
use sluice_tests::SluiceProcess;
use sluice_tests::agents_lab::{AgentsLab, NODES, WebService, check_agents, node_name};
use sluice_tests::kube::AGENT_NAMESPACE;

/// Pool addresses announced (Services, one address each).
const ADDRESSES: usize = 30;
/// The most one node may hold: ceil(30/3) + 2.
const MOST_PER_NODE: usize = ADDRESSES.div_ceil(NODES) + 2;
/// How long the first election may take to settle (three agents starting, handovers).
const SETTLE: Duration = Duration::from_secs(60);

struct Spread {
    /// Dropped first: the agents stop before the API server and the lab.
    agents: Vec<Option<SluiceProcess>>,
    nodes: AgentsLab,
    addrs: Vec<IpAddr>,
}

impl Spread {
    /// The agents lab with [`ADDRESSES`] LoadBalancer Services, each given one address of a
    /// pool (written into its status, as MetalLB would: the pool does not auto-assign), and an
    /// announcing agent on every node.
    fn start() -> Result<Spread> {
        let nodes = AgentsLab::start(WebService::default())?;
        let lab = &nodes.lab;
        let base = lab.pool_base();
        lab.serve_prefix(base, 27)?;
        lab.client_prefix_on_link(base, 27)?;
        let addrs: Vec<IpAddr> = (0..ADDRESSES as u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(base) + i)))
            .collect();
        let listed: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
        nodes.kube.pool("spread", &listed, false, false)?;
        let services: Vec<String> = (0..ADDRESSES)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: vip-{i}, namespace: default}}\n\
                     spec:\n  type: LoadBalancer\n  selector: {{app: web}}\n  ports:\n    - {{name: http, port: 80, protocol: TCP}}\n"
                )
            })
            .collect();
        nodes.kube.apply_yaml(&services.join("---\n"))?;
        for (i, addr) in addrs.iter().enumerate() {
            nodes.kube.patch_status(
                &format!("/api/v1/namespaces/default/services/vip-{i}"),
                &json!({"status": {"loadBalancer": {"ingress": [{"ip": addr.to_string()}]}}}),
            )?;
        }
        let mut agents = Vec::new();
        for i in 0..NODES {
            // The ARP replies leave by XDP_TX.
            lab.enable_backend_xdp_tx(i)?;
            agents.push(Some(nodes.spawn_agent(
                i,
                &["--announce", "--lease-namespace", AGENT_NAMESPACE],
            )?));
        }
        Ok(Spread {
            agents,
            nodes,
            addrs,
        })
    }

    fn check_agents(&mut self) -> Result<()> {
        check_agents(self.agents.iter_mut().map(Option::as_mut))
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some(format!("--- node {i}:\n{}", a.as_ref()?.log_text())))
            .collect()
    }

    /// Address -> holding node, from the VIP Leases.
    fn holders(&self) -> Result<BTreeMap<IpAddr, String>> {
        let leases = self.nodes.kube.lease_holders(
            AGENT_NAMESPACE,
            &format!("{LEASE_LABEL}={LEASE_LABEL_VALUE}"),
        )?;
        Ok(self
            .addrs
            .iter()
            .filter_map(|a| {
                let holder = leases.get(&lb_userspace::k8s::announce::lease_name(*a))?;
                (!holder.is_empty()).then(|| (*a, holder.clone()))
            })
            .collect())
    }

    /// The addresses node `i`'s ANNOUNCE map answers ARP for (with its own MAC).
    fn announced(&self, i: usize) -> Result<BTreeSet<IpAddr>> {
        let v = self.nodes.sluice(i, &["inspect", "announce"])?;
        let mac = &self.nodes.lab.backend_macs()[i];
        let list = v["announced"]
            .as_array()
            .context("inspect announce: no list")?;
        let mut out = BTreeSet::new();
        for e in list {
            ensure!(
                e["mac"].as_str() == Some(mac),
                "node {i} answers {e} with another MAC than its {mac}"
            );
            out.insert(e["address"].as_str().unwrap_or("").parse()?);
        }
        Ok(out)
    }

    /// Every address held by a Lease, and each holder's ANNOUNCE map holding exactly what its
    /// Leases say: `Some(address -> node index)`.
    fn consistent(&self) -> Result<Option<BTreeMap<IpAddr, usize>>> {
        let holders = self.holders()?;
        if holders.len() != self.addrs.len() {
            return Ok(None);
        }
        let mut by_node = BTreeMap::new();
        for i in 0..NODES {
            if self.agents[i].is_none() {
                continue;
            }
            let held: BTreeSet<IpAddr> = holders
                .iter()
                .filter(|(_, h)| **h == node_name(i))
                .map(|(a, _)| *a)
                .collect();
            // A node may hold Leases before its first apply pinned the maps (its announcer
            // starts with the agent): not consistent yet, not an error. The agents are alive
            // (checked by `settled` each round), and a node that never attaches fails there.
            match self.announced(i) {
                Ok(answered) if answered == held => {}
                Ok(_) => return Ok(None),
                Err(e) if format!("{e:#}").contains("no sluice maps pinned") => return Ok(None),
                Err(e) => return Err(e),
            }
            by_node.extend(held.into_iter().map(|a| (a, i)));
        }
        Ok((by_node.len() == self.addrs.len()).then_some(by_node))
    }

    /// Waits until [`Spread::consistent`] holds and has not changed for two renew rounds (the
    /// handovers of the start are over).
    fn settled(&mut self, what: &str) -> Result<BTreeMap<IpAddr, usize>> {
        let start = Instant::now();
        let mut last: Option<(BTreeMap<IpAddr, usize>, Instant)> = None;
        loop {
            self.check_agents()?;
            let now = self.consistent()?;
            match (&last, now) {
                (Some((seen, since)), Some(now)) if *seen == now => {
                    if since.elapsed() >= 2 * RENEW_EVERY {
                        println!("{what}: settled after {:?}", start.elapsed());
                        return Ok(now);
                    }
                }
                (_, Some(now)) => last = Some((now, Instant::now())),
                (_, None) => last = None,
            }
            if start.elapsed() > SETTLE {
                bail!(
                    "{what}: the election did not settle in {SETTLE:?}: holders {:?}\n{}",
                    self.holders()?,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Address -> node index, by the MAC in the client's neighbour table.
    fn client_view(&self) -> Result<BTreeMap<IpAddr, usize>> {
        let macs = self.nodes.lab.backend_macs();
        let table = self.nodes.lab.client_neighbours()?;
        Ok(self
            .addrs
            .iter()
            .filter_map(|a| {
                let (mac, _) = table.get(a)?;
                Some((*a, macs.iter().position(|m| m == mac)?))
            })
            .collect())
    }

    /// Waits until the client's neighbour table puts none of `moving` on node `from`, and
    /// returns how long that took from `since`, and the table then.
    fn moved_off(
        &self,
        what: &str,
        moving: &BTreeSet<IpAddr>,
        from: usize,
        since: Instant,
        timeout: Duration,
    ) -> Result<(Duration, BTreeMap<IpAddr, usize>)> {
        loop {
            let view = self.client_view()?;
            let left = moving
                .iter()
                .filter(|a| view.get(a).is_none_or(|n| *n == from))
                .count();
            if left == 0 {
                return Ok((since.elapsed(), view));
            }
            if since.elapsed() > timeout {
                bail!(
                    "{what}: {left} of node {from}'s {} addresses still resolve to it (or not at all) after {timeout:?}: {view:?}\n{}",
                    moving.len(),
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The API server's count of Lease requests so far, by verb (GET, LIST, WATCH, POST, PUT,
/// PATCH...), from its own `apiserver_request_total`.
fn lease_requests(kube: &sluice_tests::kube::Kube) -> Result<BTreeMap<String, f64>> {
    let out = kube.kubectl_ok(&["get", "--raw", "/metrics"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut by_verb = BTreeMap::new();
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        if !labels.contains("resource=\"leases\"") {
            continue;
        }
        let verb = labels
            .split("verb=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .unwrap_or("");
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by_verb.entry(verb.to_owned()).or_default() += value;
    }
    Ok(by_verb)
}

fn count(placed: &BTreeMap<IpAddr, usize>) -> BTreeMap<usize, usize> {
    let mut c = BTreeMap::new();
    for n in placed.values() {
        *c.entry(*n).or_default() += 1;
    }
    c
}

/// The node holding the most addresses, and those.
fn busiest(placed: &BTreeMap<IpAddr, usize>) -> (usize, BTreeSet<IpAddr>) {
    let (node, _) = count(placed)
        .into_iter()
        .max_by_key(|(_, c)| *c)
        .unwrap_or_default();
    let addrs = placed
        .iter()
        .filter(|(_, n)| **n == node)
        .map(|(a, _)| *a)
        .collect();
    (node, addrs)
}

/// 30 addresses land on all three nodes, none with more than ceil(30/3)+2, as the Leases, the
/// nodes' ANNOUNCE maps and the client's ARP resolution all say; a cordoned holder's addresses
/// move to the others within the lease time at the client, and come back when it is
/// uncordoned; a holder whose interface goes down stops answering at once and its addresses
/// move to the others once its leases expire (it cannot reach the API server any more: its
/// only link is the one that went down).
#[test]
fn announce_spreads_thirty_vips_and_moves_them_off_cordoned_and_link_down_nodes() -> Result<()> {
    // Moves are asserted within the lease time.
    let _timing = sluice_tests::timing_lock();
    let mut env = Spread::start()?;

    // ---- Spread: the Leases and the maps agree, and so does the client.
    let placed = env.settled("30 addresses over 3 nodes")?;
    let per_node = count(&placed);
    println!("spread by Lease: {per_node:?} (node index -> addresses)");
    ensure!(
        per_node.len() == NODES,
        "not every node holds an address: {per_node:?}"
    );
    ensure!(
        per_node.values().all(|c| *c <= MOST_PER_NODE),
        "a node holds more than {MOST_PER_NODE}: {per_node:?}"
    );
    // ---- Requests: the Leases are watched, so a settled election only writes renewals: per
    // node and renew round its candidacy and the addresses it holds, (nodes + addresses) in
    // all, whatever the number of nodes, and reads none. Reading them (a GET of every address's
    // Lease every round, on every node) would cost (addresses x nodes) GETs a round; what other
    // parts of the agent read (the address allocator's own election GETs its one Lease every
    // 3 s on every agent) stays far below one GET per address and round in all.
    let window = 4 * RENEW_EVERY;
    let before = lease_requests(&env.nodes.kube)?;
    thread::sleep(window);
    let after = lease_requests(&env.nodes.kube)?;
    let delta = |verb: &str| {
        after.get(verb).copied().unwrap_or(0.0) - before.get(verb).copied().unwrap_or(0.0)
    };
    let rounds = (window.as_secs_f64() / RENEW_EVERY.as_secs_f64()).ceil() + 1.0;
    let allocator_rounds = (window.as_secs_f64() / 3.0).ceil() + 1.0;
    let (gets, puts) = (delta("GET"), delta("PUT"));
    println!(
        "Lease requests in {window:?} (settled, {ADDRESSES} addresses, {NODES} nodes): GET {gets}, PUT {puts}, POST {}, PATCH {}, LIST {}, WATCH {}",
        delta("POST"),
        delta("PATCH"),
        delta("LIST"),
        delta("WATCH")
    );
    ensure!(
        gets < ADDRESSES as f64 * rounds,
        "{gets} Lease GETs in {window:?}: the announcement Leases are read, not watched"
    );
    ensure!(
        puts <= (NODES + ADDRESSES) as f64 * rounds + allocator_rounds,
        "{puts} Lease PUTs in {window:?}: more than a renewal per Lease held and round"
    );
    env.nodes.lab.client_resolve(&env.addrs)?;
    let view = env.client_view()?;
    ensure!(
        view == placed,
        "the client resolves the addresses to other nodes than the Leases say: {view:?}, Leases {placed:?}"
    );

    // ---- Cordon: the busiest node releases at once; the client follows the new holders'
    // gratuitous ARPs.
    let (cordoned, moving) = busiest(&placed);
    let at = Instant::now();
    env.nodes
        .kube
        .kubectl_ok(&["cordon", &node_name(cordoned)])?;
    let (took, view) = env.moved_off("cordon", &moving, cordoned, at, 2 * LEASE_DURATION)?;
    println!(
        "node {cordoned} cordoned: the client moved its {} addresses to the others in {took:?}; now {:?}",
        moving.len(),
        count(&view)
    );
    ensure!(
        took <= LEASE_DURATION,
        "the cordoned node's addresses took {took:?} to move: more than the lease ({LEASE_DURATION:?})"
    );
    ensure!(
        env.announced(cordoned)?.is_empty(),
        "the cordoned node still answers for {:?}",
        env.announced(cordoned)?
    );
    let log = env.agents[cordoned]
        .as_ref()
        .map(SluiceProcess::log_text)
        .unwrap_or_default();
    ensure!(
        log.contains(&format!(
            "not announcing any VIP: node {} is cordoned",
            node_name(cordoned)
        )),
        "node {cordoned} does not say why it stopped: {log}"
    );

    // Uncordoned, it takes its share back (handovers), the bound holds again.
    env.nodes
        .kube
        .kubectl_ok(&["uncordon", &node_name(cordoned)])?;
    let placed = env.settled("uncordoned")?;
    let per_node = count(&placed);
    println!("uncordoned: {per_node:?}");
    ensure!(
        per_node.len() == NODES && per_node.values().all(|c| *c <= MOST_PER_NODE),
        "after the uncordon: {per_node:?}"
    );

    // ---- Link down: the busiest node's interface goes down.
    let (down, moving) = busiest(&placed);
    env.nodes.lab.client_resolve(&env.addrs)?;
    let at = Instant::now();
    env.nodes.lab.exec_ok(
        env.nodes.lab.backend_ns(down),
        &["ip", "link", "set", "eth0", "down"],
    )?;
    // It stops answering at once (its agent reads the link state): nothing stays in its map
    // to answer with when the link comes back.
    let mut stopped = None;
    while at.elapsed() < RENEW_EVERY {
        if env.announced(down)?.is_empty() {
            stopped = Some(at.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let log = env.agents[down]
        .as_ref()
        .map(SluiceProcess::log_text)
        .unwrap_or_default();
    ensure!(
        stopped.is_some(),
        "node {down} still answers for {:?} with its interface down: {log}",
        env.announced(down)?
    );
    ensure!(
        log.contains("not announcing any VIP: interface eth0 is down"),
        "node {down} does not say why it stopped: {log}"
    );
    // Its leases expire (it cannot release them): the others take over within the lease
    // time after its last renewal, plus a round of slack for a busy machine.
    let bound = LEASE_DURATION + RENEW_EVERY;
    let (took, view) = env.moved_off("link down", &moving, down, at, 2 * bound)?;
    println!(
        "node {down}'s eth0 down: it emptied its ANNOUNCE map in {:?}; the client moved its {} addresses to the others in {took:?}; now {:?}",
        stopped.unwrap_or_default(),
        moving.len(),
        count(&view)
    );
    ensure!(
        took <= bound,
        "the addresses of the node whose link went down took {took:?} to move: more than the lease and a round ({bound:?})"
    );
    let holders = env.holders()?;
    ensure!(
        holders.len() == ADDRESSES && holders.values().all(|h| *h != node_name(down)),
        "Lease holders after the link went down: {holders:?}"
    );
    env.nodes.lab.exec_ok(
        env.nodes.lab.backend_ns(down),
        &["ip", "link", "set", "eth0", "up"],
    )?;
    env.check_agents()?;
    for agent in env.agents.iter_mut() {
        if let Some(agent) = agent.take() {
            let status = agent.stop(Duration::from_secs(15))?;
            ensure!(status.success(), "an agent exited with {status}");
        }
    }
    Ok(())
}
