//! The project's traffic generator, for the benchmark (`cargo xtask bench`) and the flood-guard
//! test: one prebuilt IPv4 frame sent out of an interface of a namespace, stamped with the next
//! flow of a cycle (source ports, and for a flood of forged new flows source addresses too).
//! Two ways to send it, the same frames either way:
//! - [`live`]: `sluice_pktgen` in BPF_PROG_TEST_RUN live-frames mode, a few Mpps from one core,
//!   no socket (the default);
//! - [`raw`]: AF_PACKET `sendmmsg` from one thread per CPU, where the kernel refuses live
//!   frames (EPERM on some machines: why in [`live`]).
//!
//! Every run says which generator sent it and at what rate ([`Sent`]).

mod live;
mod raw;

use std::fs;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::{Lab, cmd};

/// Lets the generator send from the lab's client: its frames leave the client's veth with
/// XDP_TX, and the peer needs NAPI (GRO) to take XDP frames.
pub fn prepare_client(lab: &Lab) -> anyhow::Result<()> {
    lab.exec_ok(
        lab.switch_ns(),
        &["ethtool", "-K", lab.client_peer_iface(), "gro", "on"],
    )?;
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow!("bad MAC {s}: not 6 bytes"))
}

/// The lab client's SYN to VIP:80, addressed to the lb's MAC: with [`Flows::spoof_sources`],
/// a flood of forged new connections.
pub fn syn_frame(lab: &Lab) -> anyhow::Result<Vec<u8>> {
    let mut f = crate::fixtures::Frame::tcp(1024, crate::fixtures::TCP_SYN);
    f.src = lab.client_addr().into();
    f.dst = lab.vip().into();
    f.dport = crate::HTTP_PORT;
    let mut bytes = f.bytes();
    bytes[..6].copy_from_slice(&parse_mac(&lab.lb_mac())?);
    bytes[6..12].copy_from_slice(&parse_mac(&lab.client_mac())?);
    Ok(bytes)
}

/// The flows the generator cycles through.
#[derive(Clone, Copy, Debug)]
pub struct Flows {
    /// Source ports, from `first_port` on.
    pub ports: u32,
    pub first_port: u32,
    /// A new IPv4 source address (its low 16 bits) after every cycle of ports: every frame a
    /// new flow, as in a flood of spoofed SYNs. The frame must be IPv4 without options.
    pub spoof_sources: bool,
}

/// Which generator sent a run's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generator {
    /// `sluice_pktgen` in BPF_PROG_TEST_RUN live-frames mode ([`live`]).
    LiveFrames,
    /// AF_PACKET `sendmmsg` from one pinned thread per CPU ([`raw`]).
    RawSockets { threads: usize },
}

impl std::fmt::Display for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Generator::LiveFrames => write!(f, "XDP live frames (BPF_PROG_TEST_RUN)"),
            Generator::RawSockets { threads } => {
                write!(f, "raw sockets (AF_PACKET sendmmsg, {threads} threads)")
            }
        }
    }
}

/// One run of the generator.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// Frames handed to the kernel.
    pub frames: u64,
    pub seconds: f64,
    pub generator: Generator,
}

impl Sent {
    pub fn rate(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9)
    }
}

impl std::fmt::Display for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} frames in {:.1} s ({:.0}/s) by {}",
            self.frames,
            self.seconds,
            self.rate(),
            self.generator
        )
    }
}

/// The environment variable that picks the generator: `live`, `raw` or `auto` (the default:
/// live frames, and raw sockets from the first refusal on).
pub const GENERATOR_ENV: &str = "SLUICE_PKTGEN";

/// Why live frames were refused on this machine, once they were (this process).
static LIVE_REFUSED: Mutex<Option<String>> = Mutex::new(None);

/// The kernel's refusal of live frames, if this process met one.
pub fn live_frames_refused() -> Option<String> {
    LIVE_REFUSED.lock().ok().and_then(|g| g.clone())
}

/// Which generator a caller wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Live frames, and raw sockets from the kernel's first refusal on.
    Auto,
    /// Live frames or an error.
    Live,
    /// Raw sockets.
    Raw,
}

impl Choice {
    /// From [`GENERATOR_ENV`]; `Auto` when unset.
    pub fn from_env() -> anyhow::Result<Choice> {
        match std::env::var(GENERATOR_ENV).as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(Choice::Auto),
            Ok("live") => Ok(Choice::Live),
            Ok("raw") => Ok(Choice::Raw),
            Ok(other) => bail!("{GENERATOR_ENV}={other}: expected live, raw or auto"),
        }
    }
}

/// Sends `frame` out of `iface` in namespace `ns` for `window`: paced to `rate` packets/s, or
/// as fast as possible, by the generator [`GENERATOR_ENV`] picks (see [`generate_by`]).
pub fn generate(
    ns: &str,
    iface: &str,
    frame: Vec<u8>,
    flows: Flows,
    rate: Option<u64>,
    window: Duration,
) -> anyhow::Result<Sent> {
    generate_by(Choice::from_env()?, ns, iface, frame, flows, rate, window)
}

/// [`generate`] by the generator `choice` picks. With [`Choice::Auto`], live frames unless
/// refused; the first refusal is printed once and raw sockets send from then on. The frame
/// must be IPv4 without options (the flows are stamped on its source address and port).
pub fn generate_by(
    choice: Choice,
    ns: &str,
    iface: &str,
    frame: Vec<u8>,
    flows: Flows,
    rate: Option<u64>,
    window: Duration,
) -> anyhow::Result<Sent> {
    ensure!(
        frame.len() >= 48,
        "the generator's frame is shorter than 48 bytes"
    );
    if choice != Choice::Raw && live_frames_refused().is_none() {
        match live::generate(ns, iface, frame.clone(), flows, rate, window)? {
            live::Outcome::Sent(frames, seconds) => {
                return Ok(Sent {
                    frames,
                    seconds,
                    generator: Generator::LiveFrames,
                });
            }
            live::Outcome::Refused(why) if choice == Choice::Auto => {
                eprintln!(
                    "[pktgen] the kernel refused XDP live frames ({why}): raw sockets send \
                     from now on (see tests/src/pktgen/live.rs for why)"
                );
                if let Ok(mut g) = LIVE_REFUSED.lock() {
                    *g = Some(why);
                }
            }
            live::Outcome::Refused(why) => {
                bail!("{GENERATOR_ENV}=live, but the kernel refused XDP live frames: {why}")
            }
        }
    }
    let (frames, seconds) = raw::generate(ns, iface, frame, flows, rate, window)?;
    Ok(Sent {
        frames,
        seconds,
        generator: Generator::RawSockets {
            threads: raw::threads(),
        },
    })
}

/// Frames due now to keep `rate` since `start` with `sent` so far (at most `max`), or None to
/// wait; `max` when unpaced.
fn due(rate: Option<u64>, start: Instant, sent: u64, max: u64) -> Option<u64> {
    let Some(r) = rate else { return Some(max) };
    let due = (r as f64 * start.elapsed().as_secs_f64()) as u64;
    (due > sent).then(|| (due - sent).min(max))
}

/// The interface's index in the calling thread's namespace.
fn ifindex(iface: &str) -> anyhow::Result<u32> {
    let c_iface = std::ffi::CString::new(iface)?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
    ensure!(
        ifindex != 0,
        "no interface {iface} in the generator's namespace"
    );
    Ok(ifindex)
}

/// Turns `kernel.bpf_stats_enabled` on for its lifetime (it is host-wide), then back.
pub struct BpfStats {
    old: String,
}

impl BpfStats {
    pub fn enable() -> anyhow::Result<BpfStats> {
        let p = "/proc/sys/kernel/bpf_stats_enabled";
        let old = fs::read_to_string(p)
            .with_context(|| format!("reading {p}"))?
            .trim()
            .to_string();
        fs::write(p, "1").with_context(|| format!("writing {p}"))?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.old);
    }
}

/// (run_time_ns, run_cnt) of the XDP program on the lb's interface.
pub fn xdp_prog_stats(lab: &Lab) -> anyhow::Result<(u64, u64)> {
    let link = lab.lb_link_json()?;
    let id = link["xdp"]["prog"]["id"]
        .as_u64()
        .or_else(|| link["xdp"]["attached"][0]["prog"]["id"].as_u64())
        .ok_or_else(|| anyhow!("no XDP program id on the lb's interface: {link}"))?;
    let out = cmd::run_ok(
        Command::new("bpftool").args(["-j", "prog", "show", "id", &id.to_string()]),
        cmd::DEFAULT_TIMEOUT,
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}
