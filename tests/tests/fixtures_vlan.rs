//! 802.1Q fixtures (issue 29, "Interfaces"): the XDP program on a VLAN's parent interface sees
//! the VLAN's frames tagged. A tagged frame to a VIP is balanced exactly as the untagged one
//! (the same pick) and leaves with its tag: L2 DSR rewrites the MACs only, IPIP/IP6IP6 puts
//! the outer header after the tag, ICMP answers and ARP/NDP replies go back tagged with the
//! same TCI, the decapsulator keeps the tag. Everything else tagged, QinQ, and truncated tags
//! pass untouched (docs/design.md, "VLANs and bonds").
//!
//! Most checks compare against the untagged run of the same frame on a fresh harness: the
//! tagged output, its tag removed, must be byte for byte the untagged output.

use std::net::IpAddr;

use lb_common::{DecapCounter, GlobalCounter};
use lb_userspace::model::{Desired, ForwardingMode, Protocol};
use sluice_tests::fixtures::{
    Arp, CLIENT, CLIENT_MAC, DecapHarness, Frame, Harness, IP_DF, Ndp, TCP_ACK, TCP_SYN,
    TPID_8021AD, TPID_8021Q, VIP, VIP6, XDP_PASS, XDP_TX, backend_addr, backend_addr6, desired_at,
    expected_l2, harness_with, vlan_tagged, vlan_untagged, with_tag,
};

const THREE: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];
/// Priority 5, VLAN 200: a TCI whose priority bits a parser that masks or rewrites the tag
/// would lose.
const TCI: u16 = 0xa0c8;
const OURS: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

/// A VIP at `vip` in ipip mode whose backends are IPv4 (`v6_backends` false) or IPv6 nodes.
fn ipip(vip: IpAddr, v6_backends: bool) -> Desired {
    let nodes = if v6_backends {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP)
    };
    let mut d = desired_at(nodes, Protocol::Tcp, THREE);
    d.vips[0].key.addr = vip;
    d.vips[0].mode = ForwardingMode::Ipip;
    d
}

/// Runs `input` untagged on one fresh harness of `desired` and tagged on another: same
/// verdict, and the tagged output is the untagged one with the tag kept. Returns the verdict
/// and the untagged output.
fn same_as_untagged(desired: &Desired, input: &[u8]) -> (u32, Vec<u8>) {
    let (mut plain, mut tagged) = (harness_with(desired), harness_with(desired));
    let (action, out) = plain.run(input).expect("test run");
    let (tagged_action, tagged_out) = tagged.run(&vlan_tagged(input, TCI)).expect("test run");
    assert_eq!(
        tagged_action, action,
        "the verdict does not depend on the tag"
    );
    assert_eq!(
        vlan_untagged(&tagged_out, TCI),
        out,
        "the tagged output is the untagged one, tag kept"
    );
    (action, out)
}

#[test]
fn tagged_tcp_to_a_vip_is_balanced_as_untagged_and_keeps_its_tag() {
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let desired = desired_at(vip, Protocol::Tcp, THREE);
        let (mut plain, mut tagged) = (harness_with(&desired), harness_with(&desired));
        let mut picks = std::collections::BTreeSet::new();
        for sport in 1000..1064u16 {
            let mut f = Frame::tcp(sport, TCP_SYN);
            if vip.is_ipv6() {
                f = f.v6();
            }
            let input = f.bytes();
            let (action, out) = plain.run(&input).unwrap();
            assert_eq!(action, XDP_TX);
            let pick = Harness::backend_of(&out).unwrap();
            // The golden check: the pick of the tagged flow is the untagged flow's.
            let (action, out) = tagged.run(&vlan_tagged(&input, TCI)).unwrap();
            assert_eq!(action, XDP_TX, "{vip} sport {sport}: a tagged VIP packet");
            assert_eq!(
                vlan_untagged(&out, TCI),
                expected_l2(&input, pick),
                "{vip} sport {sport}: the same pick, only the MACs rewritten"
            );
            picks.insert(pick);
            // The connection table's path (an ACK of the recorded flow) keeps the tag too.
            f.tcp_flags = TCP_ACK;
            let ack = vlan_tagged(&f.bytes(), TCI);
            let (action, out) = tagged.run(&ack).unwrap();
            assert_eq!(action, XDP_TX);
            assert_eq!(
                vlan_untagged(&out, TCI),
                expected_l2(&f.bytes(), pick),
                "{vip} sport {sport}: the established flow's pick"
            );
        }
        assert_eq!(picks.len(), 3, "{vip}: the flows spread over the backends");
        assert_eq!(tagged.counter(GlobalCounter::FlowHit).unwrap(), 64);
    }
}

#[test]
fn tagged_ipip_and_ip6ip6_put_the_outer_header_after_the_tag() {
    for (vip, v6_backends) in [
        (IpAddr::V4(VIP), false),
        (IpAddr::V6(VIP6), true),
        (IpAddr::V4(VIP), true),
        (IpAddr::V6(VIP6), false),
    ] {
        for sport in [1u16, 2000, 40000] {
            let mut f = Frame::tcp(sport, TCP_SYN);
            f.payload = b"payload".to_vec();
            if vip.is_ipv6() {
                f = f.v6();
            }
            let input = f.bytes();
            let (action, out) = same_as_untagged(&ipip(vip, v6_backends), &input);
            assert_eq!(action, XDP_TX, "{vip} over v6 nodes {v6_backends}");
            // The untagged output is the encapsulated frame (fixtures_encap checks it in
            // full): after the tag came the outer header's EtherType, then the inner packet
            // at its end.
            let outer = if v6_backends {
                [0x86, 0xdd]
            } else {
                [0x08, 0x00]
            };
            assert_eq!(&out[12..14], &outer);
            assert!(out.ends_with(&input[14..]), "the inner packet untouched");
        }
    }
}

#[test]
fn tagged_decapsulation_keeps_the_tag() {
    let local: Vec<IpAddr> = (0..3)
        .flat_map(|i| [IpAddr::V4(backend_addr(i)), IpAddr::V6(backend_addr6(i))])
        .collect();
    let mut decap = DecapHarness::new(&["10.99.0.0/24", "fd99::/120"], &local).expect("decap");
    for (vip, v6_backends) in [(IpAddr::V4(VIP), false), (IpAddr::V6(VIP6), true)] {
        let mut h = harness_with(&ipip(vip, v6_backends));
        let mut f = Frame::tcp(20000, TCP_ACK);
        if vip.is_ipv6() {
            f = f.v6();
        }
        let input = f.bytes();
        let (_, wrapped) = h.run(&vlan_tagged(&input, TCI)).unwrap();
        let b = Harness::backend_of(&wrapped).unwrap();
        let (action, out) = decap.run(&wrapped).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(
            vlan_untagged(&out, TCI),
            expected_l2(&input, b),
            "{vip}: what L2 mode would have sent, on the same VLAN"
        );
    }
    assert_eq!(decap.counter(DecapCounter::Decapsulated).unwrap(), 2);
}

#[test]
fn tagged_icmp_answers_go_back_tagged() {
    // Too big to encapsulate (IPv4 and IPv6): "fragmentation needed" / "packet too big".
    for (vip, payload) in [(IpAddr::V4(VIP), 1441), (IpAddr::V6(VIP6), 1401)] {
        let mut f = Frame::tcp(45000, TCP_ACK);
        f.payload = vec![0x5a; payload];
        f.frag_off = IP_DF;
        if vip.is_ipv6() {
            f = f.v6();
        }
        let input = f.bytes();
        let (action, out) = same_as_untagged(&ipip(vip, vip.is_ipv6()), &input);
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[..6], &CLIENT_MAC, "{vip}: back to the client");
        let quote = if vip.is_ipv4() { 68 } else { 128 };
        assert!(
            out.ends_with(&input[14..14 + quote]),
            "{vip}: quotes the offending packet"
        );
    }
    // Echo requests to a VIP address.
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let mut ping = Frame::icmp(8, 0, [0, 1, 0, 1], b"ping");
        if vip.is_ipv6() {
            ping = ping.v6();
            ping.icmp.as_mut().unwrap().kind = 128;
        }
        let (action, out) = same_as_untagged(&desired_at(vip, Protocol::Tcp, THREE), &ping.bytes());
        assert_eq!(action, XDP_TX, "{vip}: an echo reply");
        assert_eq!(&out[..6], &CLIENT_MAC);
    }
}

#[test]
fn tagged_arp_and_neighbor_solicitation_are_answered_on_their_vlan() {
    let announcing = |vip: IpAddr| {
        let mut h = harness_with(&desired_at(vip, Protocol::Tcp, THREE));
        h.maps
            .announce_address(vip, OURS)
            .expect("writing ANNOUNCE");
        h
    };
    let mut h = announcing(IpAddr::V4(VIP));
    let (action, out) = h
        .run(&vlan_tagged(&Arp::request(VIP).bytes(), TCI))
        .unwrap();
    assert_eq!(action, XDP_TX, "a tagged request for an announced VIP");
    let reply = Arp {
        eth_dst: CLIENT_MAC,
        eth_src: OURS,
        op: 2,
        sha: OURS,
        spa: VIP,
        tha: CLIENT_MAC,
        tpa: CLIENT,
    };
    assert_eq!(vlan_untagged(&out, TCI), reply.bytes(), "the reply, tagged");
    assert_eq!(h.counter(GlobalCounter::ArpReply).unwrap(), 1);

    let mut h = announcing(IpAddr::V6(VIP6));
    // A multicast solicitation with the source link-layer option, and a unicast probe
    // without it (the advertisement grows by 8 bytes after the tag).
    for ns in [Ndp::solicit(VIP6), Ndp::probe(VIP6, OURS)] {
        let (action, out) = h.run(&vlan_tagged(&ns.bytes(), TCI)).unwrap();
        assert_eq!(action, XDP_TX, "a tagged solicitation for an announced VIP");
        assert_eq!(
            vlan_untagged(&out, TCI),
            Ndp::advert(VIP6, OURS).bytes(),
            "the advertisement, tagged"
        );
    }
    assert_eq!(h.counter(GlobalCounter::NeighborAdvert).unwrap(), 2);
}

#[test]
fn tagged_frames_not_for_a_vip_pass_byte_for_byte() {
    let mut h = harness_with(&desired_at(IpAddr::V4(VIP), Protocol::Tcp, THREE));
    let mut other = Frame::tcp(1000, TCP_SYN);
    other.dst = IpAddr::V4(backend_addr(0));
    let mut other6 = Frame::tcp(1000, TCP_SYN).v6();
    other6.dst = IpAddr::V6(backend_addr6(0));
    let mut udp_other_port = Frame::udp(1000, b"x");
    udp_other_port.dport = 53;
    for input in [
        other.bytes(),
        other6.bytes(),
        udp_other_port.bytes(),
        // ARP for an address this node does not announce.
        Arp::request(VIP).bytes(),
    ] {
        let tagged = vlan_tagged(&input, TCI);
        let (action, out) = h.run(&tagged).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, tagged, "untouched, tag included");
    }
}

#[test]
fn truncated_tags_pass_and_truncated_tagged_packets_fare_as_untagged() {
    let mut plain = harness_with(&desired_at(IpAddr::V4(VIP), Protocol::Tcp, THREE));
    let mut tagged = harness_with(&desired_at(IpAddr::V4(VIP), Protocol::Tcp, THREE));
    let input = Frame::tcp(1000, TCP_SYN).bytes();
    let full = vlan_tagged(&input, TCI);
    // A tag cut short (14 to 17 bytes): not a frame sluice acts on.
    for len in 14..18 {
        let (action, out) = tagged.run(&full[..len]).unwrap();
        assert_eq!((action, &out[..]), (XDP_PASS, &full[..len]), "{len} bytes");
    }
    // Every cut after the tag: the verdict of the same cut untagged, and never forwarded.
    for len in 18..full.len() {
        let (action, out) = tagged.run(&full[..len]).unwrap();
        let (plain_action, _) = plain.run(&input[..len - 4]).unwrap();
        assert_eq!(action, plain_action, "{len} bytes");
        assert_ne!(
            action, XDP_TX,
            "{len} bytes: a truncated packet is never forwarded"
        );
        if action == XDP_PASS {
            assert_eq!(out, &full[..len], "{len} bytes: passed untouched");
        }
    }
    assert!(tagged.counter(GlobalCounter::DropMalformed).unwrap() > 0);
    assert_eq!(tagged.counter(GlobalCounter::Tx).unwrap(), 0);
}

#[test]
fn qinq_passes_untouched_even_to_a_vip() {
    // Decided in docs/design.md: one tag is parsed; a second one is the kernel's business.
    let mut h = harness_with(&desired_at(IpAddr::V4(VIP), Protocol::Tcp, THREE));
    h.maps
        .announce_address(IpAddr::V4(VIP), OURS)
        .expect("writing ANNOUNCE");
    for input in [Frame::tcp(1000, TCP_SYN).bytes(), Arp::request(VIP).bytes()] {
        let inner = vlan_tagged(&input, 100);
        for qinq in [
            // 802.1ad service tag outside a customer tag, and a customer tag twice.
            with_tag(&inner, TPID_8021AD, 7),
            with_tag(&inner, TPID_8021Q, 7),
            // A lone 802.1ad tag.
            with_tag(&input, TPID_8021AD, 7),
        ] {
            let (action, out) = h.run(&qinq).unwrap();
            assert_eq!((action, &out), (XDP_PASS, &qinq));
        }
    }
    assert_eq!(h.counter(GlobalCounter::Passed).unwrap(), 6);
}
