//! The sluice image for linux/arm64 as well as linux/amd64 (issue 31). The OCI image index that
//! `cargo xtask image` writes lists both platforms; each platform's image says it is that
//! platform and its /sluice is a static ELF binary for that machine; the arm64 one runs
//! `sluice --version` under qemu-user; and lb-common's and lb-userspace's unit tests pass on
//! arm64 under qemu-user (the flow hash contract, the map words, Maglev, the plan, the config
//! parser, the BGP wire: the code whose results must not depend on the CPU's byte order).
//!
//! Needs the index (`cargo xtask image`, which `./x test` runs before the tests), and Debian's
//! qemu-user-static and gcc-aarch64-linux-gnu (scripts/bootstrap.sh); no root, no namespaces.
//! The arm64 unit tests are built with `--release`, so they reuse the dependencies the image's
//! arm64 binary was built with: a second run rebuilds nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sluice_tests::cmd;
use sluice_tests::image::{self, ARM64, PLATFORMS, Platform};

/// ELF `e_machine` of each platform's binaries.
fn elf_machine(platform: &Platform) -> u16 {
    match platform.arch {
        "amd64" => 62,  // EM_X86_64
        "arm64" => 183, // EM_AARCH64
        other => panic!("no ELF machine known for {other}"),
    }
}

/// A scratch directory of this test process, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Result<Scratch> {
        let dir = image::image_dir().join(format!("check-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One file of a tar archive (GNU tar reads gzip'd ones too).
fn tar_file(archive: &Path, path: &str) -> Result<Vec<u8>> {
    let out = cmd::run_ok(
        Command::new("tar").arg("-xOf").arg(archive).arg(path),
        cmd::DEFAULT_TIMEOUT,
    )?;
    Ok(out.stdout)
}

/// A blob of the OCI archive, by its descriptor, as JSON.
fn blob_json(archive: &Path, descriptor: &Value) -> Result<Value> {
    let digest = descriptor["digest"]
        .as_str()
        .with_context(|| format!("a descriptor without digest: {descriptor}"))?;
    let path = format!("blobs/{}", digest.replacen(':', "/", 1));
    Ok(serde_json::from_slice(&tar_file(archive, &path)?)?)
}

/// The platform entries of the archive's index: `index.json` names the image index (buildah
/// writes the list it pushed as one entry), or holds the platforms itself.
fn platform_entries(archive: &Path) -> Result<Vec<Value>> {
    let mut index: Value = serde_json::from_slice(&tar_file(archive, "index.json")?)?;
    loop {
        let manifests = index["manifests"]
            .as_array()
            .with_context(|| format!("an index without manifests: {index}"))?
            .clone();
        match manifests.as_slice() {
            [only] if only["mediaType"] == "application/vnd.oci.image.index.v1+json" => {
                index = blob_json(archive, only)?;
            }
            _ => return Ok(manifests),
        }
    }
}

/// The index lists linux/amd64 and linux/arm64, nothing else; each entry's image config says
/// the same platform, and its one layer holds /sluice, a static binary for that machine. The
/// arm64 binary from the image answers `--version` under qemu-user with the crate's version.
#[test]
fn the_image_index_holds_amd64_and_arm64_and_the_arm64_binary_runs() -> Result<()> {
    let archive = image::sluice_index_archive(image::default_tag());
    ensure!(
        archive.is_file(),
        "{} missing: build it with `cargo xtask image` (as root; `./x test` does it first)",
        archive.display()
    );
    let entries = platform_entries(&archive)?;
    let listed: Vec<String> = entries
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["platform"]["os"].as_str().unwrap_or("?"),
                e["platform"]["architecture"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let want: Vec<String> = PLATFORMS
        .iter()
        .map(|p| format!("linux/{}", p.arch))
        .collect();
    ensure!(listed == want, "the index lists {listed:?}, want {want:?}");
    let scratch = Scratch::new("index")?;
    for (platform, entry) in PLATFORMS.iter().zip(&entries) {
        let manifest = blob_json(&archive, entry)?;
        let config = blob_json(&archive, &manifest["config"])?;
        ensure!(
            config["architecture"] == platform.arch && config["os"] == "linux",
            "linux/{}: the image config says {}/{}",
            platform.arch,
            config["os"],
            config["architecture"]
        );
        let layers = manifest["layers"].as_array().context("no layers")?;
        ensure!(
            layers.len() == 1,
            "linux/{}: {} layers",
            platform.arch,
            layers.len()
        );
        let dir = scratch.0.join(platform.arch);
        fs::create_dir_all(&dir)?;
        let layer = dir.join("layer.tar");
        let digest = layers[0]["digest"]
            .as_str()
            .context("a layer without digest")?;
        fs::write(
            &layer,
            tar_file(&archive, &format!("blobs/{}", digest.replacen(':', "/", 1)))?,
        )?;
        cmd::run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(&layer)
                .arg("-C")
                .arg(&dir),
            cmd::DEFAULT_TIMEOUT,
        )?;
        let binary = dir.join("sluice");
        let elf = fs::read(&binary)
            .with_context(|| format!("linux/{}: no /sluice in the image", platform.arch))?;
        ensure!(
            elf.starts_with(b"\x7fELF") && elf.len() > 20,
            "linux/{}: /sluice is not an ELF binary",
            platform.arch
        );
        let machine = u16::from_le_bytes([elf[18], elf[19]]);
        ensure!(
            machine == elf_machine(platform),
            "linux/{}: /sluice is built for ELF machine {machine}, want {}",
            platform.arch,
            elf_machine(platform)
        );
        println!(
            "linux/{}: /sluice, {} bytes, ELF machine {machine}",
            platform.arch,
            elf.len()
        );
    }
    let cross = ARM64.cross.as_ref().context("arm64 is cross-built")?;
    let out = cmd::run_ok(
        Command::new(cross.qemu)
            .arg(scratch.0.join(ARM64.arch).join("sluice"))
            .arg("--version"),
        cmd::DEFAULT_TIMEOUT,
    )
    .context("qemu-user-static (scripts/bootstrap.sh installs it)")?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(
        version == format!("sluice {}", image::default_tag()),
        "the arm64 sluice under qemu says {version:?}"
    );
    println!("linux/arm64 under {}: {version}", cross.qemu);
    Ok(())
}

/// `cargo test --release --target aarch64-unknown-linux-musl <args>` under qemu-user: the
/// number of tests that passed (every "test result" line ok).
fn arm64_tests(args: &[&str]) -> Result<usize> {
    let mut all = vec!["test", "--release", "--locked"];
    all.extend(args);
    let mut c = ARM64.cargo(&all);
    let what = cmd::describe(&c);
    eprintln!("+ {what}");
    // A first build compiles lb-userspace's tests for arm64 (minutes on 2 busy cores).
    let out = cmd::run(&mut c, Duration::from_secs(1800))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "`{what}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut passed = 0;
    for line in stdout.lines().filter(|l| l.starts_with("test result:")) {
        ensure!(line.starts_with("test result: ok."), "`{what}`: {line}");
        passed += line
            .split(';')
            .find_map(|part| part.trim().strip_suffix(" passed"))
            .and_then(|n| {
                n.trim_start_matches("test result: ok. ")
                    .parse::<usize>()
                    .ok()
            })
            .with_context(|| format!("`{what}`: no count in {line:?}"))?;
    }
    Ok(passed)
}

#[test]
fn the_unit_tests_pass_on_arm64_under_qemu() -> Result<()> {
    let common = arm64_tests(&["--package", "lb-common"])?;
    // Left out by name, and said: the BGP socket tests set TCP_MD5SIG and IP_MINTTL on real
    // loopback sockets, options qemu-user does not translate for the host kernel (setsockopt
    // answers EINVAL); they run natively in `cargo test -p lb-userspace`.
    let qemu_cannot = ["bgp::socket::tests::"];
    let mut args = vec!["--package", "lb-userspace", "--lib", "--"];
    for t in qemu_cannot {
        args.extend(["--skip", t]);
    }
    let userspace = arm64_tests(&args)?;
    println!(
        "arm64 under qemu: lb-common {common} tests passed, lb-userspace {userspace} (not run here: {qemu_cannot:?}, kernel socket options qemu-user does not translate)"
    );
    // Far fewer would mean the tests were not found, not that they passed.
    ensure!(common >= 6, "only {common} lb-common tests ran");
    ensure!(
        userspace >= 150,
        "only {userspace} lb-userspace unit tests ran"
    );
    Ok(())
}
