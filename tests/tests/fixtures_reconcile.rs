//! A reconcile that fails or is killed at any instant, and the ordering rules of the apply,
//! seen by packets: the real program and the real reconcile, stopped between two phases by the
//! test-only hook (`lb-userspace/test-hooks`), BPF_PROG_TEST_RUN in between.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::bail;
use lb_common::{GlobalCounter, MAX_VIPS};
use lb_userspace::{
    dataplane::Snapshot,
    model::{Backend, Desired, FlowState, IpNet, MacAddr, Protocol, Settings, Vip, VipAddr},
    reconcile::{Phase, addr_from_raw},
};
use sluice_tests::fixtures::{
    CLIENT, CLIENT6, ENCAP_SOURCE_V4, ENCAP_SOURCE_V6, Frame, Harness, TCP_ACK, TCP_SYN, VIP, VIP6,
    XDP_DROP, XDP_PASS, XDP_TX, backend_addr, backend_mac,
};

/// What the program did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    To(u8),
    Pass,
    Drop,
    Other(u32),
}

fn fate(action: u32, out: &[u8]) -> Fate {
    match action {
        XDP_TX => Harness::backend_of(out).map_or(Fate::Other(action), Fate::To),
        XDP_PASS => Fate::Pass,
        XDP_DROP => Fate::Drop,
        other => Fate::Other(other),
    }
}

fn vip_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, 0, n)
}

/// Backend `i` with `weight`, draining or not.
fn b(i: u8, weight: u32, drain: bool) -> Backend {
    Backend {
        addr: IpAddr::V4(backend_addr(i)),
        mac: Some(MacAddr(backend_mac(i))),
        weight,
        drain,
    }
}

fn vip(n: u8, backends: Vec<Backend>, ranges: &[&str]) -> Vip {
    let mut vip = Vip::new(
        VipAddr {
            addr: IpAddr::V4(vip_addr(n)),
            port: 80,
            protocol: Protocol::Tcp,
        },
        backends,
    );
    vip.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
    vip
}

fn state(vips: Vec<Vip>) -> Desired {
    Desired {
        settings: Settings {
            encap_source_v4: Some(ENCAP_SOURCE_V4.parse().unwrap()),
            encap_source_v6: Some(ENCAP_SOURCE_V6.parse().unwrap()),
            ..Settings::default()
        },
        vips,
        peers: Default::default(),
    }
}

fn syn_to(vip: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut f = Frame::tcp(sport, TCP_SYN);
    f.dst = IpAddr::V4(vip);
    f.bytes()
}

/// Before: VIP 1 on backends 0-3, VIP 2 scaled to zero, VIP 3.
fn before() -> Desired {
    state(vec![
        vip(
            1,
            vec![
                b(0, 1, false),
                b(1, 1, false),
                b(2, 1, false),
                b(3, 1, false),
            ],
            &[],
        ),
        vip(2, vec![], &[]),
        vip(3, vec![b(0, 1, false)], &[]),
    ])
}

/// After: on VIP 1 backend 0 weighs 2, 1 drains, 2 is removed, 4 is added, and a source range
/// appears; VIP 2 scales up from zero; VIP 3 is removed; VIP 4 is new, with a source range.
fn after() -> Desired {
    state(vec![
        vip(
            1,
            vec![
                b(0, 2, false),
                b(1, 1, true),
                b(3, 1, false),
                b(4, 1, false),
            ],
            &["10.0.0.0/24"],
        ),
        vip(2, vec![b(5, 1, false), b(6, 1, false)], &[]),
        vip(4, vec![b(1, 1, false), b(3, 1, false)], &["10.0.0.0/8"]),
    ])
}

/// The fates a new flow to VIP `n` may meet while the change from [`before`] to [`after`] is
/// under way: either state's, never another.
fn allowed_midway(n: u8, fate: Fate) -> bool {
    match n {
        1 => matches!(fate, Fate::To(0..=4)),
        2 => matches!(fate, Fate::To(5 | 6) | Fate::Drop),
        3 => matches!(fate, Fate::To(0) | Fate::Pass),
        4 => matches!(fate, Fate::To(1 | 3) | Fate::Pass),
        _ => false,
    }
}

/// New flows to each VIP, by fate.
fn new_flows(
    mut run: impl FnMut(&[u8]) -> anyhow::Result<(u32, Vec<u8>)>,
    first_sport: u16,
    count: u16,
) -> BTreeMap<u8, BTreeMap<Fate, u32>> {
    let mut out: BTreeMap<u8, BTreeMap<Fate, u32>> = BTreeMap::new();
    for n in 1..=4u8 {
        for sport in first_sport..first_sport + count {
            let (action, frame) = run(&syn_to(vip_addr(n), sport)).expect("test run");
            *out.entry(n)
                .or_default()
                .entry(fate(action, &frame))
                .or_default() += 1;
        }
    }
    out
}

fn fresh(desired: &Desired) -> Harness {
    sluice_tests::require_root();
    let mut h = Harness::new().expect("load the XDP object");
    h.apply_as_node_with(desired, &[])
        .expect("program the maps");
    h
}

/// Kill the reconcile after every phase in turn, then run it again: in between, no packet goes
/// to a backend neither state has; afterwards the maps equal a fresh reconcile's and the
/// packets go where the desired state says.
#[test]
fn a_reconcile_stopped_after_any_phase_is_completed_by_the_next() {
    stopped_after_any_phase(FlowState::Table);
}

/// The same in second-chance mode, where a VIP keeps the table it leaves as its previous one
/// (and that table's backends): the retry ends where an uninterrupted change ends.
#[test]
fn a_reconcile_stopped_after_any_phase_is_completed_by_the_next_in_second_chance_mode() {
    stopped_after_any_phase(FlowState::SecondChance);
}

fn stopped_after_any_phase(flow_state: FlowState) {
    let (mut old, mut new) = (before(), after());
    old.settings.flow_state = flow_state;
    new.settings.flow_state = flow_state;
    let reference = match flow_state {
        // Auto without a conntrack answer (a harness asks none) runs as table.
        FlowState::Table | FlowState::Auto => fresh(&new).snapshot().unwrap(),
        FlowState::SecondChance => {
            let mut h = fresh(&old);
            h.apply_as_node_with(&new, &[]).unwrap();
            let snapshot = h.snapshot().unwrap();
            // Backend 2, removed from VIP 1, stays for VIP 1's previous table.
            assert_eq!(
                snapshot.orphan_backends, 1,
                "the previous table keeps its members"
            );
            snapshot
        }
    };
    let mut failures = Vec::new();
    for stop in Phase::ALL {
        let mut h = fresh(&old);
        let mut midway = BTreeMap::new();
        let result = h.apply_with_hook(&new, &[], |phase, runner| {
            if phase == stop {
                midway = new_flows(|f| runner.run(f), 30000, 200);
                bail!("stopped after {phase:?}");
            }
            Ok(())
        });
        if result.is_ok() {
            failures.push(format!("{stop:?}: the hook did not stop the apply"));
        }
        for (n, fates) in &midway {
            for (fate, count) in fates {
                if !allowed_midway(*n, *fate) {
                    failures.push(format!(
                        "{stop:?}: midway, {count} new flows to VIP {n}: {fate:?}"
                    ));
                }
            }
        }
        if let Err(e) = h.apply_as_node_with(&new, &[]) {
            failures.push(format!("{stop:?}: the next reconcile failed: {e:#}"));
            continue;
        }
        for d in h.snapshot().unwrap().differences(&reference) {
            failures.push(format!("{stop:?}: then, unlike a fresh reconcile: {d}"));
        }
        let flows = new_flows(|f| h.run(f), 40000, 400);
        let vip1 = &flows[&1];
        let to = |i: u8| vip1.get(&Fate::To(i)).copied().unwrap_or(0);
        if vip1.keys().any(|f| !matches!(f, Fate::To(0 | 3 | 4))) {
            failures.push(format!(
                "{stop:?}: then, VIP 1 (0 weighs 2, 1 drained, 2 removed, 4 added): {vip1:?}"
            ));
        }
        if !(60..=140).contains(&to(4)) {
            failures.push(format!(
                "{stop:?}: then, the added backend has {} of 400 new flows, not ~1/4",
                to(4)
            ));
        }
        if flows[&2].keys().any(|f| !matches!(f, Fate::To(5 | 6))) || flows[&2].len() != 2 {
            failures.push(format!(
                "{stop:?}: then, VIP 2 scaled up from zero: {:?}",
                flows[&2]
            ));
        }
        if flows[&3].keys().any(|f| *f != Fate::Pass) {
            failures.push(format!("{stop:?}: then, removed VIP 3: {:?}", flows[&3]));
        }
        if flows[&4].keys().any(|f| !matches!(f, Fate::To(1 | 3))) {
            failures.push(format!("{stop:?}: then, new VIP 4: {:?}", flows[&4]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A process plans each reconcile after its first from what its last apply left (its
/// `Carry`), not from a read of 10,000 VIPs: after every step of a sequence that adds, removes,
/// drains, reweighs, scales to zero, filters by source and keeps previous tables, what the
/// carry says equals what the maps hold.
#[test]
fn what_the_last_apply_left_is_what_the_maps_hold() {
    let second_chance = |mut d: Desired| {
        d.settings.flow_state = FlowState::SecondChance;
        d
    };
    let steps = [
        ("before", before()),
        ("after", after()),
        ("before again", before()),
        ("nothing", state(vec![])),
        ("after, second chance", second_chance(after())),
        ("before, second chance", second_chance(before())),
        ("after again, second chance", second_chance(after())),
        ("after, table mode", after()),
    ];
    let mut h = fresh(&state(vec![]));
    let mut carry = lb_userspace::reconcile::Carry::default();
    for (step, desired) in &steps {
        h.apply_carrying(desired, &[], &mut carry)
            .unwrap_or_else(|e| panic!("{step}: {e:#}"));
        let read = lb_userspace::dataplane::Snapshot::read(&h.maps).unwrap();
        assert_eq!(carry.maps_hold(), Some(&read), "after {step}");
    }
    // Packets agree with a reconcile that read the maps.
    assert!(
        fresh(&after())
            .snapshot()
            .unwrap()
            .differences(&h.snapshot().unwrap())
            .is_empty(),
        "the carried reconciles left other maps than a fresh one"
    );
}

/// A backend drains (or its weight drops to 0) while new flows keep arriving between every
/// two phases of the apply: none is dropped, and after it the backend gets no new flow while
/// its established ones stay.
/// Applies `next`, sending 100 new flows to VIP 1 (from `sport` on) after every phase; none
/// may be dropped.
fn apply_under_new_flows(h: &mut Harness, next: &Desired, sport: &mut u16, label: &str) {
    let mut midway: Vec<(Phase, u16, Fate)> = Vec::new();
    h.apply_with_hook(next, &[], |phase, runner| {
        for _ in 0..100 {
            let (action, out) = runner.run(&syn_to(vip_addr(1), *sport))?;
            midway.push((phase, *sport, fate(action, &out)));
            *sport += 1;
        }
        Ok(())
    })
    .unwrap();
    let dropped: Vec<_> = midway.iter().filter(|(_, _, f)| *f == Fate::Drop).collect();
    assert!(
        dropped.is_empty(),
        "{label}: {} of {} new flows dropped midway, first: {:?}",
        dropped.len(),
        midway.len(),
        dropped.first()
    );
}

#[test]
fn draining_under_new_flows_drops_none() {
    for (label, changed) in [("drain", b(1, 1, true)), ("weight 0", b(1, 0, false))] {
        let old = state(vec![vip(
            1,
            vec![b(0, 1, false), b(1, 1, false), b(2, 1, false)],
            &[],
        )]);
        let new = state(vec![vip(
            1,
            vec![b(0, 1, false), changed, b(2, 1, false)],
            &[],
        )]);
        let mut h = fresh(&old);
        // Established flows, some on backend 1.
        let mut established = Vec::new();
        for sport in 1000..1060u16 {
            let (action, out) = h.run(&syn_to(vip_addr(1), sport)).unwrap();
            established.push((sport, fate(action, &out)));
        }
        assert!(established.iter().any(|(_, f)| *f == Fate::To(1)));
        let mut sport = 2000u16;
        apply_under_new_flows(&mut h, &new, &mut sport, label);
        assert_eq!(
            h.counter(GlobalCounter::DropNoBackend).unwrap(),
            0,
            "{label}"
        );
        for sport in 5000..5300u16 {
            let (action, out) = h.run(&syn_to(vip_addr(1), sport)).unwrap();
            let f = fate(action, &out);
            assert!(
                matches!(f, Fate::To(0 | 2)),
                "{label}: a new flow after: {f:?}"
            );
        }
        for (sport, was) in established {
            let mut f = Frame::tcp(sport, TCP_ACK);
            f.dst = IpAddr::V4(vip_addr(1));
            let (action, out) = h.run(&f.bytes()).unwrap();
            assert_eq!(
                fate(action, &out),
                was,
                "{label}: established flow {sport} moved"
            );
        }
    }
}

/// A VIP whose backend count crosses a tier (3 -> 2 backends: 4093 -> 2039 slots, and back):
/// its entry's size and its table change in two writes, ordered so that no packet indexes a
/// table with a size larger than it (a slot beyond the table: a drop). New flows after every
/// phase of both applies all reach a backend.
#[test]
fn a_table_changing_tier_under_new_flows_drops_none() {
    let three = state(vec![vip(
        1,
        vec![b(0, 1, false), b(1, 1, false), b(2, 1, false)],
        &[],
    )]);
    let two = state(vec![vip(1, vec![b(0, 1, false), b(2, 1, false)], &[])]);
    assert!(
        lb_common::maglev_tier(2) < lb_common::maglev_tier(3),
        "the test needs a tier change"
    );
    let mut h = fresh(&three);
    let mut sport = 3000u16;
    for (label, next) in [("shrink", &two), ("grow", &three)] {
        apply_under_new_flows(&mut h, next, &mut sport, label);
    }
    assert_eq!(h.counter(GlobalCounter::DropNoBackend).unwrap(), 0);
}

/// A slot freed by a removed backend and given to another backend of the same VIP one
/// reconcile later: an idle flow of the removed backend re-hashes (Maglev, as every other load
/// balancer would) instead of following the slot to the new backend.
#[test]
fn a_reused_slot_does_not_carry_old_flows() {
    let three = state(vec![vip(
        1,
        vec![b(0, 1, false), b(1, 1, false), b(2, 1, false)],
        &[],
    )]);
    let without = state(vec![vip(1, vec![b(0, 1, false), b(2, 1, false)], &[])]);
    let replaced = state(vec![vip(
        1,
        vec![b(0, 1, false), b(2, 1, false), b(3, 1, false)],
        &[],
    )]);
    // A flow that goes to backend 1 before and that Maglev gives to another than 3 after.
    let mut probe = fresh(&replaced);
    let mut h = fresh(&three);
    let (sport, rehashed) = (20000..21000u16)
        .find_map(|sport| {
            let syn = syn_to(vip_addr(1), sport);
            let (a, o) = h.run(&syn).unwrap();
            if fate(a, &o) != Fate::To(1) {
                return None;
            }
            let (a, o) = probe.run(&syn).unwrap();
            let pick = fate(a, &o);
            (pick != Fate::To(3)).then_some((sport, pick))
        })
        .expect("a flow on backend 1 that Maglev moves elsewhere than 3");
    let slot_of = |h: &Harness, i: u8| {
        Snapshot::read(&h.maps)
            .unwrap()
            .backends
            .iter()
            .find(|(_, s)| addr_from_raw(&s.addr, s.family) == IpAddr::V4(backend_addr(i)))
            .map(|(slot, _)| *slot)
    };
    let old_slot = slot_of(&h, 1).unwrap();
    h.apply_as_node_with(&without, &[]).unwrap();
    h.apply_as_node_with(&replaced, &[]).unwrap();
    assert_eq!(
        slot_of(&h, 3),
        Some(old_slot),
        "backend 3 took backend 1's slot"
    );
    let misses = h.counter(GlobalCounter::FlowMiss).unwrap();
    let mut ack = Frame::tcp(sport, TCP_ACK);
    ack.dst = IpAddr::V4(vip_addr(1));
    let (a, o) = h.run(&ack.bytes()).unwrap();
    assert_eq!(
        fate(a, &o),
        rehashed,
        "the idle flow of the removed backend follows its slot instead of re-hashing"
    );
    assert_eq!(h.counter(GlobalCounter::FlowMiss).unwrap(), misses + 1);
}

/// A VIP with source ranges admits only the clients they list, whatever family the ranges are
/// of: ranges of the other family admit nobody, and never every client.
#[test]
fn source_ranges_of_the_other_family_admit_nobody() {
    let cases: [(IpAddr, &[&str], IpAddr, bool); 6] = [
        // An IPv4 VIP whose Service lists only IPv6 ranges.
        (IpAddr::V4(VIP), &["::/0"], IpAddr::V4(CLIENT), false),
        (IpAddr::V4(VIP), &["a00::/8"], IpAddr::V4(CLIENT), false),
        // A dual-stack list: the IPv4 ones decide for IPv4 clients.
        (
            IpAddr::V4(VIP),
            &["192.0.2.0/24", "::/0"],
            IpAddr::V4(CLIENT),
            false,
        ),
        (
            IpAddr::V4(VIP),
            &["192.0.2.0/24", "::/0"],
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            true,
        ),
        // And the other way round.
        (
            IpAddr::V6(VIP6),
            &["0.0.0.0/0", "fd00:99::/32"],
            IpAddr::V6(CLIENT6),
            false,
        ),
        (
            IpAddr::V6(VIP6),
            &["0.0.0.0/0", "fd00::/16"],
            IpAddr::V6(CLIENT6),
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (vip_at, ranges, client, admitted) in cases {
        let mut d = sluice_tests::fixtures::desired_at(
            vip_at,
            Protocol::Tcp,
            &[(0, 1, false), (1, 1, false)],
        );
        d.vips[0].source_ranges = ranges.iter().map(|r| r.parse::<IpNet>().unwrap()).collect();
        let mut h = fresh(&d);
        let mut f = Frame::tcp(1000, TCP_SYN);
        if vip_at.is_ipv6() {
            f = f.v6();
        }
        f.src = client;
        let (action, out) = h.run(&f.bytes()).unwrap();
        let got = fate(action, &out);
        let ok = if admitted {
            matches!(got, Fate::To(_))
        } else {
            got == Fate::Drop && h.counter(GlobalCounter::DropSourceRange).unwrap() == 1
        };
        if !ok {
            failures.push(format!(
                "VIP {vip_at} with ranges {ranges:?}, client {client}: {got:?}, expected {}",
                if admitted { "forwarded" } else { "dropped" }
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// More VIPs than the maps hold: what fits is applied, removals first, and the rest reported;
/// the reconcile never fails as a whole (which would freeze the maps, dead nodes included).
#[test]
fn over_capacity_what_fits_is_applied_and_the_rest_reported() {
    let vip_at = |i: u32| {
        Ipv4Addr::new(
            10,
            100 + (i / 62_500) as u8,
            ((i / 250) % 250) as u8,
            (i % 250) as u8 + 1,
        )
    };
    let many = |range: std::ops::Range<u32>| {
        let mut d = state(
            range
                .map(|i| {
                    let mut v = vip(1, vec![b(0, 1, false)], &[]);
                    v.key.addr = IpAddr::V4(vip_at(i));
                    v
                })
                .collect(),
        );
        // Small tables: tens of thousands of VIPs in a test (all on one shared table).
        d.settings.maglev_table_size = Some(251);
        d
    };
    let mut h = fresh(&many(0..MAX_VIPS));
    assert_eq!(
        Snapshot::read(&h.maps).unwrap().vips.len(),
        MAX_VIPS as usize
    );
    // VIP 0 goes, two new ones come: one more than fits.
    let next = many(1..MAX_VIPS + 2);
    let summary = h
        .apply_as_node_with(&next, &[])
        .expect("an apply over capacity applies what fits");
    assert_eq!(summary.vips_removed, 1, "{summary}");
    assert_eq!(summary.vips_added, 1, "{summary}");
    assert_eq!(summary.left_out.len(), 1, "{summary}");
    let verdict = |h: &mut Harness, i: u32| {
        let (a, o) = h.run(&syn_to(vip_at(i), 1000)).unwrap();
        fate(a, &o)
    };
    assert_eq!(verdict(&mut h, 0), Fate::Pass, "the removed VIP is gone");
    assert_eq!(
        verdict(&mut h, MAX_VIPS),
        Fate::To(0),
        "the first new VIP is served"
    );
    assert_eq!(
        verdict(&mut h, MAX_VIPS + 1),
        Fate::Pass,
        "the one that does not fit"
    );
    // Again: still reported, nothing else changes (and reading what is installed, a table
    // fingerprint per VIP included, stays cheap).
    let started = std::time::Instant::now();
    let again = h.apply_as_node_with(&next, &[]).unwrap();
    let took = started.elapsed();
    let started = std::time::Instant::now();
    let _ = Snapshot::read(&h.maps).unwrap();
    println!(
        "an unchanged reconcile of {MAX_VIPS} VIPs took {took:?}, of which reading the maps {:?}",
        started.elapsed()
    );
    assert_eq!(again.left_out.len(), 1, "{again}");
    assert!(again.is_empty(), "{again}");
}
