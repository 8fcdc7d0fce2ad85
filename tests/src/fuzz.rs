//! Random and mutated frames for the balancer, and the invariants every verdict must keep
//! (tests/tests/fuzz.rs). Frames start valid — every kind sluice handles or must leave alone —
//! and are then cut, flipped and given contradicting lengths. The oracle parses each input on
//! its own (a reference parser written from the RFCs, not from the eBPF code) and checks the
//! program's verdict and output against it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::collections::BTreeMap;

use lb_userspace::model::{
    Backend, Desired, ForwardingMode, IpNet, Protocol, Vip, VipAddr, vip_key,
};

use crate::fixtures::{
    ARP_REPLY, Arp, CLIENT, CLIENT_MAC, CLIENT6, FIXTURE_MTU, Frame, IP_DF, LB_MAC, TCP_ACK,
    TCP_SYN, TPID_8021AD, TPID_8021Q, VIP, VIP6, XDP_DROP, XDP_PASS, XDP_TX, backend_addr,
    backend_mac, checksum_ok, desired_at, pseudo_sum_v6, vlan_tagged,
};
use crate::fixtures::{ND_SOLICIT, Ndp, Snapshot, VipView};

/// A backend that may get new flows.
fn is_live(b: &Backend) -> bool {
    b.weight > 0 && !b.drain
}

/// xorshift64*: small, fast, and the same sequence for the same seed everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so that nearby seeds give unrelated streams (and 0 works).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// VIP addresses of the fuzz configuration besides the fixtures' `VIP` / `VIP6`.
pub const VIP_IPIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
pub const VIP6_IPIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
pub const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);
/// The address the fuzzed node announces (answers ARP for), and the MAC it answers with.
pub const ANNOUNCED: Ipv4Addr = VIP;
pub const ANNOUNCED_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
/// Co-location: the fuzzed node's own addresses (a backend of `VIP_LOCAL`, and where other
/// nodes' IPIP goes), its VIP whose only backend is itself, and the peer nodes (the fixtures'
/// three backends, known by their MACs).
pub const NODE_SELF: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 30);
pub const NODE_SELF6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x30);
pub const VIP_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 4);
const NODE_SELF_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x30];
/// A UDP port of `VIP` open only to 192.0.2.0/24 (the fixtures' client is outside it).
pub const RANGED_PORT: u16 = 53;

/// The configuration every fuzzed frame meets: L2 VIPs of both families and protocols, an
/// ipip VIP of each family (IPv4 nodes / IPv6 nodes), a VIP without live backends and one
/// with source ranges; the VIPs have a drained backend and one of weight 0 besides their three
/// live ones. Every backend is on the "ingress" interface, so no redirect.
pub fn fuzz_desired() -> Desired {
    // Three live backends (the peer nodes), a drained one and one of weight 0: those two must
    // never get a new flow (and, the configuration being fixed, no flow at all).
    let three = &[
        (0, 1, false),
        (1, 1, false),
        (2, 1, false),
        (3, 1, true),
        (4, 0, false),
    ];
    let mut desired = desired_at(IpAddr::V4(VIP), Protocol::Tcp, three);
    let mut add = |addr: IpAddr, port: u16, protocol: Protocol, build: &dyn Fn(&mut Vip)| {
        let mut d = desired_at(addr, protocol, three);
        let mut vip = d.vips.remove(0);
        vip.key.port = port;
        build(&mut vip);
        desired.vips.push(vip);
    };
    add(IpAddr::V4(VIP), 80, Protocol::Udp, &|_| {});
    add(IpAddr::V6(VIP6), 80, Protocol::Tcp, &|_| {});
    add(IpAddr::V6(VIP6), 80, Protocol::Udp, &|_| {});
    add(IpAddr::V4(VIP), RANGED_PORT, Protocol::Udp, &|v| {
        v.source_ranges = vec!["192.0.2.0/24".parse::<IpNet>().expect("constant prefix")];
    });
    add(IpAddr::V4(VIP_IPIP), 80, Protocol::Tcp, &|v| {
        v.mode = ForwardingMode::Ipip
    });
    add(IpAddr::V4(VIP_IPIP), 80, Protocol::Udp, &|v| {
        v.mode = ForwardingMode::Ipip
    });
    add(IpAddr::V6(VIP6_IPIP), 80, Protocol::Udp, &|v| {
        v.mode = ForwardingMode::Ipip
    });
    add(IpAddr::V4(VIP_EMPTY), 80, Protocol::Tcp, &|v| {
        v.backends = v.backends.map(|b| Backend {
            weight: 0,
            ..b.clone()
        });
    });
    add(IpAddr::V4(VIP_LOCAL), 80, Protocol::Tcp, &|v| {
        v.backends = vec![Backend {
            addr: IpAddr::V4(NODE_SELF),
            mac: Some(lb_userspace::model::MacAddr(NODE_SELF_MAC)),
            ..v.backends[0].clone()
        }]
        .into();
    });
    desired.peers = (0..3).map(|i| IpAddr::V4(backend_addr(i))).collect();
    desired.vips.sort_by_key(|v| v.key);
    desired
}

/// The fuzzed node's own addresses (`Harness::apply_as_node_with`).
pub fn fuzz_node_addrs() -> [IpAddr; 2] {
    [IpAddr::V4(NODE_SELF), IpAddr::V6(NODE_SELF6)]
}

/// What the oracle knows of the configuration, and each VIP's Maglev table as the program
/// reads it (from the maps: [`crate::fixtures::Snapshot`]).
pub struct World {
    pub desired: Desired,
    tables: BTreeMap<lb_common::VipKey, VipView>,
    vip_addrs: BTreeSet<IpAddr>,
    node_addrs: BTreeSet<IpAddr>,
    own_addrs: BTreeSet<IpAddr>,
    peer_macs: BTreeSet<Vec<u8>>,
}

impl World {
    /// The oracle of `desired` as programmed into maps whose [`Snapshot`] is `maps`. Panics
    /// when a table holds a backend that is not live in `desired` (drained, weight 0, or
    /// none of the VIP's) or misses a live one.
    pub fn new(desired: Desired, maps: &Snapshot) -> Self {
        for vip in &desired.vips {
            let key = vip_key(&vip.key);
            let Some(view) = maps.vips.get(&key) else {
                panic!("VIP {:?} is not in the maps", vip.key);
            };
            let in_table: BTreeSet<IpAddr> = view.table.iter().flatten().copied().collect();
            let live: BTreeSet<IpAddr> = vip
                .backends
                .iter()
                .filter(|b| is_live(b))
                .map(|b| b.addr)
                .collect();
            assert_eq!(
                in_table, live,
                "VIP {:?}: the Maglev table in the maps holds other backends than the live ones \
                 (weight > 0, not drained)",
                vip.key
            );
        }
        let tables = maps.vips.clone();
        let vip_addrs = desired.vips.iter().map(|v| v.key.addr).collect();
        let node_addrs = desired
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect();
        // A peer's frames come from its own MAC (balanced there) or from that MAC's
        // handed-on twin (second chance): either way they are its.
        let peer_macs = (0..3)
            .flat_map(|i| {
                let mac = backend_mac(i);
                [mac.to_vec(), lb_common::handed_on_mac(mac).to_vec()]
            })
            .collect();
        Self {
            desired,
            tables,
            vip_addrs,
            node_addrs,
            own_addrs: fuzz_node_addrs().into_iter().collect(),
            peer_macs,
        }
    }

    /// The backend the program must send the flow (client, client port, VIP, VIP port,
    /// protocol) of `vip` to: its Maglev table's slot for the flow's hash, as the program
    /// reads it (`Err`: the table has none there, or names no live backend of the VIP).
    fn pick<'a>(
        &self,
        vip: &'a Vip,
        flow: (IpAddr, u16, IpAddr, u16, u8),
    ) -> Result<&'a Backend, String> {
        let (src, sport, dst, dport, proto) = flow;
        let view = self
            .tables
            .get(&vip_key(&vip.key))
            .ok_or_else(|| format!("VIP {:?} has no table in the maps", vip.key))?;
        if view.table_size == 0 || view.table.len() != view.table_size as usize {
            return Err(format!(
                "VIP {:?}: table of size {}",
                vip.key, view.table_size
            ));
        }
        let key = lb_common::FlowKey::of(src, sport, dst, dport, proto);
        let affinity = view.flags & lb_common::vip_flags::AFFINITY != 0;
        let slot = key.hash(affinity) % view.table_size;
        let Some(addr) = view.table[slot as usize] else {
            return Err(format!(
                "VIP {:?} has no backend in slot {slot} of its table for this flow",
                vip.key
            ));
        };
        vip.backends
            .iter()
            .find(|b| b.addr == addr && is_live(b))
            .ok_or_else(|| {
                format!(
                    "slot {slot} names {addr}, no live backend of VIP {:?}",
                    vip.key
                )
            })
    }

    fn vip(&self, addr: IpAddr, port: u16, proto: u8) -> Option<&Vip> {
        let protocol = match proto {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            _ => return None,
        };
        self.desired.vip(&VipAddr {
            addr,
            port,
            protocol,
        })
    }
}

/// One generated input: the frame, and whether the program must forward it (an unmutated,
/// well-formed packet of a VIP with live backends, or an echo request / ICMP error about one)
/// or must hand it to this node's stack (a pick of this node, a peer's frame, what a peer
/// encapsulated to this node). The default promises nothing: any verdict will do.
#[derive(Clone, Debug, Default)]
pub struct Case {
    pub frame: Vec<u8>,
    pub must_forward: bool,
    pub must_pass: bool,
    /// A well-formed frame for no VIP (nor an ARP request for the announced address): the
    /// kernel's, so `XDP_PASS` with every byte as it came.
    pub must_pass_untouched: bool,
    /// A valid packet of a VIP that must not reach any backend (no live backend, a client
    /// outside the VIP's source ranges): `XDP_DROP`, why in the text.
    pub must_drop: Option<&'static str>,
}

const EXT_KINDS: [u8; 5] = [0, 43, 60, 51, 44];

/// A valid frame of a random kind; `must_forward` as it stands, before any mutation.
fn base(rng: &mut Rng) -> Case {
    // A small pool of client ports, so that flows repeat (connection-table hits) and the
    // table fills (LRU eviction).
    let sport = 1024 + rng.below(8192) as u16;
    let tcp_flags = rng.pick(&[TCP_SYN, TCP_ACK, TCP_ACK | 0x08, 0x01 | TCP_ACK]);
    let payload_len = rng.pick(&[0usize, 1, 7, 64, 300, 1400]);
    let payload = rng.bytes(payload_len);
    let udp = rng.chance(50);
    let flow = |v6: bool| {
        let mut f = if udp {
            Frame::udp(sport, &payload)
        } else {
            let mut f = Frame::tcp(sport, tcp_flags);
            f.payload = payload.clone();
            f
        };
        if v6 {
            f = f.v6();
        }
        f
    };
    let v6 = rng.chance(40);
    match rng.below(19) {
        // TCP or UDP to an L2 VIP.
        0..=3 => Case {
            frame: flow(v6).bytes(),
            must_forward: true,
            ..Case::default()
        },
        // To a VIP address on another port, or to no VIP at all.
        4 => {
            let mut f = flow(v6);
            if rng.chance(50) {
                f.dport = rng.pick(&[81, 443, 8080, 0]);
            } else {
                f.dst = if v6 {
                    IpAddr::V6(Ipv6Addr::from(rng.next_u64() as u128 | (0xfd00u128 << 112)))
                } else {
                    IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
                };
            }
            Case {
                frame: f.bytes(),
                must_pass_untouched: true,
                ..Case::default()
            }
        }
        // An ipip VIP: encapsulated, or answered with "too big" (DF set / IPv6), or dropped
        // as too big (IPv4 without DF: the sender cannot be told).
        5 => {
            let mut f = flow(v6);
            f.protocol = if v6 { 17 } else { f.protocol };
            f.dst = if v6 {
                IpAddr::V6(VIP6_IPIP)
            } else {
                IpAddr::V4(VIP_IPIP)
            };
            let big = rng.chance(30);
            if big {
                let n = 1440 + rng.below(80);
                f.payload = rng.bytes(n);
            }
            let df = v6 || rng.chance(90);
            f.frag_off = if df { IP_DF } else { 0 };
            Case {
                frame: f.bytes(),
                must_forward: df || !big,
                ..Case::default()
            }
        }
        // No live backend, or outside the source ranges: dropped.
        6 => {
            let mut f = flow(false);
            let why = if udp {
                f.dport = RANGED_PORT;
                "a client outside the VIP's source ranges"
            } else {
                f.dst = IpAddr::V4(VIP_EMPTY);
                "a VIP without a live backend"
            };
            Case {
                frame: f.bytes(),
                must_drop: Some(why),
                ..Case::default()
            }
        }
        // Echo request to a VIP address (or another address).
        7 => {
            let mut f = Frame::icmp(if v6 { 128 } else { 8 }, 0, [0, 1, 0, 2], &payload);
            if v6 {
                f = f.v6();
            }
            let to_vip = rng.chance(80);
            if !to_vip {
                f.dst = if v6 {
                    IpAddr::V6(CLIENT6)
                } else {
                    IpAddr::V4(CLIENT)
                };
            }
            Case {
                frame: f.bytes(),
                must_forward: to_vip,
                must_pass_untouched: !to_vip,
                ..Case::default()
            }
        }
        // ICMP error quoting a VIP flow's reply (or garbage).
        8 => {
            let mut quoted = flow(v6);
            std::mem::swap(&mut quoted.src, &mut quoted.dst);
            quoted.dport = quoted.sport;
            quoted.sport = 80;
            let whole = quoted.ip_packet();
            let keep = if v6 { 48 } else { 28 } + rng.below(40);
            let mut quote: Vec<u8> = whole.into_iter().take(keep).collect();
            let garbage = rng.chance(30);
            if garbage {
                let n = rng.below(64);
                quote = rng.bytes(n);
            }
            let (kind, code) = if v6 {
                rng.pick(&[(1, 0), (2, 0), (3, 0)])
            } else {
                rng.pick(&[(3, 4), (3, 1), (11, 0)])
            };
            let mut f = Frame::icmp(kind, code, [0, 0, 0x05, 0x78], &quote);
            if v6 {
                f = f.v6();
            }
            Case {
                frame: f.bytes(),
                must_forward: !garbage,
                ..Case::default()
            }
        }
        // IPv6 extension header chains, up to past the walked bound.
        9 => {
            let mut f = flow(true);
            for _ in 0..rng.below(9) {
                let kind = rng.pick(&EXT_KINDS);
                let body = if kind == 44 {
                    let frag: u16 = rng.pick(&[0, 1, 8, 9, 0xfff8]);
                    let mut b = frag.to_be_bytes().to_vec();
                    b.extend_from_slice(&rng.next_u64().to_be_bytes()[..4]);
                    b
                } else {
                    vec![0; 6 + 8 * rng.below(3)]
                };
                f.ext_headers.push((kind, body));
            }
            Case {
                frame: f.bytes(),
                ..Case::default()
            }
        }
        // Fragments, first or later.
        10 => {
            let mut f = flow(v6);
            if v6 {
                let frag: u16 = rng.pick(&[1, 8, 9, 0x100]);
                let mut b = frag.to_be_bytes().to_vec();
                b.extend_from_slice(&[0, 0, 0, 7]);
                f.ext_headers.push((44, b));
            } else {
                f.frag_off = rng.pick(&[0x2000, 0x0001, 0x2010, 0x1fff]);
            }
            Case {
                frame: f.bytes(),
                ..Case::default()
            }
        }
        // Encapsulated packets (IPIP / IP6IP6 / mixed) arriving at the balancer.
        11 => {
            let f = wrapped(flow(rng.chance(50)), flow(v6));
            Case {
                frame: f.bytes(),
                ..Case::default()
            }
        }
        // IPv4 with options.
        12 => {
            let mut f = flow(false);
            f.ip_options = vec![1; 4 * (1 + rng.below(10))];
            Case {
                frame: f.bytes(),
                must_forward: true,
                ..Case::default()
            }
        }
        // An ARP request: for the announced address (answered), another VIP or a client.
        13 => {
            let target = rng.pick(&[ANNOUNCED, VIP_IPIP, CLIENT]);
            Case {
                frame: Arp::request(target).bytes(),
                must_forward: target == ANNOUNCED,
                must_pass_untouched: target != ANNOUNCED,
                ..Case::default()
            }
        }
        // A flow to the VIP whose only backend is this node: to the stack, untouched.
        15 => {
            let mut f = Frame::tcp(sport, tcp_flags);
            f.payload = payload.clone();
            f.dst = IpAddr::V4(VIP_LOCAL);
            Case {
                frame: f.bytes(),
                must_pass: true,
                ..Case::default()
            }
        }
        // A VIP frame another node balanced (its MAC as the source): to the stack, untouched.
        16 => {
            let mut frame = flow(v6).bytes();
            frame[6..12].copy_from_slice(&backend_mac(rng.below(3) as u8));
            Case {
                frame,
                must_pass: true,
                ..Case::default()
            }
        }
        // IPIP / IP6IP6 from a peer (or its encap prefix, or a stranger) to this node.
        17 => {
            let mut f = wrapped(flow(rng.chance(50)), flow(v6));
            f.frag_off = 0;
            let stranger = rng.chance(20);
            (f.src, f.dst) = match (v6, stranger) {
                (false, false) => (
                    rng.pick(&[IpAddr::V4(backend_addr(1)), "10.99.0.7".parse().unwrap()]),
                    IpAddr::V4(NODE_SELF),
                ),
                (true, false) => ("fd99::5".parse().unwrap(), IpAddr::V6(NODE_SELF6)),
                (false, true) => ("192.0.2.66".parse().unwrap(), IpAddr::V4(NODE_SELF)),
                (true, true) => ("2001:db8::66".parse().unwrap(), IpAddr::V6(NODE_SELF6)),
            };
            Case {
                frame: f.bytes(),
                must_pass: !stranger,
                ..Case::default()
            }
        }
        // Well-formed traffic of others: for no VIP address, of a protocol sluice does not
        // balance, ARP about addresses this node does not announce, other ethertypes.
        18 => Case {
            frame: not_for_a_vip(rng, v6, flow(v6)),
            must_pass_untouched: true,
            ..Case::default()
        },
        // Not IP, or noise.
        _ => {
            let mut frame = Vec::new();
            frame.extend_from_slice(&LB_MAC);
            frame.extend_from_slice(&CLIENT_MAC);
            let ethertype: [u8; 2] =
                rng.pick(&[[0x08, 0x06], [0x08, 0x00], [0x86, 0xdd], [0x81, 0x00]]);
            frame.extend_from_slice(&ethertype);
            let n = rng.below(200);
            frame.extend(rng.bytes(n));
            Case {
                frame,
                ..Case::default()
            }
        }
    }
}

/// An address of `v6`'s family that is no VIP and none of this node's.
fn other_address(rng: &mut Rng, v6: bool) -> IpAddr {
    let taken = |a: &IpAddr| {
        [VIP, VIP_IPIP, VIP_EMPTY, VIP_LOCAL, NODE_SELF]
            .map(IpAddr::V4)
            .contains(a)
            || [VIP6, VIP6_IPIP, NODE_SELF6].map(IpAddr::V6).contains(a)
    };
    loop {
        let a = if v6 {
            IpAddr::V6(Ipv6Addr::from(
                u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
        };
        if !taken(&a) {
            return a;
        }
    }
}

/// A well-formed frame that belongs to the kernel (see [`Case::must_pass_untouched`]).
fn not_for_a_vip(rng: &mut Rng, v6: bool, mut f: Frame) -> Vec<u8> {
    match rng.below(5) {
        // TCP / UDP from anywhere to an address that is no VIP.
        0 => {
            f.src = other_address(rng, v6);
            f.dst = other_address(rng, v6);
            f.bytes()
        }
        // Protocols sluice never balances, to a VIP address (GRE, SCTP, OSPF) or another one
        // (also ESP, which at a VIP address is an unwalkable IPv6 header, dropped), an ICMP
        // echo reply.
        1 => {
            let to_vip = rng.chance(50);
            f.dst = match (to_vip, v6) {
                (false, _) => other_address(rng, v6),
                (true, true) => IpAddr::V6(VIP6),
                (true, false) => IpAddr::V4(VIP),
            };
            let proto = if to_vip {
                rng.pick(&[47, 132, 89, 0xfe])
            } else {
                rng.pick(&[47, 50, 132, 89, 0xfe])
            };
            if proto == 0xfe {
                let mut echo = Frame::icmp(if v6 { 129 } else { 0 }, 0, [0, 7, 0, 1], b"pong");
                if v6 {
                    echo = echo.v6();
                }
                echo.dst = other_address(rng, v6);
                return echo.bytes();
            }
            let n = 8 + rng.below(64);
            f.protocol = proto;
            f.raw_l4 = Some(rng.bytes(n));
            f.bytes()
        }
        // ARP: a request for an address not announced here (by anyone), a reply, a
        // gratuitous announcement of another host.
        2 => {
            let target = match other_address(rng, false) {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => CLIENT,
            };
            let mut arp = Arp::request(rng.pick(&[target, VIP_IPIP, VIP_EMPTY, CLIENT]));
            arp.spa = match other_address(rng, false) {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => CLIENT,
            };
            match rng.below(3) {
                0 => {}
                1 => {
                    arp.op = ARP_REPLY;
                    arp.eth_dst = LB_MAC;
                    arp.tha = LB_MAC;
                }
                _ => arp.tpa = arp.spa,
            }
            arp.bytes()
        }
        // A frame for another host's MAC (flooded by a switch, or a promiscuous interface):
        // not a VIP's either.
        3 => {
            f.dst = other_address(rng, v6);
            let mut frame = f.bytes();
            frame[..6].copy_from_slice(&[0x02, 0x42, 0, 0, 0, rng.byte()]);
            frame
        }
        // Other ethertypes: LLDP, IPX, an IEEE 802.3 length field, loopback test.
        _ => {
            let mut frame = Vec::new();
            frame.extend_from_slice(&[0x01, 0x80, 0xc2, 0, 0, 0x0e]);
            frame.extend_from_slice(&CLIENT_MAC);
            let ethertype: [u8; 2] =
                rng.pick(&[[0x88, 0xcc], [0x81, 0x37], [0x00, 0x2e], [0x90, 0x00]]);
            frame.extend_from_slice(&ethertype);
            let n = 46 + rng.below(64);
            frame.extend(rng.bytes(n));
            frame
        }
    }
}

/// `inner`'s IP packet carried by `outer` (IPIP or IP6IP6 by the inner version).
fn wrapped(inner: Frame, mut outer: Frame) -> Frame {
    let inner = inner.ip_packet();
    outer.protocol = if inner[0] >> 4 == 4 { 4 } else { 41 };
    outer.raw_l4 = Some(inner);
    outer
}

/// A frame to test: a valid one, then (mostly) mutated.
/// A random case. One frame in ten arrives with an 802.1Q tag (a random TCI), now and then cut
/// inside the tag: `check` holds a tagged frame to what its untagged twin must get, tag kept.
/// The tag is drawn from a side stream, so a seed's frames are otherwise the ones it always made.
pub fn generate(rng: &mut Rng) -> Case {
    let mut side = Rng::new(rng.0);
    let mut case = generate_untagged(rng);
    if side.chance(10) {
        case.frame = vlan_tagged(&case.frame, side.next_u64() as u16);
        if side.chance(5) {
            case.frame.truncate(14 + side.below(4));
        }
    }
    case
}

fn generate_untagged(rng: &mut Rng) -> Case {
    let mut case = if rng.chance(4) {
        neighbor_solicitation(rng)
    } else {
        base(rng)
    };
    if rng.chance(35) {
        return case;
    }
    case.must_forward = false;
    case.must_pass = false;
    case.must_drop = None;
    // Malformed frames for no VIP: passed or dropped, the program's choice (not checked here).
    case.must_pass_untouched = false;
    let f = &mut case.frame;
    for _ in 0..1 + rng.below(3) {
        let len = f.len();
        match rng.below(9) {
            // Cut anywhere (the kernel needs an Ethernet header for a test run).
            0 => f.truncate(14 + rng.below(len.saturating_sub(13).max(1))),
            // Flip bytes, mostly in the headers.
            1 | 2 => {
                for _ in 0..1 + rng.below(4) {
                    let at = if rng.chance(80) {
                        rng.below(len.min(100))
                    } else {
                        rng.below(len)
                    };
                    f[at] ^= 1 << rng.below(8);
                }
            }
            3 => {
                let at = rng.below(len.min(100));
                f[at] = rng.byte();
            }
            // IPv4 total length / header length, IPv6 payload length.
            4 if len >= 18 => {
                let random = rng.next_u64() as u16;
                let v = rng.pick(&[0u16, 1, 19, 20, 21, 40, 0xffff, random]);
                let v = if rng.chance(50) {
                    v
                } else {
                    (len as u16).wrapping_sub(14 + rng.below(8) as u16)
                };
                f[16..18].copy_from_slice(&v.to_be_bytes());
            }
            5 if len >= 20 => {
                f[14] = (f[14] & 0xf0) | rng.below(16) as u8;
                let v = (f[19] as u16) | ((rng.below(2) as u16) << 8);
                f[18] = (v >> 8) as u8;
            }
            // L4 length fields where an option-less IPv4 or IPv6 header would put them:
            // UDP length, TCP data offset.
            6 => {
                for at in [14 + 20 + 4, 14 + 40 + 4, 14 + 20 + 12, 14 + 40 + 12] {
                    if at + 1 < len && rng.chance(50) {
                        f[at] = rng.byte();
                    }
                }
            }
            // Ethernet padding after the IP packet, or garbage after the headers.
            7 => {
                let n = 1 + rng.below(64);
                f.extend(rng.bytes(n));
            }
            _ => {
                let start = rng.below(len);
                for b in &mut f[start..] {
                    if rng.chance(10) {
                        *b = rng.byte();
                    }
                }
            }
        }
        if f.len() < 14 {
            f.resize(14, 0);
        }
    }
    case
}

/// The IP layer of a frame as the RFCs read it.
#[derive(Clone, Copy, Debug)]
struct RefL3 {
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Frame offsets of the L4 header and of the IP packet's end.
    l4: usize,
    end: usize,
    /// Some fragment (first with more to come, or a later one); an IPv6 "atomic" fragment
    /// (offset 0, no more) is not one.
    fragment: bool,
    /// The L4 header's start is known (not a later fragment, not beyond the walked chain).
    has_l4: bool,
}

fn be16(f: &[u8], at: usize) -> usize {
    u16::from_be_bytes([f[at], f[at + 1]]) as usize
}

fn v6_at(f: &[u8], at: usize) -> IpAddr {
    let octets: [u8; 16] = f[at..at + 16].try_into().expect("16 bytes");
    IpAddr::V6(Ipv6Addr::from(octets))
}

fn v4_at(f: &[u8], at: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]))
}

/// IPv6 extension headers a balancer walks before it gives up (its documented bound).
const WALKED_EXT_HEADERS: usize = 6;

fn ref_l3(f: &[u8]) -> Option<RefL3> {
    if f.len() < 14 {
        return None;
    }
    match be16(f, 12) {
        0x0800 => {
            if f.len() < 34 || f[14] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(f[14] & 0xf) * 4;
            let tot = be16(f, 16);
            if ihl < 20 || tot < ihl || 14 + tot > f.len() {
                return None;
            }
            let frag = be16(f, 20);
            Some(RefL3 {
                v6: false,
                src: v4_at(f, 26),
                dst: v4_at(f, 30),
                proto: f[23],
                l4: 14 + ihl,
                end: 14 + tot,
                fragment: frag & 0x3fff != 0,
                has_l4: frag & 0x1fff == 0,
            })
        }
        0x86dd => {
            if f.len() < 54 || f[14] >> 4 != 6 {
                return None;
            }
            let end = 54 + be16(f, 18);
            if end > f.len() {
                return None;
            }
            let mut l3 = RefL3 {
                v6: true,
                src: v6_at(f, 22),
                dst: v6_at(f, 38),
                proto: f[20],
                l4: 54,
                end,
                fragment: false,
                has_l4: true,
            };
            for _ in 0..WALKED_EXT_HEADERS {
                if !EXT_KINDS.contains(&l3.proto) {
                    return (l3.l4 <= end).then_some(l3);
                }
                if l3.l4 + 4 > f.len() {
                    return None;
                }
                let (next, len_byte) = (f[l3.l4], f[l3.l4 + 1]);
                let len = match l3.proto {
                    44 => {
                        let frag = be16(f, l3.l4 + 2);
                        if frag & !7 != 0 {
                            l3.fragment = true;
                            l3.has_l4 = false;
                            return Some(l3);
                        }
                        l3.fragment |= frag & 1 != 0;
                        8
                    }
                    51 => (usize::from(len_byte) + 2) * 4,
                    _ => (usize::from(len_byte) + 1) * 8,
                };
                l3.proto = next;
                l3.l4 += len;
                if l3.l4 > end {
                    return None;
                }
            }
            l3.has_l4 = !EXT_KINDS.contains(&l3.proto);
            Some(l3)
        }
        _ => None,
    }
}

/// A TCP or UDP packet whose whole L4 header lies inside its (unfragmented) IP packet:
/// (client, client port, destination, destination port, protocol).
fn ref_flow(f: &[u8]) -> Option<(IpAddr, u16, IpAddr, u16, u8)> {
    let l3 = ref_l3(f)?;
    if !l3.has_l4 || l3.fragment || !matches!(l3.proto, 6 | 17) {
        return None;
    }
    let l4_len = l3.end - l3.l4;
    let ok = if l3.proto == 6 {
        l4_len >= 20 && (20..=l4_len).contains(&(usize::from(f[l3.l4 + 12] >> 4) * 4))
    } else {
        l4_len >= 8 && (8..=l4_len).contains(&be16(f, l3.l4 + 4))
    };
    ok.then(|| {
        (
            l3.src,
            be16(f, l3.l4) as u16,
            l3.dst,
            be16(f, l3.l4 + 2) as u16,
            l3.proto,
        )
    })
}

/// An ICMP error whose quote holds an IP header and the ports of a TCP or UDP packet, all
/// inside the error's own IP packet: the quoted packet's flow turned around, (destination,
/// destination port, source, source port, protocol): the client's end, then the VIP's.
fn ref_icmp_error(f: &[u8]) -> Option<(IpAddr, u16, IpAddr, u16, u8)> {
    let l3 = ref_l3(f)?;
    let icmp = if l3.v6 { 58 } else { 1 };
    if !l3.has_l4 || l3.fragment || l3.proto != icmp || l3.l4 + 8 > l3.end {
        return None;
    }
    let errors: &[u8] = if l3.v6 { &[1, 2, 3] } else { &[3, 11] };
    if !errors.contains(&f[l3.l4]) {
        return None;
    }
    let q = l3.l4 + 8;
    let (src, dst, proto, ports) = if l3.v6 {
        if q + 40 > l3.end || f[q] >> 4 != 6 {
            return None;
        }
        (v6_at(f, q + 8), v6_at(f, q + 24), f[q + 6], q + 40)
    } else {
        if q + 20 > l3.end || f[q] >> 4 != 4 || f[q] & 0xf < 5 {
            return None;
        }
        (
            v4_at(f, q + 12),
            v4_at(f, q + 16),
            f[q + 9],
            q + usize::from(f[q] & 0xf) * 4,
        )
    };
    (matches!(proto, 6 | 17) && ports + 4 <= l3.end).then(|| {
        (
            dst,
            be16(f, ports + 2) as u16,
            src,
            be16(f, ports) as u16,
            proto,
        )
    })
}

/// Why an output broke an invariant, or `Ok`.
pub fn check(world: &World, case: &Case, verdict: u32, out: &[u8]) -> Result<(), String> {
    let input = &case.frame;
    if input.len() < 14 || be16(input, 12) != TPID_8021Q as usize {
        return check_untagged(world, case, verdict, out);
    }
    // 802.1Q: a tag cut short, or a second tag (QinQ), is the kernel's; one tag, and the frame
    // fares as its untagged twin and keeps its tag.
    let qinq = input.len() >= 18 && matches!(be16(input, 16) as u16, TPID_8021Q | TPID_8021AD);
    if input.len() < 18 || qinq {
        return if verdict == XDP_PASS && out == input.as_slice() {
            Ok(())
        } else {
            Err(format!(
                "a truncated or doubly tagged 802.1Q frame got verdict {verdict}, not XDP_PASS untouched"
            ))
        };
    }
    if verdict != XDP_DROP && out.get(12..16) != input.get(12..16) {
        return Err(format!("verdict {verdict} lost or changed the 802.1Q tag"));
    }
    let untag = |f: &[u8]| [&f[..12], &f[16..]].concat();
    let twin = Case {
        frame: untag(input),
        must_forward: case.must_forward,
        must_pass: case.must_pass,
        must_pass_untouched: case.must_pass_untouched,
        must_drop: case.must_drop,
    };
    let out = if verdict == XDP_DROP {
        out.to_vec()
    } else {
        untag(out)
    };
    check_untagged(world, &twin, verdict, &out).map_err(|why| format!("{why} (802.1Q-tagged)"))
}

fn check_untagged(world: &World, case: &Case, verdict: u32, out: &[u8]) -> Result<(), String> {
    let input = &case.frame;
    let flow = ref_flow(input);
    let flow_vip = flow.and_then(|(_, _, dst, dport, proto)| world.vip(dst, dport, proto));
    // A frame from another sluice node, or for a VIP served by this node alone, belongs to
    // this node's stack.
    let from_peer = input.len() >= 12 && world.peer_macs.contains(&input[6..12]);
    let served_here =
        flow_vip.is_some_and(|v| v.backends.iter().all(|b| world.own_addrs.contains(&b.addr)));
    if flow_vip.is_some() && verdict == XDP_PASS && !from_peer && !served_here {
        return Err("a TCP/UDP packet for a VIP was passed to the kernel".into());
    }
    if from_peer && flow_vip.is_some() && verdict == XDP_TX {
        return Err("a frame another node balanced was balanced again".into());
    }
    if case.must_forward && verdict != XDP_TX {
        return Err(format!(
            "a valid packet for a live VIP got verdict {verdict}, not XDP_TX"
        ));
    }
    if case.must_pass_untouched && (verdict != XDP_PASS || out != input.as_slice()) {
        return Err(format!(
            "a well-formed frame for no VIP got verdict {verdict}{}, not XDP_PASS byte for byte",
            if out == input.as_slice() {
                ""
            } else {
                " and was rewritten"
            }
        ));
    }
    if let Some(why) = case.must_drop
        && verdict != XDP_DROP
    {
        return Err(format!(
            "a packet from {why} got verdict {verdict}, not XDP_DROP{}",
            if verdict == XDP_TX && out.len() >= 6 {
                format!(" (sent to MAC {})", hex(&out[..6]))
            } else {
                String::new()
            }
        ));
    }
    if case.must_pass && verdict != XDP_PASS {
        return Err(format!(
            "a packet for this node's own stack got verdict {verdict}, not XDP_PASS"
        ));
    }
    match verdict {
        XDP_PASS if out == input.as_slice() => Ok(()),
        XDP_PASS => check_unwrapped(world, input, out),
        XDP_DROP => check_drop(world, input),
        XDP_TX => check_tx(world, input, out, flow.zip(flow_vip)),
        other => Err(format!(
            "verdict {other} is not one the program may return here"
        )),
    }
}

/// Only what is addressed to a VIP address is the balancer's to drop (and encapsulated packets
/// to this node, from a forbidden source or with a broken inner header): everything else,
/// however malformed, goes to the kernel untouched. The destination is read from the raw
/// header, without any of the checks a parser makes.
fn check_drop(world: &World, input: &[u8]) -> Result<(), String> {
    let raw = match input.get(12..14) {
        Some([0x08, 0x00]) if input.len() >= 34 => {
            let d: [u8; 4] = input[30..34].try_into().map_err(|_| "short")?;
            Some((IpAddr::from(d), input[23]))
        }
        Some([0x86, 0xdd]) if input.len() >= 54 => {
            let d: [u8; 16] = input[38..54].try_into().map_err(|_| "short")?;
            Some((IpAddr::from(d), input[20]))
        }
        _ => None,
    };
    match raw {
        Some((dst, _)) if world.vip_addrs.contains(&dst) => Ok(()),
        Some((dst, 4 | 41)) if world.own_addrs.contains(&dst) => Ok(()),
        Some((dst, proto)) => Err(format!(
            "a frame for {dst} (protocol {proto}), no VIP address, was dropped"
        )),
        None => Err("a frame without a complete IP header was dropped".into()),
    }
}

/// A passed frame that changed must be an encapsulated packet to this node from an allowed
/// source, unwrapped: the Ethernet addresses kept, the inner packet exactly as it was.
fn check_unwrapped(world: &World, input: &[u8], out: &[u8]) -> Result<(), String> {
    let Some(l3) = ref_l3(input) else {
        return Err("passed modified, but not an IP packet".into());
    };
    let outer_len = if l3.v6 { 40 } else { 20 };
    let inner_v6 = match l3.proto {
        4 => false,
        41 => true,
        _ => return Err("passed modified, but not encapsulated".into()),
    };
    if l3.l4 != 14 + outer_len || !world.own_addrs.contains(&l3.dst) {
        return Err("unwrapped a packet that was not addressed to this node".into());
    }
    let allowed = match l3.src {
        IpAddr::V4(a) => world.desired.peers.contains(&l3.src) || a.octets()[..3] == [10, 99, 0],
        IpAddr::V6(a) => a.segments()[..7] == [0xfd99, 0, 0, 0, 0, 0, 0],
    };
    if !allowed {
        return Err(format!(
            "unwrapped a packet from {}, not an allowed source",
            l3.src
        ));
    }
    let mut expected = input[..12].to_vec();
    expected.extend_from_slice(if inner_v6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    expected.extend_from_slice(&input[14 + outer_len..]);
    // RFC 6040: congestion experienced on the tunnel's path (CE on the outer header) is handed
    // to the ECN-capable inner packet (a not-ECT one is dropped, never passed).
    let outer_ecn = if l3.v6 {
        (input[15] >> 4) & 3
    } else {
        input[15] & 3
    };
    if outer_ecn == 3 {
        if inner_v6 {
            if expected.len() < 16 || (expected[15] >> 4) & 3 == 0 {
                return Err("passed a not-ECT inner packet whose outer header had CE".into());
            }
            expected[15] |= 3 << 4;
        } else {
            if expected.len() < 34 || expected[15] & 3 == 0 {
                return Err("passed a not-ECT inner packet whose outer header had CE".into());
            }
            // The program patches the checksum incrementally (RFC 1624), as mirrored here.
            let old = u16::from_ne_bytes([expected[14], expected[15]]);
            expected[15] |= 3;
            let new = u16::from_ne_bytes([expected[14], expected[15]]);
            let check = u16::from_ne_bytes([expected[24], expected[25]]);
            expected[24..26].copy_from_slice(&replace16(check, old, new).to_ne_bytes());
        }
    }
    if out != expected.as_slice() {
        return Err("unwrapped, but the result is not the inner packet".into());
    }
    Ok(())
}

/// RFC 1624 incremental checksum update, exactly as lb-ebpf's `csum::replace16` computes it.
fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u64::from(!check) + u64::from(!old) + u64::from(new);
    for _ in 0..4 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The flow (client, client port, VIP, VIP port, protocol) as the program keys it.
type RefFlow = (IpAddr, u16, IpAddr, u16, u8);

fn check_tx(
    world: &World,
    input: &[u8],
    out: &[u8],
    flow_vip: Option<(RefFlow, &Vip)>,
) -> Result<(), String> {
    // The VIP the packet is about, with the flow: its own, or the one an ICMP error quotes.
    let target = flow_vip.or_else(|| {
        ref_icmp_error(input).and_then(|flow @ (_, _, vip, vport, proto)| {
            world.vip(vip, vport, proto).map(|v| (flow, v))
        })
    });
    let vip = target.map(|(_, v)| v);
    if out.len() == input.len() && out[12..] == input[12..] {
        // L2 direct server return: only the MACs may change, to Maglev's pick's.
        return match target {
            Some((flow, v)) if v.mode == ForwardingMode::L2 => {
                let pick = world.pick(v, flow)?;
                let want = pick.mac.map(|m| m.0);
                if out[..6] != want.unwrap_or_default() || out[6..12] != LB_MAC {
                    Err(format!(
                        "L2 rewrite to MAC {} (from {}), not Maglev's pick {} ({})",
                        hex(&out[..6]),
                        hex(&out[6..12]),
                        pick.addr,
                        want.map_or("no MAC".into(), |m| hex(&m))
                    ))
                } else {
                    Ok(())
                }
            }
            Some(_) => Err("an ipip VIP's packet was sent by MAC rewrite".into()),
            None => Err("sent by MAC rewrite, but no complete TCP/UDP header for a VIP key".into()),
        };
    }
    if let Some(result) = check_encapsulated(world, input, out, target) {
        return result;
    }
    if let Some(result) = check_echo_reply(world, input, out) {
        return result;
    }
    if let Some(result) = check_arp_reply(input, out) {
        return result;
    }
    if let Some(result) = check_neighbor_advert(input, out) {
        return result;
    }
    check_too_big(input, out, vip)
}

/// `Some` when `input` is an ARP request: `out` must be exactly its reply for the announced
/// address (RFC 826, from the input alone), and the request one that deserves it.
fn check_arp_reply(input: &[u8], out: &[u8]) -> Option<Result<(), String>> {
    if input.len() < 14 || be16(input, 12) != 0x0806 {
        return None;
    }
    let valid = input.len() >= 42
        && be16(input, 14) == 1
        && be16(input, 16) == 0x0800
        && input[18] == 6
        && input[19] == 4
        && be16(input, 20) == 1;
    if !valid || v4_at(input, 38) != IpAddr::V4(ANNOUNCED) || input[28..32] == input[38..42] {
        return Some(Err(
            "answered an ARP frame that is no request for the announced address".into(),
        ));
    }
    let mut want = input.to_vec();
    want[..6].copy_from_slice(&input[22..28]);
    want[6..12].copy_from_slice(&ANNOUNCED_MAC);
    want[20..22].copy_from_slice(&2u16.to_be_bytes());
    want[22..28].copy_from_slice(&ANNOUNCED_MAC);
    want[28..32].copy_from_slice(&input[38..42]);
    want[32..38].copy_from_slice(&input[22..28]);
    want[38..42].copy_from_slice(&input[28..32]);
    Some(if out == want.as_slice() {
        Ok(())
    } else {
        Err("an ARP reply that is not exactly the request's answer".into())
    })
}

/// `Some` when `out` is `input` behind an outer header.
fn check_encapsulated(
    world: &World,
    input: &[u8],
    out: &[u8],
    target: Option<(RefFlow, &Vip)>,
) -> Option<Result<(), String>> {
    let overhead = out.len().checked_sub(input.len())?;
    if !matches!(overhead, 20 | 40) || out[14 + overhead..] != input[14..] {
        return None;
    }
    let Some((flow, vip)) = target.filter(|(_, v)| v.mode == ForwardingMode::Ipip) else {
        return Some(Err("encapsulated, but not a packet of an ipip VIP".into()));
    };
    let l3 = ref_l3(input)?;
    let inner_len = l3.end - 14;
    let inner_proto = if l3.v6 { 41 } else { 4 };
    let outer = &out[14..14 + overhead];
    let (ok, dst) = if overhead == 20 {
        (
            out[12..14] == [0x08, 0x00]
                && outer[0] == 0x45
                && be16(outer, 2) == 20 + inner_len
                && outer[9] == inner_proto
                && checksum_ok(outer, 0),
            v4_at(outer, 16),
        )
    } else {
        (
            out[12..14] == [0x86, 0xdd]
                && outer[0] >> 4 == 6
                && be16(outer, 4) == inner_len
                && outer[6] == inner_proto,
            v6_at(outer, 24),
        )
    };
    let pick = world.pick(vip, flow);
    Some(if !ok {
        Err("outer header inconsistent (type, length, protocol or checksum)".into())
    } else if !world.node_addrs.contains(&dst) || !vip.backends.iter().any(|b| b.addr == dst) {
        Err(format!("encapsulated to {dst}, not one of the VIP's nodes"))
    } else if let Err(e) = pick {
        Err(format!("encapsulated to {dst}: {e}"))
    } else if let Ok(pick) = pick
        && pick.addr != dst
    {
        Err(format!(
            "encapsulated to {dst}, not Maglev's pick {}",
            pick.addr
        ))
    } else if out[6..12] != LB_MAC {
        Err("encapsulated with another source MAC than ours".into())
    } else {
        Ok(())
    })
}

/// `Some` when `input` is an echo request: `out` must be its reply, checksums as valid as
/// the request's were.
fn check_echo_reply(world: &World, input: &[u8], out: &[u8]) -> Option<Result<(), String>> {
    let l3 = ref_l3(input)?;
    let (icmp, request, reply) = if l3.v6 { (58, 128, 129) } else { (1, 8, 0) };
    if l3.proto != icmp || !l3.has_l4 || l3.l4 + 8 > l3.end || input[l3.l4] != request {
        return None;
    }
    if !world.vip_addrs.contains(&l3.dst) {
        return Some(Err("answered an echo request that was not for a VIP".into()));
    }
    let mut expected = input.to_vec();
    expected[..6].copy_from_slice(&input[6..12]);
    expected[6..12].copy_from_slice(&input[..6]);
    let (src_at, n, ttl_at) = if l3.v6 { (22, 16, 21) } else { (26, 4, 22) };
    expected[src_at..src_at + n].copy_from_slice(&input[src_at + n..src_at + 2 * n]);
    expected[src_at + n..src_at + 2 * n].copy_from_slice(&input[src_at..src_at + n]);
    expected[ttl_at] = 64;
    expected[l3.l4] = reply;
    let mut masked_out = out.to_vec();
    for at in [24, 25, l3.l4 + 2, l3.l4 + 3] {
        if !l3.v6 || at > 25 {
            expected[at] = 0;
            masked_out[at] = 0;
        }
    }
    if masked_out != expected {
        return Some(Err(
            "echo reply differs from the request beyond the reply's fields".into(),
        ));
    }
    let pseudo = |f: &[u8]| {
        let v6 = |at| Ipv6Addr::from(<[u8; 16]>::try_from(&f[at..at + 16]).expect("16 bytes"));
        if l3.v6 {
            pseudo_sum_v6(v6(22), v6(38), l3.end - l3.l4, 58)
        } else {
            0
        }
    };
    let sums = |f: &[u8]| {
        (
            l3.v6 || checksum_ok(&f[14..l3.l4], 0),
            checksum_ok(&f[l3.l4..l3.end], pseudo(f)),
        )
    };
    Some(if sums(input) == sums(out) {
        Ok(())
    } else {
        Err("echo reply checksums do not verify as the request's did".into())
    })
}

/// The last kind of XDP_TX: an ICMP "too big" from the VIP to the client.
fn check_too_big(input: &[u8], out: &[u8], vip: Option<&Vip>) -> Result<(), String> {
    let Some(vip) = vip.filter(|v| v.mode == ForwardingMode::Ipip) else {
        return Err("sent something that is no rewrite, encapsulation or ICMP answer".into());
    };
    let l3 = ref_l3(input).ok_or("too big answer to a frame without an IP layer")?;
    if out[..6] != input[6..12] || out[6..12] != input[..6] {
        return Err("ICMP answer not sent back to the sender's MAC".into());
    }
    let overhead = if vip.backends[0].addr.is_ipv4() {
        20
    } else {
        40
    };
    if l3.end - 14 + overhead <= FIXTURE_MTU as usize {
        return Err("answered too big for a packet that fits".into());
    }
    let reply = ref_l3(out).ok_or("ICMP answer has no valid IP header")?;
    let valid = if reply.v6 {
        let (IpAddr::V6(s), IpAddr::V6(d)) = (reply.src, reply.dst) else {
            unreachable!("v6 addresses")
        };
        reply.proto == 58
            && out[reply.l4] == 2
            && checksum_ok(
                &out[reply.l4..reply.end],
                pseudo_sum_v6(s, d, reply.end - reply.l4, 58),
            )
    } else {
        reply.proto == 1
            && out[reply.l4..reply.l4 + 2] == [3, 4]
            && checksum_ok(&out[14..reply.l4], 0)
            && checksum_ok(&out[reply.l4..reply.end], 0)
    };
    if !valid || reply.end != out.len() {
        return Err("ICMP too big answer does not parse or its checksums fail".into());
    }
    if reply.src != l3.dst || reply.dst != l3.src {
        return Err("ICMP too big answer not from the VIP to the client".into());
    }
    let quote = &out[reply.l4 + 8..];
    if input[14..14 + quote.len()] != *quote {
        return Err("ICMP too big answer does not quote the packet".into());
    }
    Ok(())
}

/// Hex of a frame, for a failure message that reproduces it.
pub fn hex(frame: &[u8]) -> String {
    frame.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The IPv6 address the fuzzed node announces (answers Neighbor Solicitations for), with
/// [`ANNOUNCED_MAC`].
pub const ANNOUNCED6: Ipv6Addr = VIP6;

/// A Neighbor Solicitation: for the announced address (answered) or another one, multicast
/// or unicast, with or without the option, sometimes subtly invalid (each must pass).
fn neighbor_solicitation(rng: &mut Rng) -> Case {
    let target = rng.pick(&[ANNOUNCED6, ANNOUNCED6, ANNOUNCED6, VIP6_IPIP, CLIENT6]);
    let mut ns = if rng.chance(70) {
        Ndp::solicit(target)
    } else {
        Ndp::probe(target, LB_MAC)
    };
    // Four in ten are valid; the others break one rule of RFC 4861 7.1.1 (or carry an option
    // the program leaves to the kernel) and must pass.
    let valid = match rng.below(10) {
        0 => {
            ns.hop_limit = rng.pick(&[1, 64, 254]);
            false
        }
        1 => {
            ns.code = 1 + rng.below(255) as u8;
            false
        }
        2 => {
            ns.bad_checksum = true;
            false
        }
        3 => {
            ns.src = Ipv6Addr::UNSPECIFIED;
            false
        }
        4 => {
            // An option of length 0 (invalid), or one option too many (40 bytes of ICMPv6).
            let mut option = rng.bytes(8);
            option[1] = 0;
            ns.extra = option;
            false
        }
        5 => {
            // Another address's group (CLIENT6 shares the announced address's low 24 bits).
            ns.dst = Ndp::solicited_node(VIP6_IPIP);
            false
        }
        _ => true,
    };
    let answered = valid && target == ANNOUNCED6;
    Case {
        frame: ns.bytes(),
        must_forward: answered,
        must_pass: !answered,
        // A solicitation the program does not answer is the kernel's, byte for byte.
        must_pass_untouched: !answered,
        ..Case::default()
    }
}

/// `Some` when `input` is an IPv6 ICMPv6 Neighbor Solicitation sent back: it must be one that
/// deserves an answer (RFC 4861 7.1.1, for the announced address, as the reference reads it)
/// and `out` exactly its advertisement.
fn check_neighbor_advert(input: &[u8], out: &[u8]) -> Option<Result<(), String>> {
    let l3 = ref_l3(input)?;
    if !l3.v6 || l3.proto != 58 || l3.l4 + 4 > l3.end || input[l3.l4] != ND_SOLICIT {
        return None;
    }
    let (IpAddr::V6(src), IpAddr::V6(dst)) = (l3.src, l3.dst) else {
        return None;
    };
    let len = l3.end - l3.l4;
    let target = (len >= 24).then(|| {
        let mut t = [0u8; 16];
        t.copy_from_slice(&input[l3.l4 + 8..l3.l4 + 24]);
        Ipv6Addr::from(t)
    });
    let deserved = l3.l4 == 54
        && l3.has_l4
        && (len == 24 || (len == 32 && input[l3.l4 + 25] == 1))
        && input[21] == 255
        && input[l3.l4 + 1] == 0
        && checksum_ok(&input[l3.l4..l3.end], pseudo_sum_v6(src, dst, len, 58))
        && !src.is_unspecified()
        && target == Some(ANNOUNCED6)
        && (dst == ANNOUNCED6 || dst == Ndp::solicited_node(ANNOUNCED6));
    if !deserved {
        return Some(Err(
            "answered an ICMPv6 frame that is no valid solicitation for the announced address"
                .into(),
        ));
    }
    let mut want = Ndp::advert(ANNOUNCED6, ANNOUNCED_MAC);
    want.eth_dst.copy_from_slice(&input[6..12]);
    want.dst = src;
    Some(if out == want.bytes().as_slice() {
        Ok(())
    } else {
        Err("a neighbour advertisement that is not exactly the solicitation's answer".into())
    })
}
