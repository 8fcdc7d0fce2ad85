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

/// `maglev`: the ConfigMap's `maglev-table-size`, a number or "auto" (the config's default).
fn config(services: usize, flows: u64, maglev: &str) -> String {
    let mut c = format!("flow_table_size: {flows}\n");
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

/// Attaches sluice with `services` VIPs inside a cgroup limited to `limit`; returns the memory
/// charged after the attach (the maps), or the attach's error.
fn attach_under(limit: u64, services: usize, flows: u64, maglev: &str) -> Result<u64> {
    let sb = Sandbox::new("slmem")?;
    let cg = MemCgroup::new(&format!("sluice-memtest-{}", std::process::id()), limit)?;
    let file = sb.bpffs.with_extension("yaml");
    fs::write(&file, config(services, flows, maglev))?;
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
        "memory: {services} VIPs, {flows} flows, maglev {maglev}: {} MiB charged after attach (peak {} MiB)",
        now >> 20,
        peak >> 20
    );
    Ok(now)
}

#[test]
fn the_daemonsets_limit_holds_a_few_hundred_services() -> Result<()> {
    require_root();
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
    let charged = attach_under(limit, SERVICES, flows, &maglev)?;
    ensure!(
        charged + PROCESS_BUDGET <= limit,
        "{SERVICES} Services take {} MiB of maps: with the agent's {} MiB that is over the DaemonSet's {} MiB limit",
        charged >> 20,
        PROCESS_BUDGET >> 20,
        limit >> 20
    );
    // The limit is real: under a quarter of it the same Services do not fit, and sluice said
    // why before the kernel stopped it.
    let err = attach_under(limit / 4, SERVICES, flows, &maglev)
        .err()
        .context("attach under a quarter of the limit succeeded: is the cgroup charged at all?")?;
    println!("memory: under {} MiB: {err:#}", (limit / 4) >> 20);
    ensure!(
        format!("{err:#}").contains("is below what the maps need"),
        "no memory warning before the failure: {err:#}"
    );
    Ok(())
}
