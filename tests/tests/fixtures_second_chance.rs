//! Packet fixtures for second chance (`flow_state: second-chance`, docs/design.md): a node
//! that records no flow keeps a mid-flow packet its own conntrack knows and hands one it does
//! not know to the VIP's previous table's pick, once.
//!
//! The scene: three nodes serve a VIP (table A), then node 3 joins (table B); the program runs
//! as node 3, and as the first hop that sends it a flow (another node: a peer's frame) and as
//! the previous pick the flow is handed on to. A frame leaves a node from its own MAC when it
//! was balanced there, from that MAC's twin (`handed_on_mac`) when it was handed on. Its conntrack is a real one: each test runs on a thread inside a network
//! namespace of its own where conntrack is active (an nft `ct` rule) and a real TCP connection
//! from the client to the VIP is open, so `bpf_xdp_ct_lookup` (which asks the caller's
//! namespace in a test run) finds that connection and nothing else.
//! Needs root; creates a namespace: run under the lab lock.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lb_common::{GlobalCounter, TraceFilter, handed_on_mac, trace_flags, trace_source};
use lb_userspace::dataplane::TraceSession;
use lb_userspace::model::{Desired, FlowState, Protocol};
use lb_userspace::observe::trace;
use sluice_tests::cmd::sh;
use sluice_tests::fixtures::{
    CLIENT, CLIENT6, Frame, Harness, TCP_ACK, TCP_SYN, VIP, VIP6, XDP_PASS, XDP_TX,
    assert_forwarded, backend_addr, backend_addr6, backend_mac, desired, desired_at, harness_with,
};

/// Node 3 joins nodes 0-2: every flow node 3 now takes had another pick before.
const JOINED: u8 = 3;
const BEFORE: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];
const AFTER: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false), (3, 1, false)];
/// Then node 4 joins (table C): a second change, for the records that outlive several.
const FOURTH: u8 = 4;
const AFTER_FOURTH: &[(u8, u32, bool)] = &[
    (0, 1, false),
    (1, 1, false),
    (2, 1, false),
    (3, 1, false),
    (4, 1, false),
];
/// Every node of the scenes runs sluice (each knows the others as peers).
const NODES: u8 = 5;

/// The family of a scene's VIP, nodes and client (the nodes of an IPv6 VIP are known by
/// their IPv6 addresses, as a dual-stack cluster's are).
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}
use Family::{V4, V6};

impl Family {
    fn vip(self) -> IpAddr {
        match self {
            V4 => IpAddr::V4(VIP),
            V6 => IpAddr::V6(VIP6),
        }
    }

    fn node(self, i: u8) -> IpAddr {
        match self {
            V4 => IpAddr::V4(backend_addr(i)),
            V6 => IpAddr::V6(backend_addr6(i)),
        }
    }

    /// A client's TCP frame from port `sport` to the VIP.
    fn frame(self, sport: u16, flags: u8) -> Vec<u8> {
        match self {
            V4 => Frame::tcp(sport, flags).bytes(),
            V6 => Frame::tcp(sport, flags).v6().bytes(),
        }
    }

    fn desired(self, backends: &[(u8, u32, bool)]) -> Desired {
        desired_at(self.vip(), Protocol::Tcp, backends)
    }
}

/// A cluster's state: the VIP's backends are nodes, all of nodes 0-3 run sluice.
fn cluster(family: Family, backends: &[(u8, u32, bool)], flow_state: FlowState) -> Desired {
    let mut d = family.desired(backends);
    d.peers = (0..NODES).map(|i| family.node(i)).collect();
    d.settings.flow_state = flow_state;
    d
}

/// Node `i` through the change (table A, then B): its VIP has A as its previous table. Its
/// frames leave with its own MAC, as a real node's do (what the other nodes know it by).
fn node_after_change(family: Family, i: u8, flow_state: FlowState) -> Harness {
    let mut h = Harness::new().expect("load the XDP object");
    h.iface.mac = lb_userspace::model::MacAddr(backend_mac(i));
    let this = family.node(i);
    h.apply_as_node(&cluster(family, BEFORE, flow_state), this)
        .expect("table A");
    h.apply_as_node(&cluster(family, AFTER, flow_state), this)
        .expect("table B");
    h
}

/// Node `i` through `tables`, applied in order: its VIP's previous table is the last but one.
fn node_through(family: Family, i: u8, tables: &[&[(u8, u32, bool)]]) -> Harness {
    let mut h = Harness::new().expect("load the XDP object");
    h.iface.mac = lb_userspace::model::MacAddr(backend_mac(i));
    for backends in tables {
        h.apply_as_node(
            &cluster(family, backends, FlowState::SecondChance),
            family.node(i),
        )
        .expect("apply a table");
    }
    h
}

/// The first `count` client ports (from 40000) whose picks by `tables` (one per table, in
/// order) `want` accepts, with those picks.
fn ports_picked(
    family: Family,
    tables: &[&[(u8, u32, bool)]],
    want: impl Fn(&[u8]) -> bool,
    count: usize,
) -> Vec<(u16, Vec<u8>)> {
    let mut plain: Vec<Harness> = tables
        .iter()
        .map(|t| harness_with(&family.desired(t)))
        .collect();
    let mut found = Vec::new();
    for sport in 40000..42000u16 {
        let frame = family.frame(sport, TCP_SYN);
        let picks: Vec<u8> = plain
            .iter_mut()
            .map(|h| Harness::backend_of(&h.run(&frame).unwrap().1).unwrap())
            .collect();
        if want(&picks) {
            found.push((sport, picks));
            if found.len() == count {
                return found;
            }
        }
    }
    panic!("fewer than {count} of 2000 client ports have the picks wanted");
}

/// A node's records of the flows it handed on: client port -> the node it sent the flow to.
fn records(h: &Harness, family: Family) -> BTreeMap<u16, u8> {
    h.maps
        .handed_flows()
        .map(|entry| {
            let (key, value) = entry.expect("a record read whole");
            let backend = h.maps.backend(u32::from(value.backend)).unwrap();
            let addr = lb_common::addr_from_raw(&backend.addr, backend.family);
            let node = (0..NODES)
                .find(|i| family.node(*i) == addr)
                .expect("a record names a node");
            (u16::from_be(key.sport), node)
        })
        .collect()
}

/// The IPv4 TTL or IPv6 hop limit of an untagged frame.
fn hops_left(frame: &[u8]) -> u8 {
    if frame[12..14] == [0x08, 0x00] {
        frame[14 + 8]
    } else {
        frame[14 + 7]
    }
}

/// Asserts that `out` is `input` sent on along a record by node `by` to node `to`: from
/// `by`'s handed-on MAC, one hop fewer when `relay` (a handed-on frame sent on again; an
/// IPv4 header checksum that still verifies), nothing else changed.
fn assert_followed(out: &[u8], input: &[u8], by: u8, to: u8, relay: bool) {
    assert_eq!(Harness::backend_of(out), Some(to), "along the record");
    assert_eq!(
        out[6..12],
        handed_on_mac(backend_mac(by)),
        "marked handed on"
    );
    let fewer = u8::from(relay);
    assert_eq!(
        hops_left(out),
        hops_left(input) - fewer,
        "hops taken off: {fewer}"
    );
    let (ip_header, ttl_at) = if out[12..14] == [0x08, 0x00] {
        assert!(
            sluice_tests::fixtures::checksum_ok(&out[14..34], 0),
            "the IPv4 header checksum verifies"
        );
        (14..34, 14 + 8)
    } else {
        (14..54, 14 + 7)
    };
    let (mut a, mut b) = (
        out[ip_header.clone()].to_vec(),
        input[ip_header.clone()].to_vec(),
    );
    for header in [&mut a, &mut b] {
        header[ttl_at - 14] = 0;
        if out[12..14] == [0x08, 0x00] {
            header[10..12].fill(0);
        }
    }
    assert_eq!(a, b, "the IP header changes only in its hop count");
    assert_eq!(
        out[ip_header.end..],
        input[ip_header.end..],
        "the rest is the client's"
    );
}

/// The backend a plain balancer with `backends` picks for client port `sport`.
fn pick(backends: &[(u8, u32, bool)], sport: u16) -> u8 {
    let mut plain = harness_with(&desired(Protocol::Tcp, backends));
    let (action, out) = plain.run(&Frame::tcp(sport, TCP_SYN).bytes()).unwrap();
    assert_eq!(action, XDP_TX);
    Harness::backend_of(&out).unwrap()
}

/// Client ports (from 40000) whose flows table B gives to node 3: (port, table A's pick).
fn moved_to_joined(family: Family, count: usize) -> Vec<(u16, u8)> {
    let mut before = harness_with(&family.desired(BEFORE));
    let mut after = harness_with(&family.desired(AFTER));
    let mut found = Vec::new();
    for sport in 40000..41000u16 {
        let frame = family.frame(sport, TCP_SYN);
        let now = Harness::backend_of(&after.run(&frame).unwrap().1).unwrap();
        if now == JOINED {
            let then = Harness::backend_of(&before.run(&frame).unwrap().1).unwrap();
            found.push((sport, then));
            if found.len() == count {
                return found;
            }
        }
    }
    panic!("fewer than {count} of 1000 client ports moved to node {JOINED}");
}

/// A network namespace where conntrack is active, with the VIP and the client on its
/// loopback; removed on drop.
struct ConntrackNs {
    name: String,
}

impl ConntrackNs {
    fn new() -> Self {
        Self::tracking(true)
    }

    /// The same namespace; `tracking` false leaves out the rule that turns conntrack on.
    fn tracking(tracking: bool) -> Self {
        sluice_tests::require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sc{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _ = sh(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name]).expect("ip netns add");
        let ns = Self { name };
        let run = |argv: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", &ns.name];
            full.extend_from_slice(argv);
            sh(&full).unwrap_or_else(|e| panic!("{argv:?}: {e:#}"));
        };
        run(&["ip", "link", "set", "lo", "up"]);
        for addr in [VIP, CLIENT] {
            run(&["ip", "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
        }
        for addr in [VIP6, CLIENT6] {
            run(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{addr}/128"),
                "dev",
                "lo",
            ]);
        }
        if !tracking {
            return ns;
        }
        // Any rule with a `ct` expression turns conntrack on in the namespace (kube-proxy's
        // rules do it on a real node).
        run(&["nft", "add", "table", "inet", "sc"]);
        run(&[
            "nft",
            "add chain inet sc out { type filter hook output priority 0 ; }",
        ]);
        run(&[
            "nft", "add", "rule", "inet", "sc", "out", "ct", "state", "new", "counter",
        ]);
        ns
    }

    /// Runs `f` on a thread inside the namespace (sockets and test runs both see it).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        sluice_tests::netns::run_in(&self.name, move || Ok(f())).expect("thread in the namespace")
    }

    /// The namespace's conntrack entries, as `conntrack -L` prints them.
    fn entries(&self) -> String {
        let out =
            sh(&["ip", "netns", "exec", &self.name, "conntrack", "-L"]).expect("conntrack -L");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ConntrackNs {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// `addr` as the kernel's socket address (`sockaddr_in` or `sockaddr_in6`) and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; each form fits in it and is written whole.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                std::ptr::write((&raw mut storage).cast(), sin);
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                std::ptr::write((&raw mut storage).cast(), sin6);
                size_of::<libc::sockaddr_in6>()
            }
        };
        (storage, len as libc::socklen_t)
    }
}

/// A real TCP connection from the client's `sport` to VIP:80 (conntrack records it as the
/// client -> VIP tuple, as kube-proxy's node records a VIP flow it serves): (client, server).
fn connect_from(family: Family, sport: u16, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let (domain, client) = match family {
        V4 => (libc::AF_INET, IpAddr::V4(CLIENT)),
        V6 => (libc::AF_INET6, IpAddr::V6(CLIENT6)),
    };
    let from = SocketAddr::new(client, sport);
    let to = SocketAddr::new(family.vip(), 80);
    // SAFETY: a new socket, owned by the TcpStream at once; the addresses live on this stack.
    let client = unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let (addr, len) = sockaddr(from);
        let rc = libc::bind(fd, (&raw const addr).cast(), len);
        assert_eq!(rc, 0, "bind {from}: {}", io::Error::last_os_error());
        let (addr, len) = sockaddr(to);
        let rc = libc::connect(stream.as_raw_fd(), (&raw const addr).cast(), len);
        assert_eq!(rc, 0, "connect {to}: {}", io::Error::last_os_error());
        stream
    };
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

/// What node 3 did with one frame: verdict, output, and the second-chance counters.
struct Outcome {
    action: u32,
    out: Vec<u8>,
    hits: u64,
    handed_on: u64,
}

fn send(h: &mut Harness, frame: &[u8]) -> Outcome {
    let (hits0, handed0) = counters(h);
    let (action, out) = h.run(frame).expect("test run");
    let (hits, handed_on) = counters(h);
    Outcome {
        action,
        out,
        hits: hits - hits0,
        handed_on: handed_on - handed0,
    }
}

fn counters(h: &Harness) -> (u64, u64) {
    (
        h.counter(GlobalCounter::SecondChanceHit).unwrap(),
        h.counter(GlobalCounter::SecondChanceHandedOn).unwrap(),
    )
}

/// Asserts `out` is `input` sent from node 3's handed-on MAC to node `to`'s, nothing else
/// changed.
fn assert_handed_to(out: &[u8], input: &[u8], to: u8) {
    assert_eq!(Harness::backend_of(out), Some(to), "to the previous pick");
    assert_eq!(
        out[6..12],
        handed_on_mac(backend_mac(JOINED)),
        "from node 3's handed-on MAC (its own with the 0x02 bit flipped)"
    );
    assert_eq!(out[12..], input[12..], "only the MACs change");
}

/// A node other than node 3 and than `previous` (the flow's first hop, neither its current
/// nor its previous pick).
fn other_node(previous: u8) -> u8 {
    (0..JOINED)
        .find(|i| *i != previous)
        .expect("three nodes before the join")
}

/// The frame first hop `node` sends node 3 for a client's `frame` (table B picks node 3):
/// balanced there, so from `node`'s own MAC to node 3's, the client's packet unchanged.
fn through_first_hop(family: Family, node: u8, frame: &[u8], flow_state: FlowState) -> Vec<u8> {
    let mut first = node_after_change(family, node, flow_state);
    let sent = send(&mut first, frame);
    assert_eq!(sent.action, XDP_TX, "the first hop forwards to the pick");
    assert_eq!(Harness::backend_of(&sent.out), Some(JOINED));
    assert_eq!(sent.out[6..12], backend_mac(node), "from its own MAC");
    assert_eq!((sent.hits, sent.handed_on), (0, 0), "not its flow to check");
    sent.out
}

/// `frame` as node `from`'s handed-on MAC sends it to node 3.
fn handed_on_by(from: u8, frame: &[u8]) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[..6].copy_from_slice(&backend_mac(JOINED));
    frame[6..12].copy_from_slice(&handed_on_mac(backend_mac(from)));
    frame
}

#[test]
fn a_known_flow_stays_and_an_unknown_one_goes_to_the_previous_pick() {
    let ns = ConntrackNs::new();
    let moved = moved_to_joined(V4, 2);
    let ((known, _), (unknown, unknown_before)) = (moved[0], moved[1]);
    ns.run(move || {
        let listener = TcpListener::bind(SocketAddrV4::new(VIP, 80)).expect("listen on the VIP");
        let _connection = connect_from(V4, known, &listener);
        let mut h = node_after_change(V4, JOINED, FlowState::SecondChance);

        // The connection this node serves: its conntrack knows it, the packet stays here.
        let ack = Frame::tcp(known, TCP_ACK).bytes();
        let kept = send(&mut h, &ack);
        assert_eq!(
            kept.action, XDP_PASS,
            "a flow conntrack knows goes to this stack"
        );
        assert_eq!(kept.out, ack, "untouched");
        assert_eq!((kept.hits, kept.handed_on), (1, 0));

        // A flow it does not know began on table A's pick: handed on there, once.
        let ack = Frame::tcp(unknown, TCP_ACK).bytes();
        let handed = send(&mut h, &ack);
        assert_eq!(handed.action, XDP_TX);
        assert_handed_to(&handed.out, &ack, unknown_before);
        assert_eq!((handed.hits, handed.handed_on), (0, 1));
        assert!(
            h.flow_entries().unwrap().is_empty(),
            "second chance records no flow"
        );
    });
    let table = ns.entries();
    assert!(
        table.contains(&format!("sport={known} dport=80")),
        "the known flow is in conntrack: {table}"
    );
    assert!(
        !table.contains(&format!("sport={unknown} ")),
        "the unknown flow is not: {table}"
    );
}

#[test]
fn a_peers_frame_goes_on_to_the_previous_pick_marked_unless_conntrack_knows_it() {
    peers_frame_goes_on_unless_known(V4);
}

#[test]
fn ipv6_a_peers_frame_goes_on_to_the_previous_pick_marked_unless_conntrack_knows_it() {
    peers_frame_goes_on_unless_known(V6);
}

/// Node 3 as the pick of a peer's frame (the first hop is another node) in `family`.
fn peers_frame_goes_on_unless_known(family: Family) {
    let ns = ConntrackNs::new();
    let moved = moved_to_joined(family, 2);
    let ((known, _), (unknown, unknown_before)) = (moved[0], moved[1]);
    ns.run(move || {
        let vip = SocketAddr::new(family.vip(), 80);
        let listener = TcpListener::bind(vip).expect("listen on the VIP");
        let _connection = connect_from(family, known, &listener);
        let mut joined = node_after_change(family, JOINED, FlowState::SecondChance);
        let mut trace = joined
            .start_trace(TraceFilter::default())
            .expect("start a trace");
        let first_hop = other_node(unknown_before);

        // A flow that began on table A's pick reaches node 3 through another node: node 3
        // runs the check the first hop could not (it is not the pick) and hands it on.
        let client = family.frame(unknown, TCP_ACK);
        let from_peer = through_first_hop(family, first_hop, &client, FlowState::SecondChance);
        let handed = send(&mut joined, &from_peer);
        assert_eq!(handed.action, XDP_TX, "handed on from the peer's frame");
        assert_handed_to(&handed.out, &from_peer, unknown_before);
        assert_eq!((handed.hits, handed.handed_on), (0, 1));
        assert_eq!(joined.counter(GlobalCounter::FromPeer).unwrap(), 0);

        // The previous pick takes the marked frame to its stack, untouched, and its trace
        // says it was handed on to it.
        let mut previous = node_after_change(family, unknown_before, FlowState::SecondChance);
        let mut previous_trace = previous
            .start_trace(TraceFilter::default())
            .expect("start a trace");
        let there = send(&mut previous, &handed.out);
        assert_eq!(there.action, XDP_PASS, "the previous pick keeps it");
        assert_eq!(there.out, handed.out, "untouched");
        assert_eq!((there.hits, there.handed_on), (0, 0));
        assert_eq!(previous.counter(GlobalCounter::FromPeer).unwrap(), 1);
        let received = described(&previous, &mut previous_trace);
        assert_eq!(received.len(), 1, "{received:?}");
        let hop = received[0]
            .second_chance
            .as_ref()
            .expect("a second-chance hop");
        assert_eq!((hop.role, hop.conntrack), ("received", None));
        assert_eq!(received[0].verdict, "from_peer");
        assert!(
            received[0].line().contains("handed on to this node"),
            "{}",
            received[0].line()
        );

        // The connection node 3 serves, through the same first hop: its conntrack knows it.
        let client = family.frame(known, TCP_ACK);
        let from_peer = through_first_hop(family, first_hop, &client, FlowState::SecondChance);
        let kept = send(&mut joined, &from_peer);
        assert_eq!(kept.action, XDP_PASS, "a flow conntrack knows stays here");
        assert_eq!(kept.out, from_peer, "untouched");
        assert_eq!((kept.hits, kept.handed_on), (1, 0));
        assert!(
            joined.flow_entries().unwrap().is_empty(),
            "second chance records no flow"
        );

        // `sluice trace` tells both: a peer's frame, conntrack asked, and what it answered.
        let events = trace
            .poll(Duration::from_millis(50))
            .expect("read the trace");
        let seen: Vec<(u8, u8, u8)> = events
            .iter()
            .map(|e| (e.source, e.flags, e.counter))
            .collect();
        // Named as `sluice trace` prints them: the tables, the answer, where it went.
        let slots = lb_userspace::dataplane::Snapshot::read(&joined.maps).expect("snapshot");
        let clock = trace::Clock::now().expect("clock");
        let lines: Vec<String> = events
            .iter()
            .map(|e| trace::describe(e, &slots, &clock).line())
            .collect();
        let vip = slots.vips.values().next().expect("the VIP");
        let hop = format!(
            "second chance: a peer's frame, current table #{} picked this node, conntrack",
            vip.table
        );
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].contains(&format!(
                "of the current table -> {} ",
                family.node(unknown_before)
            )) && lines[0].ends_with(&format!(
                "{hop} miss: handed on by the previous table #{}",
                vip.previous_table
            )),
            "{lines:#?}"
        );
        assert!(
            lines[1].ends_with(&format!("{hop} hit: kept here")),
            "{lines:#?}"
        );
        let asked = trace_flags::FROM_PEER | trace_flags::CONNTRACK_ASKED;
        assert_eq!(
            seen,
            [
                (trace_source::PREVIOUS_TABLE, asked, GlobalCounter::Tx as u8),
                (
                    trace_source::MAGLEV,
                    asked | trace_flags::CONNTRACK_HIT,
                    GlobalCounter::SecondChanceHit as u8
                ),
            ],
            "handed on, then kept"
        );
    });
}

#[test]
fn a_peers_frame_that_this_nodes_older_table_gives_another_node_goes_there_unless_known() {
    let ns = ConntrackNs::new();
    let moved = moved_to_joined(V4, 2);
    let ((known, known_before), (unknown, unknown_before)) = (moved[0], moved[1]);
    ns.run(move || {
        let listener = TcpListener::bind(SocketAddrV4::new(VIP, 80)).expect("listen on the VIP");
        let _connection = connect_from(V4, known, &listener);
        // Node 3's agent has not applied the change yet (table A only: node 3 is in no
        // table), the first hop's has: it sends node 3 the flows table B gives node 3.
        let mut late = Harness::new().expect("load the XDP object");
        late.iface.mac = lb_userspace::model::MacAddr(backend_mac(JOINED));
        late.apply_as_node(
            &cluster(V4, BEFORE, FlowState::SecondChance),
            V4.node(JOINED),
        )
        .expect("table A");
        let mut session = late
            .start_trace(TraceFilter::default())
            .expect("start a trace");

        // Unknown here: to the node its own table names (where the flow began), once.
        let client = Frame::tcp(unknown, TCP_ACK).bytes();
        let first_hop = other_node(unknown_before);
        let from_peer = through_first_hop(V4, first_hop, &client, FlowState::SecondChance);
        let handed = send(&mut late, &from_peer);
        assert_eq!(handed.action, XDP_TX, "handed on, not to this stack");
        assert_handed_to(&handed.out, &from_peer, unknown_before);
        assert_eq!((handed.hits, handed.handed_on), (0, 1));

        // Known here (the flow began on this node): kept, whatever its table says.
        let client = Frame::tcp(known, TCP_ACK).bytes();
        let from_peer = through_first_hop(
            V4,
            other_node(known_before),
            &client,
            FlowState::SecondChance,
        );
        let kept = send(&mut late, &from_peer);
        assert_eq!(kept.action, XDP_PASS, "a flow conntrack knows stays here");
        assert_eq!(kept.out, from_peer, "untouched");
        assert_eq!((kept.hits, kept.handed_on), (1, 0));

        let lines: Vec<String> = described(&late, &mut session)
            .iter()
            .map(trace::Described::line)
            .collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[0].ends_with("picks another, conntrack miss: handed on to this node's pick")
                && lines[1].ends_with("picks another, conntrack hit: kept here"),
            "{lines:#?}"
        );
    });
}

/// The events of `session` on `h`, named as `sluice trace` names them.
fn described(h: &Harness, session: &mut TraceSession) -> Vec<trace::Described> {
    let slots = lb_userspace::dataplane::Snapshot::read(&h.maps).expect("snapshot");
    let clock = trace::Clock::now().expect("clock");
    session
        .poll(Duration::from_millis(50))
        .expect("read the trace")
        .iter()
        .map(|e| trace::describe(e, &slots, &clock))
        .collect()
}

#[test]
fn a_syn_never_takes_the_second_chance() {
    let ns = ConntrackNs::new();
    let (sport, _) = moved_to_joined(V4, 1)[0];
    ns.run(move || {
        let mut h = node_after_change(V4, JOINED, FlowState::SecondChance);
        let syn = Frame::tcp(sport, TCP_SYN).bytes();
        let new = send(&mut h, &syn);
        assert_eq!(
            new.action, XDP_PASS,
            "a new connection is this node's (table B)"
        );
        assert_eq!(new.out, syn);
        assert_eq!((new.hits, new.handed_on), (0, 0), "conntrack is not asked");
        assert_eq!(h.counter(GlobalCounter::Local).unwrap(), 1);
        assert!(
            h.flow_entries().unwrap().is_empty(),
            "second chance records no new flow"
        );

        // The same SYN through another node: to this stack as a peer's frame, unasked.
        let from_peer = through_first_hop(V4, 0, &syn, FlowState::SecondChance);
        let new = send(&mut h, &from_peer);
        assert_eq!(new.action, XDP_PASS);
        assert_eq!(new.out, from_peer, "untouched");
        assert_eq!((new.hits, new.handed_on), (0, 0), "conntrack is not asked");
        assert_eq!(h.counter(GlobalCounter::FromPeer).unwrap(), 1);
    });
}

#[test]
fn a_handed_on_packet_is_never_handed_on_again_by_a_table() {
    let ns = ConntrackNs::new();
    let moved = moved_to_joined(V4, 2);
    let ((sport, before), (other_sport, other_before)) = (moved[0], moved[1]);
    ns.run(move || {
        let mut joined = node_after_change(V4, JOINED, FlowState::SecondChance);
        let ack = Frame::tcp(sport, TCP_ACK).bytes();
        let handed = send(&mut joined, &ack);
        assert_eq!(handed.handed_on, 1);
        assert_handed_to(&handed.out, &ack, before);

        // At the previous pick (same tables, its conntrack does not know the flow either):
        // a frame from node 3's handed-on MAC goes to its stack as is.
        let mut previous = node_after_change(V4, before, FlowState::SecondChance);
        let there = send(&mut previous, &handed.out);
        assert_eq!(there.action, XDP_PASS, "the previous pick keeps it");
        assert_eq!(there.out, handed.out, "untouched");
        assert_eq!((there.hits, there.handed_on), (0, 0));
        assert_eq!(previous.counter(GlobalCounter::FromPeer).unwrap(), 1);

        // The same packet from a client's MAC is balanced there: table B sends it to node 3.
        // That is the hop the peer rule forbids (it would bounce back and forth).
        let mut from_client = handed.out.clone();
        from_client[6..12].copy_from_slice(&sluice_tests::fixtures::CLIENT_MAC);
        let balanced = send(&mut previous, &from_client);
        assert_eq!(balanced.action, XDP_TX);
        assert_eq!(Harness::backend_of(&balanced.out), Some(JOINED));

        // Node 3 itself, which would hand another flow on (one it never handed on, so holds
        // no record of): a frame from a peer's handed-on MAC goes to its stack (tables that
        // disagree for a moment cannot bounce a packet).
        let ack = Frame::tcp(other_sport, TCP_ACK).bytes();
        let peer = other_node(other_before);
        let marked = handed_on_by(peer, &ack);
        let kept = send(&mut joined, &marked);
        assert_eq!(
            kept.action, XDP_PASS,
            "a handed-on frame is never handed on"
        );
        assert_eq!(kept.out, marked, "untouched");
        assert_eq!((kept.hits, kept.handed_on), (0, 0));
        // The mark decides: the same frame from that peer's own MAC is handed on.
        let mut first_hop = marked.clone();
        first_hop[6..12].copy_from_slice(&backend_mac(peer));
        assert_eq!(send(&mut joined, &first_hop).handed_on, 1);
    });
}

#[test]
fn records_carry_a_flow_through_several_changes() {
    let ns = ConntrackNs::new();
    let tables = [BEFORE, AFTER, AFTER_FOURTH];
    // A flow that moves twice (its owner, then node 3, then node 4), and one that moves to
    // node 3 and stays there at the second change.
    let twice = ports_picked(
        V4,
        &tables,
        |p| p[0] != JOINED && p[1] == JOINED && p[2] == FOURTH,
        1,
    )
    .remove(0);
    let stays = ports_picked(
        V4,
        &tables,
        |p| p[0] != JOINED && p[1] == JOINED && p[2] == JOINED,
        1,
    )
    .remove(0);
    ns.run(move || {
        // Change 1 (node 3 joins): node 3 hands both flows on to their owners, and records it.
        let mut joined = node_through(V4, JOINED, &tables[..2]);
        for (sport, picks) in [&twice, &stays] {
            let ack = Frame::tcp(*sport, TCP_ACK).bytes();
            let handed = send(&mut joined, &ack);
            assert_handed_to(&handed.out, &ack, picks[0]);
        }
        let want: BTreeMap<u16, u8> = [(twice.0, twice.1[0]), (stays.0, stays.1[0])].into();
        assert_eq!(records(&joined, V4), want, "node 3 recorded where each went");

        // Change 2 (node 4 joins). Node 4, the new pick, does not know the first flow: it
        // hands it on to its previous pick, node 3, and records that.
        joined
            .apply_as_node(
                &cluster(V4, AFTER_FOURTH, FlowState::SecondChance),
                V4.node(JOINED),
            )
            .expect("table C");
        let mut fourth = node_through(V4, FOURTH, &tables[1..]);
        let ack = Frame::tcp(twice.0, TCP_ACK).bytes();
        let at_fourth = send(&mut fourth, &ack);
        assert_eq!(at_fourth.action, XDP_TX);
        assert_eq!(Harness::backend_of(&at_fourth.out), Some(JOINED));
        assert_eq!(at_fourth.out[6..12], handed_on_mac(backend_mac(FOURTH)));
        assert_eq!(records(&fourth, V4), [(twice.0, JOINED)].into());

        // Node 3 did not begin it either: its record sends it on to the owner, marked.
        let mut trace = joined
            .start_trace(TraceFilter::default())
            .expect("start a trace");
        let relayed = send(&mut joined, &at_fourth.out);
        assert_eq!(relayed.action, XDP_TX, "on along node 3's record");
        assert_followed(&relayed.out, &at_fourth.out, JOINED, twice.1[0], true);
        assert_eq!((relayed.hits, relayed.handed_on), (0, 0), "no table hands it on");
        assert_eq!(joined.counter(GlobalCounter::SecondChanceRecordFollowed).unwrap(), 1);

        // The owner holds no record: its stack takes it, untouched.
        let mut owner = node_through(V4, twice.1[0], &tables);
        let there = send(&mut owner, &relayed.out);
        assert_eq!(there.action, XDP_PASS, "the owner keeps it");
        assert_eq!(there.out, relayed.out, "untouched");
        assert_eq!(owner.counter(GlobalCounter::FromPeer).unwrap(), 1);

        // The second flow: node 3 is its pick by both tables now, so no table asks about it;
        // node 3's record still sends it to its owner (a packet's first hand-on: its IP
        // header untouched).
        let ack = Frame::tcp(stays.0, TCP_ACK).bytes();
        let followed = send(&mut joined, &ack);
        assert_eq!(followed.action, XDP_TX, "not to node 3's stack");
        assert_followed(&followed.out, &ack, JOINED, stays.1[0], false);

        let lines: Vec<String> = described(&joined, &mut trace)
            .iter()
            .map(trace::Described::line)
            .collect();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        let along = "its record of the flow (this node handed it on at an earlier change), conntrack miss: on along the record";
        assert!(
            lines[0].contains("by handed_record")
                && lines[0].ends_with(&format!("handed on to this node by another, {along}"))
                && lines[1].ends_with(&format!("picked this node, {along}")),
            "{lines:#?}"
        );
    });
}

#[test]
fn a_record_gives_way_to_a_connection_its_conntrack_knows() {
    let ns = ConntrackNs::new();
    let (sport, before) = moved_to_joined(V4, 1)[0];
    ns.run(move || {
        let mut joined = node_after_change(V4, JOINED, FlowState::SecondChance);
        let ack = Frame::tcp(sport, TCP_ACK).bytes();
        assert_handed_to(&send(&mut joined, &ack).out, &ack, before);
        assert_eq!(records(&joined, V4), [(sport, before)].into());

        // The 5-tuple is reused by a new connection that this node serves (a NAT gateway
        // cycles its ports): conntrack knows it, the stale record goes.
        let listener = TcpListener::bind(SocketAddrV4::new(VIP, 80)).expect("listen on the VIP");
        let _connection = connect_from(V4, sport, &listener);
        let kept = send(&mut joined, &ack);
        assert_eq!(kept.action, XDP_PASS, "the new connection is this node's");
        assert_eq!(kept.out, ack, "untouched");
        assert_eq!((kept.hits, kept.handed_on), (1, 0));
        assert!(records(&joined, V4).is_empty(), "the record is gone");
    });
}

#[test]
fn records_that_form_a_cycle_stop_at_the_hop_limit() {
    records_cycle_until_the_hop_limit(V4);
}

#[test]
fn ipv6_records_that_form_a_cycle_stop_at_the_hop_limit() {
    records_cycle_until_the_hop_limit(V6);
}

/// Node 3 records a flow as its owner's; the owner, whose conntrack no longer knows it (here:
/// never did) and which picks it again once node 3 drains, records it as node 3's. The frame
/// then goes round the two records, one hop fewer each time, and stops at a hop limit of 1.
fn records_cycle_until_the_hop_limit(family: Family) {
    let ns = ConntrackNs::new();
    let (sport, owner) = moved_to_joined(family, 1)[0];
    ns.run(move || {
        let mut joined = node_after_change(family, JOINED, FlowState::SecondChance);
        let ack = family.frame(sport, TCP_ACK);
        assert_handed_to(&send(&mut joined, &ack).out, &ack, owner);
        // Node 3 drained (no slot: table A's picks again). Drained rather than removed: the
        // harness knows a peer's MAC from the VIP's backends.
        let drained: &[(u8, u32, bool)] =
            &[(0, 1, false), (1, 1, false), (2, 1, false), (3, 1, true)];
        let mut back = node_through(family, owner, &[BEFORE, AFTER, drained]);
        let handed = send(&mut back, &ack);
        assert_eq!(Harness::backend_of(&handed.out), Some(JOINED));
        assert_eq!(records(&back, family), [(sport, JOINED)].into());

        let start = hops_left(&handed.out);
        let mut frame = handed.out;
        let mut forwards = 0u8;
        for _ in 0..=u8::MAX {
            let (node, by) = match Harness::backend_of(&frame) {
                Some(JOINED) => (&mut joined, JOINED),
                _ => (&mut back, owner),
            };
            let sent = send(node, &frame);
            if sent.action == XDP_PASS {
                assert_eq!(sent.out, frame, "passed untouched");
                break;
            }
            assert_eq!(sent.action, XDP_TX);
            let to = if by == JOINED { owner } else { JOINED };
            assert_followed(&sent.out, &frame, by, to, true);
            forwards += 1;
            frame = sent.out;
        }
        assert_eq!(forwards, start - 1, "one forward per hop until the last");
        assert_eq!(hops_left(&frame), 1);
        let limited = joined.counter(GlobalCounter::SecondChanceHopLimit).unwrap()
            + back.counter(GlobalCounter::SecondChanceHopLimit).unwrap();
        assert_eq!(limited, 1, "stopped once, at the hop limit");
    });
}

#[test]
fn table_mode_is_unchanged_and_same_picks_never_ask() {
    let ns = ConntrackNs::new();
    let moved = moved_to_joined(V4, 1);
    let (sport, _) = moved[0];
    // A flow that stays on node 0 through the change.
    let stays = (40000..41000u16)
        .find(|p| pick(BEFORE, *p) == 0 && pick(AFTER, *p) == 0)
        .expect("a flow node 0 keeps");
    ns.run(move || {
        // Table mode: the flow is node 3's by table B and recorded; no question, no hand-on.
        let mut table = node_after_change(V4, JOINED, FlowState::Table);
        let ack = Frame::tcp(sport, TCP_ACK).bytes();
        let local = send(&mut table, &ack);
        assert_eq!(local.action, XDP_PASS);
        assert_eq!(local.out, ack);
        assert_eq!((local.hits, local.handed_on), (0, 0));
        assert_eq!(
            table.flow_entries().unwrap().get(&sport),
            Some(&None),
            "recorded"
        );

        // A first hop's frame is the same bytes in both modes (only a handed-on one differs),
        // and in table mode node 3 passes a peer's frame as before, marked or not.
        let first_hop = through_first_hop(V4, 0, &ack, FlowState::Table);
        assert_eq!(
            first_hop,
            through_first_hop(V4, 0, &ack, FlowState::SecondChance),
            "second-chance mode's first hop sends what table mode does"
        );
        for frame in [first_hop.clone(), handed_on_by(0, &ack)] {
            let passed = send(&mut table, &frame);
            assert_eq!(passed.action, XDP_PASS);
            assert_eq!(passed.out, frame, "untouched");
            assert_eq!((passed.hits, passed.handed_on), (0, 0));
        }
        assert_eq!(table.counter(GlobalCounter::FromPeer).unwrap(), 2);

        // Second-chance mode, the same pick before and after (node 0, the node itself):
        // to its stack as today, conntrack not asked although it does not know the flow.
        let mut node0 = node_after_change(V4, 0, FlowState::SecondChance);
        let ack = Frame::tcp(stays, TCP_ACK).bytes();
        let same = send(&mut node0, &ack);
        assert_eq!(same.action, XDP_PASS);
        assert_eq!((same.hits, same.handed_on), (0, 0));
        assert_eq!(node0.counter(GlobalCounter::Local).unwrap(), 1);
        assert!(node0.flow_entries().unwrap().is_empty(), "nothing recorded");
        // A VIP with no previous table (a first apply) is as today too.
        let mut fresh = Harness::new().unwrap();
        fresh.iface.mac = lb_userspace::model::MacAddr(backend_mac(JOINED));
        fresh
            .apply_as_node(
                &cluster(V4, AFTER, FlowState::SecondChance),
                IpAddr::V4(backend_addr(JOINED)),
            )
            .unwrap();
        let first = send(&mut fresh, &Frame::tcp(sport, TCP_ACK).bytes());
        assert_eq!(first.action, XDP_PASS);
        assert_eq!((first.hits, first.handed_on), (0, 0));
        let from_peer = send(&mut fresh, &first_hop);
        assert_eq!(
            from_peer.action, XDP_PASS,
            "a peer's frame, no previous table"
        );
        assert_eq!((from_peer.hits, from_peer.handed_on), (0, 0));
    });
}

/// Second chance looks no flow up: an entry left from table mode is not followed, the
/// current table picks, as for every packet in that mode (a miss cost a mid-flow packet more
/// than the rest of its path).
#[test]
fn second_chance_follows_no_entry_left_from_table_mode() {
    let (sport, before) = moved_to_joined(V4, 1)[0];
    let mut h = harness_with(&V4.desired(BEFORE));
    let ack = Frame::tcp(sport, TCP_ACK).bytes();
    assert_eq!(assert_forwarded(&mut h, &ack), before);
    assert_eq!(
        h.flow_entries().unwrap().get(&sport),
        Some(&Some(before)),
        "table mode recorded the flow"
    );
    let mut after = V4.desired(AFTER);
    after.settings.flow_state = FlowState::SecondChance;
    h.apply(&after).unwrap();
    assert_eq!(
        assert_forwarded(&mut h, &ack),
        JOINED,
        "second-chance mode followed the entry table mode left"
    );
}

/// `flow_state: auto` asks the kernel the dataplane's own question (`bpf_xdp_ct_lookup`) about
/// a loopback connection of its own: found where a rule turns conntrack on, not found where
/// nothing in the namespace uses conntrack.
#[test]
fn the_conntrack_probe_tells_a_tracking_namespace_from_one_that_does_not_track() {
    for tracking in [true, false] {
        let ns = ConntrackNs::tracking(tracking);
        let answer = ns.run(|| {
            let mut h = Harness::new().expect("load the XDP object");
            h.conntrack_tracks().expect("the probe runs")
        });
        assert_eq!(
            answer,
            tracking,
            "the probe in a namespace where conntrack is {}",
            if tracking { "on" } else { "off" }
        );
    }
}
