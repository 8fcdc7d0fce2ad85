//! `cargo xtask bench`: sluice side by side with the load balancers Kubernetes users run today,
//! on one network-namespace lab, in one run.
//!
//! 1. ns/packet of the XDP program's paths from BPF_PROG_TEST_RUN ([`testrun`]).
//! 2. Maglev quality: spread and disruption for N = 3, 10, 100 ([`maglev_quality`]).
//! 3. One lab (client, lb, backends with nginx); each contender of [`contenders`] is set up in
//!    the lb namespace in turn, then measured with
//!    - UDP packets/s, 64-byte payloads, many flows, from our XDP live-frames generator
//!      ([`pktgen`]), at a fixed offered rate and at the maximum;
//!    - short-lived TCP connections (one HTTP request each) with k6 at rising rates ([`conn`]).
//! 4. The cluster path on a real 3-node cluster: client → node → kube-proxy → pod, new
//!    connections/s and p99 with sluice deployed, and with kube-proxy alone ([`cluster`]).
//! 5. `target/bench/report.{json,md,png}` ([`report`]).
//!
//! `--only` picks contenders (keys of [`Kind`]) and/or `cluster`; `--only cluster` runs the
//! cluster section alone.
//!
//! Everything is bounded in time, traffic stays between the lab's namespaces, and every piece
//! (lab, contender, sysctl) is undone by a Drop guard, also on error.

mod cluster;
mod conn;
mod contenders;
mod maglev_quality;
mod pktgen;
mod report;
mod testrun;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sluice_tests::{Lab, LabConfig, require_root};

use contenders::Kind;
use report::Report;

/// What `--quick` and the full run measure.
#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    /// BPF_PROG_TEST_RUN repeats per path.
    pub repeat: u32,
    pub backends: usize,
    /// Length of each packet-rate window.
    pub pps_window: Duration,
    /// The fixed offered rate (packets/s); the other window is "as fast as it goes".
    pub fixed_pps: u64,
    /// Windows at the maximum per contender; the best counts (the host is shared).
    pub max_tries: u32,
    /// UDP flows (distinct source ports) in the packet-rate test.
    pub flows: u32,
    /// Offered connection rates (new connections per second), each for `conn_window`.
    pub conn_rates: Vec<u32>,
    pub conn_window: Duration,
    /// New connections at once in the cluster section (k6 VUs, closed loop).
    pub cluster_concurrency: u32,
    /// Length of each of the cluster section's two windows.
    pub cluster_window: Duration,
    /// Only these contenders (keys) and/or `cluster`; all when empty.
    pub only: Vec<String>,
}

impl Plan {
    pub fn new(quick: bool, repeat: Option<u32>, only: Vec<String>) -> Plan {
        if quick {
            Plan {
                quick,
                repeat: repeat.unwrap_or(200_000),
                backends: 3,
                pps_window: Duration::from_secs(2),
                fixed_pps: 100_000,
                max_tries: 1,
                flows: 1024,
                conn_rates: vec![500, 2000],
                conn_window: Duration::from_secs(4),
                cluster_concurrency: 16,
                cluster_window: Duration::from_secs(10),
                only,
            }
        } else {
            Plan {
                quick,
                repeat: repeat.unwrap_or(1_000_000),
                backends: 3,
                pps_window: Duration::from_secs(5),
                fixed_pps: 100_000,
                max_tries: 3,
                flows: 4096,
                conn_rates: vec![250, 500, 1000, 2000, 4000],
                conn_window: Duration::from_secs(8),
                cluster_concurrency: 16,
                cluster_window: Duration::from_secs(20),
                only,
            }
        }
    }

    /// Whether the lab's sections run (nothing but `cluster` in `--only`: no).
    pub fn lab_wanted(&self) -> bool {
        self.only.is_empty() || self.only.iter().any(|k| k != CLUSTER_KEY)
    }

    /// Whether only the ns/packet section runs (`--only xdp`: the XDP program's paths, to
    /// compare two builds side by side in a minute).
    pub fn xdp_only(&self) -> bool {
        !self.only.is_empty() && self.only.iter().all(|k| k == XDP_KEY)
    }

    /// Whether the cluster section runs.
    pub fn cluster_wanted(&self) -> bool {
        self.only.is_empty() || self.only.iter().any(|k| k == CLUSTER_KEY)
    }
}

/// The `--only` key of the cluster section.
pub const CLUSTER_KEY: &str = "cluster";
/// The `--only` key of the ns/packet section alone.
pub const XDP_KEY: &str = "xdp";

/// Where the report files go: `target/bench/` of the workspace.
fn out_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench"))
}

pub fn run(plan: Plan) -> anyhow::Result<()> {
    require_root();
    if plan.xdp_only() {
        eprintln!(
            "[bench] ns/packet with BPF_PROG_TEST_RUN ({} runs)",
            plan.repeat
        );
        testrun::print(&testrun::run(plan.repeat)?);
        return Ok(());
    }
    let tools: &[&str] = if plan.lab_wanted() {
        &["k6", "iptables", "conntrack", "haproxy", "bpftool"]
    } else {
        &["k6"]
    };
    for &tool in tools {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        anyhow::ensure!(
            found,
            "the benchmark needs `{tool}` on PATH: run it through ./x (scripts/bootstrap.sh installs it)"
        );
    }
    let started = Instant::now();
    let mut report = Report::new(&plan);
    if plan.lab_wanted() {
        run_lab(&plan, &mut report)?;
    }
    if plan.cluster_wanted() {
        eprintln!("[bench] the cluster path: sluice, then kube-proxy alone");
        let c = cluster::run(&plan);
        report.notes.extend(report::cluster_notes(&c));
        report.cluster = Some(c);
    }
    report.elapsed = started.elapsed();
    let dir = out_dir();
    report.write(&dir)?;
    println!("{}", report.markdown());
    eprintln!(
        "[bench] done in {:.0} s: {}/report.{{json,md,png}}",
        report.elapsed.as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// Sections 1 to 3: ns/packet, Maglev quality, the lab's contenders.
fn run_lab(plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    eprintln!(
        "[bench] ns/packet with BPF_PROG_TEST_RUN ({} runs)",
        plan.repeat
    );
    match testrun::run(plan.repeat) {
        Ok(rows) => {
            report.testrun = rows;
            testrun::print(&report.testrun);
        }
        Err(e) => report.missing(format!("ns/packet with BPF_PROG_TEST_RUN: {e:#}")),
    }

    eprintln!("[bench] Maglev quality (N = 3, 10, 100)");
    report.maglev = maglev_quality::run();
    maglev_quality::print(&report.maglev);

    eprintln!("[bench] building the lab ({} backends)", plan.backends);
    let lab = Lab::build(LabConfig {
        backends: plan.backends,
        udp: true,
    })?;
    contenders::tune_lab(&lab)?;
    report.notes.extend(contenders::lab_notes(&lab));
    report.notes.extend(report::method_notes(plan));

    // The path without a load balancer: what every contender's CPU per packet is compared to.
    eprintln!("[bench] packet rate straight to backend 0 (no load balancer)");
    match pktgen::measure_direct(&lab, plan) {
        Ok(d) => report.direct = Some(d),
        Err(e) => report.missing(format!("packet rate without a load balancer: {e:#}")),
    }

    for kind in Kind::ALL {
        if !plan.only.is_empty() && !plan.only.iter().any(|k| k == kind.key()) {
            continue;
        }
        eprintln!("[bench] contender: {}", kind.name());
        let mut result = report::ContenderResult::new(kind);
        let active = match contenders::setup(&lab, kind) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("[bench]   setup failed: {e:#}");
                result.errors.push(format!("setup: {e:#}"));
                report.contenders.push(result);
                continue;
            }
        };
        if kind.forwards_udp() {
            match pktgen::measure(&lab, plan, &active) {
                Ok(p) => result.pps = Some(p),
                Err(e) => result.errors.push(format!("packet rate: {e:#}")),
            }
        }
        if kind == Kind::Sluice {
            eprintln!("[bench]   sluice's paths at speed (established, new flows, SYN flood)");
            match pktgen::measure_paths(&lab, plan, &active) {
                Ok(p) => report.paths = Some(p),
                Err(e) => result.errors.push(format!("path costs: {e:#}")),
            }
        }
        match conn::measure(&lab, plan, &active) {
            Ok(c) => result.conn = c,
            Err(e) => result.errors.push(format!("connections: {e:#}")),
        }
        result.proxy_port_errors = active.port_errors();
        drop(active);
        report.contenders.push(result);
    }
    drop(lab);
    report.notes.extend(report::generator_notes(report));
    Ok(())
}
