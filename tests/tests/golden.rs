//! The backend a flow lands on is a wire contract: during a rolling upgrade old and new
//! versions balance side by side, and when the routers' ECMP moves a flow from one node to
//! another (a node restarts, the next-hop set changes) the new node must pick the same backend. Pinned here end to end, through the real program
//! (BPF_PROG_TEST_RUN) at the default Maglev table sizes (the tier each VIP's backend count
//! picks): flow hash, the tiers, Maglev permutation seeds, weights and the backend identity all
//! feed it. A change to any of them fails this test and
//! prints the new table; replace it only when the change is deliberate (and say in the release
//! notes that every flow moves during that upgrade).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{FlowKey, MAGLEV_SLOTS_PER_BACKEND, MAGLEV_TIERS, maglev_tier, raw_addr};
use lb_userspace::model::{Desired, FlowState, Protocol, Settings};
use sluice_tests::fixtures::{
    Frame, TCP_ACK, TCP_SYN, VIP, VIP6, assert_forwarded, desired_at, harness_with,
};

/// The table sizes the golden tables below were generated with (the defaults then: each VIP
/// gets the smallest tier over this many slots per backend). If they change on purpose,
/// regenerate: the failure message prints every new table.
const GOLDEN_TIERS: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65537];
const GOLDEN_SLOTS_PER_BACKEND: u32 = 1000;

/// Tuples per scenario: enough that any change of hash, seed or table moves some of them
/// (each tuple moves with probability about 1 - 1/N under an unrelated hash).
const TUPLES: usize = 32;

/// Client `i` of a scenario: varied addresses and ports, deterministic.
fn client_v4(i: usize) -> (Ipv4Addr, u16) {
    let i = i as u32;
    (
        Ipv4Addr::from(0x0a00_0000 | i.wrapping_mul(2_654_435_761) >> 8),
        (1024 + (i * 7919) % 64000) as u16,
    )
}

fn client_v6(i: usize) -> (Ipv6Addr, u16) {
    let (v4, port) = client_v4(i);
    let o = v4.octets();
    (
        Ipv6Addr::new(
            0xfd00,
            0,
            0,
            i as u16,
            0,
            0,
            u16::from_be_bytes([o[1], o[2]]),
            u16::from(o[3]),
        ),
        port,
    )
}

struct Scenario {
    name: &'static str,
    desired: Desired,
    /// (client address, client port) of each tuple, to the scenario's VIP port 80.
    clients: Vec<(IpAddr, u16)>,
    /// Backend index (as in `backend_addr`) of each tuple, one digit each.
    golden: &'static str,
}

impl Scenario {
    fn vip(&self) -> &lb_userspace::model::Vip {
        &self.desired.vips[0]
    }

    /// The tuple's first packet (a SYN for TCP), or with `mid_flow` a later one (an ACK).
    fn frame(&self, (src, sport): (IpAddr, u16), mid_flow: bool) -> Vec<u8> {
        let mut f = match self.vip().key.protocol {
            Protocol::Tcp if mid_flow => Frame::tcp(sport, TCP_ACK),
            Protocol::Tcp => Frame::tcp(sport, TCP_SYN),
            Protocol::Udp => Frame::udp(sport, b"golden"),
        };
        if src.is_ipv6() {
            f = f.v6();
        }
        f.src = src;
        f.bytes()
    }

    /// The table slot of a tuple by `lb_common::flow_hash`, as user space predicts it.
    fn slot(&self, (src, sport): (IpAddr, u16), table_size: u32) -> usize {
        let vip = &self.vip().key;
        let (s, family) = raw_addr(src);
        let (d, _) = raw_addr(vip.addr);
        let key = FlowKey {
            src: s,
            dst: d,
            sport: sport.to_be(),
            dport: vip.port.to_be(),
            proto: match vip.protocol {
                Protocol::Tcp => 6,
                Protocol::Udp => 17,
            },
            family,
            _pad: [0; 2],
        };
        (key.hash(self.vip().client_affinity) % table_size) as usize
    }
}

fn scenarios() -> Vec<Scenario> {
    let three = &[(0, 1, false), (1, 1, false), (2, 1, false)];
    let weighted = &[(0, 1, false), (1, 2, false), (2, 3, false)];
    let v4 = || -> Vec<(IpAddr, u16)> {
        (0..TUPLES)
            .map(|i| {
                let (a, p) = client_v4(i);
                (a.into(), p)
            })
            .collect()
    };
    let v6 = || -> Vec<(IpAddr, u16)> {
        (0..TUPLES)
            .map(|i| {
                let (a, p) = client_v6(i);
                (a.into(), p)
            })
            .collect()
    };
    // Affinity: the client address alone decides; two ports per client (tuples 2k and 2k + 1
    // share a client).
    let pairs = |clients: Vec<(IpAddr, u16)>| -> Vec<(IpAddr, u16)> {
        (0..TUPLES)
            .map(|i| (clients[i / 2].0, 30000 + i as u16))
            .collect()
    };
    let affine = |mut d: Desired| {
        d.vips[0].client_affinity = true;
        d
    };
    vec![
        Scenario {
            name: "ipv4 tcp, 3 equal backends",
            desired: desired_at(IpAddr::V4(VIP), Protocol::Tcp, three),
            clients: v4(),
            golden: "02211022110000001012122220010021",
        },
        Scenario {
            name: "ipv4 udp, weights 1:2:3",
            desired: desired_at(IpAddr::V4(VIP), Protocol::Udp, weighted),
            clients: v4(),
            golden: "12102002012022011111220111202212",
        },
        Scenario {
            name: "ipv6 tcp, 3 equal backends",
            desired: desired_at(IpAddr::V6(VIP6), Protocol::Tcp, three),
            clients: v6(),
            golden: "21112111221211010102121012120122",
        },
        Scenario {
            name: "ipv4 tcp, client affinity",
            desired: affine(desired_at(IpAddr::V4(VIP), Protocol::Tcp, three)),
            clients: pairs(v4()),
            golden: "11110011112200221111222211112200",
        },
        Scenario {
            name: "ipv6 tcp, client affinity",
            desired: affine(desired_at(IpAddr::V6(VIP6), Protocol::Tcp, three)),
            clients: pairs(v6()),
            golden: "11001100000022222200001111110022",
        },
    ]
}

#[test]
fn flows_land_on_the_pinned_backends() {
    assert_eq!(
        Settings::default().maglev_table_size,
        None,
        "by default each VIP's table size is its tier"
    );
    let mut failures = Vec::new();
    if (MAGLEV_TIERS, MAGLEV_SLOTS_PER_BACKEND) != (GOLDEN_TIERS, GOLDEN_SLOTS_PER_BACKEND) {
        failures.push(format!(
            "the Maglev tiers are {MAGLEV_TIERS:?} over {MAGLEV_SLOTS_PER_BACKEND} slots per \
             backend, the golden tables were made with {GOLDEN_TIERS:?} over \
             {GOLDEN_SLOTS_PER_BACKEND}: an upgrade to this version moves flows. If deliberate, \
             set GOLDEN_TIERS, GOLDEN_SLOTS_PER_BACKEND and the tables below."
        ));
    }
    // Both flow states: a connection table or none (second chance), the same picks, for a
    // connection's first packet and its next (the entry's, or the table's again).
    for (flow_state, mut s) in [FlowState::Table, FlowState::SecondChance]
        .into_iter()
        .flat_map(|f| scenarios().into_iter().map(move |s| (f, s)))
    {
        s.desired.settings.flow_state = flow_state;
        let mut h = harness_with(&s.desired);
        let snapshot = h.snapshot().expect("read the maps");
        let view = snapshot.vips.values().next().expect("the scenario's VIP");
        assert_eq!(
            view.table_size,
            maglev_tier(s.vip().backends.len()),
            "{}: the VIP's table size",
            s.name
        );
        let mut now = String::new();
        for &client in &s.clients {
            let b = assert_forwarded(&mut h, &s.frame(client, false));
            let next = assert_forwarded(&mut h, &s.frame(client, true));
            assert_eq!(
                next, b,
                "{} ({flow_state:?}): {client:?}'s next packet went to b{next}, its first to b{b}",
                s.name
            );
            // The program picks exactly the slot user space predicts with lb_common's hash.
            let predicted = view.table[s.slot(client, view.table_size)];
            assert_eq!(
                predicted,
                Some(s.desired.vips[0].backends[usize::from(b)].addr),
                "{}: {client:?} went to b{b}, but flow_hash and the table say {predicted:?}",
                s.name
            );
            now.push(char::from(b'0' + b));
        }
        if s.vip().client_affinity {
            assert!(
                now.as_bytes().chunks(2).all(|pair| pair[0] == pair[1]),
                "{}: two connections of one client went to different backends: {now}",
                s.name
            );
        }
        if now != s.golden {
            let moved: Vec<String> = s
                .golden
                .bytes()
                .zip(now.bytes())
                .enumerate()
                .filter(|(_, (g, n))| g != n)
                .map(|(i, (g, n))| format!("#{i} b{} -> b{}", g - b'0', n - b'0'))
                .collect();
            failures.push(format!(
                "{} ({flow_state:?}): {} of {TUPLES} flows land elsewhere ({}); if deliberate:\n            golden: \"{now}\",",
                s.name,
                moved.len(),
                moved.join(", ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "flows land on other backends than the pinned ones: nodes of this and the previous \
         version would disagree during a rolling upgrade.\n{}",
        failures.join("\n")
    );
}
