//! Katran-style packet fixtures: an input frame, the verdict the XDP program must return and
//! the exact frame it must leave, run through the real program with BPF_PROG_TEST_RUN. The
//! same harness drives the fixture tests and the ns/packet benchmark (`cargo xtask bench`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions},
};
use lb_common::{
    BALANCER_PROGRAM, DECAP_PROGRAM, DEFAULT_FLOW_TABLE_SIZE, DecapCounter, GlobalCounter,
    VipFilter, VipKey,
};
use lb_userspace::{
    dataplane::{self, DecapMaps, Maps},
    model::{Backend, Desired, IpNet, MacAddr, Protocol, Settings, Vip, VipAddr},
    net::Interface,
    reconcile::{self, Phase, addr_from_raw},
    resolve::{Resolved, Target},
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
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// Outer source prefixes of encapsulated fixtures.
pub const ENCAP_SOURCE_V4: &str = "10.99.0.0/24";
pub const ENCAP_SOURCE_V6: &str = "fd99::/120";
/// The egress MTU fixtures run with (the loopback stand-in's).
pub const FIXTURE_MTU: u32 = 1500;

pub fn backend_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, 10 + i)
}

pub fn backend_addr6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x10 + u16::from(i))
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
        Self::with_flow_table(DEFAULT_FLOW_TABLE_SIZE)
    }

    /// A harness whose connection table (IPv4; IPv6 gets its share) has `flow_table_size` entries.
    pub fn with_flow_table(flow_table_size: u32) -> anyhow::Result<Self> {
        Self::loaded(dataplane::load(None, flow_table_size)?)
    }

    /// A harness whose maps are pinned in `pins` (adopted when pinned already, as an agent's
    /// restart adopts them), with connection tables of `flow_table_size` entries.
    pub fn pinned(pins: &dataplane::PinLayout, flow_table_size: u32) -> anyhow::Result<Self> {
        Self::loaded(dataplane::load(Some(pins), flow_table_size)?)
    }

    fn loaded(mut ebpf: Ebpf) -> anyhow::Result<Self> {
        let maps = Maps::from_ebpf(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            iface: Interface {
                name: "lo".into(),
                index: 1,
                mac: MacAddr(LB_MAC),
                mtu: FIXTURE_MTU,
            },
        })
    }

    /// Programs the maps as node `this` of a co-located cluster would: the backend at address
    /// `this` is the node itself, the others are where their configured MACs say (no kernel
    /// lookups), and `desired.peers` are known by their backends' MACs.
    pub fn apply_as_node(
        &mut self,
        desired: &Desired,
        this: IpAddr,
    ) -> anyhow::Result<reconcile::Summary> {
        self.apply_as_node_with(desired, &[this])
    }

    /// [`Self::apply_as_node`] for a node with several addresses (`own`; none: a load
    /// balancer that is no backend).
    pub fn apply_as_node_with(
        &mut self,
        desired: &Desired,
        own: &[IpAddr],
    ) -> anyhow::Result<reconcile::Summary> {
        let resolved = self.resolved_as_node(desired, own)?;
        reconcile::reconcile_resolved(&mut self.maps, &self.iface, desired, &resolved)
    }

    /// [`Self::apply_as_node_with`] as one process's later reconciles run it: planned from what
    /// `carry` says its last apply left in the maps, not from a read of them.
    pub fn apply_carrying(
        &mut self,
        desired: &Desired,
        own: &[IpAddr],
        carry: &mut reconcile::Carry,
    ) -> anyhow::Result<reconcile::Summary> {
        let resolved = self.resolved_as_node(desired, own)?;
        reconcile::reconcile_resolved_carrying(
            &mut self.maps,
            &self.iface,
            desired,
            &resolved,
            carry,
        )
    }

    /// [`Self::apply_as_node_with`], calling `hook` after each phase of the apply with a
    /// [`Runner`] that sends packets through the program meanwhile; an error from the hook
    /// stops the apply there, as a killed or failed reconcile would.
    pub fn apply_with_hook(
        &mut self,
        desired: &Desired,
        own: &[IpAddr],
        mut hook: impl FnMut(Phase, &mut Runner<'_>) -> anyhow::Result<()>,
    ) -> anyhow::Result<reconcile::Summary> {
        let resolved = self.resolved_as_node(desired, own)?;
        let ebpf = &mut self.ebpf;
        reconcile::reconcile_resolved_with_hook(
            &mut self.maps,
            &self.iface,
            desired,
            &resolved,
            &mut |phase| hook(phase, &mut Runner { ebpf: &mut *ebpf }),
        )
    }

    /// What the resolve step finds for node `own` (see [`Self::apply_as_node`]), without
    /// asking the kernel.
    pub fn resolved_as_node(&self, desired: &Desired, own: &[IpAddr]) -> anyhow::Result<Resolved> {
        let mut resolved = Resolved {
            local: own.iter().copied().collect(),
            ..Resolved::default()
        };
        for vip in &desired.vips {
            for b in &vip.backends {
                let this = resolved.local.contains(&b.addr);
                let target = if this {
                    Target::Local
                } else {
                    Target::Remote {
                        mac: b.mac.context("fixture backends have MACs")?,
                        egress: self.iface.clone(),
                        source: None,
                    }
                };
                resolved.targets.insert((b.addr, vip.mode), target);
                if desired.peers.contains(&b.addr) && !this {
                    resolved.peer_macs.extend(b.mac);
                }
            }
        }
        Ok(resolved)
    }

    /// The maps as packets see them (see [`Snapshot`]).
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        Snapshot::read(&self.maps)
    }

    pub fn apply(&mut self, desired: &Desired) -> anyhow::Result<reconcile::Summary> {
        reconcile::reconcile(
            &mut self.maps,
            &self.iface,
            desired,
            reconcile::Unreachable::Fail,
        )
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
        test_run(&mut self.ebpf, program, frame, repeat)
    }

    /// A global counter summed over CPUs.
    pub fn counter(&self, counter: GlobalCounter) -> anyhow::Result<u64> {
        self.maps.global_counter(counter)
    }

    /// Whether this namespace's conntrack tracks a loopback connection (the agent's probe for
    /// `flow_state: auto`, through this object's `sluice_conntrack_probe`).
    pub fn conntrack_tracks(&mut self) -> anyhow::Result<bool> {
        dataplane::conntrack_tracks(&mut self.ebpf)
    }

    /// The IPv4 connection table as the packets left it: client port -> the backend index (as
    /// in [`backend_addr`]) its entry sends the flow to, by the backend's MAC (`None`: the
    /// entry's backend entry holds no fixture backend). Fixtures send from one client, so the
    /// port names the flow.
    pub fn flow_entries(&self) -> anyhow::Result<BTreeMap<u16, Option<u8>>> {
        let mut out = BTreeMap::new();
        for entry in self.maps.flow_entries() {
            let (key, value) = entry.context("reading FLOWS")?;
            if key.family != lb_common::FAMILY_V4 {
                continue;
            }
            let backend = self
                .maps
                .backend(u32::from(value.backend))
                .ok()
                .and_then(|b| Self::backend_of(&b.dst_mac));
            out.insert(u16::from_be(key.sport), backend);
        }
        Ok(out)
    }

    /// The backend index (as in [`backend_addr`]) a forwarded frame was sent to, by its MAC.
    pub fn backend_of(out: &[u8]) -> Option<u8> {
        (out.len() >= 6 && out[..5] == backend_mac(0)[..5]).then(|| out[5])
    }

    /// Starts `sluice trace`'s reporting on this program (once per harness: the trace maps
    /// are taken out of the object).
    pub fn start_trace(
        &mut self,
        filter: lb_common::TraceFilter,
    ) -> anyhow::Result<dataplane::TraceSession> {
        dataplane::TraceSession::start(dataplane::TraceSession::take_from(&mut self.ebpf)?, filter)
    }
}

/// Sends frames through the balancer while a reconcile is stopped between two phases.
pub struct Runner<'a> {
    ebpf: &'a mut Ebpf,
}

impl Runner<'_> {
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let (action, out, _) = test_run(self.ebpf, BALANCER_PROGRAM, frame, 1)?;
        Ok((action, out))
    }
}

/// One backend of a VIP as packets see it: its entry (without the per-node generation) and
/// its weight in the VIP's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub backend: lb_common::Backend,
    pub weight: u32,
    pub draining: bool,
}

/// One VIP as packets see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipView {
    pub table_size: u32,
    pub live_backends: u32,
    pub flags: u32,
    /// The members of its table by backend address, without the per-node numbering (ids,
    /// generations).
    pub backends: BTreeMap<IpAddr, MemberView>,
    /// The Maglev table as backend addresses (`None`: no backend, or an empty entry).
    pub table: Vec<Option<IpAddr>>,
}

/// The maps' contents without what differs between two equally correct histories (VIP,
/// backend and table ids, generations): two snapshots are equal when every packet meets the
/// same fate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub vips: BTreeMap<VipKey, VipView>,
    pub vip_addrs: BTreeMap<VipKey, u32>,
    /// (the VIP of the range's scope, if any; the scope's bits above the VIP id; prefix
    /// length; address).
    pub source_ranges: BTreeSet<(Option<VipKey>, u32, u32, [u8; 16])>,
    /// Occupied backend entries that no VIP's table has.
    pub orphan_backends: usize,
    /// `VIP_BY_ID` entries that do not say what `VIPS` says (a VIP's key and table), or that
    /// name no VIP.
    pub wrong_refs: usize,
    pub filter: VipFilter,
}

impl Snapshot {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        let current = lb_userspace::dataplane::Snapshot::read(maps)?;
        let members = lb_userspace::dataplane::members_by_table(maps, &current.backends)?;
        let by_id: BTreeMap<u32, VipKey> =
            current.vips.iter().map(|(k, info)| (info.id, *k)).collect();
        let mut vips = BTreeMap::new();
        let mut used = BTreeSet::new();
        let mut wrong_refs = 0;
        for (key, info) in &current.vips {
            let ours = members.get(&info.table).cloned().unwrap_or_default();
            used.extend(ours.iter().map(|m| m.id));
            let wanted = lb_common::VipRef {
                key: *key,
                table: info.table,
            };
            if maps.vip_ref(info.id)? != wanted {
                wrong_refs += 1;
            }
            let backends = ours
                .iter()
                .map(|m| {
                    let view = MemberView {
                        backend: lb_common::Backend {
                            generation: 0,
                            ..m.backend
                        },
                        weight: m.weight,
                        draining: m.draining,
                    };
                    (m.addr(), view)
                })
                .collect();
            let table = maps
                .maglev_table(info.table, info.table_size)?
                .iter()
                .map(|id| ours.iter().find(|m| m.id == *id).map(|m| m.addr()))
                .collect();
            vips.insert(
                *key,
                VipView {
                    table_size: info.table_size,
                    live_backends: info.live_backends,
                    flags: info.flags,
                    backends,
                    table,
                },
            );
        }
        let empty = lb_common::VipRef::default();
        for id in 0..lb_common::MAX_VIPS {
            if !by_id.contains_key(&id) && maps.vip_ref(id)? != empty {
                wrong_refs += 1;
            }
        }
        let source_ranges = current
            .source_ranges
            .iter()
            .map(|(len, data)| {
                let scope = u32::from_be(data.scope_be);
                (
                    by_id.get(&(scope & 0x00ff_ffff)).copied(),
                    scope >> 24,
                    *len,
                    data.addr,
                )
            })
            .collect();
        Ok(Self {
            orphan_backends: current
                .backends
                .keys()
                .filter(|id| !used.contains(*id))
                .count(),
            wrong_refs,
            vips,
            vip_addrs: current.vip_addrs.clone(),
            source_ranges,
            filter: maps.vip_filter()?,
        })
    }

    /// What differs from `other`, one line per difference (tables summarised).
    pub fn differences(&self, other: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        let keys: BTreeSet<&VipKey> = self.vips.keys().chain(other.vips.keys()).collect();
        for key in keys {
            let vip = addr_from_raw(&key.addr, key.family);
            match (self.vips.get(key), other.vips.get(key)) {
                (Some(a), Some(b)) => {
                    if (a.table_size, a.live_backends, a.flags)
                        != (b.table_size, b.live_backends, b.flags)
                    {
                        out.push(format!(
                            "VIP {vip}: (table size, live, flags) {:?} vs {:?}",
                            (a.table_size, a.live_backends, a.flags),
                            (b.table_size, b.live_backends, b.flags)
                        ));
                    }
                    if a.backends != b.backends {
                        out.push(format!(
                            "VIP {vip}: backends {:?} vs {:?}",
                            a.backends
                                .iter()
                                .map(|(ip, m)| (ip, m.weight, m.draining))
                                .collect::<Vec<_>>(),
                            b.backends
                                .iter()
                                .map(|(ip, m)| (ip, m.weight, m.draining))
                                .collect::<Vec<_>>()
                        ));
                    }
                    let differ = a.table.iter().zip(&b.table).filter(|(x, y)| x != y).count();
                    if differ > 0 || a.table.len() != b.table.len() {
                        out.push(format!(
                            "VIP {vip}: Maglev table: {differ} of {} positions differ; shares {:?} vs {:?}",
                            a.table.len(),
                            shares(&a.table),
                            shares(&b.table)
                        ));
                    }
                }
                (a, b) => out.push(format!(
                    "VIP {vip}: present {} vs {}",
                    a.is_some(),
                    b.is_some()
                )),
            }
        }
        if self.vip_addrs != other.vip_addrs {
            out.push(format!(
                "VIP_ADDRS {:?} vs {:?}",
                self.vip_addrs, other.vip_addrs
            ));
        }
        if self.source_ranges != other.source_ranges {
            out.push(format!(
                "SOURCE_RANGES {:?} vs {:?}",
                self.source_ranges, other.source_ranges
            ));
        }
        if self.orphan_backends != other.orphan_backends {
            out.push(format!(
                "backend entries of no table: {} vs {}",
                self.orphan_backends, other.orphan_backends
            ));
        }
        if self.wrong_refs != other.wrong_refs {
            out.push(format!(
                "VIP_BY_ID entries that disagree with VIPS: {} vs {}",
                self.wrong_refs, other.wrong_refs
            ));
        }
        if self.filter != other.filter {
            out.push("VIP_FILTER differs".into());
        }
        out
    }
}

/// Table positions per backend.
fn shares(table: &[Option<IpAddr>]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for entry in table {
        let name = entry.map_or_else(|| "none".to_owned(), |a| a.to_string());
        *out.entry(name).or_default() += 1;
    }
    out
}

/// Pins this thread to one CPU: per-CPU state (the flood guard's window, the connection
/// table's per-CPU LRU lists) is then one CPU's alone, as BPF_PROG_TEST_RUN runs the program
/// on the caller's CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// A loaded balancer programmed with `desired` (panics with the reason if either fails: the
/// fixture tests' common start).
pub fn harness_with(desired: &Desired) -> Harness {
    crate::require_root();
    let mut h = Harness::new().expect("load the XDP object");
    h.apply(desired).expect("program the maps");
    h
}

/// Asserts verdict XDP_TX and that the frame is `input` with only the MACs rewritten to some
/// backend's; returns that backend.
pub fn assert_forwarded(h: &mut Harness, input: &[u8]) -> u8 {
    let (action, out) = h.run(input).expect("test run");
    assert_eq!(action, XDP_TX, "verdict for a VIP packet");
    let backend = Harness::backend_of(&out).expect("destination MAC is a backend's");
    assert_eq!(out, expected_l2(input, backend), "only the MACs may change");
    backend
}

/// Asserts `verdict` and that the frame left the program untouched.
pub fn assert_untouched(h: &mut Harness, input: &[u8], verdict: u32) {
    let (action, out) = h.run(input).expect("test run");
    assert_eq!(action, verdict);
    assert_eq!(
        out, input,
        "a frame that is not forwarded is left untouched"
    );
}

/// Runs `frame` through `program` of `ebpf` `repeat` times: verdict, output frame, ns per run.
fn test_run(
    ebpf: &mut Ebpf,
    program: &str,
    frame: &[u8],
    repeat: u32,
) -> anyhow::Result<(u32, Vec<u8>, u64)> {
    let prog = dataplane::xdp_program(ebpf, program)?;
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

/// The loaded, unattached decapsulator, configured through the same code as `sluice decap`.
pub struct DecapHarness {
    ebpf: Ebpf,
    pub maps: DecapMaps,
}

impl DecapHarness {
    /// Accepts packets from `allow` addressed to `local`.
    pub fn new(allow: &[&str], local: &[IpAddr]) -> anyhow::Result<Self> {
        let mut ebpf = dataplane::load_decap(None)?;
        let mut maps = DecapMaps::from_ebpf(&mut ebpf)?;
        let allow: Vec<IpNet> = allow
            .iter()
            .map(|a| a.parse().map_err(|e| anyhow!("{a}: {e}")))
            .collect::<anyhow::Result<_>>()?;
        maps.sync(&allow, local)?;
        Ok(Self { ebpf, maps })
    }

    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
        let (action, out, _) = test_run(&mut self.ebpf, DECAP_PROGRAM, frame, 1)?;
        Ok((action, out))
    }

    pub fn counter(&self, counter: DecapCounter) -> anyhow::Result<u64> {
        self.maps.counter(counter)
    }
}

/// A VIP on TCP (or UDP) port 80 with backends 0..n, MACs given (no neighbour lookups).
pub fn desired(protocol: Protocol, backends: &[(u8, u32, bool)]) -> Desired {
    desired_at(IpAddr::V4(VIP), protocol, backends)
}

/// The same VIP shape at `vip` (IPv4 or IPv6); backends are of the VIP's family.
pub fn desired_at(vip: IpAddr, protocol: Protocol, backends: &[(u8, u32, bool)]) -> Desired {
    let backends = backends
        .iter()
        .map(|&(i, weight, drain)| Backend {
            addr: if vip.is_ipv4() {
                IpAddr::V4(backend_addr(i))
            } else {
                IpAddr::V6(backend_addr6(i))
            },
            mac: Some(MacAddr(backend_mac(i))),
            weight,
            drain,
        })
        .collect::<Vec<_>>();
    Desired {
        settings: Settings {
            encap_source_v4: Some(ENCAP_SOURCE_V4.parse().expect("constant prefix")),
            encap_source_v6: Some(ENCAP_SOURCE_V6.parse().expect("constant prefix")),
            ..Settings::default()
        },
        vips: vec![Vip::new(
            VipAddr {
                addr: vip,
                port: 80,
                protocol,
            },
            backends,
        )],
        peers: Default::default(),
    }
}

/// An ICMP error from a router about the backend's reply of the flow `sport`: the quoted
/// packet goes VIP:80 -> client:sport.
pub fn icmp_error_about(sport: u16, v6: bool) -> Frame {
    let mut quoted = Frame::tcp(80, TCP_ACK);
    quoted.dport = sport;
    quoted.src = IpAddr::V4(VIP);
    quoted.dst = IpAddr::V4(CLIENT);
    if v6 {
        quoted.src = IpAddr::V6(VIP6);
        quoted.dst = IpAddr::V6(CLIENT6);
    }
    let quote: Vec<u8> = quoted
        .ip_packet()
        .into_iter()
        .take(if v6 { 48 } else { 28 })
        .collect();
    let router: IpAddr = if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 0, 255, 1))
    };
    // Frag needed (3/4) with MTU 1400, or packet too big (2/0) with MTU 1400.
    let mut error = if v6 {
        Frame::icmp(2, 0, [0, 0, 0x05, 0x78], &quote)
    } else {
        Frame::icmp(3, 4, [0, 0, 0x05, 0x78], &quote)
    };
    error.src = router;
    error.dst = if v6 {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP)
    };
    if v6 {
        error.protocol = 58;
    }
    error
}

/// ICMP content of a frame: type, code, the four bytes after the checksum, then the body.
#[derive(Clone, Debug)]
pub struct Icmp {
    pub kind: u8,
    pub code: u8,
    pub rest: [u8; 4],
    pub body: Vec<u8>,
}

/// Builds Ethernet / IPv4|IPv6 / TCP|UDP|ICMP frames with correct checksums.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub ip_options: Vec<u8>,
    /// IPv6 extension headers (next-header type, body without the two leading bytes; bodies
    /// are padded to 8-byte units). A fragment header is type 44 with a 6-byte body.
    pub ext_headers: Vec<(u8, Vec<u8>)>,
    pub icmp: Option<Icmp>,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub frag_off: u16,
    /// IPv4 TOS / IPv6 traffic class (DSCP and ECN).
    pub tos: u8,
    /// The whole L4 part verbatim (no header built, no checksum), e.g. an inner IP packet
    /// under protocol 4 or 41.
    pub raw_l4: Option<Vec<u8>>,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const IP_DF: u16 = 0x4000;

impl Frame {
    pub fn tcp(sport: u16, flags: u8) -> Self {
        Self {
            src: IpAddr::V4(CLIENT),
            dst: IpAddr::V4(VIP),
            sport,
            dport: 80,
            protocol: 6,
            tcp_flags: flags,
            ip_options: Vec::new(),
            ext_headers: Vec::new(),
            icmp: None,
            payload: Vec::new(),
            ttl: 64,
            frag_off: 0,
            tos: 0,
            raw_l4: None,
        }
    }

    pub fn udp(sport: u16, payload: &[u8]) -> Self {
        Self {
            protocol: 17,
            payload: payload.to_vec(),
            ..Self::tcp(sport, 0)
        }
    }

    /// The same frame between the IPv6 client and VIP.
    pub fn v6(self) -> Self {
        Self {
            src: IpAddr::V6(CLIENT6),
            dst: IpAddr::V6(VIP6),
            protocol: match self.protocol {
                1 => 58,
                other => other,
            },
            ..self
        }
    }

    /// An ICMP (or, between IPv6 addresses, ICMPv6) message.
    pub fn icmp(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        Self {
            protocol: 1,
            icmp: Some(Icmp {
                kind,
                code,
                rest,
                body: body.to_vec(),
            }),
            ..Self::tcp(0, 0)
        }
    }

    /// The IP packet (no Ethernet header).
    pub fn ip_packet(&self) -> Vec<u8> {
        let l4 = self.l4();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => self.ipv4(src, dst, &l4),
            (IpAddr::V6(src), IpAddr::V6(dst)) => self.ipv6(src, dst, &l4),
            _ => panic!("a frame's addresses must be of one family"),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let ip = self.ip_packet();
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        let mut frame = Vec::with_capacity(14 + ip.len());
        frame.extend_from_slice(&LB_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame
    }

    fn ipv4(&self, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
        let ihl = 20 + self.ip_options.len();
        let mut ip = Vec::with_capacity(ihl + l4.len());
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(self.tos);
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag_off.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.protocol);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let sum = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(l4);
        ip
    }

    fn ipv6(&self, src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        for (i, (_, body)) in self.ext_headers.iter().enumerate() {
            let next = self
                .ext_headers
                .get(i + 1)
                .map_or(self.protocol, |(kind, _)| *kind);
            let mut header = vec![next, 0];
            header.extend_from_slice(body);
            while header.len() % 8 != 0 {
                header.push(0);
            }
            header[1] = (header.len() / 8 - 1) as u8;
            if self.ext_headers[i].0 == 44 {
                header[1] = 0; // The fragment header has a reserved byte there.
            }
            ext.extend_from_slice(&header);
        }
        let first = self.ext_headers.first().map_or(self.protocol, |(k, _)| *k);
        let mut ip = Vec::with_capacity(40 + ext.len() + l4.len());
        ip.extend_from_slice(&(0x6000_0000u32 | (self.tos as u32) << 20).to_be_bytes());
        ip.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
        ip.push(first);
        ip.push(self.ttl);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&ext);
        ip.extend_from_slice(l4);
        ip
    }

    /// The pseudo-header sum of the L4 checksum (RFC 768 / RFC 8200 8.1).
    fn pseudo_sum(&self, l4_len: usize) -> u32 {
        let mut pseudo = Vec::new();
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                if self.protocol == 1 {
                    return 0; // ICMPv4 has no pseudo-header.
                }
                pseudo.extend_from_slice(&src.octets());
                pseudo.extend_from_slice(&dst.octets());
                pseudo.push(0);
                pseudo.push(self.protocol);
                pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
            }
            (src, dst) => {
                for addr in [src, dst] {
                    if let IpAddr::V6(a) = addr {
                        pseudo.extend_from_slice(&a.octets());
                    }
                }
                pseudo.extend_from_slice(&(l4_len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, self.protocol]);
            }
        }
        sum_words(&pseudo)
    }

    fn l4(&self) -> Vec<u8> {
        if let Some(raw) = &self.raw_l4 {
            return raw.clone();
        }
        let mut l4 = Vec::new();
        let checksum_at = if let Some(icmp) = &self.icmp {
            l4.push(icmp.kind);
            l4.push(icmp.code);
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(&icmp.rest);
            l4.extend_from_slice(&icmp.body);
            2
        } else if self.protocol == 6 {
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&1000u32.to_be_bytes()); // seq
            l4.extend_from_slice(&0u32.to_be_bytes()); // ack
            l4.push(5 << 4);
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&65535u16.to_be_bytes());
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            16
        } else {
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        if self.icmp.is_none() {
            l4.extend_from_slice(&self.payload);
        }
        let sum = checksum(&l4, self.pseudo_sum(l4.len()));
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

/// Whether the checksum over `bytes` (with its checksum field in place) verifies.
pub fn checksum_ok(bytes: &[u8], pseudo: u32) -> bool {
    checksum(bytes, pseudo) == 0
}

/// The ICMPv6 / TCP-over-IPv6 pseudo-header sum for a packet of `len` bytes of `proto`.
pub fn pseudo_sum_v6(src: Ipv6Addr, dst: Ipv6Addr, len: usize, proto: u8) -> u32 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    sum_words(&pseudo)
}

/// The frame the program should emit for `input` sent to backend `i` by L2 DSR: only the two
/// MAC addresses change.
pub fn expected_l2(input: &[u8], i: u8) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&backend_mac(i));
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

/// ARP operations (RFC 826).
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP frame, padded to the 60-byte Ethernet minimum as it arrives on a wire.
pub struct Arp {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: Ipv4Addr,
    pub tha: [u8; 6],
    pub tpa: Ipv4Addr,
}

impl Arp {
    /// "Who has `target`? Tell CLIENT", broadcast from the client.
    pub fn request(target: Ipv4Addr) -> Self {
        Self {
            eth_dst: [0xff; 6],
            eth_src: CLIENT_MAC,
            op: ARP_REQUEST,
            sha: CLIENT_MAC,
            spa: CLIENT,
            tha: [0; 6],
            tpa: target,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(60);
        f.extend_from_slice(&self.eth_dst);
        f.extend_from_slice(&self.eth_src);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&1u16.to_be_bytes());
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&[6, 4]);
        f.extend_from_slice(&self.op.to_be_bytes());
        f.extend_from_slice(&self.sha);
        f.extend_from_slice(&self.spa.octets());
        f.extend_from_slice(&self.tha);
        f.extend_from_slice(&self.tpa.octets());
        f.resize(60, 0);
        f
    }
}

/// ICMPv6 Neighbor Discovery message types (RFC 4861).
pub const ND_SOLICIT: u8 = 135;
pub const ND_ADVERT: u8 = 136;
/// Advertisement flags (the first byte after the checksum).
pub const ND_SOLICITED: u8 = 0x40;
pub const ND_OVERRIDE: u8 = 0x20;

/// An Ethernet/IPv6 Neighbor Solicitation or Advertisement (RFC 4861 4.3, 4.4), its ICMPv6
/// checksum computed (unless `bad_checksum`).
#[derive(Clone, Debug)]
pub struct Ndp {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub kind: u8,
    pub code: u8,
    pub flags: u8,
    pub target: Ipv6Addr,
    /// One link-layer address option: (type 1 source / 2 target, MAC).
    pub option: Option<(u8, [u8; 6])>,
    /// Raw bytes after the option (more options, or garbage).
    pub extra: Vec<u8>,
    pub bad_checksum: bool,
}

impl Ndp {
    /// ff02::1:ffXX:XXXX for `target` (RFC 4291 2.7.1).
    pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
        let t = target.octets();
        Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        )
    }

    /// "Who has `target`?" from the client (CLIENT6, CLIENT_MAC) to the target's
    /// solicited-node group, with the source link-layer address option, as Linux sends it.
    pub fn solicit(target: Ipv6Addr) -> Self {
        let group = Self::solicited_node(target).octets();
        Self {
            eth_dst: [0x33, 0x33, group[12], group[13], group[14], group[15]],
            eth_src: CLIENT_MAC,
            src: CLIENT6,
            dst: Self::solicited_node(target),
            hop_limit: 255,
            kind: ND_SOLICIT,
            code: 0,
            flags: 0,
            target,
            option: Some((1, CLIENT_MAC)),
            extra: Vec::new(),
            bad_checksum: false,
        }
    }

    /// A reachability probe: unicast to `target` itself, without the option (78 bytes).
    pub fn probe(target: Ipv6Addr, eth_dst: [u8; 6]) -> Self {
        Self {
            eth_dst,
            dst: target,
            option: None,
            ..Self::solicit(target)
        }
    }

    /// The solicited advertisement "`target` is at `mac`" to the client, as a host answers.
    pub fn advert(target: Ipv6Addr, mac: [u8; 6]) -> Self {
        Self {
            eth_dst: CLIENT_MAC,
            eth_src: mac,
            src: target,
            dst: CLIENT6,
            hop_limit: 255,
            kind: ND_ADVERT,
            code: 0,
            flags: ND_SOLICITED | ND_OVERRIDE,
            target,
            option: Some((2, mac)),
            extra: Vec::new(),
            bad_checksum: false,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut icmp = vec![self.kind, self.code, 0, 0, self.flags, 0, 0, 0];
        icmp.extend_from_slice(&self.target.octets());
        if let Some((kind, mac)) = self.option {
            icmp.extend_from_slice(&[kind, 1]);
            icmp.extend_from_slice(&mac);
        }
        icmp.extend_from_slice(&self.extra);
        let mut sum = checksum(&icmp, pseudo_sum_v6(self.src, self.dst, icmp.len(), 58));
        if self.bad_checksum {
            sum ^= 0x0100;
        }
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut f = Vec::with_capacity(14 + 40 + icmp.len());
        f.extend_from_slice(&self.eth_dst);
        f.extend_from_slice(&self.eth_src);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        f.extend_from_slice(&[58, self.hop_limit]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend_from_slice(&icmp);
        f
    }
}

/// The backend (of `backends`: address and weight) that a balancer must pick for a new flow, from
/// the flow hash and the Maglev table alone: what every node of a VIP computes. For tests whose
/// traffic is deterministic (fixed addresses and source ports), so the exact outcome can be
/// asserted instead of a loose share.
pub fn predicted_backend(
    backends: &[(IpAddr, u32)],
    table_size: u32,
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    proto: u8,
    affinity: bool,
) -> Option<IpAddr> {
    use lb_userspace::maglev::{MaglevBackend, build_table};
    let ids: Vec<MaglevBackend> = backends
        .iter()
        .map(|&(addr, weight)| MaglevBackend {
            id: lb_common::maglev_id(addr),
            weight,
        })
        .collect();
    let table = build_table(&ids, table_size);
    let key = lb_common::FlowKey::of(src, sport, dst, dport, proto);
    let slot = table[(key.hash(affinity) % table_size) as usize];
    backends.get(slot as usize).map(|&(addr, _)| addr)
}

/// The 802.1Q tag protocol identifier, and QinQ's outer one (802.1ad).
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// `frame` with a VLAN tag (protocol identifier `tpid`, then `tci`) after its MACs, as a
/// VLAN's frame arrives on the parent interface.
pub fn with_tag(frame: &[u8], tpid: u16, tci: u16) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&tpid.to_be_bytes());
    tagged.extend_from_slice(&tci.to_be_bytes());
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

/// `frame` with one 802.1Q tag carrying `tci` (priority, DEI and VLAN id).
pub fn vlan_tagged(frame: &[u8], tci: u16) -> Vec<u8> {
    with_tag(frame, TPID_8021Q, tci)
}

/// `frame` without its 802.1Q tag, after asserting that the tag is there and carries `tci`.
pub fn vlan_untagged(frame: &[u8], tci: u16) -> Vec<u8> {
    let mut tag = TPID_8021Q.to_be_bytes().to_vec();
    tag.extend_from_slice(&tci.to_be_bytes());
    assert_eq!(&frame[12..16], &tag[..], "the frame keeps its 802.1Q tag");
    let mut untagged = frame[..12].to_vec();
    untagged.extend_from_slice(&frame[16..]);
    untagged
}
