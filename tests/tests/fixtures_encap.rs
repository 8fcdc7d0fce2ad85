//! Packet fixtures for `mode: ipip`: the balancer's IPIP / IP6IP6 / mixed encapsulation
//! (exact outer headers, checksums, per-flow outer sources), the ICMP "too big" it answers
//! with when the egress MTU is short, and the backend-side decapsulator, whose output for an
//! encapsulated frame must be exactly what L2 mode would have sent.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{DecapCounter, GlobalCounter};
use lb_userspace::model::{Desired, ForwardingMode, Protocol};
use sluice_tests::{
    fixtures::{
        CLIENT, CLIENT_MAC, CLIENT6, DecapHarness, FIXTURE_MTU, Frame, Harness, IP_DF, LB_MAC,
        TCP_ACK, TCP_SYN, VIP, VIP6, XDP_DROP, XDP_PASS, XDP_TX, backend_addr, backend_addr6,
        checksum_ok, desired_at, expected_l2, harness_with, pseudo_sum_v6,
    },
    require_root,
};

const THREE: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];

/// A VIP at `vip` in ipip mode whose backends are IPv4 (`v6_backends` false) or IPv6 nodes.
fn ipip(vip: IpAddr, v6_backends: bool) -> Desired {
    let family_of_backends = if v6_backends {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP)
    };
    let mut d = desired_at(family_of_backends, Protocol::Tcp, THREE);
    d.vips[0].key.addr = vip;
    d.vips[0].mode = ForwardingMode::Ipip;
    d
}

/// Checks an encapsulated frame: Ethernet to the backend's next hop, an outer header from the
/// encap source prefix to backend `i`'s node, and the input's IP packet unchanged after it.
/// Returns (backend, outer source).
fn check_encapsulated(input: &[u8], out: &[u8], outer_v6: bool) -> (u8, IpAddr) {
    let b = Harness::backend_of(out).expect("next hop MAC is a backend's");
    assert_eq!(&out[6..12], &LB_MAC);
    let inner = &input[14..];
    let inner_proto = if input[12..14] == [0x08, 0x00] { 4 } else { 41 };
    if outer_v6 {
        assert_eq!(&out[12..14], &[0x86, 0xdd]);
        let ip = &out[14..54];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]) as usize, inner.len());
        assert_eq!(ip[6], inner_proto, "next header");
        assert_eq!(ip[7], 64, "hop limit");
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        assert_eq!(dst, backend_addr6(b));
        assert_eq!(
            src.segments()[..7],
            [0xfd99, 0, 0, 0, 0, 0, 0],
            "in fd99::/120"
        );
        assert!(src.segments()[7] <= 0xff, "in fd99::/120");
        assert_eq!(&out[54..], inner, "inner packet untouched");
        (b, IpAddr::V6(src))
    } else {
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        let ip = &out[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]) as usize,
            20 + inner.len()
        );
        assert_eq!(ip[8], 64, "TTL");
        assert_eq!(ip[9], inner_proto, "protocol");
        assert!(checksum_ok(ip, 0), "outer header checksum");
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        assert_eq!(dst, backend_addr(b));
        assert_eq!(src.octets()[..3], [10, 99, 0], "in 10.99.0.0/24");
        assert_eq!(&out[34..], inner, "inner packet untouched");
        (b, IpAddr::V4(src))
    }
}

#[test]
fn ipip_ip6ip6_and_mixed_encapsulation() {
    // (VIP, IPv6 backend nodes?)
    for (vip, v6_backends) in [
        (IpAddr::V4(VIP), false),
        (IpAddr::V6(VIP6), true),
        (IpAddr::V4(VIP), true),
        (IpAddr::V6(VIP6), false),
    ] {
        let mut h = harness_with(&ipip(vip, v6_backends));
        let mut backends = BTreeSet::new();
        let mut sources = BTreeSet::new();
        for sport in 0..60u16 {
            let mut syn = Frame::tcp(30000 + sport, TCP_SYN);
            let mut ack = Frame::tcp(30000 + sport, TCP_ACK);
            if vip.is_ipv6() {
                syn = syn.v6();
                ack = ack.v6();
            }
            let syn = syn.bytes();
            let (action, out) = h.run(&syn).unwrap();
            assert_eq!(action, XDP_TX, "{vip} -> v6 nodes {v6_backends}");
            let (b, src) = check_encapsulated(&syn, &out, v6_backends);
            let (action, out) = h.run(&ack.bytes()).unwrap();
            assert_eq!(action, XDP_TX);
            let (b2, src2) = check_encapsulated(&ack.bytes(), &out, v6_backends);
            assert_eq!(
                (b2, src2),
                (b, src),
                "a flow keeps its backend and outer source"
            );
            backends.insert(b);
            sources.insert(src);
        }
        assert_eq!(backends.len(), 3);
        assert!(
            sources.len() > 20,
            "{vip} over v6 nodes {v6_backends}: outer sources vary per flow (RSS): {} of 60 {sources:?}",
            sources.len()
        );
    }
}

/// A TCP segment from the client with `payload` bytes, DF set.
fn big_segment(payload: usize, v6: bool) -> Frame {
    let mut f = Frame::tcp(45000, TCP_ACK);
    f.payload = vec![0x5a; payload];
    f.frag_off = IP_DF;
    if v6 { f.v6() } else { f }
}

#[test]
fn too_big_to_encapsulate_gets_icmp_frag_needed() {
    let mut h = harness_with(&ipip(IpAddr::V4(VIP), false));
    // 20 + 20 + 1440 = 1480: fits once wrapped (1500).
    let fits = big_segment(1440, false).bytes();
    assert_eq!(h.run(&fits).unwrap().0, XDP_TX);
    // One byte more: the client hears "fragmentation needed, MTU 1480".
    let input = big_segment(1441, false).bytes();
    let (action, out) = h.run(&input).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(out.len(), 14 + 20 + 8 + 68, "IP + ICMP + 68 quoted bytes");
    assert_eq!(&out[..6], &CLIENT_MAC);
    assert_eq!(&out[6..12], &LB_MAC);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(&ip[12..16], &VIP.octets(), "from the VIP");
    assert_eq!(&ip[16..20], &CLIENT.octets(), "to the client");
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, out.len() - 14);
    assert!(checksum_ok(ip, 0), "IP checksum");
    let icmp = &out[34..];
    assert_eq!(
        (icmp[0], icmp[1]),
        (3, 4),
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(
        u16::from_be_bytes([icmp[6], icmp[7]]),
        FIXTURE_MTU as u16 - 20
    );
    assert_eq!(
        &icmp[8..],
        &input[14..14 + 68],
        "quotes the offending packet"
    );
    assert!(checksum_ok(icmp, 0), "ICMP checksum");
    assert_eq!(h.counter(GlobalCounter::IcmpTooBigSent).unwrap(), 1);
    // Without DF the sender allowed fragmentation we cannot do: dropped and counted.
    let mut no_df = big_segment(1441, false);
    no_df.frag_off = 0;
    assert_eq!(h.run(&no_df.bytes()).unwrap().0, XDP_DROP);
    assert_eq!(h.counter(GlobalCounter::DropTooBig).unwrap(), 1);
}

#[test]
fn too_big_to_encapsulate_gets_icmpv6_packet_too_big() {
    // An IPv6 VIP behind IPv6 nodes: 40 bytes of overhead.
    let mut h = harness_with(&ipip(IpAddr::V6(VIP6), true));
    let fits = big_segment(1500 - 40 - 40 - 20, true).bytes();
    assert_eq!(h.run(&fits).unwrap().0, XDP_TX);
    let input = big_segment(1500 - 40 - 40 - 20 + 1, true).bytes();
    let (action, out) = h.run(&input).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(out.len(), 14 + 40 + 8 + 128);
    assert_eq!(&out[..6], &CLIENT_MAC);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    let ip = &out[14..54];
    assert_eq!(ip[6], 58, "ICMPv6");
    assert_eq!(&ip[8..24], &VIP6.octets());
    assert_eq!(&ip[24..40], &CLIENT6.octets());
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 8 + 128);
    let icmp = &out[54..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
    assert_eq!(
        u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        FIXTURE_MTU - 40
    );
    assert_eq!(&icmp[8..], &input[14..14 + 128]);
    assert!(checksum_ok(
        icmp,
        pseudo_sum_v6(VIP6, CLIENT6, icmp.len(), 58)
    ));
    // An IPv4 VIP behind IPv6 nodes is told MTU - 40 too.
    let mut mixed = harness_with(&ipip(IpAddr::V4(VIP), true));
    let (action, out) = mixed.run(&big_segment(1441 - 20, false).bytes()).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(
        u16::from_be_bytes([out[40], out[41]]),
        FIXTURE_MTU as u16 - 40
    );
}

fn local_nodes() -> Vec<IpAddr> {
    (0..3)
        .flat_map(|i| [IpAddr::V4(backend_addr(i)), IpAddr::V6(backend_addr6(i))])
        .collect()
}

#[test]
fn decapsulation_restores_what_l2_mode_would_send() {
    require_root();
    let mut decap =
        DecapHarness::new(&["10.99.0.0/24", "fd99::/120"], &local_nodes()).expect("decap");
    for (vip, v6_backends) in [
        (IpAddr::V4(VIP), false),
        (IpAddr::V6(VIP6), true),
        (IpAddr::V4(VIP), true),
        (IpAddr::V6(VIP6), false),
    ] {
        let mut h = harness_with(&ipip(vip, v6_backends));
        for sport in 0..10u16 {
            let mut f = Frame::tcp(20000 + sport, TCP_ACK);
            f.payload = b"payload".to_vec();
            if vip.is_ipv6() {
                f = f.v6();
            }
            let input = f.bytes();
            let (_, wrapped) = h.run(&input).unwrap();
            let b = Harness::backend_of(&wrapped).unwrap();
            let (action, out) = decap.run(&wrapped).unwrap();
            assert_eq!(action, XDP_PASS);
            assert_eq!(
                out,
                expected_l2(&input, b),
                "{vip} over v6 nodes {v6_backends}"
            );
        }
    }
    assert_eq!(decap.counter(DecapCounter::Decapsulated).unwrap(), 40);
}

#[test]
fn decapsulator_refuses_strangers_and_ignores_the_rest() {
    require_root();
    let mut decap = DecapHarness::new(&["10.99.0.0/24"], &local_nodes()).expect("decap");
    let mut h = harness_with(&ipip(IpAddr::V4(VIP), false));
    let input = Frame::tcp(1, TCP_SYN).bytes();
    let (_, wrapped) = h.run(&input).unwrap();
    // From outside the allowed prefix: dropped, counted.
    let mut spoofed = wrapped.clone();
    spoofed[14 + 12..14 + 16].copy_from_slice(&[192, 0, 2, 66]);
    let sum_at = 14 + 10;
    spoofed[sum_at..sum_at + 2].copy_from_slice(&[0, 0]);
    let sum = sluice_tests::fixtures::checksum(&spoofed[14..34], 0);
    spoofed[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    let (action, _) = decap.run(&spoofed).unwrap();
    assert_eq!(action, XDP_DROP);
    assert_eq!(decap.counter(DecapCounter::DropSource).unwrap(), 1);
    // Addressed to another node: not ours to unwrap, passed untouched.
    let mut elsewhere = wrapped.clone();
    elsewhere[14 + 19] = 99;
    let (action, out) = decap.run(&elsewhere).unwrap();
    assert_eq!((action, out), (XDP_PASS, elsewhere));
    // IP6IP6 from fd99:: is not allowed here (only the IPv4 prefix is): dropped.
    let mut h6 = harness_with(&ipip(IpAddr::V6(VIP6), true));
    let (_, wrapped6) = h6.run(&Frame::tcp(2, TCP_SYN).v6().bytes()).unwrap();
    assert_eq!(decap.run(&wrapped6).unwrap().0, XDP_DROP);
    // Plain traffic and a truncated inner header.
    let (action, out) = decap.run(&input).unwrap();
    assert_eq!((action, out), (XDP_PASS, input));
    let (action, _) = decap.run(&wrapped[..14 + 20]).unwrap();
    assert_eq!(action, XDP_DROP);
    assert_eq!(decap.counter(DecapCounter::DropMalformed).unwrap(), 1);
}

/// An encapsulated frame built by hand, the way a kernel tunnel (`ipip`, `sit`, `ip6tnl`) or
/// another load balancer sends it, without sluice's encapsulator: a bug that encapsulator and
/// decapsulator share (an offset, a length, a family mix-up) cannot hide behind a round trip.
/// The outer header carries what those senders set and sluice does not: an IP id, a TTL other
/// than sluice's, DF, an IPv6 traffic class and flow label.
fn hand_wrapped(inner: &Frame, outer_src: IpAddr, outer_dst: IpAddr) -> (Vec<u8>, Vec<u8>) {
    let packet = inner.ip_packet();
    let inner_v6 = packet[0] >> 4 == 6;
    let mut outer = Vec::new();
    match (outer_src, outer_dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = (20 + packet.len()) as u16;
            outer.extend_from_slice(&[0x45, 0x00]);
            outer.extend_from_slice(&total.to_be_bytes());
            outer.extend_from_slice(&0xbeefu16.to_be_bytes()); // id
            outer.extend_from_slice(&IP_DF.to_be_bytes());
            outer.push(17); // a TTL that already crossed some hops
            outer.push(if inner_v6 { 41 } else { 4 });
            outer.extend_from_slice(&[0, 0]);
            outer.extend_from_slice(&src.octets());
            outer.extend_from_slice(&dst.octets());
            let sum = sluice_tests::fixtures::checksum(&outer, 0);
            outer[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            // Version 6, traffic class 0, flow label 0xabcde (as ip6tnl derives one).
            outer.extend_from_slice(&0x600a_bcdeu32.to_be_bytes());
            outer.extend_from_slice(&(packet.len() as u16).to_be_bytes());
            outer.push(if inner_v6 { 41 } else { 4 });
            outer.push(33);
            outer.extend_from_slice(&src.octets());
            outer.extend_from_slice(&dst.octets());
        }
        _ => panic!("outer addresses of one family"),
    }
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0x02, 0xbe, 0, 0, 0, 0]); // to the backend node
    frame.extend_from_slice(&[0x02, 0x42, 0, 0, 0, 0x99]); // from a router
    frame.extend_from_slice(if outer_src.is_ipv6() {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    frame.extend_from_slice(&outer);
    frame.extend_from_slice(&packet);
    // What the decapsulator must hand to the stack: the same Ethernet addresses, the inner
    // family's ethertype, the inner packet byte for byte.
    let mut unwrapped = frame[..12].to_vec();
    unwrapped.extend_from_slice(if inner_v6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    unwrapped.extend_from_slice(&packet);
    (frame, unwrapped)
}

#[test]
fn decapsulator_unwraps_hand_built_ipip_and_ip6ip6() {
    require_root();
    let mut decap =
        DecapHarness::new(&["10.99.0.0/24", "fd99::/120"], &local_nodes()).expect("decap");
    let lb4: IpAddr = "10.99.0.77".parse().unwrap();
    let lb6: IpAddr = "fd99::77".parse().unwrap();
    let node4 = IpAddr::V4(backend_addr(1));
    let node6 = IpAddr::V6(backend_addr6(2));
    let mut tcp = Frame::tcp(41000, TCP_ACK);
    tcp.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    let udp = Frame::udp(41001, b"");
    let mut decapsulated = 0;
    for inner in [tcp.clone(), udp.clone(), tcp.v6(), udp.v6()] {
        for (src, dst) in [(lb4, node4), (lb6, node6)] {
            let (frame, want) = hand_wrapped(&inner, src, dst);
            let what = format!("{} in {}", inner.dst, dst);
            let (action, out) = decap.run(&frame).unwrap();
            assert_eq!(action, XDP_PASS, "{what}");
            assert_eq!(out, want, "{what}: not exactly the inner packet");
            decapsulated += 1;
            // From outside the allowed prefixes: dropped, whatever the inner packet.
            let stranger = if src.is_ipv4() {
                "192.0.2.77".parse().unwrap()
            } else {
                "2001:db8::77".parse().unwrap()
            };
            let (frame, _) = hand_wrapped(&inner, stranger, dst);
            assert_eq!(
                decap.run(&frame).unwrap().0,
                XDP_DROP,
                "{what} from {stranger}"
            );
            // To a node that is not this one: passed as it came.
            let other = if dst.is_ipv4() {
                "10.0.1.99".parse().unwrap()
            } else {
                "fd00:1::99".parse().unwrap()
            };
            let (frame, _) = hand_wrapped(&inner, src, other);
            let (action, out) = decap.run(&frame).unwrap();
            assert_eq!((action, out), (XDP_PASS, frame), "{what} to {other}");
        }
    }
    assert_eq!(
        decap.counter(DecapCounter::Decapsulated).unwrap(),
        decapsulated
    );
    assert_eq!(
        decap.counter(DecapCounter::DropSource).unwrap(),
        decapsulated
    );
}

/// README: "the IPv6 flow label come[s] from a hash of the client's address and ports": one flow
/// keeps one label (so routers keep its packets on one path), and flows that differ only in a
/// port or only in the client address get different labels (so ECMP spreads them).
#[test]
fn ip6ip6_flow_label_follows_the_flow() {
    let mut h = harness_with(&ipip(IpAddr::V6(VIP6), true));
    let label = |h: &mut Harness, src: IpAddr, sport: u16, flags: u8| -> u32 {
        let mut f = Frame::tcp(sport, flags).v6();
        f.src = src;
        let (action, out) = h.run(&f.bytes()).unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(out[14] >> 4, 6, "an outer IPv6 header");
        u32::from_be_bytes([out[14], out[15], out[16], out[17]]) & 0x000f_ffff
    };
    let client = IpAddr::V6(CLIENT6);
    let mut by_port = BTreeSet::new();
    for sport in 0..200u16 {
        let first = label(&mut h, client, 40000 + sport, TCP_SYN);
        assert_eq!(
            label(&mut h, client, 40000 + sport, TCP_ACK),
            first,
            "one flow, one label"
        );
        by_port.insert(first);
    }
    let mut by_client = BTreeSet::new();
    for i in 0..200u16 {
        let src = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, i));
        by_client.insert(label(&mut h, src, 40000, TCP_SYN));
    }
    // 200 draws from 2^20 labels collide with probability ~2 %; allow a few.
    assert!(
        by_port.len() >= 195 && by_client.len() >= 195,
        "labels are not a hash of ports and address: {} distinct over 200 ports, {} over 200 \
         clients",
        by_port.len(),
        by_client.len()
    );
    assert!(!by_port.contains(&0), "a flow without a label");
}
