//! The project's traffic generator: `sluice_pktgen` (lb-ebpf/src/pktgen.rs) run with
//! BPF_PROG_TEST_RUN in live-frames mode from a thread in a namespace. The kernel copies one
//! prebuilt frame into page-pool pages, the program stamps the next source port of a cycle (and,
//! for a flood of forged new flows, the next source address) and returns XDP_TX, and the kernel
//! transmits each frame out of the interface: real frames on the wire, a few Mpps from one core,
//! no socket. Used by the benchmark (`cargo xtask bench`) and the flood-guard test.

use std::time::{Duration, Instant};

use std::fs;
use std::process::Command;

use anyhow::{Context as _, anyhow, ensure};
use aya::maps::Array;
use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions};
use lb_userspace::dataplane;

use crate::{Lab, cmd, netns};

const PROGRAM: &str = "sluice_pktgen";
/// Frames per live-frames batch (the kernel's default is 64).
const BATCH: u32 = 64;

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

/// Sends `frame` out of `iface` in namespace `ns` for `window`: paced to `rate` packets/s, or
/// as fast as possible. Returns (frames generated, seconds).
pub fn generate(
    ns: &str,
    iface: &str,
    frame: Vec<u8>,
    flows: Flows,
    rate: Option<u64>,
    window: Duration,
) -> anyhow::Result<(u64, f64)> {
    let iface = iface.to_owned();
    netns::run_in(ns, move || {
        let mut ebpf = dataplane::load_pktgen()?;
        {
            let mut cfg: Array<_, u32> = Array::try_from(
                ebpf.map_mut("PKTGEN_FLOWS")
                    .ok_or_else(|| anyhow!("map PKTGEN_FLOWS missing from the object"))?,
            )?;
            cfg.set(0, &flows.ports, 0)?;
            cfg.set(1, &flows.first_port, 0)?;
            cfg.set(2, &u32::from(flows.spoof_sources), 0)?;
            let mut headers: Array<_, [u64; 6]> = Array::try_from(
                ebpf.map_mut("PKTGEN_HEADERS")
                    .ok_or_else(|| anyhow!("map PKTGEN_HEADERS missing from the object"))?,
            )?;
            let mut words = [0u64; 6];
            ensure!(
                frame.len() >= 48,
                "the generator's frame is shorter than 48 bytes"
            );
            for (w, chunk) in words.iter_mut().zip(frame.as_chunks::<8>().0) {
                *w = u64::from_ne_bytes(*chunk);
            }
            headers.set(0, &words, 0)?;
        }
        let prog = dataplane::xdp_program(&mut ebpf, PROGRAM)?;
        prog.load()
            .map_err(|e| anyhow!("verifying {PROGRAM}: {e}"))?;
        let c_iface = std::ffi::CString::new(iface.clone())?;
        // SAFETY: a valid C string; the generator's namespace is this thread's.
        let ifindex = unsafe { libc::if_nametoindex(c_iface.as_ptr()) };
        ensure!(
            ifindex != 0,
            "no interface {iface} in the generator's namespace"
        );
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. data_end must be the frame's length.
        let mut ctx = Vec::with_capacity(24);
        for v in [0, frame.len() as u32, 0, ifindex, 0, 0] {
            ctx.extend_from_slice(&v.to_ne_bytes());
        }
        let start = Instant::now();
        let mut sent = 0u64;
        // Bounded: the window, plus at most one call's worth.
        while start.elapsed() < window {
            let chunk = match rate {
                None => 1 << 16,
                Some(r) => {
                    let due = (r as f64 * start.elapsed().as_secs_f64()) as u64;
                    if due <= sent {
                        std::thread::sleep(Duration::from_micros(500));
                        continue;
                    }
                    (due - sent).min(1 << 16) as u32
                }
            };
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.ctx_in = Some(&ctx);
            opts.repeat = chunk;
            opts.attrs = TestRunAttrs::new().xdp_live_frames(BATCH);
            prog.test_run(opts)
                .map_err(|e| anyhow!("BPF_PROG_TEST_RUN (live frames) of {PROGRAM}: {e}"))?;
            sent += u64::from(chunk);
        }
        Ok((sent, start.elapsed().as_secs_f64()))
    })
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
