//! Issue 27's scale proof against the real API server: `nodes` Node objects (no kubelets: each
//! created, then made Ready with its InternalIP through the status subresource), `services`
//! LoadBalancer Services of [`PORTS`] with `externalTrafficPolicy: Cluster` (every node is a
//! backend of every VIP port) and an EndpointSlice each, then ONE agent in the lab's lb
//! namespace, started with nothing pinned. [`run`] measures and returns:
//! - the full sync: agent start -> `/readyz` 200, and -> every VIP in the maps with all its
//!   nodes live (and nothing left out for lack of room: `/readyz` lists what is);
//! - the agent's RSS and peak RSS (VmHWM) after it, and the memory of its maps (bpftool's
//!   `bytes_memlock` of every pinned map and every inner Maglev table);
//! - EndpointSlice change -> maps, per change (from the PATCH sent and from its answer);
//! - a burst of Node changes: `node_burst` nodes made NotReady at once until no VIP takes new
//!   flows to them, then Ready again until every VIP has them back.
//!
//! The nodes' InternalIPs are in [`NODE_NET`], which the lb namespace routes via lab backend b0,
//! and the Services ask for mode `ipip`: each node resolves to b0's MAC through that route (one
//! ARP in all), so every backend is really written into the maps (nothing is sent to them).
//!
//! Under `Cluster` a Service's EndpointSlice does not change its VIPs' backends, so Service 0
//! is the probe, with `externalTrafficPolicy: Local` and endpoints on node-0 and node-1: each
//! slice change adds or removes node-1's endpoints, and its VIPs' live backends go 2 -> 1 -> 2.
//! The other Services' slices (two endpoints each) are there as in a cluster: watched and held.
//!
//! What the maps hold is asked in one place ([`live_backends`], [`live_backends_of`],
//! [`map_memory`]): a new map layout changes those alone.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use lb_common::VipKey;
use lb_userspace::dataplane::{Maps, PinLayout};
use lb_userspace::model::{Protocol, VipAddr, vip_key};
use serde_json::json;

use crate::cmd;
use crate::kube::{self as api_server, Kube};
use crate::lab::{Lab, LabConfig, SluiceProcess};
use crate::netns;

/// The ports of every Service (one VIP each).
pub const PORTS: [u16; 2] = [80, 443];
/// Where the nodes' InternalIPs are: routed by the lb namespace via lab backend b0.
pub const NODE_NET: &str = "172.20.0.0/16";
/// Requests in flight while creating the objects: the API server's pace, not the client's.
const CONCURRENCY: usize = 32;
const NAMESPACE: &str = "default";
const HEALTH: &str = "127.0.0.1:9941";
/// The agent's metrics address (its default).
const METRICS: &str = lb_userspace::observe::metrics::DEFAULT_METRICS_ADDR;
/// How long the agent may take from start to ready.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one slice change or node burst may take to reach the maps before the run fails.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to create and how many changes to time.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub nodes: usize,
    /// Services of [`PORTS`].len() ports each.
    pub services: usize,
    /// EndpointSlice changes timed.
    pub slice_changes: usize,
    /// Nodes made NotReady at once (and Ready again).
    pub node_burst: usize,
}

impl Size {
    /// VIP ports in all.
    pub fn vip_ports(&self) -> usize {
        self.services * PORTS.len()
    }
}

/// What [`run`] measured.
#[derive(Clone, Debug)]
pub struct Figures {
    pub size: Size,
    /// Creating every Node, Service and EndpointSlice.
    pub created: Duration,
    /// Agent start -> `/readyz` 200.
    pub ready: Duration,
    /// Agent start -> every VIP in the maps with all its nodes live.
    pub sync: Duration,
    /// What the maps lacked when `/readyz` first answered 200 (`None`: nothing).
    pub at_ready: Option<String>,
    /// The agent's RSS and peak RSS after the sync, in bytes.
    pub rss: u64,
    pub peak_rss: u64,
    /// The agent's maps: bytes charged (bpftool's `bytes_memlock`) and how many maps.
    pub map_bytes: u64,
    pub maps: usize,
    /// EndpointSlice change -> maps, from the PATCH sent and from its answer.
    pub slice_from_sent: Vec<Duration>,
    pub slice_from_answer: Vec<Duration>,
    /// The agent's own model -> maps step of those changes (its log's "maps updated in").
    pub slice_applies: Vec<Duration>,
    /// `node_burst` nodes NotReady -> no VIP takes new flows to them; and Ready again -> all
    /// back.
    pub burst_down: Duration,
    pub burst_up: Duration,
    /// One scrape of the agent's `/metrics` after the sync: how long, how big, and the
    /// agent's peak RSS after it.
    pub scrape: Duration,
    pub scrape_bytes: usize,
    pub peak_rss_after_scrape: u64,
}

impl Figures {
    /// The report, one figure a line.
    pub fn lines(&self) -> Vec<String> {
        let s = &self.size;
        let mut out = vec![
            format!(
                "scale: {} nodes x {} Service ports ({} Services, externalTrafficPolicy Cluster, mode ipip), one agent",
                s.nodes,
                s.vip_ports(),
                s.services
            ),
            format!(
                "  objects created ({} Nodes, {} Services, {} EndpointSlices, {CONCURRENCY} requests in flight): {:.1} s",
                s.nodes,
                s.services,
                s.services,
                self.created.as_secs_f64()
            ),
            format!(
                "  full sync, agent start -> every VIP in the maps with all its nodes, nothing left out: {:.2} s (ready after {:.2} s)  (target <= 10 s)",
                self.sync.as_secs_f64(),
                self.ready.as_secs_f64()
            ),
            format!(
                "  agent memory after the sync: RSS {:.1} MB, peak {:.1} MB; maps {:.1} MB in {} maps (bpftool memlock)",
                self.rss as f64 / 1e6,
                self.peak_rss as f64 / 1e6,
                self.map_bytes as f64 / 1e6,
                self.maps
            ),
        ];
        if let Some(lacking) = &self.at_ready {
            out.push(format!("    when /readyz first answered 200: {lacking}"));
        }
        out.push(format!(
            "  EndpointSlice change -> maps, from the PATCH sent: {}  (target p99 <= 100 ms)",
            percentiles(&self.slice_from_sent)
        ));
        out.push(format!(
            "  EndpointSlice change -> maps, from the PATCH answered: {}",
            percentiles(&self.slice_from_answer)
        ));
        out.push(format!(
            "    of which the agent's model -> maps step (its log): {}",
            percentiles(&self.slice_applies)
        ));
        out.push(format!(
            "  one /metrics scrape: {:.2} s, {:.1} MB of text; agent peak RSS after it {:.1} MB",
            self.scrape.as_secs_f64(),
            self.scrape_bytes as f64 / 1e6,
            self.peak_rss_after_scrape as f64 / 1e6
        ));
        out.push(format!(
            "  {} nodes NotReady at once -> out of every VIP's table: {:.2} s; Ready again -> back: {:.2} s",
            s.node_burst,
            self.burst_down.as_secs_f64(),
            self.burst_up.as_secs_f64()
        ));
        out
    }
}

/// "N samples, p50 .. ms, p99 .. ms, max .. ms".
pub fn percentiles(samples: &[Duration]) -> String {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return "no samples".into();
    }
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    format!(
        "{} samples, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    )
}

/// (VmRSS, VmHWM) of a process, in bytes.
pub fn rss(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// Polls an agent's `GET /readyz` at `health` until it answers 200, and returns that answer
/// (its body lists what is degraded). Call it on a thread inside the agent's namespace.
pub fn wait_ready(
    agent: &mut SluiceProcess,
    health: SocketAddr,
    timeout: Duration,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = agent.try_wait()? {
            bail!("the agent exited ({status}): {}", log_tail(agent));
        }
        if let Ok(mut c) = TcpStream::connect_timeout(&health, Duration::from_millis(200)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = c.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = c.read_to_string(&mut answer);
            // "HTTP/1.0 200 OK" or "HTTP/1.1 200 OK", as the server answers an HTTP/1.0 request.
            if answer.split_whitespace().nth(1) == Some("200") {
                return Ok(answer);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the agent is not ready after {timeout:?}: {}",
            log_tail(agent)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The agent's own "maps updated in X" times (model -> maps) from its log, after `skip` lines.
pub fn apply_times(log: &str, skip: usize) -> Vec<Duration> {
    log.lines()
        .filter_map(|l| l.split_once("maps updated in ").map(|(_, rest)| rest))
        .skip(skip)
        .filter_map(|rest| {
            let d = rest.split(':').next()?;
            let unit_at = d.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?;
            let (value, unit) = d.split_at(unit_at);
            let value: f64 = value.parse().ok()?;
            let scale = match unit {
                "ns" => 1e-9,
                "µs" => 1e-6,
                "ms" => 1e-3,
                "s" => 1.0,
                _ => return None,
            };
            Some(Duration::from_secs_f64(value * scale))
        })
        .collect()
}

/// The last lines of an agent's log, each cut short: at scale a line lists thousands of nodes.
pub fn log_tail(agent: &SluiceProcess) -> String {
    let log = agent.log_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..]
        .iter()
        .map(|l| l.chars().take(400).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A current-thread tokio runtime running `f` to its end.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?
        .block_on(f)
}

// ----- the maps, asked in one place -----

/// How many backends take new flows for each VIP in the maps (its Maglev table's nodes).
pub fn live_backends(maps: &Maps) -> Result<HashMap<VipKey, u32>> {
    Ok(maps
        .read_vips()?
        .into_iter()
        .map(|(key, info)| (key, info.live_backends))
        .collect())
}

/// [`live_backends`] of one VIP; `None` when the maps hold no such VIP.
pub fn live_backends_of(maps: &Maps, vip: &VipKey) -> Result<Option<u32>> {
    Ok(maps.vip(vip)?.map(|info| info.live_backends))
}

/// Bytes the maps pinned under `pins` take (bpftool's `bytes_memlock`), their inner maps (the
/// Maglev tables) included, and how many maps that is.
pub fn map_memory(pins: &PinLayout) -> Result<(u64, usize)> {
    let mut ids = BTreeSet::new();
    let dir = pins.maps_dir();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            continue; // the layout mark
        }
        let path = path.to_string_lossy().into_owned();
        let map = bpftool(&["map", "show", "pinned", &path])?;
        ids.insert(map["id"].as_u64().context("bpftool map show: no id")?);
        if map["type"].as_str().is_some_and(|t| t.ends_with("of_maps")) {
            let entries = bpftool(&["map", "dump", "pinned", &path])?;
            for e in entries.as_array().into_iter().flatten() {
                let inner = inner_map_id(e)
                    .with_context(|| format!("bpftool map dump {path}: no inner map id in {e}"))?;
                ids.insert(inner);
            }
        }
    }
    let all = bpftool(&["map", "show"])?;
    let mut bytes = 0;
    let mut found = 0;
    for map in all.as_array().into_iter().flatten() {
        if map["id"].as_u64().is_some_and(|id| ids.contains(&id)) {
            bytes += map["bytes_memlock"].as_u64().unwrap_or(0);
            found += 1;
        }
    }
    Ok((bytes, found))
}

/// The inner map's id in one entry of `bpftool -j map dump` of a map of maps: its own field, or
/// the value's bytes (a little-endian u32, as this bpftool prints it).
fn inner_map_id(entry: &serde_json::Value) -> Option<u64> {
    if let Some(id) = entry["inner_map_id"].as_u64() {
        return Some(id);
    }
    let bytes: Vec<u8> = entry["value"]
        .as_array()?
        .iter()
        .map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect::<Option<_>>()?;
    Some(u64::from(u32::from_le_bytes(bytes.try_into().ok()?)))
}

fn bpftool(args: &[&str]) -> Result<serde_json::Value> {
    let out = cmd::run_ok(
        Command::new("bpftool").arg("-j").args(args),
        cmd::DEFAULT_TIMEOUT,
    )?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool {}: not JSON", args[..2].join(" ")))
}

// ----- the objects -----

fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Node i's InternalIP: the (i+1)th address of [`NODE_NET`].
fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 0)) + 1 + i as u32)
}

fn service_name(i: usize) -> String {
    format!("scale-{i}")
}

/// Service i's address (its `externalIPs`).
fn service_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 210, 0, 0)) + 1 + i as u32)
}

fn vip_of(service: usize, port: u16) -> VipKey {
    vip_key(&VipAddr {
        addr: IpAddr::V4(service_addr(service)),
        port,
        protocol: Protocol::Tcp,
    })
}

fn ready_condition(ready: bool) -> serde_json::Value {
    json!({"type": "Ready", "status": if ready { "True" } else { "False" },
           "reason": "SluiceScale", "message": "set by sluice-tests",
           "lastHeartbeatTime": "2026-01-01T00:00:00Z",
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

/// Node i, created, then made Ready with its InternalIP through the status subresource (as a
/// kubelet does).
async fn create_node(nodes: &Api<Node>, i: usize) -> Result<()> {
    let name = node_name(i);
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating Node {name}"))?;
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": node_addr(i).to_string()},
                      {"type": "Hostname", "address": name}],
        "conditions": [ready_condition(true)],
    }});
    nodes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("making Node {name} Ready"))?;
    Ok(())
}

async fn set_ready(nodes: &Api<Node>, i: usize, ready: bool) -> Result<()> {
    let status = json!({"status": {"conditions": [ready_condition(ready)]}});
    nodes
        .patch_status(
            &node_name(i),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .with_context(|| format!("setting Node {} Ready={ready}", node_name(i)))?;
    Ok(())
}

/// The probe Service's endpoints: one on node-0, and `on_node1` on node-1.
fn probe_endpoints(on_node1: usize) -> serde_json::Value {
    let mut eps = vec![endpoint("10.244.0.1", 0)];
    eps.extend((0..on_node1).map(|k| endpoint(&format!("10.244.1.{}", k + 1), 1)));
    serde_json::Value::Array(eps)
}

fn endpoint(addr: &str, node: usize) -> serde_json::Value {
    json!({"addresses": [addr], "nodeName": node_name(node),
           "conditions": {"ready": true, "serving": true, "terminating": false}})
}

/// Service i and its EndpointSlice. Service 0 is the probe (`Local`, see the module doc).
async fn create_service(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    i: usize,
    nodes: usize,
) -> Result<()> {
    let name = service_name(i);
    let policy = if i == 0 { "Local" } else { "Cluster" };
    let ports: Vec<_> = PORTS
        .iter()
        .map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "TCP"}))
        .collect();
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name,
                     "annotations": {"sluice.io/forwarding-mode": "ipip"}},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                 "externalIPs": [service_addr(i).to_string()], "ports": ports},
    }))?;
    services
        .create(&PostParams::default(), &svc)
        .await
        .with_context(|| format!("creating Service {name}"))?;
    let endpoints = if i == 0 {
        probe_endpoints(1)
    } else {
        // Two pods, as a small Deployment's would spread.
        let a = i % nodes;
        let b = (i + 1) % nodes;
        json!([
            endpoint(&format!("10.245.{}.{}", i / 250, i % 250 + 1), a),
            endpoint(&format!("10.246.{}.{}", i / 250, i % 250 + 1), b)
        ])
    };
    let slice_ports: Vec<_> = PORTS
        .iter()
        .map(|p| json!({"name": format!("p{p}"), "port": 8000 + p, "protocol": "TCP"}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": slice_ports,
        "endpoints": endpoints,
    }))?;
    slices
        .create(&PostParams::default(), &slice)
        .await
        .with_context(|| format!("creating EndpointSlice {name}"))?;
    Ok(())
}

/// Runs `f(i)` for every i in `range`, [`CONCURRENCY`] at a time.
async fn concurrently<F, Fut>(range: std::ops::Range<usize>, f: F) -> Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    futures::stream::iter(range.map(f))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
}

// ----- the run -----

/// What every VIP must show once the agent has synced: all nodes live under `Cluster`; the
/// probe's two nodes (or one, while node-1 has no endpoint).
struct Expected {
    /// Live backends by VIP, and the VIP as "address:port" for messages.
    live: HashMap<VipKey, (u32, String)>,
}

impl Expected {
    fn new(size: &Size, down: usize) -> Self {
        let mut live = HashMap::new();
        for s in 0..size.services {
            for port in PORTS {
                let n = if s == 0 { 2 } else { size.nodes - down };
                let name = format!("{}:{port}", service_addr(s));
                live.insert(vip_of(s, port), (n as u32, name));
            }
        }
        Self { live }
    }

    /// `None` when the maps show what is expected, else the first difference and a count.
    fn mismatch(&self, maps: &Maps) -> Result<Option<String>> {
        let held = live_backends(maps)?;
        let mut wrong = 0;
        let mut first = None;
        for (vip, (want, name)) in &self.live {
            let got = held.get(vip).copied();
            if got != Some(*want) {
                wrong += 1;
                first.get_or_insert_with(|| {
                    format!("VIP {name}: {got:?} live backends, expected {want}")
                });
            }
        }
        Ok(first.map(|f| format!("{wrong} of {} VIPs differ, e.g. {f}", self.live.len())))
    }
}

/// Calls `check` (every millisecond) until it answers `None`; fails with its last answer after
/// `timeout`. Returns the time since `since`.
fn poll_until(
    since: Instant,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<String>>,
) -> Result<Duration> {
    loop {
        let Some(why) = check()? else {
            return Ok(since.elapsed());
        };
        ensure!(since.elapsed() < timeout, "after {timeout:?}: {why}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The whole run: lab, API server, objects, agent, figures. Runs `$SLUICE_BIN` or the built
/// `sluice` (see [`crate::lab::sluice_binary`]). Fails when anything is left out of the maps or
/// a change does not reach them within [`CHANGE_TIMEOUT`].
pub fn run(size: Size) -> Result<Figures> {
    ensure!(
        size.nodes >= size.node_burst + 2 && size.services >= 2,
        "a scale run needs 2 nodes besides the burst's and 2 Services: {size:?}"
    );
    let lab = Lab::build(LabConfig {
        backends: 1,
        udp: false,
    })?;
    let gateway = lab.backend_addr(0).to_string();
    lab.exec_ok(
        lab.lb_ns(),
        &["ip", "route", "add", NODE_NET, "via", &gateway],
    )?;
    let kube = Kube::start_many_ports(Some(lab.lb_ns()))?;
    let kubeconfig = kube.agent_kubeconfig()?;
    let admin = kube.admin_kubeconfig(0).to_path_buf();
    let pins = PinLayout::new(lab.pin_dir(), lab.lb_iface());
    let ns = lab.lb_ns().to_owned();
    // The API client, the health and bpftool calls run in the lb namespace with the API server.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Figures> {
            netns::enter(&ns)?;
            block_on(measure(size, &lab, &admin, &kubeconfig, &pins))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the scale run's thread panicked"))?
    })
}

async fn measure(
    size: Size,
    lab: &Lab,
    admin: &Path,
    kubeconfig: &Path,
    pins: &PinLayout,
) -> Result<Figures> {
    let client = api_server::client(admin).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client, NAMESPACE);

    let started = Instant::now();
    concurrently(0..size.nodes, |i| create_node(&nodes, i)).await?;
    concurrently(0..size.services, |i| {
        create_service(&services, &slices, i, size.nodes)
    })
    .await?;
    let created = started.elapsed();
    println!(
        "  {} Nodes, {} Services and their slices created in {:.1} s; starting the agent",
        size.nodes,
        size.services,
        created.as_secs_f64()
    );

    // A fresh node's agent: nothing pinned.
    let started = Instant::now();
    let mut agent = lab.spawn_lb_agent(kubeconfig, HEALTH)?;
    let readyz = wait_ready(&mut agent, HEALTH.parse()?, SYNC_TIMEOUT)?;
    let ready = started.elapsed();
    // Ready: the first full model is applied. Looked at at once (the clock runs); then what it
    // had no room for stays out (fail now: /readyz lists it), and a node that did not resolve
    // yet is retried within seconds.
    let maps = Maps::from_pins(pins)?;
    let all_up = Expected::new(&size, 0);
    let at_ready = all_up.mismatch(&maps)?;
    let mut sync = started.elapsed();
    println!("  agent ready after {:.2} s", ready.as_secs_f64());
    let left_out: Vec<&str> = readyz
        .lines()
        .filter(|l| l.starts_with("left out"))
        .collect();
    ensure!(
        left_out.is_empty(),
        "the agent left {} item(s) or more out of the maps (no room), e.g. {}",
        left_out.len(),
        left_out[0]
    );
    if at_ready.is_some() {
        sync = poll_until(started, ready + CHANGE_TIMEOUT, || all_up.mismatch(&maps))
            .with_context(|| format!("the full sync: {}", log_tail(&agent)))?;
    }
    let (rss, peak_rss) = rss(agent.pid())?;
    let (map_bytes, map_count) = map_memory(pins)?;
    let t0 = Instant::now();
    let text = lb_userspace::http::fetch(METRICS.parse()?, "/metrics", CHANGE_TIMEOUT)
        .context("scraping the agent's /metrics")?;
    let scrape = t0.elapsed();
    let (_, peak_rss_after_scrape) = self::rss(agent.pid())?;

    let applies_before = apply_times(&agent.log_text(), 0).len();
    let (slice_from_sent, slice_from_answer) =
        slice_changes(&slices, &maps, size.slice_changes).await?;
    let slice_applies = apply_times(&agent.log_text(), applies_before);

    // Nodes 2.. (not the probe's): NotReady all at once, then Ready again.
    let burst = 2..2 + size.node_burst;
    let some_down = Expected::new(&size, size.node_burst);
    let t0 = Instant::now();
    futures::future::try_join_all(burst.clone().map(|i| set_ready(&nodes, i, false))).await?;
    let burst_down = poll_until(t0, CHANGE_TIMEOUT, || some_down.mismatch(&maps))
        .context("the burst of NotReady nodes")?;
    let t0 = Instant::now();
    futures::future::try_join_all(burst.map(|i| set_ready(&nodes, i, true))).await?;
    let burst_up = poll_until(t0, CHANGE_TIMEOUT, || all_up.mismatch(&maps))
        .context("the burst of nodes Ready again")?;

    agent.stop(Duration::from_secs(10))?;
    Ok(Figures {
        size,
        created,
        ready,
        sync,
        at_ready,
        rss,
        peak_rss,
        map_bytes,
        maps: map_count,
        slice_from_sent,
        slice_from_answer,
        slice_applies,
        burst_down,
        burst_up,
        scrape,
        scrape_bytes: text.len(),
        peak_rss_after_scrape,
    })
}

/// `changes` changes of the probe's slice, each timed until its VIP's live backends follow:
/// node-1's endpoints go (1 live node) and come back (2), one change at a time.
async fn slice_changes(
    slices: &Api<EndpointSlice>,
    maps: &Maps,
    changes: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let vip = vip_of(0, PORTS[0]);
    let mut from_sent = Vec::new();
    let mut from_answer = Vec::new();
    for c in 0..changes {
        // 0, 1, 0, 2, 0, 3 ... endpoints on node-1.
        let on_node1 = if c % 2 == 0 { 0 } else { 1 + (c / 2) % 3 };
        let live = if on_node1 == 0 { 1 } else { 2 };
        let patch = json!({"endpoints": probe_endpoints(on_node1)});
        let sent = Instant::now();
        slices
            .patch(
                &service_name(0),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .context("patching the probe's EndpointSlice")?;
        let answered = Instant::now();
        let took = poll_until(sent, CHANGE_TIMEOUT, || {
            let got = live_backends_of(maps, &vip)?;
            Ok((got != Some(live)).then(|| {
                format!("change {c}: the probe VIP has {got:?} live backends, expected {live}")
            }))
        })?;
        from_sent.push(took);
        from_answer.push(took.saturating_sub(answered - sent));
        // Apart from each other, so that every change is its own burst.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((from_sent, from_answer))
}
