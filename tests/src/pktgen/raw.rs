//! The raw-socket generator, for machines that refuse live frames (see [`super::live`]): one
//! AF_PACKET socket and thread per CPU, each pinned to its CPU, sending batches of 64 frames
//! with one `sendmmsg` call. The frames are stamped in user space exactly as `sluice_pktgen`
//! stamps them in the kernel (the next source port of the cycle and, for a flood of forged
//! new flows, the next low 16 bits of the source address with the IP checksum recomputed); the
//! threads interleave one sequence, so with spoofed sources every frame is a new flow.
//!
//! The sockets bypass the qdisc (`PACKET_QDISC_BYPASS`) and are bound with protocol 0, so they
//! receive nothing. A frame the peer cannot take is dropped by the veth and not counted as on
//! the wire; `sendmmsg` reports what the socket accepted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use super::Flows;
use crate::netns;

/// Frames per `sendmmsg`.
const BATCH: usize = 64;
/// Where the frame's fields are (Ethernet without VLAN, IPv4 without options).
const IP_HEADER: std::ops::Range<usize> = 14..34;
const IP_CHECK: usize = 24;
const SRC_LOW: usize = 28;
const SPORT: usize = 34;

/// Threads (and sockets) the generator uses: one per CPU.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn generate(
    ns: &str,
    iface: &str,
    frame: Vec<u8>,
    flows: Flows,
    rate: Option<u64>,
    window: Duration,
) -> anyhow::Result<(u64, f64)> {
    ensure!(
        frame.len() >= SPORT + 2 && frame[12..14] == [0x08, 0x00] && frame[14] == 0x45,
        "the raw-socket generator needs an IPv4 frame without options ({} bytes given)",
        frame.len()
    );
    let threads = threads();
    let iface = iface.to_owned();
    // Sockets belong to the namespace they were made in, whichever thread uses them.
    let sockets: Vec<OwnedFd> = netns::run_in(ns, move || {
        let ifindex = super::ifindex(&iface)?;
        (0..threads).map(|_| open(ifindex, &iface)).collect()
    })?;
    let per_thread_rate = rate.map(|r| r.div_ceil(threads as u64).max(1));
    let sent = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = sockets
            .iter()
            .enumerate()
            .map(|(t, fd)| {
                let (frame, sent) = (&frame, &sent);
                s.spawn(move || -> anyhow::Result<()> {
                    pin_to_cpu(t);
                    let n = send_loop(
                        fd,
                        frame,
                        flows,
                        t as u64,
                        threads as u64,
                        per_thread_rate,
                        window,
                    )?;
                    sent.fetch_add(n, Ordering::Relaxed);
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(r) => r?,
                Err(_) => bail!("a raw-socket generator thread panicked"),
            }
        }
        Ok(())
    })?;
    let sent = sent.into_inner();
    ensure!(
        sent > 0,
        "the raw-socket generator sent nothing in {window:?}"
    );
    Ok((sent, start.elapsed().as_secs_f64()))
}

/// An AF_PACKET raw socket that sends out of `ifindex` and receives nothing.
fn open(ifindex: u32, iface: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!(
            "AF_PACKET socket for {iface}: {} (needs CAP_NET_RAW)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_ll is valid; we set the fields bind needs.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = 0;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "binding a packet socket to {iface}: {}",
            std::io::Error::last_os_error()
        );
    }
    let one: libc::c_int = 1;
    // SAFETY: an int option of the right size. Best effort: without it frames take the qdisc.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    Ok(fd)
}

/// Best effort: spreads the threads over the CPUs (the whole veth chain runs on the sender's).
fn pin_to_cpu(t: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for t % CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(t % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One thread's sends: frames `t`, `t + stride`, `t + 2 stride` ... of the common sequence.
fn send_loop(
    fd: &OwnedFd,
    frame: &[u8],
    flows: Flows,
    t: u64,
    stride: u64,
    rate: Option<u64>,
    window: Duration,
) -> anyhow::Result<u64> {
    let mut bufs = vec![frame.to_vec(); BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: a zeroed mmsghdr is valid (no name, no control); each points at its iovec.
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let (start, mut sent, mut seq) = (Instant::now(), 0u64, 0u64);
    // Bounded: the window, plus at most one batch.
    while start.elapsed() < window {
        let Some(want) = super::due(rate, start, sent, BATCH as u64) else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        for buf in bufs.iter_mut().take(want as usize) {
            stamp(buf, flows, t + seq * stride);
            seq += 1;
        }
        // SAFETY: msgs[..want] point at live buffers of their stated lengths.
        let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), want as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // A full device queue: the frames were not taken, try again.
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => std::thread::yield_now(),
                _ => return Err(e).context("sendmmsg on the raw-socket generator's socket"),
            }
        } else {
            sent += n as u64;
        }
    }
    Ok(sent)
}

/// Frame `n` of the sequence, as `sluice_pktgen` makes it: source port `first + n % ports`,
/// and with spoofed sources the low 16 bits of the source address `n / ports`.
pub fn stamp(buf: &mut [u8], flows: Flows, n: u64) {
    let ports = u64::from(flows.ports.max(1));
    let port = (u64::from(flows.first_port) + n % ports) as u16;
    buf[SPORT..SPORT + 2].copy_from_slice(&port.to_be_bytes());
    if flows.spoof_sources {
        buf[SRC_LOW..SRC_LOW + 2].copy_from_slice(&((n / ports) as u16).to_be_bytes());
        buf[IP_CHECK..IP_CHECK + 2].copy_from_slice(&[0, 0]);
        let sum = ip_checksum(&buf[IP_HEADER]);
        buf[IP_CHECK..IP_CHECK + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_flows_like_the_kernel_generator() {
        let mut f = crate::fixtures::Frame::tcp(1024, crate::fixtures::TCP_SYN);
        f.src = std::net::Ipv4Addr::new(10, 0, 0, 1).into();
        f.dst = std::net::Ipv4Addr::new(10, 0, 0, 2).into();
        let mut buf = f.bytes();
        let flows = Flows {
            ports: 3,
            first_port: 1000,
            spoof_sources: true,
        };
        let mut seen = std::collections::BTreeSet::new();
        for n in 0..12 {
            stamp(&mut buf, flows, n);
            assert_eq!(ip_checksum(&buf[IP_HEADER]), 0, "frame {n}: IP checksum");
            seen.insert(buf[SRC_LOW..SPORT + 2].to_vec());
        }
        assert_eq!(seen.len(), 12, "every frame a new (source, port)");
        stamp(&mut buf, flows, 4);
        assert_eq!(&buf[SPORT..SPORT + 2], &1001u16.to_be_bytes());
        assert_eq!(&buf[SRC_LOW..SRC_LOW + 2], &1u16.to_be_bytes());
    }
}
