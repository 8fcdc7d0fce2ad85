//! The binary's subcommands, out of `main.rs` (which parses and dispatches): `run` and
//! `attach` (the file config), `agent` (Kubernetes), and the inspecting ones.

pub(crate) mod agent;
pub(crate) mod inspect;
pub(crate) mod run;

use std::time::Duration;

use anyhow::bail;

/// `sluice agent --health-addr`'s default, where `sluice inspect bgp` asks too.
pub(crate) const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:9941";

/// `500ms`, `1s`, `2.5s` (the model's one duration grammar, as config and annotations write
/// it): at least 100 ms.
pub(crate) fn parse_interval(text: &str) -> Result<Duration, String> {
    let duration =
        lb_userspace::model::parse_duration(text).map_err(|e| format!("invalid interval: {e}"))?;
    if duration < Duration::from_millis(100) {
        return Err(format!("interval {text:?} is below 100ms"));
    }
    Ok(duration)
}

pub(crate) fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "sluice needs root (CAP_BPF and CAP_NET_ADMIN) to load XDP programs and read their maps: run it with sudo"
        );
    }
    Ok(())
}
