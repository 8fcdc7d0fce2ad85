//! Map exhaustion through the real program: a connection table far smaller than the flows it
//! sees (LRU eviction is silent: the kernel keeps no count of it, and sluice adds none on the
//! fast path; what shows it is `flow_miss` growing while `sluice_flows` stays at the table's
//! size), and flows whose entry was evicted still reach their backend, because Maglev picks
//! the same one again. The re-sent packets are ACKs, which consult the connection table (a
//! SYN never does), and the table is read before and after: an evicted flow misses, is
//! recorded again, and its entry names the backend it went to. And the VIP limit: a reconcile
//! past it applies what fits, names what waits, and never freezes.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{GlobalCounter, MAX_VIPS};
use lb_userspace::model::{Protocol, VipAddr};
use sluice_tests::{
    fixtures::{Frame, Harness, TCP_ACK, TCP_SYN, XDP_TX, assert_forwarded, desired, pin_to_cpu},
    require_root,
};

const TABLE: u32 = 1024;
const FLOWS: u16 = 8192;

/// The kernel's possible CPUs (what per-CPU maps are sized by).
fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    text.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

#[test]
fn a_full_connection_table_evicts_and_flows_keep_their_backend() {
    require_root();
    // One CPU: the table keeps an LRU list per CPU, and which entries an insert evicts is then
    // one list's order (the program runs on the caller's CPU).
    pin_to_cpu(0);
    let mut h = Harness::with_flow_table(TABLE).expect("load the XDP object");
    h.apply(&desired(
        Protocol::Tcp,
        &[(0, 1, false), (1, 1, false), (2, 1, false)],
    ))
    .expect("program the maps");
    let port = |i: u16| 10_000 + i;
    let mut first = Vec::new();
    for i in 0..FLOWS {
        let (verdict, out) = h.run(&Frame::tcp(port(i), TCP_SYN).bytes()).unwrap();
        assert_eq!(verdict, XDP_TX, "flow {i}");
        first.push(Harness::backend_of(&out).expect("a backend"));
    }
    let went = |p: u16| Some(first[usize::from(p - port(0))]);
    let before = h.flow_entries().unwrap();
    println!(
        "{FLOWS} flows through a {TABLE}-entry table: {} entries kept",
        before.len()
    );
    // The table's LRU lists are per CPU (BPF_F_NO_COMMON_LRU), each with an equal share of
    // max_entries: one CPU fills its share, never more.
    let share = TABLE as usize / possible_cpus();
    assert!(
        before.len() <= share && before.len() >= share * 3 / 4,
        "{} entries in one CPU's share of {share}",
        before.len()
    );
    for (&p, &b) in &before {
        assert_eq!(b, went(p), "the entry of port {p} names another backend");
    }
    let misses = h.counter(GlobalCounter::FlowMiss).unwrap();
    assert_eq!(misses, u64::from(FLOWS), "every new flow missed");

    // The earliest flows were evicted: their ACKs miss the table, Maglev sends each where it
    // went, and the miss records it again.
    let evicted: Vec<u16> = (0..FLOWS / 4).map(port).collect();
    assert!(
        evicted.iter().all(|p| !before.contains_key(p)),
        "an early flow is still in the table"
    );
    let hits = h.counter(GlobalCounter::FlowHit).unwrap();
    for &p in &evicted {
        let (verdict, out) = h.run(&Frame::tcp(p, TCP_ACK).bytes()).unwrap();
        assert_eq!(verdict, XDP_TX, "the ACK of evicted port {p}");
        assert_eq!(Harness::backend_of(&out), went(p), "the ACK of port {p}");
    }
    let again = h.counter(GlobalCounter::FlowMiss).unwrap() - misses;
    assert_eq!(
        again,
        evicted.len() as u64,
        "every evicted flow's ACK missed"
    );
    assert_eq!(h.counter(GlobalCounter::FlowHit).unwrap(), hits);
    let after = h.flow_entries().unwrap();
    println!(
        "re-sent {} evicted flows as ACKs: {again} missed, all on their backend; \
         {} entries before, {} after",
        evicted.len(),
        before.len(),
        after.len()
    );
    // The table is as full as before, and now holds the latest re-sent flows, each on the
    // backend it went to.
    assert!(
        after.len() <= share && after.len() + 8 >= before.len(),
        "{} entries after, {} before",
        after.len(),
        before.len()
    );
    for (&p, &b) in &after {
        assert!(
            evicted.contains(&p),
            "port {p} is still in the table: the {} re-sent flows that missed were not \
             recorded over it",
            evicted.len()
        );
        assert_eq!(
            b,
            went(p),
            "the new entry of port {p} names another backend"
        );
    }

    // And the flows in the table now hit it, each on its backend.
    let (misses, hits) = (
        h.counter(GlobalCounter::FlowMiss).unwrap(),
        h.counter(GlobalCounter::FlowHit).unwrap(),
    );
    for &p in after.keys() {
        let (verdict, out) = h.run(&Frame::tcp(p, TCP_ACK).bytes()).unwrap();
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            Harness::backend_of(&out),
            went(p),
            "the ACK of kept port {p}"
        );
    }
    assert_eq!(h.counter(GlobalCounter::FlowMiss).unwrap(), misses);
    assert_eq!(
        h.counter(GlobalCounter::FlowHit).unwrap() - hits,
        after.len() as u64,
        "every kept flow's ACK hit the table"
    );
}

#[test]
fn a_reconcile_past_the_vip_limit_applies_what_fits_and_reports_the_rest() {
    require_root();
    let mut h = Harness::with_flow_table(TABLE).expect("load the XDP object");
    let base = desired(Protocol::Tcp, &[(0, 1, false)]);
    h.apply(&base).expect("one VIP");
    let mut too_many = base.clone();
    let template = too_many.vips[0].clone();
    too_many.vips = (0..=MAX_VIPS)
        .map(|i| {
            let mut v = template.clone();
            v.key = VipAddr {
                addr: IpAddr::V4(Ipv4Addr::from(0x0a64_0000 + i)),
                port: 80,
                protocol: Protocol::Tcp,
            };
            v
        })
        .collect();
    too_many.vips.sort_by_key(|v| v.key);
    let summary = h.apply(&too_many).expect("what fits is applied");
    println!("{summary}");
    // Every id is taken, one VIP waits, and it is named.
    assert_eq!(h.maps.read_vips().unwrap().len(), MAX_VIPS as usize);
    assert_eq!(summary.left_out.len(), 1, "{summary}");
    let last = Ipv4Addr::from(0x0a64_0000 + MAX_VIPS);
    assert!(
        summary.to_string().contains(&format!("{last}:80/tcp")),
        "{summary}"
    );
    // Never frozen: going back to one VIP frees the rest, and the one still forwards.
    let summary = h.apply(&base).expect("back to one VIP");
    assert!(summary.left_out.is_empty(), "{summary}");
    assert_eq!(h.maps.read_vips().unwrap().len(), 1);
    assert_forwarded(&mut h, &Frame::tcp(40000, TCP_SYN).bytes());
}
