//! Doing socket work inside a named network namespace from this process.
//!
//! The network namespace is a per-thread attribute on Linux: a thread that calls `setns(CLONE_NEWNET)`
//! moves alone, and every socket it creates afterwards belongs to that namespace for its whole life
//! (also when handed to another thread). So the lab runs its clients and small servers as threads
//! of the test process, each started in the namespace it serves, instead of as child processes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::thread::{self, JoinHandle};

use anyhow::{Context, Result, anyhow, bail};

/// Where `ip netns add NAME` keeps the namespace's handle.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Moves the calling thread into network namespace `name`. Only call this on a thread you own.
pub fn enter(name: &str) -> Result<()> {
    let p = path(name);
    let f = File::open(&p).with_context(|| {
        format!(
            "cannot open network namespace {} (does it exist?)",
            p.display()
        )
    })?;
    // SAFETY: setns on a valid fd; CLONE_NEWNET only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns into network namespace {name} failed: {} (needs root)",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Starts a thread that first enters namespace `ns`, then runs `f`.
pub fn spawn_in<T, F>(ns: &str, thread_name: &str, f: F) -> Result<JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let ns = ns.to_string();
    thread::Builder::new()
        .name(thread_name.to_string())
        .spawn(move || {
            enter(&ns)?;
            f()
        })
        .with_context(|| format!("cannot start thread {thread_name}"))
}

/// Runs `f` on a fresh thread inside namespace `ns` and waits for its result.
pub fn run_in<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    spawn_in(ns, "netns-run", f)?
        .join()
        .map_err(|_| anyhow!("a thread working in network namespace {ns} panicked"))?
}

/// A network namespace with a veth pair (`memt0` 10.9.0.1/24, `memt1`) and a bpffs mount for
/// sluice's pins, for tests that attach sluice alone; removed on drop.
pub struct Sandbox {
    pub ns: String,
    pub bpffs: PathBuf,
}

impl Sandbox {
    /// `prefix` and this process's id name the namespace and the mount.
    pub fn new(prefix: &str) -> Result<Self> {
        let ns = format!("{prefix}{}", std::process::id());
        let bpffs = std::env::temp_dir().join(format!("sluice-{ns}"));
        let _ = crate::cmd::sh(&["ip", "netns", "del", &ns]);
        crate::cmd::sh(&["ip", "netns", "add", &ns])?;
        let sb = Self { ns, bpffs };
        let ip = |args: &[&str]| {
            let mut argv = vec!["ip", "-n", &sb.ns];
            argv.extend_from_slice(args);
            crate::cmd::sh(&argv)
        };
        ip(&[
            "link", "add", "name", "memt0", "type", "veth", "peer", "name", "memt1",
        ])?;
        ip(&["link", "set", "memt0", "up"])?;
        ip(&["link", "set", "memt1", "up"])?;
        ip(&["addr", "add", "10.9.0.1/24", "dev", "memt0"])?;
        std::fs::create_dir_all(&sb.bpffs)?;
        crate::cmd::sh(&["mount", "-t", "bpf", "bpf", &sb.bpffs.to_string_lossy()])?;
        Ok(sb)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = crate::cmd::sh(&["umount", &self.bpffs.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = crate::cmd::sh(&["ip", "netns", "del", &self.ns]);
    }
}
