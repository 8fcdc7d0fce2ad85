//! The agent's figures for `cargo xtask bench`, against a real kube-apiserver in the namespace
//! lab (the lab's backends are the nodes):
//! - EndpointSlice change -> map update: from just before the PATCH is sent to the API server
//!   until the node's weight in the BACKENDS map has the new value (polled every 100 µs);
//! - full sync: from starting a fresh agent (no pinned state) until it reports ready with every
//!   VIP of N Services x 10 endpoints in the maps;
//! - the agent's RSS (and peak) after that sync.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use lb_common::backend_state;
use lb_userspace::dataplane::{Maps, PinLayout};
use lb_userspace::reconcile::raw_addr;
use serde_json::json;
use sluice_tests::kube::Kube;
use sluice_tests::{Lab, LabConfig, SluiceProcess, netns, require_root};

const HEALTH: &str = "127.0.0.1:9941";
const NODES: usize = 3;
const ENDPOINTS_PER_SERVICE: usize = 10;

pub fn run(changes: usize, services: usize) -> Result<()> {
    require_root();
    // Figures of the optimised agent, as deployed: the lab runs $SLUICE_BIN.
    crate::cargo(&[
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bin",
        "sluice",
    ])?;
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/sluice");
    // SAFETY: no other thread runs yet (the lab and the API server start below), so nothing
    // reads the environment concurrently.
    unsafe { std::env::set_var("SLUICE_BIN", &bin) };
    println!(
        "\nagent: real kube-apiserver 1.20 + etcd in the lab's lb namespace, {NODES} nodes, agent with its ServiceAccount"
    );
    let lab = Lab::build(LabConfig {
        backends: NODES,
        udp: false,
    })?;
    let kube = Kube::start(Some(lab.lb_ns()))?;
    for i in 0..NODES {
        kube.node(&format!("node-{i}"), lab.backend_addr(i), true)?;
    }
    let kubeconfig = kube.agent_kubeconfig()?;
    let admin = kube.admin_kubeconfig(0).to_path_buf();
    let pins = PinLayout::new(lab.pin_dir(), lab.lb_iface());
    let start_agent = || -> Result<SluiceProcess> {
        lab.spawn_sluice(&[
            "agent",
            "--iface",
            lab.lb_iface(),
            "--kubeconfig",
            &kubeconfig.to_string_lossy(),
            "--health-addr",
            HEALTH,
        ])
    };

    let mut agent = start_agent()?;
    // The API client and the health probe run in the lb namespace, where the API server is.
    let ns = lab.lb_ns().to_owned();
    let small = std::thread::scope(|s| {
        s.spawn(|| -> Result<Latencies> {
            netns::enter(&ns)?;
            wait_ready(&mut agent, Duration::from_secs(60))?;
            block_on(async {
                let client = client(&admin).await?;
                create_service(&client, 0).await?;
                latencies(&client, &pins, &lab, changes).await
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
    })?;
    report_latencies("1 Service", &small, &apply_times(&agent.log_text(), 1));

    println!("creating {services} Services x {ENDPOINTS_PER_SERVICE} endpoints ...");
    let created = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            netns::enter(&ns)?;
            block_on(async {
                let client = client(&admin).await?;
                create_many(&client, 1..services).await
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
    })?;
    println!("  created in {:.1?}", created.elapsed());

    // A fresh node: no agent, nothing pinned; then time the agent from start to ready.
    agent.stop(Duration::from_secs(10))?;
    lab.detach()?;
    let started = Instant::now();
    let mut agent = start_agent()?;
    let (sync, big) = std::thread::scope(|s| {
        s.spawn(|| -> Result<(Duration, Latencies)> {
            netns::enter(&ns)?;
            wait_ready(&mut agent, Duration::from_secs(300))?;
            let sync = started.elapsed();
            let maps = Maps::from_pins(&pins)?;
            let vips = maps.read_vips()?.len();
            ensure!(
                vips == services,
                "after the sync the maps hold {vips} VIPs, expected {services}"
            );
            let big = block_on(async {
                let client = client(&admin).await?;
                latencies(&client, &pins, &lab, changes).await
            })?;
            Ok((sync, big))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the benchmark thread panicked"))?
    })?;
    let (rss, peak) = rss(agent.pid())?;
    println!(
        "full sync, {services} Services x {ENDPOINTS_PER_SERVICE} endpoints ({services} VIPs, fresh agent start to ready): {:.2} s  (target < 5 s)",
        sync.as_secs_f64()
    );
    println!(
        "agent memory after the sync: RSS {:.1} MB, peak {:.1} MB  (target < 100 MB)",
        rss as f64 / 1e6,
        peak as f64 / 1e6
    );
    let log = agent.log_text();
    if let Some(first) = apply_times(&log, 0).first() {
        println!(
            "  of which the first apply (attach, {services} VIPs, model -> maps): {:.2} s",
            first.as_secs_f64()
        );
    }
    report_latencies(&format!("{services} Services"), &big, &apply_times(&log, 1));
    agent.stop(Duration::from_secs(10))?;
    lab.detach()?;
    Ok(())
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?
        .block_on(f)
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(Client::try_from(config)?)
}

/// Service `bench-i`: externalTrafficPolicy Local, one address of its own, port 80.
fn vip_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// Endpoints of slice `bench-i`: `per_node[n]` ready endpoints on node-n.
fn endpoints(i: usize, per_node: &[usize]) -> serde_json::Value {
    let mut eps = Vec::new();
    for (n, count) in per_node.iter().enumerate() {
        for k in 0..*count {
            eps.push(json!({
                "addresses": [format!("10.{}.{}.{}", 100 + n, i % 250, k + 1)],
                "nodeName": format!("node-{n}"),
                "conditions": {"ready": true, "serving": true, "terminating": false},
            }));
        }
    }
    serde_json::Value::Array(eps)
}

async fn create_service(client: &Client, i: usize) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let name = format!("bench-{i}");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "externalIPs": [vip_of(i).to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))?;
    services
        .create(&PostParams::default(), &svc)
        .await
        .with_context(|| format!("creating Service {name}"))?;
    // 10 endpoints over the nodes, as a Deployment's pods would spread.
    let mut per_node = vec![0; NODES];
    for k in 0..ENDPOINTS_PER_SERVICE {
        per_node[(i + k) % NODES] += 1;
    }
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(i, &per_node),
    }))?;
    slices
        .create(&PostParams::default(), &slice)
        .await
        .with_context(|| format!("creating EndpointSlice {name}"))?;
    Ok(())
}

async fn create_many(client: &Client, range: std::ops::Range<usize>) -> Result<()> {
    let ids: Vec<usize> = range.collect();
    // 32 requests in flight: the API server's pace, not the client's.
    for chunk in ids.chunks(32) {
        futures::future::try_join_all(chunk.iter().map(|&i| create_service(client, i))).await?;
    }
    Ok(())
}

/// Per change: from the PATCH sent, and from the API server's answer (the change is stored).
#[derive(Default)]
struct Latencies {
    from_sent: Vec<Duration>,
    from_answer: Vec<Duration>,
}

/// The agent's own "maps updated in X" times (model -> maps) from its log, after `skip` lines.
fn apply_times(log: &str, skip: usize) -> Vec<Duration> {
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

/// Changes node-1's endpoint count in slice `bench-0` `changes` times and times each until its
/// weight in the BACKENDS map follows.
async fn latencies(
    client: &Client,
    pins: &PinLayout,
    lab: &Lab,
    changes: usize,
) -> Result<Latencies> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let maps = wait_maps(pins).await?;
    let node1 = raw_addr(lab.backend_addr(1).into()).0;
    let vip = lb_userspace::reconcile::vip_key(&lb_userspace::model::VipAddr {
        addr: vip_of(0).into(),
        port: 80,
        protocol: lb_userspace::model::Protocol::Tcp,
    });
    let id = find_backend(&maps, node1).await?;
    let mut out = Latencies::default();
    for c in 0..changes {
        let count = 1 + (c % 4) + usize::from(c % 4 == 3); // 1,2,3,5,...: always a change
        let patch = json!({"endpoints": endpoints(0, &[1, count, 0])});
        let t0 = Instant::now();
        slices
            .patch("bench-0", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("patching EndpointSlice bench-0")?;
        let answered = Instant::now();
        loop {
            let weight = match maps.vip(&vip)? {
                Some(info) => maps.member_weight(info.table, id)?,
                None => None,
            };
            if weight == Some(count as u32) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("change {c}: node-1's weight is {weight:?} after 10 s, expected {count}");
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        out.from_sent.push(t0.elapsed());
        out.from_answer.push(answered.elapsed());
        // Apart from each other, so every change is its own burst.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    Ok(out)
}

async fn wait_maps(pins: &PinLayout) -> Result<Maps> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if pins.has_maps() {
            return Maps::from_pins(pins);
        }
        ensure!(Instant::now() < deadline, "no maps pinned after 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The BACKENDS entry of `addr`, once the agent has written it.
async fn find_backend(maps: &Maps, addr: lb_common::Addr) -> Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, v) in maps.read_backends()?.into_iter().enumerate() {
            if v.state != backend_state::EMPTY && v.addr == addr {
                return Ok(i as u32);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "node-1 never appeared in the BACKENDS map"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the agent's /readyz (from inside the lb namespace) until it answers 200.
fn wait_ready(agent: &mut SluiceProcess, timeout: Duration) -> Result<()> {
    let addr: SocketAddr = HEALTH.parse()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = agent.try_wait()? {
            bail!("the agent exited ({status}): {}", agent.log_text());
        }
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let _ = c.write_all(b"GET /readyz HTTP/1.0\r\n\r\n");
            let mut answer = String::new();
            let _ = c.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the agent is not ready after {timeout:?}: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// (VmRSS, VmHWM) of a process, in bytes.
fn rss(pid: u32) -> Result<(u64, u64)> {
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

fn report_latencies(what: &str, l: &Latencies, applies: &[Duration]) {
    report(
        &format!("EndpointSlice change -> map update, {what}, from the PATCH sent"),
        &l.from_sent,
    );
    report(
        &format!("EndpointSlice change -> map update, {what}, from the PATCH answered"),
        &l.from_answer,
    );
    report(
        &format!("  agent-side model -> maps (its log), {what}"),
        applies,
    );
}

fn report(what: &str, samples: &[Duration]) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        println!("{what}: no samples");
        return;
    }
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "{what}: {} samples, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
}
