//! Container images built here, offline, with buildah (no registry is reachable from this machine
//! or CI): `FROM scratch` plus static binaries, exported as OCI archives that a containerd imports
//! with `ctr images import`.
//!
//! - the sluice image (`cargo xtask image`): the static (musl) `sluice` binary alone, at `/sluice`,
//!   which embeds its XDP object. The published image (Containerfile) has the same layout. Two
//!   archives: linux/amd64 alone ([`sluice_archive`], what the cluster test imports), and an OCI
//!   image index holding linux/amd64 and linux/arm64 ([`sluice_index_archive`]). The arm64
//!   binary is cross-compiled ([`Platform`]); the eBPF object embedded in both is the same BPF
//!   bytecode (the build script compiles it for bpfel on the host, whatever the binary's target).
//! - a tiny web image for the cluster test's pods ([`build_web_image`]): busybox-static with its
//!   applets, `httpd` on port 80 with a CGI that names the pod, its node and the client address
//!   it sees, and a line echo on port 7000 (`<pod> <line>`, what [`crate::conn::LongConn`] reads).
//!
//! buildah keeps its storage under `<target>/image/buildah` (vfs driver: no overlay mounts left
//! behind), one build at a time (a lock file there).

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::cmd;
use crate::kube::repo_root;

/// A platform of the sluice image: the static binary's Rust target and how it is cross-built.
pub struct Platform {
    /// The OCI architecture name (`linux/<arch>`).
    pub arch: &'static str,
    /// The musl target its binary is built for.
    pub target: &'static str,
    /// Cross-compiling: the C compiler and linker (Debian's gcc-<triple>) and the user-mode
    /// emulator that runs its programs on this machine (Debian's qemu-user-static); None for
    /// the host's own architecture.
    pub cross: Option<Cross>,
}

/// See [`Platform::cross`].
pub struct Cross {
    pub gcc: &'static str,
    pub qemu: &'static str,
}

/// The host's platform, the one the cluster test runs.
pub const AMD64: Platform = Platform {
    arch: "amd64",
    target: "x86_64-unknown-linux-musl",
    cross: None,
};
/// Home clusters' boards (Raspberry Pi 4/5 and the like).
pub const ARM64: Platform = Platform {
    arch: "arm64",
    target: "aarch64-unknown-linux-musl",
    cross: Some(Cross {
        gcc: "aarch64-linux-gnu-gcc",
        qemu: "qemu-aarch64-static",
    }),
};
/// Every platform of the image index.
pub const PLATFORMS: [&Platform; 2] = [&AMD64, &ARM64];

/// The musl target the amd64 image's binary is built for.
pub const MUSL_TARGET: &str = AMD64.target;
/// The sluice image's repository name (the DaemonSet in deploy/ names it with the crate version).
pub const SLUICE_IMAGE: &str = "localhost/sluice";
/// The cluster test's web image.
pub const WEB_IMAGE: &str = "localhost/sluice-test-web";
/// The web image's TCP line echo port.
pub const WEB_ECHO_PORT: u16 = 7000;

/// The line echo of the web image: `<pod name> <line>` for every line.
const ECHO_SCRIPT: &str = "#!/bin/sh\nn=$(hostname)\nwhile read -r l; do echo \"$n $l\"; done\n";
/// The CGI answering `pod=<name> node=<node> client=<address as the pod sees it>`.
const WHO_CGI: &str = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho \"pod=$(hostname) node=$NODE_NAME client=$REMOTE_ADDR\"\n";

/// The default image tag: the workspace version.
pub fn default_tag() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `$CARGO_TARGET_DIR`, or `target/` in the repository.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Where the OCI archives go.
pub fn image_dir() -> PathBuf {
    target_dir().join("image")
}

/// The archive of the sluice image with `tag`, linux/amd64 alone.
pub fn sluice_archive(tag: &str) -> PathBuf {
    image_dir().join(format!("sluice-{tag}.oci.tar"))
}

/// The archive of the sluice image index with `tag`: linux/amd64 and linux/arm64.
pub fn sluice_index_archive(tag: &str) -> PathBuf {
    image_dir().join(format!("sluice-{tag}.multiarch.oci.tar"))
}

/// The static amd64 sluice binary (`cargo build --release --target x86_64-unknown-linux-musl`).
pub fn musl_binary() -> PathBuf {
    AMD64.binary()
}

/// Builds the static amd64 sluice binary with cargo (quick when it is up to date).
pub fn build_musl_binary() -> Result<PathBuf> {
    AMD64.build_binary()
}

impl Platform {
    /// Its static sluice binary in the target directory.
    pub fn binary(&self) -> PathBuf {
        target_dir()
            .join(self.target)
            .join("release")
            .join("sluice")
    }

    /// `cargo <args> --target <its target>` in the repository, with the cross compiler and, for
    /// `cargo test` and `cargo run`, the emulator as the runner. Every cargo call for the target
    /// gets the same environment, so none of them rebuilds what another built.
    pub fn cargo(&self, args: &[&str]) -> Command {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut c = Command::new(cargo);
        // `--target` right after the subcommand: before any `--` of the caller's.
        let (subcommand, rest) = args
            .split_first()
            .map_or((None, args), |(s, r)| (Some(s), r));
        c.current_dir(repo_root())
            .args(subcommand)
            .args(["--target", self.target])
            .args(rest);
        if let Some(cross) = &self.cross {
            let triple = self.target.replace('-', "_");
            let upper = triple.to_uppercase();
            c.env(format!("CC_{triple}"), cross.gcc)
                .env(format!("CARGO_TARGET_{upper}_LINKER"), cross.gcc)
                .env(format!("CARGO_TARGET_{upper}_RUNNER"), cross.qemu);
        }
        c
    }

    /// Builds its static sluice binary with cargo (quick when it is up to date).
    pub fn build_binary(&self) -> Result<PathBuf> {
        let mut c = self.cargo(&[
            "build",
            "--release",
            "--locked",
            "--package",
            "lb-userspace",
            "--bin",
            "sluice",
        ]);
        eprintln!("+ {}", cmd::describe(&c));
        let status = c
            .status()
            .context("running cargo to build the static sluice")?;
        ensure!(
            status.success(),
            "building the static sluice for {} failed ({status}); the target comes from \
             `rustup target add {}`, the C compiler from musl-tools (amd64) or \
             gcc-aarch64-linux-gnu (arm64; scripts/bootstrap.sh installs both)",
            self.arch,
            self.target
        );
        let bin = self.binary();
        ensure!(bin.is_file(), "cargo built no {}", bin.display());
        Ok(bin)
    }
}

/// One image: files copied into an empty (`scratch`) root, entrypoint, committed and exported.
struct Spec<'a> {
    /// "localhost/name:tag"
    reference: String,
    /// A directory whose contents become the image's root (symlinks kept).
    rootfs: &'a Path,
    /// The OCI architecture its binaries are for (the OS is linux).
    arch: &'a str,
    entrypoint: &'a [&'a str],
    cmd: &'a [&'a str],
    env: &'a [&'a str],
}

fn buildah_root() -> PathBuf {
    image_dir().join("buildah")
}

fn buildah(args: &[&str]) -> Result<String> {
    let root = buildah_root();
    let mut c = Command::new("buildah");
    c.arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args);
    let out = cmd::run_ok(&mut c, Duration::from_secs(600))
        .context("buildah (Debian package buildah; scripts/bootstrap.sh installs it)")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Holds buildah's store for one build at a time (released when dropped).
fn lock_store() -> Result<fs::File> {
    fs::create_dir_all(buildah_root())?;
    let lock = fs::File::create(buildah_root().join(".lock"))?;
    // SAFETY: flock on an fd we own; released when `lock` is dropped.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!("locking {}", buildah_root().display());
    }
    Ok(lock)
}

/// Builds `spec` into the store as `spec.reference` (the caller holds [`lock_store`]).
fn commit(spec: &Spec) -> Result<()> {
    let name = format!("sluice-build-{}", std::process::id());
    let _ = buildah(&["rm", &name]);
    let container = buildah(&["from", "--name", &name, "scratch"])?;
    let result = (|| -> Result<()> {
        buildah(&[
            "copy",
            &container,
            &format!("{}/", spec.rootfs.display()),
            "/",
        ])?;
        let entrypoint = serde_json::to_string(spec.entrypoint)?;
        let cmd_json = serde_json::to_string(spec.cmd)?;
        let mut config = vec!["config", "--entrypoint", &entrypoint, "--cmd", &cmd_json];
        for e in spec.env {
            config.extend(["--env", e]);
        }
        config.extend(["--os", "linux", "--arch", spec.arch]);
        config.extend(["--label", "org.opencontainers.image.source=sluice"]);
        config.push(&container);
        buildah(&config)?;
        buildah(&["commit", "--rm", &container, &spec.reference])?;
        Ok(())
    })();
    if result.is_err() {
        let _ = buildah(&["rm", &container]);
    }
    result
}

/// Writes the image (or, with `index`, the image index and all its images) `source` of the
/// store to `archive`, an OCI archive naming it `name`; written whole or not at all.
fn export(source: &str, archive: &Path, name: &str, index: bool) -> Result<()> {
    if let Some(d) = archive.parent() {
        fs::create_dir_all(d)?;
    }
    let tmp = archive.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let dest = format!("oci-archive:{}:{name}", tmp.display());
    if index {
        buildah(&["manifest", "push", "--all", source, &dest])?;
    } else {
        buildah(&["push", source, &dest])?;
    }
    fs::rename(&tmp, archive)?;
    Ok(())
}

/// Builds `spec` and writes it to `archive` (an OCI archive naming the image `spec.reference`).
fn build(spec: &Spec, archive: &Path) -> Result<()> {
    let _lock = lock_store()?;
    commit(spec)?;
    let result = export(&spec.reference, archive, &spec.reference, false);
    // The archive is the product; the store keeps no copies (vfs copies every layer).
    let _ = buildah(&["rmi", "--force", &spec.reference]);
    result
}

fn fresh_dir(d: &Path) -> Result<()> {
    if d.exists() {
        fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
    }
    fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))
}

fn install(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write_exec(dst: &Path, text: &str) -> Result<()> {
    fs::write(dst, text)?;
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The sluice image's root for `platform`: its static binary alone, at /sluice.
fn sluice_rootfs(platform: &Platform, binary: &Path) -> Result<PathBuf> {
    let rootfs = image_dir().join(format!("rootfs-sluice-{}", platform.arch));
    fresh_dir(&rootfs)?;
    install(binary, &rootfs.join("sluice"), 0o755)?;
    Ok(rootfs)
}

/// The sluice image's spec: `reference` for `platform`, from `rootfs`.
fn sluice_spec<'a>(reference: String, platform: &'a Platform, rootfs: &'a Path) -> Spec<'a> {
    Spec {
        reference,
        rootfs,
        arch: platform.arch,
        entrypoint: &["/sluice"],
        cmd: &["agent", "--help"],
        env: &[],
    }
}

/// The amd64 sluice image `localhost/sluice:<tag>` from the static binary `binary`, written to
/// [`sluice_archive`]; returns the archive.
pub fn build_sluice_image(binary: &Path, tag: &str) -> Result<PathBuf> {
    let rootfs = sluice_rootfs(&AMD64, binary)?;
    let archive = sluice_archive(tag);
    build(
        &sluice_spec(format!("{SLUICE_IMAGE}:{tag}"), &AMD64, &rootfs),
        &archive,
    )
    .with_context(|| format!("building the image {SLUICE_IMAGE}:{tag}"))?;
    Ok(archive)
}

/// The static amd64 sluice binary and its image (the cluster benchmark's).
pub fn build_sluice_image_from_source(tag: &str) -> Result<PathBuf> {
    let bin = build_musl_binary()?;
    build_sluice_image(&bin, tag)
}

/// The archives `cargo xtask image` writes.
pub struct SluiceImages {
    /// linux/amd64 alone: [`sluice_archive`].
    pub amd64: PathBuf,
    /// The index of every platform: [`sluice_index_archive`].
    pub index: PathBuf,
}

/// What `cargo xtask image` does: the static binary of every platform (cross-compiled), an
/// image of each, the amd64 one exported alone and all of them as one OCI image index, both
/// archives naming `localhost/sluice:<tag>`.
pub fn build_sluice_images_from_source(tag: &str) -> Result<SluiceImages> {
    let binaries = PLATFORMS
        .iter()
        .map(|p| p.build_binary())
        .collect::<Result<Vec<_>>>()?;
    let reference = format!("{SLUICE_IMAGE}:{tag}");
    // In the store under per-platform names: the index takes the image's own name.
    let per_platform = |p: &Platform| format!("{reference}-{}", p.arch);
    let list = format!("{reference}-index");
    let images = SluiceImages {
        amd64: sluice_archive(tag),
        index: sluice_index_archive(tag),
    };
    let _lock = lock_store()?;
    let result = (|| -> Result<()> {
        let _ = buildah(&["manifest", "rm", &list]);
        buildah(&["manifest", "create", &list])?;
        for (platform, binary) in PLATFORMS.iter().zip(&binaries) {
            let rootfs = sluice_rootfs(platform, binary)?;
            commit(&sluice_spec(per_platform(platform), platform, &rootfs))?;
            buildah(&["manifest", "add", &list, &per_platform(platform)])?;
        }
        export(&per_platform(&AMD64), &images.amd64, &reference, false)?;
        export(&list, &images.index, &reference, true)
    })();
    let _ = buildah(&["manifest", "rm", &list]);
    for platform in PLATFORMS {
        let _ = buildah(&["rmi", "--force", &per_platform(platform)]);
    }
    result.with_context(|| format!("building the image index {reference}"))?;
    Ok(images)
}

/// The test web image `localhost/sluice-test-web:<tag>` (see the module documentation): built
/// from busybox-static, returned as an OCI archive in [`image_dir`].
pub fn build_web_image(tag: &str) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    ensure!(
        busybox.is_file(),
        "{} missing: install busybox-static (scripts/bootstrap.sh)",
        busybox.display()
    );
    let out = cmd::run_ok(Command::new(busybox).arg("--list"), cmd::DEFAULT_TIMEOUT)?;
    let rootfs = image_dir().join("rootfs-web");
    fresh_dir(&rootfs)?;
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin)?;
    install(busybox, &bin.join("busybox"), 0o755)?;
    for applet in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            symlink("busybox", bin.join(applet))?;
        }
    }
    let cgi = rootfs.join("www/cgi-bin");
    fs::create_dir_all(&cgi)?;
    write_exec(&cgi.join("who"), WHO_CGI)?;
    fs::write(rootfs.join("www/index.html"), "sluice test web\n")?;
    write_exec(&bin.join("line-echo"), ECHO_SCRIPT)?;
    fs::create_dir_all(rootfs.join("tmp"))?;
    let archive = image_dir().join(format!("sluice-test-web-{tag}.oci.tar"));
    build(
        &Spec {
            reference: format!("{WEB_IMAGE}:{tag}"),
            rootfs: &rootfs,
            arch: AMD64.arch,
            entrypoint: &["/bin/httpd", "-f", "-p", "80", "-h", "/www"],
            cmd: &[],
            env: &["PATH=/bin"],
        },
        &archive,
    )
    .with_context(|| format!("building the image {WEB_IMAGE}:{tag}"))?;
    Ok(archive)
}

/// The pod sandbox image (`pause`, built from the Kubernetes tree by scripts/kube-apiserver.sh)
/// that every node's containerd uses: `localhost/sluice-test-pause:3.2`. Returns its archive.
pub fn build_pause_image(pause: &Path) -> Result<PathBuf> {
    ensure!(
        pause.is_file(),
        "{} missing: scripts/kube-apiserver.sh builds it",
        pause.display()
    );
    let archive = image_dir().join("sluice-test-pause-3.2.oci.tar");
    if archive.is_file() {
        return Ok(archive);
    }
    let rootfs = image_dir().join("rootfs-pause");
    fresh_dir(&rootfs)?;
    install(pause, &rootfs.join("pause"), 0o755)?;
    build(
        &Spec {
            reference: "localhost/sluice-test-pause:3.2".into(),
            rootfs: &rootfs,
            arch: AMD64.arch,
            entrypoint: &["/pause"],
            cmd: &[],
            env: &[],
        },
        &archive,
    )?;
    Ok(archive)
}
