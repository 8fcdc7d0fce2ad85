//! The plan without a kernel: each ordering rule of the apply, drains, weight changes,
//! removals, stale tables and capacity limits, over an in-memory model of the maps.

use std::net::Ipv4Addr;

use super::*;
use crate::model::{MacAddr, Protocol, VipAddr};

fn iface() -> Interface {
    Interface {
        name: "lb0".into(),
        index: 1,
        mac: MacAddr([2, 0, 0, 0, 0, 1]),
        mtu: 1500,
    }
}

fn backend_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i))
}

fn b(i: u32, weight: u32, drain: bool) -> Backend {
    Backend {
        addr: backend_ip(i),
        mac: Some(MacAddr([2, 0xbe, 0, 0, (i >> 8) as u8, i as u8])),
        weight,
        drain,
    }
}

fn vip_at(n: u32) -> VipAddr {
    VipAddr {
        addr: IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + n)),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn vip(n: u32, backends: Vec<Backend>) -> Vip {
    Vip::new(vip_at(n), backends)
}

fn state(vips: Vec<Vip>) -> Desired {
    Desired {
        settings: Settings {
            // Small tables: planning never builds them, but keep it cheap anyway.
            maglev_table_size: Some(251),
            ..Settings::default()
        },
        vips,
        peers: BTreeSet::new(),
    }
}

/// Every backend resolved on the attached interface at its configured MAC.
fn resolved(desired: &Desired) -> Resolved {
    let mut out = Resolved::default();
    for vip in &desired.vips {
        for b in &vip.backends {
            out.targets.insert(
                (b.addr, vip.mode),
                Target::Remote {
                    mac: b.mac.unwrap_or_default(),
                    egress: iface(),
                    source: None,
                },
            );
        }
    }
    out
}

fn plan_for(current: &Snapshot, desired: &Desired) -> Plan {
    plan(current, &iface(), desired, &resolved(desired)).unwrap()
}

/// The maps after `plan` was applied in full (the model of `apply`).
fn applied(current: &Snapshot, plan: &Plan) -> Snapshot {
    let mut all: BTreeMap<u32, SlotValue> = current
        .generations
        .iter()
        .map(|(slot, generation)| {
            (
                *slot,
                SlotValue {
                    generation: *generation,
                    ..SlotValue::default()
                },
            )
        })
        .collect();
    all.extend(current.slots.iter().map(|(s, v)| (*s, *v)));
    for (slot, value, _) in &plan.slots_before {
        all.insert(*slot, *value);
    }
    for (slot, value) in &plan.slots_after {
        all.insert(*slot, *value);
    }
    for (slot, generation) in &plan.removed_slots {
        all.insert(
            *slot,
            SlotValue {
                generation: *generation,
                ..SlotValue::default()
            },
        );
    }
    let mut next = Snapshot::default();
    for (slot, value) in all {
        next.add_slot(slot, value);
    }
    next.vips = current.vips.clone();
    next.tables = current.tables.clone();
    for (key, id) in &plan.removed_vips {
        next.vips.remove(key);
        next.tables.remove(id);
    }
    for id in &plan.emptied_tables {
        next.tables.remove(id);
    }
    for vip in &plan.vips {
        next.vips.insert(vip.key, vip.info);
        if vip.rebuild_table {
            next.tables.insert(vip.id, vip.fingerprint);
        }
    }
    next.vip_addrs = plan.vip_addrs.clone();
    next.source_ranges = plan.source_ranges.clone();
    next
}

/// Plans `desired` from `current` and applies it: (plan, maps after).
fn step(current: &Snapshot, desired: &Desired) -> (Plan, Snapshot) {
    let plan = plan_for(current, desired);
    let next = applied(current, &plan);
    (plan, next)
}

fn slot_of(current: &Snapshot, i: u32) -> u32 {
    current
        .slots
        .iter()
        .find(|(_, v)| addr_from_raw(&v.addr, v.family) == backend_ip(i))
        .map(|(slot, _)| *slot)
        .unwrap()
}

fn three() -> Desired {
    state(vec![vip(
        1,
        vec![b(0, 1, false), b(1, 1, false), b(2, 1, false)],
    )])
}

fn with_backend_1(backend: Backend) -> Desired {
    state(vec![vip(1, vec![b(0, 1, false), backend, b(2, 1, false)])])
}

#[test]
fn an_unchanged_state_plans_no_write() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let plan = plan_for(&maps, &three());
    assert!(plan.slots_before.is_empty() && plan.slots_after.is_empty());
    assert!(plan.removed_slots.is_empty() && plan.removed_vips.is_empty());
    assert!(!plan.vips[0].rebuild_table);
    assert!(plan.left_out.is_empty() && !plan.frees);
}

#[test]
fn a_drain_is_written_after_the_table_that_leaves_the_backend_out() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let slot = slot_of(&maps, 1);
    for (label, changed) in [("drain", b(1, 1, true)), ("weight 0", b(1, 0, false))] {
        let plan = plan_for(&maps, &with_backend_1(changed));
        assert!(
            plan.slots_before.iter().all(|(s, _, _)| *s != slot),
            "{label}: written before the table"
        );
        assert_eq!(plan.slots_after.len(), 1, "{label}");
        assert_eq!(plan.slots_after[0].0, slot, "{label}");
        assert_eq!(effective_weight(&plan.slots_after[0].1), 0, "{label}");
        let vip = &plan.vips[0];
        assert!(vip.rebuild_table, "{label}");
        assert_eq!(
            vip.inputs[1].weight, 0,
            "{label}: the new table leaves it out"
        );
        assert_eq!(vip.info.live_backends, 2, "{label}");
    }
}

#[test]
fn an_unresolved_backend_drains_after_the_table_on_its_last_mac() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let slot = slot_of(&maps, 1);
    let desired = three();
    let mut lookups = resolved(&desired);
    lookups
        .targets
        .retain(|(addr, _), _| *addr != backend_ip(1));
    let plan = plan(&maps, &iface(), &desired, &lookups).unwrap();
    assert_eq!(plan.slots_after.len(), 1);
    let (s, value) = plan.slots_after[0];
    assert_eq!(s, slot);
    assert_eq!(value.state, backend_state::DRAINING);
    assert_eq!(
        value.dst_mac, maps.slots[&slot].dst_mac,
        "its last known MAC"
    );
    assert!(plan.slots_before.is_empty());
    assert!(plan.vips[0].rebuild_table);
}

#[test]
fn an_undrain_and_weight_changes_are_written_before_the_table_that_uses_them() {
    let (_, drained) = step(&Snapshot::default(), &with_backend_1(b(1, 1, true)));
    let slot = slot_of(&drained, 1);
    for (label, changed) in [("undrain", b(1, 1, false)), ("weight 3", b(1, 3, false))] {
        let plan = plan_for(&drained, &with_backend_1(changed));
        assert_eq!(plan.slots_before.len(), 1, "{label}");
        let (s, value, is_new) = plan.slots_before[0];
        assert_eq!((s, is_new), (slot, false), "{label}");
        assert_eq!(value.state, backend_state::ACTIVE, "{label}");
        assert!(plan.slots_after.is_empty(), "{label}");
        assert!(plan.vips[0].rebuild_table, "{label}");
    }
    // A weight change of an active backend: before too, and the table is rebuilt.
    let (_, active) = step(&Snapshot::default(), &three());
    let plan = plan_for(&active, &with_backend_1(b(1, 5, false)));
    assert_eq!(plan.slots_before.len(), 1);
    assert_eq!(plan.slots_before[0].1.weight, 5);
    assert!(plan.vips[0].rebuild_table);
    assert_eq!(plan.vips[0].inputs[1].weight, 5);
}

#[test]
fn removals_free_slots_after_the_tables_and_never_reuse_them_in_the_same_plan() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let freed = slot_of(&maps, 1);
    let generation = maps.slots[&freed].generation;
    assert_ne!(generation, 0, "a slot in use has a generation");
    // Backend 1 goes and backend 3 comes in one reconcile: 3 gets another slot.
    let swap = state(vec![vip(
        1,
        vec![b(0, 1, false), b(2, 1, false), b(3, 1, false)],
    )]);
    let (plan, maps) = step(&maps, &swap);
    assert_eq!(plan.removed_slots.get(&freed), Some(&generation));
    let (new_slot, value, is_new) = plan.slots_before[0];
    assert!(is_new && new_slot != freed);
    assert_eq!(value.generation, 1);
    assert!(plan.vips[0].rebuild_table && plan.frees);
    // One reconcile later the freed slot goes to a new backend, of a new generation:
    // flows recorded with the old one do not follow it.
    let (plan, _) = step(
        &maps,
        &state(vec![vip(
            1,
            vec![
                b(0, 1, false),
                b(2, 1, false),
                b(3, 1, false),
                b(4, 1, false),
            ],
        )]),
    );
    let (slot, value, is_new) = plan.slots_before[0];
    assert!(is_new);
    assert_eq!(slot, freed);
    assert_eq!(value.generation, generation + 1);
}

#[test]
fn a_removed_vip_goes_with_its_slots_and_table() {
    let two = state(vec![
        vip(1, vec![b(0, 1, false)]),
        vip(2, vec![b(1, 1, false)]),
    ]);
    let (_, maps) = step(&Snapshot::default(), &two);
    let id = maps.vips[&vip_key(&vip_at(2))].id;
    let slot = slot_of(&maps, 1);
    let (plan, after) = step(&maps, &state(vec![vip(1, vec![b(0, 1, false)])]));
    assert_eq!(plan.removed_vips, vec![(vip_key(&vip_at(2)), id)]);
    assert!(plan.removed_slots.contains_key(&slot));
    assert!(plan.emptied_tables.contains(&id));
    assert!(!plan.vips[0].rebuild_table, "the other VIP's table stays");
    assert_eq!(after.vip_addrs.len(), 1);
}

#[test]
fn a_table_is_rebuilt_from_what_is_installed_not_from_the_slots() {
    let (_, before) = step(&Snapshot::default(), &three());
    let scaled = state(vec![
        vip(1, vec![b(0, 1, false), b(1, 1, true), b(2, 1, false)]),
        vip(2, vec![b(3, 1, false)]),
    ]);
    // An apply stopped after its slots were written, before the tables: the slots say
    // what the desired state says, the installed tables do not.
    let plan = plan_for(&before, &scaled);
    let mut stopped = applied(&before, &plan);
    stopped.tables = before.tables.clone();
    stopped.vips = before.vips.clone();
    let retry = plan_for(&stopped, &scaled);
    assert!(
        retry.vips.iter().all(|v| v.rebuild_table),
        "stale tables are rebuilt"
    );
    // A table installed without a fingerprint (an older sluice): rebuilt once.
    let mut unmarked = applied(&before, &plan);
    unmarked.tables.clear();
    assert!(
        plan_for(&unmarked, &scaled)
            .vips
            .iter()
            .all(|v| v.rebuild_table)
    );
    // Installed as planned: nothing to rebuild.
    let done = applied(&before, &plan);
    assert!(
        plan_for(&done, &scaled)
            .vips
            .iter()
            .all(|v| !v.rebuild_table)
    );
}

#[test]
fn slots_of_no_vip_are_freed_and_their_table_released_unless_reused() {
    let (_, mut maps) = step(&Snapshot::default(), &three());
    // An interrupted run left slots of VIP ids 7 and 0 (the lowest free id is 1).
    let orphan = |vip_id: u32, i: u32| SlotValue {
        vip_id,
        state: backend_state::ACTIVE,
        addr: raw_addr(backend_ip(i)).0,
        family: FAMILY_V4,
        generation: 1,
        ..SlotValue::default()
    };
    maps.add_slot(100, orphan(7, 50));
    let vip_1_id = maps.vips.values().next().unwrap().id;
    assert_eq!(vip_1_id, 0);
    maps.add_slot(101, orphan(1, 51));
    let desired = state(vec![
        vip(1, vec![b(0, 1, false), b(1, 1, false), b(2, 1, false)]),
        vip(2, vec![b(5, 1, false)]),
    ]);
    let plan = plan_for(&maps, &desired);
    assert!(plan.removed_slots.contains_key(&100) && plan.removed_slots.contains_key(&101));
    assert_eq!(plan.vips[1].id, 1, "the new VIP takes the orphans' id");
    assert!(plan.emptied_tables.contains(&7));
    assert!(
        !plan.emptied_tables.contains(&1),
        "the new VIP's table is not emptied behind it"
    );
}

#[test]
fn source_range_keys_carry_the_family_and_any_list_filters() {
    let mut only_v6 = vip(1, vec![b(0, 1, false)]);
    only_v6.source_ranges = vec!["::/0".parse().unwrap()];
    let mut mixed = vip(2, vec![b(0, 1, false)]);
    mixed.source_ranges = vec!["192.0.2.0/24".parse().unwrap(), "::/0".parse().unwrap()];
    let plan = plan_for(&Snapshot::default(), &state(vec![only_v6, mixed]));
    for vip in &plan.vips {
        assert_ne!(vip.info.flags & vip_flags::SOURCE_RANGES, 0);
    }
    let scopes: BTreeSet<(u32, u32)> = plan
        .source_ranges
        .iter()
        .map(|r| (range_vip(r), u32::from_be(r.1.scope_be) >> 24))
        .collect();
    let id = |n: usize| plan.vips[n].id;
    assert_eq!(
        scopes,
        BTreeSet::from([
            (id(0), u32::from(FAMILY_V6)),
            (id(1), u32::from(FAMILY_V4)),
            (id(1), u32::from(FAMILY_V6)),
        ])
    );
}

#[test]
fn narrowed_ranges_go_before_the_vip_entry_other_stale_ones_with_the_removals() {
    let mut v = vip(1, vec![b(0, 1, false)]);
    v.source_ranges = vec![
        "10.0.0.0/8".parse().unwrap(),
        "192.0.2.0/24".parse().unwrap(),
    ];
    let (_, maps) = step(&Snapshot::default(), &state(vec![v.clone()]));
    v.source_ranges.pop();
    let plan = plan_for(&maps, &state(vec![v.clone()]));
    assert_eq!(plan.early_stale_ranges.len(), 1, "narrowed: removed early");
    v.source_ranges.clear();
    let plan = plan_for(&maps, &state(vec![v]));
    assert!(
        plan.early_stale_ranges.is_empty(),
        "no filter any more: the ranges go after the entry that clears the flag"
    );
    assert!(plan.source_ranges.is_empty());
}

#[test]
fn over_max_vips_removals_apply_and_new_vips_wait_for_room() {
    let full = state((0..MAX_VIPS).map(|n| vip(n, vec![])).collect());
    let (plan, maps) = step(&Snapshot::default(), &full);
    assert!(plan.left_out.is_empty());
    assert_eq!(maps.vips.len(), MAX_VIPS as usize);
    // VIP 0 goes, two come.
    let next = state((1..MAX_VIPS + 2).map(|n| vip(n, vec![])).collect());
    let (plan, maps) = step(&maps, &next);
    assert_eq!(plan.removed_vips.len(), 1, "the removal is applied");
    assert_eq!(
        plan.left_out,
        vec![
            LeftOut::Vip {
                vip: vip_at(MAX_VIPS)
            },
            LeftOut::Vip {
                vip: vip_at(MAX_VIPS + 1)
            }
        ],
        "the removed VIP's id and address are free only once it is gone"
    );
    assert!(plan.frees);
    // The next pass (the same reconcile's second) uses the room.
    let (plan, maps) = step(&maps, &next);
    assert_eq!(
        plan.left_out,
        vec![LeftOut::Vip {
            vip: vip_at(MAX_VIPS + 1)
        }]
    );
    assert_eq!(plan.vips.iter().filter(|v| v.is_new).count(), 1);
    assert!(!plan.frees, "nothing more to gain from another pass");
    assert_eq!(maps.vips.len(), MAX_VIPS as usize);
}

#[test]
fn over_max_backends_drains_and_removals_apply_and_new_backends_wait() {
    let per_vip = MAX_BACKENDS / 16;
    let full = |n: u32, extra: Option<Backend>, drop_first: bool| {
        let mut backends: Vec<Backend> = (0..per_vip).map(|i| b(i, 1, false)).collect();
        if n == 0 {
            if drop_first {
                backends.remove(0);
            }
            backends[1].drain = true;
            backends.extend(extra);
        }
        vip(n, backends)
    };
    let start = state((0..16).map(|n| full(n, None, false)).collect());
    let (plan, mut maps) = step(&Snapshot::default(), &start);
    // Leave the generations of the slots out of the comparison below.
    maps.generations.clear();
    assert!(plan.left_out.is_empty());
    assert_eq!(maps.slots.len(), MAX_BACKENDS as usize);
    let removed = slot_of(&maps, 0);
    let next = state(
        (0..16)
            .map(|n| full(n, Some(b(per_vip, 1, false)), true))
            .collect(),
    );
    let (plan, maps) = step(&maps, &next);
    assert!(
        plan.removed_slots.contains_key(&removed),
        "the removal is applied"
    );
    assert_eq!(plan.slots_after.len(), 1, "the drain is applied");
    assert_eq!(
        plan.left_out,
        vec![LeftOut::Backend {
            vip: vip_at(0),
            backend: backend_ip(per_vip)
        }]
    );
    let vip0 = &plan.vips[0];
    assert!(vip0.rebuild_table);
    assert_eq!(
        vip0.backends.len(),
        per_vip as usize - 1,
        "built without it"
    );
    let (plan, _) = step(&maps, &next);
    assert!(plan.left_out.is_empty());
    assert_eq!(plan.slots_before.len(), 1);
    assert_eq!(plan.slots_before[0].0, removed, "it takes the freed slot");
}

#[test]
fn over_max_source_ranges_new_vips_wait_and_changed_lists_fail_closed() {
    let ranges = |first: u32, n: u32| -> Vec<IpNet> {
        (first..first + n)
            .map(|i| IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0xc000_0000 + i), 32).unwrap()))
            .collect()
    };
    let mut big = vip(1, vec![b(0, 1, false)]);
    big.source_ranges = ranges(0, MAX_SOURCE_RANGES);
    let (plan, maps) = step(&Snapshot::default(), &state(vec![big.clone()]));
    assert!(plan.left_out.is_empty());
    // The big list swaps one range for another, and a new VIP with one range comes.
    let mut changed = big.clone();
    changed.source_ranges = ranges(1, MAX_SOURCE_RANGES);
    let mut small = vip(2, vec![b(0, 1, false)]);
    small.source_ranges = ranges(100_000, 1);
    let next = state(vec![changed, small]);
    let (plan, maps) = step(&maps, &next);
    assert_eq!(
        plan.left_out,
        vec![
            LeftOut::SourceRanges { vip: vip_at(1) },
            LeftOut::Vip { vip: vip_at(2) }
        ]
    );
    let vip1 = &plan.vips[0];
    assert_ne!(
        vip1.info.flags & vip_flags::SOURCE_RANGES,
        0,
        "still filtering"
    );
    assert_eq!(
        plan.source_ranges.len(),
        MAX_SOURCE_RANGES as usize - 1,
        "only the listed ranges it had: the dropped one goes, the new one waits"
    );
    assert_eq!(plan.early_stale_ranges.len(), 1);
    assert!(plan.frees);
    let (plan, _) = step(&maps, &next);
    assert_eq!(plan.left_out, vec![LeftOut::Vip { vip: vip_at(2) }]);
    assert_eq!(plan.source_ranges.len(), MAX_SOURCE_RANGES as usize);
}

#[test]
fn the_fingerprint_follows_every_input_of_a_table() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let base = plan_for(&maps, &three()).vips[0].fingerprint;
    let mut other_size = three();
    other_size.settings.maglev_table_size = Some(257);
    for desired in [
        with_backend_1(b(1, 2, false)),
        with_backend_1(b(7, 1, false)),
        other_size,
    ] {
        assert_ne!(plan_for(&maps, &desired).vips[0].fingerprint, base);
    }
}

/// The co-location step: the peers' MACs (at most `MAX_PEERS`), the decapsulator's sets only
/// with peers (their addresses and the encap source prefixes allowed, this node's addresses
/// local; at most `MAX_DECAP_ADDRS` in all, allowed sources first) and the flood guard's limit.
#[test]
fn colocation_plan_lists_peers_decap_sets_and_settings() {
    let mut desired = state(vec![]);
    desired.settings.max_new_flows_per_cpu = 1234;
    let mut resolved = Resolved::default();
    resolved.local.insert(backend_ip(1));
    resolved.peer_macs.insert(MacAddr([2, 0, 0, 0, 0, 9]));
    // Without peers: no decapsulation (nothing sends us encapsulated frames), the guard's limit.
    let alone = plan_colocation(&desired, &resolved);
    assert!(alone.decap_allow.is_empty() && alone.decap_local.is_empty());
    assert_eq!(alone.settings.max_new_flows_per_cpu, 1234);
    assert_eq!(
        alone.peers.len(),
        1,
        "resolved peer MACs are written as found"
    );

    desired.peers = (2..4).map(backend_ip).collect();
    desired.settings.encap_source_v4 = Some("192.0.2.0/24".parse().unwrap());
    let with_peers = plan_colocation(&desired, &resolved);
    let allow: Vec<String> = with_peers
        .decap_allow
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(allow, ["10.1.0.2/32", "10.1.0.3/32", "192.0.2.0/24"]);
    assert_eq!(with_peers.decap_local, vec![backend_ip(1)]);

    // Past the maps' room: MAX_PEERS MACs, MAX_DECAP_ADDRS addresses, allowed sources first.
    resolved.peer_macs = (0..MAX_PEERS + 5)
        .map(|i| MacAddr([2, 1, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]))
        .collect();
    desired.peers = (0..MAX_DECAP_ADDRS + 3)
        .map(|i| backend_ip(100 + i))
        .collect();
    let full = plan_colocation(&desired, &resolved);
    assert_eq!(full.peers.len(), MAX_PEERS as usize);
    assert_eq!(full.decap_allow.len(), MAX_DECAP_ADDRS as usize);
    assert!(
        full.decap_local.is_empty(),
        "no room left for local addresses"
    );
}
