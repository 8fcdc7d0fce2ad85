//! sluice deployed exactly as its users deploy it, on a real multi-node Kubernetes cluster
//! (containerd, kubelet and kube-proxy per node; see `sluice_tests::cluster`): the image built
//! offline by `cargo xtask image`, `kubectl apply -k deploy/overlays/beside-metallb`, the agent a DaemonSet pod on every
//! node, web pods on every node behind `type: LoadBalancer` Services, a client on the segment.
//!
//! One test (one cluster start, ~30 s; ~6 minutes in all) checks in order, and reports every
//! check's result before failing on any:
//! - the DaemonSet's pod is Running and ready on every node;
//! - each node's interface has its own name (`eno1`, `enp3s0`, `eth0`) and the ConfigMap says
//!   `iface: auto`: each agent attached to its node's, by the Node's InternalIP (log, `/readyz`);
//! - the client routes the VIP to one node (as a BGP router would): many new connections reach
//!   pods on every node; each SYN crosses the segment at most twice (client -> node, node ->
//!   chosen node): nothing is balanced twice;
//! - `externalTrafficPolicy: Local`: the pod sees the client's own address; `Cluster` works too;
//! - established connections survive the agent pod's deletion on the receiving node and a
//!   rolling update of the DaemonSet to a new image tag;
//! - a cordoned node takes no new connections, its established ones keep working;
//! - dual-stack (the cluster is dual-stack throughout): a `RequireDualStack` Service's IPv4 and
//!   IPv6 VIPs routed to node-0 are balanced over every node and answered by pods on every node
//!   through kube-proxy (iptables / ip6tables); its on-link IPv6 VIP (`--announce`: NDP answered
//!   from XDP) resolves to the elected node's MAC, which moves to another node's when the
//!   elected node's agent pod is deleted;
//! - BGP through the DaemonSet (ConfigMap `bgp: "true"`) and BGPPeer resources: a real FRR in
//!   the client's namespace; the IPv4 BGPPeer selects nodes by a label and carries a TCP-MD5
//!   password from a Secret that FRR checks: only the labelled nodes peer, the third joins once
//!   labelled; FRR routes the VIP by ECMP over every node; new connections enter by every node;
//!   a node's agent pod deleted (SIGTERM: graceful shutdown, withdraw) leaves the route while
//!   long-lived connections through it go on, none broken. The IPv6 BGPPeer: the IPv6 VIP's
//!   /128 reaches FRR's IPv6 table via every node, and the client's connections through it are
//!   answered;
//! - the receiving node's link down: how long new connections fail, and how soon another
//!   node's agent drained it by its health check (reported).
//!
//! Needs root, the Kubernetes binaries (scripts/kube-apiserver.sh, cached), containerd, runc,
//! the CNI plugins and buildah (scripts/bootstrap.sh), and the image archive:
//! `cargo xtask image` (`./x test` builds it first).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sluice_tests::cluster::{self, Cluster, ClusterConfig, WEB_TAG, pod_ready};
use sluice_tests::image;
use sluice_tests::kube::{AGENT_NAMESPACE, repo_root};
use sluice_tests::require_root;

const NODES: usize = 3;
/// Off the segment: the client routes them to a node.
const VIP_CLUSTER: Ipv4Addr = Ipv4Addr::new(10, 80, 1, 10);
const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 80, 1, 11);
const VIP_IPIP: Ipv4Addr = Ipv4Addr::new(10, 80, 1, 12);
/// The dual-stack Service's VIPs routed by the client to node-0, one per family (its third, on
/// the link, is [`cluster::on_link_vip6`]).
const VIP_DUAL4: Ipv4Addr = Ipv4Addr::new(10, 80, 1, 13);
const VIP_DUAL6: Ipv6Addr = Ipv6Addr::new(0xfd80, 1, 0, 0, 0, 0, 0, 0x13);
const CONNECTIONS: usize = 300;

/// Soft assertions: every check is recorded and printed; the test fails at the end if any failed.
#[derive(Default)]
struct Checks {
    results: Vec<(String, bool, String)>,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: impl Into<String>) -> bool {
        let detail = detail.into();
        eprintln!("[{}] {what}: {detail}", if ok { "ok" } else { "FAILED" });
        self.results.push((what.to_owned(), ok, detail));
        ok
    }
    fn result(&mut self, what: &str, r: Result<String>) -> bool {
        match r {
            Ok(d) => self.check(what, true, d),
            Err(e) => self.check(what, false, format!("{e:#}")),
        }
    }
    fn finish(self) {
        let failed: Vec<_> = self.results.iter().filter(|r| !r.1).collect();
        eprintln!("\n=== cluster test summary ===");
        for (what, ok, detail) in &self.results {
            eprintln!("{} {what}: {detail}", if *ok { "ok    " } else { "FAILED" });
        }
        assert!(
            failed.is_empty(),
            "{} of {} cluster checks failed: {}",
            failed.len(),
            self.results.len(),
            failed
                .iter()
                .map(|f| f.0.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

/// One answer of the web image's CGI: `pod=<name> node=<node> client=<address>`.
#[derive(Debug, Clone)]
struct Who {
    pod: String,
    node: String,
    client: String,
}

fn parse_who(line: &str) -> Option<Who> {
    let mut w = Who {
        pod: String::new(),
        node: String::new(),
        client: String::new(),
    };
    for part in line.split_whitespace() {
        match part.split_once('=') {
            Some(("pod", v)) => w.pod = v.to_owned(),
            Some(("node", v)) => w.node = v.to_owned(),
            // busybox httpd listens on [::]: an IPv4 client shows as [::ffff:a.b.c.d].
            Some(("client", v)) => {
                w.client = v
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .trim_start_matches("::ffff:")
                    .to_owned()
            }
            _ => {}
        }
    }
    (!w.pod.is_empty()).then_some(w)
}

fn web_manifests() -> String {
    format!(
        "{}{}{}{}{}{}",
        cluster::web_deployment(NODES * 2),
        cluster::lb_service("web-cluster", "Cluster", ""),
        cluster::lb_service("web-local", "Local", ""),
        cluster::lb_service("web-ipip", "Local", "sluice.io/forwarding-mode: ipip"),
        cluster::lb_service("web-announce", "Cluster", ""),
        cluster::dual_stack_lb_service("web-dual"),
    )
}

/// The agent pods by node name: (pod name, phase, ready).
fn agent_pods(c: &Cluster) -> Result<BTreeMap<String, (String, String, bool)>> {
    let pods = c.pods(AGENT_NAMESPACE, "app.kubernetes.io/name%3Dsluice")?;
    Ok(pods
        .iter()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .filter_map(|p| {
            let node = p.pointer("/spec/nodeName")?.as_str()?.to_owned();
            let name = p.pointer("/metadata/name")?.as_str()?.to_owned();
            let phase = p
                .pointer("/status/phase")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let ready = pod_ready(p);
            Some((node, (name, phase, ready)))
        })
        .collect())
}

fn all_agents_ready(c: &Cluster) -> Result<bool> {
    let pods = agent_pods(c)?;
    Ok((0..c.nodes()).all(|i| {
        pods.get(c.node_name(i))
            .is_some_and(|(_, phase, ready)| phase == "Running" && *ready)
    }))
}

/// What the cluster shows about the agents when they are not ready: pods, events, logs.
fn agent_diagnostics(c: &Cluster) -> String {
    let mut s = String::new();
    if let Ok(o) = c.kubectl(&["get", "pods", "-A", "-o", "wide"]) {
        s.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    if let Ok(o) = c.kubectl(&["get", "events", "-n", AGENT_NAMESPACE]) {
        s.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    if let Ok(pods) = agent_pods(c) {
        for (node, (pod, _, _)) in pods {
            if let Ok(o) = c.kube().kubectl_on(
                0,
                &["logs", "-n", AGENT_NAMESPACE, &pod, "--tail", "15"],
                Duration::from_secs(20),
            ) {
                s.push_str(&format!(
                    "--- {pod} on {node}:\n{}{}\n",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
    }
    s
}

/// `n` connections to `vip`: answers per node, per pod, the client addresses seen, failures.
struct Spread {
    by_node: BTreeMap<String, usize>,
    pods: BTreeMap<String, usize>,
    clients: BTreeMap<String, usize>,
    failed: usize,
    took: Duration,
}

fn spread(c: &Cluster, vip: impl Into<IpAddr>, n: usize) -> Result<Spread> {
    let vip = vip.into();
    let start = Instant::now();
    // In batches of 50: when most of a batch fails, the rest is not tried (and counts as failed),
    // so that a broken path costs seconds, not minutes.
    let (mut bodies, mut failed) = (Vec::new(), 0);
    let mut left = n;
    while left > 0 {
        let k = left.min(50);
        let (b, f) = c.curl(vip, 80, "/cgi-bin/who", k)?;
        bodies.extend(b);
        failed += f;
        left -= k;
        if f * 2 > k {
            failed += left;
            break;
        }
    }
    let mut s = Spread {
        by_node: BTreeMap::new(),
        pods: BTreeMap::new(),
        clients: BTreeMap::new(),
        failed,
        took: start.elapsed(),
    };
    for w in bodies.iter().filter_map(|b| parse_who(b)) {
        *s.by_node.entry(w.node).or_default() += 1;
        *s.pods.entry(w.pod).or_default() += 1;
        *s.clients.entry(w.client).or_default() += 1;
    }
    Ok(s)
}

/// `n` connections to the Local VIP from the client, one at a time (from `local_port` when
/// given: then `n` is 1): each one's source port and the node whose pod answered it.
fn who_by_port(c: &Cluster, n: usize, local_port: Option<u16>) -> Result<BTreeMap<u16, String>> {
    let mut curl = std::process::Command::new("ip");
    curl.args(["netns", "exec", c.client_ns()]).args([
        "curl",
        "--silent",
        "--connect-timeout",
        "3",
        "--max-time",
        "10",
        "--header",
        "Connection: close",
        "--write-out",
        "port=%{local_port}\n",
    ]);
    if let Some(port) = local_port {
        curl.args(["--local-port", &port.to_string()]);
    }
    // One connection at a time, so that each body is followed by its own source port.
    curl.arg(format!("http://{VIP_LOCAL}:80/cgi-bin/who?req=[1-{n}]"));
    let out = sluice_tests::cmd::run_ok(&mut curl, Duration::from_secs(120))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut flows, mut who) = (BTreeMap::new(), None);
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.strip_prefix("port=") {
            Some(port) => {
                if let (Some(w), Ok(p)) = (who.take(), port.parse::<u16>()) {
                    flows.insert(p, w);
                }
            }
            None => who = parse_who(line).map(|w| w.node),
        }
    }
    ensure!(
        flows.len() == n,
        "{} of {n} connections answered: {text}",
        flows.len()
    );
    Ok(flows)
}

/// `sluice trace` in node-0's agent pod while new connections reach the Local VIP: every
/// connection's SYN is reported, decided by Maglev, naming the node whose pod answered, and
/// its later packets by the connection table; nothing lost.
fn trace_in_agent_pod(c: &Cluster) -> Result<String> {
    let pods = agent_pods(c)?;
    let (pod, _, _) = pods
        .get(c.node_name(0))
        .with_context(|| format!("no agent pod on {}", c.node_name(0)))?;
    let vip = format!("{VIP_LOCAL}:80/tcp");
    // Events to a file: a pipe read only at the end could fill and stall the trace.
    let events_path = c.dir().join("trace-events.json");
    let mut trace = c
        .kube()
        .kubectl_command(
            0,
            &[
                "exec",
                "-n",
                AGENT_NAMESPACE,
                pod,
                "--",
                "/sluice",
                "trace",
                "--vip",
                &vip,
                "--duration",
                "40s",
                "-o",
                "json",
            ],
        )
        .stdout(std::fs::File::create(&events_path)?)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("kubectl exec ... sluice trace")?;
    // Its stderr's first line says it runs; stdout is read whole once it ends.
    let stderr = trace.stderr.take().context("trace stderr")?;
    let (started_tx, started) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = started_tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match started.recv_timeout(left) {
            Ok(line) if line.contains("# tracing") => break,
            Ok(line) => eprintln!("trace in {pod}: {line}"),
            Err(_) => {
                let _ = trace.kill();
                anyhow::bail!("the trace in {pod} did not start within 60 s");
            }
        }
    }
    let n = 20;
    let flows = who_by_port(c, n, None)?;
    // --duration 20s ends it (20 connections take a few seconds); kubectl exec returns then.
    let status = trace.wait().context("waiting for the trace")?;
    let stdout = std::fs::read_to_string(&events_path)?;
    ensure!(
        status.success(),
        "the trace in {pod} failed ({status}): {stdout}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("trace output: {stdout}"))?;
    let client = cluster::client_addr();
    let (mut syns, mut by_table, mut events) = (0, 0, 0);
    for e in &lines {
        if let Some(summary) = e.get("summary") {
            ensure!(
                summary["lost_rate"] == 0 && summary["lost_ring"] == 0,
                "events lost: {summary}"
            );
            continue;
        }
        events += 1;
        let from: std::net::SocketAddr = e["client"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("event client: {e}"))?;
        let Some(node) = flows.get(&from.port()).filter(|_| from.ip() == client) else {
            continue; // the convergence checks' or another client's connections
        };
        let want = c
            .node_index(node)
            .map(|i| c.node_addr(i).to_string())
            .with_context(|| format!("answer from an unknown node {node}"))?;
        ensure!(
            e["backend"] == want.as_str(),
            "{from} reached {node} ({want}); trace: {e}"
        );
        if e["syn"] == true {
            ensure!(e["decided_by"] == "maglev", "a SYN not by Maglev: {e}");
            syns += 1;
        } else if e["decided_by"] == "conn_table" {
            by_table += 1;
        }
    }
    ensure!(
        syns >= n,
        "{syns} SYNs traced for {n} connections: {stdout}"
    );
    Ok(format!(
        "{events} events in 20 s; {syns} SYNs by Maglev and {by_table} packets by the connection table of the {n} connections, each to the node that answered; 0 lost"
    ))
}

/// `sluice <args> -o json` in node `node`'s agent pod (its pins, its binary).
fn sluice_in_agent_pod(c: &Cluster, node: usize, args: &[&str]) -> Result<Value> {
    let pods = agent_pods(c)?;
    let (pod, _, _) = pods
        .get(c.node_name(node))
        .with_context(|| format!("no agent pod on {}", c.node_name(node)))?;
    let mut argv = vec!["exec", "-n", AGENT_NAMESPACE, pod.as_str(), "--", "/sluice"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["-o", "json"]);
    let out = c.kubectl(&argv)?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("sluice {} in {pod}: not JSON", args.join(" ")))
}

/// Tries of one connection in [`explain_in_agent_pod`]: a retry is allowed only when the
/// table moved meanwhile, and a table that moves on every try is a failure too.
const EXPLAIN_TRIES: usize = 3;

/// `sluice explain` run in node-0's agent pod (the receiving node: its pins, its binary)
/// predicts, before the packet is sent, where a new connection from a chosen source port to the
/// Local VIP goes (the pod is on the node sluice picked); then the connection is made from that
/// port. A wrong prediction is excused only when a witness other than explain saw the table
/// move between the prediction and the connection (node-0's `sluice_maglev_rebuilds_total`, the
/// VIP's table fingerprint from `sluice inspect maglev`): then it is made again with another
/// port, at most [`EXPLAIN_TRIES`] times, each retry counted.
fn explain_in_agent_pod(c: &Cluster) -> Result<String> {
    let n = 20;
    let client = cluster::client_addr();
    let vip = format!("{VIP_LOCAL}:80/tcp");
    let explain =
        |port: u16| sluice_in_agent_pod(c, 0, &["explain", &format!("{client}:{port}"), &vip]);
    // The witness: read apart from the answer under test.
    let witness = || -> Result<(f64, String)> {
        let rebuilds = c
            .agent_metrics(0)?
            .get("sluice_maglev_rebuilds_total")
            .copied()
            .context("node-0's agent has no sluice_maglev_rebuilds_total")?;
        let table = sluice_in_agent_pod(c, 0, &["inspect", "maglev", &vip])?;
        let fingerprint = table["table_fingerprint"]
            .as_str()
            .with_context(|| format!("inspect maglev {vip}: no table_fingerprint: {table}"))?
            .to_owned();
        Ok((rebuilds, fingerprint))
    };
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut again = Vec::new();
    let mut port = 46000u16;
    for _ in 0..n {
        for attempt in 1..=EXPLAIN_TRIES {
            port += 1;
            let (rebuilds0, table0) = witness()?;
            let before = explain(port)?;
            let node = who_by_port(c, 1, Some(port))?
                .remove(&port)
                .with_context(|| format!("no answer from port {port}"))?;
            let want = c
                .node_index(&node)
                .map(|i| c.node_addr(i).to_string())
                .with_context(|| format!("answer from an unknown node {node}"))?;
            let after = explain(port)?;
            let (rebuilds1, table1) = witness()?;
            let predicted = before["new_connection"]["backend"] == want.as_str();
            if predicted && after["connection_table"]["backend"] == want.as_str() {
                *by_node.entry(node.clone()).or_default() += 1;
                break;
            }
            let wrong = format!(
                "{client}:{port} reached {node} ({want}); explain in node-0's agent pod said before: {before}\nand after: {after}"
            );
            ensure!(
                rebuilds0 != rebuilds1 || table0 != table1,
                "{wrong}\nand the table did not move meanwhile (node-0's Maglev rebuilds {rebuilds0}, the VIP's table fingerprint {table0}, before and after)"
            );
            ensure!(
                attempt < EXPLAIN_TRIES,
                "{wrong}\nthe table moved during each of {EXPLAIN_TRIES} tries (this one: rebuilds {rebuilds0} -> {rebuilds1}, fingerprint {table0} -> {table1})"
            );
            again.push(format!(
                "port {port}: rebuilds {rebuilds0} -> {rebuilds1}, fingerprint {table0} -> {table1}"
            ));
        }
    }
    Ok(format!(
        "{n} of {n} connections went where explain in the agent pod said before they were made (and its connection-table entry after); by node {by_node:?}; {} made again after the table moved meanwhile (by node-0's rebuild counter or the VIP's fingerprint) {again:?}",
        again.len()
    ))
}

/// The bridge's counters since [`Cluster::count_vip_frames`], while the client (which routes the
/// VIP to node-0) made [`CONNECTIONS`] connections: every SYN the client sent crossed the
/// segment at most once more (node-0 -> the node it picked), and no other node sent a frame to
/// the VIP on (0 balanced twice). Also returns the new connections per node as node-0 picked
/// them (the SYNs it did not send on it passed to its own stack).
fn balanced_once(c: &Cluster) -> Result<(String, Vec<u64>)> {
    let frames = c.vip_frames()?;
    let syns_out = c.vip_syns_out()?;
    let port = |p: &str| {
        frames
            .get(p)
            .copied()
            .with_context(|| format!("no counters of port {p}: {frames:?}"))
    };
    let (client_frames, client_syns) = port("sw-c")?;
    ensure!(
        client_syns >= CONNECTIONS as u64,
        "{client_syns} SYNs from the client counted for {CONNECTIONS} connections: {frames:?}"
    );
    let receiver = c.node_port(0);
    let (_, forwarded) = port(receiver)?;
    // Every port but the client's and the receiving node's: the other nodes and the control plane.
    let again: Vec<(&String, &(u64, u64))> = frames
        .iter()
        .filter(|(p, f)| p.as_str() != "sw-c" && p.as_str() != receiver && **f != (0, 0))
        .collect();
    ensure!(
        again.is_empty(),
        "frames to the VIP sent on by a node that did not receive them from the client (balanced twice): {again:?}; all ports {frames:?}"
    );
    let to = |i: usize| {
        syns_out
            .get(c.node_port(i))
            .copied()
            .with_context(|| format!("no SYN counter out of {}", c.node_port(i)))
    };
    let picked_others: Vec<u64> = (1..c.nodes()).map(to).collect::<Result<_>>()?;
    ensure!(
        forwarded == picked_others.iter().sum::<u64>() && forwarded < client_syns,
        "node-0 sent on {forwarded} SYNs of the client's {client_syns}, the other nodes got {picked_others:?}"
    );
    let picks: Vec<u64> = std::iter::once(client_syns - forwarded)
        .chain(picked_others)
        .collect();
    let detail = format!(
        "client: {client_frames} frames, {client_syns} SYNs; node-0 sent {forwarded} SYNs on, each to another node; 0 frames to the VIP from any other port; per port {frames:?}"
    );
    Ok((detail, picks))
}

fn every_node(c: &Cluster, by_node: &BTreeMap<String, usize>) -> bool {
    (0..c.nodes()).all(|i| by_node.get(c.node_name(i)).copied().unwrap_or(0) > 0)
}

/// `SLUICE_CLUSTER_HOLD=<seconds>`: keeps the cluster up that long (or until the file
/// `<cluster dir>/release` exists) before tearing it down, for a look from another shell.
fn hold_for_inspection(c: &Cluster) {
    let Some(secs) = std::env::var("SLUICE_CLUSTER_HOLD")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    else {
        return;
    };
    eprintln!(
        "holding cluster {} for {secs} s (touch {}/release to go on)",
        c.id(),
        c.dir().display()
    );
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) && !c.dir().join("release").exists() {
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn sluice_deployed_on_a_real_cluster() {
    require_root();
    let started = Instant::now();
    let tag = image::default_tag();
    let archive = image::sluice_archive(tag);
    assert!(
        archive.is_file(),
        "{} missing: build the image first with `cargo xtask image` (./x test does)",
        archive.display()
    );
    // The same binary under a second tag, for the rolling update.
    let next_tag = format!("{tag}-next");
    let next = image::build_sluice_image(&image::musl_binary(), &next_tag)
        .expect("building the second image tag");
    let web = image::build_web_image(WEB_TAG).expect("building the web image");
    // Each node's interface has its own name (eno1, enp3s0, eth0), as in a mixed cluster.
    let mut c = Cluster::start_with_node_ifaces(
        ClusterConfig {
            nodes: NODES,
            images: vec![archive, next, web],
        },
        &cluster::MIXED_IFACES,
    )
    .expect("starting the cluster");
    let cluster_start = c.age();
    let mut checks = Checks::default();
    checks.check(
        "cluster started",
        true,
        format!(
            "{NODES} nodes Ready in {:.1} s",
            cluster_start.as_secs_f64()
        ),
    );

    // ----- deploy as a user does -----
    let installed = install_from_overlay(&c, "beside-metallb");
    checks.result(
        "install: `kubectl apply -k deploy/overlays/beside-metallb` creates every object it renders, the image tagged with the version",
        installed,
    );
    let image_in_ds = c
        .kubectl_json(&["get", "daemonset", "-n", AGENT_NAMESPACE, "sluice-agent"])
        .ok()
        .and_then(|v| {
            v.pointer("/spec/template/spec/containers/0/image")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let want_image = format!("{}:{tag}", image::SLUICE_IMAGE);
    if image_in_ds != want_image {
        // deploy/ names another version: point it at the image just built.
        c.kubectl(&[
            "set",
            "image",
            "-n",
            AGENT_NAMESPACE,
            "daemonset/sluice-agent",
            &format!("agent={want_image}"),
        ])
        .expect("kubectl set image");
    }
    // The addresses the test writes into the Services' status (as MetalLB would) are sluice's
    // own: a pool without auto-assign (only pool addresses are served by address or announced).
    c.kube()
        .pool(
            "test-vips",
            &[
                "10.80.1.0/24".to_owned(),
                "fd80:1::/112".to_owned(),
                cluster::on_link_vip().to_string(),
                cluster::on_link_vip6().to_string(),
            ],
            false,
            false,
        )
        .expect("the test VIPs' IPAddressPool");
    c.kube()
        .apply_yaml(&web_manifests())
        .expect("applying the web Deployment and Services");
    c.set_ingress("web-cluster", VIP_CLUSTER)
        .expect("setting the ingress IP");
    c.set_ingress("web-local", VIP_LOCAL)
        .expect("setting the ingress IP");
    c.set_ingress("web-ipip", VIP_IPIP)
        .expect("setting the ingress IP");
    c.set_ingress("web-announce", cluster::on_link_vip())
        .expect("setting the ingress IP");
    // Three addresses, two of them IPv6: requested, so the allocator keeps them all (it keeps
    // one per family of what it assigned itself).
    c.kubectl(&[
        "annotate",
        "service",
        "-n",
        "default",
        "web-dual",
        &format!(
            "sluice.io/load-balancer-ips={VIP_DUAL4},{VIP_DUAL6},{}",
            cluster::on_link_vip6()
        ),
    ])
    .expect("requesting the dual-stack Service's addresses");
    c.set_ingress_ips(
        "web-dual",
        &[
            VIP_DUAL4.into(),
            VIP_DUAL6.into(),
            cluster::on_link_vip6().into(),
        ],
    )
    .expect("setting the dual-stack Service's ingress IPs");

    let agents = c.wait_for(
        "agent pods Running and ready on every node",
        Duration::from_secs(120),
        || all_agents_ready(&c),
    );
    let agents_ok = checks.result(
        "DaemonSet pod Running and ready on every node",
        agents.map(|d| format!("after {:.1} s ({})", d.as_secs_f64(), image_in_ds)),
    );
    if !agents_ok {
        eprintln!("{}", agent_diagnostics(&c));
        if std::env::var_os("SLUICE_CLUSTER_HOLD").is_some() {
            hold_for_inspection(&c);
        }
    }
    // The ConfigMap says `iface: auto` and every node's interface has another name: each agent
    // attached to its own node's, found by the Node's InternalIP, and says so.
    let attached = iface_auto_per_node(&c);
    checks.result(
        "--iface auto attaches where the Node's InternalIP is, a different name on each node",
        attached,
    );
    let web_ready = c.wait_for("web pods ready", Duration::from_secs(90), || {
        let pods = c.pods("default", "app%3Dweb")?;
        let nodes: std::collections::BTreeSet<_> = pods
            .iter()
            .filter(|p| pod_ready(p))
            .filter_map(|p| p.pointer("/spec/nodeName").and_then(Value::as_str))
            .collect();
        Ok(pods.iter().filter(|p| pod_ready(p)).count() == NODES * 2 && nodes.len() == NODES)
    });
    checks.result(
        "web pods ready on every node",
        web_ready.map(|d| format!("{} pods after {:.1} s", NODES * 2, d.as_secs_f64())),
    );

    // The client routes the VIPs to node-0, as a BGP router that learnt them from it would.
    c.route_vip_via(VIP_CLUSTER, 0).unwrap();
    c.route_vip_via(VIP_LOCAL, 0).unwrap();
    c.route_vip_via(VIP_IPIP, 0).unwrap();

    // ----- many new connections, balanced once -----
    // The whole path converges first: the agents see the slices and ingress IPs, the
    // Endpoints controller and every kube-proxy the six pods (seconds on a loaded machine).
    let converged = c.wait_for(
        "pods on every node answering through both VIPs",
        Duration::from_secs(90),
        || {
            let a = spread(&c, VIP_CLUSTER, 30)?;
            let b = spread(&c, VIP_LOCAL, 30)?;
            Ok(a.failed == 0
                && b.failed == 0
                && a.pods.len() == NODES * 2
                && every_node(&c, &b.by_node))
        },
    );
    checks.result(
        "the path converged (client -> sluice -> kube-proxy -> every pod)",
        converged.map(|d| format!("after {:.1} s", d.as_secs_f64())),
    );
    c.count_vip_frames(VIP_CLUSTER).unwrap();
    match spread(&c, VIP_CLUSTER, CONNECTIONS) {
        Ok(s) => {
            let detail = format!(
                "{} of {CONNECTIONS} answered in {:.1} s; by node {:?}; {} pods",
                CONNECTIONS - s.failed,
                s.took.as_secs_f64(),
                s.by_node,
                s.pods.len()
            );
            checks.check(
                "Cluster policy: every connection answered, pods on every node",
                s.failed == 0 && every_node(&c, &s.by_node),
                detail,
            );
        }
        Err(e) => {
            checks.check("Cluster policy connections", false, format!("{e:#}"));
        }
    }
    let once = "each SYN balanced at most once (frames to the VIP counted on the segment)";
    match balanced_once(&c) {
        Ok((detail, picks)) => {
            checks.check(once, true, detail);
            checks.check(
                "Cluster policy: the balancer picks every node (itself included)",
                picks.iter().all(|&p| p > 0),
                format!("new connections per node (node-0 passes its own to its stack): {picks:?}"),
            );
        }
        Err(e) => {
            checks.check(once, false, format!("{e:#}"));
        }
    }

    // ----- Local keeps the client's address -----
    match spread(&c, VIP_LOCAL, CONNECTIONS / 2) {
        Ok(s) => {
            let own = cluster::client_addr().to_string();
            let only_own = s.clients.keys().all(|k| *k == own) && !s.clients.is_empty();
            checks.check(
                "Local policy: the pods see the client's own address, pods on every node",
                s.failed == 0 && only_own && every_node(&c, &s.by_node),
                format!(
                    "{} of {} answered; clients seen {:?}; by node {:?}",
                    CONNECTIONS / 2 - s.failed,
                    CONNECTIONS / 2,
                    s.clients,
                    s.by_node
                ),
            );
        }
        Err(e) => {
            checks.check("Local policy connections", false, format!("{e:#}"));
        }
    }

    // ----- `sluice explain` in the agent's pod names where new connections went -----
    checks.result(
        "sluice explain in node-0's agent pod: the node every new connection reached",
        explain_in_agent_pod(&c),
    );
    // ----- `sluice trace` in the agent's pod shows each packet's decision -----
    checks.result(
        "sluice trace in node-0's agent pod: every SYN with the node that answered",
        trace_in_agent_pod(&c),
    );

    // ----- a pod deleted: its established connection goes on while it terminates -----
    let r = (|| -> Result<String> {
        let conn = c.long_conn(SocketAddrV4::new(VIP_LOCAL, image::WEB_ECHO_PORT))?;
        let pod = conn.backend();
        // nc is PID 1 and ignores SIGTERM: the pod terminates for the whole grace period.
        c.kubectl(&[
            "delete",
            "pod",
            "-n",
            "default",
            &pod,
            "--grace-period=10",
            "--wait=false",
        ])?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(7));
        let report = conn.snapshot();
        ensure!(
            report.errors.is_empty() && report.sent == report.echoed,
            "the connection to the terminating pod {pod} broke within {:.1} s: {report:?}",
            t.elapsed().as_secs_f64()
        );
        let s = spread(&c, VIP_LOCAL, 50)?;
        ensure!(s.failed == 0, "{} of 50 new connections failed", s.failed);
        ensure!(
            !s.pods.contains_key(&pod),
            "new connections reached the terminating pod {pod}: {:?}",
            s.pods
        );
        let echoed = report.echoed;
        drop(conn);
        Ok(format!(
            "pod {pod} deleted (grace 10 s): its connection echoed {echoed} lines over 7 s, no error; 50 of 50 new connections answered by other pods"
        ))
    })();
    checks.result(
        "a terminating pod keeps its established connection, gets no new one",
        r,
    );
    // The Deployment's replacement pod, before the next checks count pods per node.
    let _ = c.wait_for("web pods ready again", Duration::from_secs(60), || {
        let pods = c.pods("default", "app%3Dweb")?;
        Ok(pods.iter().filter(|p| pod_ready(p)).count() == NODES * 2
            && pods
                .iter()
                .all(|p| p.pointer("/metadata/deletionTimestamp").is_none()))
    });

    // ----- established connections survive the agent's restart and a rolling update -----
    let echo = SocketAddrV4::new(VIP_CLUSTER, image::WEB_ECHO_PORT);
    match c.long_conn(echo) {
        Ok(conn) => {
            let r = (|| -> Result<String> {
                let pods = agent_pods(&c)?;
                let (pod, _, _) = pods
                    .get(c.node_name(0))
                    .context("no agent pod on node-0")?
                    .clone();
                c.kubectl(&["delete", "pod", "-n", AGENT_NAMESPACE, &pod, "--wait=false"])?;
                let back = c.wait_for(
                    "the agent pod on node-0 recreated and ready",
                    Duration::from_secs(90),
                    || {
                        let p = agent_pods(&c)?;
                        Ok(p.get(c.node_name(0)).is_some_and(|(name, phase, ready)| {
                            *name != pod && phase == "Running" && *ready
                        }))
                    },
                )?;
                std::thread::sleep(Duration::from_secs(2));
                let report = conn.snapshot();
                ensure!(
                    report.errors.is_empty() && report.sent == report.echoed,
                    "the connection broke: {report:?}"
                );
                Ok(format!(
                    "new agent ready after {:.1} s; {} lines echoed, no error",
                    back.as_secs_f64(),
                    report.echoed
                ))
            })();
            checks.result(
                "established connection survives the agent pod's deletion",
                r,
            );
            let r = (|| -> Result<String> {
                c.kubectl(&[
                    "set",
                    "image",
                    "-n",
                    AGENT_NAMESPACE,
                    "daemonset/sluice-agent",
                    &format!("agent={}:{next_tag}", image::SLUICE_IMAGE),
                ])?;
                let t = Instant::now();
                c.kube().kubectl_on(
                    0,
                    &[
                        "rollout",
                        "status",
                        "-n",
                        AGENT_NAMESPACE,
                        "daemonset/sluice-agent",
                        "--timeout=180s",
                    ],
                    Duration::from_secs(200),
                )?;
                ensure!(
                    all_agents_ready(&c)?,
                    "not every agent ready after the rollout"
                );
                let report = conn.snapshot();
                ensure!(
                    report.errors.is_empty() && report.sent == report.echoed,
                    "the connection broke: {report:?}"
                );
                Ok(format!(
                    "rolled out to {next_tag} in {:.1} s; {} lines echoed, no error",
                    t.elapsed().as_secs_f64(),
                    report.echoed
                ))
            })();
            checks.result("established connection survives a rolling update", r);
            drop(conn);
        }
        Err(e) => {
            checks.check(
                "a long-lived connection through the VIP",
                false,
                format!("{e:#}"),
            );
        }
    }

    // ----- cordon: no new connections to the node, established ones go on -----
    let r = (|| -> Result<String> {
        c.kubectl(&["cordon", c.node_name(2)])?;
        let result = (|| -> Result<String> {
            // node-0 (the receiving node) drains node-2 in its maps: the Cluster VIP's row of
            // node-2's address turns "draining".
            let node2 = c.node_addr(2).to_string();
            let drained = c.wait_for(
                "node-0's maps drain the cordoned node-2",
                Duration::from_secs(30),
                || {
                    let v = sluice_in_agent_pod(&c, 0, &["inspect", "backends"])?;
                    let rows = v["backends"]
                        .as_array()
                        .context("inspect backends: no rows")?;
                    let row = rows
                        .iter()
                        .find(|b| {
                            b["address"] == node2.as_str()
                                && b["vip"] == format!("{VIP_CLUSTER}:80/tcp").as_str()
                        })
                        .with_context(|| format!("no row of {node2} for {VIP_CLUSTER}: {v}"))?;
                    Ok(row["state"] == "draining")
                },
            )?;
            c.count_vip_frames(VIP_CLUSTER)?;
            let s = spread(&c, VIP_CLUSTER, 100)?;
            let out = c.vip_syns_out()?;
            ensure!(s.failed == 0, "{} of 100 failed", s.failed);
            let to2 = out
                .get(c.node_port(2))
                .copied()
                .with_context(|| format!("no SYN counter out of node-2's port: {out:?}"))?;
            ensure!(
                to2 == 0,
                "{to2} new connections were balanced to the cordoned node-2 ({out:?})"
            );
            Ok(format!(
                "node-0's maps drained node-2 {:.1} s after the cordon; 100 of 100 answered, none balanced to node-2 (SYNs out per port {out:?}; pods reached by kube-proxy {:?})",
                drained.as_secs_f64(),
                s.by_node
            ))
        })();
        c.kubectl(&["uncordon", c.node_name(2)])?;
        result
    })();
    checks.result("a cordoned node gets no new connections", r);

    // ----- ipip: every node unwraps inline -----
    match spread(&c, VIP_IPIP, CONNECTIONS / 2) {
        Ok(s) => {
            let own = cluster::client_addr().to_string();
            checks.check(
                "ipip Service (Local): answered on every node, the client's address kept",
                s.failed == 0 && every_node(&c, &s.by_node) && s.clients.keys().all(|k| *k == own),
                format!(
                    "{} of {} answered; by node {:?}; clients seen {:?}",
                    CONNECTIONS / 2 - s.failed,
                    CONNECTIONS / 2,
                    s.by_node,
                    s.clients
                ),
            );
        }
        Err(e) => {
            checks.check("ipip Service", false, format!("{e:#}"));
        }
    }

    // ----- --announce: the agents answer ARP for an on-link VIP -----
    let r = (|| -> Result<String> {
        c.kubectl(&[
            "patch",
            "daemonset",
            "-n",
            AGENT_NAMESPACE,
            "sluice-agent",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--announce"}]"#,
        ])?;
        c.kube().kubectl_on(
            0,
            &[
                "rollout",
                "status",
                "-n",
                AGENT_NAMESPACE,
                "daemonset/sluice-agent",
                "--timeout=180s",
            ],
            Duration::from_secs(200),
        )?;
        let vip = cluster::on_link_vip();
        c.vip_on_link(vip)?;
        let waited = c.wait_for(
            "an answer from the announced VIP",
            Duration::from_secs(30),
            || Ok(c.curl(vip, 80, "/cgi-bin/who", 1)?.1 == 0),
        )?;
        let s = spread(&c, vip, 100)?;
        let mac = c.client_neighbour(vip)?.unwrap_or_default();
        let owner = (0..c.nodes()).find(|&i| c.node_mac(i) == mac);
        ensure!(
            s.failed == 0 && owner.is_some(),
            "{} of 100 failed; the client's neighbour entry for {vip}: {mac:?}",
            s.failed
        );
        Ok(format!(
            "announced by {} (first answer after {:.1} s); 100 of 100 answered, by pod node {:?}",
            c.node_name(owner.unwrap_or(0)),
            waited.as_secs_f64(),
            s.by_node
        ))
    })();
    checks.result(
        "--announce: an on-link VIP answered through the announcing node",
        r,
    );

    // ----- dual-stack: one Service, a VIP of each family, IPv6 announced on the link -----
    let r = dual_stack_through_the_daemonset(&c);
    checks.result(
        "dual-stack Service: both families balanced over every node, the IPv6 VIP announced on the link and taken over",
        r,
    );

    // ----- address pools: the elected agent assigns, every node serves -----
    let r = pool_addresses_through_the_daemonset(&c);
    checks.result(
        "address pools: 20 LoadBalancer Services created at once get distinct pool addresses from the agents and answer",
        r,
    );

    // ----- BGP through the DaemonSet: FRR in the client announces ECMP over every node -----
    let (v4, v6) = bgp_through_the_daemonset(&mut c);
    checks.result(
        "BGP via the DaemonSet and BGPPeers: only the selected nodes peer, with the MD5 password from a Secret; every node in the router's ECMP route once labelled, connections spread and survive a node's drain",
        v4,
    );
    checks.result(
        "BGP over IPv6 via a BGPPeer: the IPv6 VIP's /128 in FRR's table via every node, the client answered through it",
        v6,
    );

    // ----- the receiving node's link down: sluice drains it, then how long new connections fail -----
    let r = node_link_down(&c);
    checks.result(
        "node link down: another node's agent drains it by its health check while the API still calls it Ready, and new connections are answered again",
        r,
    );

    // ----- second chance through the DaemonSet: 50 connections through a rolling restart,
    // a drain and the node's return -----
    let r = second_chance_through_the_daemonset(&mut c);
    checks.result(
        "flow-state auto via the ConfigMap: every agent finds kube-proxy's conntrack and runs second chance; 50 long-lived connections survive a rolling restart, a node's drain and its return",
        r,
    );

    checks.check(
        "test time",
        true,
        format!(
            "{:.1} s in all (cluster start {:.1} s)",
            started.elapsed().as_secs_f64(),
            cluster_start.as_secs_f64()
        ),
    );
    hold_for_inspection(&c);
    drop(c);
    checks.finish();
}

/// An auto-assign pool (10.80.2.0/27) and 20 LoadBalancer Services created at once: the
/// agent holding the allocator's Lease writes 20 distinct pool addresses into their status
/// within 5 s, and one of them answers through sluice (the client routes it to node-0). The
/// Services and the pool are deleted after.
/// `iface: auto` on nodes whose interfaces have different names: on each node the agent's XDP
/// program is on that node's interface (the kernel says so), and its log and `/readyz` name it
/// with the reason (it carries the Node's InternalIP).
fn iface_auto_per_node(c: &Cluster) -> Result<String> {
    let pods = agent_pods(c)?;
    let mut seen = Vec::new();
    for i in 0..c.nodes() {
        let (node, iface) = (c.node_name(i), c.node_iface(i));
        let (pod, _, _) = pods
            .get(node)
            .with_context(|| format!("no agent pod on {node}"))?;
        let why = format!(
            "--iface auto: it carries the node's InternalIP {}",
            c.node_addr(i)
        );
        let link = c.node_exec(i, &["ip", "-d", "link", "show", "dev", iface])?;
        ensure!(
            String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
            "{node}'s {iface} has no XDP program"
        );
        let logs = c.kube().kubectl_on(
            0,
            &["logs", "-n", AGENT_NAMESPACE, pod],
            Duration::from_secs(20),
        )?;
        let want = format!("attaching to {iface}: {why}");
        ensure!(
            String::from_utf8_lossy(&logs.stdout).contains(&want),
            "{pod} on {node} does not log {want:?}"
        );
        let readyz = c.agent_readyz(i)?;
        let want = format!("interface {iface}: {why}");
        ensure!(
            readyz.contains(&want),
            "{node}'s /readyz does not say {want:?}: {readyz:?}"
        );
        seen.push(format!("{node} {iface}"));
    }
    Ok(format!(
        "XDP on, log and /readyz naming each node's own interface by its InternalIP: {}",
        seen.join(", ")
    ))
}

/// Installs sluice from one of deploy/'s kustomize overlays with `kubectl apply -k`, as the
/// README tells users to, and checks that every object the overlay renders now exists and
/// that the DaemonSet runs the image tagged with the version (deploy/base's one tag).
fn install_from_overlay(c: &Cluster, overlay: &str) -> Result<String> {
    let dir = repo_root().join("deploy/overlays").join(overlay);
    let dir = dir.to_string_lossy();
    c.kubectl(&["apply", "-k", &dir])?;
    // Fails naming any object the overlay renders that the cluster does not have.
    let objects = c.kubectl_json(&["get", "-k", &dir])?;
    let items = objects
        .get("items")
        .and_then(Value::as_array)
        .context("`kubectl get -k` without items")?;
    let names: Vec<String> = items
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o.get("kind").and_then(Value::as_str).unwrap_or("?"),
                o.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
            )
        })
        .collect();
    let image = items
        .iter()
        .find(|o| o.get("kind").and_then(Value::as_str) == Some("DaemonSet"))
        .and_then(|ds| ds.pointer("/spec/template/spec/containers/0/image"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let want = format!("{}:{}", image::SLUICE_IMAGE, image::default_tag());
    ensure!(image == want, "the DaemonSet runs {image:?}, not {want}");
    Ok(format!(
        "{} objects: {}; image {image}",
        names.len(),
        names.join(", ")
    ))
}

fn pool_addresses_through_the_daemonset(c: &Cluster) -> Result<String> {
    const BOUND: Duration = Duration::from_secs(5);
    c.kube()
        .pool("test-auto", &["10.80.2.0/27".to_owned()], true, false)?;
    let names: Vec<String> = (0..20).map(|i| format!("pool-{i}")).collect();
    let manifests: String = names
        .iter()
        .map(|n| cluster::lb_service(n, "Cluster", ""))
        .collect();
    let start = Instant::now();
    c.kube().apply_yaml(&manifests)?;
    let addresses = |c: &Cluster| -> Result<BTreeMap<String, String>> {
        let v = c
            .kube()
            .api("GET", "/api/v1/namespaces/default/services", None)?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let name = s.pointer("/metadata/name")?.as_str()?;
                let ip = s.pointer("/status/loadBalancer/ingress/0/ip")?.as_str()?;
                names
                    .iter()
                    .any(|n| n == name)
                    .then(|| (name.to_owned(), ip.to_owned()))
            })
            .collect())
    };
    let mut got = addresses(c)?;
    while got.len() < names.len() {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "after 30 s only {} of 20 Services have an address: {got:?}",
            got.len()
        );
        thread::sleep(Duration::from_millis(100));
        got = addresses(c)?;
    }
    let took = start.elapsed();
    let distinct: BTreeSet<&String> = got.values().collect();
    ensure!(
        distinct.len() == 20,
        "20 Services, {} addresses: {got:?}",
        distinct.len()
    );
    ensure!(
        got.values().all(|a| a.starts_with("10.80.2.")),
        "an address outside the pool: {got:?}"
    );
    ensure!(
        took <= BOUND,
        "20 addresses took {took:.1?} (bound {BOUND:?})"
    );
    let first: Ipv4Addr = got["pool-0"].parse()?;
    c.route_vip_via(first, 0)?;
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let (ok, failed) = c.curl(first, 80, "/cgi-bin/who", 10)?;
        answered = ok.len();
        if failed == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    ensure!(
        answered == 10,
        "{first} (pool-0) answered {answered} of 10 requests"
    );
    let holder = c
        .kubectl(&[
            "get",
            "lease",
            "-n",
            AGENT_NAMESPACE,
            "sluice-allocator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut delete = vec!["delete", "service", "-n", "default", "--wait=false"];
    delete.extend(names.iter().map(String::as_str));
    c.kubectl(&delete)?;
    c.kubectl(&["delete", "ipaddresspool", "test-auto", "--wait=false"])?;
    Ok(format!(
        "20 distinct addresses of 10.80.2.0/27 in {took:.2?} (bound {BOUND:?}), written by {holder}; pool-0 at {first}: 10 of 10 answered through node-0"
    ))
}

/// The dual-stack Service `web-dual` (RequireDualStack, Cluster policy; the agents run with
/// --announce by now): its IPv4 and IPv6 VIPs routed to node-0 are balanced over every node
/// (SYNs leaving the bridge per node port) and answered by pods on every node through each
/// node's kube-proxy (iptables / ip6tables); its on-link IPv6 VIP resolves to the elected node's
/// MAC (NDP answered from XDP), answers from pods on every node, and moves to another node's
/// MAC when the elected node's agent pod is deleted (unsolicited NA from the new holder).
fn dual_stack_through_the_daemonset(c: &Cluster) -> Result<String> {
    let started = Instant::now();
    let on_link = cluster::on_link_vip6();
    c.route_vip_via(VIP_DUAL4, 0)?;
    c.route_vip_via(VIP_DUAL6, 0)?;
    c.vip_on_link(on_link)?;
    let vips: [IpAddr; 3] = [VIP_DUAL4.into(), VIP_DUAL6.into(), on_link.into()];
    let converged = c.wait_for(
        "web-dual answered on its three VIPs by pods on every node",
        Duration::from_secs(90),
        || {
            for v in vips {
                let s = spread(c, v, 30)?;
                if s.failed > 0 || !every_node(c, &s.by_node) {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let mut report = vec![format!(
        "all three VIPs answered by pods on every node after {:.1} s",
        converged.as_secs_f64()
    )];
    // node-0 receives each family's connections and balances them over all nodes.
    for vip in [IpAddr::from(VIP_DUAL4), IpAddr::from(VIP_DUAL6)] {
        c.count_vip_frames(vip)?;
        let n = 150;
        let s = spread(c, vip, n)?;
        let client_syns = c
            .vip_frames()?
            .get("sw-c")
            .context("no client port counter")?
            .1;
        let out = c.vip_syns_out()?;
        let to = |i: usize| out.get(c.node_port(i)).copied().unwrap_or_default();
        let others: u64 = (1..c.nodes()).map(to).sum();
        let picks: Vec<u64> = std::iter::once(client_syns.saturating_sub(others))
            .chain((1..c.nodes()).map(to))
            .collect();
        ensure!(
            s.failed == 0 && every_node(c, &s.by_node) && picks.iter().all(|&p| p > 0),
            "{vip}: {} of {n} failed; pods by node {:?}; new connections per node {picks:?}",
            s.failed,
            s.by_node
        );
        report.push(format!(
            "{vip}: {n} of {n} answered in {:.1} s, balanced per node {picks:?}, pods by node {:?}",
            s.took.as_secs_f64(),
            s.by_node
        ));
    }
    // The on-link IPv6 VIP: the client's neighbour entry names the elected node.
    let owner_of = |mac: &str| (0..c.nodes()).find(|&i| c.node_mac(i) == mac);
    let s = spread(c, on_link, 60)?;
    let mac = c.client_neighbour(on_link)?.unwrap_or_default();
    let owner = owner_of(&mac).with_context(|| {
        format!("the client's neighbour entry for {on_link} is {mac:?}, no node's MAC")
    })?;
    ensure!(
        s.failed == 0 && every_node(c, &s.by_node),
        "{on_link}: {} of 60 failed; pods by node {:?}",
        s.failed,
        s.by_node
    );
    // Takeover: the holder's agent pod deleted (SIGTERM: it releases its leases).
    let pod = agent_pods(c)?
        .get(c.node_name(owner))
        .map(|(name, _, _)| name.clone())
        .with_context(|| format!("no agent pod on {}", c.node_name(owner)))?;
    c.kubectl(&["delete", "pod", "-n", AGENT_NAMESPACE, &pod, "--wait=false"])?;
    let t = Instant::now();
    let mut moved = None;
    while t.elapsed() < Duration::from_secs(60) {
        if let Some(m) = c.client_neighbour(on_link)?
            && let Some(i) = owner_of(&m)
            && i != owner
        {
            moved = Some((i, t.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (new_owner, took) = moved.with_context(|| {
        format!(
            "the client's neighbour entry for {on_link} still names {} 60 s after its agent pod's deletion",
            c.node_name(owner)
        )
    })?;
    let after = spread(c, on_link, 30)?;
    ensure!(
        after.failed == 0,
        "{} of 30 connections to {on_link} failed after the takeover",
        after.failed
    );
    // The DaemonSet's replacement pod, before the next checks.
    c.wait_for(
        "every agent pod ready again after the takeover",
        Duration::from_secs(120),
        || all_agents_ready(c),
    )?;
    report.push(format!(
        "{on_link} on the link: 60 of 60 answered through {} (pods by node {:?}); its agent pod deleted, the client's neighbour entry moved to {} after {:.2} s, 30 of 30 answered after",
        c.node_name(owner),
        s.by_node,
        c.node_name(new_owner),
        took.as_secs_f64()
    ));
    report.push(format!("{:.1} s in all", started.elapsed().as_secs_f64()));
    Ok(report.join("; "))
}

/// node-0's link goes down and the client's route moves to node-1, as a BGP router's would.
/// sluice's own part: node-1's agent finds node-0 down by its health check and drains it
/// (`sluice_backend_healthy` 0 for the Cluster VIP's row of node-0) while the API server still
/// calls node-0 Ready (the controller-manager marks it NotReady after its 20 s grace): with
/// health checks off, node-0 would drain only once NotReady, and this fails. Then how long
/// until new connections are all answered again (the rest of that window is kube-proxy
/// sending connections to node-0's pods until their endpoints go), at most 60 s.
fn node_link_down(c: &Cluster) -> Result<String> {
    c.set_node_link(0, false)?;
    let t = Instant::now();
    let result = (|| -> Result<String> {
        c.route_vip_via(VIP_CLUSTER, 1)?;
        let vip = format!("vip=\"{VIP_CLUSTER}:80/tcp\"");
        let backend = format!("backend=\"{}\"", c.node_addr(0));
        let healthy = || -> Result<f64> {
            let m = c.agent_metrics(1)?;
            m.iter()
                .find(|(series, _)| {
                    series.starts_with("sluice_backend_healthy{")
                        && series.contains(&vip)
                        && series.contains(&backend)
                })
                .map(|(_, v)| *v)
                .with_context(|| {
                    format!("node-1's agent has no sluice_backend_healthy{{{vip},{backend}}}")
                })
        };
        let mut drained = None;
        while t.elapsed() < Duration::from_secs(15) {
            if healthy()? == 0.0 {
                drained = Some(t.elapsed());
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        let drained = drained.context(
            "node-1's agent did not find node-0 down by its health check within 15 s of its link going down",
        )?;
        let node = c.kubectl_json(&["get", "node", c.node_name(0)])?;
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|cond| cond["type"] == "Ready")
            .map(|cond| cond["status"].clone());
        ensure!(
            ready == Some(Value::from("True")),
            "node-1's agent drained node-0 {:.1} s after its link went down, but the API server already said Ready={ready:?}: the drain may be the Node's, not the health check's",
            drained.as_secs_f64()
        );
        let mut answered = None;
        while t.elapsed() < Duration::from_secs(60) {
            let (_, failed) = c.curl(VIP_CLUSTER, 80, "/cgi-bin/who", 10)?;
            if failed == 0 {
                answered = Some(t.elapsed());
                break;
            }
        }
        let answered =
            answered.context("new connections failed for 60 s after node-0's link went down")?;
        Ok(format!(
            "node-1's agent drained node-0 by its health check {:.1} s after its link went down, node-0 still Ready in the API then; new connections fully answered again after {:.1} s",
            drained.as_secs_f64(),
            answered.as_secs_f64()
        ))
    })();
    c.set_node_link(0, true)?;
    c.route_vip_via(VIP_CLUSTER, 0)?;
    result
}

/// The Node label the IPv4 BGPPeer selects by (a rack's top-of-rack router).
const RACK_LABEL: &str = "sluice-test/rack";
/// The Secret (in the agent's namespace) with the IPv4 BGPPeer's TCP-MD5 password.
const BGP_SECRET: &str = "bgp-tor-a";
/// The password FRR expects of every node (`neighbor X password`) and the Secret holds.
const BGP_PASSWORD: &str = "tor-a-s3cret";

/// FRR in the client's namespace (the client is its own router) and two BGPPeer resources, as a
/// user writes them: `tor-a` (IPv4, TCP-MD5 password from a Secret, nodes labelled
/// `sluice-test/rack=a`) and `tor-a-v6` (IPv6, every node). One rolling restart turns BGP on
/// (the ConfigMap, no `bgp-peers`). Returns the IPv4 scenario's result and the IPv6 one's,
/// each checked even when the other fails:
/// - IPv4 ([`bgp_ipv4_rack_router`]): only the labelled nodes peer, with the password FRR
///   checks; labelling the third brings it in; ECMP over every node, connections enter by
///   every node, node-1's pod deleted while long-lived connections run (none broken), back.
/// - IPv6 ([`bgp_ipv6_router`]): the IPv6 VIP's /128 in FRR's IPv6 table and the client's
///   kernel with every node as next hop, and the client's connections to it answered, entering
///   by every node.
///
/// BGP off, the client's static routes and the nodes' labels are restored after.
fn bgp_through_the_daemonset(c: &mut Cluster) -> (Result<String>, Result<String>) {
    use sluice_tests::bgp_lab::{Router, RouterKind, RouterOptions};
    let started = Instant::now();
    let nodes: Vec<Ipv4Addr> = (0..c.nodes()).map(|i| c.node_addr(i)).collect();
    let client = cluster::client_addr();
    let router = match Router::start_with(
        RouterKind::Frr,
        c.client_ns(),
        client,
        &nodes,
        &RouterOptions {
            passwords: (0..c.nodes())
                .map(|i| (i, BGP_PASSWORD.to_owned()))
                .collect(),
            ipv6_nodes: (0..c.nodes()).map(|i| c.node_addr6(i)).collect(),
            ..RouterOptions::default()
        },
        c.dir(),
    ) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("{e:#}");
            return (Err(e), Err(anyhow::anyhow!("no router: {msg}")));
        }
    };
    let results = match bgp_peers_through_the_daemonset(c) {
        Ok(restart) => {
            let v4 = bgp_ipv4_rack_router(c, &router).map(|d| format!("{restart}; {d}"));
            let v6 = bgp_ipv6_router(c, &router);
            (v4, v6)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            (Err(e), Err(anyhow::anyhow!("BGP not configured: {msg}")))
        }
    };
    // Back to the static routes, BGP off and no rack label, for the checks after this one.
    drop(router);
    let restored = configure_bgp(c, false)
        .and_then(|()| c.route_vip_via(VIP_CLUSTER, 0))
        .and_then(|()| c.route_vip_via(VIP_DUAL6, 0));
    for i in 0..c.nodes() {
        // Cleanup only (the label may be absent after an early failure).
        let _ = c.kubectl(&["label", "node", c.node_name(i), &format!("{RACK_LABEL}-")]);
    }
    let took = started.elapsed();
    match restored {
        Ok(()) => (
            results
                .0
                .map(|d| format!("{d}; BGP part {:.1} s in all", took.as_secs_f64())),
            results.1,
        ),
        Err(e) => (
            results.0.and(Err(e.context("restoring after BGP"))),
            results.1,
        ),
    }
}

/// The BGPPeers, their Secret and the grant to read it (`deploy/overlays/bgp/secrets-rbac.yaml`:
/// the beside-metallb overlay installed here has none), node-0 and node-1 labelled into the
/// rack, then BGP on by one rolling restart; the client's static routes of the two VIPs give
/// way to what FRR learns. Returns what it did.
fn bgp_peers_through_the_daemonset(c: &Cluster) -> Result<String> {
    use sluice_tests::bgp_lab::ROUTER_ASN;
    let grant = repo_root().join("deploy/overlays/bgp/secrets-rbac.yaml");
    c.kubectl(&["apply", "-f", &grant.to_string_lossy()])?;
    c.kubectl(&[
        "create",
        "secret",
        "generic",
        BGP_SECRET,
        "-n",
        AGENT_NAMESPACE,
        &format!("--from-literal=password={BGP_PASSWORD}"),
    ])?;
    for i in [0, 1] {
        c.kubectl(&[
            "label",
            "node",
            c.node_name(i),
            &format!("{RACK_LABEL}=a"),
            "--overwrite",
        ])?;
    }
    c.kube().apply_yaml(&format!(
        r#"apiVersion: sluice.io/v1alpha1
kind: BGPPeer
metadata: {{name: tor-a}}
spec:
  peerAddress: "{client}"
  peerASN: {ROUTER_ASN}
  passwordSecretRef: {{name: {BGP_SECRET}}}
  nodeSelector: {{matchLabels: {{{RACK_LABEL}: a}}}}
---
apiVersion: sluice.io/v1alpha1
kind: BGPPeer
metadata: {{name: tor-a-v6}}
spec:
  peerAddress: "{client6}"
  peerASN: {ROUTER_ASN}
"#,
        client = cluster::client_addr(),
        client6 = cluster::client_addr6(),
    ))?;
    let t = Instant::now();
    configure_bgp(c, true)?;
    let restart = t.elapsed();
    // The static routes give way to what the router learns; IPv6 ECMP hashes on ports too.
    for (family, host) in [
        ("-4", format!("{VIP_CLUSTER}/32")),
        ("-6", format!("{VIP_DUAL6}/128")),
    ] {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", c.client_ns(), "ip", family, "route", "del"])
            .arg(host)
            .status();
    }
    let ok = std::process::Command::new("ip")
        .args(["netns", "exec", c.client_ns()])
        .args(["sysctl", "-q", "-w", "net.ipv6.fib_multipath_hash_policy=1"])
        .status()?
        .success();
    ensure!(ok, "setting the client's IPv6 multipath hash policy");
    Ok(format!(
        "BGPPeers tor-a (IPv4, password from Secret {BGP_SECRET}, {RACK_LABEL}=a) and tor-a-v6 (IPv6, every node), BGP on by a rolling restart of {:.1} s",
        restart.as_secs_f64()
    ))
}

/// The IPv4 rack router `tor-a`: see [`bgp_through_the_daemonset`]. Node-2 (unlabelled) has a
/// session with the IPv6 router and none with `tor-a` in its own `/metrics` (it read the
/// BGPPeers and left `tor-a` out), and FRR has only node-0's and node-1's sessions, which carry
/// the password FRR checks (FRR drops the SYNs of a session without it).
fn bgp_ipv4_rack_router(c: &mut Cluster, router: &sluice_tests::bgp_lab::Router) -> Result<String> {
    use sluice_tests::bgp_lab::ROUTER_ASN;
    let nodes: Vec<Ipv4Addr> = (0..c.nodes()).map(|i| c.node_addr(i)).collect();
    let all: BTreeSet<Ipv4Addr> = nodes.iter().copied().collect();
    let rack: BTreeSet<Ipv4Addr> = BTreeSet::from([nodes[0], nodes[1]]);
    let session = |addr: IpAddr| {
        format!(
            "peer=\"{} (AS {ROUTER_ASN})\"",
            std::net::SocketAddr::new(addr, 179)
        )
    };
    let (to_v4, to_v6) = (
        session(cluster::client_addr().into()),
        session(cluster::client_addr6().into()),
    );
    let sessions_of_node2 = || -> Result<Vec<String>> {
        Ok(c.agent_metrics(2)?
            .into_keys()
            .filter(|k| k.starts_with("sluice_bgp_session_up{"))
            .collect())
    };
    // Node-2 (unlabelled) first: its agent has the IPv6 router's session, so it read the
    // BGPPeers, and none with tor-a.
    c.wait_for(
        "node-2's agent has its session with the IPv6 router",
        Duration::from_secs(30),
        || Ok(sessions_of_node2()?.iter().any(|k| k.contains(&to_v6))),
    )?;
    let node2 = sessions_of_node2()?;
    ensure!(
        !node2.iter().any(|k| k.contains(&to_v4)),
        "node-2 is not in rack a, yet its agent has a session with tor-a: {node2:?}"
    );
    let (_, took) = router.wait_nexthops(
        VIP_CLUSTER,
        Duration::from_secs(60),
        "the rack's nodes (node-0, node-1) in the VIP's route",
        |h| *h == rack,
    )?;
    router.wait_established(&rack, Duration::from_secs(10))?;
    // Labelled into the rack, node-2 peers too (the agent watches its Node: no restart).
    c.kubectl(&[
        "label",
        "node",
        c.node_name(2),
        &format!("{RACK_LABEL}=a"),
        "--overwrite",
    ])?;
    let (_, joined) = router.wait_nexthops(
        VIP_CLUSTER,
        Duration::from_secs(60),
        "node-2 in the VIP's route once labelled into the rack",
        |h| *h == all,
    )?;
    router.wait_established(&all, Duration::from_secs(10))?;
    // SYNs from the client, by the node MAC they are sent to (ECMP's choice).
    let macs: Vec<String> = (0..c.nodes()).map(|i| c.node_mac(i)).collect();
    count_client_syns(c, &macs, VIP_CLUSTER.into())?;
    let s = spread(c, VIP_CLUSTER, 120)?;
    let entered = client_syns(c, c.nodes())?;
    ensure!(s.failed == 0, "{} of 120 failed through ECMP", s.failed);
    ensure!(
        entered.iter().all(|n| *n > 0),
        "new connections did not enter by every node: {entered:?}"
    );
    // Long-lived connections, then node-1's agent pod deleted.
    let echo = SocketAddrV4::new(VIP_CLUSTER, image::WEB_ECHO_PORT);
    let conns: Vec<_> = (0..12).map(|_| c.long_conn(echo)).collect::<Result<_>>()?;
    for conn in &conns {
        conn.wait_echoes(3, Duration::from_secs(20))?;
    }
    let pod = agent_pods(c)?
        .get(c.node_name(1))
        .map(|(name, _, _)| name.clone())
        .context("no agent pod on node-1")?;
    c.kubectl(&["delete", "pod", "-n", AGENT_NAMESPACE, &pod, "--wait=false"])?;
    let without1: BTreeSet<Ipv4Addr> = all.iter().copied().filter(|a| *a != nodes[1]).collect();
    let (_, left) = router.wait_nexthops(
        VIP_CLUSTER,
        Duration::from_secs(30),
        "node-1 leaves the route after its pod's SIGTERM",
        |h| *h == without1,
    )?;
    for conn in &conns {
        conn.wait_echoes(5, Duration::from_secs(30))?;
    }
    let hurt: Vec<_> = conns
        .into_iter()
        .map(|conn| conn.finish())
        .filter(|r| !r.is_clean())
        .collect();
    ensure!(
        hurt.is_empty(),
        "{} of 12 connections broke or moved while node-1 drained: {hurt:?}",
        hurt.len()
    );
    // The DaemonSet brings node-1's agent back, and with it its route.
    router.wait_nexthops(
        VIP_CLUSTER,
        Duration::from_secs(120),
        "node-1 back in the route with its new pod",
        |h| *h == all,
    )?;
    Ok(format!(
        "node-0 and node-1 (rack a) in FRR's ECMP route {:.1} s after node-2's check, their MD5 sessions Established, node-2 (unlabelled) with no session to tor-a (its /metrics: {node2:?}); labelled, node-2 in the route after {:.1} s; 120 of 120 answered, SYNs entering by node {entered:?}; node-1 out of the route {:.2} s after its pod's deletion, 12 of 12 long-lived connections unbroken, node-1 back with its new pod",
        took.as_secs_f64(),
        joined.as_secs_f64(),
        left.as_secs_f64()
    ))
}

/// The IPv6 router `tor-a-v6`: see [`bgp_through_the_daemonset`].
fn bgp_ipv6_router(c: &Cluster, router: &sluice_tests::bgp_lab::Router) -> Result<String> {
    let vip = IpAddr::from(VIP_DUAL6);
    let all: BTreeSet<IpAddr> = (0..c.nodes())
        .map(|i| IpAddr::from(c.node_addr6(i)))
        .collect();
    let took = c.wait_for(
        "the IPv6 VIP's /128 in FRR's IPv6 table via every node",
        Duration::from_secs(60),
        || Ok(router.frr_installed_nexthops(vip)? == all),
    )?;
    let kernel = c.wait_for(
        "the IPv6 VIP's route in the client's kernel via every node",
        Duration::from_secs(10),
        || Ok(client_gateways(c, vip)? == all),
    );
    kernel.with_context(|| format!("FRR's table says {all:?}"))?;
    let macs: Vec<String> = (0..c.nodes()).map(|i| c.node_mac(i)).collect();
    count_client_syns(c, &macs, vip)?;
    let n = 90;
    let s = spread(c, vip, n)?;
    let entered = client_syns(c, c.nodes())?;
    ensure!(
        s.failed == 0 && every_node(c, &s.by_node),
        "{vip} through FRR's route: {} of {n} failed; pods by node {:?}",
        s.failed,
        s.by_node
    );
    ensure!(
        entered.iter().all(|k| *k > 0),
        "new connections to {vip} did not enter by every node: {entered:?}"
    );
    Ok(format!(
        "{vip}/128 in FRR's IPv6 table and the client's kernel via every node ({all:?}) {:.1} s after the IPv4 checks; {n} of {n} answered, SYNs entering by node {entered:?}, pods by node {:?}",
        took.as_secs_f64(),
        s.by_node
    ))
}

/// The gateways of the client's kernel route to `vip` (its host route; none: no route).
fn client_gateways(c: &Cluster, vip: IpAddr) -> Result<BTreeSet<IpAddr>> {
    let (family, host) = match vip {
        IpAddr::V4(v) => ("-4", format!("{v}/32")),
        IpAddr::V6(v) => ("-6", format!("{v}/128")),
    };
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", c.client_ns(), "ip", family, "-j", "route"])
        .args(["show", "exact", &host])
        .output()?;
    ensure!(out.status.success(), "ip route show exact {host}");
    let routes: Value = serde_json::from_slice(&out.stdout)?;
    // One gateway, or a `nexthops` list (ECMP).
    Ok(routes
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| {
            std::iter::once(&r["gateway"])
                .chain(
                    r["nexthops"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|h| &h["gateway"]),
                )
                .filter_map(|g| g.as_str()?.parse().ok())
                .collect::<Vec<IpAddr>>()
        })
        .collect())
}

/// BGP on (the routers are the BGPPeer resources: no `bgp-peers`) or off in the agents'
/// ConfigMap, then a rolling restart of the DaemonSet so that the pods take it (flags come from
/// the ConfigMap).
fn configure_bgp(c: &Cluster, on: bool) -> Result<()> {
    use sluice_tests::bgp_lab::NODE_ASN;
    let patch = if on {
        format!(r#"{{"data": {{"bgp": "true", "bgp-asn": "{NODE_ASN}", "bgp-peers": ""}}}}"#)
    } else {
        r#"{"data": {"bgp": "false", "bgp-peers": ""}}"#.to_owned()
    };
    reconfigure_agents(c, &patch)
}

/// Merges `patch` into the agents' ConfigMap and restarts them so that they take it (their
/// flags come from it).
fn reconfigure_agents(c: &Cluster, patch: &str) -> Result<()> {
    c.kubectl(&[
        "patch",
        "configmap",
        "-n",
        AGENT_NAMESPACE,
        "sluice-agent",
        "--type",
        "merge",
        "-p",
        patch,
    ])?;
    rolling_restart(c)
}

/// `kubectl rollout restart` of the agents' DaemonSet, waited for.
fn rolling_restart(c: &Cluster) -> Result<()> {
    c.kubectl(&[
        "rollout",
        "restart",
        "-n",
        AGENT_NAMESPACE,
        "daemonset/sluice-agent",
    ])?;
    // A rolling restart of three pods takes a minute or more on a loaded 2-core host: longer
    // than kubectl's default bound here.
    let out = c.kube().kubectl_on(
        0,
        &[
            "rollout",
            "status",
            "-n",
            AGENT_NAMESPACE,
            "daemonset/sluice-agent",
            "--timeout=240s",
        ],
        Duration::from_secs(250),
    )?;
    ensure!(
        out.status.success(),
        "the DaemonSet's rollout did not finish: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Counters on the bridge: SYNs to `vip` from the client's port, per destination node MAC.
fn count_client_syns(c: &Cluster, macs: &[String], vip: IpAddr) -> Result<()> {
    let family = if vip.is_ipv6() { "ip6" } else { "ip" };
    let mut rules = String::new();
    for i in 0..macs.len() {
        rules.push_str(&format!("  counter n{i} {{ }}\n"));
    }
    rules.push_str("  chain syns {\n    type filter hook forward priority 0; policy accept;\n");
    for (i, mac) in macs.iter().enumerate() {
        rules.push_str(&format!(
            "    iifname \"sw-c\" ether daddr {mac} {family} daddr {vip} tcp flags & (syn | ack) == syn counter name n{i}\n"
        ));
    }
    rules.push_str("  }\n");
    let text = format!(
        "table bridge sluicebgp\ndelete table bridge sluicebgp\ntable bridge sluicebgp {{\n{rules}}}\n"
    );
    let path = c.dir().join("bgp-syns.nft");
    std::fs::write(&path, text)?;
    let ok = std::process::Command::new("ip")
        .args(["netns", "exec", c.switch_ns(), "nft", "-f"])
        .arg(&path)
        .status()?
        .success();
    ensure!(ok, "installing the bridge's SYN counters");
    Ok(())
}

/// The counters of [`count_client_syns`], node by node.
fn client_syns(c: &Cluster, nodes: usize) -> Result<Vec<u64>> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            c.switch_ns(),
            "nft",
            "-j",
            "list",
            "counters",
            "table",
            "bridge",
            "sluicebgp",
        ])
        .output()?;
    ensure!(out.status.success(), "nft list counters");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    // A counter that is not there is an error, never 0.
    let mut counts = vec![None; nodes];
    for item in v["nftables"].as_array().context("nft -j: no list")? {
        let Some(counter) = item.get("counter") else {
            continue;
        };
        let name = counter["name"].as_str().unwrap_or("");
        if let Some(i) = name.strip_prefix('n').and_then(|i| i.parse::<usize>().ok())
            && i < nodes
        {
            counts[i] = counter["packets"].as_u64();
        }
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, n)| n.with_context(|| format!("no SYN counter n{i} on the bridge: {v}")))
        .collect()
}

/// Long-lived connections of the second-chance check.
const SECOND_CHANCE_CONNECTIONS: usize = 50;

/// `flow-state: auto` in the ConfigMap and a rolling restart: each agent asks its node's
/// conntrack (kube-proxy's rules turn it on) and runs second chance. The ipip Service goes
/// first: `auto` keeps the table while a VIP is forwarded encapsulated (its receivers do not
/// run the second-chance check, docs/design.md). Then 50 long-lived
/// connections to the Cluster VIP's echo port through a rolling restart of the agents, a
/// cordon of node-2 (its slots go to the others: the connections it serves are handed back to
/// it) and its uncordon (back to the first table: the connections that began on node-2 are
/// its again): every one clean. Left in second chance (the last check of the run).
fn second_chance_through_the_daemonset(c: &mut Cluster) -> Result<String> {
    c.kubectl(&["delete", "service", "web-ipip"])?;
    reconfigure_agents(c, r#"{"data": {"flow-state": "auto"}}"#)?;
    c.wait_for(
        "every agent says it runs second chance",
        Duration::from_secs(60),
        || {
            let pods = agent_pods(c)?;
            for (pod, _, _) in pods.values() {
                let out = c.kubectl(&["logs", "-n", AGENT_NAMESPACE, pod])?;
                let log = String::from_utf8_lossy(&out.stdout);
                if !log.contains("flow_state auto: this node's conntrack tracks its connections")
                    || !log.contains("running second-chance")
                {
                    return Ok(false);
                }
            }
            Ok(pods.len() == c.nodes())
        },
    )?;
    let echo_port = format!("{VIP_CLUSTER}:{}/tcp", image::WEB_ECHO_PORT);
    let states = |c: &Cluster| -> Result<Vec<String>> {
        let v = sluice_in_agent_pod(c, 0, &["inspect", "backends"])?;
        let rows = v["backends"]
            .as_array()
            .context("inspect backends: no rows")?;
        (0..c.nodes())
            .map(|i| {
                let addr = c.node_addr(i).to_string();
                rows.iter()
                    .find(|b| b["address"] == addr.as_str() && b["vip"] == echo_port.as_str())
                    .and_then(|b| b["state"].as_str().map(str::to_owned))
                    .with_context(|| format!("no row of {addr} for {echo_port}: {v}"))
            })
            .collect()
    };
    let all_active = |c: &Cluster| -> Result<bool> { Ok(states(c)?.iter().all(|s| s == "active")) };
    // The link-down check before this one drained node-0 by its health check for a while.
    c.wait_for(
        "node-0's maps: every node active",
        Duration::from_secs(60),
        || all_active(c),
    )?;
    // Packets handed on by a table (a moved flow's first at each node) and sent on along a
    // record (its next ones), over the nodes.
    let handed_on = |c: &Cluster| -> Result<[u64; 2]> {
        let mut sums = [0; 2];
        for i in 0..c.nodes() {
            let v = sluice_in_agent_pod(c, i, &["inspect", "stats"])?;
            for (sum, name) in sums
                .iter_mut()
                .zip(["second_chance_handed_on", "second_chance_record_followed"])
            {
                *sum += v
                    .pointer(&format!("/global/{name}"))
                    .and_then(Value::as_u64)
                    .with_context(|| format!("node {i}: no {name}: {v}"))?;
            }
        }
        Ok(sums)
    };
    let echo = SocketAddrV4::new(VIP_CLUSTER, image::WEB_ECHO_PORT);
    let conns: Vec<_> = (0..SECOND_CHANCE_CONNECTIONS)
        .map(|_| c.long_conn(echo))
        .collect::<Result<_>>()?;
    let clean = |what: &str| -> Result<()> {
        for conn in &conns {
            conn.wait_echoes(5, Duration::from_secs(30))
                .with_context(|| format!("after {what}"))?;
            let report = conn.snapshot();
            ensure!(report.is_clean(), "after {what}: {report:?}");
        }
        Ok(())
    };
    clean("opening")?;
    let before = handed_on(c)?;

    let t = Instant::now();
    rolling_restart(c)?;
    clean("a rolling restart")?;
    let restarted = t.elapsed();

    c.kubectl(&["cordon", c.node_name(2)])?;
    let drained = c.wait_for(
        "node-0's maps drain the cordoned node-2",
        Duration::from_secs(30),
        || Ok(states(c)?.get(2).is_some_and(|s| s == "draining")),
    );
    let after_drain = drained.and_then(|_| clean("node-2's drain"));
    c.kubectl(&["uncordon", c.node_name(2)])?;
    after_drain?;
    c.wait_for("node-2 active again", Duration::from_secs(30), || {
        all_active(c)
    })?;
    clean("node-2's return")?;
    let after = handed_on(c)?;
    let (handed, followed) = (after[0] - before[0], after[1] - before[1]);
    let backends: BTreeSet<String> = conns
        .iter()
        .filter_map(|conn| conn.snapshot().backends.first().cloned())
        .collect();
    ensure!(
        handed > 0,
        "no packet was handed on: nothing tested the second chance"
    );
    Ok(format!(
        "{SECOND_CHANCE_CONNECTIONS} connections (served by {} pods) clean through a rolling restart of {:.1} s, node-2's drain and its return; {handed} packets handed on by a table, {followed} sent on along a record",
        backends.len(),
        restarted.as_secs_f64()
    ))
}
