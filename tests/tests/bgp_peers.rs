//! BGP for real routers (issue 29), against FRR in the lab (tests/src/bgp_lab.rs):
//! - TCP-MD5: the router expects a password of every node; the node with the right one is
//!   Established and its route in the router, a wrong password and none keep the session down,
//!   and the agent says why in its log, `/readyz`, `/metrics` and `sluice inspect bgp`; given
//!   the right password the node comes in.
//! - BGPPeer resources: two racks, two FRR routers, nodes split by a label; each node peers
//!   only with its rack's router (the rack's password from a Secret), and follows a relabel;
//!   the pool's communities and LOCAL_PREF (iBGP only) are in both routers' tables.
//!
//! Needs root and frr.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::json;
use sluice_tests::bgp_lab::{
    BgpLab, BgpSetup, ExtraRouter, NODE_ASN, NODES, ROUTER_ASN, Router, RouterKind, RouterOptions,
    node_name,
};
use sluice_tests::kube::AGENT_NAMESPACE;

/// First routes: the agents sync, attach and connect; FRR starts its sessions.
const CONVERGE: Duration = Duration::from_secs(90);
/// Long enough for a few connection attempts (3 s connect timeout, backoff from 1 s).
const ATTEMPTS: Duration = Duration::from_secs(20);
const PASSWORD: &str = "rack-a-s3cret";

/// Polls node `i`'s `/metrics` until a `sluice_bgp_session_last_error` series has `reason`.
fn wait_last_error(b: &BgpLab, i: usize, reason: &str) -> Result<String> {
    let start = Instant::now();
    loop {
        let metrics = b.agent_metrics(i)?;
        let series: Vec<&String> = metrics
            .keys()
            .filter(|k| k.starts_with("sluice_bgp_session_last_error{"))
            .collect();
        if let Some(s) = series
            .iter()
            .find(|k| k.contains(&format!("reason=\"{reason}\"")))
        {
            return Ok((*s).clone());
        }
        if start.elapsed() > ATTEMPTS {
            bail!(
                "node {i}: no last_error with reason {reason} in /metrics after {ATTEMPTS:?}: {series:?}\n{}",
                b.agent_logs()
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn tcp_md5_right_password_up_wrong_or_none_down_and_said_why() -> Result<()> {
    let router_passwords: BTreeMap<usize, String> =
        (0..3).map(|i| (i, PASSWORD.to_owned())).collect();
    let mut b = BgpLab::start_with(
        RouterKind::Frr,
        BgpSetup {
            router_passwords,
            agent_passwords: BTreeMap::from([
                (0, PASSWORD.to_owned()),
                (1, "not-the-password".to_owned()),
            ]),
            ..BgpSetup::default()
        },
    )?;
    let (n0, n1, n2) = (b.node_addr(0), b.node_addr(1), b.node_addr(2));
    let took = b.wait_route(&BTreeSet::from([n0]), CONVERGE)?;
    println!("right password: node 0 in the route after {took:?}");
    b.router.wait_established(&BTreeSet::from([n0]), CONVERGE)?;

    // Down, and why: the wrong password and no password both get no answer from the router.
    let wrong = wait_last_error(&b, 1, "no_answer_tcp_md5")?;
    let none = wait_last_error(&b, 2, "no_answer")?;
    println!("/metrics: {wrong}; {none}");
    let readyz = b.agent_readyz(1)?;
    ensure!(
        readyz.contains("not established") && readyz.contains("TCP-MD5"),
        "node 1's /readyz does not name the password: {readyz}"
    );
    let log = b.agents[1]
        .as_ref()
        .map(|a| a.log_text())
        .unwrap_or_default();
    ensure!(
        log.lines()
            .any(|l| l.contains("BGP peer") && l.contains("TCP-MD5")),
        "node 1's log does not say TCP-MD5:\n{log}"
    );
    check_inspect_bgp(&b)?;

    // Still down after several attempts: the router keeps refusing the wrong password.
    ensure!(
        b.router.frr_established()? == BTreeSet::from([n0]),
        "FRR established sessions other than node 0's: {}",
        b.router.diagnostics()
    );
    ensure!(
        b.router.nexthops(b.lab.vip())? == BTreeSet::from([n0]),
        "a node without the password is in the route"
    );

    // The right password brings node 1 in.
    b.setup.agent_passwords.insert(1, PASSWORD.to_owned());
    b.restart_agent(1)?;
    let took = b.wait_route(&BTreeSet::from([n0, n1]), CONVERGE)?;
    println!("node 1 given the right password: in the route after {took:?}");
    ensure!(
        !b.router.frr_established()?.contains(&n2),
        "node 2 (no password) established"
    );
    Ok(())
}

/// `sluice inspect bgp` in the nodes' namespaces: node 0 established with its one prefix,
/// node 1 down with the password mismatch's reason; MD5 on for both, the password nowhere; a
/// wrong `--agent` names the address nobody answers at.
fn check_inspect_bgp(b: &BgpLab) -> Result<()> {
    let router = b.lab.lb_addr().to_string();
    let up = b.inspect_bgp_peers(0)?;
    ensure!(up.len() == 1, "node 0: peers {up:?}");
    let p = &up[0];
    ensure!(
        p["address"] == router.as_str()
            && p["asn"] == ROUTER_ASN
            && p["local_asn"] == NODE_ASN
            && p["state"] == "established"
            && p["prefixes_announced"] == 1
            && p["uptime_seconds"].as_u64().is_some()
            && p["md5"] == true
            && p["bfd"] == "off",
        "node 0: {p}"
    );
    let down = b.inspect_bgp_peers(1)?;
    ensure!(down.len() == 1, "node 1: peers {down:?}");
    let p = &down[0];
    ensure!(
        p["state"] == "down"
            && p["prefixes_announced"] == 0
            && p["md5"] == true
            && p["last_reason"] == "no_answer_tcp_md5"
            && p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("TCP-MD5")),
        "node 1: {p}"
    );
    // The table for humans: the same row, in words.
    let out = b.inspect_bgp(1, &[])?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{router}:179")))
        .with_context(|| format!("node 1: no row for the router in\n{table}"))?;
    for cell in ["64512", "down", "on", "no_answer_tcp_md5: "] {
        ensure!(row.contains(cell), "node 1: no {cell:?} in {row:?}");
    }
    println!("sluice inspect bgp on node 1:\n{table}");
    for i in 0..2 {
        let all = String::from_utf8_lossy(&b.inspect_bgp(i, &["-o", "json"])?.stdout).into_owned()
            + &String::from_utf8_lossy(&b.inspect_bgp(i, &[])?.stdout);
        ensure!(
            !all.contains(PASSWORD) && !all.contains("not-the-password"),
            "node {i}: sluice inspect bgp shows a password:\n{all}"
        );
    }
    // Nobody at the address asked: an error that names it.
    let out = b.inspect_bgp(0, &["--agent", "127.0.0.1:1"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("no agent answers at http://127.0.0.1:1/bgp"),
        "inspect bgp with nobody at --agent: {:?} {err}",
        out.status
    );
    Ok(())
}

/// Applies a BGPPeer for the rack `rack` (nodes labelled `rack=<rack>`) at `addr`.
fn apply_rack_peer(
    b: &BgpLab,
    rack: &str,
    addr: Ipv4Addr,
    asn: u32,
    secret: Option<&str>,
) -> Result<()> {
    let mut spec = json!({
        "peerAddress": addr.to_string(),
        "peerASN": asn,
        "nodeSelector": {"matchLabels": {"rack": rack}},
    });
    if let Some(name) = secret {
        spec["passwordSecretRef"] = json!({"name": name});
    }
    b.kube.kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=30s",
        "crd/bgppeers.sluice.io",
    ])?;
    b.kube.apply_yaml(
        &json!({
            "apiVersion": "sluice.io/v1alpha1",
            "kind": "BGPPeer",
            "metadata": {"name": format!("rack-{rack}")},
            "spec": spec,
        })
        .to_string(),
    )
}

fn label_rack(b: &BgpLab, i: usize, rack: &str) -> Result<()> {
    b.kube.kubectl_ok(&[
        "label",
        "node",
        &node_name(i),
        &format!("rack={rack}"),
        "--overwrite",
    ])?;
    Ok(())
}

/// Polls `router`'s BGP table for the VIP until every path satisfies `done`.
fn wait_paths(
    b: &BgpLab,
    router: &Router,
    what: &str,
    done: impl Fn(&[(Ipv4Addr, String, u64)]) -> bool,
) -> Result<Vec<(Ipv4Addr, String, u64)>> {
    let start = Instant::now();
    loop {
        let paths = router.frr_path_attributes(b.lab.vip())?;
        if !paths.is_empty() && done(&paths) {
            return Ok(paths);
        }
        if start.elapsed() > CONVERGE {
            bail!("{what}: not within {CONVERGE:?}; paths {paths:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The pool's communities and LOCAL_PREF reach both routers' tables: the communities on
/// every path, LOCAL_PREF as set over iBGP (rack b). (That eBGP peers get no LOCAL_PREF is a
/// unit test: FRR ignores one from an eBGP peer, so its table could not tell.)
fn check_pool_communities(b: &BgpLab, rack_b: &Router) -> Result<()> {
    b.kube.kubectl_ok(&[
        "patch",
        "ipaddresspool",
        "lab",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"bgp":{"communities":["64512:100","64512:200"],"localPref":300}}}"#,
    ])?;
    let has = |c: &str| c.split(' ').any(|x| x == "64512:100") && c.contains("64512:200");
    let a = wait_paths(b, &b.router, "rack a: the pool's communities", |p| {
        p.len() == 2 && p.iter().all(|(_, c, _)| has(c))
    })?;
    let rb = wait_paths(b, rack_b, "rack b: communities and LOCAL_PREF 300", |p| {
        p.iter().all(|(_, c, lp)| has(c) && *lp == 300)
    })?;
    println!("pool communities in FRR: rack a {a:?}; rack b {rb:?}");
    Ok(())
}

/// Two racks, two routers: nodes 0 and 1 are in rack a (the lab's router, with a TCP-MD5
/// password from a Secret), node 2 in rack b (a second FRR). Both routers would accept every
/// node, so only the agents' choice keeps each node to its rack's router. Moving node 1 to
/// rack b moves its session.
#[test]
fn bgppeers_per_rack_each_node_peers_only_with_its_racks_router() -> Result<()> {
    let mut b = BgpLab::start_with(
        RouterKind::Frr,
        BgpSetup {
            router_passwords: (0..NODES).map(|i| (i, PASSWORD.to_owned())).collect(),
            peers_from_resources: true,
            ..BgpSetup::default()
        },
    )?;
    let nodes = b.lab.backend_addrs();
    // Rack b's router is in the nodes' AS: iBGP, where LOCAL_PREF goes.
    let rack_b = ExtraRouter::start(
        &b.lab,
        1,
        &nodes,
        &RouterOptions {
            asn: Some(NODE_ASN),
            ..RouterOptions::default()
        },
    )?;
    let (n0, n1, n2) = (nodes[0], nodes[1], nodes[2]);
    for (i, rack) in [(0, "a"), (1, "a"), (2, "b")] {
        label_rack(&b, i, rack)?;
    }
    b.kube.kubectl_ok(&[
        "-n",
        AGENT_NAMESPACE,
        "create",
        "secret",
        "generic",
        "rack-a-auth",
        &format!("--from-literal=password={PASSWORD}"),
    ])?;
    apply_rack_peer(&b, "a", b.lab.lb_addr(), ROUTER_ASN, Some("rack-a-auth"))?;
    apply_rack_peer(&b, "b", rack_b.addr, NODE_ASN, None)?;

    let took = b.wait_route(&BTreeSet::from([n0, n1]), CONVERGE)?;
    println!("rack a (MD5 from a Secret): nodes 0 and 1 in the lab router's route after {took:?}");
    b.router
        .wait_established(&BTreeSet::from([n0, n1]), CONVERGE)?;
    rack_b
        .router
        .wait_established(&BTreeSet::from([n2]), CONVERGE)?;
    let (hops, _) =
        rack_b
            .router
            .wait_nexthops(b.lab.vip(), CONVERGE, "node 2's route in rack b", |h| {
                *h == BTreeSet::from([n2])
            })?;
    println!("rack b: next hops {hops:?}");
    // Each node has one session: to its own rack's router.
    for i in 0..NODES {
        let metrics = b.agent_metrics(i)?;
        let peers: Vec<&String> = metrics
            .keys()
            .filter(|k| k.starts_with("sluice_bgp_session_up{"))
            .collect();
        ensure!(peers.len() == 1, "node {i} has sessions {peers:?}");
    }

    check_pool_communities(&b, &rack_b.router)?;

    // Node 1 moves to rack b: its session follows.
    label_rack(&b, 1, "b")?;
    b.router.wait_established(&BTreeSet::from([n0]), CONVERGE)?;
    rack_b
        .router
        .wait_established(&BTreeSet::from([n1, n2]), CONVERGE)?;
    let took = b.wait_route(&BTreeSet::from([n0]), CONVERGE)?;
    println!("node 1 relabelled to rack b: gone from rack a's route after {took:?}");
    rack_b
        .router
        .wait_nexthops(b.lab.vip(), CONVERGE, "nodes 1 and 2 in rack b", |h| {
            *h == BTreeSet::from([n1, n2])
        })?;
    drop(rack_b);
    Ok(())
}
