//! `sluice agent --bgp` refuses hostile BGP flags at start: one line naming the flag and the
//! limit, a non-zero exit, before anything is attached or any session is opened.

use std::process::Command;
use std::time::Duration;

use sluice_tests::{cmd, require_root, sluice_binary};

/// 2000 communities (8000 bytes) cannot fit an UPDATE of at most 4096 bytes: refused.
#[test]
fn too_many_bgp_communities_are_refused_at_start() {
    require_root();
    let list: Vec<String> = (0..2000).map(|i| format!("64512:{i}")).collect();
    // Not a bpffs: should the check ever be missing, the agent stops there instead of attaching.
    let pins = std::env::temp_dir().join(format!("sluice-bgp-limits-{}", std::process::id()));
    let out = cmd::run(
        Command::new(sluice_binary().expect("sluice binary"))
            .args(["agent", "--iface", "lo", "--node-name", "n1", "--pin-dir"])
            .arg(&pins)
            .args([
                "--health-addr",
                "off",
                "--bgp",
                "--bgp-asn",
                "64512",
                "--bgp-peers",
                "192.0.2.1=65000",
                "--bgp-router-id",
                "192.0.2.10",
                "--bgp-communities",
                &list.join(","),
            ])
            .env("RUST_BACKTRACE", "1"),
        Duration::from_secs(30),
    )
    .expect("run sluice agent");
    let _ = std::fs::remove_dir_all(&pins);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(
        stderr.contains("--bgp-communities") && stderr.contains("256"),
        "the error must name the flag and the limit: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
