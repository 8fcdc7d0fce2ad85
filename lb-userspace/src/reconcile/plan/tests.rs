//! The plan without a kernel: each ordering rule of the apply, drains, weight changes,
//! removals, stale tables and capacity limits, over an in-memory model of the maps.

use std::net::Ipv4Addr;

use super::*;
use crate::model::{FlowState, MacAddr, Protocol, VipAddr};
use lb_common::VipRef;

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
    for (list, mode) in desired.distinct_backend_lists() {
        for b in list {
            out.targets.insert(
                (b.addr, mode),
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

/// The maps after `plan` was applied in full.
fn applied(current: &Snapshot, plan: &Plan) -> Snapshot {
    plan.applied_to(current.clone())
}

/// Plans `desired` from `current` and applies it: (plan, maps after).
fn step(current: &Snapshot, desired: &Desired) -> (Plan, Snapshot) {
    let plan = plan_for(current, desired);
    let next = applied(current, &plan);
    (plan, next)
}

/// The backend entry of backend `i`.
fn id_of(current: &Snapshot, i: u32) -> u32 {
    current
        .backends
        .iter()
        .find(|(_, v)| addr_from_raw(&v.addr, v.family) == backend_ip(i))
        .map(|(id, _)| *id)
        .unwrap()
}

/// Table `plan`'s weight of backend entry `id` as `TABLE_MEMBERS` gets it.
fn member_of(table: &TablePlan, id: u32) -> Option<MemberWeight> {
    table
        .members
        .iter()
        .find(|(b, _)| *b == id)
        .map(|(_, w)| *w)
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
    assert!(plan.backends.is_empty() && plan.tables.is_empty());
    assert!(plan.freed_backends.is_empty() && plan.freed_tables.is_empty());
    assert!(plan.removed_vips.is_empty() && plan.cleared_refs.is_empty());
    assert!(plan.left_out.is_empty() && !plan.frees);
}

#[test]
fn vips_with_the_same_backends_share_their_entries_and_one_table() {
    let same = |n: u32| vip(n, vec![b(0, 1, false), b(1, 1, false), b(2, 1, false)]);
    let mut vips: Vec<Vip> = (0..100).map(same).collect();
    vips.push(vip(100, vec![b(0, 1, false), b(3, 1, false)]));
    let (plan, maps) = step(&Snapshot::default(), &state(vips.clone()));
    assert_eq!(
        plan.backends.len(),
        4,
        "one entry per backend, whatever the VIPs"
    );
    assert_eq!(
        plan.tables.len(),
        2,
        "one table per distinct set of backends"
    );
    let shared = plan.vips[0].info.table;
    assert!(plan.vips[..100].iter().all(|v| v.info.table == shared));
    assert_ne!(plan.vips[100].info.table, shared);
    assert_eq!(plan.tables[0].info.members, 3);
    // A backend added to the hundred: one new entry, one new table, the old one freed; the
    // other VIP's table stays.
    for v in &mut vips[..100] {
        let mut more = v.backends.to_vec();
        more.push(b(4, 1, false));
        v.backends = more.into();
    }
    let (plan, after) = step(&maps, &state(vips));
    assert_eq!(plan.backends.len(), 1);
    assert!(plan.backends[0].2, "new");
    assert_eq!(plan.tables.len(), 1);
    assert_eq!(plan.freed_tables, BTreeSet::from([shared]));
    assert!(plan.freed_backends.is_empty());
    assert_eq!(after.tables.len(), 2);
    assert_eq!(after.backends.len(), 5);
}

#[test]
fn a_drain_is_a_new_table_that_keeps_the_backend_a_member() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let id = id_of(&maps, 1);
    let old_table = maps.vips.values().next().unwrap().table;
    for (label, changed) in [("drain", b(1, 1, true)), ("weight 0", b(1, 0, false))] {
        let plan = plan_for(&maps, &with_backend_1(changed));
        assert!(plan.backends.is_empty(), "{label}: its entry is unchanged");
        assert_eq!(plan.tables.len(), 1, "{label}");
        let table = &plan.tables[0];
        assert!(
            table.info.has(id),
            "{label}: still a member: its flows stay"
        );
        assert_eq!(
            member_pick_weight(member_of(table, id).unwrap()),
            0,
            "{label}"
        );
        assert_eq!(plan.vips[0].info.table, table.id, "{label}");
        assert_ne!(table.id, old_table, "{label}: at an id no VIP points at");
        assert_eq!(plan.vips[0].info.live_backends, 2, "{label}");
        assert_eq!(plan.freed_tables, BTreeSet::from([old_table]), "{label}");
        assert!(plan.freed_backends.is_empty(), "{label}");
    }
    let drained = plan_for(&maps, &with_backend_1(b(1, 1, true)));
    assert_eq!(
        member_of(&drained.tables[0], id),
        Some(1 | MEMBER_DRAINING),
        "the weight it comes back with is kept"
    );
}

#[test]
fn an_unresolved_backend_drains_on_its_last_entry() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let id = id_of(&maps, 1);
    let desired = three();
    let mut lookups = resolved(&desired);
    lookups
        .targets
        .retain(|(addr, _), _| *addr != backend_ip(1));
    let drained = plan(&maps, &iface(), &desired, &lookups).unwrap();
    assert!(
        drained.backends.is_empty(),
        "its entry (last known MAC) stays"
    );
    assert!(drained.freed_backends.is_empty());
    let table = &drained.tables[0];
    assert_eq!(member_of(table, id), Some(1 | MEMBER_DRAINING));
    assert!(table.info.has(id));
    // Never resolved: left out.
    let mut fresh = resolved(&desired);
    fresh.targets.retain(|(addr, _), _| *addr != backend_ip(1));
    let never = plan(&Snapshot::default(), &iface(), &desired, &fresh).unwrap();
    assert_eq!(never.tables[0].info.members, 2);
}

#[test]
fn undrains_and_weight_changes_are_new_tables_and_a_new_mac_rewrites_the_entry() {
    let (_, drained) = step(&Snapshot::default(), &with_backend_1(b(1, 1, true)));
    let id = id_of(&drained, 1);
    for (label, changed, weight) in [
        ("undrain", b(1, 1, false), 1),
        ("weight 3", b(1, 3, false), 3),
    ] {
        let plan = plan_for(&drained, &with_backend_1(changed));
        assert!(plan.backends.is_empty(), "{label}");
        assert_eq!(plan.tables.len(), 1, "{label}");
        assert_eq!(member_of(&plan.tables[0], id), Some(weight), "{label}");
        assert_eq!(plan.vips[0].info.live_backends, 3, "{label}");
    }
    let mut moved = b(1, 1, true);
    moved.mac = Some(MacAddr([2, 0xbe, 0, 0, 9, 9]));
    let plan = plan_for(&drained, &with_backend_1(moved));
    assert_eq!(plan.backends.len(), 1, "the entry takes the new MAC");
    let (written, value, is_new) = plan.backends[0];
    assert_eq!((written, is_new), (id, false));
    assert_eq!(value.dst_mac, [2, 0xbe, 0, 0, 9, 9]);
    assert_eq!(
        value.generation, drained.backends[&id].generation,
        "same backend"
    );
    assert!(plan.tables.is_empty(), "the table does not change");
}

#[test]
fn removals_free_entries_after_the_tables_and_never_reuse_them_in_the_same_plan() {
    let (_, maps) = step(&Snapshot::default(), &three());
    let freed = id_of(&maps, 1);
    let generation = maps.backends[&freed].generation;
    assert_ne!(generation, 0, "an entry in use has a generation");
    // Backend 1 goes and backend 3 comes in one reconcile: 3 gets another entry.
    let swap = state(vec![vip(
        1,
        vec![b(0, 1, false), b(2, 1, false), b(3, 1, false)],
    )]);
    let (plan, maps) = step(&maps, &swap);
    assert_eq!(plan.freed_backends.get(&freed), Some(&generation));
    let (new_id, value, is_new) = plan.backends[0];
    assert!(is_new && new_id != freed);
    assert_eq!(value.generation, 1);
    assert!(!plan.tables[0].info.has(freed), "its flows re-hash");
    assert!(plan.frees);
    // One reconcile later the freed entry goes to a new backend, of a new generation: flows
    // recorded with the old one do not follow it.
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
    let (id, value, is_new) = plan.backends[0];
    assert!(is_new);
    assert_eq!(id, freed);
    assert_eq!(value.generation, generation + 1);
}

#[test]
fn a_removed_vip_goes_with_its_table_and_the_backends_only_it_had() {
    let two = state(vec![
        vip(1, vec![b(0, 1, false)]),
        vip(2, vec![b(0, 1, false), b(1, 1, false)]),
    ]);
    let (_, maps) = step(&Snapshot::default(), &two);
    let gone = maps.vips[&vip_key(&vip_at(2))];
    let (plan, after) = step(&maps, &state(vec![vip(1, vec![b(0, 1, false)])]));
    assert_eq!(plan.removed_vips, vec![(vip_key(&vip_at(2)), gone.id)]);
    assert_eq!(plan.cleared_refs, BTreeSet::from([gone.id]));
    assert_eq!(plan.freed_tables, BTreeSet::from([gone.table]));
    assert_eq!(
        plan.freed_backends.keys().copied().collect::<Vec<_>>(),
        vec![id_of(&maps, 1)],
        "backend 0 stays: VIP 1 has it"
    );
    assert!(plan.tables.is_empty(), "the other VIP's table stays");
    assert_eq!(after.vip_addrs.len(), 1);
}

#[test]
fn a_table_is_reused_by_its_installed_contents_and_rebuilt_when_not_installed() {
    let (_, before) = step(&Snapshot::default(), &three());
    let scaled = state(vec![
        vip(1, vec![b(0, 1, false), b(1, 1, true), b(2, 1, false)]),
        vip(2, vec![b(3, 1, false)]),
    ]);
    // An apply stopped after its tables were installed, before the VIPs pointed at them: the
    // tables are not the VIPs' yet, so they are installed again (at ids no VIP points at).
    let plan = plan_for(&before, &scaled);
    assert_eq!(plan.tables.len(), 2);
    let mut stopped = applied(&before, &plan);
    stopped.vips = before.vips.clone();
    stopped.vip_refs = before.vip_refs.clone();
    stopped.tables = before.tables.clone();
    let retry = plan_for(&stopped, &scaled);
    assert_eq!(retry.tables.len(), 2, "not pointed at: installed again");
    // Installed as planned: nothing to rebuild.
    let done = applied(&before, &plan);
    assert!(plan_for(&done, &scaled).tables.is_empty());
    // A VIP moving to contents another VIP has: it takes that table.
    let joined = state(vec![
        vip(1, vec![b(0, 1, false), b(1, 1, true), b(2, 1, false)]),
        vip(2, vec![b(0, 1, false), b(1, 1, true), b(2, 1, false)]),
    ]);
    let plan = plan_for(&done, &joined);
    assert!(plan.tables.is_empty());
    assert_eq!(plan.vips[0].info.table, plan.vips[1].info.table);
    assert_eq!(plan.freed_tables.len(), 1, "VIP 2's old table");
}

fn second_chance(mut desired: Desired) -> Desired {
    desired.settings.flow_state = FlowState::SecondChance;
    desired
}

#[test]
fn a_vip_keeps_the_table_it_left_as_its_previous_until_its_next_change() {
    let (plan, first) = step(&Snapshot::default(), &second_chance(three()));
    assert_eq!(
        plan.vips[0].info.previous_table, NO_TABLE,
        "a new VIP has none"
    );
    let t0 = first.vips[&vip_key(&vip_at(1))].table;

    // A change: the table it leaves is its previous one, kept whole (not freed, its members'
    // entries kept, even one no current table has).
    let without_2 = second_chance(state(vec![vip(1, vec![b(0, 1, false), b(1, 1, false)])]));
    let (plan, second) = step(&first, &without_2);
    let info = plan.vips[0].info;
    assert_ne!(info.table, t0);
    assert_eq!(info.previous_table, t0);
    assert!(plan.freed_tables.is_empty());
    assert!(
        plan.freed_backends.is_empty(),
        "backend 2 is in the previous table"
    );
    assert!(second.tables.contains_key(&t0));
    let t1 = info.table;

    // No change: the previous table stays.
    let (plan, _) = step(&second, &without_2);
    assert!(plan.vips.iter().all(|v| v.info.previous_table == t0));
    assert!(plan.freed_tables.is_empty() && plan.tables.is_empty());

    // The next change replaces it (one generation): the table before that is freed, and the
    // backend only it had goes with it.
    let with_3 = second_chance(state(vec![vip(
        1,
        vec![b(0, 1, false), b(1, 1, false), b(3, 1, false)],
    )]));
    let (plan, third) = step(&second, &with_3);
    assert_eq!(plan.vips[0].info.previous_table, t1);
    assert_eq!(plan.freed_tables, BTreeSet::from([t0]));
    assert_eq!(
        plan.freed_backends.keys().copied().collect::<Vec<_>>(),
        vec![id_of(&second, 2)]
    );
    // A table a VIP names as previous is never given new contents in the meantime.
    assert!(plan.tables.iter().all(|t| t.id != t1));

    // Back to the table it left: reused (installed, its previous), and the other one becomes
    // its previous.
    let (plan, _) = step(&third, &without_2);
    assert!(plan.tables.is_empty(), "its previous table is reused");
    assert_eq!(plan.vips[0].info.table, t1);
    assert_ne!(plan.vips[0].info.previous_table, t1);
    assert!(plan.freed_tables.is_empty());

    // A removed VIP frees both.
    let (plan, _) = step(&third, &second_chance(state(vec![])));
    assert_eq!(
        plan.freed_tables,
        BTreeSet::from([t1, third.vips[&vip_key(&vip_at(1))].table])
    );
    // Back to table mode: nothing reads a previous table, it is freed at once.
    let (plan, _) = step(&third, &state(with_3.vips.clone()));
    assert_eq!(plan.vips[0].info.previous_table, NO_TABLE);
    assert_eq!(plan.freed_tables, BTreeSet::from([t1]));
}

/// A move that changes no pick (a drained member removed) keeps the previous table: it still
/// names where the drain's moved flows began (a node drained, then removed, keeps them).
#[test]
fn a_move_that_changes_no_pick_keeps_the_previous_table() {
    let (_, first) = step(&Snapshot::default(), &second_chance(three()));
    let t0 = first.vips[&vip_key(&vip_at(1))].table;
    let (plan, drained) = step(&first, &second_chance(with_backend_1(b(1, 1, true))));
    let t1 = plan.vips[0].info.table;
    assert_eq!(plan.vips[0].info.previous_table, t0);

    let removed = second_chance(state(vec![vip(1, vec![b(0, 1, false), b(2, 1, false)])]));
    let (plan, gone) = step(&drained, &removed);
    let info = plan.vips[0].info;
    assert_ne!(info.table, t1, "its members differ: another table");
    assert_eq!(info.previous_table, t0, "the drain's previous table stays");
    assert_eq!(plan.freed_tables, BTreeSet::from([t1]));
    assert!(
        plan.freed_backends.is_empty(),
        "node 1's entry stays: the previous table has it"
    );

    // A change that moves flows replaces it, as ever.
    let weighted = second_chance(state(vec![vip(1, vec![b(0, 3, false), b(2, 1, false)])]));
    let (plan, _) = step(&gone, &weighted);
    assert_eq!(plan.vips[0].info.previous_table, info.table);
    assert_eq!(plan.freed_tables, BTreeSet::from([t0]));
}

#[test]
fn table_mode_names_no_previous_table() {
    let (_, first) = step(&Snapshot::default(), &three());
    let old = first.vips[&vip_key(&vip_at(1))].table;
    let plan = plan_for(&first, &with_backend_1(b(1, 1, true)));
    assert_eq!(plan.vips[0].info.previous_table, NO_TABLE);
    assert_eq!(plan.freed_tables, BTreeSet::from([old]));
}

#[test]
fn a_previous_table_that_is_not_installed_whole_is_not_named() {
    let (_, first) = step(&Snapshot::default(), &second_chance(three()));
    let mut broken = first;
    // An interrupted install's table has no fingerprint: `Snapshot::read` leaves it out.
    let t0 = broken.vips[&vip_key(&vip_at(1))].table;
    broken.tables.remove(&t0);
    let plan = plan_for(
        &broken,
        &second_chance(state(vec![vip(1, vec![b(0, 1, false), b(1, 1, false)])])),
    );
    assert_eq!(plan.vips[0].info.previous_table, NO_TABLE);
}

#[test]
fn refs_of_no_vip_are_cleared_unless_a_new_vip_takes_the_id() {
    let (_, mut maps) = step(&Snapshot::default(), &three());
    // An interrupted run left VIP_BY_ID entries of ids 7 and 1 (the lowest free id is 1).
    let stale = VipRef {
        key: vip_key(&vip_at(50)),
        table: 3,
    };
    maps.vip_refs.insert(7, stale);
    maps.vip_refs.insert(1, stale);
    let desired = state(vec![
        vip(1, vec![b(0, 1, false), b(1, 1, false), b(2, 1, false)]),
        vip(2, vec![b(5, 1, false)]),
    ]);
    let plan = plan_for(&maps, &desired);
    assert_eq!(plan.vips[1].info.id, 1, "the new VIP takes the free id");
    assert_eq!(plan.cleared_refs, BTreeSet::from([7]));
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
    let id = |n: usize| plan.vips[n].info.id;
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
    assert_eq!(plan.tables.len(), 1, "one empty table for all");
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
    // 16 VIPs with distinct backends fill every entry.
    let full = |n: u32, extra: Option<Backend>, drop_first: bool| {
        let mut backends: Vec<Backend> =
            (0..per_vip).map(|i| b(n * per_vip + i, 1, false)).collect();
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
    // Leave the generations of the entries out of the comparison below.
    maps.generations.clear();
    assert!(plan.left_out.is_empty());
    assert_eq!(maps.backends.len(), MAX_BACKENDS as usize);
    let removed = id_of(&maps, 0);
    let newcomer = b(MAX_BACKENDS, 1, false);
    let next = state(
        (0..16)
            .map(|n| full(n, Some(newcomer.clone()), true))
            .collect(),
    );
    let (plan, maps) = step(&maps, &next);
    assert!(
        plan.freed_backends.contains_key(&removed),
        "the removal is applied"
    );
    assert_eq!(
        plan.left_out,
        vec![LeftOut::Backend {
            vip: vip_at(0),
            backend: backend_ip(MAX_BACKENDS)
        }]
    );
    assert_eq!(plan.tables.len(), 1, "the drain is applied");
    assert_eq!(
        plan.tables[0].info.members,
        per_vip - 1,
        "built without the newcomer"
    );
    let (plan, _) = step(&maps, &next);
    assert!(plan.left_out.is_empty());
    assert_eq!(plan.backends.len(), 1);
    assert_eq!(plan.backends[0].0, removed, "it takes the freed entry");
}

#[test]
fn over_max_tables_a_changed_vip_keeps_its_table_and_a_new_one_waits() {
    let own = |n: u32| vip(n, vec![b(n, 1, false)]);
    let start = state((0..MAX_TABLES).map(own).collect());
    let (plan, maps) = step(&Snapshot::default(), &start);
    assert!(plan.left_out.is_empty());
    assert_eq!(maps.tables.len(), MAX_TABLES as usize);
    // VIP 0 gets a second backend (a new set), VIP 1 goes, VIP MAX_TABLES comes with its own.
    let mut vips: Vec<Vip> = (2..=MAX_TABLES).map(own).collect();
    vips.insert(0, vip(0, vec![b(0, 1, false), b(1, 1, false)]));
    let next = state(vips);
    let (plan, maps) = step(&maps, &next);
    assert_eq!(
        plan.left_out,
        vec![
            LeftOut::Table { vip: vip_at(0) },
            LeftOut::Table {
                vip: vip_at(MAX_TABLES)
            }
        ]
    );
    let kept = &plan.vips[0];
    assert_eq!(
        kept.info,
        maps.vips[&vip_key(&vip_at(0))],
        "VIP 0 keeps its table"
    );
    assert!(plan.frees, "VIP 1's table is freed");
    let (plan, _) = step(&maps, &next);
    assert_eq!(
        plan.left_out,
        vec![LeftOut::Table {
            vip: vip_at(MAX_TABLES)
        }],
        "one freed table: the first VIP in order takes it"
    );
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
    let base = maps.tables.values().next().unwrap().fingerprint;
    let mut other_size = three();
    other_size.settings.maglev_table_size = Some(257);
    for desired in [
        with_backend_1(b(1, 2, false)),
        with_backend_1(b(1, 1, true)),
        with_backend_1(b(7, 1, false)),
        other_size,
    ] {
        let plan = plan_for(&maps, &desired);
        assert_ne!(plan.tables[0].info.fingerprint, base);
    }
    // The backends' order in the desired state is not an input.
    let reordered = state(vec![vip(
        1,
        vec![b(2, 1, false), b(0, 1, false), b(1, 1, false)],
    )]);
    assert!(plan_for(&maps, &reordered).tables.is_empty());
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
