//! What every run of the integration tests must get right whoever starts it: the `sluice`
//! binary the labs run is the one the sources describe, and checks that measure time run with
//! the machine to themselves.
//!
//! - [`ensure_fresh`]: cargo never builds another crate's binary for a test, so a plain
//!   `cargo test` after an edit would run the `sluice` of an earlier build. The first use of the
//!   binary compares it with the newest source it is built from (lb-userspace, lb-common,
//!   lb-ebpf, the workspace's Cargo.toml and Cargo.lock) and fails, saying which file and what
//!   to run, when a source is newer. `SLUICE_BIN` names a binary on purpose (an image's, a
//!   release build): that one is not compared.
//! - [`timing_lock`]: cargo runs a test binary's tests on one thread per CPU (two here), and
//!   other worktrees' tests share the same cores. A test whose checks measure time (rate
//!   windows, leases, deadlines it asserts) holds this lock for its whole run: one such test at
//!   a time on the machine, across processes (a `flock` on a file in the temp directory) and
//!   within one (a mutex). The other tests still run beside it; a check that then cannot run in
//!   time fails saying so, never passes silently. Cost, measured when it came (issue 30): none
//!   within a binary, as no binary holds two such tests (fixtures_rules 6.0 s, trace 10.8 s
//!   with it); across worktrees, a wait while another run's timing test finishes.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

use anyhow::{Result, bail};

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// The sources the `sluice` binary is built from: every file under these directories of the
/// workspace (but `target/`), and these files.
const SOURCE_DIRS: &[&str] = &["lb-userspace", "lb-common", "lb-ebpf"];
const SOURCE_FILES: &[&str] = &["Cargo.toml", "Cargo.lock", "rust-toolchain.toml"];

/// The newest source file and its modification time.
pub fn newest_source() -> Result<(PathBuf, SystemTime)> {
    let root = workspace_root();
    let mut newest = (root.join(SOURCE_FILES[0]), SystemTime::UNIX_EPOCH);
    let mut consider = |path: PathBuf| -> Result<()> {
        let modified = std::fs::metadata(&path)?.modified()?;
        if modified > newest.1 {
            newest = (path, modified);
        }
        Ok(())
    };
    for file in SOURCE_FILES {
        let path = root.join(file);
        if path.exists() {
            consider(path)?;
        }
    }
    let mut dirs: Vec<PathBuf> = SOURCE_DIRS.iter().map(|d| root.join(d)).collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if entry.file_name() != "target" {
                    dirs.push(path);
                }
            } else if kind.is_file() {
                consider(path)?;
            }
        }
    }
    Ok(newest)
}

/// Fails unless `bin` is newer than every source it is built from (checked once per process).
pub fn ensure_fresh(bin: &Path) -> Result<()> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = CHECKED.get_or_init(|| check(bin).map_err(|e| format!("{e:#}")));
    match verdict {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

fn check(bin: &Path) -> Result<()> {
    let built = std::fs::metadata(bin)?.modified()?;
    let (source, modified) = newest_source()?;
    if modified > built {
        let release = bin
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|p| p == "release");
        let age = modified.duration_since(built).unwrap_or_default();
        bail!(
            "{} is older than its sources: {} changed {age:.0?} after it was built. The lab \
             tests run that binary, and cargo does not rebuild it for them: run `cargo build -p \
             lb-userspace --bin sluice{}` first (or `./x test`, which does), or set SLUICE_BIN \
             to a binary you mean to test",
            bin.display(),
            source
                .strip_prefix(workspace_root())
                .unwrap_or(&source)
                .display(),
            if release { " --release" } else { "" },
        );
    }
    Ok(())
}

/// Held by a test whose checks measure time, for its whole run: see the module's text.
pub struct TimingGuard {
    _file: File,
    _local: MutexGuard<'static, ()>,
}

/// Takes the machine-wide lock of time-measuring tests (waits for the one holding it).
pub fn timing_lock() -> TimingGuard {
    static LOCAL: Mutex<()> = Mutex::new(());
    let local = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::temp_dir().join("sluice-tests-timing.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening the timing lock {}: {e}", path.display()));
    // SAFETY: flock on a descriptor this function owns; released when the file closes.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        locked,
        0,
        "flock {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    TimingGuard {
        _file: file,
        _local: local,
    }
}
