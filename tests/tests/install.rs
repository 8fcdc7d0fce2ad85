//! The install commands of docs/install.md (and the README's, the same) work on the first try against a real API server,
//! for every overlay of deploy/overlays: its ```sh block that installs an overlay, run line by
//! line as written (the overlay's name put in), on a fresh server each time; after it, every
//! object the overlay renders exists, the IPAddressPool of `l2-announce` and `bgp` too.
//!
//! Why the block has more than `kubectl apply -k`: those two overlays create the IPAddressPool
//! resource and a pool at once, and kubectl maps every object to its resource before it sends
//! any, so a single apply on a new cluster fails on the pool ("no matches for kind
//! IPAddressPool"). The test shows that too, and says so when a kubectl stops doing it.
//!
//! Needs root (the API server harness) and kubectl (scripts/kube-apiserver.sh); run it under the
//! shared lab lock.

use std::fs;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sluice_tests::kube::{Kube, overlays, repo_root};
use sluice_tests::require_root;

const PAGE: &str = "docs/install.md";
/// The overlay the install block names; the test puts each overlay's name in its place.
const DOCUMENTED_OVERLAY: &str = "deploy/overlays/l2-announce";

/// The lines of the page's ```sh block that installs an overlay (`kubectl apply -k` of it),
/// with their line numbers.
fn install_block() -> Result<Vec<(usize, String)>> {
    let text = fs::read_to_string(repo_root().join(PAGE))?;
    let mut block: Option<Vec<(usize, String)>> = None;
    for (i, line) in text.lines().enumerate() {
        match (&mut block, line.trim()) {
            (None, "```sh") => block = Some(Vec::new()),
            (Some(lines), "```") => {
                let apply = format!("kubectl apply -k {DOCUMENTED_OVERLAY}");
                if lines.iter().any(|(_, l)| l.starts_with(&apply)) {
                    return Ok(lines.clone());
                }
                block = None;
            }
            (Some(lines), l) if !l.is_empty() && !l.starts_with('#') => {
                lines.push((i + 1, l.to_owned()))
            }
            _ => {}
        }
    }
    anyhow::bail!("{PAGE} has no ```sh block with `kubectl apply -k {DOCUMENTED_OVERLAY}`")
}

/// `kubectl ARGS` in the repository (the docs' paths are relative to it); its output.
fn kubectl(kube: &Kube, args: &[&str]) -> Result<std::process::Output> {
    let out = kube
        .kubectl_command(0, args)
        .current_dir(repo_root())
        .output()
        .context("running kubectl")?;
    Ok(out)
}

/// Every object `dir` renders exists on the server: `kubectl get -k` fails naming any missing.
fn every_object_exists(kube: &Kube, dir: &str) -> Result<Vec<String>> {
    let out = kubectl(kube, &["get", "-k", dir, "-o", "json"])?;
    ensure!(
        out.status.success(),
        "`kubectl get -k {dir}`: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let list: Value = serde_json::from_slice(&out.stdout)?;
    Ok(list["items"]
        .as_array()
        .context("`kubectl get -k` without items")?
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

#[test]
fn the_documented_install_works_first_time_for_every_overlay() -> Result<()> {
    require_root();
    let block = install_block()?;
    // The README's five steps give the same commands.
    let readme = fs::read_to_string(repo_root().join("README.md"))?;
    for (line, command) in &block {
        ensure!(
            readme.lines().any(|l| l.trim() == command),
            "README.md lacks `{command}` ({PAGE}:{line}): its install steps differ from the guide's"
        );
    }
    let names = overlays()?;
    ensure!(names.len() >= 3, "deploy/overlays holds only {names:?}");
    for name in &names {
        let dir = format!("deploy/overlays/{name}");
        // The single apply, on a fresh server: what the block's first steps are for.
        let kube = Kube::start(None)?;
        let single = kubectl(&kube, &["apply", "-k", &dir])?;
        let stderr = String::from_utf8_lossy(&single.stderr);
        println!(
            "{name}: a single `kubectl apply -k` on a new cluster: {}",
            if single.status.success() {
                "works".to_owned()
            } else {
                format!("fails: {}", stderr.trim())
            }
        );
        drop(kube);
        // The documented commands, on another fresh server, as written.
        let kube = Kube::start(None)?;
        for (line, command) in &block {
            let command = command.replace(DOCUMENTED_OVERLAY, &dir);
            let args: Vec<&str> = command.split_whitespace().collect();
            let (program, args) = args.split_first().context("an empty line")?;
            ensure!(
                *program == "kubectl",
                "{PAGE}:{line}: the install block runs {program}, which this test cannot"
            );
            let out = kubectl(&kube, args)?;
            ensure!(
                out.status.success(),
                "{PAGE}:{line}: `{command}` failed on a new cluster ({name}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let objects = every_object_exists(&kube, &dir)?;
        let pool = objects.iter().any(|o| o.starts_with("IPAddressPool/"));
        ensure!(
            pool == (name != "beside-metallb"),
            "{name}: an IPAddressPool {} after the install: {objects:?}",
            if pool { "exists" } else { "is missing" }
        );
        println!("{name}: installed as documented: {}", objects.join(", "));
    }
    Ok(())
}
