//! Packet fixtures for `sluice trace` (issue 17): the real program, BPF_PROG_TEST_RUN, and the
//! events it writes to its ring buffer: which packets are reported (client, VIP, backend
//! filters), what each event says (5-tuple, verdict and reason, backend, connection table or
//! Maglev and which slot, generation), the rate limit and its lost count, and silence when no
//! trace runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use lb_common::{
    FAMILY_V4, FAMILY_V6, GlobalCounter, NO_BACKEND, NO_SLOT, TraceEvent, TraceFilter, raw_addr,
    trace_flags, trace_match, trace_source,
};
use lb_userspace::{
    dataplane::{Snapshot, TraceSession},
    model::Protocol,
};
use sluice_tests::fixtures::{
    CLIENT, CLIENT6, Frame, Harness, TCP_ACK, TCP_SYN, VIP, VIP6, XDP_DROP, XDP_PASS, XDP_TX,
    backend_addr, backend_addr6, desired, desired_at, harness_with, icmp_error_about,
};

const THREE: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// A filter for one client address (/32 or /128).
fn client_filter(client: IpAddr) -> TraceFilter {
    let (addr, family) = raw_addr(client);
    let ones = if family == FAMILY_V4 {
        [u32::MAX, 0, 0, 0]
    } else {
        [u32::MAX; 4]
    };
    TraceFilter {
        matches: trace_match::CLIENT,
        client: addr,
        client_mask: ones,
        client_family: family,
        ..TraceFilter::default()
    }
}

fn events(session: &mut TraceSession) -> Vec<TraceEvent> {
    session
        .poll(Duration::from_millis(50))
        .expect("read the trace ring")
}

/// The BACKENDS id and generation of the entry that holds `addr`.
fn slot_of(h: &Harness, addr: IpAddr) -> (u32, u32) {
    let snapshot = Snapshot::read(&h.maps).expect("read the maps");
    snapshot
        .backends
        .iter()
        .find(|(_, b)| lb_common::addr_from_raw(&b.addr, b.family) == addr)
        .map(|(id, b)| (*id, b.generation))
        .expect("an entry holds the backend")
}

fn table_size(h: &Harness) -> u32 {
    let snapshot = Snapshot::read(&h.maps).expect("read the maps");
    let (_, vip) = snapshot.vips.iter().next().expect("one VIP");
    vip.table_size
}

#[test]
fn no_trace_running_reports_nothing() {
    let mut h = harness_with(&desired(Protocol::Tcp, THREE));
    for sport in 0..20 {
        h.run(&Frame::tcp(30000 + sport, TCP_SYN).bytes())
            .expect("test run");
    }
    assert_eq!(h.counter(GlobalCounter::TraceEvents).unwrap(), 0);
    // Nor does a filter that matches everything once its reader is gone (the session dropped).
    let session = h.start_trace(TraceFilter::default()).expect("start");
    drop(session);
    h.run(&Frame::tcp(31000, TCP_SYN).bytes())
        .expect("test run");
    assert_eq!(h.counter(GlobalCounter::TraceEvents).unwrap(), 0);
}

#[test]
fn a_new_flow_its_established_packets_and_an_icmp_error_are_reported_with_their_decision() {
    let mut h = harness_with(&desired(Protocol::Tcp, THREE));
    let size = table_size(&h);
    let mut session = h
        .start_trace(client_filter(IpAddr::V4(CLIENT)))
        .expect("start");

    let syn = Frame::tcp(40000, TCP_SYN);
    let (action, out) = h.run(&syn.bytes()).expect("test run");
    assert_eq!(action, XDP_TX);
    let b = Harness::backend_of(&out).expect("forwarded to a backend");
    let (id, generation) = slot_of(&h, IpAddr::V4(backend_addr(b)));
    // Another client's packet: not reported.
    let mut other = Frame::tcp(40000, TCP_SYN);
    other.src = IpAddr::V4(OTHER_CLIENT);
    h.run(&other.bytes()).expect("test run");
    let (action, _) = h
        .run(&Frame::tcp(40000, TCP_ACK).bytes())
        .expect("test run");
    assert_eq!(action, XDP_TX);
    let (action, _) = h
        .run(&icmp_error_about(40000, false).bytes())
        .expect("test run");
    assert_eq!(action, XDP_TX);

    let got = events(&mut session);
    assert_eq!(
        got.len(),
        3,
        "the client's SYN, ACK and ICMP error: {got:#?}"
    );
    let (first, second, third) = (&got[0], &got[1], &got[2]);

    // The SYN: Maglev decided, in the slot the flow hash names.
    assert_eq!(first.flow.src, raw_addr(IpAddr::V4(CLIENT)).0);
    assert_eq!(first.flow.dst, raw_addr(IpAddr::V4(VIP)).0);
    assert_eq!(
        (
            u16::from_be(first.flow.sport),
            u16::from_be(first.flow.dport)
        ),
        (40000, 80)
    );
    assert_eq!((first.flow.proto, first.flow.family), (6, FAMILY_V4));
    assert_eq!(first.source, trace_source::MAGLEV);
    assert_eq!(first.flags & trace_flags::SYN, trace_flags::SYN);
    assert_eq!(first.flags & trace_flags::NOT_RECORDED, 0);
    assert_eq!(first.table_size, size);
    assert_eq!(first.slot, first.flow.hash(false) % size);
    assert_eq!((first.backend, first.generation), (id, generation));
    assert_eq!(first.counter, GlobalCounter::Tx as u8);
    assert_eq!(first.action, XDP_TX);
    assert_eq!(first.ip_len as usize, syn.ip_packet().len());

    // The ACK: the connection table decided, no slot consulted.
    assert_eq!(second.flow, first.flow);
    assert_eq!(second.source, trace_source::CONN_TABLE);
    assert_eq!(second.flags & trace_flags::SYN, 0);
    assert_eq!(second.slot, NO_SLOT);
    assert_eq!((second.backend, second.generation), (id, generation));
    assert!(second.time_ns >= first.time_ns);

    // The ICMP error, by the flow it quotes: the connection table's backend.
    assert_eq!(third.flow, first.flow);
    assert_eq!(third.counter, GlobalCounter::IcmpErrorForwarded as u8);
    assert_eq!(
        (third.source, third.backend),
        (trace_source::CONN_TABLE, id)
    );

    assert_eq!(h.counter(GlobalCounter::TraceEvents).unwrap(), 3);
}

#[test]
fn ipv6_flows_match_an_ipv6_client() {
    let mut h = harness_with(&desired_at(IpAddr::V6(VIP6), Protocol::Tcp, THREE));
    let mut session = h
        .start_trace(client_filter(IpAddr::V6(CLIENT6)))
        .expect("start");
    let (action, out) = h
        .run(&Frame::tcp(40001, TCP_SYN).v6().bytes())
        .expect("test run");
    assert_eq!(action, XDP_TX);
    let b = Harness::backend_of(&out).expect("forwarded to a backend");
    let (id, _) = slot_of(&h, IpAddr::V6(backend_addr6(b)));
    let got = events(&mut session);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].flow.family, FAMILY_V6);
    assert_eq!(got[0].flow.src, raw_addr(IpAddr::V6(CLIENT6)).0);
    assert_eq!(got[0].flow.dst, raw_addr(IpAddr::V6(VIP6)).0);
    assert_eq!(got[0].backend, id);
    assert_eq!(got[0].slot, got[0].flow.hash(false) % got[0].table_size);
}

#[test]
fn the_vip_and_backend_filters_select_exactly_their_packets() {
    let mut h = harness_with(&desired(Protocol::Tcp, THREE));
    let (one, _) = slot_of(&h, IpAddr::V4(backend_addr(1)));
    let mut session = h
        .start_trace(TraceFilter {
            matches: trace_match::VIP | trace_match::BACKEND,
            vip: lb_common::VipKey {
                addr: raw_addr(IpAddr::V4(VIP)).0,
                port: 80u16.to_be(),
                proto: 6,
                family: FAMILY_V4,
            },
            backend: one,
            ..TraceFilter::default()
        })
        .expect("start");
    let mut to_one = Vec::new();
    for sport in 41000..41060u16 {
        let (_, out) = h
            .run(&Frame::tcp(sport, TCP_SYN).bytes())
            .expect("test run");
        if Harness::backend_of(&out) == Some(1) {
            to_one.push(sport);
        }
    }
    // UDP to the VIP's address, port 80: no such VIP (passed), and not the traced one.
    let (action, _) = h.run(&Frame::udp(41000, b"x").bytes()).expect("test run");
    assert_eq!(action, XDP_PASS);
    let got: Vec<u16> = events(&mut session)
        .iter()
        .map(|e| {
            assert_eq!(e.backend, one);
            u16::from_be(e.flow.sport)
        })
        .collect();
    assert!(!to_one.is_empty() && to_one.len() < 60, "{to_one:?}");
    assert_eq!(got, to_one, "exactly the flows Maglev gave backend 1");
}

#[test]
fn a_drop_is_reported_with_its_reason_and_no_backend() {
    let mut h = harness_with(&desired(Protocol::Tcp, &[(0, 1, true)]));
    let mut session = h.start_trace(TraceFilter::default()).expect("start");
    let (action, _) = h
        .run(&Frame::tcp(42000, TCP_SYN).bytes())
        .expect("test run");
    assert_eq!(action, XDP_DROP);
    let got = events(&mut session);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].counter, GlobalCounter::DropNoBackend as u8);
    assert_eq!(got[0].action, XDP_DROP);
    assert_eq!(got[0].backend, NO_BACKEND);
    assert_eq!(got[0].source, trace_source::NONE);
}

#[test]
fn events_over_the_rate_are_counted_lost() {
    let mut h = harness_with(&desired(Protocol::Tcp, THREE));
    let mut session = h
        .start_trace(TraceFilter {
            max_per_sec: 3,
            ..TraceFilter::default()
        })
        .expect("start");
    // One test run of 10 repetitions: one CPU, well inside one second.
    let (action, _, _) = h
        .run_repeat(&Frame::tcp(43000, TCP_ACK).bytes(), 10)
        .expect("test run");
    assert_eq!(action, XDP_TX);
    assert_eq!(events(&mut session).len(), 3);
    assert_eq!(h.counter(GlobalCounter::TraceEvents).unwrap(), 3);
    assert_eq!(h.counter(GlobalCounter::TraceLostRate).unwrap(), 7);
    assert_eq!(h.counter(GlobalCounter::TraceLostRing).unwrap(), 0);
}

/// The traffic every filter below is tried on: (label, frame), one client port per label.
fn mixed_traffic() -> Vec<(&'static str, Frame)> {
    let mut other_port = Frame::tcp(44002, TCP_ACK);
    other_port.dport = 81;
    let mut other_vip = Frame::tcp(44004, TCP_ACK);
    other_vip.dst = IpAddr::V4(OTHER_VIP);
    let mut other_client = Frame::tcp(44005, TCP_ACK);
    other_client.src = IpAddr::V4(OTHER_CLIENT);
    vec![
        ("vip:80/tcp", Frame::tcp(44001, TCP_ACK)),
        ("vip:81/tcp", other_port),
        ("vip:80/udp", Frame::udp(44003, b"x")),
        ("other vip:80/tcp", other_vip),
        ("other client", other_client),
    ]
}

const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);

/// Four VIPs: the fixture VIP on TCP 80 and 81 and UDP 80, another address on TCP 80.
fn four_vips() -> lb_userspace::model::Desired {
    use lb_userspace::model::VipAddr;
    let mut d = desired(Protocol::Tcp, THREE);
    let template = d.vips[0].clone();
    for (addr, port, protocol) in [
        (VIP, 81, Protocol::Tcp),
        (VIP, 80, Protocol::Udp),
        (OTHER_VIP, 80, Protocol::Tcp),
    ] {
        let mut v = template.clone();
        v.key = VipAddr {
            addr: IpAddr::V4(addr),
            port,
            protocol,
        };
        d.vips.push(v);
    }
    d.vips.sort_by_key(|v| v.key);
    d
}

/// The labels of the traffic `filter` reports, each frame sent once.
fn reported(
    h: &mut Harness,
    session: &mut TraceSession,
    filter: TraceFilter,
    traffic: &[(&'static str, Frame)],
) -> Vec<&'static str> {
    session.set_filter(filter).expect("set the filter");
    for (label, frame) in traffic {
        let (action, _) = h.run(&frame.bytes()).expect("test run");
        assert_eq!(action, XDP_TX, "{label}");
    }
    let got = events(session);
    traffic
        .iter()
        .filter(|(_, f)| got.iter().any(|e| u16::from_be(e.flow.sport) == f.sport))
        .map(|(label, _)| *label)
        .collect()
}

fn vip_filter(port: u16, proto: u8) -> TraceFilter {
    TraceFilter {
        matches: trace_match::VIP,
        vip: lb_common::VipKey {
            addr: raw_addr(IpAddr::V4(VIP)).0,
            port: port.to_be(),
            proto,
            family: FAMILY_V4,
        },
        ..TraceFilter::default()
    }
}

/// Each condition of the filter alone, on traffic that holds what it must exclude: another
/// VIP address, another port and another protocol on the VIP's address, another client, other
/// backends. The filters are the kernel's (`kernel_filter`'s output), so a condition the
/// program skipped would show here.
#[test]
fn each_filter_condition_alone_reports_its_packets_and_not_the_others() {
    let mut h = harness_with(&four_vips());
    let traffic = mixed_traffic();
    let mut session = h.start_trace(TraceFilter::default()).expect("start");
    let all: Vec<&str> = traffic.iter().map(|(l, _)| *l).collect();
    assert_eq!(
        reported(&mut h, &mut session, TraceFilter::default(), &traffic),
        all,
        "no condition: everything"
    );
    assert_eq!(
        reported(&mut h, &mut session, vip_filter(0, 0), &traffic),
        ["vip:80/tcp", "vip:81/tcp", "vip:80/udp", "other client"],
        "the VIP's address alone"
    );
    assert_eq!(
        reported(&mut h, &mut session, vip_filter(80, 0), &traffic),
        ["vip:80/tcp", "vip:80/udp", "other client"],
        "the VIP's address and port"
    );
    assert_eq!(
        reported(&mut h, &mut session, vip_filter(0, 6), &traffic),
        ["vip:80/tcp", "vip:81/tcp", "other client"],
        "the VIP's address and protocol"
    );
    assert_eq!(
        reported(&mut h, &mut session, vip_filter(80, 6), &traffic),
        ["vip:80/tcp", "other client"],
        "the whole VIP"
    );
    assert_eq!(
        reported(
            &mut h,
            &mut session,
            client_filter(IpAddr::V4(OTHER_CLIENT)),
            &traffic
        ),
        ["other client"],
        "one client"
    );
    // A backend (a slot: one backend of one VIP) alone: exactly the frames sent to it. Where
    // each frame goes, from an unfiltered pass.
    session.set_filter(TraceFilter::default()).unwrap();
    for (_, frame) in &traffic {
        h.run(&frame.bytes()).expect("test run");
    }
    let slots: BTreeMap<u16, u32> = events(&mut session)
        .iter()
        .map(|e| (u16::from_be(e.flow.sport), e.backend))
        .collect();
    assert_eq!(slots.len(), traffic.len());
    let distinct: BTreeSet<u32> = slots.values().copied().collect();
    assert!(distinct.len() > 1, "{slots:?}");
    for id in distinct {
        let filter = TraceFilter {
            matches: trace_match::BACKEND,
            backend: id,
            ..TraceFilter::default()
        };
        let want: Vec<&str> = traffic
            .iter()
            .filter(|(_, f)| slots[&f.sport] == id)
            .map(|(l, _)| *l)
            .collect();
        assert_eq!(
            reported(&mut h, &mut session, filter, &traffic),
            want,
            "the slot {id}"
        );
    }
}

/// An IPv6 client prefix: a client inside it is reported, a second IPv6 client outside it is
/// not (outside by a bit in the second 32-bit word of the address, then in the fourth), nor is
/// an IPv4 client.
#[test]
fn an_ipv6_client_prefix_reports_its_clients_only() {
    let mut d = desired_at(IpAddr::V6(VIP6), Protocol::Tcp, THREE);
    d.vips.extend(desired(Protocol::Tcp, THREE).vips);
    d.vips.sort_by_key(|v| v.key);
    let mut h = harness_with(&d);
    let mut session = h.start_trace(TraceFilter::default()).expect("start");
    let from = |src: &str, sport: u16| {
        let mut f = Frame::tcp(sport, TCP_ACK).v6();
        f.src = src.parse().unwrap();
        f
    };
    let traffic = vec![
        ("fd00::1", from("fd00::1", 45001)),
        ("fd00::5", from("fd00::5", 45002)),
        ("fd00:0:0:1::1", from("fd00:0:0:1::1", 45003)),
        ("ipv4 client", Frame::tcp(45004, TCP_ACK)),
    ];
    let prefix = |text: &str| {
        let net: lb_userspace::model::IpNet = text.parse().unwrap();
        let (addr, family) = raw_addr(net.network());
        TraceFilter {
            matches: trace_match::CLIENT,
            client: addr,
            client_mask: raw_addr(net.netmask()).0,
            client_family: family,
            ..TraceFilter::default()
        }
    };
    assert_eq!(
        reported(&mut h, &mut session, prefix("fd00::/64"), &traffic),
        ["fd00::1", "fd00::5"],
        "fd00::/64"
    );
    assert_eq!(
        reported(&mut h, &mut session, prefix("fd00::/126"), &traffic),
        ["fd00::1"],
        "fd00::/126"
    );
    assert_eq!(
        reported(&mut h, &mut session, prefix("10.0.0.0/24"), &traffic),
        ["ipv4 client"],
        "10.0.0.0/24"
    );
}
