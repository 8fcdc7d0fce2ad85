//! BGP over IPv6 with a real router (issue 29): the speaker (the agent's, as a library, no
//! Kubernetes) in a node namespace peers with FRR over IPv6 with BFD, and announces an IPv6 VIP
//! and an IPv4 one. The IPv6 /128 reaches FRR's IPv6 table with the node's IPv6 address as next
//! hop, and zebra installs it in the router's kernel; the IPv4 VIP is not sent over the IPv6
//! session (it has no IPv4 next hop there). `/bgp`'s view shows the session established with
//! its one prefix and BFD up. Needs root and frr.
//!
//! ```text
//!   lb ns: FRR (fd5c:..::2)  <-- BGP + BFD over IPv6 --  node 0 ns: the speaker (fd5c:..::10)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use lb_userspace::bgp::{self, BgpMetrics, Intent, Peer, Speaker, SpeakerConfig};
use serde_json::Value;
use sluice_tests::bgp_lab::{NODE_ASN, ROUTER_ASN, Router, RouterKind, RouterOptions};
use sluice_tests::lab::{Lab, LabConfig};
use sluice_tests::{netns, require_root};
use tokio::sync::watch;

/// The session and its first routes.
const CONVERGE: Duration = Duration::from_secs(60);

/// The speaker on a thread of its own inside the node's namespace; stopped on drop.
struct Node {
    metrics: BgpMetrics,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl Node {
    fn start(ns: &str, config: SpeakerConfig, intent: Intent) -> Result<Node> {
        let metrics = config.metrics.clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = netns::spawn_in(ns, "bgp-node", move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let (_ready_tx, ready) = watch::channel(true);
            let speaker = Speaker::start(config, ready, rt.handle())?;
            speaker.set(intent);
            let _ = stopped.recv();
            rt.block_on(speaker.shutdown());
            Ok(())
        })?;
        Ok(Node {
            metrics,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls until `f` answers `Some`, or fails after [`CONVERGE`] with `what` and the last state.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<(T, Duration)> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok((v, t0.elapsed()));
        }
        if t0.elapsed() > CONVERGE {
            bail!("{what}: not within {CONVERGE:?}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The gateways of the router kernel's route to `addr` (`ip -j route`).
fn kernel_gateways(lab: &Lab, addr: IpAddr) -> Result<BTreeSet<IpAddr>> {
    let family = if addr.is_ipv6() { "-6" } else { "-4" };
    let out = lab.exec_ok(
        lab.lb_ns(),
        &["ip", family, "-j", "route", "show", &addr.to_string()],
    )?;
    let routes: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(routes
        .iter()
        .flat_map(|r| {
            let one = r["gateway"].as_str().into_iter();
            let many = r["nexthops"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| h["gateway"].as_str());
            one.chain(many)
        })
        .filter_map(|g| g.parse().ok())
        .collect())
}

#[test]
fn ipv6_vip_announced_over_an_ipv6_session_with_bfd_reaches_frrs_ipv6_table() -> Result<()> {
    require_root();
    let lab = Lab::build(LabConfig {
        backends: 1,
        udp: false,
    })?;
    lab.enable_ipv6()?;
    let (node4, node6) = (lab.backend_addr(0), lab.backend_addr6(0));
    let router = Router::start_with(
        RouterKind::Frr,
        lab.lb_ns(),
        lab.lb_addr(),
        &[],
        &RouterOptions {
            ipv6_nodes: vec![node6],
            ..RouterOptions::default()
        },
        lab.dir(),
    )?;
    let mut peer = Peer::new(lab.lb_addr6().into(), 179, ROUTER_ASN);
    peer.options.bfd = true;
    let config = SpeakerConfig::new(
        NODE_ASN,
        node4,
        vec![peer],
        3,
        Vec::new(),
        Duration::from_secs(1),
    )
    .map_err(anyhow::Error::msg)?;
    let (vip6, vip4): (IpAddr, IpAddr) = (lab.vip6().into(), lab.vip().into());
    let node = Node::start(
        lab.backend_ns(0),
        config,
        Intent {
            addrs: BTreeSet::from([vip6, vip4]),
            drain: None,
            adverts: BTreeMap::new(),
        },
    )?;

    // FRR's IPv6 table: the /128 via the node's IPv6 address, installed in the kernel.
    let (hops, took) = wait_for("the IPv6 VIP in FRR's IPv6 table", || {
        let hops = router.frr_installed_nexthops(vip6)?;
        Ok((!hops.is_empty()).then_some(hops))
    })
    .with_context(|| router.diagnostics())?;
    println!("{vip6}/128 in FRR's IPv6 table after {took:?}, next hops {hops:?}");
    ensure!(
        hops == BTreeSet::from([IpAddr::V6(node6)]),
        "next hops {hops:?}, not the node's {node6}"
    );
    let (kernel, _) = wait_for("the IPv6 VIP in the router's kernel", || {
        let g = kernel_gateways(&lab, vip6)?;
        Ok((!g.is_empty()).then_some(g))
    })?;
    ensure!(
        kernel == BTreeSet::from([IpAddr::V6(node6)]),
        "kernel route to {vip6}: gateways {kernel:?}"
    );

    // The session as `/bgp` shows it: established, one prefix (the IPv4 VIP has no IPv4 next
    // hop on this session), BFD up over IPv6.
    let (view, _) = wait_for("/bgp: established, BFD up", || {
        let v = bgp::view::view(Some(&node.metrics));
        let json = serde_json::to_value(&v)?;
        let p = &json["peers"][0];
        Ok((p["state"] == "established" && p["bfd"] == "up").then(|| json.clone()))
    })?;
    let p = &view["peers"][0];
    ensure!(
        p["address"] == lab.lb_addr6().to_string() && p["prefixes_announced"] == 1,
        "/bgp: {p}"
    );
    ensure!(
        router.frr_installed_nexthops(vip4)?.is_empty(),
        "the IPv4 VIP reached FRR over the IPv6 session"
    );
    println!("/bgp: {p}");
    drop(node);
    Ok(())
}
