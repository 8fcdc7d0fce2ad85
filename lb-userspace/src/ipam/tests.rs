//! The allocator's rules, on plain values: families, sharing, requested addresses, exhaustion,
//! conflicts by age, rebuild after a restart, pool edits.

use std::net::IpAddr;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pools(specs: &[(&str, &[&str])]) -> Pools {
    Pools::validate(
        specs
            .iter()
            .enumerate()
            .map(|(i, (name, addrs))| PoolSpec {
                name: name.to_string(),
                created: format!("2026-01-0{i}"),
                addresses: addrs.iter().map(|s| s.to_string()).collect(),
                auto_assign: true,
                ..PoolSpec::default()
            })
            .collect(),
    )
}

fn svc(name: &str, created: &str) -> Claim {
    Claim {
        key: format!("default/{name}"),
        namespace: "default".into(),
        created: created.into(),
        uid: name.into(),
        load_balancer: true,
        families: vec![Family::V4],
        ports: vec![PortProto {
            port: 80,
            protocol: "TCP",
        }],
        ..Claim::default()
    }
}

fn port(p: u16) -> Vec<PortProto> {
    vec![PortProto {
        port: p,
        protocol: "TCP",
    }]
}

#[test]
fn every_service_gets_a_distinct_address_oldest_first() {
    let p = pools(&[("a", &["10.0.0.1-10.0.0.3"])]);
    let claims = vec![svc("c", "3"), svc("a", "1"), svc("b", "2")];
    let out = allocate(&p, &claims);
    assert_eq!(out.addresses["default/a"], [ip("10.0.0.1")]);
    assert_eq!(out.addresses["default/b"], [ip("10.0.0.2")]);
    assert_eq!(out.addresses["default/c"], [ip("10.0.0.3")]);
    assert_eq!(
        out.notices
            .iter()
            .filter(|n| n.reason == "IPAllocated")
            .count(),
        3
    );
}

#[test]
fn an_exhausted_pool_leaves_the_youngest_pending_until_an_address_frees() {
    let p = pools(&[("a", &["10.0.0.1-10.0.0.2"])]);
    let mut claims = vec![svc("a", "1"), svc("b", "2"), svc("c", "3")];
    let out = allocate(&p, &claims);
    assert!(out.addresses["default/c"].is_empty());
    let n = out
        .notices
        .iter()
        .find(|n| n.service == "default/c")
        .unwrap();
    assert!(n.warning && n.reason == "AllocationFailed" && n.message.contains("no free IPv4"));
    // b is deleted: c gets its address on the next pass.
    claims.remove(1);
    claims[0].current = vec![ip("10.0.0.1")];
    let out = allocate(&p, &claims);
    assert_eq!(out.addresses["default/c"], [ip("10.0.0.2")]);
}

#[test]
fn conflicts_go_to_the_oldest_never_to_the_name() {
    let p = pools(&[("a", &["10.0.0.0/24"])]);
    // Both status show .5 (e.g. a leader change wrote it twice): the older keeps it.
    let mut prod = svc("prod-web", "2026-01-01T00:00:00Z");
    prod.current = vec![ip("10.0.0.5")];
    let mut aaa = svc("aaa-x", "2026-06-01T00:00:00Z");
    aaa.current = vec![ip("10.0.0.5")];
    let out = allocate(&p, &[aaa.clone(), prod.clone()]);
    assert_eq!(out.addresses["default/prod-web"], [ip("10.0.0.5")]);
    assert_ne!(out.addresses["default/aaa-x"], [ip("10.0.0.5")]);
    // The newcomer asking for the address outright is refused, with the reason.
    aaa.current.clear();
    aaa.requested = vec![ip("10.0.0.5")];
    let out = allocate(&p, &[aaa, prod]);
    assert!(out.addresses["default/aaa-x"].is_empty());
    let n = out
        .notices
        .iter()
        .find(|n| n.service == "default/aaa-x")
        .unwrap();
    assert!(n.message.contains("held by default/prod-web"), "{n:?}");
}

#[test]
fn rebuilt_after_a_restart_from_the_status_alone() {
    let p = pools(&[("a", &["10.0.0.0/24"])]);
    let mut a = svc("a", "1");
    a.current = vec![ip("10.0.0.77")];
    let mut b = svc("b", "2");
    b.current = vec![ip("10.0.0.9")];
    let out = allocate(&p, &[a, b]);
    assert_eq!(out.addresses["default/a"], [ip("10.0.0.77")]);
    assert_eq!(out.addresses["default/b"], [ip("10.0.0.9")]);
    assert!(out.notices.is_empty(), "nothing changed: {:?}", out.notices);
}

#[test]
fn requested_addresses_inside_a_free_pool_are_honoured_and_others_refused() {
    let p = pools(&[("a", &["10.0.0.0/24"])]);
    let mut s = svc("s", "1");
    s.requested = vec![ip("10.0.0.42")];
    assert_eq!(
        allocate(&p, &[s.clone()]).addresses["default/s"],
        [ip("10.0.0.42")]
    );
    s.requested = vec![ip("192.168.1.1")];
    let out = allocate(&p, &[s]);
    assert!(out.addresses["default/s"].is_empty());
    assert!(
        out.notices[0]
            .message
            .contains("outside every address pool")
    );
}

#[test]
fn sharing_by_key_without_port_collisions_and_with_the_same_policy() {
    let p = pools(&[("a", &["10.0.0.1-10.0.0.9"])]);
    let mut dns_tcp = svc("dns-tcp", "1");
    dns_tcp.sharing_key = Some("dns".into());
    dns_tcp.ports = port(53);
    let mut dns_udp = svc("dns-udp", "2");
    dns_udp.sharing_key = Some("dns".into());
    dns_udp.ports = vec![PortProto {
        port: 53,
        protocol: "UDP",
    }];
    // Not requesting the address: the key names one shared address all the same.
    let mut clash = svc("dns-clash", "3");
    clash.sharing_key = Some("dns".into());
    clash.ports = port(53);
    let mut local = svc("dns-local", "4");
    local.sharing_key = Some("dns".into());
    local.ports = port(853);
    local.local_policy = true;
    local.requested = vec![ip("10.0.0.1")];
    let out = allocate(&p, &[dns_tcp, dns_udp, clash, local]);
    assert_eq!(out.addresses["default/dns-tcp"], [ip("10.0.0.1")]);
    assert_eq!(out.addresses["default/dns-udp"], [ip("10.0.0.1")]);
    assert!(out.addresses["default/dns-clash"].is_empty());
    assert!(out.addresses["default/dns-local"].is_empty());
    let msg = |k: &str| {
        out.notices
            .iter()
            .find(|n| n.service == k && n.warning)
            .map(|n| n.message.clone())
            .unwrap_or_default()
    };
    assert!(msg("default/dns-clash").contains("port 53/TCP"), "{out:?}");
    assert!(
        msg("default/dns-local").contains("externalTrafficPolicy"),
        "{out:?}"
    );
    // Without a sharing key nobody shares.
    let (a, b) = (svc("a", "1"), {
        let mut b = svc("b", "2");
        b.ports = port(81);
        b
    });
    let out = allocate(&p, &[a, b]);
    assert_ne!(out.addresses["default/a"], out.addresses["default/b"]);
}

#[test]
fn families_as_asked_and_dual_stack_all_or_nothing_when_required() {
    let p = pools(&[("v4", &["10.0.0.1"]), ("v6", &["fd00::/120"])]);
    let mut ds = svc("ds", "1");
    ds.families = vec![Family::V6, Family::V4];
    assert_eq!(
        allocate(&p, &[ds.clone()]).addresses["default/ds"],
        [ip("fd00::"), ip("10.0.0.1")]
    );
    // The IPv4 address goes to an older Service: PreferDualStack keeps IPv6 ...
    let old = svc("old", "0");
    let out = allocate(&p, &[old.clone(), ds.clone()]);
    assert_eq!(out.addresses["default/ds"], [ip("fd00::")]);
    // ... RequireDualStack gets nothing.
    ds.require_all = true;
    let out = allocate(&p, &[old, ds]);
    assert!(out.addresses["default/ds"].is_empty());
}

#[test]
fn pool_edits_selectors_and_external_ips() {
    // A pool that shrinks: the Service outside it moves to an address still inside.
    let mut s = svc("s", "1");
    s.current = vec![ip("10.0.0.200")];
    let out = allocate(&pools(&[("a", &["10.0.0.0/25"])]), &[s.clone()]);
    assert_eq!(out.addresses["default/s"], [ip("10.0.0.0")]);
    // A pool removed: nothing to serve from.
    let out = allocate(&Pools::default(), &[s.clone()]);
    assert!(out.addresses["default/s"].is_empty());
    // A selector that excludes the namespace.
    let mut p = pools(&[("a", &["10.0.0.0/24"])]);
    p.valid[0].spec.namespaces = vec!["prod".into()];
    assert!(allocate(&p, &[svc("x", "1")]).addresses["default/x"].is_empty());
    // externalIPs: only inside a pool that allows them.
    let mut p = pools(&[("open", &["10.0.1.0/24"]), ("closed", &["10.0.2.0/24"])]);
    p.valid[0].spec.allow_external_ips = true;
    let mut e = svc("e", "1");
    e.load_balancer = false;
    e.external_ips = vec![ip("10.0.1.5"), ip("10.0.2.5"), ip("192.168.0.1")];
    let out = allocate(&p, &[e]);
    assert_eq!(out.external_ips["default/e"], [ip("10.0.1.5")]);
    assert_eq!(
        out.notices
            .iter()
            .filter(|n| n.reason == "ExternalIPRefused")
            .count(),
        2
    );
}

#[test]
fn only_what_the_status_shows_is_served() {
    let p = pools(&[("a", &["10.0.0.0/24"])]);
    let mut s = svc("s", "1");
    s.current = vec![ip("10.0.0.3"), ip("192.168.9.9")];
    let out = allocate(&p, &[s]);
    // 192.168.9.9 in the status (written by someone else) is outside every pool: not served.
    assert_eq!(
        out.served("default/s", &[ip("10.0.0.3"), ip("192.168.9.9")]),
        [ip("10.0.0.3")]
    );
    // Allocated but not yet in the status: not served yet.
    assert!(out.served("default/s", &[]).is_empty());
}

#[test]
fn a_new_service_never_takes_what_another_holds_whatever_their_ages() {
    // Creation times have one-second resolution: a Service created in the same second may
    // sort before one that already holds an address. It gets a free one, never that one.
    let p = pools(&[("a", &["10.0.0.1-10.0.0.2"])]);
    let new = svc("new", "2026-01-01T00:00:00Z");
    let mut holder = svc("holder", "2026-01-01T00:00:01Z");
    holder.current = vec![ip("10.0.0.1")];
    let out = allocate(&p, &[new.clone(), holder.clone()]);
    assert_eq!(out.addresses["default/holder"], [ip("10.0.0.1")]);
    assert_eq!(out.addresses["default/new"], [ip("10.0.0.2")]);
    // With the pool full, the new one waits instead of displacing the holder.
    let p = pools(&[("a", &["10.0.0.1"])]);
    let out = allocate(&p, &[new, holder]);
    assert_eq!(out.addresses["default/holder"], [ip("10.0.0.1")]);
    assert!(out.addresses["default/new"].is_empty());
}
