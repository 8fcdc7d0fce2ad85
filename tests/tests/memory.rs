//! The DaemonSet's memory limit holds what the agent creates. BPF maps are charged to the memory
//! cgroup of the process that creates them, so the agent pod's limit must cover the connection
//! table, one Maglev table per VIP and the per-CPU counters, not only the process. This test
//! reads the limit from deploy/base/30-daemonset.yaml and the table sizes from deploy/base/20-configmap.yaml,
//! creates a memory cgroup with that limit, and attaches sluice with `SERVICES` VIPs inside it:
//! it must succeed with room left for the agent process itself. It prints the figures behind the
//! formula documented beside the limit. Needs root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use sluice_tests::kube::repo_root;
use sluice_tests::netns::Sandbox;
use sluice_tests::{cmd, require_root, sluice_binary};

/// Services (VIPs, each with 3 nodes) the test creates under the limit.
const SERVICES: usize = 300;
/// What the agent process itself needs beside the maps (measured: ~25 MB RSS for 1,000 Services
/// with 10 endpoints each), with headroom.
const PROCESS_BUDGET: u64 = 64 << 20;

/// The value of `key: VALUE` (or `key: "VALUE"`) on the first line that has it.
fn yaml_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(key)?.strip_prefix(':')?;
        Some(rest.trim().trim_matches('"').to_owned())
    })
}

fn mebibytes(s: &str) -> Result<u64> {
    let n: u64 = s
        .strip_suffix("Mi")
        .with_context(|| format!("memory {s:?}: expected NNNMi"))?
        .parse()?;
    Ok(n << 20)
}

/// A memory cgroup (v1 or v2) with a limit, removed on drop.
struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    fn new(name: &str, limit: u64) -> Result<Self> {
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = if v2 {
            PathBuf::from("/sys/fs/cgroup").join(name)
        } else {
            PathBuf::from("/sys/fs/cgroup/memory").join(name)
        };
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        fs::write(dir.join(file), limit.to_string())?;
        Ok(Self { dir, v2 })
    }

    fn read(&self, v1: &str, v2: &str) -> Result<u64> {
        let file = self.dir.join(if self.v2 { v2 } else { v1 });
        Ok(fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?
            .trim()
            .parse()?)
    }

    /// Memory charged now (maps included) and at most since creation.
    fn usage(&self) -> Result<(u64, u64)> {
        Ok((
            self.read("memory.usage_in_bytes", "memory.current")?,
            self.read("memory.max_usage_in_bytes", "memory.peak")?,
        ))
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `maglev`: the ConfigMap's `maglev-table-size`, a number or "auto" (the config's default);
/// `flow_state`: `table` or `second-chance`.
fn config(services: usize, flows: u64, maglev: &str, flow_state: &str) -> String {
    let mut c = format!("flow_table_size: {flows}\nflow_state: {flow_state}\n");
    if maglev != "auto" {
        c.push_str(&format!("maglev_table_size: {maglev}\n"));
    }
    c.push_str("vips:\n");
    for i in 0..services {
        c.push_str(&format!(
            "  - address: 10.200.{}.{}\n    port: 80\n    backends:\n",
            i / 250,
            i % 250 + 1
        ));
        for b in 1..=3 {
            c.push_str(&format!(
                "      - {{address: 10.9.0.{}, mac: \"02:00:00:00:00:0{b}\"}}\n",
                10 + b
            ));
        }
    }
    c
}

/// What one attach is given: a sandbox prefix of its own (tests run side by side), the
/// ConfigMap's table sizes and the flow state.
struct Attach<'a> {
    sandbox: &'a str,
    services: usize,
    flows: u64,
    maglev: &'a str,
    flow_state: &'a str,
}

/// Attaches sluice with `a.services` VIPs inside a cgroup limited to `limit`; returns the
/// memory charged after the attach (the maps), or the attach's error.
fn attach_under(limit: u64, a: &Attach) -> Result<u64> {
    let Attach {
        sandbox,
        services,
        flows,
        maglev,
        flow_state,
    } = *a;
    let sb = Sandbox::new(sandbox)?;
    let cg = MemCgroup::new(&format!("sluice-{sandbox}-{}", std::process::id()), limit)?;
    let file = sb.bpffs.with_extension("yaml");
    fs::write(&file, config(services, flows, maglev, flow_state))?;
    let bin = sluice_binary()?;
    let script = format!(
        // nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup hierarchy
        // the agent reads its own limit from.
        "echo $$ > {procs} && exec nsenter --net=/run/netns/{ns} {bin} --pin-dir {pins} attach --config {file} --iface memt0",
        procs = cg.procs().display(),
        ns = sb.ns,
        bin = bin.display(),
        pins = sb.bpffs.display(),
        file = file.display(),
    );
    let out = cmd::run(
        Command::new("sh").args(["-c", &script]),
        Duration::from_secs(120),
    )?;
    let _ = fs::remove_file(&file);
    let (now, peak) = cg.usage()?;
    let detach = format!(
        "ip netns exec {} {} --pin-dir {} detach --iface memt0",
        sb.ns,
        bin.display(),
        sb.bpffs.display()
    );
    let _ = cmd::sh(&["sh", "-c", &detach]);
    if !out.status.success() {
        bail!(
            "attach with {services} VIPs under {} MiB failed ({}): {}",
            limit >> 20,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!(
        "memory: {services} VIPs, {flows} flows, maglev {maglev}, {flow_state}: {} MiB charged after attach (peak {} MiB)",
        now >> 20,
        peak >> 20
    );
    Ok(now)
}

/// The DaemonSet's memory limit and the ConfigMap's table sizes.
fn deployed() -> Result<(u64, u64, String)> {
    let deploy = repo_root().join("deploy/base");
    let ds = fs::read_to_string(deploy.join("30-daemonset.yaml"))?;
    let cm = fs::read_to_string(deploy.join("20-configmap.yaml"))?;
    let limits = ds
        .lines()
        .find(|l| l.trim_start().starts_with("limits:"))
        .context("no `limits:` in the DaemonSet")?;
    let limit = mebibytes(
        limits
            .split("memory:")
            .nth(1)
            .context("no memory limit")?
            .trim()
            .trim_end_matches('}')
            .trim(),
    )?;
    let flows: u64 = yaml_value(&cm, "flow-table-size")
        .context("flow-table-size in the ConfigMap")?
        .parse()?;
    let maglev =
        yaml_value(&cm, "maglev-table-size").context("maglev-table-size in the ConfigMap")?;
    Ok((limit, flows, maglev))
}

#[test]
fn the_daemonsets_limit_holds_a_few_hundred_services() -> Result<()> {
    require_root();
    let (limit, flows, maglev) = deployed()?;
    let attach = Attach {
        sandbox: "slmem",
        services: SERVICES,
        flows,
        maglev: &maglev,
        flow_state: "table",
    };
    let charged = attach_under(limit, &attach)?;
    ensure!(
        charged + PROCESS_BUDGET <= limit,
        "{SERVICES} Services take {} MiB of maps: with the agent's {} MiB that is over the DaemonSet's {} MiB limit",
        charged >> 20,
        PROCESS_BUDGET >> 20,
        limit >> 20
    );
    // The limit is real: under a quarter of it the same Services do not fit, and sluice said
    // why before the kernel stopped it.
    let err = attach_under(limit / 4, &attach)
        .err()
        .context("attach under a quarter of the limit succeeded: is the cgroup charged at all?")?;
    println!("memory: under {} MiB: {err:#}", (limit / 4) >> 20);
    ensure!(
        format!("{err:#}").contains("is below what the maps need"),
        "no memory warning before the failure: {err:#}"
    );
    Ok(())
}

/// Second chance records no flow: its node creates the smallest connection tables (1,024
/// entries each), not the configured ones. Measured side by side: the same Services attached
/// in table mode and in second-chance mode, under the DaemonSet's limit.
#[test]
fn second_chance_leaves_the_connection_table_memory_out() -> Result<()> {
    require_root();
    let (limit, flows, maglev) = deployed()?;
    let mut attach = Attach {
        sandbox: "slsc",
        services: SERVICES,
        flows,
        maglev: &maglev,
        flow_state: "table",
    };
    let table = attach_under(limit, &attach)?;
    attach.flow_state = "second-chance";
    let second_chance = attach_under(limit, &attach)?;
    // An entry costs ~116 bytes (IPv4 and its IPv6 share; lb-userspace memory.rs).
    let tables = flows * 100;
    println!(
        "memory: second chance {} MiB, table mode {} MiB: {} MiB less (the connection tables of {flows} flows: ~{} MiB)",
        second_chance >> 20,
        table >> 20,
        (table.saturating_sub(second_chance)) >> 20,
        (flows * 116) >> 20
    );
    ensure!(
        second_chance + tables <= table,
        "second chance took {} MiB, table mode {} MiB: not the connection tables' ~{} MiB less",
        second_chance >> 20,
        table >> 20,
        tables >> 20
    );
    Ok(())
}

/// A restart with another connection-table size (`flow_table_size` changed, or the flow
/// state: second chance keeps the smallest) replaces the pinned tables with tables of the new
/// size and carries their flows over, without a detach: shrunk, grown, and left alone when
/// the size is the same.
#[test]
fn a_pinned_connection_table_is_resized_with_its_flows() -> Result<()> {
    use lb_userspace::dataplane::PinLayout;
    use sluice_tests::fixtures::{Frame, Harness, TCP_SYN, desired};
    require_root();
    let sb = Sandbox::new("slrsz")?;
    let pins = PinLayout::new(&sb.bpffs, "rsz0");
    pins.prepare()?;
    let entries = |name: &str| -> Result<u32> {
        let map = aya::maps::MapData::from_pin(pins.map(name))?;
        Ok(map.info()?.max_entries())
    };
    let three = &[(0, 1, false), (1, 1, false), (2, 1, false)];
    let recorded = {
        let mut h = Harness::pinned(&pins, 4096)?;
        h.apply(&desired(lb_userspace::model::Protocol::Tcp, three))?;
        for sport in 1000..1100 {
            h.run(&Frame::tcp(sport, TCP_SYN).bytes())?;
        }
        h.flow_entries()?
    };
    ensure!(
        recorded.len() == 100,
        "100 flows recorded: {}",
        recorded.len()
    );
    // (IPv4 entries, IPv6's, the pinned IPv4 table kept): shrunk, grown, the same again.
    for (size, ipv6, kept) in [(1024, 1024, false), (8192, 2048, false), (8192, 2048, true)] {
        let before = aya::maps::MapData::from_pin(pins.map("FLOWS"))?
            .info()?
            .id();
        let h = Harness::pinned(&pins, size)?;
        ensure!(
            (entries("FLOWS")?, entries("FLOWS6")?) == (size, ipv6),
            "the pinned tables have {} and {} entries, not {size} and {ipv6}",
            entries("FLOWS")?,
            entries("FLOWS6")?
        );
        ensure!(
            h.flow_entries()? == recorded,
            "the flows were not carried over to {size} entries"
        );
        let after = aya::maps::MapData::from_pin(pins.map("FLOWS"))?
            .info()?
            .id();
        ensure!(
            (before == after) == kept,
            "at {size} entries the pinned table was {} (map id {before} -> {after})",
            if before == after { "kept" } else { "replaced" }
        );
        let left: Vec<String> = fs::read_dir(pins.maps_dir())?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("resized"))
            .collect();
        ensure!(
            left.is_empty(),
            "tables set aside are left pinned: {left:?}"
        );
    }
    Ok(())
}
