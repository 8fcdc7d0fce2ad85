//! Real packets through sluice in the namespace lab (see `sluice_tests::lab`). Needs root.
//!
//! The first tests check the lab itself and pass without sluice; the others need the `sluice`
//! binary (`cargo build -p lb-userspace --bin sluice`, or SLUICE_BIN) and fail with
//! "sluice binary missing" without it.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sluice_tests::{
    BackendSpec, ECHO_PORT, Lab, LabConfig, UDP_FIRST_PORT, UDP_PORT, require_root,
};

/// How far a backend's count may stray from its expected share, in binomial standard
/// deviations. With equal weights a Maglev table gives each of N backends 1/N of the slots (to
/// one slot in 65537) and each new connection has a fresh source port, so a backend's count of
/// n requests is binomial(n, 1/N), sd = sqrt(n p (1 - p)). 4.5 sd fails a correct balancer about
/// once in 150,000 runs per backend, and fails the skews that matter: for 3000 requests over 3
/// backends the bound is ±116 (±11.6 %), so 1300/1000/700 fails; for 600 UDP requests ±52.
const SPREAD_SDS: f64 = 4.5;

/// The range `count` of `n` draws with probability `p` must fall in (see [`SPREAD_SDS`]).
fn binomial_bounds(n: usize, p: f64) -> (usize, usize) {
    let mean = n as f64 * p;
    let slack = SPREAD_SDS * (mean * (1.0 - p)).sqrt();
    (
        (mean - slack).ceil().max(0.0) as usize,
        (mean + slack).floor() as usize,
    )
}

fn build(backends: usize) -> Lab {
    require_root();
    Lab::build(LabConfig {
        backends,
        udp: true,
    })
    .expect("building the lab")
}

fn all_active(n: usize) -> Vec<BackendSpec> {
    (0..n).map(BackendSpec::active).collect()
}

/// How many answers each backend gave; fails on a name that is no backend of the lab.
fn tally<'a>(lab: &Lab, names: impl IntoIterator<Item = &'a String>) -> Result<Vec<usize>> {
    let mut counts = vec![0; lab.backends()];
    for n in names {
        let i = lab
            .backend_index(n)
            .with_context(|| format!("answer {n:?} is not a lab backend"))?;
        counts[i] += 1;
    }
    Ok(counts)
}

fn assert_spread(what: &str, counts: &[usize], among: &[usize]) -> Result<()> {
    let total: usize = among.iter().map(|&i| counts[i]).sum();
    let (low, high) = binomial_bounds(total, 1.0 / among.len() as f64);
    let dist: BTreeMap<String, usize> = counts
        .iter()
        .enumerate()
        .map(|(i, &c)| (format!("b{i}"), c))
        .collect();
    println!("{what}: {total} answers, distribution {dist:?}, each must be in {low}..={high}");
    for &i in among {
        ensure!(
            (low..=high).contains(&counts[i]),
            "{what}: b{i} got {} of {total} answers, outside {low}..={high} (±{SPREAD_SDS} sd \
             of an even share); distribution {dist:?}",
            counts[i],
        );
    }
    Ok(())
}

/// Every VIP packet that reached a backend came through XDP (TTL 64), none through a kernel (63).
fn assert_only_xdp(lab: &Lab) -> Result<()> {
    for i in 0..lab.backends() {
        let c = lab.backend_counters(i)?;
        println!("b{i} VIP counters: {c:?}");
        ensure!(
            c.ttl_other == 0,
            "b{i} got {} VIP packets with TTL != 64: not forwarded by XDP ({c:?})",
            c.ttl_other
        );
    }
    Ok(())
}

fn native_xdp_mode(lab: &Lab) -> Result<()> {
    let link = lab.lb_link_json()?;
    let xdp = link
        .get("xdp")
        .with_context(|| format!("no XDP program on the lb's {}: {link}", lab.lb_iface()))?;
    // IFLA_XDP_ATTACHED: 1 = driver (native), 2 = generic (skb), 3 = hardware.
    ensure!(
        xdp.get("mode").and_then(|m| m.as_u64()) == Some(1),
        "XDP on the lb is not in native (driver) mode: {xdp}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The lab itself (no sluice needed).

#[test]
fn lab_builds_and_backends_serve() -> Result<()> {
    let lab = build(3);
    println!(
        "lab {}: vip {}, backends {:?}, macs {:?}, pin dir {}",
        lab.id(),
        lab.vip(),
        lab.backend_addrs(),
        lab.backend_macs(),
        lab.pin_dir().display()
    );
    for (i, addr) in lab.backend_addrs().into_iter().enumerate() {
        let r = lab.curl(addr, 5)?;
        ensure!(
            r.failures == 0,
            "HTTP to b{i} at {addr}: {} failures: {}",
            r.failures,
            r.stderr
        );
        ensure!(
            r.bodies.iter().all(|b| *b == format!("b{i}")),
            "HTTP to {addr} answered {:?}",
            r.bodies
        );

        let udp = lab.udp(
            SocketAddrV4::new(addr, UDP_PORT),
            5,
            UDP_FIRST_PORT + 100 * i as u16,
        )?;
        ensure!(
            udp.iter()
                .all(|a| a.as_deref() == Some(format!("b{i}").as_str())),
            "UDP to {addr} answered {udp:?}"
        );

        let conn = lab.long_conn(SocketAddrV4::new(addr, ECHO_PORT))?;
        conn.wait_echoes(3, Duration::from_secs(5))?;
        let report = conn.finish();
        ensure!(
            report.is_clean() && report.backends == [format!("b{i}")],
            "echo via {addr}: {report:?}"
        );
    }
    // Direct traffic is not VIP traffic.
    ensure!(
        lab.backend_hits()? == vec![0, 0, 0],
        "VIP counters moved without VIP traffic"
    );
    // Every veth sends with checksum offload off (needed for native XDP paths).
    let k = lab.exec_ok(lab.client_ns(), &["ethtool", "-k", lab.lb_iface()])?;
    ensure!(
        String::from_utf8_lossy(&k.stdout).contains("tx-checksumming: off"),
        "tx checksum offload still on in the client"
    );
    ensure!(!lab.xdp_attached()?, "XDP attached on a fresh lab");
    ensure!(lab.pins()?.is_empty(), "pins in a fresh pin dir");
    Ok(())
}

/// Checks the TTL proof and the DSR return path without sluice: the lb's kernel routes the VIP to
/// b1 (TTL 63 at b1), replies go from b1 straight to the client; without that route (ip_forward=0,
/// no XDP) nothing gets through.
#[test]
fn lab_kernel_routing_shows_ttl63_and_dsr_replies() -> Result<()> {
    let lab = build(3);
    lab.kernel_route_vip_via(1)?;
    let bodies = lab.curl_vip(20)?;
    ensure!(
        bodies.iter().all(|b| b == "b1"),
        "kernel-routed HTTP answered {bodies:?}"
    );
    let udp = lab.udp_vip(10, UDP_FIRST_PORT)?;
    ensure!(
        udp.iter().all(|a| a.as_deref() == Some("b1")),
        "kernel-routed UDP answered {udp:?}"
    );
    let conn = lab.long_conn_vip()?;
    conn.wait_echoes(3, Duration::from_secs(5))?;
    let report = conn.finish();
    ensure!(
        report.is_clean() && report.backends == ["b1"],
        "kernel-routed echo: {report:?}"
    );

    let c = lab.backend_counters(1)?;
    println!("b1 VIP counters with kernel routing: {c:?}");
    ensure!(
        c.ttl64 == 0 && c.ttl_other > 0,
        "kernel-routed packets must arrive with TTL 63: {c:?}"
    );
    ensure!(c.syn >= 21 && c.udp >= 10, "SYN/UDP counters: {c:?}");
    for i in [0, 2] {
        ensure!(
            lab.backend_counters(i)?.packets() == 0,
            "b{i} got VIP packets"
        );
    }

    lab.kernel_route_vip_off()?;
    let r = lab.curl(lab.vip(), 2)?;
    ensure!(
        r.failures == 2,
        "the VIP answered with ip_forward=0 and no XDP: {:?}",
        r.bodies
    );
    Ok(())
}

#[test]
fn lab_drop_leaves_nothing_behind() -> Result<()> {
    require_root();
    let listed = || -> Result<String> {
        let out = sluice_tests::cmd::sh(&["ip", "netns", "list"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mounted = |p: &Path| -> bool {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .contains(&*p.to_string_lossy())
    };

    let lab = build(3);
    let namespaces = lab.namespaces().to_vec();
    let nginx = lab.nginx_pids();
    let dir = lab.dir().to_path_buf();
    let before = listed()?;
    ensure!(
        namespaces.len() == 6,
        "expected sw, c, lb and 3 backends: {namespaces:?}"
    );
    for ns in &namespaces {
        ensure!(
            before
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} missing from ip netns list"
        );
    }
    ensure!(mounted(&dir.join("bpffs")), "bpffs not mounted");
    drop(lab);

    let after = listed()?;
    for ns in &namespaces {
        ensure!(
            !after
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} left behind:\n{after}"
        );
    }
    for pid in nginx {
        ensure!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "nginx {pid} still running"
        );
    }
    ensure!(!mounted(&dir.join("bpffs")), "bpffs mount left behind");
    ensure!(!dir.exists(), "{} left behind", dir.display());

    // Also when the test panics.
    let (tx, rx) = std::sync::mpsc::channel();
    let panicked = std::thread::spawn(move || {
        let lab = build(3);
        tx.send(lab.namespaces().to_vec()).unwrap();
        panic!("deliberate panic with a lab alive");
    })
    .join();
    ensure!(panicked.is_err(), "the thread should have panicked");
    let names = rx.recv()?;
    let after = listed()?;
    for ns in &names {
        ensure!(
            !after
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} left behind after a panic"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Through sluice.

#[test]
fn tcp_spreads_over_backends() -> Result<()> {
    let lab = build(3);
    lab.attach(&all_active(3))?;
    native_xdp_mode(&lab)?;
    lab.reset_counters()?;

    let requests = 3000;
    let bodies = lab.curl_vip(requests)?;
    let counts = tally(&lab, &bodies)?;
    assert_spread("tcp/80, 3000 connections", &counts, &[0, 1, 2])?;
    assert_only_xdp(&lab)?;
    for (i, &answers) in counts.iter().enumerate() {
        let c = lab.backend_counters(i)?;
        ensure!(
            c.syn >= answers as u64,
            "b{i} answered {answers} connections but saw only {} SYNs",
            c.syn
        );
    }

    let stats = lab.stats()?;
    println!("sluice stats: {stats}");
    let tx = stats["global"]["tx"]
        .as_u64()
        .context("stats: global.tx missing")?;
    ensure!(
        tx >= requests as u64,
        "stats: global.tx = {tx} for {requests} connections"
    );
    // sluice's per-backend counters for tcp/80 against what each backend received (nft, TTL 64):
    // the same packets counted at both ends. Counters were zeroed at attach (sluice) and right
    // after it (nft), with no traffic in between; a little slack for frames lost on the way.
    let vip80 = format!("{}:80/tcp", lab.vip());
    let entry = stats["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["vip"] == vip80.as_str()))
        .with_context(|| format!("stats: no entry for {vip80}"))?;
    for (i, addr) in lab.backend_addrs().into_iter().enumerate() {
        let sluice = entry["backends"]
            .as_array()
            .and_then(|v| v.iter().find(|b| b["address"] == addr.to_string().as_str()))
            .and_then(|b| b["packets"].as_u64())
            .with_context(|| format!("stats: {vip80} has no packet count for {addr}"))?;
        let seen = lab.backend_counters(i)?.ttl64;
        ensure!(
            sluice >= seen && sluice - seen <= sluice / 50,
            "b{i}: sluice counted {sluice} packets to it, the backend received {seen}"
        );
    }
    Ok(())
}

#[test]
fn udp_spreads() -> Result<()> {
    let lab = build(3);
    // `sluice run` (foreground) rather than attach: the path the DaemonSet uses.
    let sluice = lab.run_sluice(&all_active(3), Duration::from_secs(60))?;
    native_xdp_mode(&lab)?;
    lab.reset_counters()?;

    let answers = lab.udp_vip(600, UDP_FIRST_PORT)?;
    let missing = answers.iter().filter(|a| a.is_none()).count();
    ensure!(missing == 0, "{missing} of 600 UDP requests got no answer");
    let names: Vec<String> = answers.into_iter().flatten().collect();
    let counts = tally(&lab, &names)?;
    assert_spread("udp/5353, 600 source ports", &counts, &[0, 1, 2])?;
    assert_only_xdp(&lab)?;
    for (i, &n) in counts.iter().enumerate() {
        let c = lab.backend_counters(i)?;
        ensure!(
            c.udp >= n as u64,
            "b{i} answered {n} datagrams but counted {} VIP datagrams",
            c.udp
        );
    }

    let status = sluice.stop(Duration::from_secs(10))?;
    println!("sluice run exited with {status} after SIGTERM");
    Ok(())
}

#[test]
fn established_tcp_survives_other_backend_changes() -> Result<()> {
    let lab = build(4);
    lab.attach(&all_active(3))?;
    let conn = lab.long_conn_vip()?;
    let serving = lab
        .backend_index(&conn.backend())
        .context("long connection's backend")?;
    println!(
        "long connection {} is served by b{serving}",
        conn.snapshot().target
    );
    conn.wait_echoes(5, Duration::from_secs(5))?;

    // Add b3: the table changes, the connection must not.
    lab.attach(&all_active(4))?;
    conn.wait_echoes(10, Duration::from_secs(5))?;
    let counts = tally(&lab, &lab.curl_vip(300)?)?;
    println!("after adding b3: {counts:?}");
    // The added backend takes its 1/4 of new connections (not just "some").
    assert_spread("after adding b3, 300 connections", &counts, &[0, 1, 2, 3])?;

    // Remove a backend other than the serving one.
    let removed = (0..4).find(|&i| i != serving).unwrap();
    let remaining: Vec<BackendSpec> = (0..4)
        .filter(|&i| i != removed)
        .map(BackendSpec::active)
        .collect();
    lab.attach(&remaining)?;
    conn.wait_echoes(10, Duration::from_secs(5))?;
    let counts = tally(&lab, &lab.curl_vip(300)?)?;
    println!("after removing b{removed}: {counts:?}");
    ensure!(
        counts[removed] == 0,
        "b{removed} was removed but got new connections: {counts:?}"
    );
    let left: Vec<usize> = (0..4).filter(|&i| i != removed).collect();
    assert_spread("after removing a backend, 300 connections", &counts, &left)?;

    let report = conn.finish();
    println!("long connection: {report:?}");
    ensure!(
        report.is_clean(),
        "the established connection was disturbed: {report:?}"
    );
    ensure!(
        report.backends == [format!("b{serving}")],
        "it moved: {:?}",
        report.backends
    );
    ensure!(report.echoed >= 26, "too few echoes: {report:?}");
    assert_only_xdp(&lab)?;
    Ok(())
}

#[test]
fn drained_backend_keeps_connection_gets_no_new() -> Result<()> {
    let lab = build(3);
    lab.attach(&all_active(3))?;
    let conn = lab.long_conn_vip()?;
    let drained = lab
        .backend_index(&conn.backend())
        .context("long connection's backend")?;
    println!(
        "long connection {} is served by b{drained}; draining it",
        conn.snapshot().target
    );
    conn.wait_echoes(5, Duration::from_secs(5))?;

    let specs: Vec<BackendSpec> = (0..3)
        .map(|i| {
            if i == drained {
                BackendSpec::drained(i)
            } else {
                BackendSpec::active(i)
            }
        })
        .collect();
    lab.attach(&specs)?;
    conn.wait_echoes(10, Duration::from_secs(5))?;

    let counts = tally(&lab, &lab.curl_vip(300)?)?;
    println!("300 new connections with b{drained} draining: {counts:?}");
    ensure!(
        counts[drained] == 0,
        "drained b{drained} got new connections: {counts:?}"
    );
    let others: Vec<usize> = (0..3).filter(|&i| i != drained).collect();
    assert_spread(
        "with one backend draining, 300 connections",
        &counts,
        &others,
    )?;
    conn.wait_echoes(5, Duration::from_secs(5))?;

    let report = conn.finish();
    println!("long connection: {report:?}");
    ensure!(
        report.is_clean(),
        "the drained backend's connection was disturbed: {report:?}"
    );
    ensure!(
        report.backends == [format!("b{drained}")],
        "it moved: {:?}",
        report.backends
    );
    assert_only_xdp(&lab)?;
    Ok(())
}

#[test]
fn teardown_detach() -> Result<()> {
    let lab = build(3);
    lab.attach(&all_active(3))?;
    ensure!(lab.xdp_attached()?, "no XDP program after attach");
    native_xdp_mode(&lab)?;
    let pins = lab.pins()?;
    println!("pins after attach: {pins:?}");
    ensure!(
        !pins.is_empty(),
        "attach pinned nothing in {}",
        lab.pin_dir().display()
    );
    let bodies = lab.curl_vip(30)?;
    ensure!(bodies.len() == 30, "VIP not served after attach");

    lab.detach()?;
    // The kernel frees an unpinned link a moment later: allow a short grace.
    let took = lab
        .wait_xdp(false, Duration::from_secs(3))
        .with_context(|| format!("after detach: {}", lab.lb_link_json().unwrap_or_default()))?;
    println!(
        "XDP gone from {} {took:?} after detach returned",
        lab.lb_iface()
    );
    let pins = lab.pins()?;
    ensure!(pins.is_empty(), "pins left after detach: {pins:?}");
    let r = lab.curl(lab.vip(), 2)?;
    ensure!(
        r.failures == 2,
        "the VIP still answers after detach: {:?}",
        r.bodies
    );
    Ok(())
}

#[test]
fn run_reloads_on_sighup_and_cleans_up_on_sigterm() -> Result<()> {
    let lab = build(3);
    let sluice = lab.run_sluice(&all_active(3), Duration::from_secs(60))?;
    // Rewrite the running config (run_sluice's first config file) with b0 drained, and signal.
    let running = lab.dir().join("config-0.yaml");
    ensure!(
        running.is_file(),
        "{} is not the running config",
        running.display()
    );
    let drained = lab.write_config(&[
        BackendSpec::drained(0),
        BackendSpec::active(1),
        BackendSpec::active(2),
    ])?;
    std::fs::copy(&drained, &running)?;
    let pid = sluice.pid().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()?;
    ensure!(status.success(), "kill -HUP {pid}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let drained = loop {
        let out = lab.sluice_ok(&["inspect", "backends", "-o", "json"])?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let b0 = lab.backend_addr(0).to_string();
        let draining = json["backends"].as_array().is_some_and(|rows| {
            rows.iter()
                .any(|r| r["address"] == b0.as_str() && r["state"] == "draining")
        });
        if draining || std::time::Instant::now() > deadline {
            break draining;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        drained,
        "b0 not draining after SIGHUP; log:\n{}",
        sluice.log_text()
    );
    // New connections avoid the drained backend.
    let counts = tally(&lab, &lab.curl_vip(300)?)?;
    ensure!(
        counts[0] == 0,
        "drained b0 got {} of 300 new connections",
        counts[0]
    );

    let status = sluice.stop(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "sluice run exited with {status} after SIGTERM"
    );
    lab.wait_xdp(false, Duration::from_secs(3))?;
    ensure!(
        lab.pins()?.is_empty(),
        "pins left after sluice run exited: {:?}",
        lab.pins()?
    );
    Ok(())
}
