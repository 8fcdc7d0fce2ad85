//! Packet fixtures for `sluice trace` (issue 17): the real program, BPF_PROG_TEST_RUN, and the
//! events it writes to its ring buffer: which packets are reported (client, VIP, backend
//! filters), what each event says (5-tuple, verdict and reason, backend, connection table or
//! Maglev and which slot, generation), the rate limit and its lost count, and silence when no
//! trace runs.

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

/// The BACKENDS id of the slot that holds `addr`.
fn slot_of(h: &Harness, addr: IpAddr) -> (u32, u32) {
    let snapshot = Snapshot::read(&h.maps).expect("read the maps");
    snapshot
        .slots
        .iter()
        .find(|(_, b)| lb_common::addr_from_raw(&b.addr, b.family) == addr)
        .map(|(id, b)| (*id, b.generation))
        .expect("a slot holds the backend")
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
