//! Backends shared by VIPs (issue 27), through the real program: a connection-table entry is
//! followed only while its VIP id still names its VIP and its backend is still one of that
//! VIP's (a member of the VIP's current table). One backend entry serves several VIPs, so
//! removing a backend from one VIP frees nothing: the membership check alone makes that VIP's
//! flows re-hash, while the other VIP's flows to the same backend stay. Needs root.

use std::net::{IpAddr, Ipv4Addr};

use lb_userspace::model::{Desired, Protocol};
use sluice_tests::fixtures::{
    Frame, Harness, TCP_ACK, TCP_SYN, XDP_PASS, assert_forwarded, desired_at,
};

const A: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
const ALL: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];
const NOT_1: &[(u8, u32, bool)] = &[(0, 1, false), (2, 1, false)];

/// VIP A with backends `a`, VIP B with `b` (none: B is not configured).
fn two_vips(a: &[(u8, u32, bool)], b: Option<&[(u8, u32, bool)]>) -> Desired {
    let mut d = desired_at(IpAddr::V4(A), Protocol::Tcp, a);
    if let Some(b) = b {
        d.vips
            .extend(desired_at(IpAddr::V4(B), Protocol::Tcp, b).vips);
    }
    d
}

fn frame(vip: Ipv4Addr, port: u16, flags: u8) -> Vec<u8> {
    let mut f = Frame::tcp(port, flags);
    f.dst = IpAddr::V4(vip);
    f.bytes()
}

/// Ports of 200 connections to `vip` and the backend each went to.
fn connect(h: &mut Harness, vip: Ipv4Addr) -> Vec<(u16, u8)> {
    (0..200u16)
        .map(|i| {
            let port = 30000 + i;
            (port, assert_forwarded(h, &frame(vip, port, TCP_SYN)))
        })
        .collect()
}

#[test]
fn a_backend_left_by_one_vip_keeps_the_other_vips_flows() {
    let mut h = Harness::new().expect("load the XDP object");
    h.apply(&two_vips(ALL, Some(ALL))).expect("two VIPs");
    let on_a = connect(&mut h, A);
    let on_b = connect(&mut h, B);
    assert!(on_a.iter().any(|(_, b)| *b == 1) && on_b.iter().any(|(_, b)| *b == 1));
    // Backend 1 leaves VIP A only: its entry stays (B has it), A's table no longer does.
    let summary = h.apply(&two_vips(NOT_1, Some(ALL))).expect("1 leaves A");
    assert_eq!(summary.backends_removed, 0, "B still has it: {summary}");
    for (port, was) in &on_a {
        let now = assert_forwarded(&mut h, &frame(A, *port, TCP_ACK));
        if *was == 1 {
            assert_ne!(
                now, 1,
                "A's flow on port {port} followed a backend A no longer has"
            );
        } else {
            assert_eq!(
                now, *was,
                "A's flow on port {port} moved off a backend A kept"
            );
        }
    }
    for (port, was) in &on_b {
        assert_eq!(
            assert_forwarded(&mut h, &frame(B, *port, TCP_ACK)),
            *was,
            "B's flow on port {port} moved"
        );
    }
}

/// VIPs on address A at `ports`, each with every backend.
fn on_ports(ports: &[u16]) -> Desired {
    let mut d = desired_at(IpAddr::V4(A), Protocol::Tcp, ALL);
    let template = d.vips[0].clone();
    d.vips = ports
        .iter()
        .map(|port| {
            let mut v = template.clone();
            v.key.port = *port;
            v
        })
        .collect();
    d
}

fn frame_to_port(vip_port: u16, port: u16, flags: u8) -> Vec<u8> {
    let mut f = Frame::tcp(port, flags);
    f.dst = IpAddr::V4(A);
    f.dport = vip_port;
    f.bytes()
}

#[test]
fn a_removed_vips_flows_stop_even_when_its_id_goes_to_another_vip() {
    let mut h = Harness::new().expect("load the XDP object");
    // A:80 (id 0) and A:82 (id 1), the same backends: one table, shared entries.
    h.apply(&on_ports(&[80, 82])).expect("two VIPs");
    let flows: Vec<u16> = (0..100u16)
        .map(|i| {
            let port = 30000 + i;
            assert_forwarded(&mut h, &frame_to_port(80, port, TCP_SYN));
            port
        })
        .collect();
    // A:80 goes; then A:81 comes and takes its free id 0, with the same table and backend
    // entries (A:82 keeps them, same generations): only the VIP's key tells the entries of
    // A:80's flows from A:81's.
    h.apply(&on_ports(&[82])).expect("A:80 removed");
    h.apply(&on_ports(&[81, 82])).expect("A:81 added");
    for port in &flows {
        let (action, _) = h
            .run(&frame_to_port(80, *port, TCP_ACK))
            .expect("run the program");
        assert_eq!(
            action, XDP_PASS,
            "a flow of the removed A:80 (port {port}) followed its entry to A:81's backend"
        );
    }
}
