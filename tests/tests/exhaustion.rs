//! Map exhaustion through the real program: a connection table far smaller than the flows it
//! sees (LRU eviction is silent: the kernel keeps no count of it, and sluice adds none on the
//! fast path; what shows it is `flow_miss` growing while `sluice_flows` stays at the table's
//! size), and flows whose entry was evicted still reach their backend, because Maglev picks
//! the same one again. And the VIP limit: a reconcile past it applies what fits, names what
//! waits, and never freezes.

use std::net::{IpAddr, Ipv4Addr};

use lb_common::{GlobalCounter, MAX_VIPS};
use lb_userspace::model::{Protocol, VipAddr};
use sluice_tests::{
    fixtures::{Frame, Harness, TCP_SYN, XDP_TX, assert_forwarded, desired},
    require_root,
};

const TABLE: u32 = 1024;
const FLOWS: u16 = 8192;

#[test]
fn a_full_connection_table_evicts_and_flows_keep_their_backend() {
    require_root();
    let mut h = Harness::with_flow_table(TABLE).expect("load the XDP object");
    h.apply(&desired(
        Protocol::Tcp,
        &[(0, 1, false), (1, 1, false), (2, 1, false)],
    ))
    .expect("program the maps");
    let mut first = Vec::new();
    for sport in 0..FLOWS {
        let (verdict, out) = h.run(&Frame::tcp(10_000 + sport, TCP_SYN).bytes()).unwrap();
        assert_eq!(verdict, XDP_TX, "flow {sport}");
        first.push(Harness::backend_of(&out).expect("a backend"));
    }
    let entries = h.maps.flows.keys().filter(Result::is_ok).count();
    println!("{FLOWS} flows through a {TABLE}-entry table: {entries} entries kept");
    // Per-CPU LRU lists may keep a little less than max_entries; never more.
    assert!(
        entries <= TABLE as usize && entries > 0,
        "{entries} entries"
    );
    let misses = h.counter(GlobalCounter::FlowMiss).unwrap();
    assert_eq!(misses, u64::from(FLOWS), "every new flow missed");
    // The earliest flows were evicted: they miss again, and Maglev sends each where it went.
    for sport in 0..FLOWS / 4 {
        let (verdict, out) = h.run(&Frame::tcp(10_000 + sport, TCP_SYN).bytes()).unwrap();
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            Harness::backend_of(&out),
            Some(first[sport as usize]),
            "flow {sport}"
        );
    }
    let again = h.counter(GlobalCounter::FlowMiss).unwrap() - misses;
    println!(
        "re-sent {} evicted flows: {again} missed, all on their backend",
        FLOWS / 4
    );
    assert!(
        again >= u64::from(FLOWS / 4) - u64::from(TABLE),
        "{again} misses"
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
    assert_eq!(h.maps.vips.keys().count(), MAX_VIPS as usize);
    assert_eq!(summary.left_out.len(), 1, "{summary}");
    assert!(
        summary.to_string().contains("10.100.4.0:80/tcp"),
        "{summary}"
    );
    // Never frozen: going back to one VIP frees the rest, and the one still forwards.
    let summary = h.apply(&base).expect("back to one VIP");
    assert!(summary.left_out.is_empty(), "{summary}");
    assert_eq!(h.maps.vips.keys().count(), 1);
    assert_forwarded(&mut h, &Frame::tcp(40000, TCP_SYN).bytes());
}
