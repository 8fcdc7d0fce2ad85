//! Packet rate: UDP with 64-byte payloads over many flows, from a generator of our own.
//!
//! The generator is `sluice_pktgen` (lb-ebpf/src/pktgen.rs) run with BPF_PROG_TEST_RUN in
//! live-frames mode from a thread in the client namespace: the kernel copies one prebuilt frame
//! into page-pool pages, the program stamps the next source port of a cycle and returns XDP_TX,
//! and the kernel transmits each frame out of the client's veth, a real frame on the lab's
//! wire (it restores the frame's headers each time: recycled pages keep what later hops wrote).
//! No user-space copy and no socket: a few Mpps from one core. At a fixed offered rate the
//! thread paces itself in ~1 ms chunks; at the maximum it sends as fast as the path takes them.
//!
//! Every backend counts and drops the UDP 5353 datagrams at its veth's ingress (nft netdev
//! hook, before IP): the forwarded rate is what reached the backends, whatever the contender
//! did to the addresses. CPU: the whole host's busy time from /proc/stat over the window (the
//! generator and every hop run in softirq on these 2 cores, so this is the path's cost), the
//! lb namespace's processes' own CPU time (the proxies), and for sluice the XDP program's own
//! run time from `kernel.bpf_stats_enabled`.

use std::fs;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::maps::Array;
use lb_userspace::dataplane;
use sluice_tests::pktgen::{self, parse_mac};
use sluice_tests::{Lab, UDP_PORT, fixtures::Frame};

use super::Plan;
use super::contenders::{Active, Kind};

/// The first source port of the generator's flows.
const FIRST_PORT: u32 = 10000;
/// The nft table on each backend that counts (and drops) the generator's datagrams.
const COUNT_TABLE: &str = "sluicebench";

/// One measured window.
#[derive(Debug, Clone, Default)]
pub struct PpsRun {
    /// Offered rate (packets/s); None = as fast as possible.
    pub offered: Option<u64>,
    pub seconds: f64,
    /// Frames the generator handed to the kernel.
    pub generated: u64,
    /// Frames that left the client (its peer's rx counter).
    pub on_wire: u64,
    /// Datagrams counted at the backends (or leaving the lb, for [`Inject::LbPort`]).
    pub forwarded: u64,
    pub per_backend: Vec<u64>,
    /// Whole-host busy CPU time per forwarded packet (ns).
    pub host_cpu_ns_per_pkt: f64,
    /// CPU of the processes in the lb namespace per forwarded packet (ns); proxies only.
    pub proc_cpu_ns_per_pkt: f64,
    /// sluice's XDP program run time per packet it ran on (ns), from bpf_stats.
    pub xdp_ns_per_pkt: Option<f64>,
    /// Which generator sent the window's frames (live frames, or raw sockets where refused).
    pub generator: String,
}

impl PpsRun {
    pub fn forwarded_pps(&self) -> f64 {
        self.forwarded as f64 / self.seconds.max(1e-9)
    }
    pub fn wire_pps(&self) -> f64 {
        self.on_wire as f64 / self.seconds.max(1e-9)
    }
    /// Whole-host busy CPU time per generated frame (for traffic nothing counts downstream).
    pub fn host_cpu_ns_per_generated(&self) -> f64 {
        self.host_cpu_ns_per_pkt * self.forwarded.max(1) as f64 / self.generated.max(1) as f64
    }
}

#[derive(Debug, Clone, Default)]
pub struct Pps {
    pub fixed: PpsRun,
    pub max: PpsRun,
    /// At the maximum, injected straight into the lb's port and counted as it leaves the lb
    /// (see [`Inject::LbPort`], [`EgressCounters`]); the last per-backend entry counts
    /// datagrams sent to no backend's MAC.
    pub port_max: Option<PpsRun>,
}

/// Where the generator's frames enter the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inject {
    /// Out of the client's veth: through the bridge, like every other client packet. The
    /// frames reach the lb as socket buffers the bridge already built.
    Client,
    /// Out of the lb's switch port, straight into the lb's veth: the frames arrive as raw XDP
    /// frames, as from a NIC's ring (the lb's veth has GRO on, i.e. NAPI, to take them without
    /// an XDP program). The kernel stack then builds the socket buffer itself, and XDP runs
    /// before that, as on real hardware.
    LbPort,
}

impl Inject {
    /// (namespace, interface) the generator sends out of, and where "left" is counted.
    fn place(self, lab: &Lab) -> (String, String) {
        match self {
            Inject::Client => (lab.client_ns().into(), sluice_tests::lab::NS_IFACE.into()),
            Inject::LbPort => (lab.switch_ns().into(), lab.lb_peer_iface().into()),
        }
    }
}

/// Installs the counters on every backend (they stay until the lab goes).
pub fn install_backend_counters(lab: &Lab) -> anyhow::Result<()> {
    let rules = format!(
        "table netdev {COUNT_TABLE} {{
  counter pktgen_rx {{ }}
  chain ingress {{
    type filter hook ingress device \"{dev}\" priority -500; policy accept;
    udp dport {UDP_PORT} counter name pktgen_rx drop
  }}
}}
",
        dev = sluice_tests::lab::NS_IFACE
    );
    let path = lab.dir().join("bench-backend-counters.nft");
    fs::write(&path, rules)?;
    for i in 0..lab.backends() {
        lab.exec_ok(lab.backend_ns(i), &["nft", "-f", &path.to_string_lossy()])?;
    }
    Ok(())
}

fn backend_counts(lab: &Lab) -> anyhow::Result<Vec<u64>> {
    (0..lab.backends())
        .map(|i| {
            let out = lab.exec_ok(
                lab.backend_ns(i),
                &[
                    "nft",
                    "-j",
                    "list",
                    "counter",
                    "netdev",
                    COUNT_TABLE,
                    "pktgen_rx",
                ],
            )?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            v["nftables"]
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .find_map(|i| i.get("counter")?.get("packets")?.as_u64())
                })
                .ok_or_else(|| anyhow!("no counter in `nft -j list counter` of backend {i}"))
        })
        .collect()
}

/// While it lives: `sluice_pktcount` in place of the XDP_PASS program on the lb's switch port
/// (swapped into the lab's pinned link, and swapped back on drop). It counts the generator's
/// datagrams the lb sends out, by destination MAC, and drops them: with frames injected into the
/// lb's port, little but the load balancer then shares its CPU (see [`Inject::LbPort`]); the
/// backends see none of those datagrams.
struct EgressCounters<'a> {
    lab: &'a Lab,
    ebpf: aya::Ebpf,
    link: Option<aya::programs::xdp::XdpLinkId>,
}

const COUNT_PROGRAM: &str = "sluice_pktcount";

impl<'a> EgressCounters<'a> {
    fn install(lab: &'a Lab) -> anyhow::Result<Self> {
        use aya::programs::links::{FdLink, PinnedLink};
        use aya::programs::xdp::XdpLink;
        let mut ebpf = dataplane::load_pktgen()?;
        {
            let mut port: Array<_, u32> = Array::try_from(
                ebpf.map_mut("PKTCOUNT_PORT")
                    .ok_or_else(|| anyhow!("map PKTCOUNT_PORT missing from the object"))?,
            )?;
            port.set(0, &u32::from(UDP_PORT), 0)?;
        }
        let pin = lab.peer_pin_dir().join(lab.lb_peer_iface()).join("link");
        let fd: FdLink = PinnedLink::from_pin(&pin)
            .with_context(|| format!("opening the peer's pinned XDP link {}", pin.display()))?
            .into();
        let link = XdpLink::try_from(fd).map_err(|e| anyhow!("{}: {e}", pin.display()))?;
        let prog = dataplane::xdp_program(&mut ebpf, COUNT_PROGRAM)?;
        prog.load()
            .map_err(|e| anyhow!("verifying {COUNT_PROGRAM}: {e}"))?;
        let id = prog
            .attach_to_link(link)
            .map_err(|e| anyhow!("swapping {COUNT_PROGRAM} into {}: {e}", pin.display()))?;
        Ok(EgressCounters {
            lab,
            ebpf,
            link: Some(id),
        })
    }

    /// Per backend, then the datagrams to no backend's MAC.
    fn counts(&self) -> anyhow::Result<Vec<u64>> {
        let map: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(
            self.ebpf
                .map("PKTCOUNT")
                .ok_or_else(|| anyhow!("map PKTCOUNT missing from the object"))?,
        )?;
        let mut by_mac = [0u64; 65];
        for (i, slot) in by_mac.iter_mut().enumerate() {
            *slot = map.get(&(i as u32), 0)?.iter().sum();
        }
        let total: u64 = by_mac.iter().sum();
        let mut out = Vec::new();
        for mac in self.lab.backend_macs() {
            let last = parse_mac(&mac)?[5] as usize;
            out.push(if last < 64 { by_mac[last] } else { 0 });
        }
        let known: u64 = out.iter().sum();
        out.push(total - known);
        Ok(out)
    }
}

impl Drop for EgressCounters<'_> {
    fn drop(&mut self) {
        // Back to the plain XDP_PASS program, in the same link.
        let Some(id) = self.link.take() else { return };
        let result = (|| -> anyhow::Result<()> {
            let link = dataplane::xdp_program(&mut self.ebpf, COUNT_PROGRAM)?
                .take_link(id)
                .map_err(|e| anyhow!("{e}"))?;
            // The pass program lives in the balancer's object (a tiny connection table).
            let mut balancer = dataplane::load(None, 1024)?;
            let pass = dataplane::xdp_program(&mut balancer, dataplane::PASS_PROGRAM)?;
            let id = pass.attach_to_link(link).map_err(|e| anyhow!("{e}"))?;
            // Dropping our handle closes the fd only: the pinned link keeps the program.
            let _ = pass.take_link(id);
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("[bench] restoring the XDP_PASS program on the lb's switch port: {e:#}");
        }
    }
}

/// rx packets of the generator interface's peer (what actually left the generator).
fn wire_count(lab: &Lab, inject: Inject) -> anyhow::Result<u64> {
    let (ns, dev) = match inject {
        Inject::Client => (lab.switch_ns(), lab.client_peer_iface()),
        Inject::LbPort => (lab.lb_ns(), sluice_tests::lab::NS_IFACE),
    };
    let out = lab.exec_ok(ns, &["ip", "-j", "-s", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("no rx packets in `ip -s -j link show`"))
}

/// Busy jiffies of all CPUs (/proc/stat "cpu" line), in ns.
fn host_busy_ns() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat has no cpu line"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(f.len() >= 8, "/proc/stat cpu line too short: {line}");
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(busy * 1_000_000_000 / hz)
}

/// The generator's frame: client -> VIP:5353, 64 bytes of payload, no UDP checksum.
fn frame(lab: &Lab, dst_mac: &str) -> anyhow::Result<Vec<u8>> {
    let mut f = Frame::udp(FIRST_PORT as u16, &[0x5a; 64]);
    f.src = lab.client_addr().into();
    f.dst = lab.vip().into();
    f.dport = UDP_PORT;
    let mut bytes = f.bytes();
    bytes[..6].copy_from_slice(&parse_mac(dst_mac)?);
    bytes[6..12].copy_from_slice(&parse_mac(&lab.client_mac())?);
    // Ports change per frame and the checksum would not follow: 0 = none (legal in IPv4).
    bytes[40..42].copy_from_slice(&[0, 0]);
    Ok(bytes)
}

/// Sends `frame` out of the generator's place for `window` (see [`sluice_tests::pktgen`]).
fn generate(
    lab: &Lab,
    inject: Inject,
    frame: Vec<u8>,
    flows: pktgen::Flows,
    rate: Option<u64>,
    window: Duration,
) -> anyhow::Result<pktgen::Sent> {
    let (ns, iface) = inject.place(lab);
    pktgen::generate(&ns, &iface, frame, flows, rate, window)
}

/// The plan's cycle of flows (source ports), or every frame a new flow (`spoof`).
fn flows(plan: &Plan, spoof: bool) -> pktgen::Flows {
    pktgen::Flows {
        ports: if spoof { 60_000 } else { plan.flows },
        first_port: FIRST_PORT,
        spoof_sources: spoof,
    }
}

/// One window: counters before, traffic, a short drain, counters after.
fn window(
    lab: &Lab,
    inject: Inject,
    flows: pktgen::Flows,
    frame: &[u8],
    rate: Option<u64>,
    duration: Duration,
    active: Option<&Active<'_>>,
) -> anyhow::Result<PpsRun> {
    let xdp = active.is_some_and(|a| a.kind == Kind::Sluice);
    let _stats = if xdp {
        Some(pktgen::BpfStats::enable()?)
    } else {
        None
    };
    let egress = match inject {
        Inject::Client => None,
        Inject::LbPort => Some(EgressCounters::install(lab)?),
    };
    let counts = || match &egress {
        Some(e) => e.counts(),
        None => backend_counts(lab),
    };
    let b0 = counts()?;
    let w0 = wire_count(lab, inject)?;
    let c0 = host_busy_ns()?;
    let p0 = active.map_or(0, |a| a.process_cpu_ns());
    let x0 = if xdp {
        pktgen::xdp_prog_stats(lab)?
    } else {
        (0, 0)
    };
    let sent = generate(lab, inject, frame.to_vec(), flows, rate, duration)?;
    let c1 = host_busy_ns()?;
    let x1 = if xdp {
        pktgen::xdp_prog_stats(lab)?
    } else {
        (0, 0)
    };
    let p1 = active.map_or(0, |a| a.process_cpu_ns());
    // Frames still queued in a proxy or a backlog arrive within this.
    std::thread::sleep(Duration::from_millis(300));
    let b1 = counts()?;
    let w1 = wire_count(lab, inject)?;
    drop(egress);
    let per_backend: Vec<u64> = b1.iter().zip(&b0).map(|(a, b)| a - b).collect();
    let forwarded: u64 = per_backend.iter().sum();
    let per = |ns: u64| ns as f64 / forwarded.max(1) as f64;
    Ok(PpsRun {
        offered: rate,
        seconds: sent.seconds,
        generated: sent.frames,
        on_wire: w1 - w0,
        forwarded,
        per_backend,
        host_cpu_ns_per_pkt: per(c1.saturating_sub(c0)),
        proc_cpu_ns_per_pkt: per(p1.saturating_sub(p0)),
        xdp_ns_per_pkt: xdp
            .then(|| (x1.0 - x0.0) as f64 / (x1.1.saturating_sub(x0.1)).max(1) as f64),
        generator: sent.generator.to_string(),
    })
}

fn fixed_and_max(
    lab: &Lab,
    plan: &Plan,
    frame: &[u8],
    active: Option<&Active<'_>>,
) -> anyhow::Result<Pps> {
    // Warm-up: every flow once (conntrack entries, sluice's connection table, nginx sessions).
    generate(
        lab,
        Inject::Client,
        frame.to_vec(),
        flows(plan, false),
        Some(u64::from(plan.flows) * 4),
        Duration::from_millis(300),
    )?;
    let fixed = window(
        lab,
        Inject::Client,
        flows(plan, false),
        frame,
        Some(plan.fixed_pps),
        plan.pps_window,
        active,
    )?;
    // The host is shared: of several windows at the maximum, the least disturbed counts.
    let best_max = |inject: Inject| -> anyhow::Result<PpsRun> {
        let cycle = flows(plan, false);
        let mut max = window(lab, inject, cycle, frame, None, plan.pps_window, active)?;
        for _ in 1..plan.max_tries {
            let again = window(lab, inject, cycle, frame, None, plan.pps_window, active)?;
            if again.forwarded_pps() > max.forwarded_pps() {
                max = again;
            }
        }
        Ok(max)
    };
    let max = best_max(Inject::Client)?;
    // Only through a load balancer: the direct path has none to inject into.
    let port_max = match active {
        Some(_) => Some(best_max(Inject::LbPort)?),
        None => None,
    };
    if let Some(a) = active
        && (fixed.forwarded == 0 || max.forwarded == 0)
    {
        eprintln!(
            "[bench]   nothing reached the backends through {}:\n{}",
            a.kind.name(),
            super::contenders::lb_diagnostics(lab)
        );
    }
    for (r, into_port) in [
        (Some(&fixed), false),
        (Some(&max), false),
        (port_max.as_ref(), true),
    ] {
        let Some(r) = r else { continue };
        eprintln!(
            "[bench]   {}{:>9}: generated {:>9.0}/s, on wire {:>9.0}/s, at backends {:>9.0}/s, host CPU {:.0} ns/pkt{} [{}]",
            if into_port {
                "into the lb's port, "
            } else {
                ""
            },
            r.offered.map_or("max".to_string(), |o| format!("{o}/s")),
            r.generated as f64 / r.seconds,
            r.wire_pps(),
            r.forwarded_pps(),
            r.host_cpu_ns_per_pkt,
            r.xdp_ns_per_pkt
                .map_or(String::new(), |x| format!(", XDP program {x:.0} ns/pkt")),
            r.generator
        );
    }
    Ok(Pps {
        fixed,
        max,
        port_max,
    })
}

/// The path without a load balancer: frames addressed straight to backend 0.
pub fn measure_direct(lab: &Lab, plan: &Plan) -> anyhow::Result<Pps> {
    install_backend_counters(lab)?;
    let mac = lab
        .backend_macs()
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the lab has no backend"))?;
    let f = frame(lab, &mac)?;
    let r = fixed_and_max(lab, plan, &f, None)?;
    if r.max.forwarded == 0 {
        bail!(
            "the generator's frames do not reach backend 0 even without a load balancer \
             (generated {}, on wire {})",
            r.max.generated,
            r.max.on_wire
        );
    }
    Ok(r)
}

/// Through the contender: frames to the VIP via the lb.
pub fn measure(lab: &Lab, plan: &Plan, active: &Active<'_>) -> anyhow::Result<Pps> {
    let f = frame(lab, &lab.lb_mac())?;
    fixed_and_max(lab, plan, &f, Some(active))
}

/// The XDP program's own cost per packet (bpf_stats) on its paths at speed, side by side in
/// one run: real frames from the generator injected into the lb's port at the maximum rate,
/// millions per window, so no per-call overhead is subtracted and the caches are as traffic
/// leaves them. sluice must be the attached contender.
#[derive(Debug, Clone, Default)]
pub struct PathCosts {
    /// UDP over the plan's cycle of flows, all in the connection table.
    pub established: PpsRun,
    /// UDP, every frame a new flow (miss, Maglev pick, insert into a full LRU), no guard.
    pub new_flow: PpsRun,
    /// Spoofed TCP SYNs, every frame a new flow: the guard off, then on (at
    /// [`GUARD_FOR_BENCH`], so that it holds at the rates a lab on a small host reaches).
    pub syn_flood_unguarded: PpsRun,
    pub syn_flood_guarded: PpsRun,
}

/// The flood guard's rate (new flows per second and CPU) in the guarded SYN-flood window.
pub const GUARD_FOR_BENCH: u32 = 10_000;

pub fn measure_paths(lab: &Lab, plan: &Plan, active: &Active<'_>) -> anyhow::Result<PathCosts> {
    ensure!(active.kind == Kind::Sluice, "path costs are sluice's");
    let specs: Vec<sluice_tests::BackendSpec> = (0..lab.backends())
        .map(sluice_tests::BackendSpec::active)
        .collect();
    let guard = |on: bool| -> anyhow::Result<()> {
        let rate = if on { GUARD_FOR_BENCH } else { 0 };
        let top = vec![format!("max_new_flows_per_cpu: {rate}")];
        lab.attach_with(&specs, &top)?;
        Ok(())
    };
    let udp = frame(lab, &lab.lb_mac())?;
    let syn = pktgen::syn_frame(lab)?;
    let run = |flows: pktgen::Flows, frame: &[u8]| {
        window(
            lab,
            Inject::LbPort,
            flows,
            frame,
            None,
            plan.pps_window,
            Some(active),
        )
    };
    guard(false)?;
    let costs = PathCosts {
        established: run(flows(plan, false), &udp)?,
        new_flow: run(flows(plan, true), &udp)?,
        syn_flood_unguarded: run(flows(plan, true), &syn)?,
        syn_flood_guarded: {
            guard(true)?;
            run(flows(plan, true), &syn)?
        },
    };
    for (name, r) in [
        ("established", &costs.established),
        ("new flow, every frame", &costs.new_flow),
        ("SYN flood, guard off", &costs.syn_flood_unguarded),
        ("SYN flood, guard on", &costs.syn_flood_guarded),
    ] {
        eprintln!(
            "[bench]   {name:<22}: generated {:>9.0}/s, XDP program {:.0} ns/pkt, host CPU {:.0} ns/frame",
            r.generated as f64 / r.seconds.max(1e-9),
            r.xdp_ns_per_pkt.unwrap_or(0.0),
            r.host_cpu_ns_per_generated()
        );
    }
    Ok(costs)
}
