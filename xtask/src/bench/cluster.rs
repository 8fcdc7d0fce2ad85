//! The cluster path: client → node → kube-proxy → pod on a real multi-node cluster
//! ([`sluice_tests::cluster`]), with sluice deployed as its users deploy it, beside kube-proxy
//! alone on the same cluster: the comparison a user makes.
//!
//! 1. Three nodes; `kubectl apply -k deploy/overlays/beside-metallb` with the image built offline; a Deployment of web
//!    pods (two per node, busybox httpd) behind a `type: LoadBalancer` Service
//!    (`externalTrafficPolicy: Cluster`) whose ingress IP is set as MetalLB's IPAM would; the
//!    client routes the VIP to node-0 (as a BGP router would).
//! 2. **sluice**: node-0's agent balances each new connection to a node (itself included) with
//!    XDP; that node's kube-proxy takes it on to a pod. k6 from the client, a fixed concurrency,
//!    one HTTP request per new TCP connection ([`super::conn::run_k6`], the lab's measuring core).
//! 3. **kube-proxy alone**: the DaemonSet deleted and `sluice detach --iface eth0` on every node
//!    (the agent leaves its program pinned on purpose, so that a restart drops no flow); node-0's
//!    kube-proxy now takes the VIP itself (its rules for the Service's ingress IP) and DNATs to
//!    any pod. Same k6 run.
//!
//! The cluster is torn down on return (also on error): [`Cluster`]'s Drop.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use sluice_tests::cluster::{self, Cluster, ClusterConfig};
use sluice_tests::image;
use sluice_tests::kube::{AGENT_NAMESPACE, repo_root};
use sluice_tests::lab::sluice_binary;

use super::Plan;
use super::conn::{ConnStep, Load, run_k6};

const NODES: usize = 3;
const PODS_PER_NODE: usize = 2;
/// Off the segment: the client routes it to node-0.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 80, 1, 20);
const SERVICE: &str = "web-bench";

/// Both rows of the section.
#[derive(Debug, Clone, Default)]
pub struct ClusterResult {
    pub nodes: usize,
    pub pods: usize,
    pub concurrency: u32,
    pub window: Duration,
    /// client → node-0 (sluice, XDP) → a node's kube-proxy → pod.
    pub sluice: Option<ConnStep>,
    /// client → node-0 (kube-proxy) → pod, sluice detached.
    pub kube_proxy: Option<ConnStep>,
    /// SYNs to the VIP from the client during each window (sluice, kube-proxy alone), and
    /// how many of them node-0 sent on to another node still addressed to the VIP (sluice's
    /// L2 forwarding; kube-proxy's DNAT rewrites the address): counted on the segment's bridge.
    /// The proof of which balancer took the connections.
    pub syns: [Option<(u64, u64)>; 2],
    /// What failed, if anything (the rows measured before it stay).
    pub errors: Vec<String>,
    /// Cluster start to teardown.
    pub elapsed: Duration,
}

impl ClusterResult {
    /// sluice's new connections/s ÷ kube-proxy alone's.
    pub fn conn_ratio(&self) -> Option<f64> {
        let (s, k) = (self.sluice.as_ref()?, self.kube_proxy.as_ref()?);
        (k.ok_per_s > 0.0).then(|| s.ok_per_s / k.ok_per_s)
    }
    /// sluice's p99 ÷ kube-proxy alone's.
    pub fn p99_ratio(&self) -> Option<f64> {
        let (s, k) = (self.sluice.as_ref()?, self.kube_proxy.as_ref()?);
        (k.p99_ms > 0.0).then(|| s.p99_ms / k.p99_ms)
    }
}

/// Runs the section; failures are recorded in the result, which is always returned.
pub fn run(plan: &Plan) -> ClusterResult {
    let started = Instant::now();
    let mut r = ClusterResult {
        nodes: NODES,
        pods: NODES * PODS_PER_NODE,
        concurrency: plan.cluster_concurrency,
        window: plan.cluster_window,
        ..Default::default()
    };
    if let Err(e) = measure(plan, &mut r) {
        eprintln!("[bench]   cluster section failed: {e:#}");
        r.errors.push(format!("{e:#}"));
    }
    r.elapsed = started.elapsed();
    r
}

fn measure(plan: &Plan, r: &mut ClusterResult) -> Result<()> {
    let tag = image::default_tag();
    eprintln!("[bench]   building the images (sluice:{tag}, web)");
    let sluice = image::build_sluice_image_from_source(tag)?;
    let web = image::build_web_image(cluster::WEB_TAG)?;
    eprintln!("[bench]   starting a {NODES}-node cluster (waits for any other cluster run)");
    let c = Cluster::start(ClusterConfig {
        nodes: NODES,
        images: vec![sluice, web],
    })?;
    deploy(&c, tag)?;
    tune_client(&c)?;
    c.route_vip_via(VIP, 0)?;
    let conv = c.wait_for(
        "every pod answering through sluice on node-0",
        Duration::from_secs(120),
        || Ok(pods_answering(&c)? == NODES * PODS_PER_NODE),
    )?;
    eprintln!(
        "[bench]   path converged after {:.1} s (client -> sluice on node-0 -> kube-proxy -> {} pods)",
        conv.as_secs_f64(),
        NODES * PODS_PER_NODE
    );
    ensure!(
        xdp_attached(&c, 0)?,
        "no XDP program on node-0's eth0: sluice is not in the path"
    );
    let (row, syns) = measure_row(&c, plan, "sluice")?;
    r.sluice = Some(row);
    r.syns[0] = Some(syns);
    ensure!(
        syns.1 > 0,
        "node-0 sent no SYN to the VIP on to another node: sluice was not balancing"
    );

    eprintln!("[bench]   removing sluice: DaemonSet deleted, `sluice detach` on every node");
    remove_sluice(&c)?;
    let conv = c.wait_for(
        "every pod answering through kube-proxy on node-0",
        Duration::from_secs(60),
        || Ok(pods_answering(&c)? == NODES * PODS_PER_NODE),
    )?;
    eprintln!(
        "[bench]   kube-proxy alone answers after {:.1} s",
        conv.as_secs_f64()
    );
    let (row, syns) = measure_row(&c, plan, "kube-proxy")?;
    r.kube_proxy = Some(row);
    r.syns[1] = Some(syns);
    eprintln!("[bench]   tearing the cluster down");
    drop(c);
    Ok(())
}

/// A warm-up run, then the measured window; with (SYNs to the VIP from the client, those node-0
/// sent on to other nodes still to the VIP) during the window.
fn measure_row(c: &Cluster, plan: &Plan, name: &str) -> Result<(ConnStep, (u64, u64))> {
    let url = format!("http://{VIP}:80/");
    let load = Load::Concurrency(plan.cluster_concurrency);
    run_k6(
        c.client_ns(),
        &url,
        load,
        Duration::from_secs(3),
        c.dir(),
        &format!("cluster-{name}-warmup"),
    )?;
    c.count_vip_frames(VIP)?;
    let s = run_k6(
        c.client_ns(),
        &url,
        load,
        plan.cluster_window,
        c.dir(),
        &format!("cluster-{name}"),
    )?;
    let client_syns = c.vip_frames()?.get("sw-c").map_or(0, |f| f.1);
    let out = c.vip_syns_out()?;
    let on: u64 = (1..c.nodes())
        .map(|i| out.get(c.node_port(i)).copied().unwrap_or(0))
        .sum();
    eprintln!(
        "[bench]   {name:<10} {} at once: {:>7.0} conn/s, p50 {:.2} ms, p99 {:.2} ms, errors {} ({}); \
         SYNs to the VIP: {client_syns} from the client, {on} sent on by node-0 to other nodes",
        plan.cluster_concurrency,
        s.ok_per_s,
        s.p50_ms,
        s.p99_ms,
        s.error_total(),
        s.error_kinds()
    );
    Ok((s, (client_syns, on)))
}

/// `kubectl apply -k deploy/overlays/beside-metallb` (the image just built), the web pods and the Service, its ingress
/// IP set; returns when the agents and the pods are ready.
fn deploy(c: &Cluster, tag: &str) -> Result<()> {
    let deploy = repo_root().join("deploy/overlays/beside-metallb");
    c.kubectl(&["apply", "-k", &deploy.to_string_lossy()])?;
    c.kubectl(&[
        "set",
        "image",
        "-n",
        AGENT_NAMESPACE,
        "daemonset/sluice-agent",
        &format!("agent={}:{tag}", image::SLUICE_IMAGE),
    ])?;
    c.kube().apply_yaml(&format!(
        "{}{}",
        cluster::web_deployment(NODES * PODS_PER_NODE),
        cluster::lb_service(SERVICE, "Cluster", "")
    ))?;
    c.set_ingress(SERVICE, VIP)?;
    let t = c.wait_for(
        "agent pods ready on every node",
        Duration::from_secs(120),
        || {
            let pods = c.pods(AGENT_NAMESPACE, "app.kubernetes.io/name%3Dsluice")?;
            Ok(pods.iter().filter(|p| cluster::pod_ready(p)).count() == NODES)
        },
    )?;
    eprintln!(
        "[bench]   sluice agents ready after {:.1} s",
        t.as_secs_f64()
    );
    let t = c.wait_for("web pods ready", Duration::from_secs(90), || {
        let pods = c.pods("default", "app%3Dweb")?;
        Ok(pods.iter().filter(|p| cluster::pod_ready(p)).count() == NODES * PODS_PER_NODE)
    })?;
    eprintln!(
        "[bench]   {} web pods ready after {:.1} s",
        NODES * PODS_PER_NODE,
        t.as_secs_f64()
    );
    Ok(())
}

/// The client as the lab's: ports 1024-65000 and tcp_tw_reuse, so that its own TIME_WAIT
/// sockets never run it out of source ports during a window.
fn tune_client(c: &Cluster) -> Result<()> {
    sluice_tests::cmd::sh(&[
        "ip",
        "netns",
        "exec",
        c.client_ns(),
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ])?;
    Ok(())
}

/// How many distinct pods answered 48 new connections to the VIP (the path works end to end
/// when all of them do).
fn pods_answering(c: &Cluster) -> Result<usize> {
    let (bodies, failed) = c.curl(VIP, 80, "/cgi-bin/who", 48)?;
    if failed > 0 {
        return Ok(0);
    }
    let pods: std::collections::BTreeSet<&str> = bodies
        .iter()
        .filter_map(|b| b.split_whitespace().find_map(|w| w.strip_prefix("pod=")))
        .collect();
    Ok(pods.len())
}

/// Whether node `i`'s eth0 has an XDP program.
fn xdp_attached(c: &Cluster, i: usize) -> Result<bool> {
    let out = c.node_exec(i, &["ip", "-d", "link", "show", "dev", cluster::IFACE])?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
}

/// Deletes the DaemonSet (waits for its pods to go), then detaches the pinned program on every
/// node, and checks that no node's eth0 has XDP left.
fn remove_sluice(c: &Cluster) -> Result<()> {
    c.kubectl(&[
        "delete",
        "daemonset",
        "-n",
        AGENT_NAMESPACE,
        "sluice-agent",
        "--wait=false",
    ])?;
    c.wait_for("agent pods gone", Duration::from_secs(60), || {
        Ok(c.pods(AGENT_NAMESPACE, "app.kubernetes.io/name%3Dsluice")?
            .is_empty())
    })?;
    let bin = sluice_binary()?;
    let bin = path_str(&bin)?;
    for i in 0..c.nodes() {
        c.node_exec(i, &[bin, "detach", "--iface", cluster::IFACE])
            .with_context(|| format!("sluice detach on {}", c.node_name(i)))?;
        ensure!(
            !xdp_attached(c, i)?,
            "{}'s eth0 still has an XDP program after `sluice detach`",
            c.node_name(i)
        );
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
