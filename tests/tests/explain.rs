//! `sluice explain` against real traffic in the namespace lab (see `sluice_tests::lab`). Needs
//! root and the `sluice` binary.
//!
//! - 1,000 real TCP connections (curl, one new connection each, its source port reported) and
//!   1,000 real UDP flows: for every one, `sluice explain` run before the packet must name the
//!   backend that answered it.
//! - After a backend is added, long-lived connections keep their backend: `explain` must show
//!   the connection table's entry (the old backend, which the connection keeps using) beside
//!   Maglev's new pick, and UDP packets sent again follow the entry it shows.
//! - An unknown VIP is refused with the configured ones named.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sluice_tests::{
    BackendSpec, ECHO_PORT, HTTP_PORT, Lab, LabConfig, UDP_PORT, cmd, netns, require_root,
};

fn build(backends: usize) -> Lab {
    require_root();
    Lab::build(LabConfig {
        backends,
        udp: true,
    })
    .expect("building the lab")
}

/// `sluice explain CLIENT VIP -o json` in the lb namespace, parsed.
fn explain(lab: &Lab, client: &str, vip: &str) -> Result<Value> {
    let out = lab.sluice_ok(&[
        "explain", client, vip, "--iface", "eth0", "--agent", "off", "-o", "json",
    ])?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("explain {client} {vip}: output is not JSON"))
}

/// The explanations of many flows, `workers` `sluice explain` processes at a time.
fn explain_all(lab: &Lab, flows: &[(String, String)], workers: usize) -> Result<Vec<Value>> {
    let chunk = flows.len().div_ceil(workers.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = flows
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(c, v)| explain(lab, c, v))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(flows.len());
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("explain worker panicked"))??,
            );
        }
        Ok(all)
    })
}

/// Lab backend name ("b1") of an address `explain` printed.
fn backend_name(lab: &Lab, address: &str) -> Option<String> {
    lab.backend_addrs()
        .iter()
        .position(|a| a.to_string() == address)
        .map(|i| lab.backend_name(i))
}

/// Sequential HTTP requests to the VIP from the client namespace, each on a new connection:
/// (client source port, backend that answered), from curl's own report of its local port.
fn tcp_flows(lab: &Lab, host: IpAddr, n: usize) -> Result<Vec<(u16, String)>> {
    let url = format!(
        "http://{}/?req=[1-{n}]",
        std::net::SocketAddr::new(host, HTTP_PORT)
    );
    let out = cmd::run(
        Command::new("ip")
            .args(["netns", "exec", lab.client_ns()])
            .args([
                "curl",
                "--silent",
                "--show-error",
                "--connect-timeout",
                "3",
                "--max-time",
                "10",
                "--header",
                "Connection: close",
                "--write-out",
                "port=%{local_port}\n",
                &url,
            ]),
        Duration::from_secs(60) + Duration::from_millis(50 * n as u64),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut flows = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.strip_prefix("port=") {
            Some(port) => {
                // A failed request writes its port line without a body before it.
                if let (Some(b), Ok(p)) = (body.take(), port.parse::<u16>())
                    && p != 0
                {
                    flows.push((p, b));
                }
            }
            None => body = Some(line.to_owned()),
        }
    }
    Ok(flows)
}

/// One HTTP request to the VIP from client source port `port`: the backend that answered.
/// The client resets the connection when done (SO_LINGER 0), so that no TIME_WAIT holds the
/// port and the same 5-tuple can open a new connection at once.
fn http_from_port(lab: &Lab, port: u16) -> Result<String> {
    use std::io::{Read as _, Write as _};
    use std::os::fd::FromRawFd as _;
    let (client, vip) = (lab.client_addr(), lab.vip());
    netns::run_in(lab.client_ns(), move || {
        let sockaddr = |addr: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.octets()),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on a descriptor this function owns (the TcpStream closes
        // it); the option and address pointers are valid for their stated lengths.
        let stream = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let stream = std::net::TcpStream::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            // A SYN that goes nowhere fails after this instead of the kernel's minutes.
            stream.set_write_timeout(Some(Duration::from_secs(5)))?;
            let local = sockaddr(client, port);
            ensure!(
                libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) == 0,
                "bind {client}:{port}: {}",
                std::io::Error::last_os_error()
            );
            let remote = sockaddr(vip, HTTP_PORT);
            ensure!(
                libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) == 0,
                "connect {client}:{port} -> {vip}:{HTTP_PORT}: {}",
                std::io::Error::last_os_error()
            );
            stream
        };
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_owned())
            .with_context(|| format!("{client}:{port}: no HTTP response: {response:?}"))?;
        Ok(body)
    })
}

/// `n` distinct TCP flows (by source port) with the backend each reached; a port seen twice
/// must have reached the same backend both times (a SYN is balanced by Maglev alone).
fn distinct_tcp_flows(lab: &Lab, host: IpAddr, n: usize) -> Result<BTreeMap<u16, String>> {
    let mut flows: BTreeMap<u16, String> = BTreeMap::new();
    let mut batches = 0;
    while flows.len() < n {
        batches += 1;
        ensure!(
            batches <= 4,
            "only {} distinct TCP flows answered after {} batches",
            flows.len(),
            batches - 1
        );
        for (port, backend) in tcp_flows(lab, host, n - flows.len() + 20)? {
            if let Some(before) = flows.insert(port, backend.clone()) {
                ensure!(
                    before == backend,
                    "client port {port} reached {before} and later {backend}: a SYN of one 5-tuple must get one pick while the table is unchanged"
                );
            }
        }
    }
    Ok(flows.into_iter().take(n).collect())
}

/// Where every explained flow's new connection goes must be where it went.
fn assert_agree(
    lab: &Lab,
    what: &str,
    observed: &[(String, String)],
    explained: &[Value],
) -> Result<()> {
    let mut mismatches = Vec::new();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for ((client, went), e) in observed.iter().zip(explained) {
        let said = e["new_connection"]["backend"].as_str().unwrap_or("-");
        let said_name = backend_name(lab, said);
        if said_name.as_deref() != Some(went.as_str())
            || e["new_connection"]["action"] != "XDP_TX"
            || e["new_connection"]["decided_by"] != "maglev"
        {
            mismatches.push(format!(
                "{client}: explain said {said} ({:?}, {}, {}), the flow reached {went}",
                said_name, e["new_connection"]["action"], e["new_connection"]["decided_by"]
            ));
        }
        *per_backend.entry(went.clone()).or_default() += 1;
    }
    println!(
        "{what}: {} flows explained, {} disagreed; reached {per_backend:?}",
        observed.len(),
        mismatches.len()
    );
    ensure!(
        mismatches.is_empty(),
        "{what}: {} of {} explanations disagree with where the flow went, e.g.:\n{}",
        mismatches.len(),
        observed.len(),
        mismatches[..mismatches.len().min(10)].join("\n")
    );
    ensure!(
        per_backend.len() == lab.backends(),
        "{what}: the flows reached only {per_backend:?}: too few backends for the comparison to mean anything"
    );
    Ok(())
}

#[test]
fn explain_agrees_with_1000_real_new_flows() -> Result<()> {
    let lab = build(3);
    // Unequal weights, so that the weights as installed are visible in the table.
    let specs: Vec<BackendSpec> = (0..3)
        .map(|i| BackendSpec {
            index: i,
            weight: i as u32 + 1,
            drain: false,
        })
        .collect();
    lab.attach(&specs)?;
    let client = lab.client_addr();
    let vip80 = format!("{}:{HTTP_PORT}/tcp", lab.vip());
    let vip_udp = format!("{}:{UDP_PORT}/udp", lab.vip());

    // Weights as installed: slots per backend in proportion 1:2:3 (Maglev's spread is within
    // ~1% of the share).
    let probe = explain(&lab, &format!("{client}:1"), &vip80)?;
    println!("{}", serde_json::to_string_pretty(&probe)?);
    let table = probe["table_size"].as_u64().context("table_size")? as f64;
    for b in probe["backends"].as_array().context("backends")? {
        let name = backend_name(&lab, b["address"].as_str().unwrap_or_default())
            .context("explain named an address that is no lab backend")?;
        let i: f64 = name[1..].parse()?;
        let want = (i + 1.0) / 6.0;
        let got = b["table_slots"].as_u64().context("table_slots")? as f64 / table;
        ensure!(
            (got - want).abs() < 0.01,
            "{name} holds {got:.4} of the table, weight share {want:.4}"
        );
        ensure!(
            b["weight"].as_u64() == Some(i as u64 + 1),
            "{name}'s weight: {b}"
        );
    }

    // TCP: 1,000 real connections, each explained (in the lb's namespace, from the pinned maps).
    let started = Instant::now();
    let tcp = distinct_tcp_flows(&lab, lab.vip().into(), 1000)?;
    println!("tcp: 1000 distinct connections in {:?}", started.elapsed());
    let observed: Vec<(String, String)> = tcp
        .iter()
        .map(|(port, b)| (format!("{client}:{port}"), b.clone()))
        .collect();
    let flows: Vec<(String, String)> = observed
        .iter()
        .map(|(c, _)| (c.clone(), vip80.clone()))
        .collect();
    let started = Instant::now();
    let explained = explain_all(&lab, &flows, 2)?;
    println!("tcp: 1000 explained in {:?}", started.elapsed());
    assert_agree(&lab, "tcp/80", &observed, &explained)?;

    // UDP: explained first (no entry yet), then sent; each flow from its own source port.
    let first_port = 30000;
    let flows: Vec<(String, String)> = (0..1000u16)
        .map(|k| (format!("{client}:{}", first_port + k), vip_udp.clone()))
        .collect();
    let before = explain_all(&lab, &flows, 2)?;
    for e in &before {
        ensure!(
            e["connection_table"].is_null(),
            "a UDP flow not yet sent has a connection-table entry: {e}"
        );
    }
    let answers = lab.udp_vip(1000, first_port)?;
    let observed: Vec<(String, String)> = flows
        .iter()
        .zip(&answers)
        .filter_map(|((c, _), a)| Some((c.clone(), a.clone()?)))
        .collect();
    ensure!(
        observed.len() >= 990,
        "only {} of 1000 UDP flows were answered",
        observed.len()
    );
    let before: Vec<Value> = flows
        .iter()
        .zip(before)
        .zip(&answers)
        .filter(|(_, a)| a.is_some())
        .map(|((_, e), _)| e)
        .collect();
    assert_agree(&lab, "udp/5353", &observed, &before)?;
    // Now each has an entry naming that same backend.
    let (client0, went0) = &observed[0];
    let after = explain(&lab, client0, &vip_udp)?;
    ensure!(
        after["connection_table"]["valid"] == true
            && backend_name(
                &lab,
                after["connection_table"]["backend"].as_str().unwrap_or("")
            )
            .as_deref()
                == Some(went0.as_str()),
        "after the flow {client0} reached {went0}, explain shows: {after}"
    );
    Ok(())
}

#[test]
fn explain_agrees_with_real_ipv6_flows() -> Result<()> {
    let lab = build(3);
    lab.enable_ipv6()?;
    // The lab's configs are IPv4-only: an IPv6 VIP over the backends' IPv6 addresses.
    let mut config = format!(
        "vips:\n  - address: {}\n    port: {HTTP_PORT}\n    backends:\n",
        lab.vip6()
    );
    for (i, mac) in lab.backend_macs().iter().enumerate() {
        writeln!(
            config,
            "      - address: {}\n        mac: {mac}\n        weight: {}",
            lab.backend_addr6(i),
            i + 1
        )?;
    }
    let path = lab.dir().join("explain-ipv6.yaml");
    std::fs::write(&path, config)?;
    lab.sluice_ok(&[
        "attach",
        "--config",
        &path.to_string_lossy(),
        "--iface",
        "eth0",
    ])?;
    let client = lab.client_addr6();
    let vip = format!("[{}]:{HTTP_PORT}/tcp", lab.vip6());
    let tcp = distinct_tcp_flows(&lab, lab.vip6().into(), 300)?;
    let observed: Vec<(String, String)> = tcp
        .iter()
        .map(|(port, b)| (format!("[{client}]:{port}"), b.clone()))
        .collect();
    let flows: Vec<(String, String)> = observed
        .iter()
        .map(|(c, _)| (c.clone(), vip.clone()))
        .collect();
    let explained = explain_all(&lab, &flows, 2)?;
    // The IPv6 answers come from the backends' IPv6 addresses.
    let names: Vec<(String, String)> = lab
        .backend_addrs()
        .iter()
        .enumerate()
        .map(|(i, _)| (lab.backend_addr6(i).to_string(), lab.backend_name(i)))
        .collect();
    let mut mismatches = 0;
    for ((c, went), e) in observed.iter().zip(&explained) {
        let said = e["new_connection"]["backend"].as_str().unwrap_or("-");
        let name = names.iter().find(|(a, _)| a == said).map(|(_, n)| n);
        if name != Some(went) {
            mismatches += 1;
            println!("{c}: explain said {said}, the flow reached {went}");
        }
    }
    println!(
        "ipv6: {} flows explained, {mismatches} disagreed",
        observed.len()
    );
    ensure!(
        mismatches == 0,
        "{mismatches} of {} IPv6 explanations disagree",
        observed.len()
    );
    // Each flow left an entry in FLOWS6 naming its backend.
    let (c, went) = &observed[0];
    let e = explain(&lab, c, &vip)?;
    let entry = e["connection_table"]["backend"].as_str().unwrap_or("");
    ensure!(
        names.iter().any(|(a, n)| a == entry && n == went),
        "{c} reached {went}, its FLOWS6 entry as explained: {e}"
    );
    Ok(())
}

/// Health, as `sluice run` (or the agent) serves it: explain shows the overlay's verdicts, and a
/// backend whose link goes down drains: out of the table (0 slots), new flows elsewhere (real
/// connections go where it says).
#[test]
fn explain_shows_health_and_a_drained_backend() -> Result<()> {
    let lab = build(3);
    let config = lab.write_config(&(0..3).map(BackendSpec::active).collect::<Vec<_>>())?;
    let text = std::fs::read_to_string(&config)?.replace(
        "    protocol: tcp\n",
        &format!(
            "    protocol: tcp\n    health_check: {{protocol: http, port: {HTTP_PORT}, path: /}}\n"
        ),
    );
    std::fs::write(&config, text)?;
    let mut run = lab.run_sluice_with(&config, Duration::from_secs(60))?;
    let client = lab.client_addr();
    let vip80 = format!("{}:{HTTP_PORT}/tcp", lab.vip());
    let b2 = lab.backend_addr(2).to_string();
    // With the default --agent: the metrics address `sluice run` serves in this namespace.
    let explain_health = |port: u16| -> Result<Value> {
        let out = lab.sluice_ok(&["explain", &format!("{client}:{port}"), &vip80, "-o", "json"])?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let wait = |what: &str, ok: &dyn Fn(&Value) -> bool| -> Result<Value> {
        let started = Instant::now();
        loop {
            let e = explain_health(21500)?;
            if ok(&e) {
                return Ok(e);
            }
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "{what}: explain shows {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let row = |e: &Value, address: &str| -> Value {
        e["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|b| b["address"] == address))
            .cloned()
            .unwrap_or(Value::Null)
    };
    wait("all three up", &|e| {
        e["backends"].as_array().is_some_and(|b| {
            b.len() == 3
                && b.iter()
                    .all(|b| b["health"] == "up" && b["state"] == "active")
        })
    })?;
    // Client ports whose new connections Maglev gives to b2 now.
    let ports: Vec<u16> = (21500..21560).collect();
    let to_b2: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| {
            explain_health(*p)
                .map(|e| e["new_connection"]["backend"] == b2.as_str())
                .unwrap_or(false)
        })
        .collect();
    ensure!(!to_b2.is_empty(), "no port of {ports:?} picks b2");

    lab.exec_ok(lab.switch_ns(), &["ip", "link", "set", "sw-b2", "down"])?;
    // explain reads the VIP's record and its table one after the other, and a reconcile writes
    // them in two phases: wait until one answer shows both done.
    let e = wait("b2 down and draining", &|e| {
        let r = row(e, &b2);
        r["health"] == "down"
            && r["state"] == "draining"
            && r["table_slots"] == 0
            && e["live_backends"] == 2
    })?;
    println!(
        "after b2's link went down: {}",
        serde_json::to_string(&row(&e, &b2))?
    );
    ensure!(e["live_backends"] == 2, "live backends: {e}");
    ensure!(
        row(&e, &b2)["why"].as_str().is_some_and(|w| !w.is_empty()),
        "no reason for b2's state: {e}"
    );
    let text = lab.sluice_ok(&["explain", &format!("{client}:{}", to_b2[0]), &vip80])?;
    let text = String::from_utf8_lossy(&text.stdout);
    println!("{text}");
    ensure!(
        text.lines()
            .any(|l| l.starts_with(&b2) && l.contains("draining") && l.contains("down")),
        "the text does not show b2 draining and down:\n{text}"
    );
    for port in &to_b2 {
        let e = explain_health(*port)?;
        let pick = e["new_connection"]["backend"]
            .as_str()
            .unwrap_or("-")
            .to_owned();
        ensure!(
            pick != b2,
            "{client}:{port}: a new flow still goes to the drained b2: {e}"
        );
        let reached = http_from_port(&lab, *port)?;
        ensure!(
            backend_name(&lab, &pick).as_deref() == Some(reached.as_str()),
            "{client}:{port}: explain said {pick}, the connection reached {reached}"
        );
    }
    println!("{} flows of b2 explained and sent elsewhere", to_b2.len());
    ensure!(
        run.try_wait()?.is_none(),
        "sluice run died: {}",
        run.log_text()
    );
    Ok(())
}

/// The backend a long-lived connection's first echo came from, and its client endpoint.
fn long_conn_client(conn: &sluice_tests::LongConn) -> Result<String> {
    let target = conn.snapshot().target;
    target
        .split(" -> ")
        .next()
        .map(str::to_owned)
        .with_context(|| format!("long connection without a local address: {target}"))
}

#[test]
fn explain_shows_the_entry_beside_a_changed_maglev_pick() -> Result<()> {
    let lab = build(3);
    let two: Vec<BackendSpec> = (0..2).map(BackendSpec::active).collect();
    lab.attach(&two)?;
    let vip_echo = format!("{}:{ECHO_PORT}/tcp", lab.vip());
    let vip_udp = format!("{}:{UDP_PORT}/udp", lab.vip());
    let client = lab.client_addr();

    // Unknown VIP: refused, naming the configured ones.
    let out = lab.sluice(&[
        "explain",
        &format!("{client}:1234"),
        &format!("{}:8080/tcp", lab.vip()),
        "--agent",
        "off",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && stderr.lines().count() == 1
            && stderr.contains(&format!("{}:8080/tcp is not configured", lab.vip()))
            && stderr.contains(&vip_echo),
        "unknown VIP: exit {:?}, stderr: {stderr}",
        out.status
    );

    // Established flows on two backends: 30 TCP connections, 60 UDP flows.
    let conns: Vec<_> = (0..30)
        .map(|_| lab.long_conn_vip())
        .collect::<Result<_>>()?;
    let udp_first = 22000;
    let udp_before = lab.udp_vip(60, udp_first)?;
    // HTTP connections from fixed source ports (below the ephemeral range, so that no other
    // connection holds them), closed again: their entries stay behind.
    let http_ports: Vec<u16> = (21000..21040).collect();
    let http_before: Vec<String> = http_ports
        .iter()
        .map(|p| http_from_port(&lab, *p))
        .collect::<Result<_>>()?;

    lab.attach(&(0..3).map(BackendSpec::active).collect::<Vec<_>>())?;

    let mut moved = 0;
    for conn in &conns {
        let local = long_conn_client(conn)?;
        let went = conn.backend();
        let e = explain(&lab, &local, &vip_echo)?;
        let entry = &e["connection_table"];
        ensure!(
            entry["valid"] == true
                && backend_name(&lab, entry["backend"].as_str().unwrap_or("")).as_deref()
                    == Some(went.as_str())
                && e["next_packet"]["decided_by"] == "connection_table",
            "established {local} on {went}: explain shows {e}"
        );
        let pick = e["new_connection"]["backend"].as_str().unwrap_or("-");
        if backend_name(&lab, pick).as_deref() != Some(went.as_str()) {
            // Not only to b2: three backends get a larger table (maglev_tier), which re-deals
            // slots among the old ones too; the connection table is what keeps flows in place.
            moved += 1;
            // Both in the text, too.
            let text = lab.sluice_ok(&[
                "explain", &local, &vip_echo, "--iface", "eth0", "--agent", "off",
            ])?;
            let text = String::from_utf8_lossy(&text.stdout);
            let old = lab.backend_addr(lab.backend_index(&went).context("backend")?);
            ensure!(
                text.contains("disagree")
                    && text.contains(&format!("keeps {old}"))
                    && text.contains(&format!("gets {pick}")),
                "text of {local} does not show both backends:\n{text}"
            );
            if moved == 1 {
                println!("{text}");
            }
        }
    }
    println!(
        "tcp: {moved} of {} established connections have a new Maglev pick",
        conns.len()
    );
    ensure!(moved > 0, "adding b2 moved no Maglev pick of 30 flows");
    for conn in conns {
        let went = conn.backend();
        let report = conn.finish();
        ensure!(
            report.is_clean() && report.backends == [went.clone()],
            "a connection established on {went} did not keep it: {report:?}"
        );
    }

    // UDP: what explain says the next packet does is what the next packet does.
    let mut predicted = Vec::new();
    let mut disagree = 0;
    for k in 0..60u16 {
        let Some(went) = &udp_before[k as usize] else {
            bail!("UDP flow {k} was not answered before the change");
        };
        let e = explain(&lab, &format!("{client}:{}", udp_first + k), &vip_udp)?;
        let next = backend_name(&lab, e["next_packet"]["backend"].as_str().unwrap_or(""));
        ensure!(
            next.as_deref() == Some(went.as_str()),
            "UDP {k}: reached {went}, explain's next packet goes to {next:?}: {e}"
        );
        if e["new_connection"]["backend"] != e["next_packet"]["backend"] {
            disagree += 1;
        }
        predicted.push(next);
    }
    let again = lab.udp_vip(60, udp_first)?;
    ensure!(
        again == predicted,
        "UDP packets sent again went to {again:?}, explain predicted {predicted:?}"
    );
    println!("udp: {disagree} of 60 flows have a Maglev pick other than their entry");
    ensure!(
        disagree > 0,
        "adding b2 moved no Maglev pick of 60 UDP flows"
    );

    // TCP's SYN rule, for real: a new connection on a 5-tuple whose entry names the old backend
    // goes where explain's `new_connection` says (Maglev), and its entry is replaced.
    let vip80 = format!("{}:{HTTP_PORT}/tcp", lab.vip());
    let mut differed = 0;
    for (port, went) in http_ports.iter().zip(&http_before) {
        let local = format!("{client}:{port}");
        let e = explain(&lab, &local, &vip80)?;
        let entry = backend_name(
            &lab,
            e["connection_table"]["backend"].as_str().unwrap_or(""),
        );
        ensure!(
            entry.as_deref() == Some(went.as_str()),
            "{local}: reached {went} before the change, explain's entry names {entry:?}: {e}"
        );
        let pick = backend_name(&lab, e["new_connection"]["backend"].as_str().unwrap_or(""))
            .with_context(|| format!("{local}: no Maglev pick: {e}"))?;
        if pick != *went {
            differed += 1;
        }
        let now = http_from_port(&lab, *port)?;
        ensure!(
            now == pick,
            "{local}: explain said a SYN goes to {pick} (its entry: {went}), it reached {now}"
        );
        let after = explain(&lab, &local, &vip80)?;
        let entry = backend_name(
            &lab,
            after["connection_table"]["backend"].as_str().unwrap_or(""),
        );
        ensure!(
            entry.as_deref() == Some(pick.as_str()),
            "{local}: after the new connection to {pick}, the entry names {entry:?}"
        );
    }
    println!(
        "tcp SYN rule: {differed} of {} reused 5-tuples went to Maglev's pick, not their entry",
        http_ports.len()
    );
    ensure!(
        differed > 0,
        "no reused 5-tuple had an entry other than Maglev's pick"
    );
    Ok(())
}
