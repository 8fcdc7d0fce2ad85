//! The `sluice` command's answers to bad input: one line naming what and where, a non-zero exit
//! status, no panic, no backtrace, and nothing attached.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use sluice_tests::{require_root, sluice_binary};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write config");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What an error must leave as it found it: the XDP program on the host's `lo` (none, in a
/// clean run) and every entry under the pin directory (path, size, modification time).
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    lo_xdp: Option<serde_json::Value>,
    pins: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
}

impl HostState {
    fn read(pin_dir: &Path) -> Self {
        let out = sluice_tests::cmd::sh(&["ip", "-j", "link", "show", "dev", "lo"])
            .expect("ip -j link show dev lo");
        let links: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ip -j link output is JSON");
        let lo_xdp = links[0].get("xdp").cloned();
        let mut pins = Vec::new();
        let mut todo = vec![pin_dir.to_path_buf()];
        while let Some(dir) = todo.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue; // Absent: must stay absent (an entry would appear in the parent).
            };
            for entry in entries {
                let entry = entry.expect("reading the pin dir");
                let meta = entry.metadata().expect("pin dir entry metadata");
                if meta.is_dir() {
                    todo.push(entry.path());
                }
                pins.push((entry.path(), meta.len(), meta.modified().ok()));
            }
        }
        pins.sort();
        Self { lo_xdp, pins }
    }
}

/// Runs `run` and fails unless it left `lo` and `pin_dir` exactly as they were ("nothing is
/// attached after an error" is a promise about the host, not only about the exit status).
fn leaves_host_untouched(what: &str, pin_dir: &Path, run: impl FnOnce() -> Output) -> Output {
    let before = HostState::read(pin_dir);
    assert_eq!(
        before.lo_xdp, None,
        "{what}: an XDP program was on lo before the case"
    );
    let out = run();
    let after = HostState::read(pin_dir);
    assert_eq!(
        before,
        after,
        "{what}: the failed command changed lo's XDP program or {}; stderr: {}",
        pin_dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sluice(args: &[&str]) -> Output {
    Command::new(sluice_binary().expect("sluice binary"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run sluice")
}

/// Fails unless the command failed with exactly one line on stderr containing every `needle`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line of error expected, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    for forbidden in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(forbidden), "{forbidden:?} in: {stderr}");
    }
}

const VALID: &str = "vips:
  - address: 10.99.0.1
    port: 80
    backends:
      - address: 10.99.1.1
        mac: 02:00:00:00:00:01
";

/// `sluice attach`, which must fail here and leave the host untouched.
fn attach(config: &Path, iface: &str, pin_dir: &Path) -> Output {
    // A pin dir that does not exist yet must not be created: watch its parent then.
    let watched = if pin_dir.exists() {
        pin_dir
    } else {
        pin_dir.parent().unwrap_or(pin_dir)
    };
    leaves_host_untouched(&format!("attach {}", config.display()), watched, || {
        sluice(&[
            "--pin-dir",
            &pin_dir.display().to_string(),
            "attach",
            "--config",
            &config.display().to_string(),
            "--iface",
            iface,
        ])
    })
}

#[test]
fn config_errors_name_file_line_and_field() {
    require_root();
    let dir = TempDir::new("config");
    let cases = [
        (
            "dup.yaml",
            "vips:\n  - address: 10.99.0.1\n    port: 80\n    backends: []\n  - address: 10.99.0.1\n    port: 80\n    backends: []\n",
            vec!["dup.yaml:5", "vips[1]", "duplicates vips[0]"],
        ),
        (
            "mac.yaml",
            "vips:\n  - address: 10.99.0.1\n    port: 80\n    backends:\n      - address: 10.99.1.1\n        mac: zz:00\n",
            vec!["mac.yaml:6", "vips[0].backends[0].mac", "zz:00"],
        ),
        (
            "addr.yaml",
            "vips:\n  - address: 10.99.0.300\n    port: 80\n    backends: []\n",
            vec!["addr.yaml:2", "vips[0].address", "10.99.0.300"],
        ),
        (
            "port.yaml",
            "vips:\n  - address: 10.99.0.1\n    port: 0\n    backends: []\n",
            vec!["port.yaml:3", "vips[0].port"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = dir.write(name, text);
        let out = attach(&path, "lo", &dir.0);
        assert_one_line_error(&out, &needles);
    }
    let out = attach(&dir.0.join("missing.yaml"), "lo", &dir.0);
    assert_one_line_error(&out, &["missing.yaml"]);
}

#[test]
fn unknown_interface() {
    require_root();
    let dir = TempDir::new("iface");
    let config = dir.write("ok.yaml", VALID);
    let out = attach(&config, "nosuchif0", &dir.0);
    assert_one_line_error(&out, &["\"nosuchif0\" not found"]);
}

#[test]
fn pin_dir_not_on_bpffs() {
    require_root();
    let dir = TempDir::new("bpffs");
    let config = dir.write("ok.yaml", VALID);
    // The temp dir is on an ordinary filesystem, not a bpffs.
    let out = attach(&config, "lo", &dir.0.join("pins"));
    assert_one_line_error(&out, &["not on a BPF filesystem", "mount -t bpf"]);
}

#[test]
fn not_root() {
    require_root();
    let dir = TempDir::new("root");
    let config = dir.write("ok.yaml", VALID);
    let _ = Command::new("chmod")
        .args(["-R", "a+rx"])
        .arg(&dir.0)
        .status();
    let bin = sluice_binary().expect("sluice binary");
    // The binary sits under root's target dir; run a world-readable copy as nobody.
    let copy = dir.0.join("sluice");
    std::fs::copy(&bin, &copy).expect("copy sluice");
    let out = leaves_host_untouched("attach as nobody", &dir.0, || {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(&copy)
            .args(["attach", "--config"])
            .arg(&config)
            .args(["--iface", "lo"])
            .output()
            .expect("setpriv")
    });
    assert_one_line_error(&out, &["needs root", "sudo"]);
}

#[test]
fn inspect_without_attachment_says_what_to_do() {
    require_root();
    let dir = TempDir::new("inspect");
    let out = leaves_host_untouched("inspect stats", &dir.0, || {
        sluice(&[
            "--pin-dir",
            &dir.0.display().to_string(),
            "inspect",
            "stats",
        ])
    });
    assert_one_line_error(&out, &["not attached", "sluice run"]);
}

#[test]
fn explain_refuses_malformed_arguments_and_missing_pins() {
    require_root();
    let dir = TempDir::new("explain");
    let pin_dir = dir.0.display().to_string();
    for (client, vip, needles) in [
        (
            "192.0.2.7",
            "10.99.0.1:80/tcp",
            &["client \"192.0.2.7\"", "CLIENT_IP:PORT"][..],
        ),
        (
            "192.0.2.7:0",
            "10.99.0.1:80/tcp",
            &["192.0.2.7:0", "1 to 65535"][..],
        ),
        (
            "192.0.2.7:40000",
            "10.99.0.1",
            &["\"10.99.0.1\"", "ADDRESS:PORT"][..],
        ),
        (
            "192.0.2.7:40000",
            "10.99.0.1:80/sctp",
            &["10.99.0.1:80/sctp"][..],
        ),
        (
            "[2001:db8::7]:40000",
            "10.99.0.1:80/tcp",
            &["different address families"][..],
        ),
    ] {
        let out = leaves_host_untouched(&format!("explain {client} {vip}"), &dir.0, || {
            sluice(&["--pin-dir", &pin_dir, "explain", client, vip])
        });
        assert_one_line_error(&out, needles);
    }
    // Well-formed, but nothing pinned there: which path, and what to run.
    let out = leaves_host_untouched("explain without pins", &dir.0, || {
        sluice(&[
            "--pin-dir",
            &pin_dir,
            "explain",
            "192.0.2.7:40000",
            "10.99.0.1:80/tcp",
        ])
    });
    assert_one_line_error(&out, &["not attached", &pin_dir, "sluice run"]);
    let out = leaves_host_untouched("explain --iface without pins", &dir.0, || {
        sluice(&[
            "--pin-dir",
            &pin_dir,
            "explain",
            "192.0.2.7:40000",
            "10.99.0.1:80/tcp",
            "--iface",
            "eth9",
        ])
    });
    assert_one_line_error(
        &out,
        &[
            "no sluice maps pinned in",
            &pin_dir,
            "eth9",
            "sluice attach",
        ],
    );
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    require_root();
    let dir = TempDir::new("json");
    // The agent logs where it serves metrics, then finds its pin root on no bpffs: an info
    // line and the error, both JSON; nothing is attached.
    let pins = dir.0.join("pins");
    // The pin dir does not exist: its parent must stay as it was.
    let out = leaves_host_untouched("agent on no bpffs", &dir.0, || {
        sluice(&[
            "--log-format",
            "json",
            "--pin-dir",
            &pins.display().to_string(),
            "agent",
            "--iface",
            "lo",
            "--metrics-addr",
            "127.0.0.1:0",
            "--health-addr",
            "off",
        ])
    });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        assert!(
            l["timestamp"].is_string() && l["level"].is_string() && l["message"].is_string(),
            "a log object has timestamp, level and message: {l}"
        );
    }
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("/metrics"))),
        "the metrics address is logged: {stderr}"
    );
    let last = lines.last().expect("some log lines");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("not on a BPF filesystem")),
        "the error says what is wrong: {stderr}"
    );
    // Text stays the default.
    let text = sluice(&["--pin-dir", &dir.0.display().to_string(), "inspect", "vips"]);
    assert_one_line_error(&text, &["not attached"]);
}
