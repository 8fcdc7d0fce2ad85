//! The benchmark's output: `report.json` (one object per contender and metric, with the
//! machine), `report.md` (tables with ratios to sluice, the targets, the caveats) and
//! `report.png` (drawn with plotters; text in DejaVu Sans read at run time).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;
use serde_json::{Value, json};

use super::Plan;
use super::cluster::ClusterResult;
use super::conn::ConnStep;
use super::contenders::Kind;
use super::maglev_quality::MaglevRow;
use super::pktgen::{PathCosts, Pps, PpsRun};
use super::testrun::{TestRunRow, cpus};

/// The TTF the chart's text is drawn with (Debian fonts-dejavu-core, from scripts/bootstrap.sh).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A request step is "clean" below this error rate.
const CLEAN: f64 = 0.01;

pub struct ContenderResult {
    pub kind: Kind,
    pub pps: Option<Pps>,
    pub conn: Vec<ConnStep>,
    /// EADDRNOTAVAIL lines in the proxy's log over the whole run (proxies only).
    pub proxy_port_errors: Option<u64>,
    /// What failed to measure.
    pub errors: Vec<String>,
}

impl ContenderResult {
    pub fn new(kind: Kind) -> Self {
        ContenderResult {
            kind,
            pps: None,
            conn: Vec::new(),
            proxy_port_errors: None,
            errors: Vec::new(),
        }
    }

    fn max_pps(&self) -> Option<f64> {
        self.pps.as_ref().map(|p| p.max.forwarded_pps())
    }

    /// At max, injected into the lb's port, counted leaving it.
    fn port_pps(&self) -> Option<f64> {
        Some(self.pps.as_ref()?.port_max.as_ref()?.forwarded_pps())
    }

    /// The highest answered rate of a step with under 1% errors.
    fn clean_ok_per_s(&self) -> Option<f64> {
        self.conn
            .iter()
            .filter(|s| s.error_rate() < CLEAN)
            .map(|s| s.ok_per_s)
            .fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
    }

    /// Port-exhaustion errors seen anywhere: the client's k6 and the proxy's log.
    fn port_errors(&self) -> u64 {
        let client: u64 = self
            .conn
            .iter()
            .flat_map(|s| &s.errors)
            .filter(|(k, _)| k == "eaddrnotavail")
            .map(|(_, n)| n)
            .sum();
        client + self.proxy_port_errors.unwrap_or(0)
    }

    /// The first offered rate with >= 1% errors ("falls over"), if any.
    fn falls_over_at(&self) -> Option<u32> {
        self.conn
            .iter()
            .find(|s| s.error_rate() >= CLEAN)
            .map(|s| s.offered)
    }
}

pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu: String,
    pub date: String,
    pub loadavg: String,
}

impl Machine {
    fn probe() -> Machine {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Machine {
            cores: cpus(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu,
            date,
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

pub struct Report {
    pub plan: Plan,
    pub machine: Machine,
    pub testrun: Vec<TestRunRow>,
    pub maglev: Vec<MaglevRow>,
    pub direct: Option<Pps>,
    /// sluice's paths at speed, the program's own time (live frames, bpf_stats).
    pub paths: Option<PathCosts>,
    pub contenders: Vec<ContenderResult>,
    /// The cluster path (`--only cluster` or the full run).
    pub cluster: Option<ClusterResult>,
    pub notes: Vec<String>,
    /// Sections or rows that could not run on this machine, each with the reason: the rest of
    /// the benchmark runs without them.
    pub missing: Vec<String>,
    pub elapsed: Duration,
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// "sluice is N x this" (or "-").
fn ratio(sluice: Option<f64>, this: Option<f64>) -> String {
    match (sluice, this) {
        (Some(s), Some(t)) if t > 0.0 => format!("{:.1}x", s / t),
        (Some(_), Some(_)) => "inf".into(),
        _ => "-".into(),
    }
}

impl Report {
    pub fn new(plan: &Plan) -> Report {
        Report {
            plan: plan.clone(),
            machine: Machine::probe(),
            testrun: Vec::new(),
            maglev: Vec::new(),
            direct: None,
            paths: None,
            contenders: Vec::new(),
            cluster: None,
            notes: Vec::new(),
            missing: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Records a section or row that could not run (said at once, and in the report).
    pub fn missing(&mut self, what: String) {
        eprintln!("[bench]   not measured: {what}");
        self.missing.push(what);
    }

    /// Every packet-rate window of the run.
    fn pps_runs(&self) -> Vec<&PpsRun> {
        fn pps(p: &Pps) -> impl Iterator<Item = &PpsRun> {
            [&p.fixed, &p.max].into_iter().chain(p.port_max.as_ref())
        }
        let mut runs: Vec<&PpsRun> = self.direct.iter().flat_map(pps).collect();
        for c in &self.contenders {
            runs.extend(c.pps.iter().flat_map(pps));
        }
        runs.extend(self.path_rows().into_iter().map(|(_, r)| r));
        runs
    }

    fn sluice(&self) -> Option<&ContenderResult> {
        self.contenders.iter().find(|c| c.kind == Kind::Sluice)
    }

    /// The live path costs, named.
    fn path_rows(&self) -> Vec<(&'static str, &PpsRun)> {
        match &self.paths {
            Some(p) => vec![
                ("established flow", &p.established),
                ("new flow (every frame)", &p.new_flow),
                ("SYN flood, guard off", &p.syn_flood_unguarded),
                ("SYN flood, guard on", &p.syn_flood_guarded),
            ],
            None => Vec::new(),
        }
    }

    fn direct_host_cpu(&self) -> Option<f64> {
        self.direct.as_ref().map(|d| d.max.host_cpu_ns_per_pkt)
    }

    /// The part of 1/pps on the path into the lb's port that is not the load balancer (the
    /// generator, two veth crossings, the counter), from sluice's window: its time per packet
    /// minus its XDP program's own run time.
    fn floor_ns(&self) -> Option<f64> {
        let sl = self.sluice()?.pps.as_ref()?.port_max.as_ref()?;
        let pps = sl.forwarded_pps();
        (pps > 0.0).then_some(())?;
        Some(1e9 / pps - sl.xdp_ns_per_pkt?)
    }

    /// The load balancer's own time per packet, estimated on the path into the lb's port (see
    /// the notes in the report): sluice: its XDP program's run time (bpf_stats); DNAT: 1/pps
    /// minus the floor; proxies: the proxy processes' CPU per forwarded packet.
    fn lb_ns_est(&self, c: &ContenderResult) -> Option<f64> {
        let p = c.pps.as_ref()?.port_max.as_ref()?;
        match c.kind {
            Kind::Sluice => p.xdp_ns_per_pkt,
            Kind::Iptables | Kind::Nft => {
                let pps = p.forwarded_pps();
                (pps > 0.0).then_some(())?;
                Some(1e9 / pps - self.floor_ns()?)
            }
            Kind::Nginx | Kind::Haproxy => {
                (p.proc_cpu_ns_per_pkt > 0.0).then_some(p.proc_cpu_ns_per_pkt)
            }
        }
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(&self.json())?;
        fs::write(dir.join("report.json"), json + "\n")?;
        fs::write(dir.join("report.md"), self.markdown())?;
        if self.plan.lab_wanted() {
            self.chart(&dir.join("report.png"))
                .context("drawing report.png")?;
        }
        Ok(())
    }

    // ----- JSON -----

    pub fn json(&self) -> Value {
        let mut results = Vec::new();
        let mut rec = |contender: &str, metric: &str, value: f64, unit: &str, params: Value| {
            results.push(json!({
                "contender": contender, "metric": metric,
                "value": if value.is_finite() { json!(value) } else { Value::Null },
                "unit": unit, "params": params,
            }));
        };
        for r in &self.testrun {
            rec(
                "sluice",
                "xdp_ns_per_packet",
                r.ns,
                "ns",
                json!({"path": r.path, "target": r.target, "method": "BPF_PROG_TEST_RUN"}),
            );
        }
        for (path, r) in self.path_rows() {
            rec(
                "sluice",
                "xdp_ns_per_packet_live",
                r.xdp_ns_per_pkt.unwrap_or(f64::NAN),
                "ns",
                json!({"path": path, "method": "live frames into the lb's port, bpf_stats"}),
            );
            rec(
                "sluice",
                "host_cpu_ns_per_frame_live",
                r.host_cpu_ns_per_generated(),
                "ns",
                json!({"path": path}),
            );
        }
        for m in &self.maglev {
            let p = json!({"backends": m.backends, "table_size": m.table_size});
            rec(
                "sluice",
                "maglev_max_over_mean",
                m.max_over_mean,
                "ratio",
                p.clone(),
            );
            rec(
                "sluice",
                "maglev_remapped_on_leave",
                m.remapped,
                "share",
                p.clone(),
            );
            rec("sluice", "maglev_ideal_remap", m.ideal, "share", p);
        }
        let pps_records = |rec: &mut dyn FnMut(&str, &str, f64, &str, Value),
                           who: &str,
                           pps: &Pps,
                           direct: Option<f64>| {
            for (run, into_port) in [(&pps.fixed, false), (&pps.max, false)]
                .into_iter()
                .chain(pps.port_max.as_ref().map(|p| (p, true)))
            {
                let p = json!({
                    "offered_pps": run.offered, "seconds": run.seconds,
                    "generated": run.generated, "on_wire": run.on_wire,
                    "forwarded": run.forwarded, "per_backend": run.per_backend,
                    "payload_bytes": 64,
                });
                let tag = if run.offered.is_some() {
                    "fixed"
                } else {
                    "max"
                };
                rec(
                    who,
                    &format!("udp_pps_{tag}"),
                    run.forwarded_pps(),
                    "packets/s",
                    p.clone(),
                );
                rec(
                    who,
                    &format!("host_cpu_ns_per_pkt_{tag}"),
                    run.host_cpu_ns_per_pkt,
                    "ns",
                    p.clone(),
                );
                if let (Some(d), false) = (direct, into_port) {
                    rec(
                        who,
                        &format!("lb_cpu_ns_per_pkt_est_{tag}"),
                        run.host_cpu_ns_per_pkt - d,
                        "ns",
                        json!({"method": "host CPU per packet minus that of the direct path"}),
                    );
                }
                if run.proc_cpu_ns_per_pkt > 0.0 {
                    rec(
                        who,
                        &format!("proxy_process_cpu_ns_per_pkt_{tag}"),
                        run.proc_cpu_ns_per_pkt,
                        "ns",
                        p.clone(),
                    );
                }
                if let Some(x) = run.xdp_ns_per_pkt {
                    rec(
                        who,
                        &format!("xdp_prog_ns_per_pkt_{tag}"),
                        x,
                        "ns",
                        json!({"method": "kernel.bpf_stats_enabled run_time_ns / run_cnt"}),
                    );
                }
            }
        };
        if let Some(d) = &self.direct {
            pps_records(&mut rec, "direct (no load balancer)", d, None);
        }
        let direct = self.direct_host_cpu();
        for c in &self.contenders {
            let who = c.kind.key();
            if let Some(p) = &c.pps {
                pps_records(&mut rec, who, p, direct);
            }
            for s in &c.conn {
                let errors: serde_json::Map<String, Value> = s
                    .errors
                    .iter()
                    .map(|(k, n)| (k.clone(), json!(n)))
                    .collect();
                let p = json!({
                    "offered_conn_per_s": s.offered, "seconds": s.seconds,
                    "requests": s.requests, "ok": s.ok, "dropped_by_client": s.dropped,
                    "errors": errors, "proxy_eaddrnotavail_log_lines": s.proxy_port_errors,
                    "proxy_no_backend_log_lines": s.proxy_no_backend,
                });
                rec(who, "conn_ok_per_s", s.ok_per_s, "requests/s", p.clone());
                rec(who, "conn_p50_ms", s.p50_ms, "ms", p.clone());
                rec(who, "conn_p99_ms", s.p99_ms, "ms", p.clone());
                rec(who, "conn_error_rate", s.error_rate(), "share", p);
            }
            rec(
                who,
                "ephemeral_port_errors",
                c.port_errors() as f64,
                "count",
                json!({"sources": "k6 EADDRNOTAVAIL + proxy log lines"}),
            );
            if let Some(x) = self.lb_ns_est(c) {
                rec(
                    who,
                    "lb_ns_per_pkt_est",
                    x,
                    "ns",
                    json!({"method": match c.kind {
                        Kind::Sluice => "XDP program run time, kernel.bpf_stats_enabled",
                        Kind::Iptables | Kind::Nft => "into the lb's port: 1/pps(max) - floor, floor = sluice's 1/pps(max) - its XDP run time",
                        _ => "proxy processes' CPU time / forwarded packets, at max into the lb's port",
                    }}),
                );
            }
            if let Some(x) = c.clean_ok_per_s() {
                rec(
                    who,
                    "conn_max_ok_per_s_under_1pct_errors",
                    x,
                    "requests/s",
                    json!({}),
                );
            }
        }
        if let Some(c) = &self.cluster {
            cluster_records(c, &mut rec);
        }
        json!({
            "machine": {
                "cores": self.machine.cores, "kernel": self.machine.kernel,
                "cpu": self.machine.cpu, "date": self.machine.date,
                "loadavg_at_start": self.machine.loadavg,
            },
            "mode": if self.plan.quick { "quick" } else { "full" },
            "plan": {
                "pps_window_s": self.plan.pps_window.as_secs_f64(),
                "fixed_pps": self.plan.fixed_pps, "udp_flows": self.plan.flows,
                "conn_rates": self.plan.conn_rates,
                "conn_window_s": self.plan.conn_window.as_secs_f64(),
                "backends": self.plan.backends,
                "cluster_concurrency": self.plan.cluster_concurrency,
                "cluster_window_s": self.plan.cluster_window.as_secs_f64(),
            },
            "elapsed_s": self.elapsed.as_secs_f64(),
            "not_measured": {
                "ipvs": "this kernel has no IPVS (ip_vs) support",
                "haproxy_udp": "haproxy balances TCP and HTTP only",
            },
            "cluster_failures": self.cluster.as_ref().map_or(&[][..], |c| &c.errors[..]),
            "contender_failures": self.contenders.iter()
                .filter(|c| !c.errors.is_empty())
                .map(|c| json!({"contender": c.kind.key(), "errors": c.errors}))
                .collect::<Vec<_>>(),
            "notes": self.notes,
            "missing": self.missing,
            "results": results,
        })
    }

    // ----- Markdown -----

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# sluice benchmark ({} run)\n\n{} on {} cores ({}), kernel {}, load average at start {}. \
             {}; run took {:.0} s.\n",
            if self.plan.quick { "quick" } else { "full" },
            m.date,
            m.cores,
            m.cpu,
            m.kernel,
            m.loadavg,
            match (self.plan.lab_wanted(), self.cluster.is_some()) {
                (true, true) => "One lab, contenders in turn, then a real cluster",
                (true, false) => "One lab, contenders in turn",
                _ => "The cluster path only",
            },
            self.elapsed.as_secs_f64()
        );
        if self.plan.lab_wanted() {
            self.lab_markdown(&mut s);
        }
        if let Some(c) = &self.cluster {
            if self.plan.lab_wanted() {
                s.push('\n');
            }
            cluster_markdown(c, &mut s);
        }

        let failures: Vec<String> = self
            .contenders
            .iter()
            .flat_map(|c| {
                c.errors
                    .iter()
                    .map(move |e| format!("{}: {e}", c.kind.name()))
            })
            .collect();
        if !self.missing.is_empty() {
            s.push_str("\n## Not measured in this run\n\n");
            for m in &self.missing {
                let _ = writeln!(s, "- {m}");
            }
        }
        if !failures.is_empty() {
            s.push_str("\n## Measurements that failed\n\n");
            for f in failures {
                let _ = writeln!(s, "- {f}");
            }
        }
        s.push_str("\n## How to read this\n\n");
        for n in &self.notes {
            let _ = writeln!(s, "- {n}");
        }
        s
    }

    /// The lab's tables: contenders, targets, connections, packet rates, ns/packet, Maglev.
    fn lab_markdown(&self, s: &mut String) {
        let sl = self.sluice();
        let sl_pps = sl.and_then(ContenderResult::max_pps);
        let sl_port_pps = sl.and_then(ContenderResult::port_pps);
        let sl_clean = sl.and_then(ContenderResult::clean_ok_per_s);
        let _ = writeln!(
            s,
            "| contender | UDP pkt/s at {} offered (client → backends) | UDP pkt/s at max (client → backends) | sluice ÷ this | UDP pkt/s at max (into the lb's port → out of it) | sluice ÷ this | LB ns/pkt (est.) | this ÷ sluice | req/s, best step < 1% errors | sluice ÷ this | falls over at (conn/s offered) | ephemeral-port errors |",
            fmt_rate(self.plan.fixed_pps as f64)
        );
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let sl_lb = sl.and_then(|c| self.lb_ns_est(c));
        for c in &self.contenders {
            let fixed = c.pps.as_ref().map(|p| p.fixed.forwarded_pps());
            let max = c.max_pps();
            let port = c.port_pps();
            let lb = self.lb_ns_est(c);
            let clean = c.clean_ok_per_s();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.kind.name(),
                fixed.map_or("n/a".into(), fmt_rate),
                max.map_or("n/a".into(), fmt_rate),
                if c.kind == Kind::Sluice {
                    "1.0x".into()
                } else {
                    ratio(sl_pps, max)
                },
                port.map_or("n/a".into(), fmt_rate),
                if c.kind == Kind::Sluice {
                    "1.0x".into()
                } else {
                    ratio(sl_port_pps, port)
                },
                lb.map_or("-".into(), |x| format!("{x:.0}")),
                if c.kind == Kind::Sluice {
                    "1.0x".into()
                } else {
                    ratio(lb, sl_lb)
                },
                clean.map_or("none".into(), |x| format!("{x:.0}")),
                if c.kind == Kind::Sluice {
                    "1.0x".into()
                } else {
                    ratio(sl_clean, clean)
                },
                c.falls_over_at()
                    .map_or("never (in this run)".into(), |r| r.to_string()),
                if c.kind.is_proxy() || c.port_errors() > 0 {
                    c.port_errors().to_string()
                } else {
                    "0 (opens no connection)".into()
                },
            );
        }
        if let Some(d) = &self.direct {
            let _ = writeln!(
                s,
                "| *direct to one backend, no load balancer* | {} | {} | | | | {} | | | | | |",
                fmt_rate(d.fixed.forwarded_pps()),
                fmt_rate(d.max.forwarded_pps()),
                self.floor_ns().map_or(String::new(), |h| format!(
                    "(not the lb on the lb-port path: {h:.0})"
                ))
            );
        }

        s.push_str("\n## Targets\n\n| target | measured | met |\n|---|---|---|\n");
        let by = |k: Kind| self.contenders.iter().find(|c| c.kind == k);
        for (k, want) in [(Kind::Iptables, 5.0), (Kind::Nginx, 20.0)] {
            let c = by(k);
            let this_port = c.and_then(ContenderResult::port_pps);
            let this_client = c.and_then(ContenderResult::max_pps);
            let (text, met) = match (sl_port_pps, this_port) {
                (Some(a), Some(b)) if b > 0.0 => (
                    format!(
                        "{:.1}x into the lb's port ({} client → backends)",
                        a / b,
                        ratio(sl_pps, this_client)
                    ),
                    a / b >= want,
                ),
                _ => ("not measured".into(), false),
            };
            let _ = writeln!(
                s,
                "| UDP pkt/s at max: sluice >= {want}x {} | {text} | {} |",
                k.name(),
                if met { "yes" } else { "no" }
            );
        }
        let proxies_port: Vec<String> = self
            .contenders
            .iter()
            .filter(|c| c.kind.is_proxy())
            .map(|c| format!("{} {}", c.kind.key(), c.port_errors()))
            .collect();
        let sl_port = sl.map_or(0, ContenderResult::port_errors);
        let _ = writeln!(
            s,
            "| zero ephemeral-port errors for sluice where the proxies have them | sluice {sl_port}; {} | {} |",
            proxies_port.join(", "),
            if sl.is_some()
                && sl_port == 0
                && self
                    .contenders
                    .iter()
                    .any(|c| c.kind.is_proxy() && c.port_errors() > 0)
            {
                "yes"
            } else {
                "no"
            }
        );
        for k in [Kind::Nginx, Kind::Haproxy] {
            let this = by(k).and_then(ContenderResult::clean_ok_per_s);
            let (text, met) = match (sl_clean, this) {
                (Some(a), Some(b)) if b > 0.0 => (format!("{:.2}x", a / b), a / b >= 2.0),
                (Some(_), None) => ("the proxy had no step under 1% errors".into(), true),
                _ => ("not measured".into(), false),
            };
            let _ = writeln!(
                s,
                "| req/s at < 1% errors: sluice >= 2x {} | {text} | {} |",
                k.name(),
                if met { "yes" } else { "no" }
            );
        }

        s.push_str("\n## Connections (k6, one HTTP request per TCP connection)\n\n");
        s.push_str("| contender | offered conn/s | answered req/s | p50 ms | p99 ms | errors seen by k6 (kind: count) | not started by k6 | proxy log: EADDRNOTAVAIL | proxy log: no backend left |\n|---|---:|---:|---:|---:|---|---:|---:|---:|\n");
        for c in &self.contenders {
            for st in &c.conn {
                let errs: Vec<String> = st
                    .errors
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect();
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} |",
                    c.kind.key(),
                    st.offered,
                    st.ok_per_s,
                    st.p50_ms,
                    st.p99_ms,
                    if errs.is_empty() {
                        "0".into()
                    } else {
                        errs.join(", ")
                    },
                    st.dropped,
                    st.proxy_port_errors.map_or("-".into(), |n| n.to_string()),
                    st.proxy_no_backend.map_or("-".into(), |n| n.to_string())
                );
            }
        }

        s.push_str("\n## Packet rate details (UDP, 64-byte payload, ");
        let _ = write!(s, "{} flows)\n\n", self.plan.flows);
        s.push_str("| contender | offered | generated pkt/s | left the client pkt/s | at backends pkt/s | host CPU ns/pkt | proxy process CPU ns/pkt | XDP program ns/pkt (bpf_stats) | spread over backends |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n");
        let mut rows: Vec<(String, &PpsRun)> = Vec::new();
        if let Some(d) = &self.direct {
            rows.push(("direct".into(), &d.fixed));
            rows.push(("direct".into(), &d.max));
        }
        for c in &self.contenders {
            if let Some(p) = &c.pps {
                rows.push((c.kind.key().into(), &p.fixed));
                rows.push((c.kind.key().into(), &p.max));
                if let Some(m) = &p.port_max {
                    rows.push((format!("{} (into the lb's port)", c.kind.key()), m));
                }
            }
        }
        for (who, r) in rows {
            let _ = writeln!(
                s,
                "| {who} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
                r.offered.map_or("max".into(), |o| fmt_rate(o as f64)),
                fmt_rate(r.generated as f64 / r.seconds.max(1e-9)),
                fmt_rate(r.wire_pps()),
                fmt_rate(r.forwarded_pps()),
                r.host_cpu_ns_per_pkt,
                if r.proc_cpu_ns_per_pkt > 0.0 {
                    format!("{:.0}", r.proc_cpu_ns_per_pkt)
                } else {
                    "-".into()
                },
                r.xdp_ns_per_pkt.map_or("-".into(), |x| format!("{x:.0}")),
                r.per_backend
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }

        s.push_str("\n## sluice's XDP program, ns/packet (BPF_PROG_TEST_RUN, 64-byte frames)\n\n| path | ns/packet | target |\n|---|---:|---:|\n");
        for r in &self.testrun {
            let _ = writeln!(s, "| {} | {:.1} | {} |", r.path, r.ns, r.target);
        }
        if let Some(r) = self.testrun.first() {
            let _ = writeln!(s, "\n({})", r.note);
        }
        if self.paths.is_some() {
            s.push_str("\n## sluice's XDP program at speed (live frames into the lb's port, the program's own time from bpf_stats)\n\n| path | frames/s generated | XDP ns/packet | host CPU ns/frame |\n|---|---:|---:|---:|\n");
            for (path, r) in self.path_rows() {
                let _ = writeln!(
                    s,
                    "| {path} | {} | {} | {:.0} |",
                    fmt_rate(r.generated as f64 / r.seconds.max(1e-9)),
                    r.xdp_ns_per_pkt.map_or("-".into(), |x| format!("{x:.0}")),
                    r.host_cpu_ns_per_generated()
                );
            }
            let _ = writeln!(
                s,
                "\n(Every frame of the new-flow rows is a new 5-tuple: a miss, a Maglev pick and, without the guard, an insert into a full connection table that evicts. The SYN flood comes from spoofed sources; with the guard on ({} new flows/s per CPU here, so that it holds at this lab's rates) the rest ride on Maglev's pick unrecorded. Host CPU per frame includes the backends' kernels discarding the forged SYNs.)",
                super::pktgen::GUARD_FOR_BENCH
            );
        }

        s.push_str("\n## Maglev quality (each N at its default tier, then at 65537)\n\n| backends N | table size | memory per VIP | max/mean slots | remapped when one leaves | ideal 1/N |\n|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.maglev {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} KiB | {:.4} | {:.2}% | {:.2}% |",
                r.backends,
                r.table_size,
                f64::from(r.table_size) * 4.0 / 1024.0,
                r.max_over_mean,
                r.remapped * 100.0,
                r.ideal * 100.0
            );
        }
    }

    // ----- PNG -----

    fn chart(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = fs::read(FONT)
            .with_context(|| format!("reading the chart font {FONT} (Debian fonts-dejavu-core)"))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| anyhow!("{FONT} is not a usable font"))?;

        let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
        let title = format!(
            "sluice vs kube-proxy DNAT and L4 proxies — {}, {} cores, kernel {}",
            self.machine.date, self.machine.cores, self.machine.kernel
        );
        let root = root
            .titled(&title, ("sans-serif", 22))
            .map_err(|e| anyhow!("{e:?}"))?;
        let panels = root.split_evenly((2, 2));
        let colors = [
            RGBColor(0x1f, 0x77, 0xb4),
            RGBColor(0xff, 0x7f, 0x0e),
            RGBColor(0x2c, 0xa0, 0x2c),
            RGBColor(0xd6, 0x27, 0x28),
            RGBColor(0x94, 0x67, 0xbd),
        ];
        let color = |k: Kind| colors[Kind::ALL.iter().position(|&x| x == k).unwrap_or(0)];

        // Panel 1: UDP packets/s at max, forwarded to the backends.
        let bars: Vec<(Kind, f64)> = self
            .contenders
            .iter()
            .filter_map(|c| Some((c.kind, c.port_pps()? / 1e3)))
            .collect();
        let ymax = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
        self.bar_panel(
            &panels[0],
            "UDP kpkt/s forwarded at max, into the lb's port (haproxy: no UDP)",
            &bars,
            (0.0, ymax),
            false,
            &color,
            |v| format!("{v:.0}"),
        )?;
        // Panel 2: the load balancer's own time per packet, log scale.
        let bars: Vec<(Kind, f64)> = self
            .contenders
            .iter()
            .filter_map(|c| Some((c.kind, self.lb_ns_est(c)?.max(1.0))))
            .collect();
        let ymax = bars.iter().map(|b| b.1).fold(10.0, f64::max) * 3.0;
        self.bar_panel(
            &panels[1],
            "load balancer's own ns per packet (est., log scale; lower is better)",
            &bars,
            (1.0, ymax),
            true,
            &color,
            |v| format!("{v:.0}"),
        )?;

        // Panel 2: answered req/s against offered conn/s.
        let xmax = self.plan.conn_rates.iter().copied().max().unwrap_or(1) as f64 * 1.05;
        let ymax2 = self
            .contenders
            .iter()
            .flat_map(|c| c.conn.iter().map(|s| s.ok_per_s))
            .fold(1.0, f64::max)
            * 1.15;
        let mut ch = ChartBuilder::on(&panels[2])
            .caption(
                "answered req/s vs offered new connections/s (k6)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax2)
            .map_err(|e| anyhow!("{e:?}"))?;
        ch.configure_mesh()
            .x_desc("offered new connections/s")
            .x_labels(6)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;
        for c in &self.contenders {
            let col = color(c.kind);
            let pts: Vec<(f64, f64)> = c
                .conn
                .iter()
                .map(|s| (f64::from(s.offered), s.ok_per_s))
                .collect();
            // Wider lines first: the contenders that answer everything overlap exactly.
            let width = match c.kind {
                Kind::Sluice => 8,
                Kind::Iptables => 5,
                Kind::Nginx => 5,
                _ => 2,
            };
            ch.draw_series(LineSeries::new(pts.clone(), col.stroke_width(width)))
                .map_err(|e| anyhow!("{e:?}"))?
                .label(c.kind.key())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3))
                });
            ch.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, col.filled())))
                .map_err(|e| anyhow!("{e:?}"))?;
        }
        ch.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e:?}"))?;

        // Panel 3: failed connections (all kinds) over the whole ramp.
        let bars: Vec<(Kind, f64)> = self
            .contenders
            .iter()
            .map(|c| {
                let (failed, total) = c.conn.iter().fold((0u64, 0u64), |(f, t), s| {
                    (f + s.error_total(), t + s.requests)
                });
                (c.kind, 100.0 * failed as f64 / total.max(1) as f64)
            })
            .collect();
        let ymax3 = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.2;
        self.bar_panel(
            &panels[3],
            "failed connections over the whole ramp, %",
            &bars,
            (0.0, ymax3),
            false,
            &color,
            |v| format!("{v:.1}%"),
        )?;
        root.present().map_err(|e| anyhow!("{e:?}"))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn bar_panel(
        &self,
        area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
        caption: &str,
        bars: &[(Kind, f64)],
        (ymin, ymax): (f64, f64),
        log: bool,
        color: &dyn Fn(Kind) -> RGBColor,
        label: impl Fn(f64) -> String,
    ) -> anyhow::Result<()> {
        let n = bars.len().max(1) as f64;
        let names: Vec<&str> = bars.iter().map(|b| b.0.key()).collect();
        let x_fmt = |x: &f64| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                names.get(i).map(|s| s.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        };
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60);
        macro_rules! draw {
            ($ch:expr, $text_y:expr) => {{
                let mut ch = $ch.map_err(|e| anyhow!("{e:?}"))?;
                ch.configure_mesh()
                    .disable_x_mesh()
                    .x_labels(bars.len() * 2 + 1)
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&|y| format!("{y:.0}"))
                    .label_style(("sans-serif", 13))
                    .draw()
                    .map_err(|e| anyhow!("{e:?}"))?;
                for (i, (k, v)) in bars.iter().enumerate() {
                    let x = i as f64;
                    ch.draw_series(std::iter::once(Rectangle::new(
                        [(x + 0.15, ymin), (x + 0.85, *v)],
                        color(*k).filled(),
                    )))
                    .map_err(|e| anyhow!("{e:?}"))?;
                    let text_y: f64 = $text_y(*v);
                    ch.draw_series(std::iter::once(Text::new(
                        label(*v),
                        (x + 0.2, text_y),
                        ("sans-serif", 14),
                    )))
                    .map_err(|e| anyhow!("{e:?}"))?;
                }
            }};
        }
        if log {
            draw!(
                builder.build_cartesian_2d(0.0..n, (ymin..ymax).log_scale()),
                |v: f64| v * 1.6
            );
        } else {
            draw!(builder.build_cartesian_2d(0.0..n, ymin..ymax), |v: f64| v
                + (ymax - ymin) * 0.04);
        }
        Ok(())
    }
}

/// The cluster rows' contender names in report.json.
const CLUSTER_SLUICE: &str = "cluster: sluice + kube-proxy";
const CLUSTER_KUBE_PROXY: &str = "cluster: kube-proxy alone";

fn cluster_records(c: &ClusterResult, rec: &mut dyn FnMut(&str, &str, f64, &str, Value)) {
    let params = |s: &ConnStep, path: &str| {
        let errors: serde_json::Map<String, Value> = s
            .errors
            .iter()
            .map(|(k, n)| (k.clone(), json!(n)))
            .collect();
        json!({
            "path": path, "nodes": c.nodes, "pods": c.pods,
            "concurrency": c.concurrency, "seconds": s.seconds,
            "requests": s.requests, "ok": s.ok, "errors": errors,
            "service": "type: LoadBalancer, externalTrafficPolicy: Cluster; client routes the VIP to node-0",
        })
    };
    for (who, path, step, syns) in [
        (
            CLUSTER_SLUICE,
            "client -> node-0 (sluice XDP) -> a node's kube-proxy -> pod",
            &c.sluice,
            c.syns[0],
        ),
        (
            CLUSTER_KUBE_PROXY,
            "client -> node-0 (kube-proxy) -> pod",
            &c.kube_proxy,
            c.syns[1],
        ),
    ] {
        if let Some(s) = step {
            let mut p = params(s, path);
            if let Some((from_client, sent_on)) = syns {
                p["syns_to_vip_from_client"] = json!(from_client);
                p["syns_to_vip_sent_on_by_node0"] = json!(sent_on);
            }
            rec(
                who,
                "new_conn_per_s",
                s.ok_per_s,
                "connections/s",
                p.clone(),
            );
            rec(who, "conn_p50_ms", s.p50_ms, "ms", p.clone());
            rec(who, "conn_p99_ms", s.p99_ms, "ms", p.clone());
            rec(who, "conn_error_rate", s.error_rate(), "share", p);
        }
    }
    if let Some(r) = c.conn_ratio() {
        rec(
            CLUSTER_SLUICE,
            "new_conn_per_s_ratio_to_kube_proxy_alone",
            r,
            "ratio",
            json!({}),
        );
    }
    if let Some(r) = c.p99_ratio() {
        rec(
            CLUSTER_SLUICE,
            "conn_p99_ratio_to_kube_proxy_alone",
            r,
            "ratio",
            json!({}),
        );
    }
}

fn cluster_markdown(c: &ClusterResult, s: &mut String) {
    let _ = writeln!(
        s,
        "## The cluster path (real {}-node cluster, {} web pods; k6, one HTTP request per new TCP connection, {} at once, {:.0} s each)\n",
        c.nodes,
        c.pods,
        c.concurrency,
        c.window.as_secs_f64()
    );
    s.push_str("| path | new conn/s | p50 ms | p99 ms | errors (kind: count) | conn/s ÷ kube-proxy alone | p99 ÷ kube-proxy alone | SYNs to the VIP: from the client / sent on by node-0 to other nodes |\n|---|---:|---:|---:|---|---:|---:|---:|\n");
    let row = |s: &mut String,
               what: &str,
               st: &Option<ConnStep>,
               cr: String,
               pr: String,
               syns: Option<(u64, u64)>| {
        let syns = syns.map_or("-".into(), |(a, b)| format!("{a} / {b}"));
        match st {
            Some(st) => {
                let errs = st.error_kinds();
                let _ = writeln!(
                    s,
                    "| {what} | {:.0} | {:.2} | {:.2} | {} | {cr} | {pr} | {syns} |",
                    st.ok_per_s,
                    st.p50_ms,
                    st.p99_ms,
                    if errs.is_empty() { "0".into() } else { errs }
                );
            }
            None => {
                let _ = writeln!(s, "| {what} | not measured | | | | | | |");
            }
        }
    };
    row(
        s,
        "client → node-0: **sluice** (XDP) → a node's kube-proxy → pod",
        &c.sluice,
        c.conn_ratio().map_or("-".into(), |r| format!("{r:.2}x")),
        c.p99_ratio().map_or("-".into(), |r| format!("{r:.2}x")),
        c.syns[0],
    );
    row(
        s,
        "client → node-0: **kube-proxy alone** → pod (sluice detached)",
        &c.kube_proxy,
        "1.0x".into(),
        "1.0x".into(),
        c.syns[1],
    );
    if !c.errors.is_empty() {
        let _ = writeln!(s, "\nThe cluster section failed: {}", c.errors.join("; "));
    }
    let _ = writeln!(
        s,
        "\n(cluster start, deploy, both windows and teardown took {:.0} s)",
        c.elapsed.as_secs_f64()
    );
}

/// How the cluster rows are taken.
pub fn cluster_notes(c: &ClusterResult) -> Vec<String> {
    vec![format!(
        "Cluster path: a real {}-node Kubernetes cluster on this machine (nodes are network and \
         mount namespaces with their own containerd, kubelet and kube-proxy in iptables mode; \
         tests/src/cluster.rs), sluice deployed with `kubectl apply -k deploy/overlays/beside-metallb` and the image \
         built offline, {} busybox-httpd pods, a `type: LoadBalancer` Service \
         (externalTrafficPolicy: Cluster) whose ingress IP the client routes to node-0. Row 1: \
         node-0's sluice picks a node per connection (XDP), whose kube-proxy DNATs it to a pod. \
         Row 2: the DaemonSet deleted and `sluice detach` on every node, node-0's kube-proxy \
         takes the VIP itself and DNATs to any pod. k6 from the client namespace, {} VUs each \
         opening a new connection as soon as the last answered (closed loop), after a 3 s \
         warm-up: new conn/s is what the path sustains at that concurrency on this shared \
         machine, where the client, the three nodes and the pods share the same cores. Which \
         balancer took the connections is counted on the bridge: SYNs to the VIP that node-0 \
         sends on to another node still addressed to the VIP are sluice's (kube-proxy's DNAT \
         rewrites the address), about 2/3 with sluice and none without.",
        c.nodes, c.pods, c.concurrency
    )]
}

/// Which generator sent the packet-rate windows, and why not live frames where they were refused.
pub fn generator_notes(report: &Report) -> Vec<String> {
    let mut used: Vec<&str> = report
        .pps_runs()
        .into_iter()
        .map(|r| r.generator.as_str())
        .filter(|g| !g.is_empty())
        .collect();
    used.sort_unstable();
    used.dedup();
    let mut notes = Vec::new();
    if !used.is_empty() {
        notes.push(format!(
            "generator of the packet-rate windows in this run: {}",
            used.join("; ")
        ));
    }
    if let Some(why) = sluice_tests::pktgen::live_frames_refused() {
        notes.push(format!(
            "this machine refused XDP live frames ({why}), so raw sockets (AF_PACKET sendmmsg, \
             one pinned thread per CPU) sent the frames: lower rates than live frames, and the \
             generator's own cost (a socket buffer per frame) is in the host CPU figures"
        ));
    }
    notes
}

/// How the figures were taken and what bounds them on this kind of machine.
pub fn method_notes(plan: &Plan) -> Vec<String> {
    vec![
        format!(
            "packet rate: UDP, 64-byte payload (106-byte frames), {} flows (source ports), from \
             our generator: the XDP program `sluice_pktgen` run with BPF_PROG_TEST_RUN in \
             live-frames mode from one thread in the client namespace, or raw sockets where the \
             kernel refuses live frames (which one ran is noted below); each frame leaves the \
             client's veth as a real frame. Counted where it arrives: an nft netdev-ingress \
             counter on every backend (which drops it). Windows of {:.0} s at {} pkt/s offered \
             and at the maximum (the best of {} windows: the host is shared)",
            plan.flows,
            plan.pps_window.as_secs_f64(),
            plan.fixed_pps,
            plan.max_tries
        ),
        "two paths at the maximum. (1) client → backends: frames leave the client's veth, cross \
         the bridge, the lb, the bridge again and reach the backends. On veths the whole chain \
         runs in softirq on the CPU of the generator thread (a veth schedules its peer's NAPI on \
         the sending CPU), so 1/pps is the sum of every hop's time, most of which is not the load \
         balancer: the ratios are compressed by that shared floor (the direct row is the same \
         chain without a load balancer). Worse for XDP, the bridge hands the lb's veth socket \
         buffers it already built, which veth converts (and may copy) for the XDP program: XDP's \
         main saving on a NIC, no socket buffer at all, is not there. (2) into the lb's port: the \
         generator sends out of the lb's switch port, so frames reach the lb's veth as raw XDP \
         frames, as from a NIC ring, and the kernel stack builds the socket buffer itself; a \
         counting XDP program on that port counts and drops what the lb sends out. This \
         path is bound by the load balancer, but still pays the generator, two veth crossings \
         and the counter on the same core. The proxies' user-space part runs on the other core"
            .into(),
        "sluice's windows run with kernel.bpf_stats_enabled on (for its own time per packet), \
         which costs it a little on every XDP program of the path; the others run without"
            .into(),
        "LB ns/pkt (est.), on the path into the lb's port: sluice = its XDP program's own run \
         time (kernel.bpf_stats_enabled); iptables/nft = 1/pps - the floor, where the floor (the \
         generator, two veth crossings and the counter, paid by every contender) = sluice's \
         1/pps - its XDP time. The DNAT figures include one veth artefact: their packets leave \
         as socket buffers that veth converts for the counting XDP program, which sluice's XDP \
         frames do not need; proxies = CPU time of the proxy processes per forwarded packet \
         (excludes the kernel's receive path, so a lower bound)"
            .into(),
        format!(
            "connections: k6 1.1 (constant-arrival-rate, a new TCP connection per request, \
             noVUConnectionReuse: the client closes first) at {:?} new connections/s, {:.0} s \
             each, in one sequence per contender (TIME_WAIT from one step is still there in the \
             next, as under sustained load). 'falls over' = the first step with >= 1% failed \
             requests. k6, the lb and the backends share the 2 cores: past a few thousand \
             connections/s k6 itself is the limit ('not started by k6' counts iterations it had \
             no free VU for)",
            plan.conn_rates,
            plan.conn_window.as_secs_f64()
        ),
        "host CPU ns/pkt in the details is /proc/stat busy time of the whole host over the \
         window per forwarded packet: other work on the host (other engineers' builds and tests \
         share this VM) lands in it; compare rows within one run only"
            .into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(offered: Option<u64>, pps: u64, xdp: Option<f64>, proc_ns: f64) -> PpsRun {
        PpsRun {
            offered,
            seconds: 1.0,
            generated: pps,
            on_wire: pps,
            forwarded: pps,
            per_backend: vec![pps / 3; 3],
            host_cpu_ns_per_pkt: 1000.0,
            proc_cpu_ns_per_pkt: proc_ns,
            xdp_ns_per_pkt: xdp,
            generator: "raw sockets (test)".into(),
        }
    }

    fn step(offered: u32, ok: u64, errors: u64) -> ConnStep {
        ConnStep {
            offered,
            seconds: 1.0,
            ok_per_s: ok as f64,
            ok,
            requests: ok + errors,
            dropped: 0,
            p50_ms: 0.2,
            p99_ms: 2.0,
            errors: vec![("eof".into(), errors)],
            proxy_port_errors: None,
            proxy_no_backend: None,
        }
    }

    /// A report of made-up figures: the ratios and estimates follow from them, and the chart
    /// renders (with the font the bootstrap installs).
    #[test]
    fn ratios_estimates_and_chart() {
        let mut r = Report::new(&Plan::new(true, None, Vec::new()));
        // Into the lb's port: sluice 500 ns/pkt of which 100 its own -> floor 400 ns.
        r.direct = Some(Pps {
            fixed: run(Some(100_000), 100_000, None, 0.0),
            max: run(None, 1_000_000, None, 0.0),
            port_max: None,
        });
        let mut sl = ContenderResult::new(Kind::Sluice);
        sl.pps = Some(Pps {
            fixed: run(Some(100_000), 100_000, Some(100.0), 0.0),
            max: run(None, 666_667, Some(100.0), 0.0),
            port_max: Some(run(None, 2_000_000, Some(100.0), 0.0)),
        });
        sl.conn = vec![step(1000, 1000, 0), step(2000, 2000, 0)];
        // iptables 2500 ns/pkt into the port -> 2500 - 400 = 2100 ns of its own.
        let mut ipt = ContenderResult::new(Kind::Iptables);
        ipt.pps = Some(Pps {
            fixed: run(Some(100_000), 100_000, None, 0.0),
            max: run(None, 500_000, None, 0.0),
            port_max: Some(run(None, 400_000, None, 0.0)),
        });
        let mut ngx = ContenderResult::new(Kind::Nginx);
        ngx.pps = Some(Pps {
            fixed: run(Some(100_000), 20_000, None, 5000.0),
            max: run(None, 50_000, None, 5000.0),
            port_max: Some(run(None, 50_000, None, 5000.0)),
        });
        ngx.conn = vec![step(1000, 1000, 0), step(2000, 500, 1500)];
        ngx.proxy_port_errors = Some(42);
        r.contenders = vec![sl, ipt, ngx];

        let est = |k: Kind| {
            let c = r.contenders.iter().find(|c| c.kind == k).unwrap();
            r.lb_ns_est(c).unwrap()
        };
        assert!((est(Kind::Sluice) - 100.0).abs() < 1e-6);
        assert!((est(Kind::Iptables) - 2100.0).abs() < 1.0);
        assert!((est(Kind::Nginx) - 5000.0).abs() < 1e-6);

        // A section this machine could not run is named, with its reason, and the rest stays.
        r.missing("packet rate without a load balancer: refused (test)".into());
        r.notes.extend(generator_notes(&r));
        let md = r.markdown();
        assert!(
            md.contains("## Not measured in this run\n\n- packet rate without a load balancer: refused (test)"),
            "{md}"
        );
        assert!(
            md.contains("generator of the packet-rate windows in this run: raw sockets (test)"),
            "{md}"
        );
        assert!(md.contains("| 1.3x |"), "pps ratio sluice/iptables: {md}");
        assert!(
            md.contains("| 5.0x |"),
            "port pps ratio sluice/iptables: {md}"
        );
        assert!(
            md.contains("| 40.0x |"),
            "port pps ratio sluice/nginx: {md}"
        );
        assert!(
            md.contains("| 5.0x into the lb's port (1.3x client → backends) | yes |"),
            "the 5x target: {md}"
        );
        assert!(md.contains("| 13.3x |"), "pps ratio sluice/nginx: {md}");
        assert!(
            md.contains("| 21.0x |"),
            "iptables' cost over sluice's: {md}"
        );
        assert!(
            md.contains("| 2000 | 42 |"),
            "nginx falls over at 2000: {md}"
        );

        let dir = std::env::temp_dir().join(format!("sluice-bench-test-{}", std::process::id()));
        r.write(&dir).unwrap();
        let png = fs::read(dir.join("report.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let json: Value =
            serde_json::from_str(&fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        assert!(json["results"].as_array().unwrap().len() > 20);
        let _ = fs::remove_dir_all(&dir);
    }

    /// The cluster rows: both in the Markdown with the ratio, in the JSON by name; `--only
    /// cluster` leaves the lab's tables out.
    #[test]
    fn cluster_rows_and_ratio() {
        let mut r = Report::new(&Plan::new(true, None, vec!["cluster".into()]));
        let mut kp = step(0, 2000, 0);
        kp.p99_ms = 4.0;
        r.cluster = Some(ClusterResult {
            nodes: 3,
            pods: 6,
            concurrency: 16,
            window: Duration::from_secs(10),
            sluice: Some(step(0, 2500, 0)),
            kube_proxy: Some(kp),
            syns: [Some((25_000, 16_000)), Some((20_000, 0))],
            ..Default::default()
        });
        let md = r.markdown();
        assert!(md.contains("The cluster path"), "{md}");
        assert!(
            md.contains("| 2500 | 0.20 | 2.00 | 0 | 1.25x | 0.50x | 25000 / 16000 |"),
            "{md}"
        );
        assert!(!md.contains("Maglev quality"), "{md}");
        let v = r.json();
        let found = |who: &str, metric: &str| {
            v["results"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["contender"] == who && x["metric"] == metric)
                .and_then(|x| x["value"].as_f64())
        };
        assert_eq!(found(CLUSTER_KUBE_PROXY, "new_conn_per_s"), Some(2000.0));
        assert_eq!(
            found(CLUSTER_SLUICE, "new_conn_per_s_ratio_to_kube_proxy_alone"),
            Some(1.25)
        );
    }
}
