//! Packet fixtures for the dataplane's rules under attack (issue 13): a TCP SYN is balanced
//! afresh and never follows a stale connection-table entry; malformed frames that are not for a
//! VIP address reach the kernel untouched; an ICMP error is never answered with one and must
//! come back to the VIP it quotes; outer headers carry the inner DSCP, ECN and DF (RFC 6040);
//! the flood guard forwards by Maglev's pick without recording. Real program,
//! BPF_PROG_TEST_RUN, exact bytes.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use lb_common::{DecapCounter, GlobalCounter};
use lb_userspace::model::{Desired, ForwardingMode, Protocol};
use sluice_tests::{
    fixtures::{
        DecapHarness, Frame, Harness, IP_DF, TCP_ACK, TCP_SYN, VIP, VIP6, XDP_DROP, XDP_PASS,
        XDP_TX, assert_forwarded, assert_untouched, backend_addr, backend_addr6, checksum_ok,
        desired, desired_at, harness_with, icmp_error_about, pin_to_cpu,
    },
    require_root,
};

const THREE: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];
/// An address of the load balancer itself: not a VIP.
const NOT_A_VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 200);
const NOT_A_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0xc8);

fn harness(backends: &[(u8, u32, bool)]) -> Harness {
    harness_with(&desired(Protocol::Tcp, backends))
}

/// Client ports whose flows the three-backend table gives to backend `b` (as SYNs).
fn ports_of(h: &mut Harness, b: u8, want: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    for sport in 20000..30000u16 {
        if assert_forwarded(h, &Frame::tcp(sport, TCP_SYN).bytes()) == b {
            ports.push(sport);
            if ports.len() == want {
                break;
            }
        }
    }
    assert_eq!(ports.len(), want, "backend {b} got too few flows");
    ports
}

#[test]
fn a_reused_tuple_never_follows_its_stale_entry_to_a_drained_backend() {
    let mut h = harness(THREE);
    // 20 connections recorded on backend 1 (SYN, then ACK through the connection table).
    let ports = ports_of(&mut h, 1, 20);
    for &p in &ports {
        assert_eq!(assert_forwarded(&mut h, &Frame::tcp(p, TCP_ACK).bytes()), 1);
    }
    h.apply(&desired(
        Protocol::Tcp,
        &[(0, 1, false), (1, 1, true), (2, 1, false)],
    ))
    .unwrap();
    for &p in &ports {
        // The old connection's segments still reach the drained backend ...
        assert_eq!(
            assert_forwarded(&mut h, &Frame::tcp(p, TCP_ACK).bytes()),
            1,
            "an established flow left its drained backend"
        );
        // ... but a new connection on the same 5-tuple (a NAT gateway reusing the port) does
        // not, and its later segments follow the SYN, not the stale entry.
        let fresh = assert_forwarded(&mut h, &Frame::tcp(p, TCP_SYN).bytes());
        assert_ne!(
            fresh, 1,
            "port {p}: a SYN followed a stale entry to a drained backend"
        );
        assert_eq!(
            assert_forwarded(&mut h, &Frame::tcp(p, TCP_ACK).bytes()),
            fresh,
            "port {p}: the new connection's ACK did not follow its SYN"
        );
    }
}

#[test]
fn a_retransmitted_syn_reaches_the_same_backend() {
    let mut h = harness(THREE);
    for sport in 31000..31200u16 {
        let syn = Frame::tcp(sport, TCP_SYN).bytes();
        let first = assert_forwarded(&mut h, &syn);
        assert_eq!(assert_forwarded(&mut h, &syn), first, "port {sport}");
        assert_eq!(
            assert_forwarded(&mut h, &Frame::tcp(sport, TCP_ACK).bytes()),
            first
        );
    }
    // A SYN-ACK bit pattern (SYN with ACK) is not a new connection: it follows the table.
    let port = ports_of(&mut h, 2, 1)[0];
    h.apply(&desired(
        Protocol::Tcp,
        &[(0, 1, false), (1, 1, false), (2, 1, true)],
    ))
    .unwrap();
    assert_eq!(
        assert_forwarded(&mut h, &Frame::tcp(port, TCP_SYN | TCP_ACK).bytes()),
        2
    );
}

/// Frames to `dst` that the kernel may well accept, though they look malformed to a parser
/// that insists on plain lengths: IPv4 `tot_len` 0 (BIG TCP in generic mode), `tot_len`
/// beyond the frame, `ihl` beyond the frame, and an IPv6 jumbogram (payload length 0 and a
/// hop-by-hop jumbo option).
fn odd_frames(dst: IpAddr) -> Vec<(&'static str, Vec<u8>)> {
    let mut frames = Vec::new();
    if let IpAddr::V4(dst) = dst {
        let mut f = Frame::tcp(40000, TCP_ACK);
        f.dst = IpAddr::V4(dst);
        f.payload = vec![7; 64];
        let full = f.bytes();
        let mut zero = full.clone();
        zero[16..18].copy_from_slice(&0u16.to_be_bytes());
        let mut long = full.clone();
        long[16..18].copy_from_slice(&4000u16.to_be_bytes());
        let mut ihl = full[..14 + 24].to_vec();
        ihl[14] = 0x4f;
        frames.extend([
            ("tot_len 0", zero),
            ("tot_len beyond", long),
            ("ihl beyond", ihl),
        ]);
    } else if let IpAddr::V6(dst) = dst {
        let mut f = Frame::tcp(40000, TCP_ACK).v6();
        f.dst = IpAddr::V6(dst);
        f.payload = vec![7; 64];
        // Hop-by-hop: jumbo payload option (type 0xc2, length 4, the real length).
        let mut jumbo = f.clone();
        jumbo.ext_headers = vec![(0, vec![0xc2, 4, 0, 0, 0, 0])];
        let mut bytes = jumbo.bytes();
        let payload_len = (bytes.len() - 14 - 40) as u32;
        bytes[18..20].copy_from_slice(&0u16.to_be_bytes());
        bytes[14 + 40 + 4..14 + 40 + 8].copy_from_slice(&payload_len.to_be_bytes());
        frames.push(("jumbogram", bytes));
    }
    frames
}

#[test]
fn malformed_frames_not_for_a_vip_reach_the_kernel_untouched() {
    for (dst, d) in [
        (IpAddr::V4(NOT_A_VIP), desired(Protocol::Tcp, THREE)),
        (
            IpAddr::V6(NOT_A_VIP6),
            desired_at(IpAddr::V6(VIP6), Protocol::Tcp, THREE),
        ),
    ] {
        let mut h = harness_with(&d);
        for (name, frame) in odd_frames(dst) {
            let (action, out) = h.run(&frame).unwrap();
            assert_eq!(action, XDP_PASS, "{name} to {dst}");
            assert_eq!(out, frame, "{name} to {dst} was changed");
        }
        assert_eq!(h.counter(GlobalCounter::DropMalformed).unwrap(), 0);
    }
    // The same frames to the VIP are the balancer's, and it cannot take them.
    for (vip, d) in [
        (IpAddr::V4(VIP), desired(Protocol::Tcp, THREE)),
        (
            IpAddr::V6(VIP6),
            desired_at(IpAddr::V6(VIP6), Protocol::Tcp, THREE),
        ),
    ] {
        let mut h = harness_with(&d);
        let frames = odd_frames(vip);
        for (_, frame) in &frames {
            assert_untouched(&mut h, frame, XDP_DROP);
        }
        assert_eq!(
            h.counter(GlobalCounter::DropMalformed).unwrap(),
            frames.len() as u64
        );
    }
}

/// A VIP in ipip mode over IPv4 or IPv6 nodes.
fn ipip(vip: IpAddr, v6_nodes: bool) -> Desired {
    let nodes = if v6_nodes {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP)
    };
    let mut d = desired_at(nodes, Protocol::Tcp, THREE);
    d.vips[0].key.addr = vip;
    d.vips[0].mode = ForwardingMode::Ipip;
    d
}

#[test]
fn an_icmp_error_is_never_answered_with_an_icmp_error() {
    let mut h = harness_with(&ipip(IpAddr::V4(VIP), false));
    // A "fragmentation needed" about a VIP flow that quotes enough to be too big once wrapped
    // (20 + 8 + 1460 + 20 > 1500), DF set: a client's packet would get "too big"; the error
    // is dropped instead.
    let mut error = icmp_error_about(42000, false);
    error.icmp.as_mut().unwrap().body.resize(1460, 0);
    error.frag_off = IP_DF;
    assert_untouched(&mut h, &error.bytes(), XDP_DROP);
    assert_eq!(h.counter(GlobalCounter::IcmpTooBigSent).unwrap(), 0);
    assert_eq!(h.counter(GlobalCounter::DropTooBig).unwrap(), 1);
    // A small one is forwarded (encapsulated) as before.
    let (action, _) = h.run(&icmp_error_about(42000, false).bytes()).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(h.counter(GlobalCounter::IcmpErrorForwarded).unwrap(), 1);
}

#[test]
fn an_icmp_error_must_quote_the_vip_it_is_sent_to() {
    for v6 in [false, true] {
        let d = if v6 {
            desired_at(IpAddr::V6(VIP6), Protocol::Tcp, THREE)
        } else {
            desired(Protocol::Tcp, THREE)
        };
        let mut h = harness_with(&d);
        // The quote's source (bytes 12..16 of an IPv4 quote, 8..24 of an IPv6 one) is not the
        // VIP the error is addressed to.
        let mut forged = icmp_error_about(42000, v6);
        let body = &mut forged.icmp.as_mut().unwrap().body;
        if v6 {
            body[8..24].copy_from_slice(&NOT_A_VIP6.octets());
        } else {
            body[12..16].copy_from_slice(&NOT_A_VIP.octets());
        }
        assert_untouched(&mut h, &forged.bytes(), XDP_DROP);
        assert_eq!(
            h.counter(GlobalCounter::DropIcmpMismatch).unwrap(),
            1,
            "v6={v6}"
        );
        assert_eq!(h.counter(GlobalCounter::IcmpErrorForwarded).unwrap(), 0);
        // The genuine error is forwarded.
        assert_forwarded(&mut h, &icmp_error_about(42000, v6).bytes());
    }
}

#[test]
fn outer_headers_carry_dscp_ecn_and_df() {
    // DSCP 46 (EF) with ECT(1), and DSCP 10 with CE.
    for tos in [0xb9u8, 0x2b] {
        for (vip, v6_nodes) in [
            (IpAddr::V4(VIP), false),
            (IpAddr::V4(VIP), true),
            (IpAddr::V6(VIP6), false),
            (IpAddr::V6(VIP6), true),
        ] {
            let mut h = harness_with(&ipip(vip, v6_nodes));
            for df in [false, true] {
                let mut f = Frame::tcp(43000 + df as u16, TCP_SYN);
                if vip.is_ipv6() {
                    f = f.v6();
                }
                f.tos = tos;
                f.frag_off = if df { IP_DF } else { 0 };
                let (action, out) = h.run(&f.bytes()).unwrap();
                assert_eq!(action, XDP_TX);
                let what = format!("tos {tos:#x} df {df} {vip} over v6 nodes {v6_nodes}");
                if v6_nodes {
                    let vtc = u32::from_be_bytes([out[14], out[15], out[16], out[17]]);
                    assert_eq!((vtc >> 20) as u8, tos, "outer traffic class: {what}");
                } else {
                    let ip = &out[14..34];
                    assert_eq!(ip[1], tos, "outer TOS: {what}");
                    // IPv6 inner packets are never fragmented on the path: DF always.
                    let want_df = df || vip.is_ipv6();
                    let frag = u16::from_be_bytes([ip[6], ip[7]]);
                    assert_eq!(frag, if want_df { IP_DF } else { 0 }, "outer DF: {what}");
                    assert!(checksum_ok(ip, 0), "outer checksum: {what}");
                }
            }
        }
    }
}

/// An IPIP (or IP6IP6) frame from a load balancer's encap source to backend 0's node, with the
/// outer ECN field `outer_ecn`, around `inner`.
fn wrapped(inner: &Frame, v6: bool, outer_ecn: u8) -> Vec<u8> {
    let mut outer = Frame::tcp(0, 0);
    if v6 {
        outer = outer.v6();
        outer.src = IpAddr::V6("fd99::7".parse().expect("constant"));
        outer.dst = IpAddr::V6(backend_addr6(0));
        outer.protocol = 41;
    } else {
        outer.src = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 7));
        outer.dst = IpAddr::V4(backend_addr(0));
        outer.protocol = 4;
    }
    outer.tos = outer_ecn;
    outer.raw_l4 = Some(inner.ip_packet());
    outer.bytes()
}

#[test]
fn decapsulation_hands_congestion_marks_to_the_inner_packet() {
    require_root();
    let local = [IpAddr::V4(backend_addr(0)), IpAddr::V6(backend_addr6(0))];
    let mut decap = DecapHarness::new(&["10.99.0.0/24", "fd99::/120"], &local).expect("decap");
    const CE: u8 = 3;
    for v6 in [false, true] {
        let mut inner = Frame::tcp(44000, TCP_ACK);
        if v6 {
            inner = inner.v6();
        }
        inner.tos = 0xb8 | 1; // EF, ECT(1)
        // CE on the outer header: the inner packet leaves marked CE, checksum intact.
        let (action, out) = decap.run(&wrapped(&inner, v6, CE)).unwrap();
        assert_eq!(action, XDP_PASS, "v6={v6}");
        let mut marked = inner.clone();
        marked.tos = 0xb8 | CE;
        assert_eq!(
            &out[14..],
            &marked.ip_packet()[..],
            "v6={v6}: inner not marked CE"
        );
        if !v6 {
            assert!(checksum_ok(&out[14..34], 0));
        }
        // No mark: the inner packet is untouched.
        let (_, out) = decap.run(&wrapped(&inner, v6, 0)).unwrap();
        assert_eq!(&out[14..], &inner.ip_packet()[..]);
        // CE on the path of a packet that is not ECN-capable: dropped (RFC 6040 4.2).
        let mut not_ect = inner.clone();
        not_ect.tos = 0xb8;
        let (action, _) = decap.run(&wrapped(&not_ect, v6, CE)).unwrap();
        assert_eq!(action, XDP_DROP, "v6={v6}");
    }
    assert_eq!(decap.counter(DecapCounter::Decapsulated).unwrap(), 4);
}

/// The flood guard's promise, read in the connection table and not only in its own counter:
/// at most `LIMIT` new flows are recorded per one-second window (and CPU), the others are
/// forwarded by Maglev's pick with no entry, and a new window records again. Four bursts of new
/// flows in real time: two in the first window, one in each of the next two.
#[test]
fn the_flood_guard_forwards_by_maglev_without_recording() {
    const LIMIT: u32 = 50;
    const FLOWS: u16 = 400;
    const BURSTS: u16 = 4;
    let _timing = sluice_tests::timing_lock();
    pin_to_cpu(0);
    let port = |burst: u16, i: u16| 50000 + burst * FLOWS + i;
    // The picks of a table without a guard: where every flow must go with one.
    let mut free = harness(THREE);
    let picks: BTreeMap<u16, u8> = (0..BURSTS)
        .flat_map(|b| (0..FLOWS).map(move |i| port(b, i)))
        .map(|p| {
            (
                p,
                assert_forwarded(&mut free, &Frame::tcp(p, TCP_SYN).bytes()),
            )
        })
        .collect();

    let mut d = desired(Protocol::Tcp, THREE);
    d.settings.max_new_flows_per_cpu = LIMIT;
    let mut h = harness_with(&d);
    // One burst of new flows: each on Maglev's pick; returns the entries it added.
    let burst = |h: &mut Harness, b: u16| -> usize {
        let before = h.flow_entries().unwrap().len();
        for i in 0..FLOWS {
            let p = port(b, i);
            let syn = Frame::tcp(p, TCP_SYN).bytes();
            assert_eq!(
                assert_forwarded(h, &syn),
                picks[&p],
                "flow {p} left Maglev's pick"
            );
        }
        h.flow_entries().unwrap().len() - before
    };
    let in_time = |start: Instant, by: Duration, what: &str| {
        assert!(
            start.elapsed() < by,
            "{what} took past {by:?}: this machine is too slow now for the one-second \
             windows to be checked (run it alone)"
        );
    };
    // The window opens with the first new flow (no earlier one on this program).
    let t0 = Instant::now();
    let first = burst(&mut h, 0);
    in_time(t0, Duration::from_millis(400), "the first burst");
    std::thread::sleep(Duration::from_millis(500).saturating_sub(t0.elapsed()));
    let second = burst(&mut h, 1);
    in_time(t0, Duration::from_millis(950), "the second burst");
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(t0.elapsed()));
    let t2 = Instant::now();
    let third = burst(&mut h, 2);
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(t2.elapsed()));
    let fourth = burst(&mut h, 3);
    println!(
        "new flows recorded per burst of {FLOWS} with a limit of {LIMIT}/s: \
         {first}, {second} (same second), {third}, {fourth} (the next ones)"
    );
    let limit = LIMIT as usize;
    assert_eq!(first, limit, "entries of the first window's first burst");
    assert_eq!(second, 0, "entries of a burst in a full window");
    assert_eq!(third, limit, "entries of the second window");
    assert_eq!(fourth, limit, "entries of the third window");
    // The guard's counter says the same as the table.
    let entries = h.flow_entries().unwrap();
    let unrecorded = h.counter(GlobalCounter::FlowsNotRecorded).unwrap();
    assert_eq!(
        entries.len() as u64,
        u64::from(BURSTS * FLOWS) - unrecorded,
        "entries vs flows not counted as not recorded"
    );
    for (p, b) in &entries {
        assert_eq!(*b, Some(picks[p]), "the entry of port {p}");
    }
    // Unrecorded flows still keep their backend (Maglev's pick, the table unchanged).
    for (&p, &pick) in &picks {
        let ack = Frame::tcp(p, TCP_ACK).bytes();
        assert_eq!(assert_forwarded(&mut h, &ack), pick, "flow {p} moved");
    }
    // No limit: everything recorded again.
    d.settings.max_new_flows_per_cpu = 0;
    h.apply(&d).unwrap();
    let before = h.counter(GlobalCounter::FlowsNotRecorded).unwrap();
    let entries = h.flow_entries().unwrap().len();
    for p in 0..FLOWS {
        assert_forwarded(&mut h, &Frame::tcp(60000 + p, TCP_SYN).bytes());
    }
    assert_eq!(h.counter(GlobalCounter::FlowsNotRecorded).unwrap(), before);
    assert_eq!(
        h.flow_entries().unwrap().len(),
        entries + usize::from(FLOWS),
        "entries without a limit"
    );
}

#[test]
fn a_syn_under_the_flood_guard_removes_its_stale_entry() {
    pin_to_cpu(0);
    let mut d = desired(Protocol::Tcp, THREE);
    let mut h = harness_with(&d);
    let ports = ports_of(&mut h, 1, 10);
    d.vips[0].backends.make_mut()[1].drain = true;
    // A guard that records nothing more in this window.
    d.settings.max_new_flows_per_cpu = 1;
    h.apply(&d).unwrap();
    assert_forwarded(&mut h, &Frame::tcp(1, TCP_SYN).bytes());
    for &p in &ports {
        let fresh = assert_forwarded(&mut h, &Frame::tcp(p, TCP_SYN).bytes());
        assert_ne!(fresh, 1);
        // Not recorded, and the stale entry is gone: the ACK follows Maglev, like the SYN.
        assert_eq!(
            assert_forwarded(&mut h, &Frame::tcp(p, TCP_ACK).bytes()),
            fresh,
            "port {p}: the ACK followed the stale entry"
        );
    }
}
