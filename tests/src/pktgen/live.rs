//! The live-frames generator: `sluice_pktgen` (lb-ebpf/src/pktgen.rs) run with BPF_PROG_TEST_RUN
//! and `BPF_F_TEST_XDP_LIVE_FRAMES` from a thread in the sending namespace. The kernel copies one
//! prebuilt frame into page-pool pages, the program stamps the next flow on it and returns
//! XDP_TX, and the kernel transmits each frame out of the interface named by the context's
//! `ingress_ifindex`: a few Mpps from one core, no socket.
//!
//! ## Why some machines answer EPERM (issue 23)
//! Seen on a fresh machine with the same kernel (6.18.44) as the machines where this generator
//! works: `bpf(BPF_PROG_TEST_RUN, {data_size_in=54, repeat=65536, ctx_size_in=24,
//! flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64}) = -1 EPERM`, for a root process with every
//! capability but CAP_MAC_ADMIN. Read in `net/bpf/test_run.c` of this kernel line, the XDP
//! test-run path has no EPERM at all:
//! - `bpf_prog_test_run_xdp` refuses with EINVAL (devmap/cpumap programs, unknown flags, a
//!   device-bound program, `batch_size` without live frames, a ctx with `data_meta`, a
//!   `data_end` other than the frame's length, `data_out`/`ctx_out` in live mode, a frame larger
//!   than a page minus the headroom) or E2BIG (`batch_size` > 256);
//! - `xdp_convert_md_to_buff` (the ctx's `ingress_ifindex`, looked up in the *caller's*
//!   namespace) gives ENODEV or EINVAL (an unregistered rx queue, a non-zero `egress_ifindex`);
//! - `bpf_test_run_xdp_live` and its batches give ENOMEM (page pool, skbs) or EINTR (a signal);
//!   XDP_TX and redirect failures are not returned at all (the frame is freed).
//!
//! Nor does `bpf_prog_test_run` in `kernel/bpf/syscall.c` (EINVAL for mismatched ctx sizes).
//! So the EPERM comes from before the dispatch: `__sys_bpf` calls `security_bpf()`, the LSM hook
//! of every bpf() command, and this kernel is built with `CONFIG_BPF_LSM` and the `bpf` LSM
//! active (`/sys/kernel/security/lsm`: lockdown,capability,landlock,bpf). A BPF-LSM program of
//! the machine's sandbox may refuse live frames, which put raw frames on any interface of the
//! caller's namespace past netfilter; this kernel build also has a non-upstream sysctl
//! (`kernel.init_private_bpf`) whose value a machine's init may set differently. Neither is ours
//! to change, and nothing in our input avoids a refusal made before the input is read: so the
//! first refusal is remembered and the raw-socket generator ([`super::raw`]) takes over
//! (see [`super::generate`]).

use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use aya::maps::Array;
use aya::programs::{ProgramError, TestRun as _, TestRunAttrs, TestRunOptions};
use lb_userspace::dataplane;

use super::Flows;
use crate::netns;

const PROGRAM: &str = "sluice_pktgen";
/// Frames per live-frames batch (the kernel's default is 64).
const BATCH: u32 = 64;

/// What one run ended with: frames and seconds, or the kernel's refusal of the very first call
/// (nothing sent: another generator may take over).
pub enum Outcome {
    Sent(u64, f64),
    Refused(String),
}

pub fn generate(
    ns: &str,
    iface: &str,
    frame: Vec<u8>,
    flows: Flows,
    rate: Option<u64>,
    window: Duration,
) -> anyhow::Result<Outcome> {
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
            for (w, chunk) in words.iter_mut().zip(frame.as_chunks::<8>().0) {
                *w = u64::from_ne_bytes(*chunk);
            }
            headers.set(0, &words, 0)?;
        }
        let prog = dataplane::xdp_program(&mut ebpf, PROGRAM)?;
        prog.load()
            .map_err(|e| anyhow!("verifying {PROGRAM}: {e}"))?;
        let ifindex = super::ifindex(&iface)?;
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
            let Some(chunk) = super::due(rate, start, sent, 1 << 16) else {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            };
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(&frame);
            opts.ctx_in = Some(&ctx);
            opts.repeat = chunk as u32;
            opts.attrs = TestRunAttrs::new().xdp_live_frames(BATCH);
            if let Err(e) = prog.test_run(opts) {
                let why = describe(&e);
                if sent == 0 {
                    return Ok(Outcome::Refused(why));
                }
                return Err(anyhow!(
                    "BPF_PROG_TEST_RUN (live frames) of {PROGRAM} after {sent} frames: {why}"
                ));
            }
            sent += chunk;
        }
        ensure!(
            sent > 0,
            "the live-frames generator sent nothing in {window:?}"
        );
        Ok(Outcome::Sent(sent, start.elapsed().as_secs_f64()))
    })
}

/// The syscall's errno in words ("`bpf_prog_test_run` failed" alone says nothing).
fn describe(e: &ProgramError) -> String {
    match e {
        ProgramError::SyscallError(s) => format!("{} failed: {}", s.call, s.io_error),
        other => other.to_string(),
    }
}
