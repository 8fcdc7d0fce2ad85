//! Real packets through `mode: ipip` across a routed hop: IPv4 and IPv6, TCP and UDP, the
//! backends' own decapsulator, PMTU discovery over a reduced-MTU link, and two load balancers
//! sharing a VIP through ECMP, one of which goes away under live connections.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use lb_common::maglev_tier;
use sluice_tests::{
    UDP_PORT, cmd,
    fixtures::predicted_backend,
    require_root,
    routed_lab::{
        CLIENT4, CLIENT6, RoutedConfig, RoutedLab, VIP4, VIP6, backend_addr4, backend_addr6,
    },
};

fn vips() -> [IpAddr; 2] {
    [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
}

fn global(stats: &serde_json::Value, name: &str) -> u64 {
    stats["global"][name].as_u64().unwrap_or(0)
}

#[test]
fn tcp_and_udp_reach_backends_across_l3_in_both_families() {
    require_root();
    let mut lab = RoutedLab::build(RoutedConfig::default()).expect("build the routed lab");
    let config = lab.write_config(0, &[0, 1, 2]).unwrap();
    let _sluice = lab.run_sluice(0, &config).unwrap();

    for (n, vip) in vips().into_iter().enumerate() {
        let answers = lab.udp_vip(vip, 300, 20000 + 1000 * n as u16).unwrap();
        let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
        for a in answers.iter().flatten() {
            *per_backend.entry(a.clone()).or_default() += 1;
        }
        let answered: usize = per_backend.values().sum();
        assert_eq!(
            answered, 300,
            "{vip}: every UDP request answered: {per_backend:?}"
        );
        // Fixed client address and source ports: every answer's backend is known in advance
        // from the flow hash and the Maglev table (a deterministic result, checked exactly).
        let first_port = 20000 + 1000 * n as u16;
        let (client, nodes): (IpAddr, Vec<(IpAddr, u32)>) = if vip.is_ipv4() {
            (
                CLIENT4.into(),
                (0..3).map(|i| (backend_addr4(i).into(), 1)).collect(),
            )
        } else {
            (
                CLIENT6.into(),
                (0..3).map(|i| (backend_addr6(i).into(), 1)).collect(),
            )
        };
        let mut wrong = Vec::new();
        for (k, answer) in answers.iter().enumerate() {
            let port = first_port + k as u16;
            let want = predicted_backend(
                &nodes,
                maglev_tier(nodes.len()),
                (client, port),
                (vip, UDP_PORT),
                17,
                false,
            )
            .and_then(|a| nodes.iter().position(|&(n, _)| n == a))
            .map(|i| format!("b{i}"));
            if answer.as_ref() != want.as_ref() {
                wrong.push(format!("port {port}: {answer:?}, predicted {want:?}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{vip}: {} of 300 datagrams answered by another backend than the flow hash and the \
             Maglev table pick: {}",
            wrong.len(),
            wrong
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        assert_eq!(
            per_backend.len(),
            3,
            "{vip}: all backends used: {per_backend:?}"
        );

        let conns: Vec<_> = (0..6).map(|_| lab.long_conn(vip).unwrap()).collect();
        for c in &conns {
            let report = c.wait_echoes(10, Duration::from_secs(10));
            assert!(
                report.as_ref().is_ok_and(|r| r.is_clean()),
                "{vip}: {report:?}: {:?}",
                c.snapshot()
            );
        }
    }
    let stats = lab.lb_json(0, &["inspect", "stats"]).unwrap();
    assert!(
        global(&stats, "redirected") > 0,
        "out of eth1 by XDP_REDIRECT: {stats}"
    );
    assert_eq!(global(&stats, "tx"), 0, "nothing goes back out of eth0");
    let mut decapsulated = 0;
    for i in 0..3 {
        let d = lab.decap_json(i).unwrap();
        assert_eq!(d["counters"]["drop_source"], 0, "b{i}: {d}");
        decapsulated += d["counters"]["decapsulated"].as_u64().unwrap_or(0);
    }
    assert!(
        decapsulated >= 600,
        "every VIP packet is unwrapped at a backend: {decapsulated}"
    );
}

#[test]
fn pmtu_discovery_works_through_encapsulation() {
    require_root();
    let mut lab = RoutedLab::build(RoutedConfig {
        lb_egress_mtu: 1400,
        ..RoutedConfig::default()
    })
    .expect("build the routed lab");
    let config = lab.write_config(0, &[0, 1, 2]).unwrap();
    let _sluice = lab.run_sluice(0, &config).unwrap();
    for vip in vips() {
        // 256 KB in one line: the client's full-size (1500-byte) segments cannot be wrapped
        // into the 1400-byte link; only the ICMP "too big" from sluice lets the transfer finish.
        let len = 256 * 1024;
        let echoed = lab.bulk_echo(vip, len).unwrap();
        assert!(echoed >= len, "{vip}: {echoed} of {len} bytes echoed");
    }
    let stats = lab.lb_json(0, &["inspect", "stats"]).unwrap();
    assert!(global(&stats, "icmp_too_big_sent") >= 2, "{stats}");
}

/// The client's local port of a long-lived connection (from its report's target).
fn local_port(conn: &sluice_tests::LongConn) -> String {
    let target = conn.snapshot().target;
    let local = target.split(" -> ").next().unwrap_or_default().to_owned();
    local.rsplit(':').next().unwrap_or_default().to_owned()
}

#[test]
fn ecmp_load_balancers_agree_and_survive_losing_one() {
    require_root();
    let mut lab = RoutedLab::build(RoutedConfig {
        lbs: 2,
        backends: 4,
        ..RoutedConfig::default()
    })
    .expect("build the routed lab");
    let configs = [
        lab.write_config(0, &[0, 1, 2]).unwrap(),
        lab.write_config(1, &[0, 1, 2]).unwrap(),
    ];
    let mut sluices: Vec<Option<_>> = configs
        .iter()
        .enumerate()
        .map(|(k, c)| Some(lab.run_sluice(k, c).unwrap()))
        .collect();

    let conns: Vec<_> = (0..16)
        .map(|i| lab.long_conn(vips()[i % 2]).unwrap())
        .collect();
    for c in &conns {
        c.wait_echoes(3, Duration::from_secs(10)).unwrap();
    }
    // Which load balancer carries which connection: its connection table has the client port.
    let mut carried: [BTreeSet<String>; 2] = Default::default();
    for (k, set) in carried.iter_mut().enumerate() {
        let flows = lab
            .lb_json(k, &["inspect", "flows", "--limit", "1000"])
            .unwrap();
        for f in flows["flows"].as_array().into_iter().flatten() {
            let client = f["client"].as_str().unwrap_or_default();
            set.insert(client.rsplit(':').next().unwrap_or_default().to_owned());
        }
    }
    let via = |c: &sluice_tests::LongConn| carried.iter().position(|s| s.contains(&local_port(c)));
    let victim = match (0..2).find(|&k| conns.iter().filter(|c| via(c) == Some(k)).count() > 0) {
        Some(k) => k,
        None => panic!("no connection found in either connection table: {carried:?}"),
    };
    let moved = conns.iter().filter(|c| via(c) == Some(victim)).count();
    let survivor = 1 - victim;
    println!("lb{victim} carries {moved} of 16 connections; taking it down");

    // The route to lb<victim> is withdrawn (what BGP would do), then it stops balancing.
    lab.route_vip_via(&[survivor]).unwrap();
    if let Some(p) = sluices[victim].take() {
        p.stop(Duration::from_secs(10)).unwrap();
    }
    assert_all_keep_echoing(&conns, &format!("after losing lb{victim}"));

    // A fourth backend joins while every connection is open: none of them moves or breaks.
    let grown = lab.write_config(survivor, &[0, 1, 2, 3]).unwrap();
    std::fs::copy(&grown, &configs[survivor]).unwrap();
    let pid = sluices[survivor]
        .as_ref()
        .map(|p| p.pid())
        .unwrap_or_default();
    cmd::signal(pid, libc::SIGHUP);
    // Poll for the reload's result (a loaded machine takes longer; 30 s is generous).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let backends = lab.lb_json(survivor, &["inspect", "backends"]).unwrap();
        if backends["backends"].as_array().map(Vec::len) == Some(16) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not 4 backends x 4 VIPs 30 s after the reload: {backends}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_all_keep_echoing(&conns, "after adding a backend");
    for c in conns {
        let report = c.finish();
        assert!(report.is_clean(), "{report:?}");
    }
}

/// Every connection echoes at least 10 more lines, polled (they run concurrently, so the
/// waits overlap; 30 s is generous for 1 s of lines on a loaded machine).
fn assert_all_keep_echoing(conns: &[sluice_tests::LongConn], when: &str) {
    let before: Vec<u64> = conns.iter().map(|c| c.snapshot().echoed).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (c, before) in conns.iter().zip(before) {
        loop {
            let report = c.snapshot();
            assert!(
                report.errors.is_empty() && report.running,
                "{when}: {report:?} (had {before} echoes)"
            );
            if report.echoed >= before + 10 {
                assert!(report.is_clean(), "{when}: {report:?}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{when}: only {} of {} echoes after 30 s: {report:?}",
                report.echoed,
                before + 10
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
