//! The config-file path at scale (issue 27): one `sluice attach --config` with 1,000 VIPs x 100
//! backends (the same 100 nodes behind every VIP, as every `externalTrafficPolicy: Cluster`
//! Service of a 100-node cluster has them) applies everything, nothing left out, in seconds;
//! then `inspect` and `explain` answer on it, and the maps hold one entry per backend and one
//! table for all. Before backends were shared this state needed 100,000 backend slots (the maps
//! had 16,384) and 1,000 tables. Needs root.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sluice_tests::netns::Sandbox;
use sluice_tests::{cmd, require_root, sluice_binary};

const VIPS: usize = 1000;
const BACKENDS: usize = 100;
/// "In seconds": the attach (parse, validate, load, apply) of the whole state, with room for a
/// debug build on a loaded 2-core machine (measured ~2 s).
const ATTACH_BUDGET: Duration = Duration::from_secs(30);

fn vip(i: usize) -> String {
    format!("10.200.{}.{}", i / 250, i % 250 + 1)
}

fn config() -> String {
    let backends: String = (0..BACKENDS)
        .map(|b| {
            format!(
                "      - {{address: 10.9.0.{}, mac: \"02:00:00:00:{:02x}:{:02x}\"}}\n",
                10 + b,
                b / 256,
                b % 256
            )
        })
        .collect();
    let mut c = String::from("vips:\n");
    for i in 0..VIPS {
        c.push_str(&format!(
            "  - address: {}\n    port: 80\n    backends:\n{backends}",
            vip(i)
        ));
    }
    c
}

/// `sluice --pin-dir PINS ARGS...` in the sandbox's namespace; its stdout, or its error.
fn sluice(sb: &Sandbox, args: &[&str]) -> Result<(String, Duration)> {
    let bin = sluice_binary()?;
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &sb.ns])
        .arg(&bin)
        .arg("--pin-dir")
        .arg(&sb.bpffs)
        .args(args);
    let started = Instant::now();
    let out = cmd::run_ok(&mut command, Duration::from_secs(300))
        .with_context(|| format!("sluice {}", args.join(" ")))?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        started.elapsed(),
    ))
}

#[test]
fn a_thousand_vips_of_a_hundred_backends_apply_whole_and_answer() -> Result<()> {
    require_root();
    let sb = Sandbox::new("slscale")?;
    let file = sb.bpffs.with_extension("yaml");
    fs::write(&file, config())?;
    let attach = sluice(
        &sb,
        &[
            "attach",
            "--config",
            &file.to_string_lossy(),
            "--iface",
            "memt0",
        ],
    );
    let _ = fs::remove_file(&file);
    let (_, took) = attach?;
    println!(
        "config scale: attach of {VIPS} VIPs x {BACKENDS} backends took {:.2} s",
        took.as_secs_f64()
    );
    let result = (|| -> Result<()> {
        ensure!(
            took < ATTACH_BUDGET,
            "the attach took {took:?}, over {ATTACH_BUDGET:?}"
        );
        let (vips, took) = sluice(&sb, &["inspect", "vips", "-o", "json", "--iface", "memt0"])?;
        let vips: Value = serde_json::from_str(&vips)?;
        let rows = vips["vips"].as_array().context("inspect vips: no rows")?;
        println!(
            "config scale: inspect vips answered {} rows in {:.2} s",
            rows.len(),
            took.as_secs_f64()
        );
        ensure!(
            rows.len() == VIPS,
            "{} VIPs in the maps, {VIPS} configured",
            rows.len()
        );
        for row in rows {
            ensure!(
                row["backends"] == BACKENDS && row["live_backends"] == BACKENDS,
                "a VIP with other than {BACKENDS} live backends: {row}"
            );
        }
        let tables: std::collections::BTreeSet<String> =
            rows.iter().map(|r| r["table"].to_string()).collect();
        ensure!(
            tables.len() == 1,
            "VIPs with the same backends share one table: {} tables",
            tables.len()
        );
        let (backends, took) = sluice(
            &sb,
            &[
                "inspect", "backends", "-o", "json", "--iface", "memt0", "--agent", "off",
            ],
        )?;
        let backends: Value = serde_json::from_str(&backends)?;
        let rows = backends["backends"]
            .as_array()
            .context("inspect backends: no rows")?;
        let ids: std::collections::BTreeSet<String> =
            rows.iter().map(|r| r["backend_id"].to_string()).collect();
        println!(
            "config scale: inspect backends answered {} rows ({} distinct backends) in {:.2} s",
            rows.len(),
            ids.len(),
            took.as_secs_f64()
        );
        ensure!(rows.len() == VIPS * BACKENDS, "{} backend rows", rows.len());
        ensure!(
            ids.len() == BACKENDS,
            "one entry per backend: {} ids",
            ids.len()
        );
        let last = format!("{}:80/tcp", vip(VIPS - 1));
        let (maglev, _) = sluice(
            &sb,
            &["inspect", "maglev", &last, "-o", "json", "--iface", "memt0"],
        )?;
        let maglev: Value = serde_json::from_str(&maglev)?;
        ensure!(
            maglev["backends"].as_array().map(Vec::len) == Some(BACKENDS),
            "inspect maglev {last}: {maglev}"
        );
        let (explained, took) = sluice(
            &sb,
            &[
                "explain",
                "192.0.2.7:40000",
                &last,
                "-o",
                "json",
                "--iface",
                "memt0",
            ],
        )?;
        let explained: Value = serde_json::from_str(&explained)?;
        println!(
            "config scale: explain answered in {:.2} s: {}",
            took.as_secs_f64(),
            explained["new_connection"]["why"]
        );
        ensure!(
            explained["new_connection"]["decided_by"] == "maglev"
                && explained["new_connection"]["backend"].is_string(),
            "explain {last}: {explained}"
        );
        Ok(())
    })();
    let _ = sluice(&sb, &["detach", "--iface", "memt0"]);
    result
}
