//! Katran-style packet fixtures: an input frame, the verdict the XDP program must return and
//! the exact frame it must leave, run through the real program with BPF_PROG_TEST_RUN. The
//! same harness drives the fixture tests and the ns/packet benchmark (`cargo xtask bench`).

use std::net::Ipv4Addr;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions},
};
use lb_common::{BALANCER_PROGRAM, DEFAULT_FLOW_TABLE_SIZE, GlobalCounter};
use lb_userspace::{
    dataplane::{self, Maps},
    model::{Backend, Desired, MacAddr, Protocol, Settings, Vip, VipAddr},
    net::Interface,
    reconcile,
};

/// XDP verdicts (linux/bpf.h).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The load balancer's MAC in fixtures: test runs see ingress ifindex 1 (loopback), so
/// backends on "interface 1" are sent with XDP_TX.
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xc1];
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

pub fn backend_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 10 + i)
}

pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, i]
}

/// The loaded, unattached balancer with its maps, programmed through the real reconcile path.
pub struct Harness {
    ebpf: Ebpf,
    pub maps: Maps,
    pub iface: Interface,
}

impl Harness {
    pub fn new() -> anyhow::Result<Self> {
        let mut ebpf = dataplane::load(None, DEFAULT_FLOW_TABLE_SIZE)?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            iface: Interface {
                name: "lo".into(),
                index: 1,
                mac: MacAddr(LB_MAC),
            },
        })
    }

    pub fn apply(&mut self, desired: &Desired) -> anyhow::Result<reconcile::Summary> {
        reconcile::reconcile(&mut self.maps, &self.iface, desired)
    }

    /// Runs one frame; returns the verdict and the frame as the program left it.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let (action, out, _) = self.run_repeat(frame, 1)?;
        Ok((action, out))
    }

    /// Runs one frame `repeat` times in the kernel; also returns the average ns per run.
    pub fn run_repeat(&mut self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Vec<u8>, u64)> {
        self.run_program(BALANCER_PROGRAM, frame, repeat)
    }

    /// As [`Self::run_repeat`] for any XDP program of the object (e.g. the pass-only baseline).
    pub fn run_program(
        &mut self,
        program: &str,
        frame: &[u8],
        repeat: u32,
    ) -> anyhow::Result<(u32, Vec<u8>, u64)> {
        let prog = dataplane::xdp_program(&mut self.ebpf, program)?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let result = prog
            .test_run(opts)
            .map_err(|e| anyhow!("BPF_PROG_TEST_RUN: {e}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration.as_nanos() as u64))
    }

    /// A global counter summed over CPUs.
    pub fn counter(&self, counter: GlobalCounter) -> anyhow::Result<u64> {
        let values = self
            .maps
            .global_stats
            .get(&(counter as u32), 0)
            .context("reading GLOBAL_STATS")?;
        Ok(values.iter().sum())
    }

    /// The backend index (as in [`backend_addr`]) a forwarded frame was sent to, by its MAC.
    pub fn backend_of(out: &[u8]) -> Option<u8> {
        (out.len() >= 6 && out[..5] == backend_mac(0)[..5]).then(|| out[5])
    }
}

/// A VIP on TCP (or UDP) port 80 with backends 0..n, MACs given (no neighbour lookups).
pub fn desired(protocol: Protocol, backends: &[(u8, u32, bool)]) -> Desired {
    Desired {
        settings: Settings::default(),
        vips: vec![Vip {
            key: VipAddr {
                addr: VIP,
                port: 80,
                protocol,
            },
            backends: backends
                .iter()
                .map(|&(i, weight, drain)| Backend {
                    addr: backend_addr(i),
                    mac: Some(MacAddr(backend_mac(i))),
                    weight,
                    drain,
                })
                .collect(),
        }],
    }
}

/// Builds Ethernet / IPv4 / TCP|UDP frames with correct checksums.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub frag_off: u16,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

impl Frame {
    pub fn tcp(sport: u16, flags: u8) -> Self {
        Self {
            src: CLIENT,
            dst: VIP,
            sport,
            dport: 80,
            protocol: 6,
            tcp_flags: flags,
            ip_options: Vec::new(),
            payload: Vec::new(),
            ttl: 64,
            frag_off: 0,
        }
    }

    pub fn udp(sport: u16, payload: &[u8]) -> Self {
        Self {
            protocol: 17,
            payload: payload.to_vec(),
            ..Self::tcp(sport, 0)
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4();
        let ihl = 20 + self.ip_options.len();
        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag_off.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.protocol);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let sum = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());

        let mut frame = Vec::with_capacity(14 + ip.len() + l4.len());
        frame.extend_from_slice(&LB_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        let checksum_at = if self.protocol == 6 {
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&65535u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            16
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        l4.extend_from_slice(&self.payload);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.push(0);
        pseudo.push(self.protocol);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        let sum = checksum(&l4, sum_words(&pseudo));
        l4[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
        l4
    }
}

fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// The Internet checksum of `bytes`, starting from a partial sum.
pub fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = initial + sum_words(bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The frame the program should emit for `input` sent to backend `i` by L2 DSR: only the two
/// MAC addresses change.
pub fn expected_l2(input: &[u8], i: u8) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&backend_mac(i));
    out[6..12].copy_from_slice(&LB_MAC);
    out
}
