//! Packet fixtures for co-location, the shape sluice is deployed in: every node balances AND
//! serves. A pick of this node goes to its own stack, a frame another node balanced is never
//! balanced again, what another node encapsulated is unwrapped inline, and every node builds
//! the same Maglev table from the same state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::GlobalCounter;
use lb_userspace::{
    model::{Desired, ForwardingMode, Protocol},
    reconcile::{addr_from_raw, vip_key},
};
use sluice_tests::fixtures::{
    Frame, Harness, TCP_ACK, TCP_SYN, XDP_DROP, XDP_PASS, XDP_TX, backend_addr, backend_mac,
    desired, expected_l2,
};

const THREE: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];

/// The three backends are the cluster's nodes, all running sluice.
fn cluster() -> Desired {
    let mut d = desired(Protocol::Tcp, THREE);
    d.peers = (0..3).map(|i| IpAddr::V4(backend_addr(i))).collect();
    d
}

fn node(d: &Desired, i: u8) -> Harness {
    sluice_tests::require_root();
    let mut h = Harness::new().expect("load the XDP object");
    h.apply_as_node(d, IpAddr::V4(backend_addr(i)))
        .expect("program the maps");
    h
}

/// Where a plain (not co-located) balancer sends each of `frames`.
fn reference_picks(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut plain = sluice_tests::fixtures::harness_with(&desired(Protocol::Tcp, THREE));
    frames
        .iter()
        .map(|f| {
            let (action, out) = plain.run(f).unwrap();
            assert_eq!(action, XDP_TX);
            Harness::backend_of(&out).unwrap()
        })
        .collect()
}

#[test]
fn a_pick_of_this_node_goes_to_its_own_stack_untouched() {
    let d = cluster();
    let frames: Vec<Vec<u8>> = (0..600u16)
        .map(|p| Frame::tcp(30000 + p, TCP_SYN).bytes())
        .collect();
    let picks = reference_picks(&frames);
    let mut h = node(&d, 1);
    let mut local = 0;
    for (frame, pick) in frames.iter().zip(&picks) {
        let (action, out) = h.run(frame).unwrap();
        if *pick == 1 {
            // This node: to its own stack, not a byte changed.
            assert_eq!((action, &out), (XDP_PASS, frame));
            local += 1;
        } else {
            // Another node: exactly what the plain balancer sends it (same table).
            assert_eq!((action, out), (XDP_TX, expected_l2(frame, *pick)));
        }
    }
    assert!(
        (150..=250).contains(&local),
        "{local} of 600 picked this node"
    );
    assert_eq!(h.counter(GlobalCounter::Local).unwrap(), local);
    // The next packets of a local flow hit the connection table and stay local.
    let i = picks.iter().position(|p| *p == 1).unwrap();
    let ack = Frame::tcp(30000 + i as u16, TCP_ACK).bytes();
    assert_eq!(h.run(&ack).unwrap(), (XDP_PASS, ack));
    assert_eq!(h.counter(GlobalCounter::Local).unwrap(), local + 1);
}

#[test]
fn a_frame_from_another_node_is_never_balanced_twice() {
    let d = cluster();
    let mut h = node(&d, 0);
    for p in 0..300u16 {
        // First the client's own frame, which this node balances (its entry in the
        // connection table points somewhere) ...
        let from_client = Frame::tcp(40000 + p, TCP_SYN).bytes();
        let (action, _) = h.run(&from_client).unwrap();
        assert!(action == XDP_TX || action == XDP_PASS);
        // ... then the same 5-tuple as another node forwards it (its MAC as the source):
        // to this node's stack untouched, whatever the table holds.
        for peer in [1u8, 2] {
            let mut forwarded = from_client.clone();
            forwarded[6..12].copy_from_slice(&backend_mac(peer));
            assert_eq!(h.run(&forwarded).unwrap(), (XDP_PASS, forwarded));
        }
    }
    assert_eq!(h.counter(GlobalCounter::FromPeer).unwrap(), 600);
    // A MAC that is not a node's is balanced as usual.
    let mut stranger = Frame::tcp(50000, TCP_SYN).bytes();
    stranger[6..12].copy_from_slice(&[2, 0xee, 0, 0, 0, 1]);
    let (action, _) = h.run(&stranger).unwrap();
    assert!(action == XDP_TX || action == XDP_PASS);
    assert_eq!(h.counter(GlobalCounter::FromPeer).unwrap(), 600);
}

/// A VIP's table as backend addresses (backend ids are per node; addresses are what must agree).
fn table_by_address(h: &Harness, d: &Desired) -> Vec<IpAddr> {
    let key = vip_key(&d.vips[0].key);
    let info = h.maps.vip(&key).unwrap().expect("the VIP is in VIPS");
    let slots = h.maps.read_backends().unwrap();
    h.maps
        .maglev_table(info.table, info.table_size)
        .unwrap()
        .iter()
        .map(|id| {
            let s = slots[*id as usize];
            addr_from_raw(&s.addr, s.family)
        })
        .collect()
}

#[test]
fn every_node_builds_the_same_maglev_table() {
    let d = cluster();
    let tables: Vec<Vec<IpAddr>> = (0..3).map(|i| table_by_address(&node(&d, i), &d)).collect();
    assert_eq!(
        tables[0].len(),
        d.settings.maglev_table_size_for(d.vips[0].backends.len()) as usize
    );
    assert!(tables.iter().all(|t| *t == tables[0]), "tables differ");
    let owners: BTreeSet<IpAddr> = tables[0].iter().copied().collect();
    assert_eq!(owners.len(), 3, "every node owns slots, this one included");
    // And so does a node whose backend ids were allocated in another order (a restarted agent
    // that saw the nodes arrive one by one).
    let mut late = node(
        &{
            let mut first = d.clone();
            first.vips[0].backends = first.vips[0]
                .backends
                .iter()
                .filter(|b| b.addr == IpAddr::V4(backend_addr(2)))
                .cloned()
                .collect();
            first
        },
        1,
    );
    late.apply_as_node(&d, IpAddr::V4(backend_addr(1))).unwrap();
    assert_eq!(table_by_address(&late, &d), tables[0]);
    // Shares are Maglev's: each node within 2 % of a third.
    let mut shares: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for a in &tables[0] {
        *shares.entry(*a).or_default() += 1;
    }
    let third = tables[0].len() / 3;
    for (a, n) in shares {
        assert!(
            n.abs_diff(third) * 50 < third,
            "{a}: {n} slots of {}",
            tables[0].len()
        );
    }
}

#[test]
fn ipip_from_another_node_is_unwrapped_inline_and_passed() {
    let mut d = cluster();
    d.vips[0].mode = ForwardingMode::Ipip;
    // What node 0 sends to node 1 ...
    let mut sender = node(&d, 0);
    let mut receiver = node(&d, 1);
    let mut unwrapped = 0;
    for p in 0..300u16 {
        let mut f = Frame::tcp(20000 + p, TCP_ACK);
        f.payload = b"payload".to_vec();
        let input = f.bytes();
        let (action, wrapped) = sender.run(&input).unwrap();
        if action == XDP_PASS {
            continue; // node 0 picked itself
        }
        assert_eq!(action, XDP_TX);
        if Harness::backend_of(&wrapped) != Some(1) {
            continue;
        }
        // ... node 1 unwraps inline: the inner packet to its own stack, never balanced again.
        let (action, out) = receiver.run(&wrapped).unwrap();
        assert_eq!(action, XDP_PASS);
        assert_eq!(&out[14..], &input[14..], "the inner IP packet, unchanged");
        unwrapped += 1;
    }
    assert!(
        unwrapped > 50,
        "{unwrapped} flows went from node 0 to node 1"
    );
    assert_eq!(
        receiver.counter(GlobalCounter::Decapsulated).unwrap(),
        unwrapped
    );
    // Encapsulated to this node from a source outside the peers and encap prefixes: dropped.
    let input = Frame::tcp(1, TCP_SYN).bytes();
    let wrapped = (0..300u16)
        .map(|p| {
            let mut f = Frame::tcp(1000 + p, TCP_SYN).bytes();
            f.truncate(f.len());
            sender.run(&f).unwrap().1
        })
        .find(|w| Harness::backend_of(w) == Some(1) && w.len() > input.len())
        .unwrap();
    let mut spoofed = wrapped.clone();
    spoofed[14 + 12..14 + 16].copy_from_slice(&[192, 0, 2, 66]);
    spoofed[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let sum = sluice_tests::fixtures::checksum(&spoofed[14..34], 0);
    spoofed[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    assert_eq!(receiver.run(&spoofed).unwrap().0, XDP_DROP);
    assert_eq!(receiver.counter(GlobalCounter::DropDecapSource).unwrap(), 1);
}
