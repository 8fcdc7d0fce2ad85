//! Builds the XDP object (lb-ebpf) for the BPF target with the pinned nightly, so that
//! `include_bytes_aligned!` in dataplane.rs embeds it into the `sluice` binary.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    // bpf-linker must be built against the same LLVM major as this nightly (LLVM 22):
    // a floating `nightly` breaks the link. Overridable for toolchain experiments.
    println!("cargo::rerun-if-env-changed=SLUICE_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("SLUICE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly-2026-08-05".to_owned());
    let metadata = cargo_metadata_root()?;
    let root_dir = format!("{metadata}/lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the XDP programs (run ./x test or scripts/bootstrap.sh to install the toolchain)",
    )
}

/// The workspace root: lb-userspace's parent directory.
fn cargo_metadata_root() -> anyhow::Result<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let parent = std::path::Path::new(&dir)
        .parent()
        .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR has no parent"))?;
    Ok(parent.display().to_string())
}
