//! `cargo xtask <command>`: sluice's demo lab, its whole test suite, its benchmark and a soak run.
//! The `./x` script installs the toolchains first and then calls these.

mod bench;
mod bench_agent;
mod bench_scale;
mod soak;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use sluice_tests::{BackendSpec, Lab, LabConfig, require_root};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a namespace lab, attach sluice, send real requests and show how they spread.
    Demo {
        /// HTTP requests to send (each a new TCP connection).
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        #[arg(long, default_value_t = 3)]
        backends: usize,
    },
    /// Every test: formatting, clippy, unit, packet fixtures, real-packet lab tests and a real
    /// multi-node cluster running the image.
    Test,
    /// Build the sluice image offline: a static (musl) sluice in an empty (`scratch`) image,
    /// image localhost/sluice:<tag>, exported as OCI archives: linux/amd64 alone in
    /// target/image/sluice-<tag>.oci.tar, and an image index of linux/amd64 and linux/arm64
    /// (cross-compiled) in target/image/sluice-<tag>.multiarch.oci.tar.
    Image {
        /// The image tag (default: the crate version, which deploy/ names).
        #[arg(long)]
        tag: Option<String>,
    },
    /// sluice side by side with iptables/nft DNAT, nginx stream and haproxy on one lab:
    /// packet rate, connections, Maglev quality and ns/packet; then the cluster path on a real
    /// cluster beside kube-proxy alone; writes target/bench/report.*.
    Bench {
        /// A shorter run (under 3 minutes): fewer and shorter windows.
        #[arg(long)]
        quick: bool,
        /// BPF_PROG_TEST_RUN runs per path (default 200000 quick, 1000000 full).
        #[arg(long)]
        repeat: Option<u32>,
        /// Only these contenders (comma-separated: sluice,iptables,nft,nginx,haproxy) and/or
        /// `cluster` (the cluster path beside kube-proxy alone); `--only cluster`: that section
        /// alone; `--only xdp`: the XDP program's ns/packet alone.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// EndpointSlice changes timed in the agent section (default 200; 100 with --quick).
        #[arg(long)]
        agent_changes: Option<usize>,
        /// Services (x 10 endpoints) of the agent's full-sync figure.
        #[arg(long, default_value_t = 1000)]
        agent_services: usize,
        /// Only the agent section (and the scale section unless --no-scale).
        #[arg(long)]
        agent_only: bool,
        /// The scale section's size: NODES x SERVICES (of 2 ports each), all under
        /// externalTrafficPolicy Cluster (issue 27: 1,000 nodes x 10,000 Service ports).
        #[arg(long, default_value = "1000x5000", value_parser = parse_scale)]
        scale: (usize, usize),
        /// EndpointSlice changes timed in the scale section.
        #[arg(long, default_value_t = 50)]
        scale_changes: usize,
        /// Nodes made NotReady at once (then Ready again) in the scale section.
        #[arg(long, default_value_t = 100)]
        scale_burst: usize,
        /// Only the scale section.
        #[arg(long)]
        scale_only: bool,
        /// No scale section.
        #[arg(long)]
        no_scale: bool,
    },
    /// Minutes of mixed TCP/UDP/HTTP traffic through `sluice run` with backend churn every few
    /// seconds: lost connections, memory and map sizes (not part of `test`).
    Soak(soak::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Demo { requests, backends } => demo(requests, backends),
        Cmd::Test => test(),
        Cmd::Image { tag } => image(tag.as_deref()),
        Cmd::Bench {
            quick,
            repeat,
            only,
            agent_changes,
            agent_services,
            agent_only,
            scale,
            scale_changes,
            scale_burst,
            scale_only,
            no_scale,
        } => {
            let scale_size = sluice_tests::scale::Size {
                nodes: scale.0,
                services: scale.1,
                slice_changes: scale_changes,
                node_burst: scale_burst,
            };
            if scale_only {
                return bench_scale::run(scale_size);
            }
            let plan = bench::Plan::new(quick, repeat, only);
            if !plan.xdp_only() {
                // The ns/packet section loads the object itself; the rest runs the binary.
                build_sluice()?;
            }
            if !agent_only {
                bench::run(plan.clone())?;
            }
            if !plan.lab_wanted() || plan.xdp_only() {
                // `--only cluster` or `--only xdp`: no agent or scale section either.
                return Ok(());
            }
            let changes = agent_changes.unwrap_or(if quick { 100 } else { 200 });
            bench_agent::run(changes, agent_services)?;
            if no_scale {
                return Ok(());
            }
            bench_scale::run(scale_size)
        }
        Cmd::Soak(args) => soak::run(&args),
    }
}

/// `--scale NODESxSERVICES`.
fn parse_scale(text: &str) -> Result<(usize, usize), String> {
    let (nodes, services) = text
        .split_once('x')
        .ok_or_else(|| format!("{text:?}: expected NODESxSERVICES, e.g. 1000x5000"))?;
    let number = |s: &str| s.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    Ok((number(nodes)?, number(services)?))
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("+ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The sluice binary the lab runs: built first, found next to the test executables.
fn build_sluice() -> anyhow::Result<()> {
    cargo(&["build", "--package", "lb-userspace", "--bin", "sluice"])
}

/// `cargo xtask image`: see [`Cmd::Image`].
fn image(tag: Option<&str>) -> anyhow::Result<()> {
    require_root();
    let tag = tag.unwrap_or(sluice_tests::image::default_tag());
    let images = sluice_tests::image::build_sluice_images_from_source(tag)?;
    println!(
        "{}:{tag}\n  linux/amd64:             {}\n  linux/amd64+linux/arm64: {}\n\
         (load one on a node with `ctr -n k8s.io images import FILE`: ctr takes the node's platform)",
        sluice_tests::image::SLUICE_IMAGE,
        images.amd64.display(),
        images.index.display(),
    );
    Ok(())
}

fn test() -> anyhow::Result<()> {
    require_root();
    cargo(&["fmt", "--all", "--check"])?;
    // The eBPF crate only builds for the BPF target, with its own nightly.
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    clippy_ebpf()?;
    build_sluice()?;
    // The images: the amd64 one the cluster test deploys (tests/tests/cluster.rs), and the
    // index of every platform that tests/tests/multiarch.rs checks.
    sluice_tests::image::build_sluice_images_from_source(sluice_tests::image::default_tag())?;
    cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--no-fail-fast",
    ])?;
    eprintln!("all tests passed");
    Ok(())
}

fn clippy_ebpf() -> anyhow::Result<()> {
    let toolchain =
        std::env::var("SLUICE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly-2026-08-05".into());
    let args = [
        "run",
        &toolchain,
        "cargo",
        "clippy",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ];
    eprintln!("+ (lb-ebpf) rustup {}", args.join(" "));
    let status = Command::new("rustup")
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"))
        .status()
        .context("running clippy on lb-ebpf")?;
    if !status.success() {
        bail!("clippy on lb-ebpf failed ({status})");
    }
    Ok(())
}

fn demo(requests: usize, backends: usize) -> anyhow::Result<()> {
    require_root();
    build_sluice()?;
    println!(
        "building the lab: client, load balancer, switch and {backends} backends in network namespaces"
    );
    let lab = Lab::build(LabConfig {
        backends,
        udp: false,
    })?;
    let specs: Vec<BackendSpec> = (0..backends).map(BackendSpec::active).collect();
    lab.attach(&specs)?;
    println!(
        "sluice attached (native XDP) on {} in {}; VIP {} -> {} backends",
        lab.lb_iface(),
        lab.lb_ns(),
        lab.vip(),
        backends
    );
    println!("sending {requests} HTTP requests from the client, one TCP connection each ...");
    let answers = lab.curl_vip(requests)?;
    println!("{} answers received\n", answers.len());
    let out = lab.sluice_ok(&["inspect", "stats"])?;
    println!(
        "$ sluice inspect stats\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = lab.sluice_ok(&["inspect", "maglev", &format!("{}:80/tcp", lab.vip())])?;
    println!(
        "$ sluice inspect maglev {}:80/tcp\n{}",
        lab.vip(),
        String::from_utf8_lossy(&out.stdout)
    );
    lab.detach()?;
    drop(lab);
    println!("lab torn down");
    Ok(())
}
