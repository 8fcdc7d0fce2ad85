//! Container images built here, offline, with buildah (no registry is reachable from this machine
//! or CI): `FROM scratch` plus static binaries, exported as OCI archives that a containerd imports
//! with `ctr images import`.
//!
//! - the sluice image (`cargo xtask image`): the static (musl) `sluice` binary alone, at `/sluice`,
//!   which embeds its XDP object. The published image (Containerfile) has the same layout.
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

/// The musl target the image's binary is built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
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

/// The archive of the sluice image with `tag`.
pub fn sluice_archive(tag: &str) -> PathBuf {
    image_dir().join(format!("sluice-{tag}.oci.tar"))
}

/// The static sluice binary (`cargo build --release --target x86_64-unknown-linux-musl`).
pub fn musl_binary() -> PathBuf {
    target_dir()
        .join(MUSL_TARGET)
        .join("release")
        .join("sluice")
}

/// Builds the static sluice binary with cargo (quick when it is up to date).
pub fn build_musl_binary() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(repo_root()).args([
        "build",
        "--release",
        "--locked",
        "--target",
        MUSL_TARGET,
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
        "building the static sluice failed ({status}); the musl target comes from \
         `rustup target add {MUSL_TARGET}` and the C compiler from musl-tools (scripts/bootstrap.sh)"
    );
    let bin = musl_binary();
    ensure!(bin.is_file(), "cargo built no {}", bin.display());
    Ok(bin)
}

/// One image: files copied into an empty (`scratch`) root, entrypoint, committed and exported.
struct Spec<'a> {
    /// "localhost/name:tag"
    reference: String,
    /// A directory whose contents become the image's root (symlinks kept).
    rootfs: &'a Path,
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

/// Builds `spec` and writes it to `archive` (an OCI archive naming the image `spec.reference`).
fn build(spec: &Spec, archive: &Path) -> Result<()> {
    fs::create_dir_all(buildah_root())?;
    let lock = fs::File::create(buildah_root().join(".lock"))?;
    // SAFETY: flock on an fd we own; released when `lock` is dropped.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        bail!("locking {}", buildah_root().display());
    }
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
        config.extend(["--label", "org.opencontainers.image.source=sluice"]);
        config.push(&container);
        buildah(&config)?;
        buildah(&["commit", "--rm", &container, &spec.reference])?;
        Ok(())
    })();
    if result.is_err() {
        let _ = buildah(&["rm", &container]);
    }
    result?;
    if let Some(d) = archive.parent() {
        fs::create_dir_all(d)?;
    }
    let tmp = archive.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    buildah(&[
        "push",
        &spec.reference,
        &format!("oci-archive:{}:{}", tmp.display(), spec.reference),
    ])?;
    fs::rename(&tmp, archive)?;
    // The archive is the product; the store keeps no copies (vfs copies every layer).
    let _ = buildah(&["rmi", "--force", &spec.reference]);
    Ok(())
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

/// The sluice image `localhost/sluice:<tag>` from the static binary `binary`, written to
/// [`sluice_archive`]; returns the archive.
pub fn build_sluice_image(binary: &Path, tag: &str) -> Result<PathBuf> {
    let rootfs = image_dir().join("rootfs-sluice");
    fresh_dir(&rootfs)?;
    install(binary, &rootfs.join("sluice"), 0o755)?;
    let archive = sluice_archive(tag);
    build(
        &Spec {
            reference: format!("{SLUICE_IMAGE}:{tag}"),
            rootfs: &rootfs,
            entrypoint: &["/sluice"],
            cmd: &["agent", "--help"],
            env: &[],
        },
        &archive,
    )
    .with_context(|| format!("building the image {SLUICE_IMAGE}:{tag}"))?;
    Ok(archive)
}

/// The static sluice binary and its image: what `cargo xtask image` does.
pub fn build_sluice_image_from_source(tag: &str) -> Result<PathBuf> {
    let bin = build_musl_binary()?;
    build_sluice_image(&bin, tag)
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
            entrypoint: &["/pause"],
            cmd: &[],
            env: &[],
        },
        &archive,
    )?;
    Ok(archive)
}
