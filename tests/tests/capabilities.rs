//! The agent's pod runs with the DaemonSet's capabilities only (deploy/base/30-daemonset.yaml:
//! no CAP_SYS_ADMIN). Under exactly those, in the lab: sluice loads, attaches and forwards,
//! and a reconcile that changes nothing rebuilds no Maglev table, although an installed table
//! cannot be opened there (BPF_MAP_GET_FD_BY_ID takes CAP_SYS_ADMIN); one that changes a
//! VIP's backends does rebuild.

use std::time::{Duration, Instant};

use sluice_tests::{
    cmd,
    lab::{BackendSpec, HTTP_PORT, Lab, LabConfig, NS_IFACE},
    require_root,
};

const METRICS: &str = "127.0.0.1:9493";

/// The `capabilities: add:` list of the agent's container, lower case (setpriv's names).
fn daemonset_capabilities() -> Vec<String> {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/base/30-daemonset.yaml"
    ))
    .expect("read the DaemonSet");
    let mut caps = Vec::new();
    let mut in_add = false;
    for line in yaml.lines().map(str::trim) {
        if line == "add:" {
            in_add = true;
        } else if in_add && line.starts_with("- ") {
            caps.push(line.trim_start_matches("- ").to_lowercase());
        } else if in_add && !line.starts_with('#') {
            in_add = false;
        }
    }
    assert!(
        caps.contains(&"bpf".to_string()),
        "no capabilities found: {caps:?}"
    );
    caps
}

fn metric(lab: &Lab, name: &str) -> f64 {
    lab.metrics(METRICS)
        .expect("/metrics")
        .iter()
        .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// Sends SIGHUP and waits for the reconcile it starts: (rebuilds before, rebuilds after).
fn reload(lab: &Lab, pid: u32) -> (f64, f64) {
    let (reconciles, rebuilds) = (
        metric(lab, "sluice_reconciles_total"),
        metric(lab, "sluice_maglev_rebuilds_total"),
    );
    cmd::run(
        std::process::Command::new("kill").args(["-HUP", &pid.to_string()]),
        Duration::from_secs(10),
    )
    .expect("kill -HUP");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(lab, "sluice_reconciles_total") <= reconciles {
        assert!(Instant::now() < deadline, "no reconcile after SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    }
    (rebuilds, metric(lab, "sluice_maglev_rebuilds_total"))
}

#[test]
fn under_the_daemonsets_capabilities_an_unchanged_reconcile_rebuilds_no_table() {
    require_root();
    let lab = Lab::build(LabConfig::default()).expect("lab");
    let all: Vec<BackendSpec> = (0..lab.backends()).map(BackendSpec::active).collect();
    let config = lab.write_config(&all).expect("config");
    let caps = daemonset_capabilities();
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let config_arg = config.to_string_lossy().to_string();
    let mut run = lab
        .spawn_sluice_under(
            &["setpriv", "--bounding-set", &bounding, "--inh-caps", "-all"],
            &[
                "run",
                "--config",
                &config_arg,
                "--iface",
                NS_IFACE,
                "--metrics-addr",
                METRICS,
            ],
        )
        .expect("sluice run under the DaemonSet's capabilities");
    lab.wait_xdp(true, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("not attached with {caps:?}: {e:#}\n{}", run.log_text()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.metrics(METRICS).is_err() {
        assert!(
            run.try_wait().expect("wait").is_none(),
            "{}",
            run.log_text()
        );
        assert!(Instant::now() < deadline, "no /metrics: {}", run.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers = lab.curl_vip(10).expect("HTTP through the VIP");
    assert_eq!(answers.len(), 10);

    // The same config again: nothing changes, nothing is rebuilt.
    let (before, after) = reload(&lab, run.pid());
    assert_eq!(
        after,
        before,
        "a reconcile without changes rebuilt {} Maglev tables under {caps:?}",
        after - before
    );

    // A drained backend changes every VIP's table: rebuilt.
    let mut drained = all.clone();
    drained[2] = BackendSpec::drained(2);
    // (Each write_config is a new file; sluice reloads the one it was started with.)
    let new = lab.write_config(&drained).expect("config");
    std::fs::copy(&new, &config).expect("replace the config");
    let (before, after) = reload(&lab, run.pid());
    assert!(
        after > before,
        "a drain rebuilt no table ({before} -> {after}): {}",
        run.log_text()
    );
    eprintln!(
        "capabilities {caps:?}: unchanged reconcile 0 rebuilds, drain {} rebuilds",
        after - before
    );
    lab.curl_vip(10)
        .expect("HTTP through the VIP after the drain");

    // `inspect maglev` under the same capabilities cannot open the installed table: it shows
    // the table rebuilt from the slots, which must be the installed one.
    let vip = format!("{}:{HTTP_PORT}/tcp", lab.vip());
    let bin = sluice_tests::sluice_binary().expect("sluice binary");
    let bin = bin.to_string_lossy();
    let pin_dir = lab.pin_dir().to_string_lossy().to_string();
    let wrapper = ["setpriv", "--bounding-set", &bounding, "--inh-caps", "-all"];
    let mut argv = wrapper.to_vec();
    argv.extend([
        &*bin,
        "--pin-dir",
        &pin_dir,
        "inspect",
        "maglev",
        &vip,
        "-o",
        "json",
    ]);
    let out = lab
        .exec_ok(lab.lb_ns(), &argv)
        .expect("inspect maglev under the DaemonSet's capabilities");
    let rebuilt: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let installed: serde_json::Value = serde_json::from_slice(
        &lab.sluice_ok(&["inspect", "maglev", &vip, "-o", "json"])
            .expect("inspect maglev as root")
            .stdout,
    )
    .expect("JSON");
    assert_eq!(rebuilt["table"], "rebuilt", "{rebuilt}");
    assert_eq!(installed["table"], "installed", "{installed}");
    assert_eq!(rebuilt["table_fingerprint"], installed["table_fingerprint"]);
    assert_eq!(rebuilt["backends"], installed["backends"]);

    // `sluice trace` too (the ring buffer is read through mmap).
    let mut trace = lab
        .spawn_sluice_under(&wrapper, &["trace", "--iface", NS_IFACE, "--count", "1"])
        .expect("trace under the DaemonSet's capabilities");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !trace.log_text().contains("# tracing") {
        assert!(
            trace.try_wait().expect("wait").is_none(),
            "{}",
            trace.log_text()
        );
        assert!(Instant::now() < deadline, "trace did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.curl_vip(1).expect("HTTP through the VIP");
    while trace.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "trace --count 1 did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        trace.log_text().contains("# 1 events"),
        "{}",
        trace.log_text()
    );
    drop(run);
}
