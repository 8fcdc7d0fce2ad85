//! `sluice agent --bgp` against real routers: three node namespaces each run the agent (a real
//! kube-apiserver), a router namespace runs FRR (then BIRD) with ECMP, and the client reaches the
//! VIP only through the router (tests/src/bgp_lab.rs). Checks: every node's route is in the
//! router and the kernel's multipath route has all nodes; new connections spread over the nodes;
//! 50 long-lived connections survive draining a node (0 errors, none moved to another backend)
//! while its next hop leaves the router first (graceful shutdown); a SIGKILLed speaker and a
//! node cut off leave the router within the hold time; a restarted agent leaves no stale route;
//! cordon and the exclusion label drain too. Needs root, frr and bird2.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sluice_tests::LongConn;
use sluice_tests::bgp_lab::{BgpLab, DRAIN_WAIT, HOLD_TIME, NODES, RouterKind, node_name};

/// First routes: the agents sync, attach and connect; FRR starts its sessions.
const CONVERGE: Duration = Duration::from_secs(90);
const LONG_CONNS: usize = 50;
const REQUESTS: usize = 90;

/// Counts VIP packets the router forwards to each node, on the switch (the segment's view).
fn count_ingress(b: &BgpLab) -> Result<()> {
    let vip = b.lab.vip();
    let mut rules = String::from(
        "table bridge bgpin {\n  chain count {\n    type filter hook forward priority 0;\n",
    );
    for i in 0..NODES {
        rules.push_str(&format!(
            "    iifname \"{}\" oifname \"sw-b{i}\" ip daddr {vip} counter\n",
            b.lab.lb_peer_iface()
        ));
    }
    rules.push_str("  }\n}\n");
    let file = b.lab.dir().join("bgpin.nft");
    std::fs::write(&file, rules)?;
    let sw = b.lab.switch_ns();
    let _ = b
        .lab
        .exec(sw, &["nft", "delete", "table", "bridge", "bgpin"]);
    b.lab.exec_ok(sw, &["nft", "-f", &file.to_string_lossy()])?;
    Ok(())
}

/// Packets per node counted by [`count_ingress`].
fn ingress(b: &BgpLab) -> Result<Vec<u64>> {
    let out = b.lab.exec_ok(
        b.lab.switch_ns(),
        &["nft", "-j", "list", "table", "bridge", "bgpin"],
    )?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let counts: Vec<u64> = v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("rule"))
        .map(|rule| {
            rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| e.pointer("/counter/packets").and_then(Value::as_u64))
                .unwrap_or(0)
        })
        .collect();
    ensure!(counts.len() == NODES, "nft counters: {v}");
    Ok(counts)
}

/// New connections through the router: all answered, each node's next hop used, and the
/// answers come from every node (Maglev spreads them on).
fn check_spread(b: &BgpLab) -> Result<()> {
    count_ingress(b)?;
    let bodies = b.lab.curl_vip(REQUESTS)?;
    ensure!(bodies.len() == REQUESTS, "{} answers", bodies.len());
    let counts = ingress(b)?;
    let total: u64 = counts.iter().sum();
    println!("router -> node packets per node: {counts:?} (of {total})");
    for (i, n) in counts.iter().enumerate() {
        ensure!(
            *n * 10 >= total,
            "node {i} got {n} of {total} VIP packets from the router: {counts:?}"
        );
    }
    for i in 0..NODES {
        let name = b.lab.backend_name(i);
        ensure!(
            bodies.iter().any(|x| x.contains(&name)),
            "no answer from node {i}"
        );
    }
    Ok(())
}

fn all_but(b: &BgpLab, i: usize) -> BTreeSet<Ipv4Addr> {
    let mut s = b.all_nodes();
    s.remove(&b.node_addr(i));
    s
}

/// Waits until the agent of node `i` exits by itself; returns its log.
fn wait_exit(b: &mut BgpLab, i: usize, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let agent = b.agents[i].as_mut().context("no agent")?;
    loop {
        if let Some(status) = agent.try_wait()? {
            ensure!(status.success(), "agent {i} exited with {status}");
            let log = agent.log_text();
            b.agents[i] = None;
            return Ok(log);
        }
        ensure!(
            Instant::now() < deadline,
            "agent {i} still running {timeout:?} after SIGTERM: {}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM on node `i` with `LONG_CONNS` connections open: the router takes the node out of
/// ECMP (graceful shutdown, FRR: while still holding its path), then the path is withdrawn, the
/// agent exits, and every connection goes on with its backend.
fn check_drain(b: &mut BgpLab, i: usize) -> Result<()> {
    let conns: Vec<LongConn> = (0..LONG_CONNS)
        .map(|_| b.lab.long_conn_vip())
        .collect::<Result<_>>()?;
    let backends: Vec<String> = conns.iter().map(LongConn::backend).collect();
    let names: BTreeSet<&String> = backends.iter().collect();
    println!("{LONG_CONNS} long-lived connections on backends {names:?}");
    let node = b.node_addr(i);
    let vip = b.lab.vip();
    let start = Instant::now();
    b.term_agent(i)?;
    let (_, left) = b.router.wait_nexthops(
        vip,
        Duration::from_secs(20),
        "drained node out of ECMP",
        |h| !h.contains(&node) && h.len() == NODES - 1,
    )?;
    println!("drain of node {i}: out of the router's ECMP route {left:?} after SIGTERM");
    // By the graceful-shutdown community, before the withdrawal DRAIN_WAIT later.
    ensure!(
        left < DRAIN_WAIT,
        "node {i} left ECMP only {left:?} after SIGTERM: the graceful-shutdown announcement was not honoured (withdrawal after {DRAIN_WAIT:?})"
    );
    if b.router.kind() == RouterKind::Frr {
        // Out of ECMP by the graceful-shutdown community, not by a withdrawal: the path is
        // still there, marked.
        let paths = b.router.frr_paths(vip)?;
        ensure!(
            paths.contains(&(node, true)),
            "node {i} left ECMP without a graceful-shutdown path first: {paths:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.router.frr_paths(vip)?.iter().any(|(p, _)| *p == node) {
            ensure!(Instant::now() < deadline, "node {i}'s path never withdrawn");
            thread::sleep(Duration::from_millis(20));
        }
        println!(
            "drain of node {i}: path withdrawn {:?} after SIGTERM",
            start.elapsed()
        );
    }
    let log = wait_exit(b, i, Duration::from_secs(20))?;
    ensure!(
        log.contains("graceful-shutdown") && log.contains("session closed"),
        "agent {i} log lacks the drain: {log}"
    );
    println!(
        "drain of node {i}: agent exited {:?} after SIGTERM",
        start.elapsed()
    );
    // Every connection keeps echoing, on its backend, after the router moved it.
    let mut bad = Vec::new();
    let base: Vec<u64> = conns.iter().map(|c| c.snapshot().echoed).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let behind = conns
            .iter()
            .zip(&base)
            .filter(|(c, b)| {
                let s = c.snapshot();
                s.errors.is_empty() && s.running && s.echoed < *b + 10
            })
            .count();
        if behind == 0 {
            break;
        }
        if Instant::now() > deadline {
            bad.push(format!(
                "{behind} connections echoed fewer than 10 lines in 60 s after the drain"
            ));
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let mut moved = 0;
    let mut errors = 0;
    for (c, first) in conns.into_iter().zip(&backends) {
        let r = c.finish();
        errors += r.errors.len();
        if r.backends.len() != 1 || r.backends[0] != *first {
            moved += 1;
        }
        if !r.is_clean() {
            bad.push(format!("{r:?}"));
        }
    }
    println!("drain of node {i}: {errors} connection errors, {moved} moved to another backend");
    ensure!(bad.is_empty(), "connections broken by the drain: {bad:#?}");
    Ok(())
}

fn restart(b: &mut BgpLab, i: usize) -> Result<()> {
    let agent = b.spawn_agent(i)?;
    b.agents[i] = Some(agent);
    let all = b.all_nodes();
    let took = b.wait_route(&all, CONVERGE)?;
    println!("node {i} restarted: back in the route after {took:?}");
    Ok(())
}

fn check_sigkill(b: &mut BgpLab, i: usize) -> Result<()> {
    let want = all_but(b, i);
    let vip = b.lab.vip();
    let start = Instant::now();
    b.kill_agent(i)?;
    b.router
        .wait_nexthops(vip, HOLD_TIME * 3, "killed node gone", |h| *h == want)?;
    let took = start.elapsed();
    println!("SIGKILL of node {i}'s agent: out of the route after {took:?}");
    ensure!(
        took < HOLD_TIME,
        "node {i} left the route {took:?} after SIGKILL (hold time {HOLD_TIME:?})"
    );
    Ok(())
}

/// Node `i` cut off without any TCP close: out of the route within `limit` (the hold time,
/// or with BFD 1 s).
fn check_cut_off(b: &mut BgpLab, i: usize, limit: Duration) -> Result<()> {
    let want = all_but(b, i);
    let vip = b.lab.vip();
    let start = Instant::now();
    b.cut_off(i, true)?;
    let r = b
        .router
        .wait_nexthops(vip, HOLD_TIME * 4, "cut-off node gone", |h| *h == want);
    let took = start.elapsed();
    b.cut_off(i, false)?;
    r?;
    let how = if b.bfd.contains(&i) {
        "BFD 100 ms x 3"
    } else {
        "hold time 3 s, no BFD"
    };
    println!("node {i} cut off: out of the route after {took:?} ({how})");
    ensure!(
        took <= limit,
        "node {i} left the route {took:?} after being cut off ({how}; limit {limit:?})"
    );
    let all = b.all_nodes();
    let back = b.wait_route(&all, CONVERGE)?;
    println!("node {i} reconnected: back in the route after {back:?}");
    Ok(())
}

/// The one sample of `name` (its only peer's) in node `i`'s `/metrics`.
fn session_sample(b: &BgpLab, i: usize, name: &str) -> Result<f64> {
    let metrics = b.agent_metrics(i)?;
    let mut samples = metrics
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{peer=")));
    let (Some((_, v)), None) = (samples.next(), samples.next()) else {
        bail!("node {i}'s /metrics has not exactly one {name} sample (one peer)");
    };
    Ok(*v)
}

/// `/metrics` and `/readyz` say how node `i`'s session is: established with the VIP announced;
/// cut off from the router, down with the failure counted and its last error named in
/// `/readyz`; reconnected, up again.
fn check_session_state(b: &mut BgpLab, i: usize) -> Result<()> {
    ensure!(
        session_sample(b, i, "sluice_bgp_session_up")? == 1.0,
        "node {i}'s session is not up in /metrics"
    );
    ensure!(
        session_sample(b, i, "sluice_bgp_prefixes_announced")? == 1.0,
        "node {i} announces other than its one VIP prefix"
    );
    let failures = session_sample(b, i, "sluice_bgp_session_failures_total")?;
    b.cut_off(i, true)?;
    let start = Instant::now();
    let down = loop {
        let up = session_sample(b, i, "sluice_bgp_session_up")?;
        let readyz = b.agent_readyz(i)?;
        if up == 0.0 && readyz.contains("BGP peer") && readyz.contains("last error:") {
            break readyz;
        }
        if start.elapsed() > HOLD_TIME * 4 {
            b.cut_off(i, false)?;
            bail!(
                "node {i} cut off: /metrics up {up}, /readyz {readyz:?} after {:?}",
                start.elapsed()
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    b.cut_off(i, false)?;
    let counted = session_sample(b, i, "sluice_bgp_session_failures_total")?;
    ensure!(
        counted > failures,
        "node {i}'s failed session is not counted ({failures} before, {counted} after)"
    );
    println!(
        "node {i} cut off: session down in /metrics after {:?}; /readyz: {}",
        start.elapsed(),
        down.lines().find(|l| l.contains("BGP peer")).unwrap_or("")
    );
    let all = b.all_nodes();
    b.wait_route(&all, CONVERGE)?;
    let start = Instant::now();
    while session_sample(b, i, "sluice_bgp_session_up")? != 1.0 {
        ensure!(
            start.elapsed() < CONVERGE,
            "node {i}'s session is in the route but not up in /metrics"
        );
        thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        !b.agent_readyz(i)?.contains("BGP peer"),
        "/readyz still lists the session: {}",
        b.agent_readyz(i)?
    );
    Ok(())
}

/// A restarted agent announces what is served now, not what was: the VIP moves while node
/// `i`'s agent is down; afterwards the old address has no route and the new one all nodes.
fn check_no_stale_route(b: &mut BgpLab, i: usize) -> Result<()> {
    b.kill_agent(i)?;
    let old = b.lab.vip();
    let new = Ipv4Addr::from(u32::from(old) + 1);
    b.kube.patch_status(
        "/api/v1/namespaces/default/services/web",
        &json!({"status": {"loadBalancer": {"ingress": [{"ip": new.to_string()}]}}}),
    )?;
    let others = all_but(b, i);
    b.router
        .wait_nexthops(new, CONVERGE, "new VIP from the others", |h| *h == others)?;
    let agent = b.spawn_agent(i)?;
    b.agents[i] = Some(agent);
    let all = b.all_nodes();
    b.router
        .wait_nexthops(new, CONVERGE, "new VIP from all nodes", |h| *h == all)?;
    // A stale announcement may show at any moment after the restart: the router is looked at
    // every 100 ms for the hold time plus a second (bounded), and every look must show the old
    // address unrouted and the new one via all nodes.
    let window = HOLD_TIME + Duration::from_secs(1);
    let watched = Instant::now();
    let mut looks = 0u32;
    while watched.elapsed() < window {
        let stale = b.router.nexthops(old)?;
        let at = watched.elapsed();
        ensure!(
            stale.is_empty(),
            "old VIP {old} routed via {stale:?}: look {looks}, {at:?} into the {window:?} watch after node {i}'s agent came back"
        );
        let now = b.router.nexthops(new)?;
        ensure!(
            now == all,
            "new VIP {new} via {now:?}, not all nodes {all:?}: {at:?} into the {window:?} watch after node {i}'s agent came back"
        );
        looks += 1;
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(looks >= 5, "only {looks} looks at the router in {window:?}");
    b.kube.patch_status(
        "/api/v1/namespaces/default/services/web",
        &json!({"status": {"loadBalancer": {"ingress": [{"ip": old.to_string()}]}}}),
    )?;
    b.wait_route(&all, CONVERGE)?;
    println!("restart of node {i} with a moved VIP: no stale route");
    Ok(())
}

/// A cordon and the exclusion label drain the node out of the route; undoing them brings it back.
fn check_cordon_and_label(b: &mut BgpLab) -> Result<()> {
    let all = b.all_nodes();
    b.kube.kubectl_ok(&["cordon", &node_name(0)])?;
    let took = b.wait_route(&all_but(b, 0), CONVERGE)?;
    println!("cordon of node 0: out of the route after {took:?}");
    b.kube.kubectl_ok(&["uncordon", &node_name(0)])?;
    b.wait_route(&all, CONVERGE)?;
    let label = "node.kubernetes.io/exclude-from-external-load-balancers";
    b.kube
        .kubectl_ok(&["label", "node", &node_name(1), &format!("{label}=")])?;
    let took = b.wait_route(&all_but(b, 1), CONVERGE)?;
    println!("exclusion label on node 1: out of the route after {took:?}");
    b.kube
        .kubectl_ok(&["label", "node", &node_name(1), &format!("{label}-")])?;
    b.wait_route(&all, CONVERGE)?;
    Ok(())
}

/// An `externalTrafficPolicy: Local` Service is announced only by the nodes with a ready
/// endpoint of it, and follows the endpoint; deleting the Service withdraws it.
fn check_local_policy(b: &mut BgpLab) -> Result<()> {
    let vip = Ipv4Addr::from(u32::from(b.lab.vip()) + 2);
    b.kube.apply_yaml(
        "apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: local}
  ports:
    - {name: http, port: 80, protocol: TCP}
",
    )?;
    b.kube.patch_status(
        "/api/v1/namespaces/default/services/local",
        &json!({"status": {"loadBalancer": {"ingress": [{"ip": vip.to_string()}]}}}),
    )?;
    for node in [2, 0] {
        b.kube.apply_yaml(&format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: local-abc
  namespace: default
  labels: {{kubernetes.io/service-name: local}}
addressType: IPv4
ports:
  - {{name: http, port: 8080, protocol: TCP}}
endpoints:
  - addresses: [\"10.244.{node}.10\"]
    nodeName: {}
    conditions: {{ready: true, serving: true, terminating: false}}
",
            node_name(node)
        ))?;
        let want = BTreeSet::from([b.node_addr(node)]);
        let (_, took) = b.router.wait_nexthops(
            vip,
            CONVERGE,
            &format!("Local VIP via node {node} only"),
            |h| *h == want,
        )?;
        println!("Local Service: routed via its endpoint's node {node} only after {took:?}");
    }
    b.kube
        .kubectl_ok(&["delete", "service", "local", "-n", "default"])?;
    b.router.wait_nexthops(
        vip,
        CONVERGE,
        "deleted Service withdrawn",
        BTreeSet::is_empty,
    )?;
    Ok(())
}

fn first_routes(b: &mut BgpLab) -> Result<()> {
    let all = b.all_nodes();
    let took = b.wait_route(&all, CONVERGE)?;
    println!(
        "{:?}: multipath route to {} via all {NODES} nodes after {took:?}",
        b.router.kind(),
        b.lab.vip()
    );
    Ok(())
}

#[test]
fn frr_ecmp_drain_failover_restart() -> Result<()> {
    let mut b = BgpLab::start(RouterKind::Frr, &[0])?;
    first_routes(&mut b)?;
    let paths = b.router.frr_paths(b.lab.vip())?;
    ensure!(
        paths.len() == NODES && paths.iter().all(|(_, gshut)| !gshut),
        "FRR's BGP paths: {paths:?}"
    );
    check_spread(&b)?;
    check_session_state(&mut b, 0)?;
    check_drain(&mut b, 1)?;
    restart(&mut b, 1)?;
    check_sigkill(&mut b, 2)?;
    restart(&mut b, 2)?;
    // The router's hold timer runs from the last keepalive (sent every second): within the
    // hold time, plus what the router takes to install the change on a loaded machine.
    check_cut_off(&mut b, 1, HOLD_TIME + Duration::from_millis(700))?;
    check_cut_off(&mut b, 0, Duration::from_secs(1))?;
    check_no_stale_route(&mut b, 2)?;
    check_cordon_and_label(&mut b)?;
    check_local_policy(&mut b)?;
    check_spread(&b)?;
    Ok(())
}

#[test]
fn bird_ecmp_drain_failover() -> Result<()> {
    let mut b = BgpLab::start(RouterKind::Bird, &[])?;
    first_routes(&mut b)?;
    check_spread(&b)?;
    check_drain(&mut b, 0)?;
    restart(&mut b, 0)?;
    check_sigkill(&mut b, 1)?;
    restart(&mut b, 1)?;
    Ok(())
}
