//! The agent's figures for `cargo xtask bench`, against a real kube-apiserver in the namespace
//! lab (the lab's backends are the nodes):
//! - EndpointSlice change -> map update: from just before the PATCH is sent to the API server
//!   until the node's weight in the BACKENDS map has the new value (polled every 100 µs);
//! - full sync: from starting a fresh agent (no pinned state) until it reports ready with every
//!   VIP of N Services x 10 endpoints in the maps;
//! - the agent's RSS (and peak) after that sync.

use std::net::Ipv4Addr;
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
use sluice_tests::kube::{Kube, client as kube_client};
use sluice_tests::scale::{apply_times, block_on, percentiles, rss, wait_ready};
use sluice_tests::{Lab, LabConfig, netns, require_root};

const HEALTH: &str = "127.0.0.1:9941";
const NODES: usize = 3;
const ENDPOINTS_PER_SERVICE: usize = 10;

pub fn run(changes: usize, services: usize) -> Result<()> {
    require_root();
    use_release_sluice()?;
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
    let start_agent = || lab.spawn_lb_agent(&kubeconfig, HEALTH);

    let mut agent = start_agent()?;
    // The API client and the health probe run in the lb namespace, where the API server is.
    let ns = lab.lb_ns().to_owned();
    let small = std::thread::scope(|s| {
        s.spawn(|| -> Result<Latencies> {
            netns::enter(&ns)?;
            wait_ready(&mut agent, HEALTH.parse()?, Duration::from_secs(60))?;
            block_on(async {
                let client = kube_client(&admin).await?;
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
                let client = kube_client(&admin).await?;
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
            wait_ready(&mut agent, HEALTH.parse()?, Duration::from_secs(300))?;
            let sync = started.elapsed();
            let maps = Maps::from_pins(&pins)?;
            let vips = maps.read_vips()?.len();
            ensure!(
                vips == services,
                "after the sync the maps hold {vips} VIPs, expected {services}"
            );
            let big = block_on(async {
                let client = kube_client(&admin).await?;
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

/// Figures of the optimised agent, as deployed: builds the release `sluice` and makes the lab
/// run it ($SLUICE_BIN). Call it before any thread starts.
pub fn use_release_sluice() -> Result<()> {
    crate::cargo(&[
        "build",
        "--release",
        "--package",
        "lb-userspace",
        "--bin",
        "sluice",
    ])?;
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/sluice");
    // SAFETY: no other thread runs yet (the lab and the API server start after), so nothing
    // reads the environment concurrently.
    unsafe { std::env::set_var("SLUICE_BIN", &bin) };
    Ok(())
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
    println!("{what}: {}", percentiles(samples));
}
