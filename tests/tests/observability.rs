//! What an operator watches, checked against real traffic in the L2 lab: `sluice run`'s
//! Prometheus `/metrics` (scraped inside the lb namespace, where it listens on loopback) against
//! `sluice inspect stats -o json`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use sluice_tests::{BackendSpec, Lab, LabConfig, UDP_FIRST_PORT, UDP_PORT, require_root};

const METRICS_ADDR: &str = "127.0.0.1:9477";
/// A UDP port of the lab's VIP open only to 192.0.2.0/24, which the lab's client is not in.
const RANGED_PORT: u16 = 5400;

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

fn sample(m: &BTreeMap<String, f64>, key: &str) -> Result<u64> {
    m.get(key)
        .map(|v| *v as u64)
        .with_context(|| format!("/metrics has no sample {key}"))
}

/// `low <= metric <= high`, where low and high are `inspect stats` before and after the scrape.
fn between(what: &str, low: u64, metric: u64, high: u64) -> Result<()> {
    ensure!(
        low <= metric && metric <= high,
        "{what}: /metrics says {metric}, inspect stats said {low} before and {high} after"
    );
    Ok(())
}

#[test]
fn metrics_match_inspect_stats() -> Result<()> {
    let lab = build(3);
    let sluice = lab.run_sluice(&all_active(3), Duration::from_secs(60))?;
    lab.curl_vip(200)?;
    let answered = lab.udp_vip(60, UDP_FIRST_PORT)?;
    ensure!(answered.iter().all(Option::is_some), "UDP requests lost");

    // Only stray frames (ARP, neighbour discovery) can move between the three reads.
    println!("/metrics after the traffic:");
    let before = lab.stats()?;
    let m = lab.metrics(METRICS_ADDR)?;
    for (k, v) in &m {
        println!("  {k} {v}");
    }
    let after = lab.stats()?;
    let global = |s: &serde_json::Value, name: &str| -> Result<u64> {
        s["global"][name]
            .as_u64()
            .with_context(|| format!("inspect stats has no global.{name}: {s}"))
    };

    for (verdict, name) in [
        ("passed", "passed"),
        ("tx", "tx"),
        ("redirected", "redirected"),
    ] {
        let metric = sample(
            &m,
            &format!("sluice_packets_total{{verdict=\"{verdict}\"}}"),
        )?;
        between(name, global(&before, name)?, metric, global(&after, name)?)?;
    }
    ensure!(
        global(&after, "tx")? >= 200 * 3,
        "too little traffic went through"
    );
    for (result, name) in [("hit", "flow_hit"), ("miss", "flow_miss")] {
        let metric = sample(
            &m,
            &format!("sluice_flow_lookups_total{{result=\"{result}\"}}"),
        )?;
        between(name, global(&before, name)?, metric, global(&after, name)?)?;
    }
    for reason in [
        "malformed",
        "no_backend",
        "fragment",
        "source_range",
        "too_big",
    ] {
        let name = format!("drop_{reason}");
        let metric = sample(&m, &format!("sluice_drops_total{{reason=\"{reason}\"}}"))?;
        between(
            &name,
            global(&before, &name)?,
            metric,
            global(&after, &name)?,
        )?;
    }

    let vips = |s: &serde_json::Value| -> Result<Vec<serde_json::Value>> {
        s["vips"]
            .as_array()
            .cloned()
            .with_context(|| format!("inspect stats has no vips: {s}"))
    };
    let mut backends_seen = 0;
    let (vips_before, vips_after) = (vips(&before)?, vips(&after)?);
    ensure!(
        vips_before.len() == 3 && vips_after.len() == 3,
        "inspect stats lists {} and {} VIPs, the config has 3",
        vips_before.len(),
        vips_after.len()
    );
    for (vip_before, vip_after) in vips_before.iter().zip(vips_after) {
        let vip = vip_before["vip"].as_str().context("stats: vip name")?;
        for what in ["packets", "bytes"] {
            let metric = sample(&m, &format!("sluice_vip_{what}_total{{vip=\"{vip}\"}}"))?;
            let (low, high) = (vip_before[what].as_u64(), vip_after[what].as_u64());
            let (Some(low), Some(high)) = (low, high) else {
                anyhow::bail!("inspect stats: {vip} has no {what}");
            };
            between(&format!("{vip} {what}"), low, metric, high)?;
        }
        let backends = |v: &serde_json::Value| -> Result<Vec<serde_json::Value>> {
            v["backends"]
                .as_array()
                .cloned()
                .with_context(|| format!("inspect stats: {vip} has no backends: {v}"))
        };
        for (b_before, b_after) in backends(vip_before)?.iter().zip(backends(&vip_after)?) {
            let addr = b_before["address"]
                .as_str()
                .context("stats: backend address")?;
            // A backend's counters are over every VIP it serves (backends are shared).
            for what in ["packets", "bytes"] {
                let key = format!("sluice_backend_{what}_total{{backend=\"{addr}\"}}");
                let metric = sample(&m, &key)?;
                let (low, high) = (b_before[what].as_u64(), b_after[what].as_u64());
                let (Some(low), Some(high)) = (low, high) else {
                    anyhow::bail!("inspect stats: {vip} backend {addr} has no {what}");
                };
                between(&key, low, metric, high)?;
            }
            backends_seen += 1;
        }
    }
    ensure!(
        backends_seen == 9,
        "{backends_seen} backends compared, 3 VIPs x 3 configured"
    );

    // Connection-table entries: the TCP and UDP flows just made (nothing expires them).
    let flows = lab.sluice_ok(&["inspect", "flows", "--limit", "0", "-o", "json"])?;
    let flows: serde_json::Value = serde_json::from_slice(&flows.stdout)?;
    let total = flows["total"].as_u64().context("flows: total")?;
    let v4 = sample(&m, "sluice_flows{family=\"ipv4\"}")?;
    ensure!(
        v4 == total && v4 >= 260,
        "flows: /metrics {v4}, inspect flows {total}"
    );

    // The control plane: one reconcile at start, the tables it built, build info.
    ensure!(sample(&m, "sluice_reconciles_total{result=\"ok\"}")? >= 1);
    ensure!(sample(&m, "sluice_reconcile_duration_seconds_count")? >= 1);
    // One table per distinct set of backends (VIPs with the same ones share it).
    let listed = lab.sluice_ok(&["inspect", "vips", "-o", "json"])?;
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout)?;
    let tables: std::collections::BTreeSet<String> = listed["vips"]
        .as_array()
        .context("inspect vips: no rows")?
        .iter()
        .map(|v| v["table"].to_string())
        .collect();
    ensure!(
        sample(&m, "sluice_maglev_rebuilds_total")? >= tables.len() as u64,
        "at least one build per table the VIPs point at ({tables:?})"
    );
    let version = format!(
        "sluice_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    ensure!(sample(&m, &version)? == 1, "build info");

    // Every series the Grafana dashboard queries is one sluice exports (the Kubernetes watches'
    // only the agent: tests/tests/agent.rs checks those).
    for word in Lab::dashboard_series() {
        ensure!(
            word.starts_with("sluice_k8s_") || m.keys().any(|k| k.starts_with(word)),
            "deploy/grafana/sluice-dashboard.json queries {word}, which /metrics does not export"
        );
    }
    drop(sluice);
    Ok(())
}

#[test]
fn stats_watch_shows_rates_and_flows_filter() -> Result<()> {
    let lab = build(3);
    lab.attach(&all_active(3))?;
    lab.curl_vip(60)?;
    // A steady stream (one line every 100 ms) for the watch to measure.
    let conn = lab.long_conn_vip()?;
    conn.wait_echoes(3, Duration::from_secs(5))?;
    let out = lab.sluice_ok(&[
        "inspect",
        "stats",
        "--watch",
        "--interval",
        "500ms",
        "--count",
        "3",
        "-o",
        "json",
    ])?;
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("--watch -o json is not one object per line: {text}"))?;
    ensure!(
        lines.len() == 3,
        "3 refreshes asked, got {}: {text}",
        lines.len()
    );
    let echo = format!("{}:7000/tcp", lab.vip());
    for line in &lines {
        let pps = line["vips"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["vip"] == echo.as_str()))
            .and_then(|v| v["packets_per_second"].as_f64())
            .with_context(|| format!("no rate for {echo}: {line}"))?;
        // ~10 lines a second from the client, each one packet through the balancer.
        ensure!(
            (3.0..100.0).contains(&pps),
            "{echo}: {pps} packets/s in {line}"
        );
    }
    let report = conn.snapshot();
    ensure!(report.errors.is_empty(), "the stream broke: {report:?}");

    let flows = |args: &[&str]| -> Result<serde_json::Value> {
        let mut all = vec!["inspect", "flows", "--limit", "1000", "-o", "json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_slice(&lab.sluice_ok(&all)?.stdout)?)
    };
    let everything = flows(&[])?;
    let total = everything["total"].as_u64().context("total")?;
    ensure!(total >= 61, "{total} flows for 60 connections and a stream");
    let http = format!("{}:80/tcp", lab.vip());
    let by_vip = flows(&["--vip", &http])?;
    ensure!(by_vip["matched"] == 60, "--vip {http}: {by_vip}");
    let rows = |v: &serde_json::Value| v["flows"].as_array().cloned().unwrap_or_default();
    ensure!(rows(&by_vip).iter().all(|r| r["vip"] == http.as_str()));
    let b0 = lab.backend_addr(0).to_string();
    let by_backend = flows(&["--backend", &b0])?;
    let n = by_backend["matched"].as_u64().context("matched")?;
    ensure!(n > 0 && n < total, "--backend {b0}: {n} of {total}");
    ensure!(
        rows(&by_backend)
            .iter()
            .all(|r| r["backend"] == b0.as_str())
    );
    let client = format!("{}/32", lab.client_addr());
    ensure!(flows(&["--client", &client])?["matched"] == total);
    ensure!(flows(&["--client", "192.0.2.0/24"])?["matched"] == 0);
    let capped: serde_json::Value = serde_json::from_slice(
        &lab.sluice_ok(&["inspect", "flows", "--limit", "5", "-o", "json"])?
            .stdout,
    )?;
    ensure!(capped["shown"] == 5 && rows(&capped).len() == 5 && capped["matched"] == total);
    let report = conn.finish();
    ensure!(report.is_clean(), "the stream: {report:?}");
    lab.detach()
}

/// The metrics against counts that share no code with them: what the client itself sent and got
/// back, and what nftables counted at each backend; and drops caused on purpose (IPv4
/// fragments for the VIP, datagrams from outside a VIP's source ranges), counted by the client.
#[test]
fn metrics_match_the_clients_and_the_backends_counts() -> Result<()> {
    use std::net::{SocketAddrV4, UdpSocket};
    let lab = build(3);
    // The lab's VIPs plus one UDP port open only to 192.0.2.0/24 (the client is outside it).
    let config = lab.write_config(&all_active(3))?;
    let mut text = std::fs::read_to_string(&config)?;
    text.push_str(&format!(
        "  - address: {}\n    port: {RANGED_PORT}\n    protocol: udp\n    source_ranges: [192.0.2.0/24]\n    backends:\n      - address: {}\n        mac: {}\n",
        lab.vip(),
        lab.backend_addr(0),
        lab.backend_macs()[0]
    ));
    std::fs::write(&config, text)?;
    let sluice = lab.run_sluice_with(&config, Duration::from_secs(60))?;
    lab.reset_counters()?;
    let before = lab.metrics(METRICS_ADDR)?;

    const HTTP: usize = 100;
    const UDP: usize = 60;
    const FRAGMENTED: usize = 7;
    const REFUSED: usize = 9;
    let bodies = lab.curl_vip(HTTP)?;
    ensure!(
        bodies.len() == HTTP,
        "{} of {HTTP} HTTP requests answered",
        bodies.len()
    );
    let answers = lab.udp_vip(UDP, UDP_FIRST_PORT)?;
    ensure!(
        answers.iter().all(Option::is_some),
        "UDP requests unanswered: {answers:?}"
    );
    // 2000 bytes of UDP over a 1500-byte MTU: the client's kernel sends two fragments each.
    let vip = lab.vip();
    sluice_tests::netns::run_in(lab.client_ns(), move || -> Result<()> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..FRAGMENTED {
            sock.send_to(&[7u8; 2000], SocketAddrV4::new(vip, UDP_PORT))?;
        }
        for _ in 0..REFUSED {
            sock.send_to(b"refused", SocketAddrV4::new(vip, RANGED_PORT))?;
        }
        Ok(())
    })?;
    // Metrics lag the packets by nothing (read from the maps at scrape time), but the last
    // datagrams may still be on their way: poll until the drops are all counted.
    let delta = |m: &BTreeMap<String, f64>, key: &str| -> Result<u64> {
        Ok(sample(m, key)? - sample(&before, key)?)
    };
    let frag_key = "sluice_drops_total{reason=\"fragment\"}";
    let range_key = "sluice_drops_total{reason=\"source_range\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = lab.metrics(METRICS_ADDR)?;
        if delta(&m, frag_key)? >= 2 * FRAGMENTED as u64 && delta(&m, range_key)? >= REFUSED as u64
            || std::time::Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        delta(&m, frag_key)? == 2 * FRAGMENTED as u64,
        "the client sent {} fragments to the VIP, /metrics counts {} dropped",
        2 * FRAGMENTED,
        delta(&m, frag_key)?
    );
    ensure!(
        delta(&m, range_key)? == REFUSED as u64,
        "the client sent {REFUSED} datagrams from outside the source ranges, /metrics counts {}",
        delta(&m, range_key)?
    );

    // README: /metrics exposes counters and VIP/backend addresses, never client addresses.
    let client = lab.client_addr().to_string();
    // As a whole label value, or an address:port one (10.0.0.1 must not match 10.0.0.10).
    let (quoted, with_port) = (format!("\"{client}\""), format!("\"{client}:"));
    let leaks: Vec<&String> = m
        .keys()
        .filter(|k| k.contains(&quoted) || k.contains(&with_port))
        .collect();
    ensure!(
        leaks.is_empty(),
        "/metrics exposes the client address {client}: {leaks:?}"
    );

    // Per backend: what sluice says it sent there is what the backend's nftables received.
    let mut total_seen = 0;
    let mut syn_seen = 0;
    let mut udp_seen = 0;
    for (i, addr) in lab.backend_addrs().into_iter().enumerate() {
        let c = lab.backend_counters(i)?;
        ensure!(
            c.ttl_other == 0,
            "b{i}: packets that XDP did not forward: {c:?}"
        );
        // Over every VIP it serves (backends are shared; refused datagrams reach none).
        let sent = delta(
            &m,
            &format!("sluice_backend_packets_total{{backend=\"{addr}\"}}"),
        )?;
        println!("b{i}: /metrics says {sent} packets sent to it, nftables there counted {c:?}");
        ensure!(
            sent == c.ttl64,
            "b{i}: /metrics says {sent} packets were sent to it, it received {}",
            c.ttl64
        );
        total_seen += c.ttl64;
        syn_seen += c.syn;
        udp_seen += c.udp;
    }
    let tx = delta(&m, "sluice_packets_total{verdict=\"tx\"}")?;
    ensure!(
        tx == total_seen,
        "/metrics: {tx} packets sent by XDP_TX; the backends received {total_seen}"
    );
    // The clients' own counts: one SYN per HTTP request (no retransmission on this quiet
    // link), one datagram per UDP request (plus a retry for each one that timed out, which
    // lab.udp does at most twice).
    ensure!(
        syn_seen == HTTP as u64,
        "the client made {HTTP} connections, the backends saw {syn_seen} SYNs"
    );
    let udp_vip = delta(
        &m,
        &format!("sluice_vip_packets_total{{vip=\"{vip}:5353/udp\"}}"),
    )?;
    ensure!(
        udp_vip == udp_seen && (UDP as u64..=3 * UDP as u64).contains(&udp_vip),
        "UDP: the client sent {UDP} requests (each at most 3 times), /metrics counts {udp_vip}, \
         the backends {udp_seen}"
    );
    // New flows: each HTTP connection, each UDP request (a new source port) and each refused
    // datagram (looked up before its source is checked) misses the connection table once;
    // fragments are never looked up.
    let misses = delta(&m, "sluice_flow_lookups_total{result=\"miss\"}")?;
    ensure!(
        misses == (HTTP + UDP + REFUSED) as u64,
        "{misses} connection-table misses for {HTTP} connections, {UDP} UDP flows and \
         {REFUSED} refused datagrams"
    );
    drop(sluice);
    Ok(())
}
