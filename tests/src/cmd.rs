//! Running external commands with a bounded lifetime, and stopping the ones that run in the background.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The default limit for one short command (`ip`, `nft`, `ethtool`, `sluice attach`, ...).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Renders a command line for error messages: `ip -n ns link show`.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, killing it when it has not finished after `timeout`.
/// Returns its output whatever the exit status (see [`run_ok`] for a checked run).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("cannot start `{what}` (is the program installed and on PATH?)")
        })?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_reader.join().unwrap_or_default();
            bail!(
                "`{what}` did not finish within {timeout:?} and was killed; stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            );
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run`], and fails (with the command line and its stderr) unless it exits with status 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if out.stdout.is_empty() {
                String::new()
            } else {
                format!("\nstdout: {}", String::from_utf8_lossy(&out.stdout).trim())
            }
        );
    }
    Ok(out)
}

/// Runs a program given as a list of words, checked, with the default timeout.
pub fn sh(argv: &[&str]) -> Result<Output> {
    let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
    run_ok(Command::new(prog).args(args), DEFAULT_TIMEOUT)
}

/// Waits for `child` at most `timeout`; `None` when it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sends a signal to one process id (not a group). Errors (e.g. already gone) are ignored.
pub fn signal(pid: u32, sig: libc::c_int) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill(2) with a positive pid only signals that process.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Starts `c` with its output (stdout and stderr) into the file `log`, no stdin.
pub fn spawn_logged(mut c: Command, log: &Path) -> Result<Child> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let what = describe(&c);
    c.stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("starting `{what}`"))
}

/// `sysctl -q -w` of `settings` ("key=value") in namespace `ns`.
pub fn sysctl_in(ns: &str, settings: &[&str]) -> Result<()> {
    run_ok(
        Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-q", "-w"])
            .args(settings),
        DEFAULT_TIMEOUT,
    )?;
    Ok(())
}

/// Stops a child we started: SIGTERM, then SIGKILL after `grace`, and reaps it.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child.id(), libc::SIGTERM);
    if let Ok(Some(status)) = wait_timeout(child, grace) {
        return Some(status);
    }
    let _ = child.kill();
    wait_timeout(child, Duration::from_secs(5)).ok().flatten()
}

/// Whether a process with this id exists and is not a zombie (a killed process whose parent has not
/// reaped it yet holds no resources: its sockets, namespaces and mounts are already released).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}
