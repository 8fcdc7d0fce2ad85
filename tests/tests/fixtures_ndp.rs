//! Neighbor Discovery fixtures (lb-ebpf/src/ndp.rs): a Neighbor Solicitation for an IPv6 VIP
//! this node announces becomes, in the XDP program, the exact Neighbor Advertisement a host
//! would send; everything else about Neighbor Discovery goes to the kernel untouched.

use std::net::{IpAddr, Ipv6Addr};

use lb_common::GlobalCounter;
use lb_userspace::model::Protocol;
use sluice_tests::fixtures::{
    CLIENT_MAC, CLIENT6, Frame, Harness, LB_MAC, ND_ADVERT, Ndp, TCP_SYN, VIP, VIP6, XDP_PASS,
    XDP_TX, assert_forwarded, assert_untouched, backend_addr6, checksum_ok, desired_at,
    harness_with, pseudo_sum_v6,
};

const OURS: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

/// The IPv6 VIP with three backends, announced by this node with `OURS` (as
/// `sluice agent --announce` writes it when this node wins the VIP's Lease).
fn announcing() -> Harness {
    let desired = desired_at(
        IpAddr::V6(VIP6),
        Protocol::Tcp,
        &[(0, 1, false), (1, 1, false), (2, 1, false)],
    );
    let mut h = harness_with(&desired);
    h.maps
        .announce_address(VIP6.into(), OURS)
        .expect("writing ANNOUNCE");
    h
}

/// The advertisement for VIP6 at OURS to the client, spelled out byte by byte with its
/// checksum computed outside this code base (Python, RFC 1071 over the pseudo-header), so
/// that neither the program nor the test's builder can hide a field or checksum error.
const EXPECTED_NA: [u8; 86] = [
    // Ethernet: to the client, from our MAC, IPv6.
    0x02, 0x00, 0x00, 0x00, 0x00, 0xc1, 0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x86, 0xdd,
    // IPv6: version 6, payload 32, ICMPv6, hop limit 255, fd00:100::1 -> fd00::1.
    0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, //
    0xfd, 0x00, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
    0xfd, 0x00, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
    // ICMPv6 136, code 0, checksum 0x8038, flags Solicited|Override, target fd00:100::1.
    0x88, 0x00, 0x80, 0x38, 0x60, 0x00, 0x00, 0x00, //
    0xfd, 0x00, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
    // Target link-layer address option: our MAC.
    0x02, 0x01, 0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
];

#[test]
fn solicitation_for_announced_vip_is_answered_with_the_exact_advertisement() {
    let mut h = announcing();
    let ns = Ndp::solicit(VIP6).bytes();
    assert_eq!(ns.len(), 86);
    let (action, out) = h.run(&ns).expect("test run");
    assert_eq!(
        action, XDP_TX,
        "an announced address's solicitation is answered"
    );
    assert_eq!(out, EXPECTED_NA, "exactly the advertisement");
    // The builder agrees with the literal bytes, and the checksum verifies.
    assert_eq!(out, Ndp::advert(VIP6, OURS).bytes());
    assert!(checksum_ok(
        &out[54..],
        pseudo_sum_v6(VIP6, CLIENT6, 32, 58)
    ));
    assert_eq!(h.counter(GlobalCounter::NeighborAdvert).unwrap(), 1);
    assert_eq!(h.counter(GlobalCounter::Passed).unwrap(), 0);
}

#[test]
fn unicast_probe_without_option_grows_into_the_same_advertisement() {
    let mut h = announcing();
    // Reachability confirmation: to the VIP itself, 8 bytes shorter (no option).
    let probe = Ndp::probe(VIP6, OURS).bytes();
    assert_eq!(probe.len(), 78);
    let (action, out) = h.run(&probe).expect("test run");
    assert_eq!(action, XDP_TX);
    assert_eq!(out, EXPECTED_NA);
    // Trailing bytes after the IPv6 packet (Ethernet padding) are cut off.
    let mut padded = Ndp::solicit(VIP6).bytes();
    padded.extend_from_slice(&[0xee; 10]);
    let (action, out) = h.run(&padded).expect("test run");
    assert_eq!(action, XDP_TX);
    assert_eq!(out, EXPECTED_NA);
    assert_eq!(h.counter(GlobalCounter::NeighborAdvert).unwrap(), 2);
}

#[test]
fn solicitations_that_must_not_be_answered_pass_untouched() {
    let mut h = announcing();
    let mut cases: Vec<(&str, Ndp)> = Vec::new();
    let other = backend_addr6(0);
    cases.push((
        "an address this node does not announce",
        Ndp::solicit(other),
    ));
    let mut c = Ndp::solicit(VIP6);
    c.src = Ipv6Addr::UNSPECIFIED;
    c.option = None;
    cases.push(("duplicate address detection (source ::)", c));
    let mut c = Ndp::solicit(VIP6);
    c.hop_limit = 64;
    cases.push(("hop limit 64: it was routed", c));
    let mut c = Ndp::solicit(VIP6);
    c.code = 1;
    cases.push(("ICMPv6 code 1", c));
    let mut c = Ndp::solicit(VIP6);
    c.bad_checksum = true;
    cases.push(("a wrong checksum", c));
    let mut c = Ndp::solicit(VIP6);
    c.dst = Ndp::solicited_node(other);
    cases.push(("to another solicited-node group", c));
    let mut c = Ndp::solicit(VIP6);
    c.dst = "ff02::1".parse().unwrap();
    cases.push(("to all nodes", c));
    let mut c = Ndp::solicit(VIP6);
    c.extra = vec![14, 1, 1, 2, 3, 4, 5, 6];
    cases.push(("a second option (a nonce: 40 bytes of ICMPv6)", c));
    let mut c = Ndp::probe(VIP6, OURS);
    c.extra = vec![14, 0, 1, 2, 3, 4, 5, 6];
    cases.push(("an option of length 0", c));
    let mut c = Ndp::advert(VIP6, CLIENT_MAC);
    c.eth_dst = LB_MAC;
    cases.push(("an advertisement for the VIP (someone else's answer)", c));
    let mut c = Ndp::solicit(VIP6);
    c.kind = ND_ADVERT + 1;
    cases.push(("a redirect", c));
    for (what, ndp) in &cases {
        let frame = ndp.bytes();
        let (action, out) = h.run(&frame).expect("test run");
        assert_eq!((action, out == frame), (XDP_PASS, true), "{what}");
    }
    // Truncated (every cut short of the 78 bytes of the shortest solicitation), or a payload
    // length beyond the frame: malformed, never answered (the program drops malformed IPv6).
    let full = Ndp::solicit(VIP6).bytes();
    let mut long = full.clone();
    long[19] = 40;
    for frame in [77, 70, 60, 54, 40, 14]
        .map(|len| full[..len].to_vec())
        .into_iter()
        .chain([long])
    {
        let (action, _) = h.run(&frame).expect("test run");
        assert_ne!(action, XDP_TX, "{} bytes", frame.len());
    }
    assert_eq!(h.counter(GlobalCounter::NeighborAdvert).unwrap(), 0);

    // The VIP's own traffic is still balanced.
    let mut syn = Frame::tcp(40000, TCP_SYN).v6();
    syn.dst = IpAddr::V6(VIP6);
    assert_forwarded(&mut h, &syn.bytes());

    // An IPv4 VIP in ANNOUNCE answers no IPv6 solicitation, and once the IPv6 entry is gone
    // (lease lost) the VIP's solicitations pass too.
    h.maps
        .withdraw_address(VIP6.into())
        .expect("removing from ANNOUNCE");
    h.maps
        .announce_address(VIP.into(), OURS)
        .expect("writing ANNOUNCE");
    assert_untouched(&mut h, &Ndp::solicit(VIP6).bytes(), XDP_PASS);
    assert_eq!(h.counter(GlobalCounter::NeighborAdvert).unwrap(), 0);
}
